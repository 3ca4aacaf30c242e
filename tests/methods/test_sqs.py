"""SQS the method: schedule, KL terms, global ranking, hard gates, finalize (specs, extras,
posterior samples), state and configuration on a toy model through the shared loop (the
mixture math: tests/test_mixture.py; the schedule and ranking: tests/test_sparsity.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import hydra
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.nn.utils import parametrize

from slope_bench.errors import ConfigError
from slope_bench.loop import Driven, drive
from slope_bench.methods.base import LayerSpec, RunInfo, original_weight
from slope_bench.methods.sqs import MixtureGateWeight, Sqs
from slope_bench.mixture import bernoulli_kl, fp16_codebook, most_likely_component
from slope_bench.quant import fp16_exact
from slope_bench.sparsity import Unstructured, global_prune_masks

CONFIG = Path(__file__).resolve().parents[2] / "conf" / "method" / "sqs.yaml"
INFO = RunInfo(num_train=64)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread avoids oversubscription on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Toy(nn.Module):
    first_layers = ["stem"]
    classifier_layers = ["fc"]

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


def train_toy(c: Sqs, steps: int = 10, seed: int = 0, before: Callable[[nn.Module], None] | None = None) -> tuple[nn.Module, list, Driven]:
    """``steps`` AdamW steps (lr 1e-3) through the shared loop, then ``finalize``;
    ``before(model)`` runs between the last step and ``finalize``."""
    torch.manual_seed(seed)
    model = Toy()
    data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))) for _ in range(4)]
    if before is not None:
        finalize = c.finalize

        def inspect_then_finalize(m: nn.Module, calib: list | None = None):
            before(m)
            return finalize(m, calib)

        c.finalize = inspect_then_finalize
    driven = drive(model, c, data, lambda m, b: F.cross_entropy(m(b[0]), b[1]), steps=steps, info=INFO, lr=1e-3, weight_decay=0.01)
    assert driven.targets == TARGETS
    return model, [x for x, _ in data], driven


def test_schedule_reaches_target_at_prune_end_in_the_method() -> None:
    c = Sqs(w_bits=2, target_sparsity=0.6, prune_start=0.2, prune_end=0.6, n_samples=0)
    torch.manual_seed(0)
    model = c.prepare(Toy(), TARGETS, INFO)
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


# ---- KL terms ----------------------------------------------------------------------------
def test_kl_gradients_are_finite_and_nonzero_on_gates_and_means() -> None:
    c = Sqs(w_bits=3, n_samples=0, kl_weight=0.5)
    torch.manual_seed(0)
    model = c.prepare(Toy(), TARGETS, INFO)
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
    assert c.effective_kl_weight() == 1.0  # before prepare: unknown
    c.prepare(Toy(), TARGETS, RunInfo(num_train=250))
    assert c.effective_kl_weight() == pytest.approx(1 / 250)
    assert Sqs(kl_weight=0.1).effective_kl_weight() == 0.1


# ---- global ranking ----------------------------------------------------------------------
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
    trained, masks, means = {}, {}, {}

    def snapshot(model: nn.Module) -> None:
        for n in TARGETS:
            trained[n] = original_weight(model.get_submodule(n)).detach().clone()
            masks[n] = c.layers[n].mask.clone()
            means[n] = fp16_codebook(c.layers[n].codebook_means)

    model, batches, driven = train_toy(c, steps=10, before=snapshot)
    done = driven.finalized
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
        assert done.specs[n] == LayerSpec(pattern=Unstructured(), grid="codebook", bits=bits, granularity="tensor", scale_values=k)
        assert done.layer_extras[n]["mask_sparsity"] == pytest.approx(float((w == 0).float().mean()))
    assert abs(zeros - 0.5 * total) <= len(TARGETS)
    assert len(done.samples) == 3
    for sample in done.samples:
        assert set(sample) == set(TARGETS)
        for n, w in sample.items():
            assert w.shape == model.get_submodule(n).weight.shape
            assert bool((w[~masks[n]] == 0).all())
            assert w[w != 0].unique().numel() <= k
    assert done.results["sqs/mask_sparsity"] == pytest.approx(zeros / total)
    assert done.results["sqs/kl_weight"] == pytest.approx(1 / 64) and done.results["sqs/ensemble_size"] == 3.0
    assert torch.isfinite(model(batches[0])).all()
    assert c.setting() == f"50% unstructured w{bits}"


def test_post_training_finalize_hits_the_target() -> None:
    c = Sqs(w_bits=4, target_sparsity=0.3, n_samples=2)
    torch.manual_seed(0)
    model = c.prepare(Toy(), TARGETS, INFO)
    original = {n: original_weight(model.get_submodule(n)).detach().clone() for n in TARGETS}
    c.finalize(model, None)
    weights = [model.get_submodule(n).weight.detach() for n in TARGETS]
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert abs(zeros - 0.3 * total) <= len(TARGETS)
    # pruned by the global ranking: every pruned |quantized weight| is below every kept one
    quantized = [
        fp16_codebook(c.layers[n].codebook_means)[
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

    def check(model: nn.Module) -> None:
        for n in TARGETS:
            p = c.layers[n]
            assert p.hard_gates
            w = original_weight(model.get_submodule(n))
            assert torch.allclose(model.get_submodule(n).weight, p.readout(w) * p.mask)
        # gate KL is off once the gates are read out; the prior on the means remains
        prior = sum(float(p.codebook_means.detach().pow(2).sum()) for p in c.layers.values()) / (2 * 3.0**2)
        assert float(c.penalty().detach()) == pytest.approx(prior * c.effective_kl_weight(), rel=1e-5)
        checked.append(True)

    checked: list[bool] = []
    train_toy(c, steps=6, before=check)
    assert checked and c.state_dict() == {"current_sparsity": 0.5, "hard_gates": dict.fromkeys(TARGETS, True)}


def test_soft_gates_before_prune_end() -> None:
    c = Sqs(w_bits=2, n_samples=0)
    torch.manual_seed(0)
    model = c.prepare(Toy(), TARGETS, INFO)
    p = c.layers["conv1"]
    assert torch.allclose(p.keep_probability(), torch.full_like(p.gate_logits, 0.993))
    w = original_weight(model.conv1)
    assert torch.allclose(model.conv1.weight, p.readout(w) * 0.993, atol=1e-7)


# ---- configuration -----------------------------------------------------------------------
def test_yaml_instantiates_with_paper_defaults() -> None:
    cfg = OmegaConf.load(CONFIG)
    cfg.pop("search", None)  # the tuning space is not a constructor argument (the run drops it)
    assert "epochs" not in cfg
    c = hydra.utils.instantiate(cfg)
    assert isinstance(c, Sqs) and c.name == "sqs" and c.requirements.trains
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
