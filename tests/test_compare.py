"""Paired comparisons on hand-made results.json sets (issue 18 §3)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from slope_bench import compare, leaderboard, results_table

pytest.importorskip("scipy")

BASE = (0.901, 0.913, 0.897, 0.925, 0.908, 0.919, 0.894, 0.911, 0.904, 0.916)  # one value per seed


def put(root: Path, method: str, setting: str, seed: int, top1: float, ratio: float = 10.0, **extra) -> None:
    record = {
        "method": method,
        "model": "resnet18",
        "task": "digits",
        "seed": seed,
        "setting": setting,
        "status": "ok",
        "main_metric": "top1",
        "test/top1": top1,
        "test/top1_dense": 0.95,
        "test/retention": top1 / 0.95,
        "compress/ratio": ratio,
    }
    record.update(extra)
    name = "_".join(str(v) for v in (method, setting, record["model"], record["task"], record.get("config_id", ""), seed))
    run_dir = root / name.replace(" ", "-").replace(":", "-")
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps(record))


def table(root: Path, **kwargs) -> pd.DataFrame:
    runs, _ = results_table.collect([root])
    return compare.compare(runs, **kwargs)


def only(frame: pd.DataFrame, metric: str = "test/top1") -> pd.Series:
    rows = frame[frame["metric"] == metric]
    assert len(rows) == 1, rows
    return rows.iloc[0]


def test_a_better_by_exactly_0_010_on_10_seeds(tmp_path: Path) -> None:
    for seed, base in enumerate(BASE):
        put(tmp_path, "slope", "2:4 w4", seed, base + 0.010)
        put(tmp_path, "naive", "2:4 w4", seed, base)
    row = only(table(tmp_path, baseline="naive"))
    assert (row["method_a"], row["method_b"], row["setting"]) == ("slope", "naive", "2:4 w4")
    assert row["n_pairs"] == 10 and row["mean_diff"] == pytest.approx(0.010, abs=1e-12)
    assert row["ci_low"] > 0 and row["ci_high"] > 0  # the interval excludes 0
    assert row["ci_low"] == pytest.approx(0.010, abs=1e-9) and row["ci_high"] == pytest.approx(0.010, abs=1e-9)
    assert row["p_value"] == pytest.approx(2 / 2**10)  # exact sign-flip test: only the observed signs and their mirror
    assert row["p_holm"] == pytest.approx(row["p_value"]) and row["verdict"] == "a_better"
    flipped = only(table(tmp_path, baseline="slope"))  # the other way round
    assert flipped["method_a"] == "naive" and flipped["verdict"] == "b_better" and flipped["mean_diff"] < 0


def test_identical_runs_have_no_detectable_difference_and_p_one(tmp_path: Path) -> None:
    for seed, base in enumerate(BASE):
        put(tmp_path, "slope", "2:4 w4", seed, base)
        put(tmp_path, "naive", "2:4 w4", seed, base)
    row = only(table(tmp_path))
    assert row["mean_diff"] == 0 and row["ci_low"] == 0 and row["ci_high"] == 0
    assert row["p_value"] == 1 and row["p_holm"] == 1 and row["verdict"] == "no_detectable_difference"


def test_zero_mean_noise_has_no_detectable_difference(tmp_path: Path) -> None:
    noise = np.random.default_rng(7).normal(0.0, 0.01, size=len(BASE))
    noise -= noise.mean()
    for seed, (base, delta) in enumerate(zip(BASE, noise, strict=True)):
        put(tmp_path, "slope", "2:4 w4", seed, base + delta)
        put(tmp_path, "naive", "2:4 w4", seed, base)
    row = only(table(tmp_path))
    assert row["n_pairs"] == 10 and abs(row["mean_diff"]) < 1e-12
    assert row["ci_low"] < 0 < row["ci_high"] and row["p_value"] > 0.5
    assert row["verdict"] == "no_detectable_difference"


def test_two_pairs_are_not_enough(tmp_path: Path) -> None:
    for seed in (0, 1):
        put(tmp_path, "slope", "2:4 w4", seed, 0.95)
        put(tmp_path, "naive", "2:4 w4", seed, 0.80)
    put(tmp_path, "slope", "2:4 w4", 2, 0.95)  # a seed the other method lacks is not a pair
    row = only(table(tmp_path, baseline="naive"))
    assert row["n_pairs"] == 2 and row["verdict"] == "not_enough_pairs" and row["mean_diff"] == pytest.approx(0.15)
    assert all(math.isnan(row[k]) for k in ("p_value", "p_holm", "ci_low", "ci_high"))
    path = compare.write([tmp_path], tmp_path / "out")
    with open(path, newline="") as handle:
        (written,) = list(csv.DictReader(handle))
    assert written["p_value"] == "" and written["p_holm"] == "" and written["verdict"] == "not_enough_pairs"


def test_runs_of_different_settings_models_tasks_are_never_paired(tmp_path: Path) -> None:
    for seed in range(5):
        put(tmp_path, "slope", "2:4 w4", seed, 0.9, ratio=10.0)
        put(tmp_path, "naive", "1:4 w2", seed, 0.8, ratio=24.0)  # other setting, far-off ratio
        put(tmp_path, "obc", "2:4 w4", seed, 0.8, model="vit_small")  # other model
        put(tmp_path, "sqs", "2:4 w4", seed, 0.8, task="digits_hard")  # other task
        put(tmp_path, "codeq", "2:4 w4", seed, 0.8, model_width=8)  # other model_* key
    assert table(tmp_path).empty


def test_configurations_of_one_method_are_separate_entries(tmp_path: Path) -> None:
    for seed, base in enumerate(BASE[:6]):
        for lam, cid, shift in ((1.0, "aaaaaaaaaaaa", 0.02), (2.0, "bbbbbbbbbbbb", -0.02)):
            config = {"name": "slope", "lam": lam}
            put(tmp_path, "slope", "2:4 w4", seed, base + shift, config_id=cid, method_config=config)
        put(tmp_path, "naive", "2:4 w4", seed, base, config_id="cccccccccccc", method_config={"name": "naive"})
    frame = table(tmp_path, baseline="naive").set_index("method_a")
    assert sorted(frame.index) == ["slope (lam=1.0)", "slope (lam=2.0)"]
    assert (frame["n_pairs"] == 6).all()  # never pooled into 12 pairs
    assert frame.loc["slope (lam=1.0)", "mean_diff"] == pytest.approx(0.02)
    assert frame.loc["slope (lam=2.0)", "mean_diff"] == pytest.approx(-0.02)
    assert (frame["setting"] == "2:4 w4").all()
    both = table(tmp_path)  # without a baseline the two configurations are compared too
    assert len(both) == 3 and ("slope (lam=1.0)", "slope (lam=2.0)") in set(zip(both["method_a"], both["method_b"]))


def test_equal_ratio_pairs_across_patterns_within_tolerance(tmp_path: Path) -> None:
    for seed, base in enumerate(BASE[:6]):
        put(tmp_path, "codeq", "unstructured w4", seed, base + 0.01, ratio=10.2 + 0.2 * (seed % 2))
        put(tmp_path, "slope", "2:4 w4", seed, base, ratio=9.84)
        put(tmp_path, "slope", "1:4 w4", seed, base - 0.05, ratio=18.3)
    frame = table(tmp_path, baseline="slope", tolerance=0.10)
    main = only(frame)
    assert main["method_a"] == "codeq" and main["n_pairs"] == 6
    assert main["setting"] == "unstructured w4 vs 2:4 w4 (equal ratio: 10.3 vs 9.84, tolerance 10%)"
    assert main["mean_diff"] == pytest.approx(0.01)
    ratio = only(frame, "compress/ratio")  # CoDeQ chooses its ratio: compared as well
    assert ratio["mean_diff"] == pytest.approx(10.3 - 9.84)
    assert table(tmp_path, baseline="slope", tolerance=0.02).empty  # 10.3 vs 9.84 is 4.7% apart


def test_holm_adjustment() -> None:
    adjusted = compare.holm([0.01, 0.04, 0.03, float("nan"), 0.5])
    assert adjusted[:3] == pytest.approx([0.04, 0.09, 0.09]) and math.isnan(adjusted[3]) and adjusted[4] == pytest.approx(0.5)


def test_holm_applies_across_the_table(tmp_path: Path) -> None:
    for seed, base in enumerate(BASE[:6]):  # 6 pairs: exact p = 2/64 = 0.031 < 0.05, but not after Holm over 3 rows
        put(tmp_path, "slope", "2:4 w4", seed, base + 0.01)
        put(tmp_path, "naive", "2:4 w4", seed, base)
        put(tmp_path, "obc", "2:4 w4", seed, base - 0.001 * (seed % 2))
    frame = table(tmp_path)
    assert len(frame) == 3
    strong = frame[(frame["method_a"] == "naive") & (frame["method_b"] == "slope")].iloc[0]
    assert strong["p_value"] == pytest.approx(2 / 64) and strong["p_holm"] > 0.05
    assert strong["verdict"] == "no_detectable_difference"  # 0.031 alone would pass; the table has 3 tests
    assert (frame["p_holm"] >= frame["p_value"]).all()


def test_results_are_seeded(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    for seed, base in enumerate(BASE):
        put(tmp_path, "slope", "2:4 w4", seed, base + rng.normal(0.005, 0.01))
        put(tmp_path, "naive", "2:4 w4", seed, base)
    first, second = table(tmp_path), table(tmp_path)
    pd.testing.assert_frame_equal(first, second)
    assert not first.loc[0, ["ci_low", "ci_high", "p_value"]].isna().any()


def test_cli_writes_exact_columns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for seed, base in enumerate(BASE):
        put(tmp_path, "slope", "2:4 w4", seed, base + 0.010)
        put(tmp_path, "naive", "2:4 w4", seed, base)
        put(tmp_path, "obc", "2:4 w4", seed, base - 0.2)
    assert compare.main([str(tmp_path), "--baseline", "naive", "--out", str(tmp_path / "out")]) == 0
    with open(tmp_path / "out" / "comparisons.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert tuple(rows[0]) == compare.COLUMNS == (
        "method_a", "method_b", "model", "task", "setting", "metric", "n_pairs",
        "mean_diff", "ci_low", "ci_high", "p_value", "p_holm", "verdict",
    )  # fmt: skip
    frame = pd.read_csv(tmp_path / "out" / "comparisons.csv").set_index("method_a")
    assert set(frame["method_b"]) == {"naive"} and frame.loc["slope", "verdict"] == "a_better"
    assert frame.loc["obc", "verdict"] == "b_better" and frame.loc["obc", "mean_diff"] == pytest.approx(-0.2)
    out = capsys.readouterr().out
    assert "2 comparisons" in out and "slope > naive on test/top1 by 0.01" in out
    assert compare.main([str(tmp_path), "--baseline", "nope"]) == 2
    assert "'nope' has no completed runs" in capsys.readouterr().err
    assert compare.main([str(tmp_path / "absent")]) == 2


def test_leaderboard_shows_the_verdicts(tmp_path: Path) -> None:
    for seed, base in enumerate(BASE):
        put(tmp_path, "slope", "2:4 w4", seed, base + 0.010)
        put(tmp_path, "naive", "2:4 w4", seed, base)
    paths = leaderboard.write([tmp_path], tmp_path / "board")
    md = paths["md"].read_text()
    assert "## Paired comparisons (1)" in md and "| naive | slope | resnet18 | digits | 2:4 w4 | test/top1 | 10 |" in md
    assert "b_better" in md
    html = paths["html"].read_text()
    assert "paired verdicts" in html and "beats naive (0.01)" in html and "beaten by slope (0.01)" in html
    assert "<table id='comparisons'>" in html and "<tr class='b_better'>" in html
