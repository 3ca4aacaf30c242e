"""OBC: ExactOBS / OBQ / blocked solvers against closed forms, baselines and invariants."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from slope_bench.calibration import collect_hessians
from slope_bench.errors import ConfigError
from slope_bench.methods.obc import (
    OBC,
    blocked_prune,
    blocked_quantize,
    exact_obq,
    exact_obs_prune,
    exact_prune,
    fit_row_quantizer,
    inverse_hessian,
    masked_inverse,
    prepare_hessian,
    reconstruction_error,
    solve_layer,
    upper_cholesky_of_inverse,
)
from slope_bench.quant import UniformGrid, fp16_exact
from slope_bench.sparsity import NM, Unstructured, as_matrix, satisfies_nm


def _layer(rows: int = 12, cols: int = 32, samples: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random weight and the Hessian of correlated inputs with a nonzero mean."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=generator) / math.sqrt(cols)
    x = torch.randn(samples, cols, generator=generator) @ mixing + 0.5 * torch.randn(cols, generator=generator)
    weight = torch.randn(rows, cols, generator=generator)
    return weight, 2 * x.double().T @ x.double()


def test_single_exact_obs_step_matches_closed_form() -> None:
    weight, hessian = _layer()
    h, w = prepare_hessian(hessian, weight, 0.01)
    hinv = inverse_hessian(h)
    pruned, row_hinv, removed, losses, order = exact_obs_prune(w, hinv, steps=1)
    diag = hinv.diagonal()
    expected_p = (w.square() / diag).argmin(1)
    assert torch.equal(order[:, 0], expected_p)
    for r in range(w.shape[0]):
        p = int(expected_p[r])
        delta = -w[r, p] / hinv[p, p] * hinv[:, p]  # δw = −w_p / [H⁻¹]_pp · H⁻¹_{:,p}
        torch.testing.assert_close(pruned[r], w[r] + delta, rtol=1e-10, atol=1e-10)
        assert pruned[r, p] == 0
        torch.testing.assert_close(losses[r, 0], w[r, p] ** 2 / (2 * hinv[p, p]))
        # the OBS loss is the reconstruction cost ½ δ H δᵀ of the update
        torch.testing.assert_close(0.5 * delta @ h @ delta, losses[r, 0])
    # the Gaussian-elimination downdate leaves the inverse of H with column p removed
    keep = ~removed
    torch.testing.assert_close(row_hinv, masked_inverse(h, keep), rtol=1e-8, atol=1e-10)


def test_sequential_obs_equals_least_squares_on_the_final_mask() -> None:
    weight, hessian = _layer(rows=6, cols=16)
    h, w = prepare_hessian(hessian, weight, 0.01)
    pruned, keep, _ = exact_prune(w, h, NM(2, 4), None)
    optimum = torch.bmm(masked_inverse(h, keep), (w @ h).unsqueeze(2)).squeeze(2)
    torch.testing.assert_close(pruned, optimum, rtol=1e-8, atol=1e-8)
    assert satisfies_nm(pruned, NM(2, 4)) and int(keep.sum()) == 6 * 8


SETTINGS = [
    pytest.param(NM(2, 4), None, UniformGrid(4), id="2:4-w4"),
    pytest.param(None, None, UniformGrid(4), id="w4"),
    pytest.param(None, None, UniformGrid(3, symmetric=False), id="w3-asym"),
    pytest.param(NM(2, 4), None, None, id="2:4"),
    pytest.param(NM(1, 4), None, UniformGrid(2), id="1:4-w2"),
    pytest.param(None, 0.6, UniformGrid(4), id="u60-w4"),
]


@pytest.mark.parametrize("solver", ["exact", "blocked"])
@pytest.mark.parametrize(("pattern", "sparsity", "grid"), SETTINGS)
def test_obc_beats_magnitude_and_round_to_nearest(solver: str, pattern, sparsity, grid) -> None:
    weight, hessian = _layer(seed=4)
    baseline = solve_layer(weight, hessian, pattern, sparsity, grid, solver="magnitude")
    solution = solve_layer(weight, hessian, pattern, sparsity, grid, solver=solver, block_size=8)
    assert solution.recon_error <= baseline.recon_error
    assert solution.recon_error < 0.9 * baseline.recon_error
    by_definition = reconstruction_error(weight, solution.weight, hessian)
    assert solution.recon_error == pytest.approx(by_definition)


def test_reconstruction_error_is_relative_output_error() -> None:
    weight, _ = _layer(rows=5, cols=8)
    x = torch.randn(40, 8, dtype=torch.float64)
    compressed = weight + 0.1 * torch.randn_like(weight)
    hessian = 2 * x.T @ x
    direct = (x @ (weight.double() - compressed.double()).T).square().sum() / (x @ weight.double().T).square().sum()
    assert reconstruction_error(weight, compressed, hessian) == pytest.approx(float(direct))


@pytest.mark.parametrize("block_size", [1, 8, 32])
def test_fixed_order_exact_obq_equals_blocked_gptq(block_size: int) -> None:
    weight, hessian = _layer(seed=5)
    h, w = prepare_hessian(hessian, weight, 0.01)
    quantizer = fit_row_quantizer(w, None, UniformGrid(3))
    exact = exact_obq(w, inverse_hessian(h), quantizer, greedy=False)
    blocked = blocked_quantize(w, upper_cholesky_of_inverse(h), quantizer, None, block_size)
    torch.testing.assert_close(exact, blocked, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_exact_and_blocked_quantization_agree(bits: int) -> None:
    weight, hessian = _layer(rows=16, cols=48, seed=6)
    exact = solve_layer(weight, hessian, None, None, UniformGrid(bits), solver="exact")
    blocked = solve_layer(weight, hessian, None, None, UniformGrid(bits), solver="blocked", block_size=16)
    assert exact.recon_error == pytest.approx(blocked.recon_error, rel=0.3)


def test_blocked_nm_is_close_to_exact_and_far_below_magnitude() -> None:
    """The fixed-order sweep cannot revisit finished groups, so it trails ExactOBS."""
    weight, hessian = _layer(rows=16, cols=48, seed=6)
    errors = {
        s: solve_layer(weight, hessian, NM(2, 4), None, UniformGrid(4), solver=s, block_size=16).recon_error
        for s in ("exact", "blocked", "magnitude")
    }
    assert errors["exact"] <= errors["blocked"] <= 2.5 * errors["exact"]
    assert errors["blocked"] < 0.7 * errors["magnitude"]


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (3, 8)])
def test_group_obs_finds_the_best_group_mask(n: int, m: int) -> None:
    """One group of m columns: the joint OBS removal equals the best masked least squares."""
    weight, hessian = _layer(rows=10, cols=m, samples=64, seed=11)
    h, w = prepare_hessian(hessian, weight, 0.01)
    pruned, keep = blocked_prune(w, upper_cholesky_of_inverse(h), NM(n, m), None, block_size=m)
    assert (keep.sum(1) == n).all()
    for r in range(w.shape[0]):
        best = math.inf
        for kept in itertools.combinations(range(m), n):
            mask = torch.zeros(1, m, dtype=torch.bool)
            mask[0, list(kept)] = True
            fit = (masked_inverse(h, mask)[0] @ (h @ w[r])).unsqueeze(0)
            cost = float(((w[r] - fit) @ h @ (w[r] - fit).T).squeeze())
            if cost < best:
                best, best_fit = cost, fit[0]
        torch.testing.assert_close(pruned[r], best_fit, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("solver", ["exact", "blocked"])
def test_unstructured_hits_the_target_exactly(solver: str) -> None:
    weight, hessian = _layer(rows=10, cols=24, seed=7)
    solution = solve_layer(weight, hessian, None, 0.55, None, solver=solver, block_size=8)
    assert int((solution.weight == 0).sum()) == round(0.55 * 10 * 24)
    assert torch.equal(solution.weight != 0, solution.keep)
    if solver == "exact":  # global order across rows: rows end up with different counts
        assert len(set((solution.weight == 0).sum(1).tolist())) > 1


def test_dead_columns_get_zero_weights_and_no_nans() -> None:
    weight, hessian = _layer(rows=8, cols=16, seed=8)
    hessian[:, 3] = 0
    hessian[3, :] = 0
    for solver in ("exact", "blocked"):
        solution = solve_layer(weight, hessian, NM(2, 4), None, UniformGrid(4), solver=solver, block_size=8)
        assert torch.isfinite(solution.weight).all()
        assert not solution.weight[:, 3].any()


def _check_grid(weight: torch.Tensor, keep: torch.Tensor | None, quantizer, grid: UniformGrid) -> None:
    """Every weight is exactly ``code × scale16`` with codes in range; pruned ones exactly 0."""
    scale = quantizer.scale
    assert torch.equal(scale, fp16_exact(scale))
    codes = quantizer.codes(weight.double())
    assert codes.min() >= grid.qmin and codes.max() <= grid.qmax
    assert torch.equal(quantizer.dequantize(codes).float(), weight)
    if keep is not None:
        assert not weight[~keep].any()
    if grid.symmetric:
        positive = [torch.unique(row[row > 0]).numel() for row in weight]
        assert max(positive) <= 2 ** (grid.bits - 1) - 1
    assert max(torch.unique(row).numel() for row in weight) <= grid.max_levels


@pytest.mark.parametrize("solver", ["exact", "blocked"])
@pytest.mark.parametrize("grid", [UniformGrid(3), UniformGrid(4, symmetric=False)])
def test_weights_land_exactly_on_the_grid(solver: str, grid: UniformGrid) -> None:
    weight, hessian = _layer(rows=8, cols=32, seed=9)
    solution = solve_layer(weight, hessian, NM(2, 4), None, grid, solver=solver, block_size=8)
    _check_grid(solution.weight, solution.keep, solution.quantizer, grid)
    assert satisfies_nm(solution.weight, NM(2, 4))


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
    model = compressor.prepare(model, TARGETS)
    running_mean = model.norm2.running_mean.clone()
    model = compressor.finalize(model, batches)
    assert set(compressor.specs) == set(TARGETS)
    for name in TARGETS:
        module = model.get_submodule(name)
        spec = compressor.specs[name]
        weight = module.weight.detach()
        assert type(module) in (nn.Conv2d, nn.Linear) and not hasattr(module, "parametrizations")
        applies = as_matrix(weight).shape[1] % 4 == 0
        assert spec.pattern == (NM(2, 4) if applies else None)
        assert (spec.grid, spec.bits, spec.granularity, spec.scale_values) == ("uniform", 4, "channel", weight.shape[0])
        if applies:
            assert satisfies_nm(weight, NM(2, 4))
        _check_grid(as_matrix(weight), None, compressor.quantizers[name], UniformGrid(4))
        extras = compressor.layer_extras[name]
        assert 0 < extras["recon_error"] < 1
        assert extras["solver"] == ("exact" if as_matrix(weight).shape[1] <= 32 else "blocked")
        assert extras["calib_rows"] > 0
        assert not torch.equal(weight, dense[name])
    assert not torch.allclose(model.norm2.running_mean, running_mean)
    assert not model.training
    assert compressor.extra_results["obc/recon_error_mean"] > 0
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
        compressor.finalize(compressor.prepare(model, TARGETS), batches)
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
    compressor.finalize(compressor.prepare(model, TARGETS), batches)
    for name in TARGETS:
        assert compressor.specs[name].pattern == Unstructured()
        assert compressor.specs[name].grid == "float"
        weight = model.get_submodule(name).weight
        assert float((weight == 0).float().mean()) == pytest.approx(0.5, abs=0.02)
    assert compressor.setting() == "50% fp32"


def test_channel_major_groups_and_asymmetric_scales() -> None:
    model, batches = _toy()
    compressor = OBC(w_bits=3, symmetric=False, nm_order="channel_major", progress=False)
    compressor.finalize(compressor.prepare(model, TARGETS), batches)
    pattern = NM(2, 4, "channel_major")
    assert satisfies_nm(model.body.weight, pattern)
    assert compressor.specs["body"].pattern == pattern
    assert compressor.specs["body"].scale_values == 2 * 16
    for name in TARGETS:
        weight = as_matrix(model.get_submodule(name).weight.detach(), "channel_major")
        _check_grid(weight, None, compressor.quantizers[name], UniformGrid(3, symmetric=False))


def test_finalize_needs_calibration_batches() -> None:
    model, _ = _toy()
    compressor = OBC(progress=False)
    compressor.prepare(model, TARGETS)
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
