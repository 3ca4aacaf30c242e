"""SQS mixture math, pure functions: the Gaussian-mixture codebook and the keep gates.

Sparse Quantized Sub-distributions (Wang, Jiang, Lin, Song; arXiv 2510.08999) quantize a
layer with a ``K``-component Gaussian mixture whose means ``μ_k`` are the codebook
(METHODS.md, SQS). Here, for one tensor of weights ``w``:

* :func:`kmeans_1d` — the codebook init: 1-D k-means with the outer centroids pinned at
  ``min(W)`` and ``max(W)``; :func:`pooled_std` — the maximum-likelihood ``σ`` of an
  equal-variance mixture on those centroids (the one fixed ``σ`` shared by all
  components, a choice the paper leaves open).
* :func:`component_logits` — the sharpened log-posterior
  ``(log π_k − (w − μ_k)² / 2σ²) / T``; :func:`mixture_readout` — the soft read-out
  ``ŵ = Σ_k r_k(w) μ_k`` with ``r = softmax(logits)``, straight-through in ``w`` and
  with the exact gradient in ``μ`` and the mixing logits.
* With a shared ``σ`` the logits are lines in ``w`` (:func:`mixture_lines`), so the
  top component is read off their upper envelope (:func:`upper_envelope`) and, when the
  others are ``PLAN_MARGIN`` nats below, only the top one and its two envelope
  neighbours carry mass (:func:`neighbour_plan`): an ``O(n)`` exact fast path.
* :func:`most_likely_component` (the deterministic read-out), :func:`sample_component`
  (a posterior draw) and :func:`bernoulli_kl` (the spike-and-slab gate KL
  ``KL(Bern(γ) ‖ Bern(λ))``).
* One layer's codebook and gates: :func:`init_codebook`, :func:`gate_logit` (``p`` with
  ``sigmoid(p / τ_g) = γ``), :func:`fp16_codebook` (the stored 16-bit codebook) and
  :func:`gated_score` (the global-ranking score ``|ŵ|·γ``).

The schedule and the global ranking are pruning, not mixture math:
:func:`slope_bench.sparsity.cubic_sparsity` and
:func:`slope_bench.sparsity.global_prune_masks`. The method is
:mod:`slope_bench.methods.sqs`.

Example::

    means = kmeans_1d(w, 16)
    std = torch.tensor(pooled_std(w, means))
    w_hat = mixture_readout(w, means, torch.zeros(16), std, temperature=0.001)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slope_bench.quant import FP16_TINY, fp16_exact

# Elements of one (chunk, K) intermediate in the chunked mixture computations.
CHUNK_ELEMENTS = 1 << 22
# Logit gap below which a component left out of the three-component fast path would
# still matter (posterior weight e^-20 ≈ 2e-9, below float32 resolution).
PLAN_MARGIN = 20.0
# ln of float32's smallest normal number (1.18e-38) is -87.34: exp below this is 0 or subnormal.
EXP_FLOOR = -87.3


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
    b, a = slopes.tolist(), intercepts.tolist()
    lines, breaks = upper_envelope(slopes, intercepts)
    m = len(lines)
    # both ends of every bucket; an infinite end is replaced by the finite one (the gap is
    # monotone towards it), a single bucket by w = 0 (every gap is then constant). Plain
    # floats (K is at most a few dozen): this runs at every forward of every layer.
    ends = [(0.0, 0.0)] if m == 1 else list(zip([breaks[0], *breaks], [*breaks, breaks[-1]], strict=True))
    for j, top in enumerate(lines):
        near = {top, lines[j - 1] if j > 0 else top, lines[j + 1] if j < m - 1 else top}
        for w in ends[j]:
            best = a[top] + b[top] * w
            if any(best - (a[c] + b[c] * w) < margin for c in range(k) if c not in near):
                return None
    inf = math.inf
    f64 = torch.float64
    return NeighbourPlan(
        torch.tensor(breaks, dtype=f64),
        torch.tensor(lines),
        torch.tensor([lines[j - 1] if j > 0 else k for j in range(m)]),
        torch.tensor([lines[j + 1] if j < m - 1 else k for j in range(m)]),
        torch.tensor([b[lines[j - 1]] - b[lines[j]] if j > 0 else -1.0 for j in range(m)], dtype=f64),
        torch.tensor([breaks[j - 1] if j > 0 else -inf for j in range(m)], dtype=f64),
        torch.tensor([b[lines[j + 1]] - b[lines[j]] if j < m - 1 else 1.0 for j in range(m)], dtype=f64),
        torch.tensor([breaks[j] if j < m - 1 else inf for j in range(m)], dtype=f64),
    )


def exp_or_zero(x: torch.Tensor) -> torch.Tensor:
    """``exp(x)``, with 0 where it falls below float32's smallest normal number (``x < EXP_FLOOR``).

    Far-away components have logits thousands of nats below the top one at the sharp
    SQS temperature: a CPU's vectorised ``exp`` takes a slow path (about 10x) for such
    arguments and returns 0 or a subnormal anyway.
    """
    return torch.where(x >= EXP_FLOOR, torch.exp(x.clamp_min(EXP_FLOOR)), 0.0)


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
    e_left = exp_or_zero(row[:, 0] * (flat - row[:, 1]))
    e_right = exp_or_zero(row[:, 2] * (flat - row[:, 3]))
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
    use_plan: bool | None = None,
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
        use_plan: allow the three-component fast path (same result to ``e^-20``);
            ``None``: on a CPU only (its plan is built on the host, so on a GPU the
            read-out stays on the device, nothing created on the CPU per forward).

    Returns:
        A tensor shaped like ``weight``.
    """
    use_plan = weight.device.type == "cpu" if use_plan is None else use_plan
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
    """One draw ``k ~ softmax(ℓ(w) / temperature)`` per weight, shaped like ``weight``.

    By inverse CDF: ``k`` is the number of cumulative posteriors ``≤ u·total`` for one
    uniform ``u`` per weight (a component of probability 0 is never drawn); the same
    distribution as ``torch.multinomial`` at about half its cost on a CPU.
    """
    flat = weight.detach().reshape(-1)
    log_mixing = torch.log_softmax(mixing_logits.detach(), 0)
    out = torch.empty(flat.shape, dtype=torch.long, device=flat.device)
    k = means.numel()
    step = _chunk(k)
    for s in range(0, flat.numel(), step):
        cumulative = torch.softmax(component_logits(flat[s : s + step], means.detach(), log_mixing, std, temperature), 1).cumsum_(1)
        u = torch.rand((cumulative.shape[0], 1), generator=generator, dtype=cumulative.dtype, device=cumulative.device)
        out[s : s + step] = (cumulative <= u * cumulative[:, -1:]).sum(1).clamp_max_(k - 1)
    return out.reshape(weight.shape)


def bernoulli_kl(logits: torch.Tensor, prior_keep: float) -> torch.Tensor:
    """Elementwise ``KL(Bern(sigmoid(logits)) ‖ Bern(prior_keep))`` in nats, computed stably."""
    keep = torch.sigmoid(logits)
    log_keep = F.logsigmoid(logits)
    log_drop = F.logsigmoid(-logits)
    return keep * (log_keep - math.log(prior_keep)) + (1 - keep) * (log_drop - math.log1p(-prior_keep))


# ---- codebook and gates of one layer -------------------------------------------------------
def init_codebook(weight: torch.Tensor, k: int, iters: int = 20) -> tuple[torch.Tensor, float]:
    """Initial codebook of one layer: ``(means, σ)``.

    ``means`` is :func:`kmeans_1d` of the weights (outer centroids at ``min``/``max``);
    ``σ`` is their :func:`pooled_std`, floored at ``1e-3 · (max − min)`` and ``1e-8`` so
    that a degenerate layer (all weights in one cluster) keeps a usable posterior.
    """
    w = weight.detach()
    centroids = kmeans_1d(w, k, iters)
    spread = float(w.max() - w.min())
    return centroids, max(pooled_std(w, centroids), 1e-3 * spread, 1e-8)


def gate_logit(keep_probability: float, temperature: float) -> float:
    """The gate parameter ``p`` with ``sigmoid(p / τ_g) = keep_probability``."""
    return temperature * math.log(keep_probability / (1 - keep_probability))


def fp16_codebook(means: torch.Tensor) -> torch.Tensor:
    """Codebook means rounded to float16 (stored at 16 bits), never exactly 0: a mean that
    rounds to 0 becomes ``±FP16_TINY`` (its sign), so that kept weights stay nonzero."""
    rounded = fp16_exact(means)
    tiny = torch.where(means < 0, -FP16_TINY, FP16_TINY).to(rounded.dtype)
    return torch.where(rounded == 0, tiny, rounded)


def gated_score(value: torch.Tensor, gate: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
    """Global-ranking score ``|ŵ|·γ`` (``gate=None``: ``γ = 1``), ``−1`` where ``mask`` is
    False, so that already-pruned weights are removed first by
    :func:`slope_bench.sparsity.global_prune_masks`."""
    score = value.abs() if gate is None else value.abs() * gate
    return torch.where(mask, score, torch.full_like(value, -1.0))


def kept_gate_kl(logits: torch.Tensor, mask: torch.Tensor, prior_keep: float) -> tuple[torch.Tensor, float]:
    """``Σ_j KL(Bern(γ_j) ‖ Bern(λ))`` over the kept gates (``mask``), ``γ = sigmoid(logits)``.

    Returns:
        ``(kl, Σ γ over kept)``: the differentiable KL and, as a float, the kept keep
        probabilities' sum (logged as the mean kept gate).
    """
    kept = mask.to(logits.dtype)
    with torch.no_grad():
        kept_sum = float((torch.sigmoid(logits) * kept).sum())
    return (bernoulli_kl(logits, prior_keep) * kept).sum(), kept_sum


def sample_weights(
    weight: torch.Tensor,
    means: torch.Tensor,
    mixing_logits: torch.Tensor,
    std: torch.Tensor,
    temperature: float,
    mask: torch.Tensor,
    keep_probability: torch.Tensor | None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One posterior draw of a layer: a component per weight (:func:`sample_component`),
    its 16-bit mean (:func:`fp16_codebook`), zero where ``mask`` is False and, with soft
    gates (``keep_probability`` given), where a ``Bernoulli(γ)`` draw drops the weight."""
    index = sample_component(weight, means, mixing_logits, std, temperature, generator)
    keep = mask
    if keep_probability is not None:
        draw = torch.rand(weight.shape, generator=generator, device=weight.device, dtype=weight.dtype)
        keep = keep & (draw < keep_probability)
    return fp16_codebook(means)[index] * keep.to(weight.dtype)
