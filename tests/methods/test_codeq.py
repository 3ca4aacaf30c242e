"""CoDeQ: the dead-zone quantizer's formulas, its gradients, and the method's lifecycle."""

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
from slope_bench.methods.codeq import (
    CoDeQ,
    bits_from_logit,
    dead_zone_apply,
    dead_zone_grid,
    dead_zone_harden,
    dead_zone_quantize,
    dead_zone_width,
    percentile_abs,
)
from slope_bench.quant import UniformGrid, fake_quantize, fp16_exact
from slope_bench.sparsity import Unstructured

CONFIG = Path(__file__).resolve().parents[2] / "conf" / "method" / "codeq.yaml"


def away_from_boundaries(
    weight: torch.Tensor,
    step: torch.Tensor,
    offset: torch.Tensor,
    width: torch.Tensor,
    margin: float = 1e-4,
) -> torch.Tensor:
    """Mask of weights not within ``margin·s`` of a rounding boundary or of ``d/2``."""
    u = (weight.abs() - offset) / step
    frac = (u - u.floor() - 0.5).abs()
    return (frac > margin) & ((weight.abs() - width / 2).abs() > margin * step)


# ---- the quantizer ------------------------------------------------------------------------
@pytest.mark.parametrize("theta_d", [3.0, 1.0, 0.5, 0.1])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_zero_band_is_exactly_the_dead_zone(theta_d: float, bits: int) -> None:
    torch.manual_seed(0)
    w = torch.randn(4000) * 0.05
    a = percentile_abs(w, 99.0)
    th = torch.tensor(theta_d)
    out = dead_zone_quantize(w, th, bits, a)
    width = dead_zone_width(th, a)
    step, offset, _ = dead_zone_grid(a, width, bits)
    ok = away_from_boundaries(w, step, offset, width)
    assert ok.float().mean() > 0.99
    assert torch.equal((out == 0)[ok], (w.abs() < width / 2)[ok])
    # nonzero outputs keep the sign of the weight and never exceed a
    nz = out != 0
    assert torch.equal(torch.sign(out[nz]), torch.sign(w[nz]))
    assert out.abs().max() <= a * (1 + 1e-6)


@pytest.mark.parametrize("theta_d", [3.0, 1.0, 0.3])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_levels_evenly_spaced_with_top_level_a(theta_d: float, bits: int) -> None:
    w = torch.linspace(-1.3, 1.3, 20001)  # dense enough to hit every level
    a = percentile_abs(w, 99.0)
    th = torch.tensor(theta_d)
    out = dead_zone_quantize(w, th, bits, a)
    width = dead_zone_width(th, a)
    step, offset, qmax = dead_zone_grid(a, width, bits)
    levels = out[out > 0].unique()
    q = 2 ** (bits - 1) - 1
    assert float(qmax) == q
    assert levels.numel() == q
    assert torch.allclose(levels.max(), a, rtol=1e-6)
    expected = width / 2 + step * (torch.arange(1, q + 1, dtype=torch.float32) - 0.5)
    assert torch.allclose(levels, expected, rtol=1e-5, atol=1e-7)
    assert torch.allclose(
        levels,
        offset + step * torch.arange(1, q + 1, dtype=torch.float32),
        rtol=1e-5,
        atol=1e-7,
    )
    if q > 1:
        assert torch.allclose(levels.diff(), step.expand(q - 1), rtol=1e-4)
    assert torch.allclose(out[out < 0].unique(), -levels.flip(0), rtol=1e-6)
    assert (out.unique().numel()) == 2 * q + 1


def test_percentile_is_nearest_rank() -> None:
    w = -torch.arange(1.0, 101.0)  # |w| = 1..100
    assert percentile_abs(w, 99.0).item() == 99.0
    assert percentile_abs(w, 100.0).item() == 100.0
    assert percentile_abs(w, 0.5).item() == 1.0
    assert percentile_abs(w, 50.0).item() == 50.0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_width_equal_to_step_is_the_symmetric_quantizer(bits: int) -> None:
    torch.manual_seed(1)
    w = torch.randn(8, 16, 3, 3) * 0.1
    a = percentile_abs(w, 99.0)
    q = 2 ** (bits - 1) - 1
    # choose θ_d so that d = a / Q, which makes d = s (and δ = 0)
    theta_d = torch.tensor(math.atanh(1 - 1 / (2 * q)), dtype=torch.float64)
    width = dead_zone_width(theta_d, a.double())
    step, offset, _ = dead_zone_grid(a.double(), width, bits)
    assert torch.allclose(step, width, rtol=1e-9)
    assert torch.allclose(step, a.double() / q, rtol=1e-9)
    assert abs(float(offset)) < 1e-12
    ours = dead_zone_quantize(w.double(), theta_d, bits, a.double())
    grid = UniformGrid(bits=bits, granularity="tensor")
    plain = fake_quantize(w.double(), (a.double() / q).reshape(1, 1), grid)
    assert torch.allclose(ours, plain, atol=1e-12)
    # same identity straight from the width
    ours_width = dead_zone_apply(w.double(), step, offset, torch.tensor(float(q), dtype=torch.float64))
    assert torch.allclose(ours_width, plain, atol=1e-12)


def test_gradients_reach_weight_and_both_logits() -> None:
    torch.manual_seed(2)
    w = (torch.randn(64, 32) * 0.1).requires_grad_()
    theta_d = torch.tensor(1.0, requires_grad=True)
    theta_b = torch.tensor(0.6, requires_grad=True)
    target = torch.randn(64, 32) * 0.1
    a = percentile_abs(w, 99.0)
    out = dead_zone_quantize(w, theta_d, bits_from_logit(theta_b), a)
    (out - target).pow(2).sum().backward()
    for g in (w.grad, theta_d.grad, theta_b.grad):
        assert g is not None and torch.isfinite(g).all()
    assert float(theta_d.grad.abs()) > 0
    assert float(theta_b.grad.abs()) > 0
    # round, clamp and ReLU are straight-through: dŴ/dW = 1 everywhere, dead zone included
    assert torch.allclose(w.grad, 2 * (out.detach() - target), atol=1e-6)
    assert a.grad_fn is None  # a carries no gradient


def reference_quantize(weight: torch.Tensor, theta_d: torch.Tensor, bits: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The formulas composed step by step with plain autograd (STE as ``x + (f(x) − x).detach()``)."""

    def ste(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return x + (value - x).detach()

    width = 2 * a * (1 - torch.tanh(theta_d).abs())
    qmax = 2 ** (bits - 1) - 1
    step = (a - width / 2) / (qmax - 0.5)
    offset = width / 2 - step / 2
    magnitude = weight.abs() - offset
    x = torch.sign(weight) * ste(magnitude, torch.relu(magnitude)) / step
    rounded = ste(x, torch.round(x))
    bound = float(qmax.detach())
    q = ste(rounded, torch.clamp(rounded, -bound, bound))
    return step * q + offset * torch.sign(q).detach()


@pytest.mark.parametrize("theta", [(2.0, 3.0), (0.7, 0.3), (0.2, 0.1)])
def test_fused_gradients_match_plain_autograd(theta: tuple[float, float]) -> None:
    torch.manual_seed(5)
    base = torch.randn(32, 8, 3, 3, dtype=torch.float64) * 0.05
    target = torch.randn_like(base) * 0.05
    grads, outs = [], []
    for fn in (dead_zone_quantize, reference_quantize):
        w = base.clone().requires_grad_()
        theta_d = torch.tensor(theta[0], dtype=torch.float64, requires_grad=True)
        theta_b = torch.tensor(theta[1], dtype=torch.float64, requires_grad=True)
        out = fn(w, theta_d, bits_from_logit(theta_b), percentile_abs(w, 99.0))
        (out - target).pow(3).sum().backward()
        outs.append(out.detach())
        grads.append((w.grad, theta_d.grad, theta_b.grad))
    assert torch.allclose(outs[0], outs[1], atol=1e-12)
    for ours, ref in zip(grads[0], grads[1], strict=True):
        assert torch.allclose(ours, ref, rtol=1e-9, atol=1e-12)


def test_bits_stay_in_two_to_eight() -> None:
    theta = torch.linspace(-50, 50, 2001, requires_grad=True)
    b = bits_from_logit(theta)
    assert b.min().item() == 2.0 and b.max().item() == 8.0
    assert torch.equal(b, b.round())
    assert bits_from_logit(torch.tensor(3.0)).item() == 8.0  # the paper's initial θ_b
    b.sum().backward()
    assert torch.isfinite(theta.grad).all() and theta.grad.abs().sum() > 0


def test_closed_dead_zone_keeps_only_the_top_percent() -> None:
    torch.manual_seed(3)
    w = torch.randn(10000)
    a = percentile_abs(w, 99.0)
    out = dead_zone_quantize(w, torch.tensor(0.0), 4, a)  # d = 2a
    assert torch.isfinite(out).all()
    nz = out[out != 0]
    assert torch.allclose(nz.abs(), a.expand_as(nz))
    assert abs((out != 0).float().mean().item() - 0.01) < 2e-3


def test_harden_is_exact_from_16_bit_numbers() -> None:
    torch.manual_seed(4)
    w = torch.randn(32, 16, 3, 3) * 0.03
    a = percentile_abs(w, 99.0)
    width = dead_zone_width(torch.tensor(0.8), a)
    out, s16, d16 = dead_zone_harden(w, a, width, 3)
    assert float(s16) == float(fp16_exact(s16)) and float(d16) == float(fp16_exact(d16))
    q = torch.round((out - d16 * torch.sign(out)) / s16)
    assert torch.equal(out, s16 * q + d16 * torch.sign(q))
    assert q.abs().max() <= 3 and out.unique().numel() <= 7
    # the 16-bit grid stays within fp16 rounding of the trained one
    soft = dead_zone_quantize(w, torch.tensor(0.8), 3, a)
    assert torch.equal(out == 0, soft == 0)
    assert torch.allclose(out, soft, rtol=0, atol=4e-3 * float(a))


# ---- the method ---------------------------------------------------------------------------
class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(x.mean((2, 3)))


TARGETS = ["conv2", "conv3"]


def build_optimizer(model: nn.Module, compressor: CoDeQ, lr: float = 1e-2, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW groups as the pipeline builds them: by the last component of the name."""
    groups: dict[str, list] = {}
    for name, param in model.named_parameters():
        key = name.rsplit(".", 1)[-1]
        groups.setdefault(key if key in compressor.optim_groups else "", []).append(param)
    return torch.optim.AdamW(
        [{"params": ps, **compressor.optim_groups.get(key, {})} for key, ps in groups.items()],
        lr=lr,
        weight_decay=weight_decay,
    )


def fit(compressor: CoDeQ, steps: int = 6, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = compressor.prepare(Toy(), TARGETS)
    opt = build_optimizer(model, compressor)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    for step in range(steps):
        loss = nn.functional.cross_entropy(model(x), y) + compressor.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        compressor.on_step(step, steps)
    return model


@pytest.mark.parametrize("w_bits", [4, 2, "learned"])
def test_prepare_train_finalize(w_bits: int | str) -> None:
    compressor = CoDeQ(w_bits=w_bits, lr_theta=0.05, sparsity_decay=5.0, bits_decay=5.0)
    model = fit(compressor)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_parameters()}
    assert "theta_d" in names and (("theta_b" in names) == (w_bits == "learned"))
    theta = compressor.layers["conv2"].theta_d
    assert theta.item() != 3.0  # the dead-zone logit was trained
    stats = compressor.stats()
    assert 0.0 <= stats["sparsity"] <= 1.0 and 2.0 <= stats["bits"] <= 8.0
    model = compressor.finalize(model, [torch.randn(4, 3, 8, 8)])
    for name in TARGETS:
        module = model.get_submodule(name)
        assert not parametrize.is_parametrized(module)
        w = module.weight
        spec = compressor.specs[name]
        bits = spec.bits if w_bits == "learned" else w_bits
        assert spec == LayerSpec(
            pattern=Unstructured(),
            grid="deadzone",
            bits=bits,
            granularity="tensor",
            scale_values=2,
        )
        assert 2 <= bits <= 8
        assert (w == 0).any()
        assert w.unique().numel() <= 2 * (2 ** (bits - 1) - 1) + 1
        extras = compressor.layer_extras[name]
        assert extras["learned_bits"] == bits
        assert extras["dead_zone"] > 0 and extras["step"] > 0
        # exact zeros are exactly the dead zone of the hardened grid
        nonzero = w[w != 0].abs()
        assert nonzero.min() >= extras["dead_zone"] / 2 * (1 - 1e-3)
    assert not parametrize.is_parametrized(model.conv1) and not parametrize.is_parametrized(model.fc)
    assert compressor.setting() == ("unstructured mixed" if w_bits == "learned" else f"unstructured w{w_bits}")
    out = model(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 4) and torch.isfinite(out).all()


def test_optim_groups_carry_the_knobs() -> None:
    compressor = CoDeQ(w_bits="learned", lr_theta=0.02, sparsity_decay=3.0, bits_decay=0.5)
    assert compressor.optim_groups == {
        "theta_d": {"lr": 0.02, "weight_decay": 3.0},
        "theta_b": {"lr": 0.02, "weight_decay": 0.5},
    }
    model = compressor.prepare(Toy(), TARGETS)
    opt = build_optimizer(model, compressor)
    assert len(opt.param_groups) == 3
    by_decay = sorted((g["weight_decay"], len(g["params"])) for g in opt.param_groups)
    assert by_decay == [(0.0, 8), (0.5, 2), (3.0, 2)]


def test_sparsity_decay_controls_sparsity() -> None:
    sparsity = {}
    for decay in (0.0, 20.0):
        compressor = CoDeQ(w_bits=4, lr_theta=0.05, sparsity_decay=decay)
        model = compressor.finalize(fit(compressor, steps=15), None)
        w = torch.cat([model.get_submodule(n).weight.flatten() for n in TARGETS])
        sparsity[decay] = (w == 0).float().mean().item()
    assert sparsity[20.0] > sparsity[0.0] + 0.2


def test_bits_decay_lowers_learned_bits() -> None:
    compressor = CoDeQ(w_bits="learned", lr_theta=0.05, bits_decay=20.0)
    compressor.finalize(fit(compressor, steps=15), None)
    bits = [compressor.specs[n].bits for n in TARGETS]
    assert max(bits) < 8


def test_config_instantiates() -> None:
    cfg = OmegaConf.load(CONFIG)
    assert cfg.pop("name") == "codeq"
    assert cfg.pop("epochs") is None
    compressor = hydra.utils.instantiate(cfg)
    assert isinstance(compressor, CoDeQ)
    assert compressor.setting() == "unstructured w4"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("w_bits", 1),
        ("w_bits", 9),
        ("w_bits", 4.0),
        ("w_bits", True),
        ("w_bits", "mixed"),
        ("w_bits", None),
        ("sparsity_decay", -1.0),
        ("bits_decay", -0.1),
        ("percentile", 0.0),
        ("percentile", 100.5),
        ("percentile", -3),
        ("lr_theta", 0.0),
    ],
)
def test_bad_inputs_raise_config_error(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        CoDeQ(**{key: value})
    assert info.value.key == key
    assert "\n" not in str(info.value)
