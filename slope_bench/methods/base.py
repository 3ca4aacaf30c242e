"""The Compressor protocol: the only extension point of slope_bench.

A compressor is driven by the training loop in exactly this order::

    model = c.prepare(model, targets)      # once: wrap targeted layers
    for step in range(total):              # zero steps for post-training methods
        loss = task_loss + c.penalty()
        loss.backward(); opt.step()
        c.on_step(step, total)
    model = c.finalize(model, calib_batches)

Targeted weights are wrapped with ``torch.nn.utils.parametrize``: the module keeps
its class and its forward, ``module.weight`` becomes the compressed weight ``Ŵ`` and
the trainable full-precision ``W`` lives at
``module.parametrizations.weight.original``. ``finalize`` removes the
parametrizations and leaves ordinary modules whose weights really are sparse and
quantized. Nothing here imports Lightning.

Optimizer parameter groups are data, not a hook: a compressor's ``optim_groups``
maps the *last component* of a parameter name (e.g. ``"step"``, ``"theta_d"``) to
overrides of ``lr`` / ``weight_decay``; the training loop builds the groups.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from slope_bench.sparsity import NM, Unstructured

GRIDS = ("uniform", "deadzone", "codebook", "float")


@dataclass(frozen=True)
class LayerSpec:
    """What a compressor declares about one finalized tensor (the accounting format).

    Example: ``LayerSpec(pattern=NM(2, 4), grid="uniform", bits=4, granularity="channel",
    scale_values=64)`` — a 2:4, 4-bit layer with one 16-bit scale per output channel.
    Sparsity, levels and bit widths are *measured* from the tensor; the spec only says
    which encoding the pattern and the scales use.
    """

    pattern: NM | Unstructured | None
    grid: str
    bits: int | None
    granularity: str = "channel"
    scale_values: int = 0
    group_size: int = 0

    def __post_init__(self) -> None:
        if self.grid not in GRIDS:
            raise ValueError(f"grid must be one of {GRIDS}, got {self.grid!r}")


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
        return LayerSpec(pattern=None, grid="float", bits=None)


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def original_weight(module: nn.Module) -> torch.Tensor:
    """The trainable full-precision weight of a (possibly) parametrized module."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


class Compressor:
    """Base class: no compression. Subclasses override ``make_parametrization`` and,
    where needed, the hooks.

    Args:
        compress_first: also compress the model's first layer (kept dense by default).
        compress_classifier: also compress the final classifier / predictors.
    """

    name = "dense"
    optim_groups: dict[str, dict] = {}

    def __init__(self, compress_first: bool = False, compress_classifier: bool = False) -> None:
        self.compress_first = bool(compress_first)
        self.compress_classifier = bool(compress_classifier)
        self.layers: dict[str, CompressedWeight] = {}
        self.modules: dict[str, nn.Module] = {}
        self.specs: dict[str, LayerSpec] = {}

    # ---- the four hooks -------------------------------------------------------------
    def prepare(self, model: nn.Module, targets: Iterable[str]) -> nn.Module:
        """Wrap every targeted layer's weight with this method's parametrization."""
        for name in targets:
            module = get_module(model, name)
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

    def finalize(self, model: nn.Module, calib_batches: Iterable | None = None) -> nn.Module:
        """Harden every wrapped weight in place and remove the parametrizations."""
        for name, module in self.modules.items():
            self.specs[name] = self.harden_module(name, module)
        return model

    # ---- helpers for subclasses ---------------------------------------------------------
    def make_parametrization(self, name: str, weight: torch.Tensor) -> CompressedWeight | None:
        """Parametrization for one targeted weight; ``None`` leaves it dense."""
        return None

    @torch.no_grad()
    def harden_module(self, name: str, module: nn.Module) -> LayerSpec:
        """Replace a parametrized weight by its hardened tensor; returns its spec."""
        p = self.layers.get(name)
        if p is None or not parametrize.is_parametrized(module, "weight"):
            return LayerSpec(pattern=None, grid="float", bits=None)
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
