"""SQS: k-means init, cubic schedule, mixture read-out and its gradients, KL terms,
global pruning, and the method's lifecycle on a toy model."""

from __future__ import annotations

import math
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn.utils import parametrize

from slope_bench.errors import ConfigError
from slope_bench.methods.base import LayerSpec
from slope_bench.methods.sqs import (
    MixtureGateWeight,
    Sqs,
    bernoulli_kl,
    component_logits,
    cubic_sparsity,
    global_prune_masks,
    kmeans_1d,
    mixture_lines,
    mixture_readout,
    most_likely_component,
    neighbour_plan,
    pooled_std,
    upper_envelope,
)
from slope_bench.quant import fp16_exact
from slope_bench.sparsity import Unstructured

CONFIG = Path(__file__).resolve().parents[2] / "conf" / "method" / "sqs.yaml"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread avoids oversubscription on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, stride=2)
        self.fc = nn.Linear(16 * 16, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.flatten(1))


TARGETS = ["stem", "conv1", "conv2"]


def train_toy(c: Sqs, steps: int = 10, seed: int = 0) -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(seed)
    model = Toy()
    c.num_train = 64
    model = c.prepare(model, TARGETS)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))) for _ in range(4)]
    for step in range(steps):
        x, y = data[step % len(data)]
        loss = nn.functional.cross_entropy(model(x), y) + c.penalty()
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        c.on_step(step, steps)
    return model, [x for x, _ in data]


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


# ---- the schedule ------------------------------------------------------------------------
def test_cubic_schedule_endpoints_midpoint_and_monotone() -> None:
    s_i, s_f, t0, t1 = 0.1, 0.7, 0.1, 0.8
    assert cubic_sparsity(0.0, s_i, s_f, t0, t1) == s_i
    assert cubic_sparsity(t0, s_i, s_f, t0, t1) == s_i
    assert cubic_sparsity(t1, s_i, s_f, t0, t1) == pytest.approx(s_f)
    assert cubic_sparsity(1.0, s_i, s_f, t0, t1) == s_f
    mid = (t0 + t1) / 2
    assert cubic_sparsity(mid, s_i, s_f, t0, t1) == pytest.approx(s_f + (s_i - s_f) / 8)
    values = [cubic_sparsity(t / 200, s_i, s_f, t0, t1) for t in range(201)]
    assert all(b >= a for a, b in zip(values, values[1:]))


def test_schedule_reaches_target_at_prune_end_in_the_method() -> None:
    c = Sqs(w_bits=2, target_sparsity=0.6, prune_start=0.2, prune_end=0.6, n_samples=0)
    torch.manual_seed(0)
    model = c.prepare(Toy(), TARGETS)
    total, seen = 20, []
    for step in range(total):
        model(torch.randn(2, 3, 8, 8))
        c.on_step(step, total)
        pruned = sum(int((~p.mask).sum()) for p in c.layers.values())
        count = sum(p.mask.numel() for p in c.layers.values())
        seen.append(pruned / count)
        if (step + 1) / total <= 0.2:
            assert pruned == 0
        if (step + 1) / total >= 0.6:
            assert pruned == round(0.6 * count)
            assert all(p.hard_gates for p in c.layers.values())
    assert all(b >= a for a, b in zip(seen, seen[1:]))


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


# ---- KL terms ----------------------------------------------------------------------------
def test_bernoulli_kl_formula_and_zero_at_the_prior() -> None:
    logits = torch.linspace(-6, 6, 25, dtype=torch.float64)
    g = torch.sigmoid(logits)
    lam = 0.01
    expected = g * torch.log(g / lam) + (1 - g) * torch.log((1 - g) / (1 - lam))
    assert torch.allclose(bernoulli_kl(logits, lam), expected, atol=1e-12)
    assert float(bernoulli_kl(torch.tensor(math.log(lam / (1 - lam))), lam)) == pytest.approx(0.0, abs=1e-7)
    assert torch.isfinite(bernoulli_kl(torch.tensor([-200.0, 200.0]), lam)).all()


def test_kl_gradients_are_finite_and_nonzero_on_gates_and_means() -> None:
    c = Sqs(w_bits=3, n_samples=0, kl_weight=0.5)
    torch.manual_seed(0)
    model = c.prepare(Toy(), TARGETS)
    penalty = c.penalty()
    p = c.layers["conv1"]
    kl = bernoulli_kl(p.gate_logits.detach() / p.gate_temperature, 0.01).sum()
    prior = sum(float(q.codebook_means.detach().pow(2).sum()) / (2 * 3.0**2) for q in c.layers.values())
    expected = 0.5 * (sum(float(bernoulli_kl(q.gate_logits.detach() / q.gate_temperature, 0.01).sum()) for q in c.layers.values()) + prior)
    assert float(penalty.detach()) == pytest.approx(expected, rel=1e-5)
    assert float(kl) > 0
    penalty.backward()
    for q in c.layers.values():
        for param in (q.gate_logits, q.codebook_means):
            assert param.grad is not None and torch.isfinite(param.grad).all()
            assert param.grad.abs().sum() > 0
        # the gate KL pushes keep probabilities towards the prior (down from 0.993)
        assert bool((q.gate_logits.grad > 0).all())
    assert model is not None


def test_kl_weight_defaults_to_one_over_num_train() -> None:
    c = Sqs()
    c.num_train = 250
    assert c.effective_kl_weight() == pytest.approx(1 / 250)
    assert Sqs(kl_weight=0.1).effective_kl_weight() == 0.1


# ---- global pruning ----------------------------------------------------------------------
def test_global_prune_masks_exact_count_ties_and_monotone() -> None:
    torch.manual_seed(0)
    scores = [torch.rand(10, 10), torch.rand(7), torch.full((50,), 0.5)]  # many ties at 0.5
    masks = global_prune_masks(scores, 0.4)
    total = sum(s.numel() for s in scores)
    assert sum(int((~m).sum()) for m in masks) == round(0.4 * total)
    pooled = torch.cat([s.reshape(-1) for s in scores])
    kept = torch.cat([m.reshape(-1) for m in masks])
    assert float(pooled[kept].min()) >= float(pooled[~kept].max())
    # entries marked pruned (score -1) are removed first, even when their magnitude is large
    marked = [torch.where(m, s, torch.full_like(s, -1.0)) for s, m in zip(scores, masks)]
    again = global_prune_masks(marked, 0.6)
    for m_old, m_new in zip(masks, again):
        assert not bool((m_new & ~m_old).any())
    assert sum(int((~m).sum()) for m in again) == round(0.6 * total)


def test_ranking_uses_gated_magnitude() -> None:
    torch.manual_seed(0)
    w = torch.randn(100) * 0.05
    p = MixtureGateWeight(w, 4)
    with torch.no_grad():
        p.gate_logits[:10] = -1.0  # closed gates: γ ≈ 0
    score = p.score(w)
    assert float(score[:10].max()) < 1e-10
    masks = global_prune_masks([score], 0.1)
    assert not bool(masks[0][:10].any())


# ---- lifecycle ---------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4])
def test_lifecycle_levels_sparsity_specs_and_ensemble(bits: int) -> None:
    c = Sqs(w_bits=bits, target_sparsity=0.5, n_samples=3)
    model, batches = train_toy(c, steps=10)
    trained = {n: c.weight_of(n).detach().clone() for n in TARGETS}
    masks = {n: c.layers[n].mask.clone() for n in TARGETS}
    means = {n: c.layers[n].export_means() for n in TARGETS}
    model = c.finalize(model, batches)
    k = 2**bits
    total = sum(model.get_submodule(n).weight.numel() for n in TARGETS)
    zeros = 0
    for n in TARGETS:
        module = model.get_submodule(n)
        assert not parametrize.is_parametrized(module)
        w = module.weight.detach()
        nonzero = w[w != 0].unique()
        assert nonzero.numel() <= k
        assert torch.equal(fp16_exact(nonzero), nonzero)
        assert bool(torch.isin(nonzero, means[n]).all())
        assert torch.equal(w == 0, ~masks[n])
        # each kept weight is its most likely component's mean
        layer = c.layers[n]
        index = most_likely_component(trained[n], layer.codebook_means, layer.mixing_logits, layer.component_std)
        assert torch.equal(w[masks[n]], means[n][index][masks[n]])
        zeros += int((w == 0).sum())
        assert c.specs[n] == LayerSpec(pattern=Unstructured(), grid="codebook", bits=bits, granularity="tensor", scale_values=k)
        assert c.layer_extras[n]["mask_sparsity"] == pytest.approx(float((w == 0).float().mean()))
    assert abs(zeros - 0.5 * total) <= len(TARGETS)
    assert len(c.ensemble) == 3
    for sample in c.ensemble:
        assert set(sample) == set(TARGETS)
        for n, w in sample.items():
            assert w.shape == model.get_submodule(n).weight.shape
            assert bool((w[~masks[n]] == 0).all())
            assert w[w != 0].unique().numel() <= k
    assert c.extra_results["sqs/mask_sparsity"] == pytest.approx(zeros / total)
    model.eval()
    assert torch.isfinite(model(batches[0])).all()
    assert c.setting() == f"50% unstructured w{bits}"


def test_post_training_finalize_hits_the_target() -> None:
    c = Sqs(w_bits=4, target_sparsity=0.3, n_samples=2)
    torch.manual_seed(0)
    model = c.prepare(Toy(), TARGETS)
    original = {n: c.weight_of(n).detach().clone() for n in TARGETS}
    model = c.finalize(model, None)
    weights = [model.get_submodule(n).weight.detach() for n in TARGETS]
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert abs(zeros - 0.3 * total) <= len(TARGETS)
    # pruned by the global ranking: every pruned |quantized weight| is below every kept one
    quantized = [
        c.layers[n].export_means()[
            most_likely_component(original[n], c.layers[n].codebook_means, c.layers[n].mixing_logits, c.layers[n].component_std)
        ]
        for n in TARGETS
    ]
    q = torch.cat([x.reshape(-1) for x in quantized]).abs()
    kept = torch.cat([(w != 0).reshape(-1) for w in weights])
    # all gates are still at their initial value, so the ranking is by |ŵ| alone
    assert float(q[~kept].max()) <= float(q[kept].min())


def test_hard_gates_after_prune_end_forward_is_read_out_times_mask() -> None:
    c = Sqs(w_bits=2, target_sparsity=0.5, prune_start=0.1, prune_end=0.5, n_samples=0)
    model, _ = train_toy(c, steps=6)
    for n in TARGETS:
        p = c.layers[n]
        assert p.hard_gates
        w = c.weight_of(n)
        expected = p.readout(w) * p.mask
        assert torch.allclose(model.get_submodule(n).weight, expected)
    # gate KL is off once the gates are read out; the prior on the means remains
    prior = sum(float(p.codebook_means.detach().pow(2).sum()) for p in c.layers.values()) / (2 * 3.0**2)
    assert float(c.penalty().detach()) == pytest.approx(prior * c.effective_kl_weight(), rel=1e-5)


def test_soft_gates_before_prune_end() -> None:
    c = Sqs(w_bits=2, n_samples=0)
    torch.manual_seed(0)
    model = c.prepare(Toy(), TARGETS)
    p = c.layers["conv1"]
    assert torch.allclose(p.keep_probability(), torch.full_like(p.gate_logits, 0.993))
    w = c.weight_of("conv1")
    assert torch.allclose(model.conv1.weight, p.readout(w) * 0.993, atol=1e-7)


# ---- configuration -----------------------------------------------------------------------
def test_yaml_instantiates_with_paper_defaults() -> None:
    cfg = OmegaConf.load(CONFIG)
    assert cfg.name == "sqs" and cfg.epochs is None
    kwargs = {k: v for k, v in cfg.items() if k not in ("name", "epochs")}
    c = hydra.utils.instantiate(kwargs)
    assert isinstance(c, Sqs)
    assert c.components == 16 and c.target_sparsity == 0.5
    assert c.compress_first and not c.compress_classifier
    assert c.prune_start == 0.1 and c.prune_end == 0.8
    assert c.gate_temperature == 0.01 and c.assign_temperature == 0.001 and c.prior_keep == 0.01
    assert c.mean_prior_std == 3.0 and c.kl_weight is None and c.n_samples == 8
    assert c.optim_groups["gate_logits"]["weight_decay"] == 0.0


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("w_bits", 0),
        ("w_bits", 9),
        ("w_bits", 2.5),
        ("target_sparsity", 1.0),
        ("target_sparsity", -0.1),
        ("prune_start", -0.1),
        ("prune_end", 1.5),
        ("prune_start", 0.8),
        ("gate_temperature", 0.0),
        ("assign_temperature", -1.0),
        ("sample_temperature", 0.0),
        ("prior_keep", 0.0),
        ("prior_keep", 1.0),
        ("mean_prior_std", 0.0),
        ("kl_weight", -1.0),
        ("n_samples", -1),
        ("n_samples", 2.0),
        ("gate_init", 0.4),
        ("initial_sparsity", 0.9),
        ("gate_lr", 0.0),
    ],
)
def test_bad_inputs_raise_config_error(key: str, value) -> None:
    with pytest.raises(ConfigError) as info:
        Sqs(**{key: value})
    assert info.value.key == key


def test_equal_start_and_end_raise_config_error() -> None:
    with pytest.raises(ConfigError):
        Sqs(prune_start=0.5, prune_end=0.5)
