"""Paper checks (issue 19): the published numbers, the identities, and each CLI shrunk."""

import json

import pytest
import torch

from slope_bench.analysis import layers as L
from slope_bench.analysis import main
from slope_bench.analysis import tensors as T
from slope_bench.obs import reconstruction_error, solve_layer, torch_threads
from slope_bench.quant import UniformGrid
from slope_bench.sparsity import NM


def test_gaussian_int4_and_75_percent_pruning_match_kuzmin():
    w = torch.randn(1 << 16, generator=torch.Generator().manual_seed(0))
    with torch_threads(1):
        sparsity, quant, prune = T.equal_compression(w, 4)
    assert sparsity == 0.75
    assert quant == pytest.approx(19.1, abs=0.3)
    assert prune == pytest.approx(5.6, abs=0.3)


def test_deadzone_width_equal_to_step_is_the_symmetric_quantizer_bit_for_bit():
    w = torch.randn(4096, generator=torch.Generator().manual_seed(1))
    for bits in range(2, 9):
        assert T.deadzone_identity(w, bits)["hardened_equal"]


def test_deadzone_sparsity_matches_gaussian_probability():
    for row in T.deadzone_sparsity_rows(1 << 14, points=5):
        assert abs(row["sparsity_measured"] - row["sparsity_predicted"]) <= row["tolerance"]


def test_slope_cosine_identity():
    g = torch.Generator().manual_seed(2)
    assert L.cosine_identity_error({"a": torch.randn(16, 64, generator=g), "b": torch.randn(8, 4, 3, 3, generator=g)}) <= 1e-6


def test_prune_then_quantize_never_exceeds_the_sum():
    rows = T.order_rows({"w": torch.randn(32, 64, generator=torch.Generator().manual_seed(3))}, [2, 4, 8])
    assert rows and not any(r["QS_exceeds_sum"] for r in rows)


def test_obc_beats_magnitude_rtn_on_a_toy_layer_with_known_hessian():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(16, 256, generator=g, dtype=torch.float64)
    x[1] = x[0] + 0.1 * x[1]  # correlated inputs: the Hessian matters
    h = 2 * x @ x.T
    w = torch.randn(8, 16, generator=g, dtype=torch.float64)
    for pattern, grid in ((NM(2, 4), None), (None, UniformGrid(4)), (NM(2, 4), UniformGrid(4))):
        base = reconstruction_error(w, solve_layer(w, h, pattern, None, grid, solver="magnitude").weight, h)
        obc = reconstruction_error(w, solve_layer(w, h, pattern, None, grid, solver="exact").weight, h)
        assert obc <= base


@pytest.mark.parametrize("check", ["prune-vs-quant", "order", "obc-layerwise", "alignment", "deadzone"])
def test_each_cli_shrunk(check, tmp_path):
    out = tmp_path / "out"
    assert main([check, "--out", str(out), "--quick", "--bits", "4"]) == 0
    name = check.replace("-", "_")
    assert (out / f"{name}.csv").is_file() and (out / f"{name}.png").is_file()
    text = (out / "paper_checks.md").read_text()
    assert "| agrees |" in text and check in text
    if check == "prune-vs-quant":
        header = (out / "prune_vs_quant.csv").read_text().splitlines()[0]
        assert header == "distribution,kurtosis,bits,sparsity,sqnr_quant_db,sqnr_prune_db"


def _fails(argv, capsys, word):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code != 0 and len(err.splitlines()) == 1 and word in err


def test_bad_inputs(tmp_path, capsys):
    out = tmp_path / "out"
    _fails(["nope", "--out", str(out)], capsys, "check")
    _fails(["order", "--out", str(out), "--bits", "9"], capsys, "--bits")
    _fails(["order", "--out", str(out), "--bits", "1"], capsys, "--bits")
    run = tmp_path / "run"
    run.mkdir()
    assert main(["order", "--out", str(out), "--run", str(run)]) == 2
    assert "results.json" in capsys.readouterr().err
    (run / "results.json").write_text(json.dumps({}))
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text(
        "seed: 0\nmodel: {name: resnet18}\ntask: {name: digits}\ndense: {epochs: 1, cache: true}\noptimizer: {lr: 0.1}\n"
        f"paths: {{cache_dir: {tmp_path / 'cache'}}}\n"
    )
    assert main(["order", "--out", str(out), "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert "dense reference" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".paper_checks-")]
