"""Post-training floor: magnitude N:M + round-to-nearest, in either order, no training.

* ``prune_then_quantize``: ``Ŵ = Q(S(W))`` — keep the ``n`` largest ``|W|`` of every
  ``m``, then round the kept weights to the nearest point of a per-channel grid fitted on
  the kept weights.
* ``quantize_then_prune``: ``Ŵ = S(Q(W))`` — round all weights on a grid fitted on all of
  them, then keep the ``n`` largest ``|Q(W)|`` of every ``m``. Equal codes tie and the
  tie is broken by position (the full-precision values are no longer known), which is
  the extra error of the Q→S order (Harma et al. 2024).

The grid (:func:`slope_bench.quant.fit_grid`) is, by default, OBC's: ``grid=signed``
(``2^b`` codes, zero at the middle: the OBC/GPTQ reference ``sym`` quantizer) with
``range=mse`` (the reference clipping search), so that ``magnitude_rtn`` is OBC with its
Hessian taken away; ``asymmetric`` (GPTQ's round-to-nearest baseline, an integer zero
point per channel), ``symmetric`` and ``range=minmax`` are knobs.

Steps are made float16-exact (:func:`slope_bench.quant.harden`) so the packed artifact
reproduces the finalized weights. Every method must beat this floor. The method declares
itself post-training (``requirements.trains`` is false: ``prepare`` then ``finalize``, no
calibration data). A layer whose input size is not divisible by ``m`` is quantized but not
pruned (a ``note`` in its ``layer_extras``).
"""

from __future__ import annotations

import torch
from torch import nn

from slope_bench.errors import ConfigError, check_choice
from slope_bench.methods.base import CompressedWeight, Compressor, Finalized, LayerSpec, NMBits, Requirements, full_precision, nm_notes
from slope_bench.quant import RANGES, UniformGrid, fit_grid, grouped, harden
from slope_bench.sparsity import NM, nm_mask

ORDERS = ("prune_then_quantize", "quantize_then_prune")


def magnitude_rtn(weight: torch.Tensor, pattern: NM | None, grid: UniformGrid, order: str, range_: str = "minmax") -> torch.Tensor:
    """Magnitude N:M pruning and round-to-nearest quantization of one weight tensor.

    Args:
        weight: full-precision weight.
        pattern: N:M pattern, or ``None`` to leave the tensor dense (quantization only).
        grid: uniform grid (any kind).
        order: ``prune_then_quantize`` or ``quantize_then_prune``.
        range_: ``minmax`` or ``mse`` (:func:`slope_bench.quant.fit_grid`).

    Returns:
        A tensor shaped like ``weight`` whose nonzeros are ``code · step`` (``(code − z) ·
        step`` on the asymmetric grid) with codes in ``[grid.qmin, grid.qmax]`` and
        float16-exact steps, and which satisfies ``pattern``.
    """
    w = weight.detach()
    if order == "prune_then_quantize":
        mask = nm_mask(w, pattern) if pattern is not None else None
        kept = w * mask if mask is not None else w
        scale, zero = fit_grid(grouped(kept, grid), grid, range_, None if mask is None else grouped(mask, grid))
        return harden(kept, scale, grid, mask, zero)
    if order == "quantize_then_prune":
        scale, zero = fit_grid(grouped(w, grid), grid, range_)
        quantized = harden(w, scale, grid, zero=zero)
        if pattern is None:
            return quantized
        return quantized * nm_mask(quantized, pattern).to(quantized.dtype)
    raise ValueError(f"order must be one of {ORDERS}, got {order!r}")


class MagnitudeRTNWeight(CompressedWeight):
    """``W -> magnitude_rtn(W)``; the forward passes gradients straight through.

    Args:
        weight: the layer's weight (decides whether the N:M pattern applies).
        pattern: N:M pattern (dropped when the input size is not divisible by ``m``).
        grid: uniform grid.
        order, range_: see :func:`magnitude_rtn`.
    """

    def __init__(self, weight: torch.Tensor, pattern: NM | None, grid: UniformGrid, order: str, range_: str = "minmax") -> None:
        super().__init__()
        self.pattern = pattern if pattern is not None and pattern.applies_to(weight) else None
        self.grid = grid
        self.order = order
        self.range = range_

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        with full_precision(weight):
            target = magnitude_rtn(weight, self.pattern, self.grid, self.order, self.range)
            return weight + (target - weight).detach()

    @torch.no_grad()
    def harden(self, weight: torch.Tensor) -> torch.Tensor:
        return magnitude_rtn(weight, self.pattern, self.grid, self.order, self.range)

    def spec(self, weight: torch.Tensor) -> LayerSpec:
        groups = grouped(weight, self.grid).shape[0]
        zeros = groups if self.grid.zero_point else 0
        return LayerSpec(
            self.pattern, "uniform", self.grid.bits, self.grid.granularity, groups + zeros,
            grid_kind=self.grid.kind, grid_range=self.range, zero_points=zeros,
        )  # fmt: skip


class MagnitudeRTN(Compressor):
    """Magnitude N:M + round-to-nearest, post-training (declared by :attr:`requirements`).

    Args:
        name: the method's name in ``results.json``.
        n, m: N:M pattern (``n=m=None`` for quantization only).
        w_bits: weight bits 1..8.
        order: ``prune_then_quantize`` (default) or ``quantize_then_prune``.
        granularity: quantization scale granularity (``channel``/``tensor``/``group``).
        group_size: group length for ``granularity=group``.
        nm_order: ``channel_major`` (input channels at each spatial position) or ``input``.
        grid: ``signed`` (OBC's), ``symmetric`` or ``asymmetric`` (GPTQ's RTN baseline).
        range: ``mse`` (OBC's clipping search) or ``minmax``.
        compress_first, compress_classifier: see :class:`Compressor`.
    """

    def __init__(
        self,
        name: str = "magnitude_rtn",
        n: int | None = 2,
        m: int | None = 4,
        w_bits: int = 4,
        order: str = "prune_then_quantize",
        granularity: str = "channel",
        group_size: int = 128,
        nm_order: str = "channel_major",
        grid: str = "signed",
        range: str = "mse",
        compress_first: bool = False,
        compress_classifier: bool = False,
    ) -> None:
        super().__init__(name, compress_first, compress_classifier)
        if w_bits is None:
            raise ConfigError("w_bits", w_bits, "an integer in 1..8 (round-to-nearest needs a grid)")
        knobs = NMBits(n, m, w_bits, granularity, group_size, nm_order, grid)
        self.pattern, self.grid = knobs.pattern, knobs.grid
        self.order = check_choice("order", order, ORDERS)
        self.range = check_choice("range", range, RANGES)

    @property
    def requirements(self) -> Requirements:
        """Post-training: no fine-tune, no calibration data."""
        return Requirements(trains=False)

    def make_parametrization(self, name: str, weight: torch.Tensor) -> CompressedWeight | None:
        return MagnitudeRTNWeight(weight, self.pattern, self.grid, self.order, self.range)

    def finalize(self, model: nn.Module, calib_batches: list | None = None) -> Finalized:
        """Harden every layer (base class); a layer N:M does not apply to gets a ``note``."""
        done = super().finalize(model, calib_batches)
        done.layer_extras = nm_notes(self.pattern, self.modules)
        return done

    def setting(self) -> str:
        parts = [str(self.pattern)] if self.pattern is not None else []
        # the non-default order is part of the setting, so the leaderboard never pools the two orders
        suffix = ["q→p"] if self.order == "quantize_then_prune" else []
        return " ".join([*parts, str(self.grid), *suffix])
