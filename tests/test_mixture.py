"""SQS mixture math (slope_bench.mixture): k-means init, the sharpened read-out and its
gradients (fast path and full), the gate KL, the 16-bit codebook, scores and samples."""

from __future__ import annotations

import math

import pytest
import torch

from slope_bench.mixture import (
    bernoulli_kl,
    component_logits,
    exp_or_zero,
    fp16_codebook,
    gate_logit,
    gated_score,
    init_codebook,
    kept_gate_kl,
    kmeans_1d,
    mixture_lines,
    mixture_readout,
    most_likely_component,
    neighbour_plan,
    pooled_std,
    sample_component,
    sample_weights,
    upper_envelope,
)
from slope_bench.quant import FP16_TINY, fp16_exact


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread avoids oversubscription on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference_readout(weight, means, mixing_logits, std, temperature):
    """Plain-autograd version of the read-out: soft value, straight-through in ``w``."""
    r = torch.softmax(component_logits(weight.detach(), means, torch.log_softmax(mixing_logits, 0), std, temperature), 1)
    value = (r @ means).reshape(weight.shape)
    return value + weight - weight.detach()


# ---- k-means init ----------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 4, 16, 256])
def test_kmeans_centroids_inside_range_with_outer_ones_at_the_ends(k: int) -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 32, 3, 3) * 0.05
    c = kmeans_1d(w, k, 20)
    assert c.shape == (k,)
    assert c[0] == w.min() and c[-1] == w.max()
    assert bool((c >= w.min()).all()) and bool((c <= w.max()).all())
    assert bool((c[1:] >= c[:-1]).all())


def test_kmeans_recovers_separated_clusters() -> None:
    torch.manual_seed(0)
    centres = torch.tensor([-1.0, -0.3, 0.4, 1.0])
    values = (centres.repeat_interleave(500) + 0.01 * torch.randn(2000)).clamp(-1.03, 1.03)
    c = kmeans_1d(values, 4, 50)
    # interior centroids land on the cluster means; outer ones are pinned at min/max
    assert torch.allclose(c[1:3], centres[1:3], atol=3e-3)
    assert c[0] == values.min() and c[-1] == values.max()
    assert abs(pooled_std(values, c) - 0.01) < 0.02


def test_kmeans_edge_cases() -> None:
    w = torch.tensor([0.5, -0.25, 0.1])
    assert torch.allclose(kmeans_1d(w, 1), w.mean().reshape(1))
    same = kmeans_1d(torch.full((10,), 0.3), 4)
    assert torch.allclose(same, torch.full((4,), 0.3))
    with pytest.raises(ValueError):
        kmeans_1d(w, 0)


# ---- the mixture read-out ----------------------------------------------------------------
def test_upper_envelope_gives_the_argmax_line() -> None:
    torch.manual_seed(0)
    slopes, intercepts = torch.randn(12, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    lines, breaks = upper_envelope(slopes, intercepts)
    assert len(breaks) == len(lines) - 1 and breaks == sorted(breaks)
    x = torch.linspace(-20, 20, 4001, dtype=torch.float64)
    best = (intercepts + slopes * x.reshape(-1, 1)).argmax(1)
    bucket = torch.bucketize(x, torch.tensor(breaks, dtype=torch.float64))
    assert torch.equal(torch.tensor(lines)[bucket], best)


@pytest.mark.parametrize("k", [2, 4, 16])
@pytest.mark.parametrize("temperature", [0.001, 0.05])
def test_fast_read_out_matches_the_full_computation(k: int, temperature: float) -> None:
    torch.manual_seed(k)
    w = torch.randn(20000) * 0.05
    means = kmeans_1d(w, k)
    std = torch.tensor(pooled_std(w, means))
    mixing = 0.3 * torch.randn(k)
    assert neighbour_plan(*mixture_lines(means, mixing, float(std), temperature)) is not None
    grads = []
    upstream = torch.randn(20000, generator=torch.Generator().manual_seed(1))
    for fast in (True, False):
        mu, pi, ww = means.clone().requires_grad_(), mixing.clone().requires_grad_(), w.clone().requires_grad_()
        out = mixture_readout(ww, mu, pi, std, temperature, use_plan=fast)
        (out * upstream).sum().backward()
        grads.append((out.detach(), mu.grad, pi.grad, ww.grad))
    for fast_value, full_value in zip(*grads):
        assert torch.allclose(fast_value, full_value, rtol=2e-3, atol=2e-3 * float(full_value.abs().max()))


@pytest.mark.parametrize("use_plan", [True, False])
def test_read_out_gradients_match_plain_autograd(use_plan: bool) -> None:
    torch.manual_seed(0)
    w = (torch.randn(3000) * 0.05).double()
    means = kmeans_1d(w, 8).double()
    std = torch.tensor(pooled_std(w, means), dtype=torch.float64)
    mixing = (0.3 * torch.randn(8)).double()
    temperature = 0.02  # soft enough that the sharpened softmax has real gradients
    upstream = torch.randn(3000, dtype=torch.float64)
    results = []
    for fn in (lambda *a: mixture_readout(*a, use_plan=use_plan), reference_readout):
        mu, pi, ww = means.clone().requires_grad_(), mixing.clone().requires_grad_(), w.clone().requires_grad_()
        out = fn(ww, mu, pi, std, temperature)
        (out * upstream).sum().backward()
        results.append((out.detach(), mu.grad, pi.grad, ww.grad))
    for ours, reference in zip(*results):
        assert torch.allclose(ours, reference, rtol=1e-6, atol=1e-9)
    # the weight gradient is straight-through; the codebook gradients are not trivial
    assert torch.equal(results[0][3], upstream)
    assert results[0][1].abs().sum() > 0 and results[0][2].abs().sum() > 0


def test_sharp_read_out_is_the_most_likely_mean() -> None:
    torch.manual_seed(0)
    w = torch.randn(5000) * 0.05
    means = kmeans_1d(w, 16)
    std = torch.tensor(pooled_std(w, means))
    mixing = 0.5 * torch.randn(16)
    value = mixture_readout(w, means, mixing, std, 1e-4)
    best = means[most_likely_component(w, means, mixing, std)]
    assert (value - best).abs().le(1e-6).float().mean() > 0.999


# ---- the gate KL ---------------------------------------------------------------------------
def test_bernoulli_kl_formula_and_zero_at_the_prior() -> None:
    logits = torch.linspace(-6, 6, 25, dtype=torch.float64)
    g = torch.sigmoid(logits)
    lam = 0.01
    expected = g * torch.log(g / lam) + (1 - g) * torch.log((1 - g) / (1 - lam))
    assert torch.allclose(bernoulli_kl(logits, lam), expected, atol=1e-12)
    assert float(bernoulli_kl(torch.tensor(math.log(lam / (1 - lam))), lam)) == pytest.approx(0.0, abs=1e-7)
    assert torch.isfinite(bernoulli_kl(torch.tensor([-200.0, 200.0]), lam)).all()


# ---- one layer's codebook and gates ---------------------------------------------------------
def test_init_codebook_is_kmeans_with_a_floored_std() -> None:
    torch.manual_seed(0)
    w = torch.randn(500) * 0.05
    means, std = init_codebook(w, 8, 20)
    assert torch.equal(means, kmeans_1d(w, 8, 20)) and std == pooled_std(w, means)
    same, floor = init_codebook(torch.tensor([0.0, 0.0, 1.0]), 2, 20)
    assert floor == pytest.approx(1e-3) and same.tolist() == [0.0, 1.0]


def test_gate_logit_inverts_the_tempered_sigmoid() -> None:
    p = gate_logit(0.993, 0.01)
    assert float(torch.sigmoid(torch.tensor(p / 0.01, dtype=torch.float64))) == pytest.approx(0.993)


def test_fp16_codebook_rounds_and_never_returns_zero() -> None:
    means = torch.tensor([-0.3, 1e-9, -1e-9, 0.0, 0.12345678])
    out = fp16_codebook(means)
    assert torch.equal(out[[0, 4]], fp16_exact(means[[0, 4]]))
    assert out[1] == FP16_TINY and out[2] == -FP16_TINY and out[3] == FP16_TINY
    assert torch.equal(fp16_exact(out), out)


def test_gated_score_marks_pruned_weights_below_everything() -> None:
    value = torch.tensor([0.5, -0.2, 0.1])
    mask = torch.tensor([True, True, False])
    assert gated_score(value, None, mask).tolist() == pytest.approx([0.5, 0.2, -1.0])
    assert gated_score(value, torch.tensor([0.5, 1.0, 1.0]), mask).tolist() == pytest.approx([0.25, 0.2, -1.0])


def test_kept_gate_kl_sums_over_kept_gates_only() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5], requires_grad=True)
    mask = torch.tensor([True, False, True])
    kl, kept = kept_gate_kl(logits, mask, 0.01)
    expected = bernoulli_kl(logits.detach(), 0.01)[[0, 2]].sum()
    assert float(kl.detach()) == pytest.approx(float(expected))
    assert kept == pytest.approx(float(torch.sigmoid(logits.detach())[[0, 2]].sum()))
    kl.backward()
    assert logits.grad[1] == 0 and logits.grad[0] != 0


def test_sample_weights_take_codebook_values_and_respect_the_mask() -> None:
    torch.manual_seed(0)
    w = torch.randn(400) * 0.05
    means, std = init_codebook(w, 4)
    mixing = torch.zeros(4)
    mask = torch.rand(400) > 0.3
    generator = torch.Generator().manual_seed(1)
    hard = sample_weights(w, means, mixing, torch.tensor(std), 1e-4, mask, None, generator)
    assert bool((hard[~mask] == 0).all())
    assert bool(torch.isin(hard[mask], fp16_codebook(means)).all())
    # at a tiny temperature the draw is the most likely component
    best = fp16_codebook(means)[most_likely_component(w, means, mixing, torch.tensor(std))]
    assert torch.equal(hard[mask], best[mask])
    soft = sample_weights(w, means, mixing, torch.tensor(std), 1e-4, mask, torch.full((400,), 0.5), generator)
    dropped = mask & (soft == 0)
    assert 0.3 < float(dropped.sum()) / float(mask.sum()) < 0.7


def test_sampled_components_follow_the_posterior() -> None:
    """The inverse-CDF draw has the posterior's frequencies (and never a 0-probability component)."""
    w = torch.tensor([0.01, 0.02, 0.05])
    means, mixing, std, temperature = torch.tensor([-0.1, 0.0, 0.03, 0.1]), torch.tensor([0.0, 1.0, 0.0, -1.0]), torch.tensor(0.03), 0.5
    posterior = torch.softmax(component_logits(w, means, torch.log_softmax(mixing, 0), std, temperature), 1)
    draws = 40000
    index = sample_component(w.repeat(draws), means, mixing, std, temperature, torch.Generator().manual_seed(0)).reshape(draws, 3)
    frequency = torch.stack([torch.bincount(index[:, j], minlength=4) for j in range(3)]).float() / draws
    assert torch.allclose(frequency, posterior, atol=0.01)  # 4 sd of a binomial frequency at 40k draws is <= 0.01
    # a component whose probability underflows to 0 is never drawn
    sharp = sample_component(w.repeat(1000), means, mixing, std, 1e-6, torch.Generator().manual_seed(1))
    assert torch.equal(torch.unique(sharp), torch.unique(most_likely_component(w, means, mixing, std)))


def test_exp_or_zero_is_exp_down_to_the_smallest_normal_float() -> None:
    x = torch.tensor([-1e4, -200.0, -88.0, -87.3, -87.0, -20.0, 0.0, 3.0])
    out = exp_or_zero(x)
    assert torch.equal(out[:3], torch.zeros(3))  # exp would return 0 or a subnormal there
    assert torch.equal(out[3:], torch.exp(x[3:]))
    assert bool((out[3:] >= torch.finfo(torch.float32).tiny).all())
