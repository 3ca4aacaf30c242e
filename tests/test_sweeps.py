"""Hydra multirun and the Optuna Pareto search through the real CLI (shrunk)."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from slope_bench import leaderboard
from tests.conftest import ROOT, SHRINK


def cli(args: list[str], tmp_path, timeout: int = 900) -> subprocess.CompletedProcess:
    flags = [a for a in args if a.startswith("-")]
    overrides = [a for a in args if not a.startswith("-")]
    cmd = [sys.executable, "run.py", *flags, *SHRINK, f"paths.cache_dir={tmp_path / 'cache'}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow  # 4 jobs; the default suite runs the 2-job sweep below
def test_multirun_grid_gives_one_result_per_job_and_a_leaderboard(tmp_path):
    sweep = tmp_path / "sweep"
    cli(["-m", "method=slope,naive", "method.w_bits=2,4", f"hydra.sweep.dir={sweep}"], tmp_path)
    results = sorted(sweep.rglob("results.json"))
    assert len(results) == 4
    settings = {(r["method"], r["setting"]) for r in (json.loads(p.read_text()) for p in results)}
    assert settings == {("slope", "2:4 w2"), ("slope", "2:4 w4"), ("naive", "2:4 w2"), ("naive", "2:4 w4")}
    paths = leaderboard.write([sweep], tmp_path / "board")
    table = pd.read_csv(paths["csv"])
    assert len(table) == 4


def test_failed_job_does_not_stop_the_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    cli(["-m", "method=quantize", "method.w_bits=4,99", f"hydra.sweep.dir={sweep}"], tmp_path)
    records = [json.loads(p.read_text()) for p in sweep.rglob("results.json")]
    status = sorted(r["status"] for r in records)
    assert status == ["failed", "ok"]
    failed = next(r for r in records if r["status"] == "failed")
    assert "w_bits" in failed["error"]
    paths = leaderboard.write([sweep], tmp_path / "board")  # one row per job, failures listed
    assert len(pd.read_csv(paths["csv"])) >= 1


@pytest.mark.slow  # the Optuna sweeper runs in the default suite through hparams_search=tune
def test_optuna_pareto_search_runs_two_trials(tmp_path):
    sweep = tmp_path / "optuna"
    cli(
        ["hparams_search=pareto", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.population_size=2", f"hydra.sweep.dir={sweep}"],
        tmp_path,
    )
    records = [json.loads(p.read_text()) for p in sweep.rglob("results.json")]
    assert len(records) == 2 and all(r["status"] == "ok" for r in records)
    import yaml

    optimization = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    front = optimization["solutions"]  # the Pareto solutions of the two objectives
    assert front and all(len(s["values"]) == 2 for s in front)
    ratios = {round(r["compress/ratio"], 6) for r in records}
    assert all(round(s["values"][1], 6) in ratios for s in front)
