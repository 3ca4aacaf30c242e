"""Paper checks (issue 19): the published numbers, the identities, and each CLI shrunk."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from slope_bench.analysis import checks as C
from slope_bench.analysis import layers as L
from slope_bench.analysis import main
from slope_bench.analysis import tensors as T
from slope_bench.obs import reconstruction_error, solve_layer, torch_threads
from slope_bench.quant import UniformGrid
from slope_bench.sparsity import NM
from tests.conftest import ROOT, RUN_SHRINK, compose_config


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


# ---------------------------------------------------------------------------- --run on a real finished run
RUN_CHECKS = ["prune-vs-quant", "order", "obc-layerwise", "alignment"]  # the checks that read --run


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A real ``run(cfg)`` of slope on resnet18 (width 4) / digits, one dense and one
    fine-tune epoch, no dense control; ``.hydra/config.yaml`` saved as ``run.py`` saves it."""
    from omegaconf import OmegaConf

    from slope_bench.train import run

    base = tmp_path_factory.mktemp("analysis_run")
    overrides = [*RUN_SHRINK, "model.width=4", "method=slope", "task.batch_size=512", "task.augment=false", "control.dense_ft=false"]
    cfg = compose_config(overrides, base, base / "cache")
    results = run(cfg)
    run_dir = Path(cfg.paths.output_dir)
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")  # Hydra's job config (run(cfg) alone writes none)
    [dense] = (base / "cache" / "dense").glob("*.safetensors")
    return {"dir": run_dir, "base": base, "layers": [r["name"] for r in results["layers"]], "dense": load_file(dense)}


def _csv(path: Path) -> pd.DataFrame:
    table = pd.read_csv(path)
    numbers = table.select_dtypes("number").to_numpy(dtype=float)
    assert len(table) and numbers.size and np.isfinite(numbers).all(), f"{path.name}: empty or not finite"
    return table


def _layers(table: pd.DataFrame, **where) -> list[str]:
    for key, value in where.items():
        table = table[table[key] == value]
    return table.layer.tolist()


@pytest.mark.parametrize("check", RUN_CHECKS)
def test_each_check_on_a_finished_run(check, finished_run, tmp_path):
    run_dir, layers, dense = finished_run["dir"], finished_run["layers"], finished_run["dense"]
    assert layers and dense
    out = tmp_path / "out"
    assert main([check, "--out", str(out), "--run", str(run_dir), "--quick", "--bits", "4"]) == 0
    name = check.replace("-", "_")
    assert (out / f"{name}.csv").is_file() and (out / f"{name}.png").is_file()
    text = (out / "paper_checks.md").read_text()
    assert f"dense reference of {run_dir}" in text and f"{len(layers)} compressed layers" in text
    if check == "prune-vs-quant":  # one row per layer of the run (one bit width), on the dense reference's weights
        table = _csv(out / "prune_vs_quant_layers.csv")
        assert _layers(table) == layers
        for row in table.itertuples():
            assert row.kurtosis == pytest.approx(T.kurtosis(dense[f"{row.layer}.weight"]))
    elif check == "order":
        table = _csv(out / "order.csv")
        assert set(table.pattern) == {"2:4", "1:4"}
        for pattern in ("2:4", "1:4"):
            assert _layers(table, pattern=pattern, bits=4) == layers
    elif check == "obc-layerwise":  # the layers above the --quick column limit are skipped and named
        table = _csv(out / "obc_layerwise.csv")
        cols = {n: dense[f"{n}.weight"][0].numel() for n in layers}
        kept = [n for n in layers if cols[n] <= C.OBC_MAX_COLS_QUICK]
        assert kept and len(kept) < len(layers)
        for setting in L.OBC_SETTINGS:
            assert _layers(table, setting=setting) == kept
        assert all(n in text for n in layers if n not in kept)
        assert table.obc_beats_baseline.all()
    else:
        table = _csv(out / "alignment.csv")
        for mode in L.ALIGNMENT_MODES:
            assert _layers(table, alignment=mode) == layers


def test_run_config_with_hydra_interpolations(finished_run, tmp_path):
    """``.hydra/config.yaml`` as ``run.py`` writes it by default (``${hydra:runtime.cwd}`` paths),
    read outside Hydra: the paths are rooted at the run's recorded cwd."""
    from omegaconf import OmegaConf

    run_dir, base = finished_run["dir"], finished_run["base"]
    assert "${hydra:runtime.cwd}" in (ROOT / "conf" / "paths" / "default.yaml").read_text()
    moved = tmp_path / "moved"
    (moved / ".hydra").mkdir(parents=True)
    shutil.copy(run_dir / "results.json", moved / "results.json")
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    cfg.paths = OmegaConf.load(ROOT / "conf" / "paths" / "default.yaml")  # cache_dir: ${paths.root_dir}/.cache/slope_bench
    OmegaConf.save(cfg, moved / ".hydra" / "config.yaml")
    cwd = tmp_path / "cwd"
    (cwd / ".cache").mkdir(parents=True)
    (cwd / ".cache" / "slope_bench").symlink_to(base / "cache")
    OmegaConf.save(OmegaConf.create({"hydra": {"runtime": {"cwd": str(cwd)}}}), moved / ".hydra" / "hydra.yaml")
    out = tmp_path / "out"
    assert main(["order", "--out", str(out), "--run", str(moved), "--quick", "--bits", "4"]) == 0
    assert _layers(_csv(out / "order.csv"), pattern="2:4") == finished_run["layers"]


def _run_copy(src: Path, dst: Path, cache_dir: Path | None = None, results: bool = True) -> Path:
    from omegaconf import OmegaConf

    (dst / ".hydra").mkdir(parents=True)
    cfg = OmegaConf.load(src / ".hydra" / "config.yaml")
    if cache_dir is not None:
        cfg.paths.cache_dir = str(cache_dir)
    OmegaConf.save(cfg, dst / ".hydra" / "config.yaml")
    if results:
        shutil.copy(src / "results.json", dst / "results.json")
    return dst


@pytest.mark.parametrize("case", ["no results.json", "dense reference missing"])
def test_bad_run_dir_is_one_line_naming_run(case, finished_run, tmp_path, capsys):
    if case == "no results.json":
        bad = _run_copy(finished_run["dir"], tmp_path / "bad", results=False)
        word = "results.json"
    else:
        bad = _run_copy(finished_run["dir"], tmp_path / "bad", cache_dir=tmp_path / "empty_cache")
        word = "dense reference"
    out = tmp_path / "out"
    for check in [*RUN_CHECKS, "all"]:
        assert main([check, "--out", str(out), "--run", str(bad), "--quick"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--run" in err[0] and word in err[0], err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".paper_checks-")]
