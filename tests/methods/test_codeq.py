"""CoDeQ the method: parameters, optimizer groups, training through the shared loop,
finalize records and bad input (the quantizer itself: tests/test_deadzone.py)."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.nn.utils import parametrize

from slope_bench.errors import ConfigError
from slope_bench.loop import Driven, drive, param_groups
from slope_bench.methods.base import LayerSpec, RunInfo
from slope_bench.methods.codeq import CoDeQ
from slope_bench.sparsity import Unstructured

CONFIG = Path(__file__).resolve().parents[2] / "conf" / "method" / "codeq.yaml"


class Toy(nn.Module):
    first_layers = ["conv1"]
    classifier_layers = ["fc"]

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


def fit(compressor: CoDeQ, steps: int = 6, seed: int = 0) -> tuple[nn.Module, Driven]:
    """``steps`` AdamW steps (lr 1e-2, no weight decay outside the method's groups) on one
    batch through the shared loop, then ``finalize``."""
    torch.manual_seed(seed)
    model = Toy()
    batch = (torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,)))
    driven = drive(model, compressor, [batch], lambda m, b: F.cross_entropy(m(b[0]), b[1]), steps=steps, lr=1e-2, weight_decay=0.0)
    assert driven.targets == TARGETS
    return model, driven


@pytest.mark.parametrize("w_bits", [4, 2, "learned"])
def test_prepare_train_finalize(w_bits: int | str) -> None:
    compressor = CoDeQ(w_bits=w_bits, lr_theta=0.05, sparsity_decay=5.0, bits_decay=5.0)
    model, driven = fit(compressor)
    names = {n.rsplit(".", 1)[-1] for n in compressor.layers["conv2"].state_dict()}
    assert "theta_d" in names and (("theta_b" in names) == (w_bits == "learned"))
    theta = compressor.layers["conv2"].theta_d
    assert theta.item() != 3.0  # the dead-zone logit was trained
    stats = compressor.stats()  # of the last training forward
    assert 0.0 <= stats["sparsity"] <= 1.0 and 2.0 <= stats["bits"] <= 8.0
    done = driven.finalized
    for name in TARGETS:
        module = model.get_submodule(name)
        assert not parametrize.is_parametrized(module)
        w = module.weight
        spec = done.specs[name]
        bits = spec.bits if w_bits == "learned" else w_bits
        assert spec == LayerSpec(
            pattern=Unstructured(),
            grid="deadzone",
            bits=bits,
            granularity="tensor",
            scale_values=2,
            grid_range="percentile",
        )
        assert 2 <= bits <= 8
        assert (w == 0).any()
        assert w.unique().numel() <= 2 * (2 ** (bits - 1) - 1) + 1
        extras = done.layer_extras[name]
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
    model = compressor.prepare(Toy(), TARGETS, RunInfo(num_train=16))
    groups = {g["name"]: g for g in param_groups(model, compressor, lr=1e-3, weight_decay=1e-4)}
    assert set(groups) == {"default", "no_decay", "method:theta_d", "method:theta_b"}
    assert (groups["method:theta_d"]["lr"], groups["method:theta_d"]["weight_decay"], len(groups["method:theta_d"]["params"])) == (
        0.02,
        3.0,
        2,
    )
    assert (groups["method:theta_b"]["lr"], groups["method:theta_b"]["weight_decay"], len(groups["method:theta_b"]["params"])) == (
        0.02,
        0.5,
        2,
    )
    assert groups["default"]["weight_decay"] == 1e-4 and groups["no_decay"]["weight_decay"] == 0.0


def test_sparsity_decay_controls_sparsity() -> None:
    sparsity = {}
    for decay in (0.0, 20.0):
        compressor = CoDeQ(w_bits=4, lr_theta=0.05, sparsity_decay=decay)
        model, _ = fit(compressor, steps=15)
        w = torch.cat([model.get_submodule(n).weight.flatten() for n in TARGETS])
        sparsity[decay] = (w == 0).float().mean().item()
    assert sparsity[20.0] > sparsity[0.0] + 0.2


def test_bits_decay_lowers_learned_bits() -> None:
    compressor = CoDeQ(w_bits="learned", lr_theta=0.05, bits_decay=20.0)
    _, driven = fit(compressor, steps=15)
    bits = [driven.finalized.specs[n].bits for n in TARGETS]
    assert max(bits) < 8


def test_config_instantiates() -> None:
    cfg = OmegaConf.load(CONFIG)
    cfg.pop("search", None)  # the tuning space is not a constructor argument (the run drops it)
    assert "epochs" not in cfg
    compressor = hydra.utils.instantiate(cfg)
    assert isinstance(compressor, CoDeQ) and compressor.name == "codeq"
    assert compressor.requirements.trains and compressor.state_dict() == {}
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
        ("grid", "asymmetric"),
        ("grid", "signed"),
        ("percentile_interpolation", "midpoint"),
    ],
)
def test_bad_inputs_raise_config_error(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        CoDeQ(**{key: value})
    assert info.value.key == key
    assert "\n" not in str(info.value)


def test_clip_value_is_the_linear_percentile() -> None:
    """``a`` is numpy's linearly interpolated 99th percentile of ``|W|`` (the reference);
    ``percentile_interpolation=nearest_rank`` keeps the former convention."""
    import numpy as np

    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3)
    p = CoDeQ().make_parametrization("conv", w)
    assert float(p.width(w)) == pytest.approx(float(p.width(w)), rel=0)
    a = float(np.percentile(w.abs().numpy(), 99.0))
    from slope_bench.deadzone import percentile_abs

    assert percentile_abs(w, 99.0, p.interpolation).item() == pytest.approx(a, rel=1e-6)
    assert CoDeQ(percentile_interpolation="nearest_rank").make_parametrization("conv", w).interpolation == "nearest_rank"
