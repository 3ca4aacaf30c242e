"""OBC — Optimal Brain Compression (Frantar, Singh, Alistarh; NeurIPS 2022), post-training.

Each targeted layer is compressed on its own so that its output on calibration data
changes as little as possible: minimise ``‖WX − ŴX‖²`` subject to the sparsity pattern
and the quantization grid. Rows of ``W`` are independent and share the Hessian
``H = 2XXᵀ`` (:mod:`slope_bench.calibration`), damped by ``damp · mean(diag H)``;
columns whose input is always zero ("dead", ``H_pp = 0``) get ``H_pp = 1`` and a zero
weight.

Solvers (pure functions below):

* **ExactOBS pruning** (OBC §4, Eq. 3-5): repeatedly remove from each row the weight
  ``p = argmin w_p² / [H⁻¹]_pp`` (loss ``½ w_p² / [H⁻¹]_pp``), update the rest
  ``w ← w − (w_p / [H⁻¹]_pp) · H⁻¹_{:,p}`` and downdate the row's ``H⁻¹`` by one
  Gaussian-elimination step ``H⁻¹ ← H⁻¹ − H⁻¹_{:,p} H⁻¹_{p,:} / [H⁻¹]_pp``. N:M: the
  candidates are restricted to groups that still hold more than ``n`` weights.
  Unstructured: every row is pruned to the end, its per-step losses are recorded, made
  non-decreasing (running maximum) and the smallest ``sparsity · rows · cols`` steps over
  all rows give each row's count (the global order across rows, OBC §4 "global
  mask selection"); the final weights are the exact least-squares fit on each row's
  kept set, ``ŵ_S = H_SS⁻¹ (H w)_S``, which is what the sequential updates compute.
* **OBQ quantization** (OBC §5): the same loop with ``p = argmin (q(w_p) − w_p)² /
  [H⁻¹]_pp`` and ``w ← w − ((w_p − q(w_p)) / [H⁻¹]_pp) · H⁻¹_{:,p}``, ``w_p = q(w_p)``.
* **Joint**: prune with ExactOBS, fit the per-channel grid on the pruned, updated
  weights, then OBQ over the kept weights with the pruned ones held at exactly zero.
* **Blocked** (GPTQ, Frantar et al. 2023, §4; SparseGPT, Frantar & Alistarh 2023, §3):
  fixed column order, the upper Cholesky factor ``U`` of the damped ``H⁻¹`` (``[U]_jj²``
  is the ``[H⁻¹]_jj`` of the remaining problem), in-block error feedback
  ``W[:, j:] −= e_j · U[j, j:]`` and one lazy update of the later columns per block.
  N:M masks are chosen per group of ``m`` columns when the sweep reaches them by the OBS
  saliency ``w² / [U]_jj²`` (SparseGPT); unstructured masks per block by the same
  saliency, with the cumulative target count. Joint = a pruning sweep, then a
  quantization sweep with pruned columns quantized to zero. Cost ``O(d_row·d_col²)``
  instead of ``O(d_row·d_col³)``.
* **Magnitude** (baseline, no Hessian): magnitude N:M / unstructured mask and
  round-to-nearest on the same grid.

Grid: per output channel, symmetric ``[-(2^(b-1)-1), 2^(b-1)-1]·s`` with
``s = max|w_kept| / qmax`` (binary: ``{±s}``, ``s = mean|w_kept|``), or asymmetric
``(c − z)·s`` with ``c ∈ [0, 2^b − 1]``, the range widened to contain 0 and an integer
zero point so that pruned weights stay exactly zero. Scales are rounded to float16
before solving, so the final weight is exactly ``code × scale16``.

Choices not fixed by the paper (knobs): the grid's scale rule (min-max of the pruned
weights, no clipping search), ``exact_max_cols=256`` (the ``auto`` solver switches to
the blocked one above it: exact 2:4+w4 on a 64×256 layer takes ~1.5 s on this 2-core
CPU and grows with ``d_col³``, blocked takes ~0.02 s; see ``experiments/``), and
sequential calibration done by re-running the calibration batches through the partly
compressed model for every layer, stopping each forward pass as soon as the layer has
been reached (when every targeted layer runs once per forward).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from slope_bench.calibration import collect_layer_statistics, forward_call_counts, recalibrate_batchnorm
from slope_bench.errors import ConfigError, check_bits, check_choice, check_nm, check_range
from slope_bench.methods.base import Compressor, LayerSpec
from slope_bench.quant import UniformGrid, fp16_exact
from slope_bench.sparsity import NM, Unstructured, as_matrix, from_matrix, magnitude_mask, nm_mask

SOLVERS = ("auto", "exact", "blocked", "magnitude")
MIN_SCALE = 6.2e-5  # smallest normal float16, as in quant.harden
EXACT_CHUNK_ELEMENTS = 2**23  # rows × d_col² per batched exact solve (64 MiB in float64)


# ---- grid ------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class RowQuantizer:
    """A fixed per-row uniform grid: ``scale`` and integer ``zero`` of shape ``(rows, 1)``.

    Symmetric: ``q(w) = clamp(round(w/s), -qmax, qmax) · s``; binary: ``sign(w) · s``;
    asymmetric: ``(clamp(round(w/s) + z, 0, 2^b − 1) − z) · s``. Works on any
    ``(rows, k)`` slice of a weight matrix.
    """

    grid: UniformGrid
    scale: torch.Tensor
    zero: torch.Tensor

    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """Integer codes (as floats) of ``weight``."""
        if self.grid.binary:
            return torch.where(weight >= 0, 1.0, -1.0).to(weight.dtype)
        shifted = torch.round(weight / self.scale) + (0 if self.grid.symmetric else self.zero)
        return shifted.clamp(self.grid.qmin, self.grid.qmax)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """Grid values of ``codes``."""
        return codes * self.scale if self.grid.symmetric else (codes - self.zero) * self.scale

    def quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """Nearest grid value of every entry."""
        return self.dequantize(self.codes(weight))


def fit_row_quantizer(weight: torch.Tensor, keep: torch.Tensor | None, grid: UniformGrid) -> RowQuantizer:
    """Per-row min-max grid over the kept weights, scale rounded to float16.

    Args:
        weight: ``(rows, cols)`` float weights (already pruned/updated).
        keep: bool mask of kept weights, or ``None`` for all.
        grid: bits and symmetry (granularity is per row).

    Returns:
        The row quantizer; the asymmetric range always contains 0.
    """
    w = weight.double() if keep is None else weight.double() * keep
    if grid.binary:
        count = w.shape[1] if keep is None else keep.sum(1, keepdim=True).clamp_min(1)
        scale = w.abs().sum(1, keepdim=True) / count
        low = torch.zeros_like(scale)
    elif grid.symmetric:
        scale = w.abs().amax(1, keepdim=True) / grid.qmax
        low = torch.zeros_like(scale)
    else:
        low = w.amin(1, keepdim=True).clamp_max(0)
        high = w.amax(1, keepdim=True).clamp_min(0)
        scale = (high - low) / grid.qmax
    scale16 = fp16_exact(scale.clamp_min(MIN_SCALE))
    zero = torch.zeros_like(scale16) if grid.symmetric else torch.round(-low / scale16).clamp(0, grid.qmax)
    return RowQuantizer(grid, scale16, zero)


# ---- Hessian helpers --------------------------------------------------------------------
def prepare_hessian(hessian: torch.Tensor, weight: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Damped float64 Hessian and the weight with dead columns zeroed.

    Dead columns (``H_pp = 0``: the input is always zero) get ``H_pp = 1`` and a zero
    weight; then ``damp · mean(diag H)`` is added to the diagonal.

    Returns:
        ``(H_damped, weight)``, both float64 copies.
    """
    h = hessian.detach().to(torch.float64).clone()
    w = weight.detach().to(torch.float64).clone()
    diag = h.diagonal()
    dead = diag == 0
    mean = float(diag.mean()) if bool((~dead).any()) else 1.0
    diag[dead] = 1.0
    w[:, dead] = 0.0
    diag.add_(damp * mean)
    return h, w


def _cholesky(matrix: torch.Tensor, upper: bool = False) -> torch.Tensor:
    """Cholesky factor, adding diagonal jitter (1e-8 .. 1e-2 of the mean diagonal) if needed."""
    factor, info = torch.linalg.cholesky_ex(matrix, upper=upper)
    jitter = 1e-8
    while bool((info > 0).any()):
        if jitter > 1e-2:
            raise torch.linalg.LinAlgError("Hessian is not positive definite even after damping")
        eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
        mean = matrix.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None]
        factor, info = torch.linalg.cholesky_ex(matrix + jitter * mean * eye, upper=upper)
        jitter *= 10
    return factor


def inverse_hessian(hessian: torch.Tensor) -> torch.Tensor:
    """``H⁻¹`` of a (batch of) symmetric positive definite matrices via Cholesky."""
    return torch.cholesky_inverse(_cholesky(hessian))


def upper_cholesky_of_inverse(hessian: torch.Tensor) -> torch.Tensor:
    """Upper ``U`` with ``H⁻¹ = Uᵀ U`` (GPTQ §4 "Cholesky reformulation")."""
    return _cholesky(inverse_hessian(hessian), upper=True)


def masked_inverse(hessian: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per-row ``(H_SS)⁻¹`` embedded in ``d × d`` with zeros on the pruned set ``P``.

    This is the row's inverse Hessian after eliminating every pruned column, i.e. what
    ExactOBS arrives at after pruning ``P``.

    Args:
        hessian: damped ``(d, d)`` Hessian.
        keep: ``(rows, d)`` bool mask ``S``.
    """
    k = keep.to(hessian.dtype)
    outer = k[:, :, None] * k[:, None, :]
    restricted = hessian.unsqueeze(0) * outer + torch.diag_embed(1 - k)
    return inverse_hessian(restricted) * outer


def reconstruction_error(weight: torch.Tensor, compressed: torch.Tensor, hessian: torch.Tensor) -> float:
    """``‖WX − ŴX‖² / ‖WX‖² = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` with the undamped ``H``."""
    h = hessian.to(torch.float64)
    w = weight.to(torch.float64).reshape(weight.shape[0], -1)
    delta = w - compressed.to(torch.float64).reshape(w.shape)
    denominator = float(((w @ h) * w).sum())
    if denominator <= 0:
        return 0.0 if float(delta.abs().max()) == 0 else float("inf")
    return float(((delta @ h) * delta).sum()) / denominator


# ---- exact solvers ----------------------------------------------------------------------
def exact_obs_prune(
    weight: torch.Tensor,
    hinv: torch.Tensor,
    steps: int,
    pattern: NM | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ExactOBS: remove ``steps`` weights from every row, one at a time (OBC Eq. 3-5).

    Args:
        weight: ``(rows, d)`` float64.
        hinv: ``(d, d)`` shared or ``(rows, d, d)`` per-row inverse Hessian.
        steps: weights to remove per row.
        pattern: if given, at most ``m − n`` removals per group of ``m`` columns
            (``steps`` should then be ``d · (m − n) / m``).

    Returns:
        ``(weight, hinv, removed, losses, order)``: the updated weights (removed ones
        exactly 0), per-row inverse Hessians with the removed columns eliminated, the
        bool ``(rows, d)`` removed mask, the per-step OBS losses ``½ w_p² / [H⁻¹]_pp``
        ``(rows, steps)`` and the removed column per step ``(rows, steps)``.
    """
    rows, d = weight.shape
    w = weight.clone()
    h = hinv.expand(rows, d, d).clone() if hinv.dim() == 2 else hinv.clone()
    removed = torch.zeros(rows, d, dtype=torch.bool, device=w.device)
    losses = torch.zeros(rows, steps, dtype=w.dtype, device=w.device)
    order = torch.zeros(rows, steps, dtype=torch.long, device=w.device)
    index = torch.arange(rows, device=w.device)
    per_group = None if pattern is None else torch.zeros(rows, d // pattern.m, dtype=torch.long, device=w.device)
    for t in range(steps):
        diag = torch.where(removed, 1.0, h.diagonal(dim1=1, dim2=2))
        blocked = removed
        if pattern is not None:
            full = (per_group >= pattern.m - pattern.n).repeat_interleave(pattern.m, dim=1)
            blocked = removed | full
        score = (w.square() / diag).masked_fill(blocked, math.inf)
        p = score.argmin(1)
        losses[:, t] = score[index, p] / 2
        order[:, t] = p
        column = h[index, :, p]
        pivot = column[index, p]
        w.sub_((w[index, p] / pivot)[:, None] * column)
        w[index, p] = 0.0
        h.baddbmm_(column.unsqueeze(2), (column / pivot[:, None]).unsqueeze(1), alpha=-1.0)
        removed[index, p] = True
        if per_group is not None:
            per_group[index, p // pattern.m] += 1
    w[removed] = 0.0
    return w, h, removed, losses, order


def exact_obq(
    weight: torch.Tensor,
    hinv: torch.Tensor,
    quantizer: RowQuantizer,
    done: torch.Tensor | None = None,
    greedy: bool = True,
) -> torch.Tensor:
    """OBQ: quantize every not-``done`` weight of each row, one at a time (OBC §5).

    Args:
        weight: ``(rows, d)`` float64.
        hinv: ``(d, d)`` or ``(rows, d, d)`` inverse Hessian(s) with ``done`` columns
            already eliminated (as returned by :func:`exact_obs_prune`).
        quantizer: the per-row grid.
        done: bool ``(rows, d)`` of weights already fixed (pruned zeros); ``None``: none.
        greedy: pick ``argmin (q(w_p) − w_p)² / [H⁻¹]_pp`` (OBQ); ``False``: left to
            right (then it equals the GPTQ solution).

    Returns:
        The updated weights; every not-``done`` entry lies on the grid.
    """
    rows, d = weight.shape
    w = weight.clone()
    h = hinv.expand(rows, d, d).clone() if hinv.dim() == 2 else hinv.clone()
    done = torch.zeros(rows, d, dtype=torch.bool, device=w.device) if done is None else done.clone()
    index = torch.arange(rows, device=w.device)
    steps = int((~done).sum(1).max()) if rows else 0
    for _ in range(steps):
        active = ~done.all(1)
        if greedy:
            diag = torch.where(done, 1.0, h.diagonal(dim1=1, dim2=2))
            q = quantizer.quantize(w)
            p = ((q - w).square() / diag).masked_fill(done, math.inf).argmin(1)
        else:
            p = (~done).to(torch.uint8).argmax(1)
        target = quantizer.quantize(w[index, p][:, None])[:, 0]
        column = h[index, :, p]
        pivot = torch.where(active, column[index, p], 1.0)
        coefficient = torch.where(active, (w[index, p] - target) / pivot, 0.0)
        w.sub_(coefficient[:, None] * column)
        w[index, p] = torch.where(active, target, w[index, p])
        scaled = column * (active.to(w.dtype) / pivot)[:, None]
        h.baddbmm_(column.unsqueeze(2), scaled.unsqueeze(1), alpha=-1.0)
        done[index, p] |= active
    return w


def _row_chunks(rows: int, d: int) -> list[slice]:
    size = max(1, EXACT_CHUNK_ELEMENTS // max(d * d, 1))
    return [slice(start, min(start + size, rows)) for start in range(0, rows, size)]


def exact_prune(
    weight: torch.Tensor, hessian: torch.Tensor, pattern: NM | None, sparsity: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ExactOBS pruning of a whole layer (N:M per group, or unstructured global order).

    Args:
        weight: ``(rows, d)`` float64 (dead columns zeroed).
        hessian: damped ``(d, d)`` float64.
        pattern: N:M pattern (its ``d`` divisible by ``m``), or ``None``.
        sparsity: unstructured target fraction when ``pattern`` is ``None``.

    Returns:
        ``(weight, keep, hinv)``: pruned, OBS-updated weights, the bool keep-mask and the
        per-row inverse Hessians with pruned columns eliminated.
    """
    rows, d = weight.shape
    hinv = inverse_hessian(hessian)
    if pattern is not None:
        steps = d // pattern.m * (pattern.m - pattern.n)
        parts = [exact_obs_prune(weight[chunk], hinv, steps, pattern) for chunk in _row_chunks(rows, d)]
        w = torch.cat([part[0] for part in parts])
        keep = ~torch.cat([part[2] for part in parts])
        return w, keep, torch.cat([part[1] for part in parts])
    total = int(round((sparsity or 0.0) * rows * d))
    if total == 0:
        return weight.clone(), torch.ones_like(weight, dtype=torch.bool), hinv.expand(rows, d, d).clone()
    losses, orders = [], []
    for chunk in _row_chunks(rows, d):
        _, _, _, loss, order = exact_obs_prune(weight[chunk], hinv, d)
        losses.append(loss)
        orders.append(order)
    increments = torch.cat(losses).cummax(1).values
    order = torch.cat(orders)
    chosen = increments.flatten().argsort(stable=True)[:total]
    counts = torch.bincount(chosen // d, minlength=rows)
    ranks = torch.arange(d, device=weight.device).expand(rows, d)
    removed = torch.zeros(rows, d, dtype=torch.bool, device=weight.device)
    removed.scatter_(1, order, ranks < counts[:, None])
    keep = ~removed
    row_hinv = torch.cat([masked_inverse(hessian, keep[chunk]) for chunk in _row_chunks(rows, d)])
    gradient = weight @ hessian  # (H w)ᵀ per row; H symmetric
    w = torch.bmm(row_hinv, gradient.unsqueeze(2)).squeeze(2)
    w[removed] = 0.0
    return w, keep, row_hinv


def exact_quantize(
    weight: torch.Tensor, hinv: torch.Tensor, quantizer: RowQuantizer, keep: torch.Tensor | None, greedy: bool = True
) -> torch.Tensor:
    """OBQ over a whole layer in row chunks; pruned (not ``keep``) weights stay zero."""
    rows, d = weight.shape
    done = None if keep is None else ~keep
    parts = []
    for chunk in _row_chunks(rows, d):
        h = hinv if hinv.dim() == 2 else hinv[chunk]
        parts.append(exact_obq(weight[chunk], h, quantizer_rows(quantizer, chunk), None if done is None else done[chunk], greedy))
    return torch.cat(parts)


def quantizer_rows(quantizer: RowQuantizer, rows: slice) -> RowQuantizer:
    """The quantizer restricted to a slice of rows."""
    return RowQuantizer(quantizer.grid, quantizer.scale[rows], quantizer.zero[rows])


# ---- blocked solvers --------------------------------------------------------------------
MAX_GROUP_SUBSETS = 512  # N:M groups with more pruning choices fall back to greedy saliency


def group_subsets(m: int, count: int) -> torch.Tensor | None:
    """All ``count``-subsets of ``range(m)`` as a ``(S, count)`` tensor, ``None`` if too many."""
    if math.comb(m, count) > MAX_GROUP_SUBSETS:
        return None
    return torch.tensor(list(itertools.combinations(range(m), count)), dtype=torch.long).reshape(-1, count)


def group_obs(weight: torch.Tensor, factor: torch.Tensor, count: int, subsets: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove ``count`` weights of one N:M group at once by multi-weight OBS.

    With the columns before the group eliminated, the remaining inverse Hessian is
    ``U_remᵀ U_rem``; its group block is ``A = U_GGᵀ U_GG`` (``U_GG`` the group's
    ``m × m`` upper block). Removing the set ``P`` costs ``½ w_P A_PP⁻¹ w_Pᵀ`` and moves
    every remaining weight by ``δ = −w_P A_PP⁻¹ A_{P,:} = −e · U_{G,:}`` with
    ``e = w_P A_PP⁻¹ U_{G,P}ᵀ`` (OBS for several weights, OBC Eq. 7), so the kept weights
    of the group are re-fitted too, unlike a one-column-at-a-time sweep.

    Args:
        weight: ``(rows, m)`` current weights of the group.
        factor: ``(m, m)`` upper block ``U_GG``.
        count: weights to remove per row (``m − n``).
        subsets: candidate sets (:func:`group_subsets`); ``None``: the ``count`` lowest
            saliencies ``w_k² / A_kk``.

    Returns:
        ``(errors, keep)``: ``e`` of shape ``(rows, m)`` (apply ``W −= e · U_{G,:}``) and
        the group's bool keep-mask.
    """
    rows, m = weight.shape
    inverse = factor.T @ factor
    if subsets is None:
        chosen = (weight.square() / inverse.diagonal()).topk(count, dim=1, largest=False).indices
        blocks = inverse[chosen[:, :, None], chosen[:, None, :]]
        solved = torch.linalg.solve(blocks, weight.gather(1, chosen).unsqueeze(2))
    else:
        blocks = inverse[subsets[:, :, None], subsets[:, None, :]]  # (S, count, count)
        inverses = torch.linalg.inv(blocks)
        values = weight[:, subsets]  # (rows, S, count)
        costs = torch.einsum("rsk,skl,rsl->rs", values, inverses, values)
        best = costs.argmin(1)
        chosen = subsets[best]
        solved = torch.bmm(inverses[best], weight.gather(1, chosen).unsqueeze(2))
    columns = factor.T[chosen]  # (rows, count, m): U_{G,P}ᵀ per row
    errors = (solved.transpose(1, 2) @ columns).squeeze(1)
    keep = torch.ones(rows, m, dtype=torch.bool, device=weight.device).scatter_(1, chosen, False)
    return errors, keep


def blocked_prune(
    weight: torch.Tensor, upper: torch.Tensor, pattern: NM | None, sparsity: float | None, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pruning sweep with fixed column order and lazy block updates (SparseGPT, GPTQ).

    N:M: when the sweep reaches a group of ``m`` columns, the ``m − n`` weights whose
    joint OBS removal is cheapest are pruned at once (:func:`group_obs`), updating the
    rest of the group and every later column. Unstructured: the mask of each block is
    chosen up front by the saliency ``w² / [U]_jj²`` (SparseGPT §3.2) so that the
    cumulative count follows ``sparsity``; then the columns are zeroed one at a time with
    error feedback.

    Args:
        weight: ``(rows, d)`` float64.
        upper: ``U`` with ``H⁻¹ = Uᵀ U`` (:func:`upper_cholesky_of_inverse`).
        pattern: N:M pattern (``d % m == 0``), or ``None``.
        sparsity: unstructured target when ``pattern`` is ``None``.
        block_size: columns per lazy block (rounded up to a multiple of ``m``).

    Returns:
        ``(weight, keep)``: pruned weights (pruned exactly 0) and the bool keep-mask.
    """
    rows, d = weight.shape
    step = 1
    subsets = None
    if pattern is not None:
        block_size = math.ceil(block_size / pattern.m) * pattern.m
        step = pattern.m
        subsets = group_subsets(pattern.m, pattern.m - pattern.n)
        subsets = None if subsets is None else subsets.to(weight.device)
    w = weight.clone()
    keep = torch.ones(rows, d, dtype=torch.bool, device=w.device)
    pruned = 0
    for start in range(0, d, block_size):
        end = min(start + block_size, d)
        block = w[:, start:end].clone()
        factor = upper[start:end, start:end]
        diag = factor.diagonal()
        errors = torch.zeros_like(block)
        block_keep = torch.ones_like(block, dtype=torch.bool)
        if pattern is None and sparsity:
            count = int(round(sparsity * rows * end)) - pruned
            count = max(0, min(count, block.numel()))
            if count:
                saliency = (block.square() / diag.square()).flatten()
                block_keep.view(-1)[saliency.argsort(stable=True)[:count]] = False
            pruned += count
        for j in range(0, end - start, step):
            if pattern is not None:
                group = slice(j, j + pattern.m)
                error, block_keep[:, group] = group_obs(block[:, group], factor[group, group], pattern.m - pattern.n, subsets)
                block[:, j:].sub_(error @ factor[group, j:])
                block[:, group] *= block_keep[:, group]
                errors[:, group] = error
                continue
            column = block[:, j]
            target = column * block_keep[:, j]
            error = (column - target) / diag[j]
            block[:, j:].sub_(error[:, None] * factor[j, j:][None, :])
            block[:, j] = target
            errors[:, j] = error
        w[:, start:end] = block
        w[:, end:].sub_(errors @ upper[start:end, end:])
        keep[:, start:end] = block_keep
    w[~keep] = 0.0
    return w, keep


def blocked_quantize(
    weight: torch.Tensor, upper: torch.Tensor, quantizer: RowQuantizer, keep: torch.Tensor | None, block_size: int
) -> torch.Tensor:
    """GPTQ sweep: quantize columns left to right with error feedback (GPTQ Alg. 1).

    Pruned (not ``keep``) columns are "quantized" to exactly zero, so their error is
    compensated by the later columns too.
    """
    rows, d = weight.shape
    w = weight.clone()
    for start in range(0, d, block_size):
        end = min(start + block_size, d)
        block = w[:, start:end].clone()
        factor = upper[start:end, start:end]
        errors = torch.zeros_like(block)
        for j in range(end - start):
            column = block[:, j : j + 1]
            target = quantizer.quantize(column)
            if keep is not None:
                target = target * keep[:, start + j : start + j + 1]
            error = (column - target)[:, 0] / factor[j, j]
            block[:, j:].sub_(error[:, None] * factor[j, j:][None, :])
            block[:, j] = target[:, 0]
            errors[:, j] = error
        w[:, start:end] = block
        w[:, end:].sub_(errors @ upper[start:end, end:])
    return w


# ---- one layer --------------------------------------------------------------------------
@dataclass
class LayerSolution:
    """Result of :func:`solve_layer`: the final ``(rows, d)`` weight (float32, exactly
    ``code × scale16``, exact zeros), its keep-mask (``None`` if not pruned), the grid and
    the relative reconstruction error."""

    weight: torch.Tensor
    keep: torch.Tensor | None
    quantizer: RowQuantizer | None
    recon_error: float
    extras: dict = field(default_factory=dict)


def magnitude_keep(weight: torch.Tensor, pattern: NM | None, sparsity: float | None) -> torch.Tensor | None:
    """Magnitude mask for the baseline (``None`` when nothing is pruned)."""
    if pattern is not None:
        return nm_mask(weight, NM(pattern.n, pattern.m))
    if sparsity:
        return magnitude_mask(weight, sparsity)
    return None


def solve_layer(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: NM | None = None,
    sparsity: float | None = None,
    grid: UniformGrid | None = None,
    damp: float = 0.01,
    solver: str = "exact",
    block_size: int = 128,
) -> LayerSolution:
    """Compress one ``(rows, d)`` weight matrix against its input Hessian ``H = 2XXᵀ``.

    Args:
        weight: ``(rows, d)`` weight (groups of ``pattern`` run along ``d``).
        hessian: undamped ``(d, d)`` Hessian.
        pattern: N:M pattern (``d % m == 0``) or ``None``.
        sparsity: unstructured sparsity when ``pattern`` is ``None`` (``None``/0: dense).
        grid: uniform grid (per row) or ``None`` for full precision.
        damp: damping as a fraction of the mean diagonal.
        solver: ``exact`` (ExactOBS + OBQ), ``blocked`` (SparseGPT/GPTQ sweeps) or
            ``magnitude`` (magnitude mask + round-to-nearest baseline).
        block_size: lazy-update block of the blocked solver.

    Returns:
        A :class:`LayerSolution`.
    """
    original = weight.detach().to(torch.float64)
    prunes = pattern is not None or bool(sparsity)
    keep = None
    quantizer = None
    if solver == "magnitude":
        keep = magnitude_keep(original, pattern, sparsity)
        w = original if keep is None else original * keep
        if grid is not None:
            quantizer = fit_row_quantizer(w, keep, grid)
            w = quantizer.quantize(w)
    else:
        h, w = prepare_hessian(hessian, original, damp)
        if solver == "exact":
            hinv = None
            if prunes:
                w, keep, hinv = exact_prune(w, h, pattern, sparsity)
            if grid is not None:
                quantizer = fit_row_quantizer(w, keep, grid)
                w = exact_quantize(w, inverse_hessian(h) if hinv is None else hinv, quantizer, keep)
        elif solver == "blocked":
            upper = upper_cholesky_of_inverse(h)
            if prunes:
                w, keep = blocked_prune(w, upper, pattern, sparsity, block_size)
            if grid is not None:
                quantizer = fit_row_quantizer(w, keep, grid)
                w = blocked_quantize(w, upper, quantizer, keep, block_size)
        else:
            raise ValueError(f"solver must be one of exact, blocked, magnitude; got {solver!r}")
    if quantizer is not None:
        w = quantizer.quantize(w)
    if keep is not None:
        w = w * keep
    final = w.to(torch.float32)
    return LayerSolution(final, keep, quantizer, reconstruction_error(original, final, hessian))


def column_permutation(shape: torch.Size, order: str) -> torch.Tensor:
    """Indices ``perm`` with ``as_matrix(w, order) == as_matrix(w)[:, perm]``."""
    index = torch.arange(math.prod(shape)).reshape(shape)
    return as_matrix(index, order)[0] % math.prod(shape[1:])


# ---- the compressor ---------------------------------------------------------------------
@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(count)`` (``None``: unchanged), then restore."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _check_int(key: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(key, value, f"an integer >= {low}")
    return value


def _check_bool(key: str, value) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, value, "true or false")
    return value


class OBC(Compressor):
    """Optimal Brain Compression: post-training layer-wise N:M / unstructured + k-bit.

    Args:
        n, m: N:M pattern (both ``None``: no N:M).
        sparsity: unstructured target in ``[0, 1)`` (only when ``n``/``m`` are ``None``).
        w_bits: weight bits 1..8 (``None``: full precision).
        symmetric: symmetric grid (default) or asymmetric with an integer zero point.
        n_calib: calibration samples the pipeline passes to ``finalize``.
        calib_passes: passes over the calibration samples; read by the pipeline, which
            hands ``finalize`` the batches that many times
            (``task.calib_batches(n_calib, calib_passes)``). Only useful when the
            batches are random views; with fixed eval views it only rescales ``H``.
        damp: damping as a fraction of the mean Hessian diagonal (> 0).
        solver: ``auto`` (exact up to ``exact_max_cols`` input columns, blocked above),
            ``exact``, ``blocked`` or ``magnitude`` (magnitude + round-to-nearest
            baseline, no Hessian).
        exact_max_cols: largest ``d_col`` the ``auto`` solver gives to the exact solver.
        block_size: lazy-update block of the blocked solver.
        sequential: each layer sees the already-compressed layers before it (default);
            ``False``: every Hessian comes from the dense model.
        bn_recalib: re-estimate BatchNorm statistics on the calibration data afterwards.
        nm_order: N:M groups along ``input`` (SR-STE flattening) or ``channel_major``.
        solve_threads: CPU threads while solving a layer (``None``: torch's setting). The
            solvers issue thousands of small kernels; on a shared 2-core CPU one thread
            was 10-15× faster than two (OpenMP synchronisation dominates). No effect on GPU.
        progress: show a progress bar over layers.
        compress_first, compress_classifier: see :class:`Compressor`.
    """

    name = "obc"

    def __init__(
        self,
        n: int | None = 2,
        m: int | None = 4,
        sparsity: float | None = None,
        w_bits: int | None = 4,
        symmetric: bool = True,
        n_calib: int = 1024,
        calib_passes: int = 1,
        damp: float = 0.01,
        solver: str = "auto",
        exact_max_cols: int = 256,
        block_size: int = 128,
        sequential: bool = True,
        bn_recalib: bool = True,
        nm_order: str = "input",
        solve_threads: int | None = 1,
        progress: bool = True,
        compress_first: bool = False,
        compress_classifier: bool = False,
    ) -> None:
        super().__init__(compress_first, compress_classifier)
        self.pattern = check_nm(n, m, nm_order)
        if sparsity is not None:
            if self.pattern is not None:
                raise ConfigError("sparsity", sparsity, "null when n and m are set")
            sparsity = check_range("sparsity", sparsity, 0.0, 1.0, high_open=True)
        self.sparsity = sparsity
        self.symmetric = _check_bool("symmetric", symmetric)
        self.grid = None if w_bits is None else UniformGrid(check_bits(w_bits), self.symmetric)
        self.n_calib = _check_int("n_calib", n_calib, 1)
        self.calib_passes = _check_int("calib_passes", calib_passes, 1)
        self.damp = check_range("damp", damp, 0.0, 1e6, low_open=True)
        self.solver = check_choice("solver", solver, SOLVERS)
        self.exact_max_cols = _check_int("exact_max_cols", exact_max_cols, 1)
        self.block_size = _check_int("block_size", block_size, 1)
        self.sequential = _check_bool("sequential", sequential)
        self.bn_recalib = _check_bool("bn_recalib", bn_recalib)
        self.solve_threads = None if solve_threads is None else _check_int("solve_threads", solve_threads, 1)
        self.progress = _check_bool("progress", progress)
        self.quantizers: dict[str, RowQuantizer] = {}
        self.layer_extras: dict[str, dict] = {}
        self.extra_results: dict[str, float] = {}

    def layer_solver(self, d_col: int) -> str:
        """The solver used for a layer with ``d_col`` input columns."""
        if self.solver == "auto":
            return "exact" if d_col <= self.exact_max_cols else "blocked"
        return self.solver

    def layer_pattern(self, weight: torch.Tensor) -> NM | None:
        """The N:M pattern if it applies to this weight (input size divisible by ``m``)."""
        return self.pattern if self.pattern is not None and self.pattern.applies_to(weight) else None

    @torch.no_grad()
    def compress_layer(self, name: str, module: nn.Module, hessian: torch.Tensor) -> LayerSpec:
        """Solve one layer against ``hessian`` and write the result into ``module.weight``."""
        weight = module.weight.detach()
        pattern = self.layer_pattern(weight)
        order = self.pattern.order if self.pattern is not None else "input"
        matrix = as_matrix(weight, order)
        if order != "input" and weight.dim() > 2:
            perm = column_permutation(weight.shape, order).to(hessian.device)
            hessian = hessian[perm][:, perm]
        solver = self.layer_solver(matrix.shape[1])
        threads = self.solve_threads if weight.device.type == "cpu" else None
        start = time.perf_counter()
        with torch_threads(threads):
            solution = solve_layer(matrix, hessian, pattern, self.sparsity, self.grid, self.damp, solver, self.block_size)
        elapsed = time.perf_counter() - start
        if solution.quantizer is not None:
            self.quantizers[name] = solution.quantizer
        module.weight.data.copy_(from_matrix(solution.weight, weight.shape, order).to(weight.dtype))
        self.layer_extras[name] = {"recon_error": solution.recon_error, "solver": solver, "solve_s": elapsed}
        key = f"time/obc_solve_{solver}_s"
        self.extra_results[key] = self.extra_results.get(key, 0.0) + elapsed
        if pattern is not None:
            layer_pattern = pattern
        elif self.pattern is None and self.sparsity:
            layer_pattern = Unstructured()
        else:
            layer_pattern = None
        if self.grid is None:
            return LayerSpec(pattern=layer_pattern, grid="float", bits=None)
        scales = matrix.shape[0] * (1 if self.symmetric else 2)
        return LayerSpec(pattern=layer_pattern, grid="uniform", bits=self.grid.bits, granularity="channel", scale_values=scales)

    def finalize(self, model: nn.Module, calib_batches=None) -> nn.Module:
        """Solve every targeted layer on ``calib_batches``, then re-estimate BatchNorm.

        Args:
            model: the model returned by ``prepare`` (targets recorded, no parametrization).
            calib_batches: list of model inputs (``n_calib`` training samples in total).

        Returns:
            The same model, targeted weights sparse and on their grids, in eval mode when
            ``bn_recalib`` is on.
        """
        if self.pattern is None and not self.sparsity and self.grid is None:
            for name in self.modules:
                self.specs[name] = LayerSpec(pattern=None, grid="float", bits=None)
            return model
        batches = list(calib_batches or [])
        if not batches:
            raise ValueError("OBC needs calibration batches: finalize(model, calib_batches) got none")
        names = list(self.modules)
        order, counts = forward_call_counts(model, names, batches[0])
        dense_stats = None if self.sequential else collect_layer_statistics(model, names, batches)
        calib_s = 0.0
        total_start = time.perf_counter()
        for name in tqdm(order, desc="obc", unit="layer", disable=not self.progress):
            module = self.modules[name]
            start = time.perf_counter()
            if dense_stats is not None:
                stat = dense_stats.pop(name)
            else:
                stat = collect_layer_statistics(model, [name], batches, stop_early=counts[name] == 1)[name]
            calib_s += time.perf_counter() - start
            hessian = stat.hessian
            if hessian is None:  # layer never reached by the calibration data: magnitude-like
                d_col = module.weight[0].numel()
                hessian = torch.eye(d_col, dtype=torch.float64, device=module.weight.device)
            self.specs[name] = self.compress_layer(name, module, hessian)
            self.layer_extras[name]["calib_rows"] = stat.rows
            del stat, hessian
        self.extra_results["time/obc_total_s"] = time.perf_counter() - total_start
        self.extra_results["time/obc_calib_s"] = calib_s
        if self.layer_extras:
            errors = [extra["recon_error"] for extra in self.layer_extras.values()]
            self.extra_results["obc/recon_error_mean"] = sum(errors) / len(errors)
        if self.bn_recalib:
            start = time.perf_counter()
            recalibrate_batchnorm(model, batches)
            self.extra_results["time/obc_bn_recalib_s"] = time.perf_counter() - start
        return model

    def setting(self) -> str:
        parts = []
        if self.pattern is not None:
            parts.append(str(self.pattern))
        elif self.sparsity:
            parts.append(f"{round(100 * self.sparsity)}%")
        parts.append(f"w{self.grid.bits}" if self.grid is not None else "fp32")
        return " ".join(parts)
