"""The Compressor contract: the only extension point of slope_bench, written once here.

A run and a method talk only through what this module defines. The run drives a
compressor in exactly this order (:func:`slope_bench.loop.drive` is the plain-PyTorch
version of the same loop; the Lightning module in :mod:`slope_bench.lit` is the other)::

    needs = c.requirements                       # declared: trains? calibration samples?
    targets, skipped = choose_targets(model, c)  # c.supports(name, module) filters, before any training
    model = c.prepare(model, targets, info)      # once: wrap targeted layers (info: RunInfo)
    for step in range(total):                    # total = 0 when not needs.trains
        loss = task_loss + c.penalty()
        loss.backward(); opt.step()
        c.on_step(step, total)
    done = c.finalize(model, calib_batches)      # -> Finalized; calib_batches has
                                                 #    needs.calib_samples samples (None if 0)

A method **declares** :attr:`Compressor.requirements` (:class:`Requirements`: trains or
post-training, calibration samples and passes) and :attr:`Compressor.optim_groups`
(optimizer overrides by the last component of a parameter name, e.g.
``{"step": {"weight_decay": 0.0}}``); it is **given** :class:`RunInfo` in ``prepare`` and
the calibration batches in ``finalize``, which **returns** :class:`Finalized` (layer
specs, per-layer extras, result scalars, posterior samples).

Its **checkpointable state**: :meth:`Compressor.state_dict` / :meth:`load_state_dict`
hold the plain Python-side state its tensors do not (a stage, a switch step, the current
sparsity of a schedule, hard-gate flags). Tensors (weights, steps, masks, gates) live in
the model's state dict. ``load_state_dict`` must also recreate any buffer a state adds
(a frozen mask), so that the model's state dict then loads strictly; a resumed fit never
replays ``on_step``.

Targeted weights are wrapped with ``torch.nn.utils.parametrize``: ``module.weight`` is
the compressed ``Ŵ`` (computed in float32 under mixed precision, :func:`full_precision`)
and the trainable ``W`` lives at ``module.parametrizations.weight.original``. After
``finalize`` the model holds ordinary modules whose weights really are sparse and
quantized. Nothing here imports Lightning.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from slope_bench.errors import ConfigError, check_bits, check_choice, check_int, check_nm
from slope_bench.quant import GRANULARITIES, GRID_KINDS, UniformGrid
from slope_bench.sparsity import NM, Unstructured, as_matrix

GRIDS = ("uniform", "deadzone", "codebook", "float")
COMPRESSIBLE = (nn.Conv2d, nn.Linear)


# ---------------------------------------------------------------------------- declared / given / returned
@dataclass(frozen=True)
class Requirements:
    """How a method runs, declared by the method, e.g. ``Requirements(trains=False,
    calib_samples=1024)``: post-training (``prepare`` then ``finalize``), 1,024 calibration
    samples passed once."""

    trains: bool = True
    calib_samples: int = 0
    calib_passes: int = 1


@dataclass(frozen=True)
class RunInfo:
    """What the run tells a method before ``prepare``, e.g. ``RunInfo(num_train=1437, seed=0)``."""

    num_train: int
    seed: int = 0


@dataclass(frozen=True)
class LayerSpec:
    """What a compressor declares about one finalized tensor (the accounting format).

    Example: ``LayerSpec(pattern=NM(2, 4), grid="uniform", bits=4, granularity="channel",
    scale_values=64, grid_kind="signed", grid_range="lsq")`` — a 2:4, 4-bit layer with one
    16-bit scale per output channel. Sparsity, levels and bit widths are *measured* from
    the tensor; the spec only says which encoding the pattern and the scales use.
    ``scale_values`` counts every 16-bit number stored beside the codes, zero points
    included (``zero_points`` of them: an asymmetric grid has one per group).
    """

    pattern: NM | Unstructured | None
    grid: str
    bits: int | None
    granularity: str = "channel"
    scale_values: int = 0
    group_size: int = 0
    grid_kind: str = ""  # uniform grids: symmetric | signed | asymmetric (quant.UniformGrid.kind)
    grid_range: str = ""  # how the range was set: lsq (learned) | minmax | mse (clipping search)
    zero_points: int = 0  # how many of scale_values are 16-bit integer zero points (asymmetric)

    def __post_init__(self) -> None:
        if self.grid not in GRIDS:
            raise ValueError(f"grid must be one of {GRIDS}, got {self.grid!r}")
        if self.grid_kind not in ("", *GRID_KINDS) or not 0 <= self.zero_points <= self.scale_values:
            raise ValueError(f"grid_kind {self.grid_kind!r} / zero_points {self.zero_points} do not fit")


FLOAT_SPEC = LayerSpec(pattern=None, grid="float", bits=None)


@dataclass
class Finalized:
    """What ``finalize`` returns, e.g. ``Finalized(specs={"conv": LayerSpec(NM(2, 4),
    "uniform", 4)}, layer_extras={"conv": {"solver": "exact"}}, results={"time/obc_total_s": 1.2})``:
    ``specs`` (declared encoding of every targeted tensor), ``layer_extras`` (extra fields
    of a layer's ``layers`` record), ``results`` (extra ``stage/name`` scalars) and
    ``samples`` (posterior samples of the targeted weights whose mean logits the run
    reports as ``test/<metric>_bayes_avg``; empty: none), all by module name."""

    specs: dict[str, LayerSpec]
    layer_extras: dict[str, dict[str, Any]] = field(default_factory=dict)
    results: dict[str, float] = field(default_factory=dict)
    samples: list[dict[str, torch.Tensor]] = field(default_factory=list)


# ---------------------------------------------------------------------------- shared knobs
@dataclass(frozen=True)
class NMBits:
    """The N:M + bits + granularity knobs most methods share, validated once.

    Example: ``NMBits(n=2, m=4, w_bits=4)`` → ``pattern == NM(2, 4)`` and
    ``grid == UniformGrid(4)`` (signed); ``NMBits(n=None, m=None, w_bits=4)`` has no
    pattern, ``NMBits(w_bits=None)`` no grid. Bad values raise :class:`ConfigError` naming
    the knob (``n``, ``m``, ``w_bits``, ``granularity``, ``group_size``, ``nm_order``, ``grid``).
    """

    n: int | None = 2
    m: int | None = 4
    w_bits: int | None = 4
    granularity: str = "channel"
    group_size: int = 128
    nm_order: str = "input"
    grid_kind: str = "signed"

    def __post_init__(self) -> None:
        check_nm(self.n, self.m, self.nm_order)
        if self.w_bits is not None:
            check_bits(self.w_bits)
        check_choice("granularity", self.granularity, GRANULARITIES)
        check_int("group_size", self.group_size, 1)
        check_choice("grid", self.grid_kind, GRID_KINDS)

    @property
    def pattern(self) -> NM | None:
        return check_nm(self.n, self.m, self.nm_order)

    @property
    def grid(self) -> UniformGrid | None:
        return None if self.w_bits is None else UniformGrid(self.w_bits, self.grid_kind, self.granularity, self.group_size)


def full_precision(weight: torch.Tensor) -> torch.autocast:
    """Autocast off on ``weight``'s device: ``Ŵ``, steps and gates stay float32 under mixed
    precision; the layer consuming ``Ŵ`` casts it where autocast needs it."""
    return torch.autocast(weight.device.type, enabled=False)


# ---------------------------------------------------------------------------- parametrizations
class CompressedWeight(nn.Module):
    """A parametrization ``W -> Ŵ`` used during training; ``harden`` gives the final tensor."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    @torch.no_grad()
    def harden(self, weight: torch.Tensor) -> torch.Tensor:
        """Final compressed tensor (exact zeros, exact grid values)."""
        return self.forward(weight).detach()

    def spec(self, weight: torch.Tensor) -> LayerSpec:
        """Declared encoding of the hardened tensor."""
        return FLOAT_SPEC


def original_weight(module: nn.Module) -> torch.Tensor:
    """The trainable full-precision weight of a (possibly) parametrized module."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def nm_reason(pattern: NM | None, module: nn.Module) -> str | None:
    """Why ``pattern`` cannot apply to ``module``'s weight (``None`` when it can)."""
    if pattern is None or pattern.applies_to(module.weight):
        return None
    cols = as_matrix(module.weight).shape[1]
    return f"{pattern} not applied: input size {cols} is not divisible by m={pattern.m}"


def nm_notes(pattern: NM | None, modules: dict[str, nn.Module]) -> dict[str, dict[str, str]]:
    """``layer_extras`` with a ``note`` (:func:`nm_reason`) for every layer ``pattern``
    does not apply to: such a layer is quantized but not pruned."""
    notes = {name: nm_reason(pattern, module) for name, module in modules.items()}
    return {name: {"note": note} for name, note in notes.items() if note is not None}


# ---------------------------------------------------------------------------- the compressor
class Compressor:
    """Base class: no compression. Subclasses override ``make_parametrization`` and,
    where needed, the hooks, :attr:`requirements`, :meth:`supports` and the state methods.

    Args:
        name: the method's name as recorded in ``results.json`` (the yaml's ``name``).
        compress_first: also compress the model's first layer (kept dense by default).
        compress_classifier: also compress the final classifier / predictors.
    """

    optim_groups: dict[str, dict] = {}

    def __init__(self, name: str = "dense", compress_first: bool = False, compress_classifier: bool = False) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigError("name", name, "a non-empty string")
        self.name = name
        self.compress_first = bool(compress_first)
        self.compress_classifier = bool(compress_classifier)
        self.layers: dict[str, CompressedWeight] = {}
        self.modules: dict[str, nn.Module] = {}
        self.info: RunInfo | None = None

    # ---- declared -----------------------------------------------------------------------
    @property
    def requirements(self) -> Requirements:
        """How this method runs (trains by default, no calibration data)."""
        return Requirements()

    def supports(self, name: str, module: nn.Module) -> str | None:
        """``None`` when this method can compress ``module``, else the reason it cannot
        (the layer then stays dense and is reported with the reason). Applied to every
        candidate layer before any training."""
        if not isinstance(module, COMPRESSIBLE) or getattr(module, "weight", None) is None:
            return f"{type(module).__name__} is not a Conv2d/Linear layer with a weight"
        return None

    # ---- the four hooks -------------------------------------------------------------------
    def prepare(self, model: nn.Module, targets: Iterable[str], info: RunInfo) -> nn.Module:
        """Wrap every targeted layer's weight with this method's parametrization."""
        self.info = info
        for name in targets:
            module = model.get_submodule(name)
            p = self.make_parametrization(name, module.weight.detach())
            self.modules[name] = module
            if p is None:
                continue
            parametrize.register_parametrization(module, "weight", p, unsafe=True)
            self.layers[name] = p
        return model

    def penalty(self) -> torch.Tensor | float:
        """Extra loss term added to the task loss (0 by default)."""
        return 0.0

    def on_step(self, step: int, total: int) -> None:
        """Called after every optimizer step with the 0-based step and the total."""

    def finalize(self, model: nn.Module, calib_batches: list | None = None) -> Finalized:
        """Harden every wrapped weight in place and remove the parametrizations."""
        return Finalized(specs={name: self.harden_module(name, module) for name, module in self.modules.items()})

    # ---- checkpointable state -------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain Python-side state (JSON-like data only) that the model's tensors do not hold."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` after ``prepare`` and before the model's tensors load."""

    # ---- helpers for subclasses -------------------------------------------------------------
    def make_parametrization(self, name: str, weight: torch.Tensor) -> CompressedWeight | None:
        """Parametrization for one targeted weight; ``None`` leaves it dense."""
        return None

    @torch.no_grad()
    def harden_module(self, name: str, module: nn.Module) -> LayerSpec:
        """Replace a parametrized weight by its hardened tensor; returns its spec."""
        p = self.layers.get(name)
        if p is None or not parametrize.is_parametrized(module, "weight"):
            return FLOAT_SPEC
        w = module.parametrizations.weight.original.detach()
        final = p.harden(w)
        spec = p.spec(w)
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        module.weight.data.copy_(final)
        return spec

    def stats(self) -> dict[str, float]:
        """Scalars worth logging during training (e.g. current sparsity or stage)."""
        return {}

    def setting(self) -> str:
        """Human-readable setting, e.g. ``"2:4 w4"``."""
        return "dense"
