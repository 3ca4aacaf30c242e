"""OBS/OBQ solvers (slope_bench.obs): ExactOBS, OBQ and blocked sweeps against closed forms,
baselines and invariants."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from slope_bench.obs import (
    RowQuantizer,
    blocked_prune,
    blocked_quantize,
    blocked_sweep,
    chunk_elements,
    estimate_exact_seconds,
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
from slope_bench.quant import MIN_SCALE, UniformGrid, codes, fp16_exact, grouped, harden
from slope_bench.sparsity import NM, satisfies_nm


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
    pytest.param(None, None, UniformGrid(3, "asymmetric"), id="w3-asym"),
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
    if not grid.zero_point:
        positive = [torch.unique(row[row > 0]).numel() for row in weight]
        assert max(positive) <= 2 ** (grid.bits - 1) - 1
    assert max(torch.unique(row).numel() for row in weight) <= grid.max_levels


@pytest.mark.parametrize("solver", ["exact", "blocked"])
@pytest.mark.parametrize("grid", [UniformGrid(3), UniformGrid(4, "asymmetric")])
def test_weights_land_exactly_on_the_grid(solver: str, grid: UniformGrid) -> None:
    weight, hessian = _layer(rows=8, cols=32, seed=9)
    solution = solve_layer(weight, hessian, NM(2, 4), None, grid, solver=solver, block_size=8)
    _check_grid(solution.weight, solution.keep, solution.quantizer, grid)
    assert satisfies_nm(solution.weight, NM(2, 4))


@pytest.mark.parametrize(
    "grid", [UniformGrid(1), UniformGrid(3, "symmetric"), UniformGrid(3), UniformGrid(4, "asymmetric"), UniformGrid(2, "asymmetric")]
)
def test_row_quantizer_uses_the_grid_of_quant(grid: UniformGrid) -> None:
    """The row grid's codes and values are quant's: same codes as ``quant.codes``, values
    ``(code − zero) · scale`` with codes in range, and ``harden`` with the same step and
    zero point gives the same tensor (min-max: symmetric ``R/qmax``, signed ``2R/(2^b − 1)``)."""
    weight = torch.randn(6, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    quantizer = fit_row_quantizer(weight, None, grid)
    assert float(quantizer.scale.min()) >= MIN_SCALE
    row_codes = quantizer.codes(weight)
    assert row_codes.min() >= grid.qmin and row_codes.max() <= grid.qmax
    zero = quantizer.zero if grid.zero_point else 0
    assert torch.equal(quantizer.quantize(weight), (row_codes - zero) * quantizer.scale)
    assert torch.equal(row_codes, codes(weight, quantizer.scale, grid, quantizer.zero if grid.zero_point else None))
    torch.testing.assert_close(harden(weight, quantizer.scale, grid, zero=quantizer.zero), quantizer.quantize(weight), rtol=0, atol=0)
    amax = weight.abs().amax(1, keepdim=True)
    if grid.kind == "symmetric":
        assert torch.equal(quantizer.scale, fp16_exact(amax / grid.qmax))
    elif grid.kind == "signed" and not grid.binary:
        assert torch.equal(quantizer.scale, fp16_exact(2 * amax / (2**grid.bits - 1)))
    elif grid.zero_point:  # 0 is a grid value: an exact zero stays exactly zero
        assert torch.equal(quantizer.quantize(torch.zeros_like(weight)), torch.zeros_like(weight))
    assert grouped(weight, grid).shape == weight.shape


def test_row_quantizer_on_a_slice_of_rows() -> None:
    weight = torch.randn(4, 8, dtype=torch.float64)
    quantizer = fit_row_quantizer(weight, None, UniformGrid(3))
    part = RowQuantizer(quantizer.grid, quantizer.scale[1:3], quantizer.zero[1:3])
    assert torch.equal(part.quantize(weight[1:3]), quantizer.quantize(weight)[1:3])


# ---------------------------------------------------------------------------- issue 17
def sparsegpt_reference(w: torch.Tensor, upper: torch.Tensor, pattern, sparsity, quantizer, block: int) -> torch.Tensor:
    """SparseGPT (Frantar & Alistarh 2023, Alg. 1) written straight from the paper, one
    column at a time, no lazy updates: N:M masks chosen when a group starts by the
    saliency ``w² / [H⁻¹]_jj`` (``[H⁻¹]_jj = U_jj²``), unstructured masks per block of
    ``block`` columns; every column quantized (0 where pruned) and its error
    ``(w_j − q_j) / U_jj`` propagated to the later columns through row ``j`` of ``U``."""
    w = w.clone()
    rows, d = w.shape
    keep = torch.ones(rows, d, dtype=torch.bool)
    done = 0
    for j in range(d):
        if pattern is not None and j % pattern.m == 0:
            saliency = w[:, j : j + pattern.m] ** 2 / torch.diagonal(upper)[j : j + pattern.m] ** 2
            for r in range(rows):
                for c in saliency[r].argsort()[: pattern.m - pattern.n].tolist():
                    keep[r, j + c] = False
        if pattern is None and sparsity and j % block == 0:
            end = min(j + block, d)
            count = round(sparsity * rows * end) - done
            saliency = (w[:, j:end] ** 2 / torch.diagonal(upper)[j:end] ** 2).flatten()
            for flat in saliency.argsort(stable=True)[:count].tolist():
                keep[flat // (end - j), j + flat % (end - j)] = False
            done += count
        q = quantizer.quantize((w[:, j] * keep[:, j])[:, None])[:, 0] * keep[:, j]
        error = (w[:, j] - q) / upper[j, j]
        for k in range(j, d):
            w[:, k] -= error * upper[j, k]
        w[:, j] = q
    return w * keep


@pytest.mark.parametrize(("pattern", "sparsity"), [(NM(2, 4), None), (NM(1, 4), None), (None, 0.6)], ids=["2:4", "1:4", "u60"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_one_sweep_equals_sparsegpt_written_from_the_paper(pattern, sparsity, bits: int) -> None:
    weight, hessian = _layer(rows=6, cols=32, seed=bits)
    h, w = prepare_hessian(hessian, weight, 0.01)
    upper = upper_cholesky_of_inverse(h)
    quantizer = fit_row_quantizer(w, None, UniformGrid(bits), "mse")
    expected = sparsegpt_reference(w, upper, pattern, sparsity, quantizer, block=8)
    got, keep = blocked_sweep(w, upper, pattern, sparsity, quantizer, None, block_size=8, group_rule="sparsegpt")
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    assert not bool(got[~keep].any()) and not bool(expected[~keep].any())  # the same mask
    torch.testing.assert_close(quantizer.quantize(got), got, rtol=0, atol=1e-12)  # on the grid


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("range_", ["minmax", "mse"])
@pytest.mark.parametrize("pattern", [NM(2, 4), NM(1, 4)], ids=str)
def test_one_sweep_is_never_worse_than_two_pass(bits: int, range_: str, pattern) -> None:
    """On random layers (4 seeds), the joint solve in one sweep beats pruning then
    quantizing in two sweeps (both on the same grid); recorded per layer."""
    for seed in range(4):
        weight, hessian = _layer(rows=16, cols=64, seed=seed)
        args = dict(pattern=pattern, grid=UniformGrid(bits), solver="blocked", block_size=16, range_=range_)
        one = solve_layer(weight, hessian, joint="one_sweep", **args)
        two = solve_layer(weight, hessian, joint="two_pass", **args)
        assert one.extras == {"solver": "blocked", "joint": "one_sweep"} and two.extras["joint"] == "two_pass"
        assert one.recon_error <= two.recon_error, (seed, one.recon_error, two.recon_error)
        assert satisfies_nm(one.weight, pattern)
        assert torch.equal(one.quantizer.scale, two.quantizer.scale)  # the same grid: only the sweep differs


def test_outlier_rule_quantizes_out_of_range_weights_first() -> None:
    """OBC §5: an open weight outside the grid's range (error above s²/4) goes first.

    ``w = [0.7, 5.0]``, codes ``[-3, 3]``, ``s = 1``, ``H⁻¹ = [[1, .5], [.5, 4]]``. Greedy
    scores ``(q(w) − w)² / [H⁻¹]_pp`` = ``[0.09, 1.0]``: column 0 first, ``w −= (0.7 − 1)·[1, .5]``
    → ``[1, 5.15]`` → ``[1, 3]``. With the rule column 1 (error 4 > 1/4) first,
    ``w −= (5 − 3)/4 · [.5, 4]`` → ``[0.45, 3]`` → ``[0, 3]``."""
    quantizer = RowQuantizer(UniformGrid(3, "symmetric"), torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64))
    w = torch.tensor([[0.7, 5.0]], dtype=torch.float64)
    hinv = torch.tensor([[1.0, 0.5], [0.5, 4.0]], dtype=torch.float64)
    assert exact_obq(w, hinv, quantizer).tolist() == [[1.0, 3.0]]
    assert exact_obq(w, hinv, quantizer, outlier_rule=True).tolist() == [[0.0, 3.0]]
    assert exact_obq(w, hinv, quantizer, greedy=False, outlier_rule=True).tolist() == [[1.0, 3.0]]  # fixed order: no rule


@pytest.mark.parametrize("grid", [UniformGrid(2), UniformGrid(3, "asymmetric")])
def test_outlier_rule_layer_error_stays_close(grid: UniformGrid) -> None:
    weight, hessian = _layer(rows=16, cols=32, seed=12)
    on = solve_layer(weight, hessian, NM(2, 4), None, grid, solver="exact", outlier_rule=True, range_="mse")
    off = solve_layer(weight, hessian, NM(2, 4), None, grid, solver="exact", outlier_rule=False, range_="mse")
    assert 0.75 < on.recon_error / off.recon_error < 1.25  # a reordering: a few percent either way (here −10%)


def test_exact_cost_estimate_grows_with_the_layer(monkeypatch) -> None:
    import slope_bench.obs as obs

    monkeypatch.setattr(obs, "_RATES", {("cpu", torch.get_num_threads()): (1e-5, 1e-9)})
    small = estimate_exact_seconds(16, 64, NM(2, 4), None, UniformGrid(4), "cpu")
    big = estimate_exact_seconds(16, 128, NM(2, 4), None, UniformGrid(4), "cpu")
    assert small == pytest.approx(1 * 64 * 1e-5 + 16 * 64 * 64**2 * 1e-9)  # one chunk, 64 steps per row
    assert big > 7 * small
    assert chunk_elements("cpu") == 2**23


def test_exact_rate_is_measured_once() -> None:
    import slope_bench.obs as obs

    obs._RATES.clear()
    per_iteration, per_element = obs.exact_rate("cpu")
    assert per_iteration > 0 and per_element > 0
    assert obs.exact_rate("cpu") == (per_iteration, per_element)
