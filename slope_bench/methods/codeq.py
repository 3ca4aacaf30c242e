"""CoDeQ: a learned dead-zone quantizer for joint unstructured pruning and quantization.

Wenshøj, Chen, Pepin, Selvan (arXiv 2512.12981). Every targeted tensor is quantized by
the dead-zone quantizer of :mod:`slope_bench.deadzone` (``a`` = percentile of ``|W|``,
dead-zone width ``d = 2a·(1 − |tanh θ_d|)``, bits fixed or ``b = round(6·|tanh θ_b| + 2)``;
``|w| < d/2`` → exactly 0), with one learnable ``θ_d`` (and ``θ_b`` for mixed
precision) per tensor, both starting at 3.0 (≈1% dead zone, ≈8 bits).

Choices the paper leaves open (knobs or stated here):

* ``a`` is recomputed from the current weights at every forward, linearly interpolated as
  in the reference (``numpy.percentile``; ``percentile_interpolation=nearest_rank`` is the
  former convention). The grid is CoDeQ's own dead zone: ``grid`` takes no other value.
* Sparsity pressure is the paper's: one global AdamW weight decay on every ``θ_d``
  (``sparsity_decay``); mixed precision adds weight decay on every ``θ_b``
  (``bits_decay``). Three parameter groups (weights / ``theta_d`` / ``theta_b``) are
  declared through :attr:`CoDeQ.optim_groups`; no extra loss term.
* ``finalize`` hardens with the learned ``d``, ``s`` and ``b``, ``s`` and ``δ`` rounded to
  float16 first (:func:`~slope_bench.deadzone.dead_zone_harden`), and reports each
  layer's learned grid (``learned_bits``, ``dead_zone``, ``step``) in ``layer_extras``.
"""

from __future__ import annotations

import torch

from slope_bench.deadzone import (
    INTERPOLATIONS,
    MAX_BITS,
    MIN_BITS,
    bits_from_logit,
    dead_zone_harden,
    dead_zone_quantize,
    dead_zone_width,
    percentile_abs,
)
from slope_bench.errors import ConfigError, check_bits, check_choice, check_range
from slope_bench.methods.base import CompressedWeight, Compressor, Finalized, LayerSpec, full_precision
from slope_bench.sparsity import Unstructured


class DeadZoneWeight(CompressedWeight):
    """``W -> Ŵ`` through CoDeQ's dead-zone quantizer, with per-tensor ``θ_d`` (and ``θ_b``).

    Args:
        bits: fixed bit width 2..8, or ``None`` to learn it through ``θ_b``.
        percentile: ``q`` of the top level ``a``.
        theta_init: initial value of ``θ_d`` and ``θ_b`` (3.0: ≈1% dead zone, 8 bits).
        interpolation: of the percentile, ``linear`` or ``nearest_rank``.
        device: of ``θ_d`` / ``θ_b`` (the weight's).
    """

    def __init__(
        self,
        bits: int | None,
        percentile: float = 99.0,
        theta_init: float = 3.0,
        interpolation: str = "linear",
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.fixed_bits = bits
        self.percentile = percentile
        self.interpolation = interpolation
        self.theta_d = torch.nn.Parameter(torch.tensor(float(theta_init), device=device))
        self.theta_b = None if bits is not None else torch.nn.Parameter(torch.tensor(float(theta_init), device=device))
        self.last_zeros: torch.Tensor | None = None
        self.last_numel = 0

    def bits(self) -> torch.Tensor | int:
        """Current bit width: the fixed int, or ``b(θ_b)`` with its STE gradient."""
        return self.fixed_bits if self.theta_b is None else bits_from_logit(self.theta_b)

    def hard_bits(self) -> int:
        """Bit width used by :meth:`harden`."""
        return self.fixed_bits if self.theta_b is None else int(bits_from_logit(self.theta_b.detach()).round())

    def width(self, weight: torch.Tensor) -> torch.Tensor:
        """Current dead-zone width ``d`` (no gradient)."""
        a = percentile_abs(weight, self.percentile, self.interpolation)
        return dead_zone_width(self.theta_d.detach(), a)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        with full_precision(weight):
            a = percentile_abs(weight, self.percentile, self.interpolation).to(weight.dtype)
            out = dead_zone_quantize(weight, self.theta_d, self.bits(), a)
        if self.training:
            self.last_zeros = (out.detach() == 0).sum()
            self.last_numel = out.numel()
        return out

    @torch.no_grad()
    def hardened_grid(self, weight: torch.Tensor) -> dict[str, float]:
        """The hard grid of :meth:`harden`: bits, dead zone ``d``, 16-bit step and offset."""
        a = percentile_abs(weight, self.percentile, self.interpolation)
        width = dead_zone_width(self.theta_d.detach(), a)
        _, step16, offset16 = dead_zone_harden(weight, a, width, self.hard_bits())
        return {
            "learned_bits": float(self.hard_bits()),
            "dead_zone": float(width),
            "step": float(step16),
            "offset": float(offset16),
        }

    @torch.no_grad()
    def harden(self, weight: torch.Tensor) -> torch.Tensor:
        a = percentile_abs(weight, self.percentile, self.interpolation)
        width = dead_zone_width(self.theta_d.detach(), a)
        return dead_zone_harden(weight, a, width, self.hard_bits())[0]

    def spec(self, weight: torch.Tensor) -> LayerSpec:
        return LayerSpec(
            pattern=Unstructured(), grid="deadzone", bits=self.hard_bits(), granularity="tensor", scale_values=2, grid_range="percentile"
        )


class CoDeQ(Compressor):
    """CoDeQ: unstructured sparsity from a learned dead zone + fixed or learned bit widths.

    Args:
        name: the method's name in ``results.json``.
        w_bits: fixed weight bits 2..8, or ``"learned"`` for mixed precision (per-tensor
            ``θ_b``).
        percentile: ``q`` of the top level ``a = q``-th percentile of ``|W|``, in ``(0, 100]``.
        percentile_interpolation: ``linear`` (the reference's) or ``nearest_rank``.
        grid: ``deadzone`` (CoDeQ's own grid; no other value).
        lr_theta: AdamW learning rate of the dead-zone logits ``θ_d``.
        lr_bits: AdamW learning rate of the bit logits ``θ_b`` (``None``: ``lr_theta``).
        sparsity_decay: AdamW weight decay on every ``θ_d`` (the global sparsity knob).
        bits_decay: AdamW weight decay on every ``θ_b`` (mixed-precision pressure).
        theta_init: initial ``θ_d`` and ``θ_b``.
        compress_first, compress_classifier: see :class:`Compressor`.
    """

    def __init__(
        self,
        name: str = "codeq",
        w_bits: int | str = 4,
        percentile: float = 99.0,
        percentile_interpolation: str = "linear",
        grid: str = "deadzone",
        lr_theta: float = 1e-2,
        lr_bits: float | None = None,
        sparsity_decay: float = 3.0,
        bits_decay: float = 0.0,
        theta_init: float = 3.0,
        compress_first: bool = False,
        compress_classifier: bool = False,
    ) -> None:
        super().__init__(name, compress_first, compress_classifier)
        if w_bits == "learned":
            self.w_bits: int | None = None
        elif isinstance(w_bits, int) and not isinstance(w_bits, bool):
            self.w_bits = check_bits(w_bits, MIN_BITS, MAX_BITS)
        else:
            raise ConfigError("w_bits", w_bits, f"an integer in {MIN_BITS}..{MAX_BITS} or 'learned'")
        self.percentile = check_range("percentile", percentile, 0.0, 100.0, low_open=True)
        self.interpolation = check_choice("percentile_interpolation", percentile_interpolation, INTERPOLATIONS)
        if grid != "deadzone":
            raise ConfigError("grid", grid, "deadzone (CoDeQ learns its own dead-zone grid; no symmetric/signed/asymmetric grid)")
        self.lr_theta = check_range("lr_theta", lr_theta, 0.0, low_open=True)
        self.lr_bits = self.lr_theta if lr_bits is None else check_range("lr_bits", lr_bits, 0.0, low_open=True)
        self.sparsity_decay = check_range("sparsity_decay", sparsity_decay, 0.0)
        self.bits_decay = check_range("bits_decay", bits_decay, 0.0)
        self.theta_init = check_range("theta_init", theta_init, 0.0, low_open=True)
        self.optim_groups = {
            "theta_d": {"lr": self.lr_theta, "weight_decay": self.sparsity_decay},
            "theta_b": {"lr": self.lr_bits, "weight_decay": self.bits_decay},
        }

    def make_parametrization(self, name: str, weight: torch.Tensor) -> CompressedWeight:
        return DeadZoneWeight(self.w_bits, self.percentile, self.theta_init, self.interpolation, weight.device)

    def finalize(self, model: torch.nn.Module, calib_batches: list | None = None) -> Finalized:
        """Record each layer's learned grid in ``layer_extras``, then harden (base class)."""
        extras = {}
        for name, p in self.layers.items():
            grid = p.hardened_grid(self.modules[name].parametrizations.weight.original.detach())
            extras[name] = {key: grid[key] for key in ("learned_bits", "dead_zone", "step")}
        done = super().finalize(model, calib_batches)
        done.layer_extras = extras
        return done

    def stats(self) -> dict[str, float]:
        """Sparsity of the last training forward and mean bit width over targeted tensors."""
        seen = [p for p in self.layers.values() if p.last_zeros is not None]
        if not seen:
            return {}
        zeros = sum(float(p.last_zeros) for p in seen)
        total = sum(p.last_numel for p in seen)
        with torch.no_grad():
            bits = sum(float(p.bits()) * p.last_numel for p in seen) / total
        return {"sparsity": zeros / total, "bits": bits}

    def setting(self) -> str:
        return "unstructured mixed" if self.w_bits is None else f"unstructured w{self.w_bits}"
