"""CoDeQ's dead-zone quantizer, pure functions (Wenshøj, Chen, Pepin, Selvan; arXiv 2512.12981).

Per weight tensor ``W`` (METHODS.md, CoDeQ)::

    a = q-th percentile of |W|                    (q = 99 by default, no gradient)
    b = round(6·|tanh θ_b| + 2)                   learnable bits in [2, 8]; or a fixed b
    d = 2a·(1 − |tanh θ_d|)                       dead-zone width; |w| < d/2 → exactly 0
    Q = 2^(b−1) − 1 ;  s = (a − d/2)/(Q − 0.5) ;  δ = d/2 − s/2
    q = clamp(round(sign(w)·ReLU(|w| − δ)/s), −Q, Q) ;  ŵ = s·q + δ·sign(q)

The nonzero levels are ``±(d/2 + s·(k − ½))``, ``k = 1..Q``: evenly spaced by ``s``, the
top one equal to ``a``; with ``d = s`` this is the ordinary symmetric quantizer with step
``a / Q``. Round, clamp and ReLU pass gradients straight through (STE), so weights inside
the dead zone keep receiving the task gradient and can leave it again; ``θ_d`` and ``θ_b``
are trained through ``s`` and ``δ``.

Choices the formulas leave open (stated here):

* ``a`` is the linearly interpolated percentile of the reference implementation
  (``numpy.percentile`` / ``torch.quantile``); ``nearest_rank`` is a knob.
* ``s`` is floored at ``1e-12`` so that a fully closed dead zone (``d = 2a``) keeps only
  the weights beyond ``a``, at ``±a``.
* :func:`dead_zone_harden` rounds ``s`` and ``δ`` to float16-representable values first
  and computes the codes with them, so codes plus two 16-bit numbers per tensor
  reproduce the weights exactly: ``ŵ = s16·q + δ16·sign(q)`` in float32.

The method (parameters ``θ_d``/``θ_b``, optimizer groups) is
:mod:`slope_bench.methods.codeq`.

Example::

    a = percentile_abs(w, 99.0)
    w_hat = dead_zone_quantize(w, theta_d, bits_from_logit(theta_b), a)
"""

from __future__ import annotations

import math

import torch

from slope_bench.quant import FP16_TINY, fp16_exact, ste_round

MIN_BITS, MAX_BITS = 2, 8
MIN_STEP = 1e-12


INTERPOLATIONS = ("linear", "nearest_rank")


def percentile_abs(weight: torch.Tensor, percentile: float, interpolation: str = "linear") -> torch.Tensor:
    """``percentile`` of ``|weight|`` (a 0-d tensor, no gradient).

    Args:
        weight: any tensor.
        percentile: in ``(0, 100]``; ``100`` gives ``max|w|``.
        interpolation: ``linear`` (CoDeQ's reference, ``numpy.percentile``'s default and
            ``torch.quantile``'s: position ``p = q/100 · (n − 1)`` in the sorted values,
            ``x[⌊p⌋] + (p − ⌊p⌋)·(x[⌊p⌋+1] − x[⌊p⌋])``) or ``nearest_rank`` (the
            ``ceil(q/100 · n)``-th smallest).

    Returns:
        The percentile, in the dtype of ``weight``, on its device.
    """
    flat = weight.detach().abs().flatten()
    n = flat.numel()
    if interpolation == "nearest_rank":
        return flat.kthvalue(min(max(math.ceil(percentile / 100.0 * n), 1), n)).values
    if interpolation != "linear":
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    position = percentile / 100.0 * (n - 1)
    below = min(int(math.floor(position)), n - 1)
    fraction = position - below
    low = flat.kthvalue(below + 1).values
    if fraction == 0 or below + 1 >= n:
        return low
    high = flat.kthvalue(below + 2).values
    return low + (high - low) * fraction


def bits_from_logit(theta_b: torch.Tensor) -> torch.Tensor:
    """Learnable bit width ``b = round(6·|tanh θ_b| + 2)`` in ``[2, 8]`` (STE round)."""
    return ste_round(6.0 * torch.tanh(theta_b).abs() + 2.0)


def dead_zone_width(theta_d: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Dead-zone width ``d = 2a·(1 − |tanh θ_d|)`` in ``[0, 2a]``."""
    return 2.0 * a * (1.0 - torch.tanh(theta_d).abs())


def dead_zone_grid(a: torch.Tensor, width: torch.Tensor, bits: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step, offset and largest code of the dead-zone grid.

    Args:
        a: top level (percentile of ``|W|``).
        width: dead-zone width ``d``.
        bits: bit width ``b`` (int or tensor; a tensor keeps its gradient).

    Returns:
        ``(s, δ, Q)`` with ``Q = 2^(b−1) − 1``, ``s = (a − d/2)/(Q − 0.5)`` (floored at
        ``1e-12``) and ``δ = d/2 − s/2``.
    """
    bits = torch.as_tensor(bits, dtype=a.dtype, device=a.device)
    qmax = 2.0 ** (bits - 1.0) - 1.0
    step = ((a - width / 2.0) / (qmax - 0.5)).clamp_min(MIN_STEP)
    offset = width / 2.0 - step / 2.0
    return step, offset, qmax


class _DeadZoneRound(torch.autograd.Function):
    """Fused ``ŵ = s·q + δ·sign(q)``, ``q = clamp(round(sign(w)·ReLU(|w| − δ)/s), −Q, Q)``.

    Round, clamp and ReLU are straight-through, ``sign`` has no gradient, so with
    ``x = sign(w)·ReLU(|w| − δ)/s`` (its forward value):
    ``∂ŵ/∂w = 1``, ``∂ŵ/∂s = q − x`` (the LSQ step gradient), ``∂ŵ/∂δ = sign(q) − sign(w)``
    (nonzero only inside the zero band). One fused function instead of a dozen autograd
    nodes keeps the per-step cost of the ~11M ResNet-18 weights low.
    """

    @staticmethod
    def forward(ctx, weight, step, offset, qmax):  # noqa: D102
        sign = torch.sign(weight)
        x = (weight.abs() - offset).clamp_(min=0).mul_(sign).div_(step)
        q = x.round().clamp_(-qmax, qmax)
        zero = q == 0
        out = (q * step).addcmul_(sign, offset).masked_fill_(zero, 0.0)  # sign(q) = sign(w) off the zero band
        ctx.save_for_backward(x.neg_().add_(q), sign.masked_fill_(~zero, 0.0))  # q − x, sign(w)·[q = 0]
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        residual, zero_sign = ctx.saved_tensors
        flat = grad.reshape(-1)
        grad_step = torch.dot(flat, residual.reshape(-1)) if ctx.needs_input_grad[1] else None
        grad_offset = -torch.dot(flat, zero_sign.reshape(-1)) if ctx.needs_input_grad[2] else None
        return grad, grad_step, grad_offset, None


def dead_zone_apply(weight: torch.Tensor, step: torch.Tensor, offset: torch.Tensor, qmax: torch.Tensor | float) -> torch.Tensor:
    """``ŵ = s·q + δ·sign(q)`` with ``q = clamp(round(sign(w)·ReLU(|w| − δ)/s), −Q, Q)``.

    Round, clamp and ReLU use straight-through gradients; ``sign`` has none. ``step`` and
    ``offset`` are 0-d tensors (gradients flow to both); ``qmax`` carries none.
    """
    qmax = float(qmax.detach()) if isinstance(qmax, torch.Tensor) else float(qmax)
    return _DeadZoneRound.apply(weight, step, offset, qmax)


def dead_zone_quantize(
    weight: torch.Tensor,
    theta_d: torch.Tensor,
    bits: torch.Tensor | int,
    a: torch.Tensor,
) -> torch.Tensor:
    """CoDeQ's differentiable quantizer for one tensor (METHODS.md, CoDeQ).

    Args:
        weight: full-precision weight ``W``.
        theta_d: dead-zone logit ``θ_d`` (0-d tensor).
        bits: a fixed bit width, or ``bits_from_logit(θ_b)`` for learned bits.
        a: top level, ``percentile_abs(W, 99)``.

    Returns:
        ``Ŵ`` shaped like ``weight``: exact zeros where ``|w| < d/2``, nonzero levels
        evenly spaced by ``s`` with the top one at ``a``.
    """
    step, offset, qmax = dead_zone_grid(a, dead_zone_width(theta_d, a), bits)
    return dead_zone_apply(weight, step, offset, qmax)


def dead_zone_codes(weight: torch.Tensor, step: torch.Tensor, offset: torch.Tensor, qmax: int) -> torch.Tensor:
    """Integer codes ``q`` of the hard quantizer (no gradient)."""
    w = weight.detach()
    return torch.clamp(torch.round(torch.sign(w) * torch.relu(w.abs() - offset) / step), -qmax, qmax)


def dead_zone_harden(
    weight: torch.Tensor, a: torch.Tensor, width: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact-export hardening: ``ŵ = s16·q + δ16·sign(q)`` in float32.

    ``s`` and ``δ`` are first rounded to float16-representable values and the codes are
    computed with the rounded numbers, so codes plus two 16-bit values reproduce ``ŵ``.

    Returns:
        ``(ŵ, s16, δ16)``.
    """
    step, offset, _ = dead_zone_grid(a.float(), width.float(), bits)
    step16 = fp16_exact(step.clamp_min(FP16_TINY))
    offset16 = fp16_exact(offset)
    qmax = 2 ** (bits - 1) - 1
    q = dead_zone_codes(weight.float(), step16, offset16, qmax)
    out = step16 * q + offset16 * torch.sign(q)
    return out.to(weight.dtype), step16, offset16
