"""SLOPE and its building-block baselines: N:M (SR-STE) and LSQ weight quantization.

One parametrization, :class:`NMQuantWeight`, computes ``Ŵ = Q(S(W))``:

* ``S``: N:M mask recomputed from ``|W|`` at every forward (SR-STE, Zhou et al. 2021):
  the forward uses the masked weight; the backward passes the gradient straight
  through to every weight and adds ``λ_w · (1 − mask) ⊙ W`` to it (§3.3, Eq. 6).
  The mask can be frozen (sequential baselines) or chosen on the quantized weights.
* ``Q``: per-output-channel LSQ (Esser et al. 2020) on the kept weights, on LSQ's signed
  grid ``[−2^(b−1), 2^(b−1) − 1]`` (``grid=signed``, default; ``symmetric`` drops the
  extra negative level): learnable step initialised at ``2·mean|w| / sqrt(Qp)`` over
  kept weights (``range=lsq``; ``minmax``: the min-max step), its gradient scaled by
  ``1 / sqrt(n_kept · Qp)``, LSQ's Eq. 3 gradients (clip decided on ``v = w / s``). No
  zero point is learned, so ``grid=asymmetric`` is refused, and no clipping search runs
  at training time, so ``range=mse`` is refused.
* N:M groups run along input channels at each spatial position (``nm_order=channel_major``,
  the SR-STE reference code's convolution grouping and what sparse tensor-core
  convolution kernels need); ``input`` groups the flattened ``in × kh × kw``.

:class:`Slope` adds the angular-alignment regularizer of SLOPE (Liu, Dvornik, Liu,
BMVC 2025): ``L_align = (1/n) Σ_i (1 − cos(w_i, ŵ_i))`` over output channels ``i`` of
all targeted layers pooled (the paper does not say whether ``i`` runs over channels or
layers; ``scope="layer"`` gives the per-layer variant). ``alignment="l2"`` is the
direct-matching control (mean squared ``‖w − ŵ‖² / ‖w‖²`` per channel), ``"none"``
the naive combination. The gradient flows into both ``w`` and ``ŵ``
(``detach_target=False``, unpublished; a knob).

The method configs ``prune`` (no grid), ``quantize`` (no pattern) and ``naive``
(``alignment=none``) are this class with parts switched off. A layer whose input size is
not divisible by ``m`` is quantized but not pruned (a ``note`` in its ``layer_extras``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from slope_bench.errors import ConfigError, check_bool, check_choice, check_range
from slope_bench.methods.base import CompressedWeight, Compressor, Finalized, LayerSpec, NMBits, full_precision, nm_notes, original_weight
from slope_bench.quant import UniformGrid, fake_quantize, grad_scale, grouped, harden, init_step, keep_masked, masked_fake_quantize
from slope_bench.sparsity import NM, SRSTE, as_matrix, nm_mask

ALIGNMENTS = ("cosine", "l2", "none")
SCOPES = ("channel", "layer")
LSQ_GRIDS = ("signed", "symmetric")
LSQ_RANGES = ("lsq", "minmax")


def check_lsq_grid(grid: str, range_: str) -> None:
    """The grids and step inits an LSQ-trained method can use (one line naming the key)."""
    if grid == "asymmetric":
        raise ConfigError("grid", grid, "signed or symmetric (LSQ learns a step, no zero point)")
    check_choice("grid", grid, LSQ_GRIDS)
    if range_ == "mse":
        raise ConfigError("range", range_, "lsq or minmax (the step is learned by LSQ; no clipping search while training)")
    check_choice("range", range_, LSQ_RANGES)


class _RowCosine(torch.autograd.Function):
    """Per-row cosine ``<a_i, b_i> / (‖a_i‖ ‖b_i‖)`` of two ``(rows, cols)`` matrices.

    ``torch.nn.functional.cosine_similarity`` normalises both inputs (full-size
    temporaries in forward and backward); here the forward is three row reductions
    and the backward two fused multiply-adds per input:
    ``∂cos/∂a = b / (‖a‖‖b‖) − cos · a / ‖a‖²`` (and symmetrically for ``b``).
    A zero row has cosine 0 and no gradient.
    """

    @staticmethod
    def forward(ctx, a, b, eps):  # noqa: D102
        na = torch.linalg.vector_norm(a, dim=1)
        nb = torch.linalg.vector_norm(b, dim=1)
        denom = (na * nb).clamp_min(eps)
        cos = torch.linalg.vecdot(a, b, dim=1) / denom
        ctx.save_for_backward(a, b, na.clamp_min(eps), nb.clamp_min(eps), denom, cos)
        return cos

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        a, b, na, nb, denom, cos = ctx.saved_tensors
        g = (grad / denom).unsqueeze(1)
        gc = (grad * cos).unsqueeze(1)
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = torch.addcmul(b * g, a, gc / na.pow(2).unsqueeze(1), value=-1)
        if ctx.needs_input_grad[1]:
            grad_b = torch.addcmul(a * g, b, gc / nb.pow(2).unsqueeze(1), value=-1)
        return grad_a, grad_b, None


def row_cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Cosine similarity of matching rows of two ``(rows, cols)`` matrices (differentiable)."""
    return _RowCosine.apply(a, b, eps)


class NMQuantWeight(CompressedWeight):
    """``W -> Q(S(W))`` for one layer; either part may be ``None``.

    Args:
        weight: the layer's initial weight (sets shapes and the LSQ step).
        pattern: N:M pattern or ``None`` for dense.
        grid: uniform grid (symmetric or signed) or ``None`` for full precision.
        sr_ste_decay: ``λ_w`` of SR-STE.
        range_: step init, ``lsq`` (LSQ's rule) or ``minmax``.
    """

    def __init__(
        self, weight: torch.Tensor, pattern: NM | None, grid: UniformGrid | None, sr_ste_decay: float = 2e-4, range_: str = "lsq"
    ) -> None:
        super().__init__()
        self.pattern = pattern if pattern is not None and pattern.applies_to(weight) else None
        self.grid = grid
        self.sr_ste_decay = sr_ste_decay
        self.range = range_
        self.mask_source = "weight"  # "weight" | "quantized" (quantize -> prune order)
        self.register_buffer("frozen_mask", None)
        self.last: torch.Tensor | None = None
        if grid is not None:
            mask = self.mask(weight)
            self.step = torch.nn.Parameter(init_step(weight, grid, range_, mask))
            kept = weight.numel() * (self.pattern.density if self.pattern else 1.0)
            self.step_grad_scale = 1.0 / math.sqrt(max(kept, 1) * grid.qmax)

    # ---- pattern ---------------------------------------------------------------------
    def mask(self, weight: torch.Tensor) -> torch.Tensor | None:
        """Current keep-mask (float), or ``None`` when the layer is dense."""
        keep = self.keep(weight)
        return None if keep is None else keep.to(weight.dtype)

    def keep(self, weight: torch.Tensor) -> torch.Tensor | None:
        """Current keep-mask as bool (the hot path's form), or ``None`` when dense."""
        if self.pattern is None:
            return None
        if self.frozen_mask is not None:
            return self.frozen_mask.bool()
        score = weight
        if self.mask_source == "quantized" and self.grid is not None:
            score = fake_quantize(weight.detach(), self.step.detach(), self.grid)
        return nm_mask(score, self.pattern)

    def freeze_mask(self, weight: torch.Tensor) -> None:
        """Hold the current mask fixed from now on."""
        m = self.mask(weight)
        self.frozen_mask = None if m is None else m.detach().clone()

    # ---- forward / harden ------------------------------------------------------------
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        with full_precision(weight):
            out = weight
            keep = self.keep(weight)
            grid = self.grid
            step = grad_scale(self.step, self.step_grad_scale) if grid is not None else None
            if grid is not None and keep is not None and not grid.binary:
                out = masked_fake_quantize(weight, keep, step, grid, self.sr_ste_decay)
            else:
                if keep is not None:
                    out = SRSTE.apply(weight, keep, self.sr_ste_decay)
                if grid is not None:
                    out = fake_quantize(out, step, grid)
                    if keep is not None and grid.binary:  # sign(0) = +1: re-zero pruned weights
                        out = keep_masked(out, keep.to(out.dtype))
        if self.training:
            self.__dict__["last"] = out  # a plain cache, never registered (``out`` may be the Parameter itself)
        return out

    @torch.no_grad()
    def harden(self, weight: torch.Tensor) -> torch.Tensor:
        mask = self.mask(weight)
        if self.grid is None:
            return weight * mask if mask is not None else weight.clone()
        masked = weight * mask if mask is not None else weight
        return harden(masked, self.step.detach(), self.grid, mask)

    def spec(self, weight: torch.Tensor) -> LayerSpec:
        if self.grid is None:
            return LayerSpec(pattern=self.pattern, grid="float", bits=None)
        groups = grouped(weight, self.grid).shape[0]
        return LayerSpec(
            self.pattern, "uniform", self.grid.bits, self.grid.granularity, groups, grid_kind=self.grid.kind, grid_range=self.range
        )


class Slope(Compressor):
    """SLOPE: N:M sparsity + k-bit LSQ with an angular-alignment regularizer.

    Args:
        name: the method's name in ``results.json`` (``slope``, ``naive``, ``prune``, ...).
        n, m: N:M pattern (``n=None`` for no sparsity).
        w_bits: weight bits 1..8 (``None`` for full precision).
        lam: weight ``λ`` of the alignment term.
        alignment: ``cosine`` (SLOPE), ``l2`` (direct matching) or ``none`` (naive).
        scope: cosine over output ``channel`` rows (default) or whole ``layer`` tensors.
        detach_target: stop the gradient through ``ŵ`` inside the alignment term.
        sr_ste_decay: SR-STE ``λ_w``.
        granularity: quantization scale granularity (``channel``/``tensor``/``group``).
        group_size: group length for ``granularity=group``.
        nm_order: ``channel_major`` (input channels at each spatial position) or ``input``.
        grid: ``signed`` (LSQ's grid) or ``symmetric``.
        range: step init, ``lsq`` (LSQ's rule) or ``minmax``.
        compress_first, compress_classifier: see :class:`Compressor`.
    """

    optim_groups = {"step": {"weight_decay": 0.0}}

    def __init__(
        self,
        name: str = "slope",
        n: int | None = 2,
        m: int | None = 4,
        w_bits: int | None = 4,
        lam: float = 1.0,
        alignment: str = "cosine",
        scope: str = "channel",
        detach_target: bool = False,
        sr_ste_decay: float = 2e-4,
        granularity: str = "channel",
        group_size: int = 128,
        nm_order: str = "channel_major",
        grid: str = "signed",
        range: str = "lsq",
        compress_first: bool = False,
        compress_classifier: bool = False,
    ) -> None:
        super().__init__(name, compress_first, compress_classifier)
        check_lsq_grid(grid, range)
        knobs = NMBits(n, m, w_bits, granularity, group_size, nm_order, grid)
        self.pattern, self.grid, self.range = knobs.pattern, knobs.grid, range
        check_choice("alignment", alignment, ALIGNMENTS)
        check_choice("scope", scope, SCOPES)
        self.lam = check_range("lam", lam, 0.0, high=1e12)
        self.sr_ste_decay = check_range("sr_ste_decay", sr_ste_decay, 0.0, high=1e12)
        self.alignment = alignment if (self.grid is not None or self.pattern is not None) else "none"
        self.scope = scope
        self.detach_target = check_bool("detach_target", detach_target)

    def make_parametrization(self, name: str, weight: torch.Tensor) -> CompressedWeight | None:
        if self.pattern is None and self.grid is None:
            return None
        return NMQuantWeight(weight, self.pattern, self.grid, self.sr_ste_decay, self.range)

    def finalize(self, model: nn.Module, calib_batches: list | None = None) -> Finalized:
        """Harden every layer (base class); a layer N:M does not apply to gets a ``note``."""
        done = super().finalize(model, calib_batches)
        done.layer_extras = nm_notes(self.pattern, self.modules)
        return done

    def penalty(self) -> torch.Tensor | float:
        if self.alignment == "none" or self.lam == 0 or not self.layers:
            return 0.0
        with full_precision(original_weight(self.modules[next(iter(self.layers))])):
            return self._penalty()

    def _penalty(self) -> torch.Tensor:
        terms, count = [], 0
        for name, p in self.layers.items():
            w = self.modules[name].parametrizations.weight.original
            w_hat = p.last if p.last is not None else p(w)
            if self.detach_target:
                w_hat = w_hat.detach()
            a = as_matrix(w) if self.scope == "channel" else w.reshape(1, -1)
            b = as_matrix(w_hat) if self.scope == "channel" else w_hat.reshape(1, -1)
            if self.alignment == "cosine":
                term = 1 - row_cosine(a, b)
            else:
                term = (a - b).pow(2).sum(1) / a.detach().pow(2).sum(1).clamp_min(1e-12)
            terms.append(term.sum())
            count += term.numel()
        return self.lam * torch.stack(terms).sum() / count

    def stats(self) -> dict[str, float]:
        if self.alignment == "none" or not self.layers:
            return {}
        with torch.no_grad():
            value = self.penalty()
        return {"align": float(value) / self.lam} if self.lam else {}

    def setting(self) -> str:
        parts = [str(self.pattern)] if self.pattern is not None else []
        return " ".join([*parts, str(self.grid) if self.grid is not None else "fp32"])
