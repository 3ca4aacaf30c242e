"""Issue 18, the benchmark protocol: tuning chooses on validation data only (test metrics
never change the choice, a run without val/* is not tunable), then the shrunk protocol end
to end through ``slope_bench.bench.main`` and through ``run.py hparams_search=tune``."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from slope_bench import bench
from slope_bench.compare import VERDICTS
from slope_bench.obs import torch_threads
from slope_bench.tune import search_space, select, tunable, tune
from tests.conftest import ROOT

# ------------------------------------------------------------------ synthetic trial results


def result(ident: int, val: float | None, test: float, ratio: float = 10.0, status: str = "ok") -> dict:
    """A results.json as a run writes it (only the keys tuning could look at)."""
    out = {"id": ident, "status": status, "main_metric": "top1", "test/top1": test, "test/top1_dense": 0.9, "compress/ratio": ratio}
    if val is not None:
        out.update({"val/top1": val, "val/top1_dense": 0.9})
    return out


def keys_on_test(r: dict) -> list[str]:
    return [k for k in r if k.startswith("test/")]


def corrupt(trials: list[dict], how: str, seed: int = 0) -> list[dict]:
    """The same trials with every ``test/*`` value corrupted (``val/*`` untouched)."""
    rng = np.random.default_rng(seed)
    out = [dict(t) for t in trials]
    for key in {k for t in trials for k in keys_on_test(t)}:
        values = [t.get(key) for t in trials]
        if how == "reversed":
            new = values[::-1]
        elif how == "random":
            new = rng.random(len(values)).tolist()
        elif how == "best_is_worst":  # the val-worst trial gets the best test score by far
            order = np.argsort([t.get("val/top1", -1.0) for t in trials])
            new = [0.0] * len(values)
            new[int(order[0])] = 1.0
        elif how == "nan":
            new = [math.nan] * len(values)
        elif how == "missing":
            for t in out:
                t.pop(key, None)
            continue
        else:
            raise ValueError(how)
        for t, v in zip(out, new, strict=True):
            t[key] = v
    return out


CORRUPTIONS = ["reversed", "random", "best_is_worst", "nan", "missing"]

# val and test disagree on purpose: the val-best (id 2) is the test-worst
TRIALS = [
    result(0, 0.60, 0.95, ratio=9.5),
    result(1, 0.70, 0.90, ratio=10.4),
    result(2, 0.80, 0.10, ratio=10.2),
    result(3, 0.75, 0.50, ratio=14.0),
    result(4, None, 0.99, ratio=10.0),  # finished without val/*: not tunable
    result(5, 0.99, 0.99, ratio=10.0, status="failed"),
    result(6, 0.98, 0.98, ratio=10.0, status="diverged"),
]


@pytest.mark.parametrize("target_ratio", [None, 10.0, 20.0])
@pytest.mark.parametrize("how", CORRUPTIONS)
def test_select_is_unchanged_when_every_test_metric_is_corrupted(how, target_ratio):
    chosen = select(TRIALS, target_ratio=target_ratio)
    expected = {None: 2, 10.0: 2, 20.0: 3}[target_ratio]  # 20x: none within 10 %, the nearest ratio (14x)
    assert chosen["id"] == expected
    for seed in range(3):
        again = select(corrupt(TRIALS, how, seed), target_ratio=target_ratio)
        assert again is not None and again["id"] == expected, (how, seed)


def test_a_trial_without_validation_metrics_is_not_tunable_and_never_chosen():
    assert [tunable(t) for t in TRIALS] == [True, True, True, True, False, False, False]
    assert not tunable(result(7, math.nan, 0.5)) and not tunable(result(8, math.inf, 0.5))
    # only untunable trials, whatever their test scores: nothing is chosen
    untunable = [t for t in TRIALS if not tunable(t)]
    assert select(untunable) is None and select(untunable, target_ratio=10.0) is None
    # the best test score of all belongs to a trial without val/*: still never chosen
    best_on_test = max(TRIALS, key=lambda t: t["test/top1"] if t["status"] == "ok" else -1)
    assert best_on_test["id"] == 4 and select(TRIALS)["id"] != 4


def val_of(overrides: list[str]) -> float:
    """A deterministic validation score of a configuration (peaks at lam = 1, decay = 1e-4)."""
    knobs = {o.split("=", 1)[0]: float(o.split("=", 1)[1]) for o in overrides}
    return 1.0 - 0.1 * sum(abs(math.log10(v) - {"method.lam": 0.0, "method.sr_ste_decay": -4.0}[k]) for k, v in knobs.items())


def fake_trials(test_of, no_val: set[int] = frozenset()):
    """``run_trial`` for :func:`tune`, recording what it was asked to run."""
    asked: list[list[str]] = []

    def run_trial(number: int, overrides: list[str]) -> dict:
        asked.append(list(overrides))
        val = val_of(overrides)
        return result(number, None if number in no_val else val, test_of(number, val))

    return run_trial, asked


@pytest.mark.parametrize("method", ["slope", "naive"])
def test_tune_choice_and_proposals_do_not_depend_on_test_metrics(method):
    assert search_space(method)  # both declare a search space: tune really searches
    rng = np.random.default_rng(1)
    noise = rng.random(64)
    tests = {
        "equal": lambda n, v: v,
        "reversed": lambda n, v: 1.0 - v,
        "random": lambda n, v: float(noise[n]),
        "nan": lambda n, v: math.nan,
    }
    outcomes = {}
    for name, test_of in tests.items():
        run_trial, asked = fake_trials(test_of)
        tuned = tune(method, run_trial, trials=6, seed=0)
        outcomes[name] = (tuned.overrides, tuned.chosen["id"], asked)
        best = max(range(6), key=lambda i: (val_of(asked[i]), -i))
        assert tuned.chosen["id"] == best and tuned.overrides == asked[best]
    first = outcomes["equal"]
    assert all(o == first for o in outcomes.values()), "test metrics changed what was proposed or chosen"


def test_tune_never_chooses_a_trial_without_validation_metrics():
    # trial 1 has the best val-to-be and the best test score, but recorded no val/*
    run_trial, asked = fake_trials(lambda n, v: 1.0 if n == 1 else 0.0, no_val={1})
    tuned = tune("naive", run_trial, trials=4, seed=0)
    assert len(tuned.trials) == 4 and not tunable(tuned.trials[1])
    assert tuned.chosen is not None and tuned.chosen["id"] != 1
    run_trial, _ = fake_trials(lambda n, v: 1.0, no_val={0, 1, 2})
    assert tune("naive", run_trial, trials=3, seed=0).chosen is None


# --------------------------------------------- bench.protocol with a fake runner (no training)


class FakeRunner:
    """Stands in for :class:`slope_bench.bench.Runner`: results from the overrides only."""

    parallel = False

    def __init__(self, test_of, no_val_trials: set[str] = frozenset()) -> None:
        self.test_of, self.no_val_trials, self.calls = test_of, no_val_trials, []

    def many(self, calls: list, priority: tuple = ()) -> list[dict]:
        return [self(*call, priority) for call in calls]

    def close(self) -> None:
        self.closed = True

    def __call__(self, out_dir: Path, method: str, seed: int, overrides: list[str], priority: tuple = ()) -> dict:
        self.calls.append((out_dir, method, seed, list(overrides)))
        searched = [o for o in overrides if o.split("=", 1)[0] in ("method.lam", "method.sr_ste_decay")]
        val = val_of(searched) + 0.001 * seed
        key = f"{out_dir.parent.name}/{out_dir.name}"
        r = result(len(self.calls), None if key in self.no_val_trials else val, self.test_of(len(self.calls), val))
        return {**r, "method": method, "seed": seed}


def protocol_args(out: Path, methods=("slope", "naive"), trials: int = 4, seeds: int = 3) -> argparse.Namespace:
    return argparse.Namespace(out=out, settings=["2:4 w4"], methods=list(methods), trials=trials, seeds=seeds, tune_seed=0, tolerance=0.1)


def test_protocol_chooses_on_validation_and_lists_untunable_trials(tmp_path):
    no_val = {"slope_2of4_w4/trial_01"}
    honest = FakeRunner(lambda n, v: v, no_val)
    chosen = bench.protocol(protocol_args(tmp_path), honest)
    for how, test_of in {"reversed": lambda n, v: 1.0 - v, "random": lambda n, v: (n * 0.618) % 1.0}.items():
        corrupted = FakeRunner(test_of, no_val)
        assert bench.protocol(protocol_args(tmp_path), corrupted) == chosen, how
        assert [c[3] for c in corrupted.calls] == [c[3] for c in honest.calls], how  # the same runs were asked for
    slope, naive = chosen["slope_2of4_w4"], chosen["naive_2of4_w4"]
    assert (slope["trials"], slope["not_tunable"], naive["not_tunable"]) == (4, 1, 0)
    # the choice is the val-best trial, and the seed runs ran exactly it
    trials = [c for c in honest.calls if c[0].parent.name == "slope_2of4_w4"]
    assert all(c[3][:3] == ["method.n=2", "method.m=4", "method.w_bits=4"] for c in trials)
    searched = [c[3][3:] for c in trials if c[0].name != "trial_01"]
    best = max(searched, key=val_of)
    assert slope["overrides"] == best and slope["val"] == pytest.approx(val_of(best))
    seeds = [c for c in honest.calls if c[0].parent.name == "runs" and c[1] == "slope"]
    assert [c[2] for c in seeds] == [0, 1, 2]
    assert all(c[3] == ["method.n=2", "method.m=4", "method.w_bits=4", *slope["overrides"]] for c in seeds)
    assert all(c[2] == 0 for c in trials)  # trials run at the tuning seed


def test_parallel_pipelines_choose_what_the_sequential_protocol_chooses(tmp_path):
    """Pipelines side by side (a parallel runner) ask for the same runs and choose the same
    configurations; SQS waits for SLOPE's seeds and is matched to their mean ratio."""
    methods = ("slope", "naive", "sqs")
    sequential = FakeRunner(lambda n, v: v)
    expected = bench.protocol(protocol_args(tmp_path, methods), sequential)
    parallel = FakeRunner(lambda n, v: v)
    parallel.parallel = True
    assert bench.protocol(protocol_args(tmp_path, methods), parallel) == expected
    key = lambda c: (str(c[0]), c[3])  # noqa: E731
    assert sorted(parallel.calls, key=key) == sorted(sequential.calls, key=key)
    assert expected["sqs_2of4_w4"]["target_ratio"] == pytest.approx(10.0)  # the fake runs' ratio
    sqs_first = min(i for i, c in enumerate(parallel.calls) if c[1] == "sqs")
    slope_seeds = [i for i, c in enumerate(parallel.calls) if c[1] == "slope" and c[0].parent.name == "runs"]
    assert len(slope_seeds) == 3 and max(slope_seeds) < sqs_first


def test_a_failing_pipeline_stops_the_parallel_protocol(tmp_path):
    """An error in one pipeline (not a failed run: those are recorded) is raised, and the
    runner is closed so the other pipelines' queued runs fail instead of running on."""

    class Broken(FakeRunner):
        parallel = True

        def __call__(self, out_dir, method, seed, overrides, priority=()):
            if method == "naive":
                raise OSError("disk full")
            return super().__call__(out_dir, method, seed, overrides, priority)

    runner = Broken(lambda n, v: v)
    with pytest.raises(OSError, match="disk full"):
        bench.protocol(protocol_args(tmp_path, ("slope", "naive", "sqs")), runner)
    assert runner.closed


def label(value: str) -> str:
    """A job for :class:`bench.Workers` (module level: picklable by a spawned worker)."""
    return value


def test_reuse_trial_copies_the_chosen_trial_once_and_keeps_a_finished_run(tmp_path):
    trial = tmp_path / "tune" / "slope_2of4_w4" / "trial_03"
    trial.mkdir(parents=True)
    (trial / "results.json").write_text(json.dumps({"status": "ok", "seed": 0, "val/top1": 0.9}))
    (trial / "finalized.safetensors").write_bytes(b"weights")
    run = tmp_path / "runs" / "slope_2of4_w4_s0"
    run.mkdir(parents=True)
    (run / "leftover.ckpt").write_bytes(b"an interrupted run")
    bench.reuse_trial(trial, run)
    copied = json.loads((run / "results.json").read_text())
    assert copied == {"status": "ok", "seed": 0, "val/top1": 0.9, "bench/reused_trial": "tune/slope_2of4_w4/trial_03"}
    assert (run / "finalized.safetensors").read_bytes() == b"weights" and not (run / "leftover.ckpt").exists()
    # a finished run is never replaced, and a trial without results.json copies nothing
    (run / "results.json").write_text(json.dumps({"status": "ok", "seed": 0, "val/top1": 0.8}))
    bench.reuse_trial(trial, run)
    assert json.loads((run / "results.json").read_text())["val/top1"] == 0.8
    empty = tmp_path / "tune" / "naive_2of4_w4" / "trial_00"
    empty.mkdir(parents=True)
    bench.reuse_trial(empty, tmp_path / "runs" / "naive_2of4_w4_s0")
    assert not (tmp_path / "runs" / "naive_2of4_w4_s0").exists()


def test_workers_run_the_most_urgent_job_first():
    """One worker, busy: the queued jobs then start by priority (then first come), whatever
    the order they were submitted in."""
    workers = bench.Workers(1, 1)
    try:
        import time as time_module

        started: list[str] = []
        busy = workers.submit((9,), time_module.sleep, 2.0)  # holds the only worker while the rest queue up
        jobs = [((2, 1), "seed run of naive"), ((2, 0), "trial of naive"), ((0, 1), "seed run of slope"), ((1, 0), "trial of sqs")]
        futures = [workers.submit(priority, label, name) for priority, name in jobs]
        for future in futures:
            future.add_done_callback(lambda f: started.append(f.result()))
        busy.result()
        assert [f.result(timeout=60) for f in futures] == [name for _, name in jobs]
        assert started == ["seed run of slope", "trial of sqs", "trial of naive", "seed run of naive"]
        # closing fails what is still queued (whoever waits on it stops waiting); the running job finishes
        busy = workers.submit((0,), time_module.sleep, 1.0)
        queued = workers.submit((1,), label, "never runs")
        workers.close()
        assert busy.result() is None
        with pytest.raises(RuntimeError, match="stopped before this run started"):
            queued.result(timeout=10)
    finally:
        workers.close()


def test_a_killed_worker_fails_the_queued_jobs_instead_of_hanging():
    from concurrent.futures.process import BrokenProcessPool

    workers = bench.Workers(1, 1)
    try:
        killed = workers.submit((0,), os._exit, 1)  # the worker dies mid-job (as when the OOM killer takes it)
        queued = [workers.submit((1,), label, str(i)) for i in range(3)]
        with pytest.raises(BrokenProcessPool):
            killed.result(timeout=60)
        for future in queued:
            with pytest.raises(BrokenProcessPool):
                future.result(timeout=60)
    finally:
        workers.close()


# ------------------------------------------------------------- shrunk end to end, for real

# Every run tiny: ResNet-18 width 4, the untrained model as its own dense reference, one
# 64-image step of fine-tuning, 180 val / 360 test images, no dense fine-tune control.
TINY = [
    "model.width=4",
    "dense.epochs=0",
    "finetune.epochs=1",
    "trainer.fast_dev_run=true",
    "task.batch_size=64",
    "task.augment=false",
    "control.dense_ft=false",
    "divergence.at_chance=false",  # an untrained reference sits at chance: no "diverged" verdicts
    "val_every=0",
]
BENCH_TINY = [*TINY, "task.copies=1"]  # digits_hard (experiment=bench_digits)


def test_bench_main_runs_the_protocol_end_to_end(tmp_path, capsys):
    """On two worker processes (one torch thread each): the bench as ``make bench`` runs it."""
    out = tmp_path / "bench"
    argv = ["--trials", "2", "--seeds", "3", "--methods", "slope", "naive", "--settings", "2:4 w4", "--workers", "2", "--threads", "1"]
    with torch_threads(1):  # tiny convolutions: a second thread only spins (and starves when the CPUs are busy)
        assert bench.main([*argv, "--out", str(out), "--cache", str(tmp_path / "cache"), *BENCH_TINY]) == 0
    record = json.loads((out / "bench.json").read_text())
    # 2 x 2 trials + 2 x 3 seeds, less the 2 seed-0 runs that are the chosen trials themselves
    assert record["runs_executed_now"] == 8 and record["extra_overrides"] == BENCH_TINY
    for method in ("slope", "naive"):
        tag = f"{method}_2of4_w4"
        trials = sorted(p.name for p in (out / "tune" / tag).iterdir())
        assert trials == ["trial_00", "trial_01"]
        trial_results = [json.loads((out / "tune" / tag / t / "results.json").read_text()) for t in trials]
        assert all(r["status"] == "ok" and r["seed"] == 0 and "val/top1" in r for r in trial_results)
        chosen = record["chosen"][tag]
        assert chosen["searched"] and chosen["trials"] == 2 and chosen["not_tunable"] == 0
        assert chosen["val"] == max(r["val/top1"] for r in trial_results)
        knobs = {o.split("=", 1)[0].removeprefix("method."): float(o.split("=", 1)[1]) for o in chosen["overrides"]}
        assert set(knobs) == set(search_space(method))
        seeds = [json.loads((out / "runs" / f"{tag}_s{s}" / "results.json").read_text()) for s in range(3)]
        winner = max(range(2), key=lambda i: (trial_results[i]["val/top1"], -i))
        assert seeds[0].pop("bench/reused_trial") == f"tune/{tag}/trial_{winner:02d}"
        assert seeds[0] == trial_results[winner], "seed 0 is the chosen trial, copied"
        assert "bench/reused_trial" not in seeds[1]
        for seed, r in enumerate(seeds):
            assert r["status"] == "ok" and r["seed"] == seed and r["method"] == method and r["setting"] == "2:4 w4"
            assert "val/top1" in r and "test/top1" in r and r["model_width"] == 4
            assert all(r["method_config"][k] == pytest.approx(v) for k, v in knobs.items())  # the chosen configuration
    table = pd.read_csv(out / "comparisons.csv")
    pair = [{a, b} == {"slope", "naive"} for a, b in zip(table["method_a"], table["method_b"], strict=True)]
    row = table[pd.Series(pair, index=table.index) & (table["metric"] == "test/top1")]
    assert len(row) == 1, table
    assert int(row["n_pairs"].iloc[0]) == 3 and row["verdict"].iloc[0] in VERDICTS and row["setting"].iloc[0] == "2:4 w4"
    verdicts = (out / "VERDICTS.md").read_text()
    assert "## 2:4 w4" in verdicts and "| 3 |" in verdicts and row["verdict"].iloc[0] in verdicts
    assert all(f"- {m}: method." in verdicts for m in ("slope", "naive"))  # the tuned configurations are listed
    assert "seed 0 is the chosen trial itself" in verdicts
    for name in ("leaderboard.csv", "leaderboard.md", "leaderboard.html"):
        assert (out / name).stat().st_size > 0, name
    assert len(pd.read_csv(out / "leaderboard.csv")) >= 2
    assert (record["workers"], record["threads_per_worker"]) == (2, 1)
    assert "Seed set to" in (out / "runs" / "slope_2of4_w4_s1" / "run.log").read_text()  # a worker's console goes to its run's log
    # a run on a worker gives exactly what the same run gives in this process with the same threads
    with torch_threads(1):
        here, _ = bench.execute(
            "bench_digits",
            "slope",
            1,
            ["method.n=2", "method.m=4", "method.w_bits=4", *record["chosen"]["slope_2of4_w4"]["overrides"], *BENCH_TINY],
            tmp_path / "here",
            tmp_path / "cache",
            out / "data",
            False,
        )
    worker = json.loads((out / "runs" / "slope_2of4_w4_s1" / "results.json").read_text())
    for key in ("val/top1", "test/top1", "compress/ratio", "train/loss_last", "config_id"):
        assert here[key] == worker[key], key
    # resumable: a second call finds every run finished and runs none
    capsys.readouterr()
    with torch_threads(1):
        assert bench.main([*argv, "--out", str(out), "--cache", str(tmp_path / "cache"), *BENCH_TINY]) == 0
    second = json.loads((out / "bench.json").read_text())
    assert second["runs_executed_now"] == 0
    # the whole bench is still on record: both invocations, 8 runs in all
    assert [i["runs_executed_now"] for i in second["invocations"]] == [8, 0] and second["runs_executed_total"] == 8
    assert second["wall_minutes_total"] == pytest.approx(record["wall_minutes"] + second["wall_minutes"], abs=0.011)
    assert "all 2 invocation(s) into this folder: 8 runs in" in (out / "VERDICTS.md").read_text()


# ------------------------------------------------------------ the CLI route: hparams_search=tune


def test_hparams_search_tune_runs_trials_scored_on_validation(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "run.py",
        "-m",
        "hparams_search=tune",
        "method=naive",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweep.dir={sweep}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.data_dir={tmp_path / 'data'}",
        "logger=none",
        "trainer.enable_progress_bar=false",
        *TINY,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny convolutions: one thread (see the test above)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(sweep.glob("*/results.json"))
    assert len(runs) == 2, sorted(p.relative_to(sweep) for p in sweep.rglob("*"))
    records = [json.loads(p.read_text()) for p in runs]
    assert all(r["status"] == "ok" and r["method"] == "naive" and "val/top1" in r for r in records)
    decays = [r["method_config"]["sr_ste_decay"] for r in records]
    assert len(set(decays)) == 2 and all(1e-5 <= d <= 1e-3 for d in decays)  # the search space of conf/method/naive.yaml
    optimization = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert optimization["name"] == "optuna"
    best = max(records, key=lambda r: r["val/top1"])
    assert optimization["best_value"] == pytest.approx(best["val/top1"])  # the objective is val/top1, not test/*
    assert optimization["best_params"]["method.sr_ste_decay"] == pytest.approx(best["method_config"]["sr_ste_decay"])


def test_hparams_search_tune_refuses_a_test_objective_with_one_line(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "run.py",
        "hparams_search=tune",
        "method=naive",
        "objectives=[test/top1]",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweep.dir={sweep}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "logger=none",
        "dense.epochs=0",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[0].startswith("error: objectives=") and "test/*" in lines[0]
    assert not list(tmp_path.rglob("results.json"))


def test_verdicts_name_the_methods_left_unpaired_and_the_runs_executed_now():
    """A ratio-matched method that found no pair is listed, never silently dropped; the
    wall time is labelled as this invocation's (a resumed bench reads earlier runs back)."""
    table = pd.DataFrame(
        [
            {
                "method_a": "naive",
                "method_b": "slope",
                "setting": "2:4 w4",
                "metric": "test/top1",
                "n_pairs": 10,
                "mean_diff": -0.001,
                "ci_low": -0.002,
                "ci_high": 0.0005,
                "p_holm": 0.3,
                "verdict": "no_detectable_difference",
            }
        ]
    )
    chosen = {
        tag: {"method": m, "setting": "2:4 w4", "overrides": [], "searched": True, "val": 0.9, "target_ratio": t}
        for tag, m, t in (("s", "slope", None), ("n", "naive", None), ("c", "codeq", 10.5))
    }
    record = {
        "date": "2026-11-30 15:00 UTC",
        "machine": {"cpu": "cpu", "cores": 2},
        "runs_executed_now": 10,
        "wall_minutes": 1.7,
        "trials": 12,
        "seeds": 10,
        "baseline": "slope",
        "tolerance": 0.1,
        "settings": ["2:4 w4"],
    }
    text = bench.verdicts_markdown(table, chosen, record)
    assert "10 runs in 1.7 min" in text and "read back" in text
    assert "12 tuning trials" in text and "{record" not in text  # every placeholder filled in
    unpaired = [line for line in text.splitlines() if line.startswith("- codeq: not compared")]
    assert len(unpaired) == 1 and "10.5×" in unpaired[0]
    assert not any(line.startswith("- naive: not compared") for line in text.splitlines())


@pytest.mark.parametrize("method", ["slope", "sqs"])
def test_a_bench_run_skipping_per_epoch_validation_records_the_same_results(tmp_path, method):
    """``val_every=0`` in ``bench.RUN_OVERRIDES`` changes how long a run takes, never what
    it records (SQS samples: its RNG stream is untouched by evaluation)."""
    base = [*bench.setting_overrides(method, "2:4 w4"), *BENCH_TINY, "finetune.epochs=2", "trainer.fast_dev_run=false"]
    base += ["+trainer.limit_train_batches=2"]
    runs = {}
    with torch_threads(1):
        for every in (1, 0):
            runs[every], _ = bench.execute(
                "bench_digits",
                method,
                0,
                [*base, f"val_every={every}"],
                tmp_path / str(every),
                tmp_path / "cache",
                tmp_path / "data",
                False,
            )
    assert runs[0]["status"] == "ok" and "val_every=0" in bench.RUN_OVERRIDES
    for key in ("val/top1", "test/top1", "compress/ratio", "train/loss_last", "train/steps"):
        assert runs[0][key] == runs[1][key], key


def test_bench_refuses_bad_workers_and_bad_search_spaces_before_any_run(tmp_path, monkeypatch, capsys):
    import shutil

    from slope_bench import tune as tune_module

    out = tmp_path / "bench"
    for bad in (["--workers", "0"], ["--threads", "0"]):
        with pytest.raises(SystemExit) as e:
            bench.main([*bad, "--out", str(out), "--methods", "slope"])
        assert e.value.code == 2 and "--workers and --threads must be >= 1" in capsys.readouterr().err
    conf = tmp_path / "conf"
    shutil.copytree(bench.CONF_DIR, conf)
    slope_yaml = conf / "method" / "slope.yaml"
    spec = yaml.safe_load(slope_yaml.read_text())
    for knob, message in (("not_a_knob", "a search over knobs of slope"), ("w_bits", "compression knobs n, m, w_bits stay fixed")):
        spec["search"] = {**spec["search"], knob: "choice(2, 3)"}
        slope_yaml.write_text(yaml.safe_dump(spec))
        monkeypatch.setattr(bench, "CONF_DIR", conf)
        monkeypatch.setattr(tune_module, "CONF_DIR", conf)
        with pytest.raises(SystemExit) as e:
            bench.main(["--out", str(out), "--methods", "naive", "slope", "--trials", "1", "--seeds", "1"])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and f"conf/method/slope.yaml: method.search.{knob}=" in err[-1] and message in err[-1]
        assert not out.exists()  # nothing ran, naive included
        del spec["search"][knob]
    spec["search"]["lam"] = "tag(log, interval(1, oops))"  # does not parse as a sweep expression
    slope_yaml.write_text(yaml.safe_dump(spec))
    with pytest.raises(SystemExit) as e:
        bench.main(["--out", str(out), "--methods", "slope"])
    assert e.value.code == 2 and "method.search.lam" in capsys.readouterr().err and not out.exists()


def test_verdicts_state_the_winner_margin_and_each_method_next_to_the_dense_controls(tmp_path):
    """A ``b_better`` row is stated from the winner's side (margin and interval positive);
    the per-setting table holds each method's seeds (mean ± sd) and the dense controls,
    one value per seed however many methods carry it."""
    row = {"setting": "2:4 w4", "metric": "test/top1", "n_pairs": 3, "p_holm": 0.01}
    table = pd.DataFrame(
        [
            {
                **row,
                "method_a": "prune_then_quantize",
                "method_b": "slope",
                "mean_diff": -0.0046,
                "ci_low": -0.0074,
                "ci_high": -0.0023,
                "verdict": "b_better",
            }
        ]
    )
    runs = tmp_path / "runs"
    tops = {"slope": [0.95, 0.96, 0.97], "prune_then_quantize": [0.94, 0.95, None]}  # None: a failed seed
    for method, values in tops.items():
        for seed, top1 in enumerate(values):
            r = {"method": method, "seed": seed, "status": "failed"}
            if top1 is not None:
                r = {
                    **r,
                    "status": "ok",
                    "test/top1": top1,
                    "compress/ratio": 10.5,
                    "test/top1_dense": 0.96 + seed / 100,
                    "test/top1_dense_ft": 0.95,
                    "train/steps_dense_ft": 100,
                }
                if method == "prune_then_quantize" and seed == 1:  # as a post-training run records it: a 0-step control
                    r.update({"test/top1_dense_ft": r["test/top1_dense"], "train/steps_dense_ft": 0})
            (runs / f"{bench.tag_of(method, '2:4 w4')}_s{seed}").mkdir(parents=True)
            (runs / f"{bench.tag_of(method, '2:4 w4')}_s{seed}" / "results.json").write_text(json.dumps(r))
    chosen = {
        bench.tag_of(m, "2:4 w4"): {"method": m, "setting": "2:4 w4", "overrides": [], "searched": True, "val": 0.9, "target_ratio": None}
        for m in tops
    }
    record = {
        "date": "d", "machine": {"cpu": "cpu", "cores": 2}, "runs_executed_now": 6, "wall_minutes": 1.0, "trials": 2, "seeds": 3,
        "baseline": "slope", "tolerance": 0.1, "settings": ["2:4 w4"],
    }  # fmt: skip
    lines = bench.verdicts_markdown(table, chosen, record, runs).splitlines()
    assert "- **slope** beats prune_then_quantize by 0.0046 top-1 (95% CI of the margin [+0.0023, +0.0074])." in lines
    assert "| slope | 3/3 | 0.9600 ± 0.0100 | 10.50 ± 0.00 |" in lines
    assert "| prune_then_quantize | 2/3 | 0.9450 ± 0.0071 | 10.50 ± 0.00 |" in lines
    assert "| *dense reference* | 3 | 0.9700 ± 0.0100 | 1 |" in lines  # seeds 0, 1, 2 once each
    assert "| *dense fine-tuned (same budget)* | 3 | 0.9500 ± 0.0000 | 1 |" in lines


def test_bench_grid_runs_every_setting_of_each_method_once_per_seed(tmp_path):
    """``python -m slope_bench.bench grid``: the untuned grid (methods at their defaults),
    from the knobs each yaml declares; resumable like the protocol."""
    out = tmp_path / "grid"
    argv = ["grid", "--seeds", "1", "--methods", "dense", "naive", "--workers", "1", "--out", str(out), "--cache", str(tmp_path / "cache")]
    with torch_threads(1):
        assert bench.main([*argv, *BENCH_TINY]) == 0
    record = json.loads((out / "bench.json").read_text())
    names = sorted(p.name for p in (out / "runs").iterdir())
    assert names == sorted(["dense_s0", *(f"naive_{n}_4_{b}_s0" for n in (2, 1) for b in (4, 3, 2))])
    assert record["runs"] == record["runs_executed_now"] == 7 and record["workers"] == 1
    assert all(json.loads((out / "runs" / n / "results.json").read_text())["status"] == "ok" for n in names)
    assert len(pd.read_csv(out / "leaderboard.csv")) == 7
    with torch_threads(1):
        assert bench.main([*argv, *BENCH_TINY]) == 0
    assert json.loads((out / "bench.json").read_text())["runs_executed_now"] == 0
