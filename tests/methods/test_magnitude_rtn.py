"""Magnitude N:M + round-to-nearest: both orders, exact grid values, bad input."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn.utils import parametrize

from slope_bench.errors import ConfigError
from slope_bench.loop import drive
from slope_bench.methods.base import Requirements, RunInfo
from slope_bench.methods.magnitude_rtn import MagnitudeRTN, magnitude_rtn
from slope_bench.quant import UniformGrid, fp16_exact
from slope_bench.sparsity import NM, satisfies_nm

CONF = Path(__file__).resolve().parents[2] / "conf" / "method"
TARGETS = ["features.0", "features.2"]
INFO = RunInfo(num_train=8)


def toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU())


def wrap(model: nn.Module) -> nn.Module:
    outer = nn.Module()
    outer.features = model
    outer.first_layers, outer.classifier_layers = [], []
    outer.forward = model.forward
    return outer


def test_prune_then_quantize_matches_a_hand_computed_row():
    weight = torch.tensor([[0.6, 0.7, 1.0, 0.05, -0.2, 0.3, -0.45, 0.1]])
    out = magnitude_rtn(weight, NM(2, 4), UniformGrid(bits=3, kind="symmetric"), "prune_then_quantize")
    step = float(fp16_exact(torch.tensor(1.0 / 3)))
    expected = torch.tensor([[0.0, 2.0, 3.0, 0.0, 0.0, 1.0, -1.0, 0.0]]) * step
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-7)
    # signed (OBC's grid, codes −4..3), min-max step 2·max/(2^3 − 1); 1.0 / s = 3.5 → 4 → clamped to 3
    out = magnitude_rtn(weight, NM(2, 4), UniformGrid(bits=3), "prune_then_quantize")
    step = float(fp16_exact(torch.tensor(2.0 / 7)))
    expected = torch.tensor([[0.0, 2.0, 3.0, 0.0, 0.0, 1.0, -2.0, 0.0]]) * step
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-7)
    # asymmetric (GPTQ's RTN): range [−0.45, 1.0] on codes 0..7, s = 1.45/7, z = round(0.45/s) = 2
    out = magnitude_rtn(weight, NM(2, 4), UniformGrid(bits=3, kind="asymmetric"), "prune_then_quantize")
    step = float(fp16_exact(torch.tensor(1.45 / 7)))
    expected = torch.tensor([[0.0, 3.0, 5.0, 0.0, 0.0, 1.0, -2.0, 0.0]]) * step
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-7)


def test_quantize_then_prune_keeps_the_largest_codes():
    weight = torch.tensor([[0.6, 0.7, 1.0, 0.05, -0.2, 0.3, -0.45, 0.1]])
    out = magnitude_rtn(weight, NM(2, 4), UniformGrid(bits=2, kind="symmetric"), "quantize_then_prune")
    step = float(fp16_exact(torch.tensor(1.0)))
    # Q(W) = [1, 1, 1, 0, 0, 0, 0, 0]: three codes tie for two places in the first group
    assert satisfies_nm(out, NM(2, 4))
    assert int((out[0, :4] == step).sum()) == 2 and out[0, 3] == 0
    assert torch.equal(out[0, 4:], torch.zeros(4))


@pytest.mark.parametrize("order", ["prune_then_quantize", "quantize_then_prune"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_both_orders_give_nm_tensors_on_an_fp16_grid(order, bits):
    weight = torch.randn(16, 32, 3, 3, generator=torch.Generator().manual_seed(bits))
    out = magnitude_rtn(weight, NM(2, 4), UniformGrid(bits=bits, kind="symmetric"), order)
    assert out.shape == weight.shape and satisfies_nm(out, NM(2, 4))
    rows = out.reshape(16, -1)
    qmax = 2 ** (bits - 1) - 1
    # max|w| of a row is always kept by its group, so both orders use the step max|w| / qmax
    steps = fp16_exact(weight.reshape(16, -1).abs().amax(1) / qmax)
    for row, step in zip(rows, steps, strict=True):
        positive = torch.unique(row[row > 0])
        codes = row / step
        assert len(positive) <= qmax and len(torch.unique(row[row < 0])) <= qmax
        torch.testing.assert_close(codes, torch.round(codes), rtol=0, atol=1e-4)
        assert float(codes.abs().max()) <= qmax + 1e-4
    # the error stays that of rounding: at most half a step on every kept weight
    kept = out != 0
    half = 0.5 * steps.reshape(16, 1, 1, 1).expand_as(out)
    assert torch.all((out - weight).abs()[kept] <= half[kept] * 1.01)


def test_orders_differ_but_agree_where_codes_do_not_tie():
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(7))
    first = magnitude_rtn(weight, NM(2, 4), UniformGrid(bits=2), "prune_then_quantize")
    second = magnitude_rtn(weight, NM(2, 4), UniformGrid(bits=2), "quantize_then_prune")
    assert not torch.equal(first, second)
    # at 8 bits ties between codes are rare: the orders almost always pick the same weights
    first8 = magnitude_rtn(weight, NM(2, 4), UniformGrid(bits=8), "prune_then_quantize")
    second8 = magnitude_rtn(weight, NM(2, 4), UniformGrid(bits=8), "quantize_then_prune")
    assert float(((first8 != 0) != (second8 != 0)).float().mean()) < 0.02


def test_compressor_prepare_finalize_without_training():
    finals = {}
    for order in ("prune_then_quantize", "quantize_then_prune"):
        compressor = MagnitudeRTN(n=2, m=4, w_bits=2, order=order, grid="symmetric", range="minmax", nm_order="input")
        assert compressor.requirements == Requirements(trains=False)
        model = wrap(toy_model())
        dense = {n: model.get_submodule(n).weight.detach().clone() for n in TARGETS}
        batches = [(torch.randn(2, 4, 7, 7),)]
        driven = drive(model, compressor, batches, lambda m, b: m(b[0]).sum())
        assert driven.targets == TARGETS and driven.step_seconds == []  # post-training: no step
        assert compressor.penalty() == 0.0
        for name in TARGETS:
            module = model.get_submodule(name)
            assert not parametrize.is_parametrized(module)
            expected = magnitude_rtn(dense[name], NM(2, 4), UniformGrid(bits=2, kind="symmetric"), order)
            assert torch.equal(module.weight, expected)
            spec = driven.finalized.specs[name]
            assert (spec.pattern, spec.grid, spec.bits, spec.scale_values) == (NM(2, 4), "uniform", 2, 16)
            assert (spec.grid_kind, spec.grid_range, spec.zero_points) == ("symmetric", "minmax", 0)
        finals[order] = torch.cat([model.get_submodule(n).weight.flatten() for n in TARGETS])
        assert compressor.setting() == {"prune_then_quantize": "2:4 w2 sym", "quantize_then_prune": "2:4 w2 sym q→p"}[order]
    assert not torch.equal(finals["prune_then_quantize"], finals["quantize_then_prune"])


def test_forward_is_straight_through():
    compressor = MagnitudeRTN(w_bits=4)
    model = compressor.prepare(wrap(toy_model()), TARGETS, INFO)
    layer = model.get_submodule("features.2")
    layer.weight.sum().backward()
    grad = layer.parametrizations.weight.original.grad
    torch.testing.assert_close(grad, torch.ones_like(grad))


def test_layers_not_divisible_by_m_stay_dense_but_quantized():
    compressor = MagnitudeRTN(n=2, m=4, w_bits=4)
    model = nn.Module()
    model.head = nn.Linear(6, 5)
    done = compressor.finalize(compressor.prepare(model, ["head"], INFO), [])
    assert done.specs["head"].pattern is None
    assert done.layer_extras == {"head": {"note": "2:4 not applied: input size 6 is not divisible by m=4"}}
    assert (model.head.weight != 0).all()


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"order": "both"}, "order"),
        ({"n": 5, "m": 4}, "n"),
        ({"m": "four"}, "m"),
        ({"w_bits": 0}, "w_bits"),
        ({"w_bits": None}, "w_bits"),
        ({"granularity": "row"}, "granularity"),
        ({"granularity": "group", "group_size": 0}, "group_size"),
        ({"grid": "ternary"}, "grid"),
        ({"range": "percentile"}, "range"),
    ],
)
def test_bad_input_raises_config_error(kwargs, key):
    with pytest.raises(ConfigError) as error:
        MagnitudeRTN(**kwargs)
    assert error.value.key == key


def test_method_config_composes():
    cfg = OmegaConf.load(CONF / "magnitude_rtn.yaml")
    cfg.pop("search", None)  # the tuning space is not a constructor argument (the run drops it)
    assert "epochs" not in cfg
    compressor = hydra.utils.instantiate(cfg)
    assert isinstance(compressor, MagnitudeRTN) and compressor.order == "prune_then_quantize"
    assert compressor.name == "magnitude_rtn" and not compressor.requirements.trains
    assert compressor.setting() == "2:4 w4"


@pytest.mark.parametrize("grid", ["signed", "symmetric", "asymmetric"])
@pytest.mark.parametrize("range_", ["minmax", "mse"])
def test_every_grid_and_range(grid, range_):
    """The default is OBC's grid (signed, clipping search); every kind gives its level
    count, zero points are declared (16 bits each) and the mse grid never rounds worse."""
    compressor = MagnitudeRTN(w_bits=2, grid=grid, range=range_)
    model = wrap(toy_model())
    dense = {n: model.get_submodule(n).weight.detach().clone() for n in TARGETS}
    driven = drive(model, compressor, [(torch.randn(2, 4, 7, 7),)], lambda m, b: m(b[0]).sum())
    for name in TARGETS:
        w, spec = model.get_submodule(name).weight, driven.finalized.specs[name]
        assert satisfies_nm(w, NM(2, 4, "channel_major"))
        expected = magnitude_rtn(dense[name], NM(2, 4, "channel_major"), UniformGrid(2, grid), "prune_then_quantize", range_)
        assert torch.equal(w, expected)
        levels = max(torch.unique(row).numel() for row in w.reshape(16, -1))
        assert levels <= (3 if grid == "symmetric" else 4)
        zeros = 16 if grid == "asymmetric" else 0
        assert (spec.grid_kind, spec.grid_range, spec.zero_points, spec.scale_values) == (grid, range_, zeros, 16 + zeros)
    assert MagnitudeRTN().grid.kind == "signed" and MagnitudeRTN().range == "mse"
