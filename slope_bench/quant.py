"""Quantization grids and pure quantizer functions (STE, LSQ, round-to-nearest).

A grid is a frozen dataclass (:class:`UniformGrid`: the papers' signed grid by default,
symmetric, or asymmetric with integer zero points); functions take tensors and return
tensors: LSQ's op with its Eq. 3 gradients (:func:`fake_quantize`, and fused with SR-STE,
:func:`masked_fake_quantize`), min-max and clipping-search ranges (:func:`fit_grid`),
codes and values. Scales are rounded to float16-representable values before a model is
finalized (``harden``) so that the packed artifact (16-bit scales) reproduces the
finalized weights bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

GRANULARITIES = ("channel", "tensor", "group")
MIN_SCALE = 6.2e-5  # smallest normal float16 (≈ 2^-14): the floor of every stored 16-bit scale
FP16_TINY = 2.0**-24  # smallest positive float16 (subnormal)


GRID_KINDS = ("symmetric", "signed", "asymmetric")
RANGES = ("minmax", "mse")
# Clipping search of ``range="mse"`` (the OBC and GPTQ reference quantizer): shrink factors
# ``p = 1 − i/CLIP_GRID`` for ``i = 0 .. CLIP_STEPS − 1`` (1.00, 0.99, …, 0.21), error
# ``Σ |q(w) − w|^CLIP_NORM`` per group, the first minimum wins.
CLIP_GRID = 100
CLIP_STEPS = 80
CLIP_NORM = 2.4


@dataclass(frozen=True)
class UniformGrid:
    """A uniform weight grid, e.g. ``UniformGrid(bits=4)``: one scale per output channel,
    integer codes ``q`` with values ``q·s`` (``(q − z)·s`` with a zero point).

    ``kind`` (2^b levels unless stated):

    * ``signed`` (default; LSQ, Esser et al. 2020): codes ``[−2^(b−1), 2^(b−1) − 1]``;
      2 bits = ``{−2, −1, 0, 1}``. The OBC/GPTQ reference quantizer's ``sym`` grid is this
      one too (``2^b`` codes with the zero point fixed at the middle).
    * ``symmetric``: codes ``[−(2^(b−1) − 1), 2^(b−1) − 1]`` (``2^b − 1`` levels; 2 bits
      = ternary).
    * ``asymmetric`` (GPTQ/SparseGPT): codes ``0 .. 2^b − 1`` with an integer zero point
      ``z`` per group, so that 0 is exactly representable (pruned zeros stay exact).

    ``bits=1`` (symmetric or signed) is the binary grid ``{−s, +s}``. ``granularity="group"``
    uses one scale per ``group_size`` consecutive input weights.
    """

    bits: int = 4
    kind: str = "signed"
    granularity: str = "channel"
    group_size: int = 128

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be an integer in 1..8, got {self.bits!r}")
        if self.kind not in GRID_KINDS:
            raise ValueError(f"kind must be one of {GRID_KINDS}, got {self.kind!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")

    @property
    def qmax(self) -> int:
        """Largest code: ``2^(b-1) - 1`` (symmetric, signed; 1 for binary) or ``2^b - 1``."""
        if self.zero_point:
            return 2**self.bits - 1
        return max(2 ** (self.bits - 1) - 1, 1)

    @property
    def qmin(self) -> int:
        """Smallest code: ``−qmax`` (symmetric, binary), ``−2^(b−1)`` (signed) or 0."""
        if self.zero_point:
            return 0
        return -(2 ** (self.bits - 1)) if self.kind == "signed" and not self.binary else -self.qmax

    @property
    def binary(self) -> bool:
        return self.bits == 1 and not self.zero_point

    @property
    def zero_point(self) -> bool:
        """True for the asymmetric grid (an integer zero point per group)."""
        return self.kind == "asymmetric"

    @property
    def max_levels(self) -> int:
        """Distinct values a group can hold, zero included."""
        return 2 if self.binary else self.qmax - self.qmin + 1

    def __str__(self) -> str:
        """``w4`` on the signed grid (every method's default); ``w4 sym`` / ``w4 asym`` otherwise."""
        return f"w{self.bits}" + {"signed": "", "symmetric": " sym", "asymmetric": " asym"}[self.kind]


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


def group_rows(weight: torch.Tensor, granularity: str, group_size: int = 0) -> torch.Tensor:
    """View ``weight`` as ``(groups, group_len)``: one row per quantization group.

    ``tensor``: one row; ``channel``: one row per output channel (a 1-D tensor is one
    row); ``group``: rows of ``group_size`` consecutive input weights, falling back to
    per-channel when a row does not split evenly (or ``group_size`` is 0). The quantizers
    and the accounting (:mod:`slope_bench.metrics`) both group with this function.
    """
    if granularity == "tensor":
        return weight.reshape(1, -1)
    mat = weight.reshape(weight.shape[0], -1) if weight.dim() > 1 else weight.reshape(1, -1)
    if granularity != "group" or group_size <= 0 or mat.shape[1] % group_size:
        return mat
    return mat.reshape(-1, group_size)


def keep_masked(out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``out ⊙ mask`` in the forward, identity gradient (straight-through) everywhere:
    re-zeroes pruned positions after an op that cannot keep zeros (``sign(0) = +1``)."""
    return out * mask + (out - out.detach()) * (1 - mask)


def grouped(weight: torch.Tensor, grid: UniformGrid) -> torch.Tensor:
    """:func:`group_rows` with the granularity and group size of ``grid``."""
    return group_rows(weight, grid.granularity, grid.group_size)


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
    """Round-to-nearest step of the symmetric min-max range ``[−max|w|, max|w|]`` per group
    (:func:`_scale_of_range`; no zero point)."""
    amax = grouped(weight.detach().abs(), grid).amax(1, keepdim=True)
    plain = UniformGrid(grid.bits, "symmetric" if grid.zero_point else grid.kind)
    return _scale_of_range(-amax, amax, plain).clamp_min(1e-8)


def _scale_of_range(low: torch.Tensor, high: torch.Tensor, grid: UniformGrid) -> torch.Tensor:
    """Step mapping the range ``[low, high]`` (``low <= 0 <= high``) onto the grid's codes.

    symmetric: ``R / qmax``; signed: ``2R / (2^b − 1)`` (the OBC/GPTQ ``sym`` rule, ``R``
    the largest magnitude: ``±R`` sit half a step beyond the outer codes); asymmetric:
    ``(high − low) / (2^b − 1)``.
    """
    if grid.zero_point:
        return (high - low) / grid.qmax
    magnitude = torch.maximum(-low, high)
    if grid.kind == "signed" and not grid.binary:
        return 2 * magnitude / (2**grid.bits - 1)
    return magnitude / grid.qmax


def _fp16_grid(low: torch.Tensor, high: torch.Tensor, grid: UniformGrid) -> tuple[torch.Tensor, torch.Tensor]:
    scale = fp16_exact(_scale_of_range(low, high, grid).clamp_min(MIN_SCALE))
    zero = torch.round(-low / scale).clamp(0, grid.qmax) if grid.zero_point else torch.zeros_like(scale)
    return scale, zero


def fit_grid(
    rows: torch.Tensor, grid: UniformGrid, range_: str = "minmax", keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale (float16-exact) and integer zero point of ``grid`` for ``rows``.

    Args:
        rows: ``(groups, group_len)`` weights (:func:`grouped`).
        grid: the grid (its kind sets the scale rule, :func:`_scale_of_range`).
        range_: ``minmax`` — the range of the kept values (always containing 0);
            ``mse`` — that range shrunk by the factor ``p`` in 1.00, 0.99, …, 0.21 that
            minimises ``Σ |q(w) − w|^2.4`` over the kept values of the row (the OBC/GPTQ
            reference quantizer, ``mse=True``; every candidate evaluated with its float16 scale).
        keep: bool mask of the values that count (``None``: all).

    Returns:
        ``(scale, zero)``, both ``(groups, 1)`` in the dtype of ``rows``; ``zero`` is 0
        except on the asymmetric grid. Binary grids use ``s = mean|w|``.
    """
    if range_ not in RANGES:
        raise ValueError(f"range must be one of {RANGES}, got {range_!r}")
    w = rows.detach() if keep is None else rows.detach() * keep
    if grid.binary:
        count = w.shape[1] if keep is None else keep.sum(1, keepdim=True).clamp_min(1)
        scale = fp16_exact((w.abs().sum(1, keepdim=True) / count).clamp_min(MIN_SCALE))
        return scale, torch.zeros_like(scale)
    low = w.amin(1, keepdim=True).clamp_max(0)
    high = w.amax(1, keepdim=True).clamp_min(0)
    scale, zero = _fp16_grid(low, high, grid)
    if range_ == "mse":
        best = torch.full_like(scale, math.inf)
        for i in range(CLIP_STEPS):
            shrink = 1 - i / CLIP_GRID
            s, z = _fp16_grid(low * shrink, high * shrink, grid)
            error = (grid_values(grid_codes(w, s, grid, z if grid.zero_point else None), s, z if grid.zero_point else None) - w).abs()
            if keep is not None:
                error = error * keep
            error = error.pow(CLIP_NORM).sum(1, keepdim=True)
            better = error < best
            best = torch.where(better, error, best)
            scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


def init_step(weight: torch.Tensor, grid: UniformGrid, range_: str = "lsq", mask: torch.Tensor | None = None) -> torch.Tensor:
    """Initial learnable step: LSQ's rule (``range_="lsq"``, :func:`init_lsq_step`) or the
    min-max step of the kept weights (``"minmax"``, :func:`fit_grid`)."""
    if range_ == "lsq":
        return init_lsq_step(weight, grid, mask)
    keep = None if mask is None else grouped(mask.bool(), grid)
    return fit_grid(grouped(weight.detach(), grid), grid, range_, keep)[0]


class _LSQRoundClamp(torch.autograd.Function):
    """Fused ``clamp(round(v), qmin, qmax) · s``, ``v = w / s``, with LSQ's gradients
    (Esser et al. 2020, Eq. 3 and the STE of Eq. 5), the clip decided on ``v`` itself:
    ``qmin < v < qmax``: ``∂ŵ/∂w = 1``, ``∂ŵ/∂s = round(v) − v``; ``v <= qmin``:
    ``∂ŵ/∂w = 0``, ``∂ŵ/∂s = qmin`` (``−Qn``); ``v >= qmax``: ``∂ŵ/∂w = 0``,
    ``∂ŵ/∂s = qmax`` (``Qp``); summed per group. Example: 3-bit grid, ``w = [3.3, 0.6]``,
    ``s = 1``: ``∂ŵ/∂w = [0, 1]``, ``∂ŵ/∂s = 3 + 0.4 = 3.4``. One saved tensor pair
    instead of a chain of STE ops: the hot path of every quantization-aware method."""

    @staticmethod
    def forward(ctx, w, step, qmin, qmax):  # noqa: D102
        v = w / step
        q = torch.clamp(torch.round(v), qmin, qmax)
        inside = (v > qmin) & (v < qmax)
        ctx.save_for_backward(torch.where(inside, q - v, q), inside)  # outside, q is the bound
        return q * step

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        ds, inside = ctx.saved_tensors
        grad_w = grad * inside
        grad_step = (grad * ds).sum(1, keepdim=True)
        return grad_w, grad_step, None, None


class _SRSTELSQ(torch.autograd.Function):
    """``Q(S(W))`` in one kernel: SR-STE N:M masking then LSQ round/clamp (SLOPE's hot path).

    Forward ``clamp(round(v), qmin, qmax) · s`` with ``v = w ⊙ mask / s`` on
    ``(groups, group_len)`` views. Backward: SR-STE (Zhou et al. 2021, Eq. 6) composed with
    LSQ (Esser et al. 2020, Eq. 3, clip decided on ``v``): ``∂L/∂w = g ⊙ 1[qmin < v < qmax]
    + λ_w (1 − mask) ⊙ w`` (a pruned weight has ``v = 0``, inside, so its gradient passes
    straight through) and ``∂L/∂s = Σ g ⊙ (round(v) − v)`` inside, ``qmin``/``qmax``
    outside. The same values and gradients as :class:`slope_bench.sparsity.SRSTE`
    followed by :class:`_LSQRoundClamp`, with two fewer full-size temporaries (a test checks).
    """

    @staticmethod
    def forward(ctx, w, keep, step, qmin, qmax, decay):  # noqa: D102
        v = (w * keep).div_(step)
        q = torch.clamp(torch.round(v), qmin, qmax)
        inside = (v > qmin) & (v < qmax)
        ctx.save_for_backward(torch.where(inside, q - v, q), inside, w if decay else None, keep if decay else None)
        ctx.decay = decay
        return q.mul_(step)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        ds, inside, w, keep = ctx.saved_tensors
        grad_w = grad * inside
        if ctx.decay:
            grad_w.add_(w * ~keep, alpha=ctx.decay)
        grad_step = (grad * ds).sum(1, keepdim=True)
        return grad_w, None, grad_step, None, None, None


def masked_fake_quantize(weight: torch.Tensor, keep: torch.Tensor, step: torch.Tensor, grid: UniformGrid, decay: float) -> torch.Tensor:
    """:class:`_SRSTELSQ` on ``grid``'s groups (symmetric or signed, not binary), shaped like ``weight``."""
    w, k = grouped(weight, grid), grouped(keep, grid)
    return _SRSTELSQ.apply(w, k, step.expand(w.shape[0], 1), grid.qmin, grid.qmax, decay).reshape(weight.shape)


def fake_quantize(weight: torch.Tensor, step: torch.Tensor, grid: UniformGrid, zero: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize and dequantize; ``step`` (and ``zero``) have shape ``(groups, 1)``.

    Symmetric and signed grids: LSQ's op (:class:`_LSQRoundClamp`); the gradient w.r.t.
    ``step`` is LSQ's when ``step`` requires grad (callers apply :func:`grad_scale` to it
    first). Binary: sign with STE. Asymmetric: round with STE and clamp, zero point held.
    """
    w = grouped(weight, grid)
    if grid.binary:
        out = ste_sign(w) * step
    elif not grid.zero_point:
        out = _LSQRoundClamp.apply(w, step.expand(w.shape[0], 1), grid.qmin, grid.qmax)
    else:
        z = zero if zero is not None else torch.zeros_like(step)
        out = (torch.clamp(ste_round(w / step) + z, grid.qmin, grid.qmax) - z) * step
    return out.reshape(weight.shape)


def grid_codes(values: torch.Tensor, step: torch.Tensor, grid: UniformGrid, zero: torch.Tensor | None = None) -> torch.Tensor:
    """Integer codes (as floats) of ``values`` on ``grid``, no reshaping, no gradient use.

    Binary: ``sign(v)`` (never 0); otherwise ``clamp(round(v / s) [+ z], qmin, qmax)``
    with ``step``/``zero`` broadcast against ``values`` (e.g. ``(rows, 1)``). ``zero``
    (the integer zero point of an asymmetric grid) is added only when given.
    """
    if grid.binary:
        return torch.where(values >= 0, 1.0, -1.0).to(values.dtype)
    q = torch.round(values / step)
    if zero is not None:
        q = q + zero
    return q.clamp(grid.qmin, grid.qmax)


def grid_values(codes: torch.Tensor, step: torch.Tensor, zero: torch.Tensor | None = None) -> torch.Tensor:
    """Grid values of integer ``codes``: ``q·s``, or ``(q − z)·s`` with a zero point."""
    return codes * step if zero is None else (codes - zero) * step


def codes(weight: torch.Tensor, step: torch.Tensor, grid: UniformGrid, zero: torch.Tensor | None = None) -> torch.Tensor:
    """Integer codes (no gradient), shaped like ``weight``."""
    return grid_codes(grouped(weight.detach(), grid), step, grid, zero).reshape(weight.shape)


def fp16_exact(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest float16-representable value (kept in the input dtype)."""
    return x.detach().to(torch.float16).clamp(min=-65504, max=65504).to(x.dtype)


def harden(
    weight: torch.Tensor, step: torch.Tensor, grid: UniformGrid, mask: torch.Tensor | None = None, zero: torch.Tensor | None = None
) -> torch.Tensor:
    """Final quantized tensor: codes × fp16-exact step (``(q − z)·s`` with a zero point),
    zeros where ``mask`` is False."""
    step16 = fp16_exact(step.abs().clamp_min(MIN_SCALE))
    z = zero if grid.zero_point else None
    if grid.zero_point and z is None:
        z = torch.zeros_like(step16)
    q = codes(weight, step16, grid, z)
    out = grid_values(grouped(q, grid), step16, z).reshape(weight.shape)
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
