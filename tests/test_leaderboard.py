"""Leaderboard on hand-made run folders: aggregation, problems, Pareto front, files, HTML."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd
import pytest

from slope_bench import aggregate, leaderboard, page, plots, results_table

DENSE = 0.95


def layers(sparsity: float, bits: int) -> list[dict]:
    return [
        {
            "name": "layer1.0.conv1",
            "shape": [64, 64, 3, 3],
            "pattern": "2:4",
            "w_bits": bits,
            "granularity": "channel",
            "sparsity": sparsity,
            "levels": 2**bits - 1,
            "sqnr_db": 18.5,
        },
        {
            "name": "fc_extra",
            "shape": [10, 512],
            "pattern": "dense",
            "w_bits": bits,
            "granularity": "channel",
            "sparsity": 0.0,
            "levels": 7,
        },
    ]


def classification(method: str, setting: str, seed: int, top1: float, ratio: float, **extra) -> dict:
    record = {
        "method": method,
        "model": "resnet18",
        "task": "digits",
        "seed": seed,
        "setting": setting,
        "status": "ok",
        "test/top1": top1,
        "test/top1_dense": DENSE,
        "test/top1_dense_ft": 0.96,
        "test/retention": top1 / DENSE,
        "compress/ratio": ratio,
        "compress/ratio_nominal": ratio * 1.2,
        "compress/bits_per_weight": 32.0 / ratio,
        "compress/sparsity": 0.5,
        "time/fit_s": 10.0 + seed,
        "layers": layers(0.5, 4),
    }
    record.update(extra)
    return record


def put(root: Path, name: str, record: dict | str) -> Path:
    run_dir = root / name
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    text = record if isinstance(record, str) else json.dumps(record)
    (run_dir / "results.json").write_text(text)
    return run_dir


@pytest.fixture
def runs_root(tmp_path: Path) -> Path:
    """A sweep folder: 4 resnet18 settings (seeds 3/2/1/1), a Mask R-CNN run, 4 problem runs."""
    root = tmp_path / "multirun"
    for seed, top1 in enumerate((0.90, 0.92, 0.94)):
        put(root, f"slope_{seed}", classification("slope", "2:4 w4", seed, top1, 10.0))
    for seed, top1 in enumerate((0.915, 0.935)):
        put(root, f"codeq_{seed}", classification("codeq", "w3", seed, top1, 12.0))
    put(root, "obc_0", classification("obc", "2:4 w4", 0, 0.80, 10.0))
    sqs = classification("sqs", "w2", 0, 0.70, 20.0)
    del sqs["status"]  # a missing status with metrics present counts as ok
    put(root, "sqs_0", sqs)
    put(
        root,
        "maskrcnn_0",
        {
            "method": "slope",
            "model": "maskrcnn",
            "task": "digits_instances",
            "seed": 0,
            "setting": "2:4 w4",
            "test/bbox_map": 0.31,
            "test/bbox_map_dense": 0.35,
            "test/segm_map": 0.28,
            "compress/ratio": 9.5,
        },
    )
    failed = classification(
        "codeq",
        "w2",
        0,
        0.1,
        15.0,
        status="failed",
        error="Traceback (most recent call last):\n  File x\nRuntimeError: loss is nan",
    )
    put(root, "failed_0", failed)
    put(root, "broken_0", '{"method": "slope", "test/top1": 0.9,')
    put(
        root,
        "partial_0",
        {
            "method": "sqs",
            "model": "resnet18",
            "task": "digits",
            "seed": 1,
            "setting": "w2",
        },
    )
    (root / "unfinished_0" / ".hydra").mkdir(parents=True)
    (root / "unfinished_0" / ".hydra" / "overrides.yaml").write_text("- method=obc\n- method.w_bits=3\n")
    return root


def test_collect_reads_runs_and_reports_problems(runs_root: Path) -> None:
    runs, problems = results_table.collect([runs_root])
    assert len(runs) == 8
    assert set(runs["metric_name"]) == {"top1", "bbox_map"}
    statuses = sorted(
        (
            p["status"],
            Path(p["path"]).name if p["path"].endswith("_0") else Path(p["path"]).parent.name,
        )
        for p in problems
    )
    assert all(p["path"].startswith(str(runs_root.resolve())) for p in problems)
    assert statuses == [
        ("broken", "broken_0"),
        ("failed", "failed_0"),
        ("incomplete", "partial_0"),
        ("incomplete", "unfinished_0"),
    ]
    failed = next(p for p in problems if p["status"] == "failed")
    assert failed["error"] == "RuntimeError: loss is nan"
    assert failed["method"] == "codeq" and failed["seed"] == 0
    assert "unreadable results.json" in next(p for p in problems if p["status"] == "broken")["error"]
    partial = next(p for p in problems if "partial_0" in p["path"])
    assert partial["error"] == "missing keys: test/<main metric>" and partial["setting"] == "w2"
    unfinished = next(p for p in problems if "unfinished_0" in p["path"])
    assert "no results.json" in unfinished["error"]
    assert unfinished["setting"] == "method=obc method.w_bits=3"


def test_collect_counts_a_file_once_and_survives_odd_content(tmp_path: Path) -> None:
    put(
        tmp_path,
        "a",
        classification("slope", "2:4 w4", 0, 0.9, 10.0, layers="not a list"),
    )
    put(tmp_path, "b", "[1, 2, 3]")
    put(tmp_path, "c", {"method": "slope", "test/top1": "high"})
    put(tmp_path, "d", '{"method": "slope", "test/top1": NaN}')
    runs, problems = results_table.collect([tmp_path, tmp_path / "a"])
    assert len(runs) == 1 and runs.loc[0, "layers"] == []
    assert sorted(p["status"] for p in problems) == ["broken", "incomplete", "incomplete"]
    assert "test/top1 is nan" in [p["error"] for p in problems]
    table = aggregate.aggregate(runs)
    assert len(table) == 1 and table.loc[0, "n"] == 1 and math.isnan(table.loc[0, "metric_std"])


def test_aggregate_over_seeds(runs_root: Path) -> None:
    runs, _ = results_table.collect([runs_root])
    table = aggregate.aggregate(runs)
    assert len(table) == 5
    row = table[(table["method"] == "slope") & (table["model"] == "resnet18")].iloc[0]
    assert row["n"] == 3 and row["seeds"] == "0,1,2"
    assert row["metric"] == pytest.approx(0.92, abs=1e-12)
    assert row["metric_std"] == pytest.approx(0.02, abs=1e-12)
    assert row["test/top1"] == pytest.approx(0.92, abs=1e-12)
    assert row["test/top1_n"] == 3
    assert row["time/fit_s"] == pytest.approx(11.0) and row["time/fit_s_std"] == pytest.approx(1.0)
    assert row["test/retention_std"] == pytest.approx(0.02 / DENSE, rel=1e-9)
    codeq = table[table["method"] == "codeq"].iloc[0]
    assert (
        codeq["n"] == 2 and codeq["metric"] == pytest.approx(0.925) and codeq["metric_std"] == pytest.approx(0.02 / math.sqrt(2), rel=1e-9)
    )
    assert codeq["metric_dense"] == pytest.approx(DENSE) and codeq["metric_dense_std"] == pytest.approx(0.0)
    assert "layers" not in table and "seed" not in table
    # Ranking by retention: codeq best, slope within one std (a tie), obc and sqs clearly worse.
    resnet = table[table["model"] == "resnet18"].set_index("method")
    assert resnet.loc["codeq", "rank"] == 1 and resnet.loc["codeq", "vs_best"] == "best"
    assert resnet.loc["slope", "vs_best"] == "tie"
    assert resnet.loc["obc", "vs_best"] == "" and resnet.loc["sqs", "vs_best"] == ""
    assert list(resnet["rank"]) == [1, 2, 3, 4]
    # Pareto front per model/task: codeq beats slope (more ratio, better metric); sqs has most ratio.
    assert resnet["pareto"].to_dict() == {
        "codeq": True,
        "slope": False,
        "obc": False,
        "sqs": True,
    }
    maskrcnn = table[table["model"] == "maskrcnn"].iloc[0]
    assert maskrcnn["metric_name"] == "bbox_map" and maskrcnn["metric"] == pytest.approx(0.31)
    assert maskrcnn["pareto"] and maskrcnn["vs_best"] == "best" and maskrcnn["rank"] == 1


def test_model_identity_keys_split_groups(tmp_path: Path) -> None:
    for width in (0.5, 1.0):
        for seed in (0, 1):
            put(
                tmp_path,
                f"w{width}_{seed}",
                classification("slope", "2:4 w4", seed, 0.9 + 0.01 * seed, 10.0, model_width=width),
            )
    table = aggregate.aggregate(results_table.collect([tmp_path])[0])
    assert sorted(table["model_width"]) == [0.5, 1.0]
    assert list(table["n"]) == [2, 2]
    assert (table["rank"] == 1).all() and table["pareto"].all()


def test_configurations_of_one_setting_are_not_pooled_as_seeds(tmp_path: Path) -> None:
    # a sparsity_decay sweep: the setting name is the same, the configuration is not
    for decay, cid, top1 in ((2.0, "aaaaaaaaaaaa", 0.95), (4.0, "bbbbbbbbbbbb", 0.85)):
        for seed in (0, 1):
            config = {"name": "codeq", "w_bits": 4, "sparsity_decay": decay}
            record = classification("codeq", "unstructured w4", seed, top1 + 0.01 * seed, 10.0, config_id=cid, method_config=config)
            put(tmp_path, f"sd{decay}_{seed}", record)
    # same method knobs, another recipe (e.g. finetune.epochs): labelled by its id
    for seed in (0, 1):
        config = {"name": "codeq", "w_bits": 4, "sparsity_decay": 2.0}
        record = classification("codeq", "unstructured w4", seed, 0.9, 10.0, config_id="cccccccccccc", method_config=config)
        put(tmp_path, f"ft_{seed}", record)
    table = aggregate.aggregate(results_table.collect([tmp_path])[0]).set_index("setting")
    assert sorted(table.index) == [
        "unstructured w4 (sparsity_decay=2.0, config aaaaaa)",
        "unstructured w4 (sparsity_decay=2.0, config cccccc)",
        "unstructured w4 (sparsity_decay=4.0)",
    ]
    assert (table["n"] == 2).all()
    assert table.loc["unstructured w4 (sparsity_decay=4.0)", "metric"] == pytest.approx(0.855)
    paths = leaderboard.write([tmp_path], tmp_path / "board")
    assert "unstructured w4 (sparsity_decay=4.0)" in Path(paths["md"]).read_text()
    assert len(pd.read_csv(paths["csv"])) == 3


def test_one_configuration_over_seeds_stays_one_row(tmp_path: Path) -> None:
    for seed in (0, 1, 2):
        config = {"name": "slope", "n": 2, "m": 4, "w_bits": 4}
        put(tmp_path, f"s{seed}", classification("slope", "2:4 w4", seed, 0.9, 10.0, config_id="dddddddddddd", method_config=config))
    table = aggregate.aggregate(results_table.collect([tmp_path])[0])
    assert list(table["setting"]) == ["2:4 w4"] and list(table["n"]) == [3]


def test_pareto_front_hand_made() -> None:
    points = pd.DataFrame(
        {
            "ratio": [1.0, 2.0, 2.0, 3.0, 4.0, 4.0, np.nan, 0.5, 3.0],
            "acc": [0.9, 0.8, 0.85, 0.85, 0.6, 0.6, 0.99, 0.95, 0.5],
        },
        index=list("abcdefghi"),
    )
    mask = aggregate.pareto_front(points, "ratio", "acc")
    # b is beaten by c; c by d (same acc, more ratio); e and f are identical (both kept);
    # g has no ratio; i is beaten by d; a is beaten by nothing (h has less ratio).
    assert mask.index.tolist() == list("abcdefghi")
    assert mask[mask].index.tolist() == ["a", "d", "e", "f", "h"]
    assert not aggregate.pareto_front(points, "missing", "acc").any()


def test_write_files(runs_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "board"
    paths = leaderboard.write([runs_root], out)
    assert set(paths) == {"csv", "md", "png", "html"}
    assert all(path.parent == out and path.stat().st_size > 0 for path in paths.values())
    csv = pd.read_csv(paths["csv"])
    assert len(csv) == 5 and {
        "method",
        "metric",
        "metric_std",
        "metric_n",
        "n",
        "pareto",
        "vs_best",
        "compress/ratio",
    } <= set(csv.columns)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths["md"].read_text()
    assert "0.92 ± 0.02 (n=3)" in md and "0.925 ± 0.014 (n=2)" in md
    assert (
        "## Failed, diverged or incomplete runs (4)" in md
        and "RuntimeError: loss is nan" in md
        and "missing keys: test/&lt;main metric&gt;" in md  # markdown cells escape HTML
        and "missing keys: test/<main metric>" not in md
    )
    page = paths["html"].read_text()
    assert "data:image/png;base64," in page and "<script>" in page
    assert "http://" not in page and "https://" not in page and "<link" not in page and "src='http" not in page
    assert page.count("<tr class='run") == 5 and page.count("<tr class='problem'>") == 4
    assert "layer1.0.conv1" in page and "64×64×3×3" in page and "<details>" in page


def test_cli_defaults_out_to_first_dir_and_skips_missing(runs_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert leaderboard.main([str(runs_root), str(tmp_path / "absent")]) == 0
    output = capsys.readouterr()
    assert "8 runs, 4 failed or incomplete" in output.out and "skipping" in output.err
    assert (runs_root / "leaderboard.html").exists() and (runs_root / "pareto.png").exists()
    assert leaderboard.main([str(tmp_path / "absent")]) == 2


def test_empty_folder_still_writes_files(tmp_path: Path) -> None:
    paths = leaderboard.write([tmp_path], tmp_path / "out")
    assert "No completed runs." in paths["md"].read_text()
    assert pd.read_csv(paths["csv"]).empty
    assert paths["png"].stat().st_size > 0 and "No completed runs." in paths["html"].read_text()


def test_wandb_offline(runs_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    (tmp_path / "wandb_dir").mkdir()
    paths = leaderboard.write([runs_root], tmp_path / "out", use_wandb=True)
    run_dir = Path(paths["wandb"])
    assert run_dir.is_dir() and str(run_dir).startswith(str(tmp_path / "wandb_dir"))
    assert list(run_dir.parent.glob("*.wandb")), "offline run file missing"
    (table_file,) = run_dir.glob("media/table/leaderboard_*.table.json")
    logged = json.loads(table_file.read_text())
    assert len(logged["data"]) == 5 and {"method", "metric", "pareto"} <= set(logged["columns"])
    assert list(run_dir.glob("media/images/pareto_*.png"))


# --------------------------------------------------------------------------- safe and exact (issue 16 §5)


def test_non_finite_metrics_make_a_run_incomplete(tmp_path: Path) -> None:
    put(tmp_path, "ok_0", classification("slope", "2:4 w4", 0, 0.9, 10.0))
    put(tmp_path, "ok_1", classification("slope", "2:4 w4", 1, 0.92, 10.0))
    finite = {"compress/ratio_nominal": 12.0, "compress/bits_per_weight": 3.2}
    put(tmp_path, "inf_ratio", classification("slope", "2:4 w4", 2, 0.94, math.inf, **finite))
    put(tmp_path, "neg_inf", classification("slope", "2:4 w4", 3, 0.94, 10.0, **{"test/retention": -math.inf}))
    assert "Infinity" in (tmp_path / "inf_ratio" / "results.json").read_text()  # as Python's json writes it
    runs, problems = results_table.collect([tmp_path])
    assert sorted(runs["seed"]) == [0, 1]
    errors = {Path(p["path"]).parent.name: (p["status"], p["error"]) for p in problems}
    assert errors == {
        "inf_ratio": ("incomplete", "compress/ratio is inf"),
        "neg_inf": ("incomplete", "test/retention is -inf"),
    }
    table = aggregate.aggregate(runs)
    assert list(table["n"]) == [1 + 1] and np.isfinite(table.loc[0, "compress/ratio"])
    md = Path(leaderboard.write([tmp_path], tmp_path / "board")["md"]).read_text()
    assert "compress/ratio is inf" in md and "test/retention is -inf" in md


def test_duplicate_config_and_seed_is_counted_once(tmp_path: Path) -> None:
    config = {"name": "slope", "n": 2, "m": 4, "w_bits": 4}
    for name, seed, top1 in (("a_s0", 0, 0.90), ("b_s0_again", 0, 0.90), ("c_s1", 1, 0.92)):
        put(tmp_path, name, classification("slope", "2:4 w4", seed, top1, 10.0, config_id="eeeeeeeeeeee", method_config=config))
    with pytest.warns(results_table.DuplicateRunWarning) as caught:
        runs, problems = results_table.collect([tmp_path])
    message = str(caught[0].message)
    assert str((tmp_path / "a_s0").resolve()) in message and str((tmp_path / "b_s0_again").resolve()) in message
    assert len(runs) == 2 and sorted(runs["seed"]) == [0, 1]
    (duplicate,) = problems
    assert duplicate["status"] == "duplicate" and duplicate["path"].endswith("b_s0_again")
    assert "a_s0" in duplicate["error"] and "counted once" in duplicate["error"]
    table = aggregate.aggregate(runs)
    assert list(table["n"]) == [2] and table.loc[0, "seeds"] == "0,1"


def test_duplicate_without_config_id_is_counted_once(tmp_path: Path) -> None:
    put(tmp_path, "x", classification("obc", "2:4 w4", 0, 0.8, 10.0))
    put(tmp_path, "y", classification("obc", "2:4 w4", 0, 0.8, 10.0))
    with pytest.warns(results_table.DuplicateRunWarning, match="no config_id"):
        runs, problems = results_table.collect([tmp_path])
    assert len(runs) == 1 and [p["status"] for p in problems] == ["duplicate"]


def test_dollar_names_plot_literally(tmp_path: Path) -> None:
    from matplotlib.text import Text

    for index, name in enumerate(("$x$", "$\\undefinedcommand{$", "a^$b", "_hidden")):
        for seed in (0, 1):
            put(tmp_path, f"m{index}_{seed}", classification(name, "2:4 w$4$", seed, 0.9 - 0.01 * index, 10.0 + index))
    paths = leaderboard.write([tmp_path], tmp_path / "board")
    assert not paths.failed and set(paths) == {"csv", "md", "png", "html"}
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Text(0, 0, plots.plain("$x$"))._preprocess_math(plots.plain("$x$")) == ("$x$", False)
    assert not plots.plain("_hidden").startswith("_")
    figure = plots.pareto_figure(aggregate.aggregate(results_table.collect([tmp_path])[0]))
    legend_texts = [t.get_text() for t in figure.legends[0].get_texts()]
    assert plots.plain("$x$") in legend_texts and "&lt;" not in "".join(legend_texts)


def test_csv_cells_that_look_like_formulas_are_neutralised(tmp_path: Path) -> None:
    import csv

    record = classification('=HYPERLINK("http://x")', "+1 w4", 0, 0.9, 10.0, model="@SUM(A1)", task="-2+3")
    record.update({"note": "\tstarts with tab", "other": "\rcarriage", "compress/delta": -0.5, "=evil/key": 1.0})
    put(tmp_path, "r", record)
    paths = leaderboard.write([tmp_path], tmp_path / "board")
    with open(paths["csv"], newline="") as handle:
        rows = list(csv.reader(handle))
    header, values = rows[0], dict(zip(rows[0], rows[1]))
    assert "'=evil/key" in header and "=evil/key" not in header
    assert values["method"] == '\'=HYPERLINK("http://x")' and values["setting"] == "'+1 w4"
    assert values["model"] == "'@SUM(A1)" and values["task"] == "'-2+3"
    assert values["note"] == "'\tstarts with tab" and values["other"] == "'\rcarriage"
    assert values["compress/delta"] == "-0.5" and float(values["metric"]) == pytest.approx(0.9)  # numbers stay numbers
    frame = pd.read_csv(paths["csv"])
    assert frame["compress/delta"].dtype.kind == "f" and frame.loc[0, "compress/delta"] == -0.5
    for row in rows:
        assert not any(cell.startswith(results_table.FORMULA_STARTS) and not _number_text(cell) for cell in row)


def _number_text(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def test_markdown_cells_escape_html(tmp_path: Path) -> None:
    record = classification("<script>alert(1)</script>", "<img src=x onerror=alert(2)>", 0, 0.9, 10.0)
    put(tmp_path, "evil", record)
    failed = classification("[click](javascript:alert(3))", "w2", 0, 0.1, 15.0, status="failed", error="<b>boom</b> & more")
    put(tmp_path, "failed", failed)
    paths = leaderboard.write([tmp_path], tmp_path / "board")
    md = paths["md"].read_text()
    assert "<script>" not in md and "<img" not in md and "<b>" not in md
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in md and "&lt;b&gt;boom&lt;/b&gt; &amp; more" in md
    assert "[click](" not in md and "\\[click\\](javascript:alert(3))" in md  # no link
    page_text = paths["html"].read_text()
    assert "<script>alert(1)" not in page_text and "&lt;img src=x onerror=alert(2)&gt;" in page_text


def test_one_output_failing_does_not_stop_the_others(runs_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_plot(*args, **kwargs):
        raise RuntimeError("mathtext exploded")

    monkeypatch.setattr(leaderboard, "plot_pareto", broken_plot)
    out = tmp_path / "board"
    paths = leaderboard.write([runs_root], out)
    assert set(paths) == {"csv", "md", "html"} and paths.failed == {"png": "RuntimeError: mathtext exploded"}
    assert not (out / "pareto.png").exists()
    assert "pareto.png could not be made: RuntimeError: mathtext exploded" in paths["md"].read_text()
    assert "![Pareto front]" not in paths["md"].read_text()
    assert "plot not available" in paths["html"].read_text()
    monkeypatch.undo()
    # an output path that cannot be written (a folder in its place): the others still are
    out2 = tmp_path / "board2"
    (out2 / "leaderboard.md").mkdir(parents=True)
    paths = leaderboard.write([runs_root], out2)
    assert set(paths) == {"csv", "png", "html"} and "md" in paths.failed
    assert (out2 / "leaderboard.html").stat().st_size > 0
    assert leaderboard.main([str(runs_root), "--out", str(out2)]) == 1


def test_diverged_runs_are_listed_and_never_ranked(tmp_path: Path) -> None:
    for seed in (0, 1):
        put(tmp_path, f"ok_{seed}", classification("slope", "2:4 w4", seed, 0.9, 10.0))
    diverged = classification("sqs", "w2", 0, 0.1, 20.0, status="diverged", error="loss rose 12x over the fine-tune")
    put(tmp_path, "div_0", diverged)
    runs, problems = results_table.collect([tmp_path])
    assert set(runs["method"]) == {"slope"}
    (problem,) = problems
    assert problem["status"] == "diverged" and problem["method"] == "sqs"
    assert problem["error"] == "loss rose 12x over the fine-tune (top1 0.1, ratio 20)"
    table = aggregate.aggregate(runs)
    assert list(table["method"]) == ["slope"] and list(table["rank"]) == [1]
    paths = leaderboard.write([tmp_path], tmp_path / "board")
    assert "| diverged | sqs |" in paths["md"].read_text()


def test_coded_ratio_is_shown_and_can_be_plotted(tmp_path: Path) -> None:
    for seed in (0, 1):
        extra = {"compress/coded_ratio": 14.0 + seed, "compress/measured_ratio": 9.0}
        put(tmp_path, f"s{seed}", classification("slope", "2:4 w4", seed, 0.9, 10.0, **extra))
        put(tmp_path, f"n{seed}", classification("naive", "2:4 w4", seed, 0.88, 10.0, **{"compress/measured_ratio": 9.0}))
    paths = leaderboard.write([tmp_path], tmp_path / "board", x="compress/coded_ratio")
    assert not paths.failed
    md = paths["md"].read_text()
    assert "ratio (kernel-ready, accounted)" in md and "ratio (kernel-ready file)" in md and "ratio (stored, coded file)" in md
    assert pd.read_csv(paths["csv"]).set_index("method").loc["slope", "compress/coded_ratio"] == pytest.approx(14.5)
    figure = plots.pareto_figure(aggregate.aggregate(results_table.collect([tmp_path])[0]), x="compress/coded_ratio")
    assert "coded_ratio" in figure.axes[0].get_xlabel()
    assert leaderboard.main([str(tmp_path), "--out", str(tmp_path / "cli"), "--x", "compress/coded_ratio"]) == 0


# --------------------------------------------------------------------------- plot (issue 18 §5)


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_pareto_plot_zooms_near_dense_with_readable_ticks_and_legend_outside(tmp_path: Path) -> None:
    grid = {"2:4 w4": 9.84, "2:4 w3": 11.6, "1:4 w4": 13.4, "2:4 w2": 15.5, "1:4 w3": 18.3, "1:4 w2": 24.3}
    methods = ["slope", "naive", "obc", "prune_then_quantize", "quantize_then_prune", "magnitude_rtn", "codeq", "sqs", "quantize"]
    for m_index, method in enumerate(methods):
        for s_index, (setting, ratio) in enumerate(grid.items()):
            top1 = 0.10 + 0.01 * s_index if method == "magnitude_rtn" else 0.955 - 0.012 * s_index - 0.004 * m_index
            for seed in (0, 1, 2):
                put(
                    tmp_path,
                    f"{method}_{s_index}_{seed}",
                    classification(method, setting, seed, top1 + 0.002 * seed, ratio * (1 + 0.01 * m_index)),
                )
    for seed in (0, 1, 2):
        put(tmp_path, f"dense_{seed}", classification("dense", "dense", seed, 0.95, 1.0))
    table = aggregate.aggregate(results_table.collect([tmp_path])[0])
    figure = plots.pareto_figure(table)
    full, zoom = figure.axes
    assert full.get_xscale() == zoom.get_xscale() == "log"
    y_low, y_high = zoom.get_ylim()
    assert y_low == pytest.approx(DENSE - 0.10) and y_high < 1.0  # the collapsed method at 0.1 does not stretch it
    x_low, x_high = zoom.get_xlim()
    assert 8.0 < x_low < 9.84 and 24.3 * 1.08 < x_high < 40  # the dense point at ratio 1 is outside the zoom
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    for axis in (full, zoom):
        boxes = [t.get_window_extent(renderer) for t in axis.get_xticklabels() if t.get_visible() and t.get_text()]
        assert len(boxes) >= 3
        assert not any(_overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    legend = figure.legends[0].get_window_extent(renderer)
    assert not any(_overlap(legend, axis.get_window_extent(renderer)) for axis in (full, zoom))
    assert {t.get_text() for t in figure.legends[0].get_texts()} >= set(methods)
    bars = [c for c in zoom.containers if c.has_yerr]
    assert len(bars) == len(methods) + 1  # every method (and dense) with its std bars
    assert plots.nice_log_ticks(9.0, 26.0) == [10, 12, 15, 20, 25]
    assert plots.nice_log_ticks(0.9, 30.0) == [1, 2, 5, 10, 20]


def test_page_ships_css_and_js_as_package_files(runs_root: Path, tmp_path: Path) -> None:
    static = Path(page.__file__).parent / "static"
    assert (static / "leaderboard.css").is_file() and (static / "leaderboard.js").is_file()
    text = leaderboard.write([runs_root], tmp_path / "board")["html"].read_text()
    assert page.static_text("leaderboard.js").strip() in text and page.static_text("leaderboard.css").strip() in text


# --------------------------------------------------------------------------- Chromium


def _chromium() -> str:
    """A headless Chromium binary; installed with apt when missing and we are root."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if os.name != "posix" or os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium is not installed and cannot be installed (not root or no apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    if subprocess.run(install, check=False, env=env, capture_output=True, timeout=900).returncode != 0:
        subprocess.run(
            ["apt-get", "update"],
            check=False,
            env=env,
            capture_output=True,
            timeout=600,
        )
        subprocess.run(install, check=False, env=env, capture_output=True, timeout=900)
    if not shutil.which("chromium"):
        pytest.skip("chromium could not be installed with apt-get")
    return shutil.which("chromium")


class _Rows(HTMLParser):
    """Rows of the leaderboard table in DOM order: (data-row, hidden)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, bool]] = []
        self.sorted_by: list[tuple[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "tr" and "run" in (values.get("class") or "").split():
            self.rows.append((int(values["data-row"]), "hidden" in values))
        if tag == "th" and values.get("aria-sort"):
            self.sorted_by.append((values["data-key"], values["aria-sort"]))


def _dump(chromium: str, page: Path, fragment: str, profile: Path) -> _Rows:
    command = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--dump-dom",
        page.as_uri() + "#" + fragment,
    ]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    parser = _Rows()
    parser.feed(result.stdout)
    return parser


def test_html_sorts_and_filters_in_chromium(runs_root: Path, tmp_path: Path) -> None:
    chromium = _chromium()
    paths = leaderboard.write([runs_root], tmp_path / "board")
    table = pd.read_csv(paths["csv"])
    start = time.perf_counter()
    # A header click (th.click() from the URL hash) sorts by compress/ratio ascending...
    shown = _dump(
        chromium,
        paths["html"],
        "sort=" + quote("compress/ratio", safe=""),
        tmp_path / "profile",
    )
    order = [row for row, _ in shown.rows]
    assert sorted(order) == list(range(len(table)))
    assert not any(hidden for _, hidden in shown.rows)
    assert shown.sorted_by == [("compress/ratio", "ascending")]
    assert list(table.loc[order, "compress/ratio"]) == sorted(table["compress/ratio"])
    # ...a second click sorts descending; the model select box hides other models' rows.
    shown = _dump(chromium, paths["html"], "model=resnet18&sort=-metric", tmp_path / "profile")
    order = [row for row, _ in shown.rows]
    assert shown.sorted_by == [("metric", "descending")]
    assert list(table.loc[order, "metric"]) == sorted(table["metric"], reverse=True)
    hidden = {row for row, is_hidden in shown.rows if is_hidden}
    assert hidden == set(table.index[table["model"] != "resnet18"])
    print(f"chromium: two page loads in {time.perf_counter() - start:.1f} s")
