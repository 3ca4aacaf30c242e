"""SQS: Bayesian sparse quantized sub-distributions (Wang, Jiang, Lin, Song; arXiv 2510.08999).

Variational Bayes over each targeted weight tensor: a spike-and-slab posterior for
sparsity (one keep gate per weight) and a K-component Gaussian mixture (``K = 2^w_bits``)
whose means are the quantization codebook. Implemented from the formulas in METHODS.md
(§ SQS), not from the published code, whose known defects (gates ranked on raw
parameters, train/eval gate mismatch, a KL term that shrinks kept weights) are avoided.

Per targeted layer (:class:`MixtureGateWeight`):

* Codebook: learnable means ``μ_k``, learnable mixing logits (``π = softmax``), fixed
  standard deviations. ``μ`` starts at a 1-D k-means of the layer's weights with the
  outer centroids pinned at ``min(W)`` and ``max(W)`` (:func:`kmeans_1d`).
  Not published, chosen here: the fixed ``σ_k`` are one ``σ`` shared by all components,
  the pooled within-cluster standard deviation of that k-means (the maximum-likelihood
  ``σ`` of an equal-variance mixture), and the mixing weights start uniform, so that the
  initial read-out is exactly the k-means assignment. A shared ``σ`` makes the sharpened
  logits linear in ``w``, which gives an ``O(n)`` exact fast path (:func:`neighbour_plan`).
* Keep gates ``γ_j = sigmoid(p_j / τ_g)`` with ``τ_g = 0.01`` and ``p`` initialised so
  that ``γ ≈ 0.993``.
* Training weight ``w̃ = (Σ_k r_k(w) μ_k) · γ ⊙ mask`` with ``r = softmax(log(π_k
  N(w; μ_k, σ²)) / T)``, ``T = 0.001`` (the GMM posterior sharpened by a temperature
  softmax; :func:`mixture_readout`). The read-out is straight-through in ``w`` (its
  gradient is the identity, so ``W`` keeps learning); ``μ`` and ``π`` get the exact
  gradient of the sharpened softmax. ``mask`` is the hard pruning mask of the schedule.

Loss (:meth:`Sqs.penalty`): ``kl_weight · [Σ_j KL(Bern(γ_j) ‖ Bern(λ)) + Σ_k μ_k² / (2σ0²)]``
over kept gates (``λ = 0.01`` prior keep probability; Gaussian prior ``N(0, σ0²)`` on the
means, a point estimate, so its KL is the negative log prior up to a constant).
``kl_weight`` defaults to ``1 / N_train`` (the per-sample ELBO).

Sparsity: the target follows the cubic schedule of Zhu & Gupta (2017)
(:func:`cubic_sparsity`) between ``prune_start`` and ``prune_end`` (fractions of
training). The threshold is global over all compressed layers, ranked by
``|ŵ|·γ`` with ``ŵ = Σ_k r_k μ_k`` (:func:`global_prune_masks`); pruned weights are
masked for good (their gates leave the KL). Not published, chosen here to avoid the
train/eval gate mismatch: once the schedule reaches ``prune_end`` the gates are read
out (``hard_gates_after_prune``): kept weights use ``γ = 1`` in the forward for the rest
of training, so the last part of training sees the function :meth:`Sqs.finalize`
exports (up to the temperature-``T`` softmax and the float16 rounding of the means).

Read-out (:meth:`Sqs.finalize`): each kept weight takes its most likely component's
mean, rounded to float16 (the codebook is stored at 16 bits); pruned weights are exactly
0; at most ``K`` distinct nonzero values per layer. "Bayesian averaging": ``n_samples``
networks are drawn (a component per weight from the GMM posterior at
``sample_temperature``, a gate from ``Bernoulli(γ)`` while gates are still soft, the hard
mask always applied) and stored in ``Sqs.ensemble``; the pipeline reports their mean
logits separately from the deterministic main metric.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slope_bench.errors import ConfigError, check_bits, check_range
from slope_bench.methods.base import CompressedWeight, Compressor, LayerSpec
from slope_bench.quant import fp16_exact
from slope_bench.sparsity import Unstructured

# Elements of one (chunk, K) intermediate in the chunked mixture computations.
CHUNK_ELEMENTS = 1 << 22
# Smallest positive float16 (subnormal); a codebook mean that rounds to 0 is nudged here
# so that kept weights stay nonzero.
FP16_TINY = 2.0**-24
# Logit gap below which a component left out of the three-component fast path would
# still matter (posterior weight e^-20 ≈ 2e-9, below float32 resolution).
PLAN_MARGIN = 20.0


# ---- pure functions ----------------------------------------------------------------------
def kmeans_1d(values: torch.Tensor, k: int, iters: int = 20) -> torch.Tensor:
    """1-D k-means with the outer centroids pinned at ``min`` and ``max`` (SQS init).

    Centroids start at evenly spaced quantiles (the 0 and 1 quantiles are the pinned
    ends); Lloyd iterations then move the interior centroids only. In 1-D a cluster is a
    run of the sorted values between two centroid midpoints, so one sort and a prefix sum
    make every iteration ``O(k log n)``.

    Args:
        values: tensor of any shape (flattened).
        k: number of centroids (>= 1).
        iters: Lloyd iterations.

    Returns:
        A sorted ``(k,)`` tensor inside ``[min, max]`` with ``[0] == min`` and
        ``[-1] == max`` (for ``k == 1``: the mean).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    flat = values.detach().reshape(-1).double()
    n = flat.numel()
    if n == 0:
        raise ValueError("kmeans_1d needs at least one value")
    if k == 1:
        return flat.mean().reshape(1).to(values.dtype)
    ordered = flat.sort().values
    prefix = torch.cat([ordered.new_zeros(1), ordered.cumsum(0)])
    positions = torch.linspace(0, n - 1, k, dtype=torch.float64, device=flat.device).round().long()
    centroids = ordered[positions].clone()
    low, high = ordered[0], ordered[-1]
    for _ in range(iters):
        midpoints = (centroids[1:] + centroids[:-1]) / 2
        cuts = torch.cat([positions.new_zeros(1), torch.searchsorted(ordered, midpoints), positions.new_full((1,), n)])
        counts = (cuts[1:] - cuts[:-1]).double()
        sums = prefix[cuts[1:]] - prefix[cuts[:-1]]
        updated = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
        updated[0], updated[-1] = low, high
        updated = updated.clamp(low, high).sort().values
        if torch.equal(updated, centroids):
            break
        centroids = updated
    return centroids.to(values.dtype)


def nearest_centroid(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the *sorted* ``centroids`` for every value (flattened)."""
    midpoints = (centroids[1:] + centroids[:-1]) / 2
    return torch.bucketize(values.reshape(-1), midpoints.contiguous())


def pooled_std(values: torch.Tensor, centroids: torch.Tensor) -> float:
    """Root mean squared distance of the values to their nearest (sorted) centroid.

    This is the maximum-likelihood ``σ`` of an equal-variance Gaussian mixture whose
    means are the k-means centroids.
    """
    flat = values.detach().reshape(-1).float()
    residual = flat - centroids.float()[nearest_centroid(flat, centroids.float())]
    return float(residual.pow(2).mean().sqrt())


def cubic_sparsity(progress: float, initial: float, final: float, start: float, end: float) -> float:
    """Zhu & Gupta (2017) cubic schedule, Eq. (1), on the fraction of training done.

    ``s_t = s_f + (s_i − s_f)(1 − (t − t0)/(t1 − t0))³`` for ``t0 <= t <= t1``; ``s_i``
    before ``t0`` and ``s_f`` after ``t1``.

    Args:
        progress: fraction of training done, ``t``.
        initial: ``s_i``.
        final: ``s_f``.
        start: ``t0``, fraction of training.
        end: ``t1 > t0``, fraction of training.
    """
    if progress <= start:
        return initial
    if progress >= end:
        return final
    remaining = 1.0 - (progress - start) / (end - start)
    return final + (initial - final) * remaining**3


def component_logits(
    weight: torch.Tensor, means: torch.Tensor, log_mixing: torch.Tensor, std: torch.Tensor | float, temperature: float
) -> torch.Tensor:
    """Sharpened GMM log-posterior logits ``(log π_k − (w − μ_k)² / 2σ²) / T``, shape ``(n, K)``.

    The components share one fixed ``σ``, so the terms common to all ``k``
    (``−log σ − ½ log 2π``) are dropped; the softmax over ``k`` is the posterior ``r_k``.
    """
    diff = weight.reshape(-1, 1) - means
    return (log_mixing - diff.pow(2) / (2 * std**2)) / temperature


def mixture_lines(means: torch.Tensor, mixing_logits: torch.Tensor, std: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Slopes and intercepts (float64, CPU) of the logits as lines in ``w``.

    With a shared ``σ``, ``z_k(w) = [log π_k − μ_k²/(2σ²)]/T + [μ_k/σ²]/T · w`` up to a
    term common to all components (``−w²/(2σ²T)``), which the softmax ignores.
    """
    mu = means.detach().double().cpu()
    log_mixing = torch.log_softmax(mixing_logits.detach().double().cpu(), 0)
    variance = float(std) ** 2
    return mu / (variance * temperature), (log_mixing - mu.pow(2) / (2 * variance)) / temperature


def upper_envelope(slopes: torch.Tensor, intercepts: torch.Tensor) -> tuple[list[int], list[float]]:
    """The lines that attain ``max_k (a_k + b_k·w)`` somewhere, left to right.

    Args:
        slopes: ``(K,)`` tensor ``b``.
        intercepts: ``(K,)`` tensor ``a``.

    Returns:
        ``(lines, breaks)``: indices of the envelope lines by increasing slope and the
        ``len(lines) − 1`` increasing abscissae where the maximum passes from one to the next.
    """
    b, a = slopes.tolist(), intercepts.tolist()
    order = sorted(range(len(b)), key=lambda k: (b[k], -a[k]))
    lines: list[int] = []
    breaks: list[float] = []
    for k in order:
        if lines and b[lines[-1]] == b[k]:
            continue  # same slope, lower (or equal) intercept: never strictly above
        while lines:
            last = lines[-1]
            cross = (a[last] - a[k]) / (b[k] - b[last])
            if breaks and cross <= breaks[-1]:
                lines.pop()
                breaks.pop()
                continue
            breaks.append(cross)
            break
        lines.append(k)
    return lines, breaks


@dataclass(frozen=True)
class NeighbourPlan:
    """Per envelope bucket: the top component and its two envelope neighbours.

    For ``w`` in bucket ``j`` (between ``breaks[j−1]`` and ``breaks[j]``) the top line is
    ``top[j]``; a neighbour's logit relative to the top one is
    ``slope_diff · (w − break)``, exactly 0 at the break they share. A missing neighbour
    has ``slope_diff = ±1`` and an infinite break (relative logit ``−inf``) and index ``K``.
    """

    breaks: torch.Tensor
    top: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor
    left_slope: torch.Tensor
    left_break: torch.Tensor
    right_slope: torch.Tensor
    right_break: torch.Tensor


def neighbour_plan(slopes: torch.Tensor, intercepts: torch.Tensor, margin: float = PLAN_MARGIN) -> NeighbourPlan | None:
    """A :class:`NeighbourPlan` when the top line and its two envelope neighbours suffice.

    They suffice when, in every bucket, every other component's logit is at least
    ``margin`` below the top one (its posterior weight is below ``e^-margin``); the gap
    is linear within a bucket, so checking the bucket's finite ends is exact.

    Args:
        slopes: float64 CPU slopes from :func:`mixture_lines`.
        intercepts: float64 CPU intercepts from :func:`mixture_lines`.
        margin: required logit gap of the components left out.

    Returns:
        The plan (float64, CPU), or ``None`` when the full ``(n, K)`` computation is needed.
    """
    k = slopes.numel()
    lines, breaks = upper_envelope(slopes, intercepts)
    m = len(lines)
    # both ends of every bucket; an infinite end is replaced by the finite one (the gap is
    # monotone towards it), a single bucket by w = 0 (every gap is then constant)
    cuts = torch.tensor(breaks, dtype=torch.float64)
    if m == 1:
        ends = torch.zeros(1, 2, dtype=torch.float64)
    else:
        lower = torch.cat([cuts[:1], cuts])
        upper = torch.cat([cuts, cuts[-1:]])
        ends = torch.stack([lower, upper], 1)
    values = intercepts + slopes * ends.unsqueeze(-1)  # (m, 2, K)
    top = torch.tensor(lines)
    gap = values.gather(2, top.reshape(-1, 1, 1).expand(m, 2, 1)) - values
    candidate = torch.zeros(m, k, dtype=torch.bool)
    rows = torch.arange(m)
    candidate[rows, top] = True
    candidate[rows[1:], top[:-1]] = True
    candidate[rows[:-1], top[1:]] = True
    if bool((gap.masked_fill(candidate.unsqueeze(1), math.inf) < margin).any()):
        return None
    inf = math.inf
    left = torch.tensor([lines[j - 1] if j > 0 else k for j in range(m)])
    right = torch.tensor([lines[j + 1] if j < m - 1 else k for j in range(m)])
    left_slope = torch.tensor([slopes[lines[j - 1]] - slopes[lines[j]] if j > 0 else -1.0 for j in range(m)], dtype=torch.float64)
    right_slope = torch.tensor([slopes[lines[j + 1]] - slopes[lines[j]] if j < m - 1 else 1.0 for j in range(m)], dtype=torch.float64)
    left_break = torch.tensor([breaks[j - 1] if j > 0 else -inf for j in range(m)], dtype=torch.float64)
    right_break = torch.tensor([breaks[j] if j < m - 1 else inf for j in range(m)], dtype=torch.float64)
    return NeighbourPlan(torch.tensor(breaks, dtype=torch.float64), top, left, right, left_slope, left_break, right_slope, right_break)


def _chunk(k: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(k, 1))


def _neighbour_forward(flat: torch.Tensor, plan: NeighbourPlan, means: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Fast-path read-out: ``(value, bucket, e_left, e_right)``.

    ``e_left``, ``e_right`` are ``exp`` of the neighbours' logits relative to the top
    one, so ``r = (e_left, 1, e_right) / (1 + e_left + e_right)``.
    """
    bucket = torch.bucketize(flat, plan.breaks.to(device=flat.device, dtype=flat.dtype).contiguous())
    lines = torch.stack([plan.left_slope, plan.left_break, plan.right_slope, plan.right_break], 1)
    row = lines.to(device=flat.device, dtype=flat.dtype).index_select(0, bucket)
    e_left = torch.exp(row[:, 0] * (flat - row[:, 1]))
    e_right = torch.exp(row[:, 2] * (flat - row[:, 3]))
    mu = _candidate_means(plan, means).index_select(0, bucket)
    value = (e_left * mu[:, 0] + mu[:, 1] + e_right * mu[:, 2]) / (1 + e_left + e_right)
    return value, bucket, e_left, e_right


def _candidate_means(plan: NeighbourPlan, means: torch.Tensor) -> torch.Tensor:
    """``(buckets, 3)`` means of the left / top / right components (0 where missing)."""
    padded = torch.cat([means, means.new_zeros(1)])
    return padded[torch.stack([plan.left, plan.top, plan.right], 1).to(means.device)]


def _neighbour_backward(
    flat: torch.Tensor,
    grad: torch.Tensor,
    saved: tuple[torch.Tensor, ...],
    plan: NeighbourPlan,
    means: torch.Tensor,
    temperature: float,
    variance: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast-path ``(∂L/∂μ, ∂L/∂log π)``: sums per bucket, then per component."""
    bucket, e_left, e_right = saved
    k, buckets = means.numel(), plan.top.numel()
    mu = _candidate_means(plan, means).index_select(0, bucket)
    total = 1 + e_left + e_right
    posterior = (e_left / total, 1 / total, e_right / total)
    value = (posterior[0] * mu[:, 0] + posterior[1] * mu[:, 1] + posterior[2] * mu[:, 2]).detach()
    components = torch.stack([plan.left, plan.top, plan.right], 1).to(means.device)
    grad_means = means.new_zeros(k + 1)
    grad_log_mixing = means.new_zeros(k + 1)
    for c in range(3):
        weighted = grad * posterior[c]
        d_joint = weighted * (mu[:, c] - value) / temperature
        per_mean = weighted + d_joint * (flat - mu[:, c]) / variance
        grad_means.index_add_(0, components[:, c], torch.bincount(bucket, per_mean, minlength=buckets).to(means.dtype))
        grad_log_mixing.index_add_(0, components[:, c], torch.bincount(bucket, d_joint, minlength=buckets).to(means.dtype))
    return grad_means[:k], grad_log_mixing[:k]


class _MixtureReadout(torch.autograd.Function):
    """``Σ_k softmax(z(w))_k μ_k`` with a hand-written backward; nothing ``(n, K)`` is kept.

    Gradients (``g`` the upstream gradient per weight, ``r`` the sharpened posterior,
    ``v`` the read-out): ``∂L/∂w = g`` (straight-through); ``∂L/∂ℓ_k = g·r_k(μ_k − v)/T``
    for the log-joint ``ℓ_k``; ``∂ℓ_k/∂μ_k = (w − μ_k)/σ²``, so
    ``∂L/∂μ_k = Σ g·r_k + Σ ∂L/∂ℓ_k·(w − μ_k)/σ²``; ``∂L/∂log π_k = Σ ∂L/∂ℓ_k``, mapped
    through ``log_softmax`` to the mixing logits.

    Fast path: when :func:`neighbour_plan` finds that only the top component and its two
    envelope neighbours carry posterior mass (to ``e^-20``, below float32 resolution),
    ``r`` is computed over those three per weight (``O(n)``) and the sums over weights
    are taken per envelope bucket; otherwise over all ``K`` in chunks.
    """

    @staticmethod
    def forward(ctx, weight, means, mixing_logits, std, temperature, use_plan):  # noqa: D102
        flat = weight.detach().reshape(-1)
        mu = means.detach()
        plan = neighbour_plan(*mixture_lines(mu, mixing_logits, float(std), temperature)) if use_plan else None
        saved: tuple[torch.Tensor, ...] = ()
        if plan is not None:
            out, *saved = _neighbour_forward(flat, plan, mu)
        else:
            log_mixing = torch.log_softmax(mixing_logits.detach(), 0)
            out = torch.empty_like(flat)
            step = _chunk(mu.numel())
            for s in range(0, flat.numel(), step):
                out[s : s + step] = torch.softmax(component_logits(flat[s : s + step], mu, log_mixing, std, temperature), 1) @ mu
        ctx.save_for_backward(flat, mu, mixing_logits.detach(), std, *saved)
        ctx.temperature, ctx.plan = temperature, plan
        return out.reshape(weight.shape)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        flat, mu, mixing_logits, std, *saved = ctx.saved_tensors
        temperature, plan = ctx.temperature, ctx.plan
        g = grad.reshape(-1)
        grad_means = grad_mixing = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            k = mu.numel()
            log_mixing = torch.log_softmax(mixing_logits, 0)
            variance = std**2
            if plan is not None:
                grad_means, grad_log_mixing = _neighbour_backward(flat, g, tuple(saved), plan, mu, temperature, variance)
            else:
                grad_means = torch.zeros_like(mu)
                grad_log_mixing = torch.zeros_like(mu)
                for s in range(0, flat.numel(), _chunk(k)):
                    w = flat[s : s + _chunk(k)].reshape(-1, 1)
                    gc = g[s : s + _chunk(k)].reshape(-1, 1)
                    r = torch.softmax(component_logits(w, mu, log_mixing, std, temperature), 1)
                    value = r @ mu
                    d_joint = gc * r * (mu - value.reshape(-1, 1)) / temperature
                    grad_means += (gc * r).sum(0) + (d_joint * (w - mu)).sum(0) / variance
                    grad_log_mixing += d_joint.sum(0)
            grad_mixing = grad_log_mixing - log_mixing.exp() * grad_log_mixing.sum()
        grad_weight = grad if ctx.needs_input_grad[0] else None
        return grad_weight, grad_means, grad_mixing, None, None, None


def mixture_readout(
    weight: torch.Tensor,
    means: torch.Tensor,
    mixing_logits: torch.Tensor,
    std: torch.Tensor,
    temperature: float,
    use_plan: bool = True,
) -> torch.Tensor:
    """Sharpened-posterior codebook read-out ``ŵ = Σ_k r_k(w) μ_k`` (METHODS § SQS).

    ``r = softmax((log π_k + log N(w; μ_k, σ²)) / T)``, ``π = softmax(mixing_logits)``,
    one fixed ``σ`` shared by the components. The value is the soft assignment; the
    gradient w.r.t. ``weight`` is straight-through (identity); ``means`` and
    ``mixing_logits`` get the exact gradient.

    Args:
        weight: full-precision weights, any shape.
        means: ``(K,)`` codebook means ``μ``.
        mixing_logits: ``(K,)`` logits of the mixing weights ``π``.
        std: scalar tensor ``σ``.
        temperature: ``T > 0``.
        use_plan: allow the three-component fast path (same result to ``e^-20``).

    Returns:
        A tensor shaped like ``weight``.
    """
    return _MixtureReadout.apply(weight, means, mixing_logits, std, float(temperature), use_plan)


def most_likely_component(weight: torch.Tensor, means: torch.Tensor, mixing_logits: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``argmax_k r_k(w)`` (no temperature changes it), shaped like ``weight``."""
    flat = weight.detach().reshape(-1)
    log_mixing = torch.log_softmax(mixing_logits.detach(), 0)
    out = torch.empty(flat.shape, dtype=torch.long, device=flat.device)
    step = _chunk(means.numel())
    for s in range(0, flat.numel(), step):
        out[s : s + step] = component_logits(flat[s : s + step], means.detach(), log_mixing, std, 1.0).argmax(1)
    return out.reshape(weight.shape)


def sample_component(
    weight: torch.Tensor,
    means: torch.Tensor,
    mixing_logits: torch.Tensor,
    std: torch.Tensor,
    temperature: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One draw ``k ~ softmax(ℓ(w) / temperature)`` per weight, shaped like ``weight``."""
    flat = weight.detach().reshape(-1)
    log_mixing = torch.log_softmax(mixing_logits.detach(), 0)
    out = torch.empty(flat.shape, dtype=torch.long, device=flat.device)
    step = _chunk(means.numel())
    for s in range(0, flat.numel(), step):
        probabilities = torch.softmax(component_logits(flat[s : s + step], means.detach(), log_mixing, std, temperature), 1)
        out[s : s + step] = torch.multinomial(probabilities, 1, generator=generator).reshape(-1)
    return out.reshape(weight.shape)


def bernoulli_kl(logits: torch.Tensor, prior_keep: float) -> torch.Tensor:
    """Elementwise ``KL(Bern(sigmoid(logits)) ‖ Bern(prior_keep))`` in nats, computed stably."""
    keep = torch.sigmoid(logits)
    log_keep = F.logsigmoid(logits)
    log_drop = F.logsigmoid(-logits)
    return keep * (log_keep - math.log(prior_keep)) + (1 - keep) * (log_drop - math.log1p(-prior_keep))


def global_prune_masks(scores: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Keep-masks removing exactly ``round(sparsity · total)`` lowest scores across tensors.

    One threshold over all tensors pooled (global ranking); ties at the threshold are
    broken by position. Give already-pruned entries a negative score (the others are
    ``>= 0``) so that they are removed first and pruning stays monotone.

    Args:
        scores: one score tensor per layer.
        sparsity: fraction of all entries to remove, in ``[0, 1)``.

    Returns:
        One bool keep-mask per score tensor.
    """
    flat = torch.cat([s.detach().reshape(-1).float() for s in scores])
    remove = int(round(sparsity * flat.numel()))
    if remove <= 0:
        keep = torch.ones_like(flat, dtype=torch.bool)
    else:
        threshold = flat.kthvalue(remove).values
        below = flat < threshold
        keep = ~below
        missing = remove - int(below.sum())
        if missing > 0:
            tied = (flat == threshold).nonzero().reshape(-1)[:missing]
            keep[tied] = False
    out, offset = [], 0
    for s in scores:
        out.append(keep[offset : offset + s.numel()].reshape(s.shape))
        offset += s.numel()
    return out


# ---- the parametrization ----------------------------------------------------------------
class MixtureGateWeight(CompressedWeight):
    """``W -> (Σ_k r_k(W) μ_k) · γ ⊙ mask`` for one layer (see the module docstring).

    Args:
        weight: the layer's initial weight (k-means init, shapes).
        components: ``K``, the codebook size.
        gate_temperature: ``τ_g`` of ``γ = sigmoid(p / τ_g)``.
        gate_init: initial keep probability ``γ``.
        assign_temperature: ``T`` of the sharpened posterior.
        kmeans_iters: Lloyd iterations of the init.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        components: int,
        gate_temperature: float = 0.01,
        gate_init: float = 0.993,
        assign_temperature: float = 0.001,
        kmeans_iters: int = 20,
    ) -> None:
        super().__init__()
        w = weight.detach()
        centroids = kmeans_1d(w, components, kmeans_iters)
        self.codebook_means = nn.Parameter(centroids.clone())
        self.mixing_logits = nn.Parameter(torch.zeros_like(centroids))
        spread = float(w.max() - w.min())
        std = max(pooled_std(w, centroids), 1e-3 * spread, 1e-8)
        self.register_buffer("component_std", torch.tensor(std, dtype=w.dtype, device=w.device))
        logit = math.log(gate_init / (1 - gate_init))
        self.gate_logits = nn.Parameter(torch.full_like(w, gate_temperature * logit))
        self.register_buffer("mask", torch.ones_like(w, dtype=torch.bool))
        self.gate_temperature = gate_temperature
        self.assign_temperature = assign_temperature
        self.hard_gates = False
        self.last_readout: torch.Tensor | None = None
        self.kept_gate_sum: float | None = None  # Σ γ over kept weights at the last penalty

    @property
    def components(self) -> int:
        return self.codebook_means.numel()

    def keep_probability(self) -> torch.Tensor:
        """``γ = sigmoid(p / τ_g)``."""
        return torch.sigmoid(self.gate_logits / self.gate_temperature)

    def readout(self, weight: torch.Tensor) -> torch.Tensor:
        """``ŵ = Σ_k r_k(W) μ_k`` (straight-through in ``W``)."""
        return mixture_readout(weight, self.codebook_means, self.mixing_logits, self.component_std, self.assign_temperature)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        value = self.readout(weight)
        self.last_readout = value.detach()
        mask = self.mask.to(value.dtype)
        if self.hard_gates:
            return value * mask
        return value * self.keep_probability() * mask

    @torch.no_grad()
    def score(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Global-ranking score ``|ŵ|·γ`` (``γ = 1`` once gates are read out); ``-1`` where pruned."""
        value = self.last_readout if weight is None and self.last_readout is not None else self.readout(weight)
        gate = torch.ones_like(value) if self.hard_gates else self.keep_probability()
        return torch.where(self.mask, value.abs() * gate, torch.full_like(value, -1.0))

    def gate_kl(self, prior_keep: float) -> torch.Tensor:
        """``Σ_j KL(Bern(γ_j) ‖ Bern(λ))`` over kept gates (0 once gates are read out)."""
        if self.hard_gates:
            return self.gate_logits.new_zeros(())
        logits = self.gate_logits / self.gate_temperature
        kept = self.mask.to(logits.dtype)
        with torch.no_grad():
            self.kept_gate_sum = float((torch.sigmoid(logits) * kept).sum())
        return (bernoulli_kl(logits, prior_keep) * kept).sum()

    @torch.no_grad()
    def export_means(self) -> torch.Tensor:
        """Codebook means rounded to float16 (stored at 16 bits), never exactly 0."""
        means = fp16_exact(self.codebook_means)
        tiny = torch.where(self.codebook_means < 0, -FP16_TINY, FP16_TINY).to(means.dtype)
        return torch.where(means == 0, tiny, means)

    @torch.no_grad()
    def harden(self, weight: torch.Tensor) -> torch.Tensor:
        """Most likely component's (fp16-exact) mean per weight; pruned weights exactly 0."""
        index = most_likely_component(weight, self.codebook_means, self.mixing_logits, self.component_std)
        return self.export_means()[index] * self.mask.to(weight.dtype)

    @torch.no_grad()
    def sample(self, weight: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """One posterior draw: component from the GMM posterior, gate from ``Bernoulli(γ)``."""
        index = sample_component(weight, self.codebook_means, self.mixing_logits, self.component_std, temperature, generator)
        keep = self.mask
        if not self.hard_gates:
            draw = torch.rand(weight.shape, generator=generator, device=weight.device, dtype=weight.dtype)
            keep = keep & (draw < self.keep_probability())
        return self.export_means()[index] * keep.to(weight.dtype)

    def spec(self, weight: torch.Tensor) -> LayerSpec:
        return LayerSpec(
            pattern=Unstructured(),
            grid="codebook",
            bits=int(math.log2(self.components)),
            granularity="tensor",
            scale_values=self.components,
        )


# ---- the compressor ---------------------------------------------------------------------
class Sqs(Compressor):
    """SQS: spike-and-slab keep gates + a GMM codebook per layer, variational training.

    Args:
        w_bits: codebook bits, ``K = 2^w_bits`` components (1..8).
        target_sparsity: final fraction of compressed weights pruned, in ``[0, 1)``.
        initial_sparsity: ``s_i`` of the cubic schedule, in ``[0, target_sparsity]``.
        prune_start, prune_end: schedule start / end as fractions of training.
        gate_temperature: ``τ_g`` of the gates (> 0).
        gate_init: initial keep probability, in ``(0.5, 1)``.
        assign_temperature: temperature of the sharpened posterior (> 0).
        prior_keep: prior keep probability ``λ`` of the gates, in ``(0, 1)``.
        mean_prior_std: ``σ0`` of the Gaussian prior on the codebook means (> 0).
        kl_weight: scale of the KL terms; ``None`` uses ``1 / num_train`` (set by the
            pipeline before ``prepare``; 1.0 when unknown).
        n_samples: sampled networks for Bayesian averaging (0 disables it).
        sample_temperature: temperature of the posterior the samples are drawn from
            (1.0 = the GMM posterior itself; the default 0.1 is a choice measured on
            digits/ResNet-18, where 1.0 collapses the 2-bit ensemble, see
            ``experiments/sqs_digits_resnet18.md``).
        hard_gates_after_prune: read the gates out (``γ = 1`` for kept weights) once the
            schedule reaches ``prune_end``.
        kmeans_iters: Lloyd iterations of the codebook init.
        gate_lr, codebook_lr: learning rates of the gate logits and of the codebook
            (means and mixing logits); ``None`` uses the run's optimizer default.
        compress_first, compress_classifier: see :class:`Compressor` (SQS compresses
            every conv including the first, not the classifier).
    """

    name = "sqs"

    def __init__(
        self,
        w_bits: int = 4,
        target_sparsity: float = 0.5,
        initial_sparsity: float = 0.0,
        prune_start: float = 0.1,
        prune_end: float = 0.8,
        gate_temperature: float = 0.01,
        gate_init: float = 0.993,
        assign_temperature: float = 0.001,
        prior_keep: float = 0.01,
        mean_prior_std: float = 3.0,
        kl_weight: float | None = None,
        n_samples: int = 8,
        sample_temperature: float = 0.1,
        hard_gates_after_prune: bool = True,
        kmeans_iters: int = 20,
        gate_lr: float | None = None,
        codebook_lr: float | None = None,
        compress_first: bool = True,
        compress_classifier: bool = False,
    ) -> None:
        super().__init__(compress_first, compress_classifier)
        self.w_bits = check_bits(w_bits)
        self.components = 2**self.w_bits
        self.target_sparsity = check_range("target_sparsity", target_sparsity, 0.0, 1.0, high_open=True)
        self.initial_sparsity = check_range("initial_sparsity", initial_sparsity, 0.0, self.target_sparsity)
        self.prune_start = check_range("prune_start", prune_start, 0.0, 1.0)
        self.prune_end = check_range("prune_end", prune_end, 0.0, 1.0)
        if self.prune_start >= self.prune_end:
            raise ConfigError("prune_start", prune_start, f"a number below prune_end={prune_end}")
        self.gate_temperature = check_range("gate_temperature", gate_temperature, 0.0, low_open=True)
        self.gate_init = check_range("gate_init", gate_init, 0.5, 1.0, low_open=True, high_open=True)
        self.assign_temperature = check_range("assign_temperature", assign_temperature, 0.0, low_open=True)
        self.prior_keep = check_range("prior_keep", prior_keep, 0.0, 1.0, low_open=True, high_open=True)
        self.mean_prior_std = check_range("mean_prior_std", mean_prior_std, 0.0, low_open=True)
        self.kl_weight = None if kl_weight is None else check_range("kl_weight", kl_weight, 0.0)
        self.n_samples = _check_count("n_samples", n_samples)
        self.sample_temperature = check_range("sample_temperature", sample_temperature, 0.0, low_open=True)
        self.hard_gates_after_prune = bool(hard_gates_after_prune)
        self.kmeans_iters = _check_count("kmeans_iters", kmeans_iters)
        groups = {"gate_logits": {"weight_decay": 0.0}, "codebook_means": {"weight_decay": 0.0}, "mixing_logits": {"weight_decay": 0.0}}
        if gate_lr is not None:
            groups["gate_logits"]["lr"] = check_range("gate_lr", gate_lr, 0.0, low_open=True)
        if codebook_lr is not None:
            lr = check_range("codebook_lr", codebook_lr, 0.0, low_open=True)
            groups["codebook_means"]["lr"] = groups["mixing_logits"]["lr"] = lr
        self.optim_groups = groups
        self.num_train: int | None = None
        self.n_calib = 0  # finalize needs no calibration data
        self.current_sparsity = 0.0
        self.ensemble: list[dict[str, torch.Tensor]] = []
        self.layer_extras: dict[str, dict] = {}
        self.extra_results: dict[str, float] = {}

    # ---- hooks ------------------------------------------------------------------------
    def make_parametrization(self, name: str, weight: torch.Tensor) -> CompressedWeight | None:
        return MixtureGateWeight(weight, self.components, self.gate_temperature, self.gate_init, self.assign_temperature, self.kmeans_iters)

    def prepare(self, model: nn.Module, targets: Iterable[str]) -> nn.Module:
        model = super().prepare(model, targets)
        if self.initial_sparsity > 0:
            self.update_masks(self.initial_sparsity)
        return model

    def effective_kl_weight(self) -> float:
        """``kl_weight``, or ``1 / num_train`` when it is ``None`` (1.0 if unknown)."""
        if self.kl_weight is not None:
            return self.kl_weight
        return 1.0 / self.num_train if self.num_train else 1.0

    def penalty(self) -> torch.Tensor | float:
        """``kl_weight · [Σ gate KL + Σ_k μ_k² / (2σ0²)]`` over all compressed layers."""
        weight = self.effective_kl_weight()
        if not self.layers or weight == 0:
            return 0.0
        terms = []
        for p in self.layers.values():
            terms.append(p.gate_kl(self.prior_keep))
            terms.append(p.codebook_means.pow(2).sum() / (2 * self.mean_prior_std**2))
        return weight * torch.stack(terms).sum()

    def on_step(self, step: int, total: int) -> None:
        """Advance the cubic schedule; prune globally when the target count grows."""
        progress = (step + 1) / max(total, 1)
        target = cubic_sparsity(progress, self.initial_sparsity, self.target_sparsity, self.prune_start, self.prune_end)
        if target > self.current_sparsity:
            self.update_masks(target)
        if self.hard_gates_after_prune and progress >= self.prune_end:
            for p in self.layers.values():
                p.hard_gates = True

    def finalize(self, model: nn.Module, calib_batches: Iterable | None = None) -> nn.Module:
        """Prune to the final target, draw the ensemble, export the most likely means."""
        self.update_masks(self.target_sparsity, fresh=True)
        self.ensemble = self.draw_ensemble()
        for name, p in self.layers.items():
            kept = p.mask
            with torch.no_grad():
                gate_mean = float(p.keep_probability()[kept].mean()) if kept.any() else 0.0
            self.layer_extras[name] = {
                "codebook_size": p.components,
                "gate_mean_kept": gate_mean,
                "mask_sparsity": 1.0 - float(kept.float().mean()),
            }
        total = sum(p.mask.numel() for p in self.layers.values())
        pruned = sum(int((~p.mask).sum()) for p in self.layers.values())
        self.extra_results = {
            "sqs/mask_sparsity": pruned / max(total, 1),
            "sqs/kl_weight": self.effective_kl_weight(),
            "sqs/ensemble_size": float(len(self.ensemble)),
        }
        return super().finalize(model, calib_batches)

    # ---- helpers ----------------------------------------------------------------------
    @torch.no_grad()
    def update_masks(self, sparsity: float, fresh: bool = False) -> None:
        """Global pruning to ``sparsity`` by ``|ŵ|·γ``; pruned weights stay pruned.

        Args:
            sparsity: target fraction over all compressed weights.
            fresh: recompute ``ŵ`` from the current weights instead of the cached forward.
        """
        if not self.layers:
            self.current_sparsity = sparsity
            return
        names = list(self.layers)
        cached = not fresh and all(self.layers[n].last_readout is not None for n in names)
        scores = [self.layers[n].score(None if cached else self.weight_of(n)) for n in names]
        masks = global_prune_masks(scores, sparsity)
        for name, mask in zip(names, masks):
            self.layers[name].mask.copy_(mask & self.layers[name].mask)
        self.current_sparsity = sparsity

    def weight_of(self, name: str) -> torch.Tensor:
        """The trainable full-precision weight ``W`` of a compressed layer."""
        return self.modules[name].parametrizations.weight.original

    @torch.no_grad()
    def draw_ensemble(self) -> list[dict[str, torch.Tensor]]:
        """``n_samples`` sampled networks (targeted weights only) for Bayesian averaging."""
        out = []
        for _ in range(self.n_samples):
            out.append({n: p.sample(self.weight_of(n).detach(), self.sample_temperature) for n, p in self.layers.items()})
        return out

    def stats(self) -> dict[str, float]:
        if not self.layers:
            return {}
        with torch.no_grad():
            kept = sum(
                p.kept_gate_sum if p.kept_gate_sum is not None else float(p.keep_probability()[p.mask].sum()) for p in self.layers.values()
            )
            count = sum(int(p.mask.sum()) for p in self.layers.values())
        return {"sparsity_target": self.current_sparsity, "gate_mean_kept": kept / max(count, 1)}

    def setting(self) -> str:
        return f"{round(100 * self.target_sparsity)}% unstructured w{self.w_bits}"


def _check_count(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(key, value, "an integer >= 0")
    return value
