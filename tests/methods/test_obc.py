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


RATES = (1e-5, 1e-9)  # seconds per solver iteration / per element update, pinned for the tests


@pytest.fixture
def pinned_rates(monkeypatch):
    """The exact solver's measured rates replaced by :data:`RATES` (any thread count)."""
    import slope_bench.obs as obs

    monkeypatch.setattr(obs, "exact_rate", lambda device: RATES)


@pytest.mark.parametrize("sequential", [True, False])
def test_finalize_invariants_on_a_toy_model(sequential: bool, pinned_rates) -> None:
    model, batches = _toy()
    dense = {name: model.get_submodule(name).weight.detach().clone() for name in TARGETS}
    # estimates (RATES): stem 4e-4 s, body 7e-3 s, proj 2e-4 s, head 2e-4 s: only body exceeds 1 ms
    compressor = OBC(n=2, m=4, w_bits=4, exact_budget_s=1e-3, sequential=sequential, progress=False, nm_order="input")
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
        assert (spec.grid_kind, spec.grid_range, spec.zero_points) == ("signed", "mse", 0)
        if applies:
            assert satisfies_nm(weight, NM(2, 4))
        _check_grid(as_matrix(weight), compressor.quantizers[name], UniformGrid(4))
        extras = done.layer_extras[name]
        assert 0 < extras["recon_error"] < 1
        assert extras["solver"] == ("blocked" if name == "body" else "exact")
        assert extras["solver"] == ("exact" if extras["exact_est_s"] <= 1e-3 else "blocked")
        assert extras["joint"] == (None if not applies else "one_sweep" if name == "body" else "two_pass")
        assert extras["solve_s"] >= 0
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


@pytest.mark.parametrize("joint", ["one_sweep", "two_pass"])
def test_channel_major_groups_and_asymmetric_scales(joint: str) -> None:
    model, batches = _toy()
    compressor = OBC(w_bits=3, grid="asymmetric", range="minmax", joint=joint, progress=False)
    assert compressor.pattern == NM(2, 4, "channel_major")  # the default for convolutions
    done = compressor.finalize(compressor.prepare(model, TARGETS, INFO), batches)
    pattern = NM(2, 4, "channel_major")
    assert satisfies_nm(model.body.weight, pattern)
    assert done.specs["body"].pattern == pattern
    assert done.specs["body"].scale_values == 2 * 16 and done.specs["body"].zero_points == 16  # a 16-bit zero point per row
    assert done.specs["body"].grid_kind == "asymmetric" and compressor.setting() == "2:4 w3 asym"
    assert done.layer_extras["body"]["joint"] == ("two_pass" if done.layer_extras["body"]["solver"] == "exact" else joint)
    for name in TARGETS:
        weight = as_matrix(model.get_submodule(name).weight.detach(), "channel_major")
        _check_grid(weight, compressor.quantizers[name], UniformGrid(3, "asymmetric"))


def test_solver_choice_follows_the_budget(pinned_rates) -> None:
    """``exact_budget_s``: null runs the exact solver everywhere (no estimate), 0 the
    blocked one everywhere, ``auto`` is unlimited on a GPU and ``CPU_EXACT_BUDGET_S`` on a
    CPU; each layer records the choice, the estimate and its time."""
    from slope_bench.methods.obc import CPU_EXACT_BUDGET_S

    for budget, expected in ((None, "exact"), (0.0, "blocked")):
        model, batches = _toy()
        compressor = OBC(exact_budget_s=budget, progress=False, bn_recalib=False)
        done = compressor.finalize(compressor.prepare(model, TARGETS, INFO), batches)
        assert {extras["solver"] for extras in done.layer_extras.values()} == {expected}
        assert all((extras["exact_est_s"] is None) == (budget is None) for extras in done.layer_extras.values())
        assert f"time/obc_solve_{expected}_s" in done.results
    auto = OBC(progress=False)
    assert auto.budget(torch.device("cpu")) == CPU_EXACT_BUDGET_S and auto.budget(torch.device("cuda")) is None
    assert auto.layer_solver(16, 72, NM(2, 4), torch.device("cpu")) == ("exact", pytest.approx(7.2e-4 + 16 * 72 * 72**2 * 1e-9))
    assert auto.layer_solver(512, 4608, NM(2, 4), torch.device("cpu"))[0] == "blocked"
    assert OBC(solver="blocked").layer_solver(16, 72, NM(2, 4), torch.device("cpu")) == ("blocked", None)


def test_exact_solver_runs_chunk_by_chunk_and_records_its_time() -> None:
    """A layer larger than one chunk of per-row inverse Hessians gives the same result."""
    import slope_bench.obs as obs

    model, batches = _toy()
    weight = model.body.weight.detach().clone()
    hessian = collect_hessians(model, ["body"], batches)["body"]
    matrix = as_matrix(weight)
    whole = obs.solve_layer(matrix, hessian, NM(2, 4), None, UniformGrid(3), solver="exact", range_="mse", outlier_rule=True)
    original = obs.EXACT_CHUNK_ELEMENTS
    try:
        obs.EXACT_CHUNK_ELEMENTS = 3 * 72 * 72  # 3 rows per chunk
        chunked = obs.solve_layer(matrix, hessian, NM(2, 4), None, UniformGrid(3), solver="exact", range_="mse", outlier_rule=True)
    finally:
        obs.EXACT_CHUNK_ELEMENTS = original
    assert torch.equal(whole.weight, chunked.weight)


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
        ({"exact_budget_s": -1.0}, "exact_budget_s"),
        ({"exact_budget_s": "soon"}, "exact_budget_s"),
        ({"grid": "ternary"}, "grid"),
        ({"range": "lsq"}, "range"),
        ({"joint": "both"}, "joint"),
        ({"outlier_rule": "yes"}, "outlier_rule"),
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
