"""Post-training floor: magnitude N:M + round-to-nearest, in either order, no training.

* ``prune_then_quantize``: ``Ŵ = Q(S(W))`` — keep the ``n`` largest ``|W|`` of every
  ``m``, then round the kept weights to the nearest point of a symmetric per-channel grid
  with step ``max|w_kept| / Qp``.
* ``quantize_then_prune``: ``Ŵ = S(Q(W))`` — round all weights with step
  ``max|w| / Qp``, then keep the ``n`` largest ``|Q(W)|`` of every ``m``. Equal codes tie
  and the tie is broken by position (the full-precision values are no longer known),
  which is the extra error of the Q→S order (Harma et al. 2024).

Steps are made float16-exact (:func:`slope_bench.quant.harden`) so the packed artifact
reproduces the finalized weights. Every method must beat this floor.
"""

from __future__ import annotations

import torch

from slope_bench.errors import ConfigError, check_bits, check_choice, check_nm
from slope_bench.methods.base import CompressedWeight, Compressor, LayerSpec
from slope_bench.quant import GRANULARITIES, UniformGrid, grouped, harden, rtn_step
from slope_bench.sparsity import NM, nm_mask

ORDERS = ("prune_then_quantize", "quantize_then_prune")


def magnitude_rtn(weight: torch.Tensor, pattern: NM | None, grid: UniformGrid, order: str) -> torch.Tensor:
    """Magnitude N:M pruning and round-to-nearest quantization of one weight tensor.

    Args:
        weight: full-precision weight.
        pattern: N:M pattern, or ``None`` to leave the tensor dense (quantization only).
        grid: symmetric uniform grid.
        order: ``prune_then_quantize`` or ``quantize_then_prune``.

    Returns:
        A tensor shaped like ``weight`` whose nonzeros are ``code · step`` with
        ``|code| <= grid.qmax`` and float16-exact steps, and which satisfies ``pattern``.
    """
    w = weight.detach()
    if order == "prune_then_quantize":
        mask = nm_mask(w, pattern) if pattern is not None else None
        kept = w * mask if mask is not None else w
        return harden(kept, rtn_step(kept, grid), grid, mask)
    if order == "quantize_then_prune":
        quantized = harden(w, rtn_step(w, grid), grid)
        if pattern is None:
            return quantized
        return quantized * nm_mask(quantized, pattern).to(quantized.dtype)
    raise ValueError(f"order must be one of {ORDERS}, got {order!r}")


class MagnitudeRTNWeight(CompressedWeight):
    """``W -> magnitude_rtn(W)``; the forward passes gradients straight through.

    Args:
        weight: the layer's weight (decides whether the N:M pattern applies).
        pattern: N:M pattern (dropped when the input size is not divisible by ``m``).
        grid: symmetric uniform grid.
        order: see :func:`magnitude_rtn`.
    """

    def __init__(self, weight: torch.Tensor, pattern: NM | None, grid: UniformGrid, order: str) -> None:
        super().__init__()
        self.pattern = pattern if pattern is not None and pattern.applies_to(weight) else None
        self.grid = grid
        self.order = order

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        target = magnitude_rtn(weight, self.pattern, self.grid, self.order)
        return weight + (target - weight).detach()

    @torch.no_grad()
    def harden(self, weight: torch.Tensor) -> torch.Tensor:
        return magnitude_rtn(weight, self.pattern, self.grid, self.order)

    def spec(self, weight: torch.Tensor) -> LayerSpec:
        groups = grouped(weight, self.grid).shape[0]
        return LayerSpec(self.pattern, "uniform", self.grid.bits, self.grid.granularity, groups)


class MagnitudeRTN(Compressor):
    """Magnitude N:M + round-to-nearest, post-training (``epochs: 0``).

    Args:
        n, m: N:M pattern (``n=m=None`` for quantization only).
        w_bits: weight bits 1..8.
        order: ``prune_then_quantize`` (default) or ``quantize_then_prune``.
        granularity: quantization scale granularity (``channel``/``tensor``/``group``).
        group_size: group length for ``granularity=group``.
        nm_order: ``input`` (SR-STE flattening) or ``channel_major``.
        compress_first, compress_classifier: see :class:`Compressor`.
    """

    name = "magnitude_rtn"

    def __init__(
        self,
        n: int | None = 2,
        m: int | None = 4,
        w_bits: int = 4,
        order: str = "prune_then_quantize",
        granularity: str = "channel",
        group_size: int = 128,
        nm_order: str = "input",
        compress_first: bool = False,
        compress_classifier: bool = False,
    ) -> None:
        super().__init__(compress_first, compress_classifier)
        self.pattern = check_nm(n, m, nm_order)
        check_choice("granularity", granularity, GRANULARITIES)
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ConfigError("group_size", group_size, "an integer >= 1")
        self.grid = UniformGrid(check_bits(w_bits), True, granularity, group_size)
        self.order = check_choice("order", order, ORDERS)

    def make_parametrization(self, name: str, weight: torch.Tensor) -> CompressedWeight | None:
        return MagnitudeRTNWeight(weight, self.pattern, self.grid, self.order)

    def setting(self) -> str:
        parts = [str(self.pattern)] if self.pattern is not None else []
        # the non-default order is part of the setting, so the leaderboard never pools the two orders
        suffix = ["q→p"] if self.order == "quantize_then_prune" else []
        return " ".join([*parts, str(self.grid), *suffix])
