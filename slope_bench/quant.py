"""Quantization grids and pure quantizer functions (STE, LSQ, round-to-nearest).

A grid is a frozen dataclass; functions take tensors and return tensors. Scales are
rounded to float16-representable values before a model is finalized (``harden``) so
that the packed artifact (16-bit scales) reproduces the finalized weights bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

GRANULARITIES = ("channel", "tensor", "group")


@dataclass(frozen=True)
class UniformGrid:
    """A uniform weight grid, e.g. ``UniformGrid(bits=4)``: symmetric, one scale per
    output channel, integer codes in ``[-7, 7]`` (``2^(b-1) - 1`` positive levels, zero
    included). ``bits=1`` is the binary grid ``{-s, +s}``. ``symmetric=False`` gives codes
    ``0 .. 2^b - 1`` with an integer zero point. ``granularity="group"`` uses one scale per
    ``group_size`` consecutive input weights.
    """

    bits: int = 4
    symmetric: bool = True
    granularity: str = "channel"
    group_size: int = 128

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be an integer in 1..8, got {self.bits!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")

    @property
    def qmax(self) -> int:
        """Largest code: ``2^(b-1) - 1`` (symmetric, 1 for binary) or ``2^b - 1``."""
        if not self.symmetric:
            return 2**self.bits - 1
        return max(2 ** (self.bits - 1) - 1, 1)

    @property
    def qmin(self) -> int:
        return -self.qmax if self.symmetric else 0

    @property
    def binary(self) -> bool:
        return self.symmetric and self.bits == 1

    @property
    def max_levels(self) -> int:
        """Distinct values a group can hold, zero included."""
        return 2 if self.binary else self.qmax - self.qmin + 1

    def __str__(self) -> str:
        return f"w{self.bits}"


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through (identity) gradient."""
    return x + (torch.round(x) - x).detach()


def ste_sign(x: torch.Tensor) -> torch.Tensor:
    """Sign (never 0) with a straight-through gradient."""
    s = torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))
    return x + (s - x).detach()


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward, gradient multiplied by ``scale`` (LSQ, Esser et al. 2020, §2.2)."""
    return (x - x * scale).detach() + x * scale


def grouped(weight: torch.Tensor, grid: UniformGrid) -> torch.Tensor:
    """View ``weight`` as ``(groups, group_len)``: one row per quantization group."""
    if grid.granularity == "tensor":
        return weight.reshape(1, -1)
    mat = weight.reshape(weight.shape[0], -1) if weight.dim() > 1 else weight.reshape(1, -1)
    if grid.granularity == "channel":
        return mat
    cols = mat.shape[1]
    if cols % grid.group_size:
        return mat  # fall back to per-channel when the row does not split evenly
    return mat.reshape(-1, grid.group_size)


def scale_shape(weight: torch.Tensor, grid: UniformGrid) -> tuple[int, int]:
    return (grouped(weight, grid).shape[0], 1)


def init_lsq_step(weight: torch.Tensor, grid: UniformGrid, mask: torch.Tensor | None = None) -> torch.Tensor:
    """LSQ initial step ``2·mean|w| / sqrt(Qp)`` per group, over kept weights only."""
    w = grouped(weight.detach().abs(), grid)
    if mask is not None:
        m = grouped(mask.to(w.dtype), grid)
        mean = (w * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1)
    else:
        mean = w.mean(1, keepdim=True)
    step = 2 * mean / math.sqrt(grid.qmax)
    return step.clamp_min(1e-8)


def rtn_step(weight: torch.Tensor, grid: UniformGrid) -> torch.Tensor:
    """Round-to-nearest step: ``max|w| / qmax`` per group (symmetric)."""
    w = grouped(weight.detach().abs(), grid)
    return (w.amax(1, keepdim=True) / grid.qmax).clamp_min(1e-8)


class _LSQRoundClamp(torch.autograd.Function):
    """Fused ``clamp(round(w / s), qmin, qmax) · s`` with LSQ's gradients (Esser et al.
    2020, Eq. 3): ``∂ŵ/∂w = 1`` where ``round(v)`` lies in the clamp range and 0
    outside; ``∂ŵ/∂s = round(v) − v`` inside and ``qmin``/``qmax`` outside
    (``v = w / s``), summed per group — exactly what round-with-STE then clamp gives.
    One saved tensor instead of the chain of STE ops: the hot path of every
    quantization-aware method."""

    @staticmethod
    def forward(ctx, w, step, qmin, qmax):  # noqa: D102
        v = w / step
        r = torch.round(v)
        q = torch.clamp(r, qmin, qmax)
        inside = q == r  # round(v) in [qmin, qmax]: clamping left it alone
        ctx.save_for_backward(q - v * inside, inside)  # ds: round(v) - v inside, q outside
        return q * step

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        ds, inside = ctx.saved_tensors
        grad_w = grad * inside
        grad_step = (grad * ds).sum(1, keepdim=True)
        return grad_w, grad_step, None, None


def fake_quantize(weight: torch.Tensor, step: torch.Tensor, grid: UniformGrid, zero: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize and dequantize with STE; ``step`` has shape ``(groups, 1)``.

    The gradient w.r.t. ``step`` is the LSQ gradient when ``step`` requires grad
    (callers apply :func:`grad_scale` to it first).
    """
    w = grouped(weight, grid)
    if grid.binary:
        out = ste_sign(w) * step
    elif grid.symmetric:
        out = _LSQRoundClamp.apply(w, step.expand(w.shape[0], 1), grid.qmin, grid.qmax)
    else:
        z = zero if zero is not None else torch.zeros_like(step)
        out = (torch.clamp(ste_round(w / step) + z, grid.qmin, grid.qmax) - z) * step
    return out.reshape(weight.shape)


def codes(weight: torch.Tensor, step: torch.Tensor, grid: UniformGrid) -> torch.Tensor:
    """Integer codes of a symmetric grid (no gradient)."""
    w = grouped(weight.detach(), grid)
    if grid.binary:
        q = torch.where(w >= 0, 1.0, -1.0)
    else:
        q = torch.clamp(torch.round(w / step), grid.qmin, grid.qmax)
    return q.reshape(weight.shape)


def fp16_exact(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest float16-representable value (kept in the input dtype)."""
    return x.detach().to(torch.float16).clamp(min=-65504, max=65504).to(x.dtype)


def harden(weight: torch.Tensor, step: torch.Tensor, grid: UniformGrid, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Final quantized tensor: codes × fp16-exact step, zeros where ``mask`` is False."""
    step16 = fp16_exact(step.abs().clamp_min(6.2e-5))
    q = codes(weight, step16, grid)
    out = (grouped(q, grid) * step16).reshape(weight.shape)
    if mask is not None:
        out = out * mask.to(out.dtype)
    return out.detach()


def sqnr_db(weight: torch.Tensor, compressed: torch.Tensor) -> float:
    """Kuzmin et al.'s SQNR: ``10·log10(E[W²] / E[(W − Ŵ)²])`` (inf when exact)."""
    noise = (weight.double() - compressed.double()).pow(2).mean()
    signal = weight.double().pow(2).mean()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(signal / noise))
