"""OBS/OBQ solvers of Optimal Brain Compression, pure functions (no model, no hooks).

One layer's weight ``W`` (``rows × d``, groups of an N:M pattern along ``d``) is
compressed against the Hessian ``H = 2XXᵀ`` of its inputs (:mod:`slope_bench.calibration`)
so that ``‖WX − ŴX‖²`` grows as little as possible under the sparsity pattern and the
quantization grid (Frantar, Singh, Alistarh, "Optimal Brain Compression", NeurIPS 2022).
Rows are independent and share ``H``, damped by ``damp · mean(diag H)``; columns whose
input is always zero ("dead", ``H_pp = 0``) get ``H_pp = 1`` and a zero weight
(:func:`prepare_hessian`). :func:`solve_layer` is the entry point;
:mod:`slope_bench.methods.obc` drives it layer by layer.

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
  [H⁻¹]_pp`` and ``w ← w − ((w_p − q(w_p)) / [H⁻¹]_pp) · H⁻¹_{:,p}``, ``w_p = q(w_p)``;
  with OBC's outlier rule an open weight outside the grid's range goes first.
* **Joint**: prune with ExactOBS, fit the per-channel grid on the pruned, updated
  weights, then OBQ over the kept weights with the pruned ones held at exactly zero
  (:func:`exact_solve`, one chunk of rows at a time). Its cost is estimated from this
  device's measured rates (:func:`estimate_exact_seconds`) so that the method can
  choose it per layer within a time budget.
* **Blocked** (GPTQ, Frantar et al. 2023, §4; SparseGPT, Frantar & Alistarh 2023, §3):
  fixed column order, the upper Cholesky factor ``U`` of the damped ``H⁻¹`` (``[U]_jj²``
  is the ``[H⁻¹]_jj`` of the remaining problem), in-block error feedback
  ``W[:, j:] −= e_j · U[j, j:]`` and one lazy update of the later columns per block.
  N:M masks are chosen per group of ``m`` columns when the sweep reaches them by
  multi-weight OBS (OBC Eq. 7); unstructured masks per block by the saliency
  ``w² / [U]_jj²`` (SparseGPT), with the cumulative target count. Joint
  (:func:`blocked_sweep`): one sweep that prunes and quantizes every column, both
  errors fed to the later columns (SparseGPT), or two (prune, then GPTQ; the ablation).
  Cost ``O(d_row·d_col²)`` instead of ``O(d_row·d_col³)``.
* **Magnitude** (baseline, no Hessian): magnitude N:M / unstructured mask and
  round-to-nearest on the same grid.

Grid (:class:`RowQuantizer`, fitted by :func:`slope_bench.quant.fit_grid`): per output
channel, signed ``[−2^(b−1), 2^(b−1)−1]·s`` (the OBC/GPTQ reference ``sym`` grid),
symmetric ``[−(2^(b−1)−1), 2^(b−1)−1]·s`` (binary: ``{±s}``, ``s = mean|w_kept|``) or
asymmetric ``(c − z)·s`` with ``c ∈ [0, 2^b − 1]`` and an integer zero point, 0 always on
the grid so that pruned weights stay exactly zero; range min-max or the reference
clipping search (``mse``). Scales are floored at :data:`~slope_bench.quant.MIN_SCALE`
and rounded to float16 before solving, so the final weight is exactly ``code × scale16``.

Example::

    solution = solve_layer(weight, hessian, NM(2, 4), None, UniformGrid(4), solver="exact")
    solution.weight, solution.recon_error
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from slope_bench.quant import UniformGrid, fit_grid, grid_codes, grid_values
from slope_bench.sparsity import NM, as_matrix, magnitude_mask, nm_mask

SOLVERS = ("exact", "blocked", "magnitude")
EXACT_CHUNK_ELEMENTS = 2**23  # rows × d_col² per batched exact solve (64 MiB in float64)


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


# ---- grid ------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class RowQuantizer:
    """A fixed per-row uniform grid: ``scale`` and integer ``zero`` of shape ``(rows, 1)``.

    Symmetric / signed: ``q(w) = clamp(round(w/s), qmin, qmax) · s``; binary: ``sign(w) · s``;
    asymmetric: ``(clamp(round(w/s) + z, 0, 2^b − 1) − z) · s``. Works on any
    ``(rows, k)`` slice of a weight matrix.
    """

    grid: UniformGrid
    scale: torch.Tensor
    zero: torch.Tensor

    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """Integer codes (as floats) of ``weight`` (:func:`slope_bench.quant.grid_codes`)."""
        return grid_codes(weight, self.scale, self.grid, self.zero if self.grid.zero_point else None)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """Grid values of ``codes`` (:func:`slope_bench.quant.grid_values`)."""
        return grid_values(codes, self.scale, self.zero if self.grid.zero_point else None)

    def quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """Nearest grid value of every entry."""
        return self.dequantize(self.codes(weight))


def fit_row_quantizer(weight: torch.Tensor, keep: torch.Tensor | None, grid: UniformGrid, range_: str = "minmax") -> RowQuantizer:
    """Per-row grid over the kept weights (:func:`slope_bench.quant.fit_grid`), scale
    rounded to float16.

    Args:
        weight: ``(rows, cols)`` float weights (already pruned/updated).
        keep: bool mask of kept weights, or ``None`` for all.
        grid: bits and kind (granularity is per row).
        range_: ``minmax`` or ``mse`` (the OBC/GPTQ reference clipping search).

    Returns:
        The row quantizer; 0 is always on the grid (the asymmetric range contains it).
    """
    scale, zero = fit_grid(weight.double(), grid, range_, keep)
    return RowQuantizer(grid, scale, zero)


def cat_quantizers(parts: list[RowQuantizer]) -> RowQuantizer:
    """One quantizer from per-chunk quantizers of consecutive row slices."""
    return RowQuantizer(parts[0].grid, torch.cat([q.scale for q in parts]), torch.cat([q.zero for q in parts]))


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
    outlier_rule: bool = False,
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
        outlier_rule: OBC §5's outlier rule (the reference code's ``outlier``): when some
            open weight of a row lies outside the grid's range — its rounding error
            ``(q(w) − w)²`` exceeds ``s²/4``, which only a clamped weight can — the row
            quantizes the one with the largest error first instead of the greedy choice,
            so that the updates cannot push it further out (greedy only; off on a
            binary grid, whose error is never below ``s²/4`` away from ``±s``).

    Returns:
        The updated weights; every not-``done`` entry lies on the grid.
    """
    rows, d = weight.shape
    w = weight.clone()
    h = hinv.expand(rows, d, d).clone() if hinv.dim() == 2 else hinv.clone()
    done = torch.zeros(rows, d, dtype=torch.bool, device=w.device) if done is None else done.clone()
    index = torch.arange(rows, device=w.device)
    steps = int((~done).sum(1).max()) if rows else 0
    outliers = outlier_rule and greedy and not quantizer.grid.binary
    bound = quantizer.scale.square() / 4
    for _ in range(steps):
        active = ~done.all(1)
        if greedy:
            diag = torch.where(done, 1.0, h.diagonal(dim1=1, dim2=2))
            error = (quantizer.quantize(w) - w).square().masked_fill(done, 0.0)
            p = (error / diag).masked_fill(done, math.inf).argmin(1)
            if outliers:
                p = torch.where((error > bound).any(1), error.argmax(1), p)
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


def chunk_elements(device: torch.device | str) -> int:
    """Elements of one batch of per-row inverse Hessians (``rows × d²``, float64): 64 MiB on
    a CPU; on a GPU up to 2 GiB, within an eighth of the free memory."""
    device = torch.device(device)
    if device.type != "cuda":
        return EXACT_CHUNK_ELEMENTS
    free, _ = torch.cuda.mem_get_info(device)
    return max(EXACT_CHUNK_ELEMENTS, min(2**28, free // 64))


def _row_chunks(rows: int, d: int, elements: int = EXACT_CHUNK_ELEMENTS) -> list[slice]:
    size = max(1, elements // max(d * d, 1))
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
        per-row inverse Hessians with pruned columns eliminated (``rows × d²``: for small
        layers; :func:`exact_solve` keeps one chunk of rows at a time).
    """
    rows, d = weight.shape
    hinv = inverse_hessian(hessian)
    chunks = _row_chunks(rows, d, chunk_elements(weight.device))
    keep = unstructured_keep(weight, hinv, sparsity, chunks) if pattern is None else None
    parts = [_exact_prune_rows(weight[c], hessian, hinv, pattern, None if keep is None else keep[c]) for c in chunks]
    return torch.cat([part[0] for part in parts]), torch.cat([part[1] for part in parts]), torch.cat([part[2] for part in parts])


def unstructured_keep(weight: torch.Tensor, hinv: torch.Tensor, sparsity: float | None, chunks: list[slice]) -> torch.Tensor:
    """OBC's global mask selection: every row pruned to the end by ExactOBS, its per-step
    losses made non-decreasing, the ``sparsity · rows · d`` smallest steps over all rows
    give each row's count, taken in the row's own removal order."""
    rows, d = weight.shape
    total = int(round((sparsity or 0.0) * rows * d))
    if total == 0:
        return torch.ones_like(weight, dtype=torch.bool)
    losses, orders = [], []
    for chunk in chunks:
        _, _, _, loss, order = exact_obs_prune(weight[chunk], hinv, d)
        losses.append(loss)
        orders.append(order)
    increments = torch.cat(losses).cummax(1).values
    chosen = increments.flatten().argsort(stable=True)[:total]
    counts = torch.bincount(chosen // d, minlength=rows)
    ranks = torch.arange(d, device=weight.device).expand(rows, d)
    removed = torch.zeros(rows, d, dtype=torch.bool, device=weight.device)
    removed.scatter_(1, torch.cat(orders), ranks < counts[:, None])
    return ~removed


def _exact_prune_rows(
    weight: torch.Tensor, hessian: torch.Tensor, hinv: torch.Tensor, pattern: NM | None, keep: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(weight, keep, per-row hinv)`` of a chunk of rows: ExactOBS N:M, or the exact
    least-squares fit ``ŵ_S = H_SS⁻¹ (H w)_S`` on a given unstructured ``keep``."""
    rows, d = weight.shape
    if pattern is not None:
        steps = d // pattern.m * (pattern.m - pattern.n)
        w, row_hinv, removed, _, _ = exact_obs_prune(weight, hinv, steps, pattern)
        return w, ~removed, row_hinv
    if bool(keep.all()):
        return weight.clone(), keep, hinv.expand(rows, d, d).clone()
    row_hinv = masked_inverse(hessian, keep)
    w = torch.bmm(row_hinv, (weight @ hessian).unsqueeze(2)).squeeze(2)  # (H w)ᵀ per row; H symmetric
    w[~keep] = 0.0
    return w, keep, row_hinv


def exact_solve(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: NM | None,
    sparsity: float | None,
    grid: UniformGrid | None,
    range_: str = "minmax",
    outlier_rule: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, RowQuantizer | None]:
    """OBC's exact joint solve, one chunk of rows at a time: ExactOBS pruning, the row grid
    fitted on the pruned and updated weights, then OBQ over the kept weights (zeros stay zero).

    Returns:
        ``(weight, keep, quantizer)`` (``keep`` ``None`` when nothing is pruned).
    """
    rows, d = weight.shape
    hinv = inverse_hessian(hessian)
    chunks = _row_chunks(rows, d, chunk_elements(weight.device))
    prunes = pattern is not None or bool(sparsity)
    keep = unstructured_keep(weight, hinv, sparsity, chunks) if prunes and pattern is None else None
    out, keeps, quantizers = [], [], []
    for chunk in chunks:
        w, k, h = weight[chunk], None, hinv
        if prunes:
            w, k, h = _exact_prune_rows(w, hessian, hinv, pattern, None if keep is None else keep[chunk])
        if grid is not None:
            quantizers.append(fit_row_quantizer(w, k, grid, range_))
            w = exact_obq(w, h, quantizers[-1], None if k is None else ~k, outlier_rule=outlier_rule)
        out.append(w)
        keeps.append(k)
        del h
    keep = torch.cat(keeps) if prunes else None
    return torch.cat(out), keep, cat_quantizers(quantizers) if quantizers else None


def exact_quantize(
    weight: torch.Tensor,
    hinv: torch.Tensor,
    quantizer: RowQuantizer,
    keep: torch.Tensor | None,
    greedy: bool = True,
    outlier_rule: bool = False,
) -> torch.Tensor:
    """OBQ over a whole layer in row chunks; pruned (not ``keep``) weights stay zero."""
    rows, d = weight.shape
    done = None if keep is None else ~keep
    parts = []
    for chunk in _row_chunks(rows, d, chunk_elements(weight.device)):
        h = hinv if hinv.dim() == 2 else hinv[chunk]
        rows_q = quantizer_rows(quantizer, chunk)
        parts.append(exact_obq(weight[chunk], h, rows_q, None if done is None else done[chunk], greedy, outlier_rule))
    return torch.cat(parts)


def quantizer_rows(quantizer: RowQuantizer, rows: slice) -> RowQuantizer:
    """The quantizer restricted to a slice of rows."""
    return RowQuantizer(quantizer.grid, quantizer.scale[rows], quantizer.zero[rows])


# ---- cost of the exact solver -------------------------------------------------------------
_RATES: dict[tuple[str, int], tuple[float, float]] = {}


def exact_rate(device: torch.device | str) -> tuple[float, float]:
    """Measured ``(seconds per solver iteration, seconds per element update)`` of the exact
    solver on ``device`` (with the current thread count), cached.

    Two timed probes of :func:`exact_obs_prune`: one row of 32 columns (the per-iteration
    overhead of the small kernels) and a chunk of 64 rows × 128 columns (the
    ``rows × d²`` rank-one updates of the per-row inverse Hessians).
    """
    device = torch.device(device)
    key = (str(device), torch.get_num_threads())
    if key not in _RATES:
        generator = torch.Generator().manual_seed(0)

        def probe(rows: int, d: int, steps: int) -> float:
            x = torch.randn(4 * d, d, generator=generator, dtype=torch.float64).to(device)
            hinv = inverse_hessian(x.T @ x + torch.eye(d, dtype=torch.float64, device=device))
            w = torch.randn(rows, d, generator=generator, dtype=torch.float64).to(device)
            exact_obs_prune(w, hinv, 2)  # warm-up
            _synchronize(device)
            start = time.perf_counter()
            exact_obs_prune(w, hinv, steps)
            _synchronize(device)
            return time.perf_counter() - start

        per_iteration = probe(1, 32, 32) / 32
        elements = 64 * 64 * 128 * 128
        per_element = max(probe(64, 128, 64) - 64 * per_iteration, 0.0) / elements
        _RATES[key] = (per_iteration, max(per_element, 1e-13))
    return _RATES[key]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def exact_iterations(rows: int, d: int, pattern: NM | None, sparsity: float | None, grid: UniformGrid | None) -> tuple[int, int]:
    """``(steps per row, total steps)`` the exact solver runs on a ``rows × d`` layer: N:M
    prunes ``d (m − n)/m`` weights per row, unstructured selection runs every row to the
    end (``d``) and then quantizes its kept ones (at most ``d``); OBQ quantizes every kept one."""
    if pattern is not None:
        steps = d // pattern.m * (pattern.m - pattern.n) + (d // pattern.m * pattern.n if grid is not None else 0)
    else:
        steps = (d if sparsity else 0) + (d if grid is not None else 0)
    return steps, rows * steps


def estimate_exact_seconds(
    rows: int, d: int, pattern: NM | None, sparsity: float | None, grid: UniformGrid | None, device: torch.device | str
) -> float:
    """Predicted wall time of the exact solver on a ``rows × d`` layer on ``device``:
    ``chunks × steps × t_iteration + rows × steps × d² × t_element`` (:func:`exact_rate`)."""
    steps, _ = exact_iterations(rows, d, pattern, sparsity, grid)
    per_iteration, per_element = exact_rate(device)
    chunks = len(_row_chunks(rows, d, chunk_elements(device)))
    return chunks * steps * per_iteration + rows * steps * d * d * per_element


# ---- blocked solvers --------------------------------------------------------------------
MAX_GROUP_SUBSETS = 512  # N:M groups with more pruning choices fall back to greedy saliency


def group_subsets(m: int, count: int, device: torch.device | str | None = None) -> torch.Tensor | None:
    """All ``count``-subsets of ``range(m)`` as a ``(S, count)`` tensor on ``device``, ``None`` if too many."""
    if math.comb(m, count) > MAX_GROUP_SUBSETS:
        return None
    return torch.tensor(list(itertools.combinations(range(m), count)), dtype=torch.long, device=device).reshape(-1, count)


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


GROUP_RULES = ("subset", "sparsegpt")


def blocked_sweep(
    weight: torch.Tensor,
    upper: torch.Tensor,
    pattern: NM | None = None,
    sparsity: float | None = None,
    quantizer: RowQuantizer | None = None,
    keep: torch.Tensor | None = None,
    block_size: int = 128,
    group_rule: str = "subset",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sweep over the columns with fixed order and lazy block updates (SparseGPT
    Alg. 1, GPTQ Alg. 1): prune and/or quantize, every error fed to the later columns.

    Masks (unless ``keep`` is given): N:M — when the sweep reaches a group of ``m``
    columns, ``group_rule="subset"`` prunes the ``m − n`` weights whose joint OBS removal
    is cheapest at once (:func:`group_obs`, re-fitting the group's kept weights too);
    ``"sparsegpt"`` prunes the ``m − n`` lowest saliencies ``w² / [U]_jj²`` (SparseGPT §3.3).
    Unstructured — each block's mask up front by the saliency, the cumulative count
    following ``sparsity`` (SparseGPT §3.2). Then every column ``j`` in order is set to its
    target (``q(w_j)`` with a ``quantizer``, else ``w_j``; 0 where pruned) and the error
    ``(w_j − target) / U_jj`` is propagated: ``W[:, j:] −= e_j · U[j, j:]``.

    Args:
        weight: ``(rows, d)`` float64.
        upper: ``U`` with ``H⁻¹ = Uᵀ U`` (:func:`upper_cholesky_of_inverse`).
        pattern: N:M pattern (``d % m == 0``), or ``None``.
        sparsity: unstructured target when ``pattern`` is ``None``.
        quantizer: the row grid (``None``: prune only).
        keep: a fixed bool keep-mask (pruned columns "quantized" to 0); masks are then not chosen.
        block_size: columns per lazy block (rounded up to a multiple of ``m``).
        group_rule: ``subset`` or ``sparsegpt`` (N:M only).

    Returns:
        ``(weight, keep)``: the final weights (pruned exactly 0) and the bool keep-mask.
    """
    rows, d = weight.shape
    choose_groups = pattern is not None and keep is None
    choose_blocks = pattern is None and bool(sparsity) and keep is None
    subsets = None
    if choose_groups:
        block_size = math.ceil(block_size / pattern.m) * pattern.m
        subsets = group_subsets(pattern.m, pattern.m - pattern.n, weight.device)
    w = weight.clone()
    keep = torch.ones(rows, d, dtype=torch.bool, device=w.device) if keep is None else keep.clone()
    pruned = 0
    for start in range(0, d, block_size):
        end = min(start + block_size, d)
        block = w[:, start:end].clone()
        factor = upper[start:end, start:end]
        diag = factor.diagonal()
        errors = torch.zeros_like(block)
        block_keep = keep[:, start:end].clone()
        if choose_blocks:
            count = max(0, min(int(round(sparsity * rows * end)) - pruned, block.numel()))
            if count:
                saliency = (block.square() / diag.square()).flatten()
                block_keep.view(-1)[saliency.argsort(stable=True)[:count]] = False
            pruned += count
        for j in range(end - start):
            if choose_groups and j % pattern.m == 0:
                group = slice(j, j + pattern.m)
                if group_rule == "subset":
                    error, block_keep[:, group] = group_obs(block[:, group], factor[group, group], pattern.m - pattern.n, subsets)
                    block[:, j:].sub_(error @ factor[group, j:])
                    block[:, group] *= block_keep[:, group]
                    errors[:, group] = error
                else:
                    saliency = block[:, group].square() / diag[group].square()
                    drop = saliency.topk(pattern.m - pattern.n, dim=1, largest=False).indices
                    block_keep[:, group] = torch.ones_like(saliency, dtype=torch.bool).scatter_(1, drop, False)
            column = block[:, j]
            target = column if quantizer is None else quantizer.quantize(column[:, None])[:, 0]
            target = target * block_keep[:, j]
            error = (column - target) / diag[j]
            block[:, j:].sub_(error[:, None] * factor[j, j:][None, :])
            block[:, j] = target
            errors[:, j] += error
        w[:, start:end] = block
        w[:, end:].sub_(errors @ upper[start:end, end:])
        keep[:, start:end] = block_keep
    w[~keep] = 0.0
    return w, keep


def blocked_prune(
    weight: torch.Tensor, upper: torch.Tensor, pattern: NM | None, sparsity: float | None, block_size: int, group_rule: str = "subset"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pruning sweep of :func:`blocked_sweep` (no quantizer): ``(weight, keep)``."""
    return blocked_sweep(weight, upper, pattern, sparsity, None, None, block_size, group_rule)


def blocked_quantize(
    weight: torch.Tensor, upper: torch.Tensor, quantizer: RowQuantizer, keep: torch.Tensor | None, block_size: int
) -> torch.Tensor:
    """GPTQ sweep: quantize columns left to right with error feedback (GPTQ Alg. 1).

    Pruned (not ``keep``) columns are "quantized" to exactly zero, so their error is
    compensated by the later columns too.
    """
    return blocked_sweep(weight, upper, None, None, quantizer, keep, block_size)[0]


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


JOINTS = ("one_sweep", "two_pass")
ONE_SWEEP_FIT = "pruned"  # the one-sweep grid: fitted as two-pass fits it (see _presweep_quantizer)


def solve_layer(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: NM | None = None,
    sparsity: float | None = None,
    grid: UniformGrid | None = None,
    damp: float = 0.01,
    solver: str = "exact",
    block_size: int = 128,
    range_: str = "minmax",
    joint: str = "one_sweep",
    outlier_rule: bool = False,
    group_rule: str = "subset",
) -> LayerSolution:
    """Compress one ``(rows, d)`` weight matrix against its input Hessian ``H = 2XXᵀ``.

    Args:
        weight: ``(rows, d)`` weight (groups of ``pattern`` run along ``d``).
        hessian: undamped ``(d, d)`` Hessian.
        pattern: N:M pattern (``d % m == 0``) or ``None``.
        sparsity: unstructured sparsity when ``pattern`` is ``None`` (``None``/0: dense).
        grid: uniform grid (per row) or ``None`` for full precision.
        damp: damping as a fraction of the mean diagonal.
        solver: ``exact`` (ExactOBS + OBQ, :func:`exact_solve`), ``blocked``
            (SparseGPT/GPTQ sweeps) or ``magnitude`` (magnitude mask + round-to-nearest).
        block_size: lazy-update block of the blocked solver.
        range_: the grid's range, ``minmax`` or ``mse`` (:func:`fit_row_quantizer`).
        joint: blocked pruning + quantization in ``one_sweep`` (SparseGPT: one sweep
            prunes and quantizes every column, both errors propagated to the later ones)
            or ``two_pass`` (a pruning sweep, then a GPTQ sweep). Both use the same grid,
            fitted on the weights of a pruning sweep (SparseGPT's code fits it on the
            dense weights: with ``range=mse`` a 3–20% higher mean layer error at 2:4
            w4…w2 on trained ResNet-18 layers, ``experiments/fidelity.md``). The exact solver is OBC's two-pass
            (ExactOBS, then OBQ).
        outlier_rule: OBQ's outlier rule (exact solver, :func:`exact_obq`).
        group_rule: N:M group choice of the blocked sweeps (:func:`blocked_sweep`).

    Returns:
        A :class:`LayerSolution`; ``extras`` says ``solver`` and ``joint`` (``None`` when
        the layer is not both pruned and quantized).
    """
    original = weight.detach().to(torch.float64)
    prunes = pattern is not None or bool(sparsity)
    keep = None
    quantizer = None
    both = prunes and grid is not None
    ran = "two_pass" if both else None
    if solver == "magnitude":
        keep = magnitude_keep(original, pattern, sparsity)
        w = original if keep is None else original * keep
        if grid is not None:
            quantizer = fit_row_quantizer(w, keep, grid, range_)
            w = quantizer.quantize(w)
    else:
        h, w = prepare_hessian(hessian, original, damp)
        if solver == "exact":
            w, keep, quantizer = exact_solve(w, h, pattern, sparsity, grid, range_, outlier_rule)
        elif solver == "blocked":
            upper = upper_cholesky_of_inverse(h)
            if both and joint == "one_sweep":
                ran = joint
                quantizer = _presweep_quantizer(w, upper, pattern, sparsity, grid, range_, block_size, group_rule)
                w, keep = blocked_sweep(w, upper, pattern, sparsity, quantizer, None, block_size, group_rule)
            else:
                if prunes:
                    w, keep = blocked_prune(w, upper, pattern, sparsity, block_size, group_rule)
                if grid is not None:
                    quantizer = fit_row_quantizer(w, keep, grid, range_)
                    w = blocked_quantize(w, upper, quantizer, keep, block_size)
        else:
            raise ValueError(f"solver must be one of {', '.join(SOLVERS)}; got {solver!r}")
    if quantizer is not None:
        w = quantizer.quantize(w)
    if keep is not None:
        w = w * keep
    final = w.to(torch.float32)
    error = reconstruction_error(original, final, hessian)
    return LayerSolution(final, keep, quantizer, error, {"solver": solver, "joint": ran})


def _presweep_quantizer(w, upper, pattern, sparsity, grid, range_, block_size, group_rule) -> RowQuantizer:
    """The grid of the one-sweep solve (``ONE_SWEEP_FIT``): fitted on the weights of a
    pruning sweep (``pruned``, default: the grid ``two_pass`` uses), on the dense weights
    (``dense``, SparseGPT's code) or on the magnitude-pruned ones (``magnitude``)."""
    if ONE_SWEEP_FIT == "dense":
        return fit_row_quantizer(w, None, grid, range_)
    if ONE_SWEEP_FIT == "magnitude":
        return fit_row_quantizer(w, magnitude_keep(w, pattern, sparsity), grid, range_)
    pruned, keep = blocked_prune(w, upper, pattern, sparsity, block_size, group_rule)
    return fit_row_quantizer(pruned, keep, grid, range_)


def column_permutation(shape: torch.Size, order: str, device: torch.device | str | None = None) -> torch.Tensor:
    """Indices ``perm`` (on ``device``) with ``as_matrix(w, order) == as_matrix(w)[:, perm]``."""
    index = torch.arange(math.prod(shape), device=device).reshape(shape)
    return as_matrix(index, order)[0] % math.prod(shape[1:])
