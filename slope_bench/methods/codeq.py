"""CoDeQ: a learned dead-zone quantizer for joint unstructured pruning and quantization.

Wenshøj, Chen, Pepin, Selvan (arXiv 2512.12981). Per weight tensor ``W`` (METHODS.md, CoDeQ)::

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

Choices the formulas leave open (knobs or stated here):

* ``a`` is the nearest-rank percentile (``k = ceil(q/100 · n)``-th smallest ``|w|``),
  recomputed from the current weights at every forward.
* ``s`` is floored at ``1e-12`` so that a fully closed dead zone (``d = 2a``) keeps only
  the weights beyond ``a``, at ``±a``.
* Sparsity pressure is the paper's: one global AdamW weight decay on every ``θ_d``
  (``sparsity_decay``); mixed precision adds weight decay on every ``θ_b``
  (``bits_decay``). Three parameter groups (weights / ``theta_d`` / ``theta_b``) are
  declared through :attr:`CoDeQ.optim_groups`; no extra loss term.
* ``finalize`` hardens with the learned ``d``, ``s`` and ``b``; ``s`` and ``δ`` are
  rounded to float16-representable values first and the codes computed with them, so
  the packed artifact (codes + two 16-bit numbers per tensor) reproduces the weights
  exactly: ``ŵ = s16·q + δ16·sign(q)`` in float32.
"""

from __future__ import annotations

import math

import torch

from slope_bench.errors import ConfigError, check_bits, check_range
from slope_bench.methods.base import CompressedWeight, Compressor, LayerSpec
from slope_bench.quant import fp16_exact, ste_round
from slope_bench.sparsity import Unstructured

MIN_BITS, MAX_BITS = 2, 8
MIN_STEP = 1e-12
FP16_SMALLEST = 2.0**-24  # smallest positive float16 (subnormal)


# ---- pure quantizer functions ---------------------------------------------------------------
def percentile_abs(weight: torch.Tensor, percentile: float) -> torch.Tensor:
    """Nearest-rank ``percentile`` of ``|weight|`` (a 0-d tensor, no gradient).

    Args:
        weight: any tensor.
        percentile: in ``(0, 100]``; ``100`` gives ``max|w|``.

    Returns:
        The ``ceil(percentile/100 · n)``-th smallest ``|w|``.
    """
    flat = weight.detach().abs().flatten()
    k = min(max(math.ceil(percentile / 100.0 * flat.numel()), 1), flat.numel())
    return flat.kthvalue(k).values


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
        out = (q * step).add_(sign, alpha=float(offset)).masked_fill_(zero, 0.0)  # sign(q) = sign(w) off the zero band
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
    step16 = fp16_exact(step.clamp_min(FP16_SMALLEST))
    offset16 = fp16_exact(offset)
    qmax = 2 ** (bits - 1) - 1
    q = dead_zone_codes(weight.float(), step16, offset16, qmax)
    out = step16 * q + offset16 * torch.sign(q)
    return out.to(weight.dtype), step16, offset16


# ---- parametrization and compressor ---------------------------------------------------------
class DeadZoneWeight(CompressedWeight):
    """``W -> Ŵ`` through CoDeQ's dead-zone quantizer, with per-tensor ``θ_d`` (and ``θ_b``).

    Args:
        bits: fixed bit width 2..8, or ``None`` to learn it through ``θ_b``.
        percentile: ``q`` of the top level ``a``.
        theta_init: initial value of ``θ_d`` and ``θ_b`` (3.0: ≈1% dead zone, 8 bits).
    """

    def __init__(self, bits: int | None, percentile: float = 99.0, theta_init: float = 3.0) -> None:
        super().__init__()
        self.fixed_bits = bits
        self.percentile = percentile
        self.theta_d = torch.nn.Parameter(torch.tensor(float(theta_init)))
        self.theta_b = None if bits is not None else torch.nn.Parameter(torch.tensor(float(theta_init)))
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
        a = percentile_abs(weight, self.percentile)
        return dead_zone_width(self.theta_d.detach(), a)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        a = percentile_abs(weight, self.percentile).to(weight.dtype)
        out = dead_zone_quantize(weight, self.theta_d, self.bits(), a)
        if self.training:
            self.last_zeros = (out.detach() == 0).sum()
            self.last_numel = out.numel()
        return out

    @torch.no_grad()
    def hardened_grid(self, weight: torch.Tensor) -> dict[str, float]:
        """The hard grid of :meth:`harden`: bits, dead zone ``d``, 16-bit step and offset."""
        a = percentile_abs(weight, self.percentile)
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
        a = percentile_abs(weight, self.percentile)
        width = dead_zone_width(self.theta_d.detach(), a)
        return dead_zone_harden(weight, a, width, self.hard_bits())[0]

    def spec(self, weight: torch.Tensor) -> LayerSpec:
        return LayerSpec(
            pattern=Unstructured(),
            grid="deadzone",
            bits=self.hard_bits(),
            granularity="tensor",
            scale_values=2,
        )


class CoDeQ(Compressor):
    """CoDeQ: unstructured sparsity from a learned dead zone + fixed or learned bit widths.

    Args:
        w_bits: fixed weight bits 2..8, or ``"learned"`` for mixed precision (per-tensor
            ``θ_b``).
        percentile: ``q`` of the top level ``a = q``-th percentile of ``|W|``, in ``(0, 100]``.
        lr_theta: AdamW learning rate of the dead-zone logits ``θ_d``.
        lr_bits: AdamW learning rate of the bit logits ``θ_b`` (``None``: ``lr_theta``).
        sparsity_decay: AdamW weight decay on every ``θ_d`` (the global sparsity knob).
        bits_decay: AdamW weight decay on every ``θ_b`` (mixed-precision pressure).
        theta_init: initial ``θ_d`` and ``θ_b``.
        compress_first, compress_classifier: see :class:`Compressor`.
    """

    name = "codeq"

    def __init__(
        self,
        w_bits: int | str = 4,
        percentile: float = 99.0,
        lr_theta: float = 1e-2,
        lr_bits: float | None = None,
        sparsity_decay: float = 3.0,
        bits_decay: float = 0.0,
        theta_init: float = 3.0,
        compress_first: bool = False,
        compress_classifier: bool = False,
    ) -> None:
        super().__init__(compress_first, compress_classifier)
        if w_bits == "learned":
            self.w_bits: int | None = None
        elif isinstance(w_bits, int) and not isinstance(w_bits, bool):
            self.w_bits = check_bits(w_bits, MIN_BITS, MAX_BITS)
        else:
            raise ConfigError("w_bits", w_bits, f"an integer in {MIN_BITS}..{MAX_BITS} or 'learned'")
        self.percentile = check_range("percentile", percentile, 0.0, 100.0, low_open=True)
        self.lr_theta = check_range("lr_theta", lr_theta, 0.0, low_open=True)
        self.lr_bits = self.lr_theta if lr_bits is None else check_range("lr_bits", lr_bits, 0.0, low_open=True)
        self.sparsity_decay = check_range("sparsity_decay", sparsity_decay, 0.0)
        self.bits_decay = check_range("bits_decay", bits_decay, 0.0)
        self.theta_init = check_range("theta_init", theta_init, 0.0, low_open=True)
        self.optim_groups = {
            "theta_d": {"lr": self.lr_theta, "weight_decay": self.sparsity_decay},
            "theta_b": {"lr": self.lr_bits, "weight_decay": self.bits_decay},
        }
        self.layer_extras: dict[str, dict] = {}

    def make_parametrization(self, name: str, weight: torch.Tensor) -> CompressedWeight:
        return DeadZoneWeight(self.w_bits, self.percentile, self.theta_init)

    def finalize(self, model: torch.nn.Module, calib_batches=None) -> torch.nn.Module:
        """Record each layer's learned grid, then harden (base class)."""
        for name, p in self.layers.items():
            module = self.modules[name]
            grid = p.hardened_grid(module.parametrizations.weight.original.detach())
            self.layer_extras[name] = {key: grid[key] for key in ("learned_bits", "dead_zone", "step")}
        return super().finalize(model, calib_batches)

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
