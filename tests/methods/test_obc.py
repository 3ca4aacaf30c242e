"""OBC the method: post-training declaration, supported layers, finalize invariants on a toy
model, sequential calibration, settings and bad input (the solvers: tests/test_obs.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slope_bench.calibration import collect_hessians
from slope_bench.errors import ConfigError
from slope_bench.loop import drive
from slope_bench.methods.base import Finalized, Requirements, RunInfo
from slope_bench.methods.obc import OBC
from slope_bench.quant import UniformGrid, fp16_exact
from slope_bench.sparsity import NM, Unstructured, as_matrix, satisfies_nm

INFO = RunInfo(num_train=24)


def _check_grid(weight: torch.Tensor, quantizer, grid: UniformGrid) -> None:
    """Every weight is exactly ``code × scale16`` with codes in range."""
    assert torch.equal(quantizer.scale, fp16_exact(quantizer.scale))
    codes = quantizer.codes(weight.double())
    assert codes.min() >= grid.qmin and codes.max() <= grid.qmax
    assert torch.equal(quantizer.dequantize(codes).float(), weight)
    assert max(torch.unique(row).numel() for row in weight) <= grid.max_levels


# ---- the compressor on a toy model -----------------------------------------------------
class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)  # d_col = 27: N:M does not apply
        self.norm = nn.BatchNorm2d(8)
        self.body = nn.Conv2d(8, 16, 3, padding=1, bias=False)  # d_col = 72
        self.norm2 = nn.BatchNorm2d(16)
        self.proj = nn.Conv2d(16, 16, 1)  # d_col = 16
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm(self.stem(x)))
        x = torch.relu(self.norm2(self.body(x)))
        return self.head(self.proj(x).mean((2, 3)))


TARGETS = ["stem", "body", "proj", "head"]


def _toy() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(10)
    model = _Toy()
    batches = [torch.randn(8, 3, 6, 6) for _ in range(3)]
    model.train()
    with torch.no_grad():
        for batch in batches:  # give BatchNorm non-trivial running statistics
            model(2 * batch + 1)
    return model.eval(), batches


@pytest.mark.parametrize("sequential", [True, False])
def test_finalize_invariants_on_a_toy_model(sequential: bool) -> None:
    model, batches = _toy()
    dense = {name: model.get_submodule(name).weight.detach().clone() for name in TARGETS}
    compressor = OBC(n=2, m=4, w_bits=4, exact_max_cols=32, sequential=sequential, progress=False)
    model = compressor.prepare(model, TARGETS, INFO)
    running_mean = model.norm2.running_mean.clone()
    done = compressor.finalize(model, batches)
    assert isinstance(done, Finalized) and set(done.specs) == set(TARGETS)
    for name in TARGETS:
        module = model.get_submodule(name)
        spec = done.specs[name]
        weight = module.weight.detach()
        assert type(module) in (nn.Conv2d, nn.Linear) and not hasattr(module, "parametrizations")
        applies = as_matrix(weight).shape[1] % 4 == 0
        assert spec.pattern == (NM(2, 4) if applies else None)
        assert (spec.grid, spec.bits, spec.granularity, spec.scale_values) == ("uniform", 4, "channel", weight.shape[0])
        if applies:
            assert satisfies_nm(weight, NM(2, 4))
        _check_grid(as_matrix(weight), compressor.quantizers[name], UniformGrid(4))
        extras = done.layer_extras[name]
        assert 0 < extras["recon_error"] < 1
        assert extras["solver"] == ("exact" if as_matrix(weight).shape[1] <= 32 else "blocked")
        assert extras["calib_rows"] > 0
        assert not torch.equal(weight, dense[name])
        assert ("note" in extras) == (not applies)
    assert done.layer_extras["stem"]["note"] == "2:4 not applied: input size 27 is not divisible by m=4"
    assert not torch.allclose(model.norm2.running_mean, running_mean)
    assert not model.training
    assert done.results["obc/recon_error_mean"] > 0
    assert {"time/obc_total_s", "time/obc_calib_s", "time/obc_bn_recalib_s"} <= set(done.results)
    assert compressor.setting() == "2:4 w4"


def test_sequential_layers_see_the_compressed_layers_before_them(monkeypatch) -> None:
    seen = {}
    original = OBC.compress_layer

    def spy(self, name, module, hessian):
        seen[name] = hessian.clone()
        return original(self, name, module, hessian)

    monkeypatch.setattr(OBC, "compress_layer", spy)
    for sequential in (True, False):
        model, batches = _toy()
        dense_hessians = collect_hessians(model, TARGETS, batches)
        compressor = OBC(w_bits=4, sequential=sequential, bn_recalib=False, progress=False)
        compressor.finalize(compressor.prepare(model, TARGETS, INFO), batches)
        assert list(seen) == ["stem", "body", "proj", "head"]  # execution order
        torch.testing.assert_close(seen["stem"], dense_hessians["stem"])
        if sequential:  # H of the final model's inputs: the earlier layers are compressed
            final = collect_hessians(model, ["proj", "head"], batches)
            torch.testing.assert_close(seen["proj"], final["proj"])
            assert not torch.allclose(seen["proj"], dense_hessians["proj"])
        else:
            torch.testing.assert_close(seen["proj"], dense_hessians["proj"])
        seen.clear()


def test_unstructured_and_full_precision_settings() -> None:
    model, batches = _toy()
    compressor = OBC(n=None, m=None, sparsity=0.5, w_bits=None, progress=False)
    done = compressor.finalize(compressor.prepare(model, TARGETS, INFO), batches)
    for name in TARGETS:
        assert done.specs[name].pattern == Unstructured()
        assert done.specs[name].grid == "float"
        weight = model.get_submodule(name).weight
        assert float((weight == 0).float().mean()) == pytest.approx(0.5, abs=0.02)
    assert compressor.setting() == "50% fp32"


def test_channel_major_groups_and_asymmetric_scales() -> None:
    model, batches = _toy()
    compressor = OBC(w_bits=3, symmetric=False, nm_order="channel_major", progress=False)
    done = compressor.finalize(compressor.prepare(model, TARGETS, INFO), batches)
    pattern = NM(2, 4, "channel_major")
    assert satisfies_nm(model.body.weight, pattern)
    assert done.specs["body"].pattern == pattern
    assert done.specs["body"].scale_values == 2 * 16
    for name in TARGETS:
        weight = as_matrix(model.get_submodule(name).weight.detach(), "channel_major")
        _check_grid(weight, compressor.quantizers[name], UniformGrid(3, symmetric=False))


def test_finalize_needs_calibration_batches() -> None:
    model, _ = _toy()
    compressor = OBC(progress=False)
    compressor.prepare(model, TARGETS, INFO)
    with pytest.raises(ValueError, match="calibration"):
        compressor.finalize(model, [])


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"n_calib": 0}, "n_calib"),
        ({"n_calib": 1.5}, "n_calib"),
        ({"damp": 0.0}, "damp"),
        ({"damp": -0.1}, "damp"),
        ({"n": 5, "m": 4}, "n"),
        ({"n": 2, "m": None}, "m"),
        ({"w_bits": 9}, "w_bits"),
        ({"w_bits": 0}, "w_bits"),
        ({"solver": "fast"}, "solver"),
        ({"sparsity": 0.5}, "sparsity"),
        ({"n": None, "m": None, "sparsity": 1.0}, "sparsity"),
        ({"calib_passes": 0}, "calib_passes"),
        ({"block_size": 0}, "block_size"),
        ({"exact_max_cols": 0}, "exact_max_cols"),
        ({"sequential": "yes"}, "sequential"),
    ],
)
def test_bad_configuration_raises_config_error(overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError) as error:
        OBC(**overrides)
    assert error.value.key == key


def test_post_training_declares_its_calibration_data() -> None:
    needs = OBC(n_calib=256, calib_passes=2).requirements
    assert needs == Requirements(trains=False, calib_samples=256, calib_passes=2)


class _Grouped(nn.Module):
    first_layers: list[str] = []
    classifier_layers: list[str] = []

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.depthwise(torch.relu(self.conv(x)))).mean((2, 3)))


def test_grouped_convolutions_are_not_supported_and_stay_dense() -> None:
    torch.manual_seed(0)
    model = _Grouped()
    depthwise = model.depthwise.weight.detach().clone()
    compressor = OBC(w_bits=4, progress=False, bn_recalib=False)
    reason = compressor.supports("depthwise", model.depthwise)
    assert reason is not None and "groups=8" in reason
    assert compressor.supports("conv", model.conv) is None
    batches = [(torch.randn(4, 3, 6, 6), torch.randint(0, 4, (4,))) for _ in range(2)]
    driven = drive(model, compressor, batches, lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    assert driven.targets == ["conv", "head"] and set(driven.skipped) == {"depthwise"}
    assert driven.step_seconds == []  # post-training: no optimizer step
    assert set(driven.finalized.specs) == {"conv", "head"}
    assert torch.equal(model.depthwise.weight, depthwise)
