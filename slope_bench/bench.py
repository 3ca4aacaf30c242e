"""The embedded benchmark behind ``make bench``: who wins, with an equal tuning budget.

On ``experiment=bench_digits`` (digits_hard + ResNet-18 width 16), in this process
(dense references are trained once per seed and cached):

1. **tune** every method at every setting with the same number of trials, chosen on
   validation data only (:mod:`slope_bench.tune`): the joint methods (slope, naive,
   prune_then_quantize, quantize_then_prune, obc) at 2:4 w4, 2:4 w2 and 1:4 w3; CoDeQ
   and SQS, which choose their own compression, at the setting's bits and the whole-model
   ratio SLOPE reaches there (within the pairing tolerance, else the nearest);
2. run each chosen configuration on ``--seeds`` seeds (test metrics are read only here),
   plus the dense / dense fine-tune controls;
3. write the leaderboard, ``comparisons.csv`` (paired bootstrap intervals, sign-flip
   tests, Holm) and ``VERDICTS.md``: per setting who wins, by how much, with the interval
   and the tuned hyperparameters::

    python -m slope_bench.bench                                    # -> experiments/digits_resnet18/
    python -m slope_bench.bench --trials 2 --seeds 3 --methods slope naive --settings "2:4 w4" --out /tmp/b
    python -m slope_bench.bench grid --seeds 3                     # the untuned grid (every method, 2:4/1:4 x 4/3/2 bits)

Runs go to ``--workers`` processes (default one per core, at most 8; one torch thread
each): the (setting, method) pipelines run side by side, a priority queue keeps the ratio
reference's runs ahead of the rest. No run validates per epoch or writes resume
checkpoints (``RUN_OVERRIDES``: the choice reads the finalized model's ``val/*``, and
nothing records the per-epoch curves), so a trial and a seed run of the same
configuration and seed are the same run: the chosen trial is copied as the tuning seed's
run (:func:`reuse_trial`). Finished runs are
skipped when the benchmark is run again (resumable); failures are recorded as
``status: failed`` and listed on the leaderboard.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import itertools
import json
import logging
import os
import platform
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

from slope_bench.utils import CONF_DIR

NM_BITS = [(n, bits) for n in (2, 1) for bits in (4, 3, 2)]


def method_grid(method: str) -> list[list[str]]:
    """Overrides for every benchmark setting of one method, from the knobs its yaml declares.

    A method with N:M knobs (``n``, ``m`` not null) and bits (``w_bits`` not null) runs
    2:4 and 1:4 at 4/3/2 bits; N:M only: 2:4 and 1:4; bits only: 4/3/2 bits; neither:
    once (e.g. ``dense``).
    """
    node = OmegaConf.load(CONF_DIR / "method" / f"{method}.yaml")
    has_nm = node.get("n") is not None and node.get("m") is not None
    has_bits = node.get("w_bits") is not None
    if has_nm and has_bits:
        return [[f"method.n={n}", "method.m=4", f"method.w_bits={b}"] for n, b in NM_BITS]
    if has_nm:
        return [[f"method.n={n}", "method.m=4"] for n in (2, 1)]
    if has_bits:
        return [[f"method.w_bits={b}"] for b in (4, 3, 2)]
    return [[]]


def grid(methods: list[str]) -> list[tuple[str, list[str]]]:
    """(method, overrides) for every setting of the benchmark, for existing methods."""
    return [(method, overrides) for method in methods for overrides in method_grid(method)]


def available(group: str) -> list[str]:
    """The options of a config group: the stems of ``conf/<group>/*.yaml``."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def available_methods() -> list[str]:
    """The methods that exist: the stems of ``conf/method/*.yaml``."""
    return available("method")


def check_names(parser: argparse.ArgumentParser, group: str, names: list[str]) -> None:
    """Exit through ``parser.error`` (code 2) when a name is not a ``conf/<group>/*.yaml``."""
    options = available(group)
    unknown = sorted(set(names) - set(options))
    if unknown:
        parser.error(f"unknown {group}(s) {unknown}: expected some of {', '.join(options)}")


def compose_run(overrides: list[str], out_dir: Path, cache_dir: Path, data_dir: Path) -> DictConfig:
    """The real config tree with ``overrides``, writing this run under ``out_dir``."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.root_dir = str(out_dir.parent)
        cfg.paths.log_dir = str(out_dir.parent)
        cfg.paths.output_dir = str(out_dir)
        cfg.paths.cache_dir = str(cache_dir)
        cfg.paths.data_dir = str(data_dir)
    return cfg


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


SETTINGS = {"2:4 w4": (2, 4, 4), "2:4 w2": (2, 4, 2), "1:4 w3": (1, 4, 3)}
JOINT = ["slope", "naive", "prune_then_quantize", "quantize_then_prune", "obc"]
RATIO_MATCHED = ["codeq", "sqs"]  # they choose their ratio: matched to SLOPE's at the setting
RATIO_REFERENCE = "slope"


def setting_overrides(method: str, setting: str) -> list[str]:
    """Overrides that put ``method`` at ``setting`` (ratio-matched methods: its bits only)."""
    n, m, bits = SETTINGS[setting]
    if method in RATIO_MATCHED:
        return [f"method.w_bits={bits}"]
    return [f"method.n={n}", f"method.m={m}", f"method.w_bits={bits}"]


def tag_of(method: str, setting: str) -> str:
    return f"{method}_{setting.replace(':', 'of').replace(' ', '_')}"


# every run of the bench: no logger, no bar (a worker's console is a file), no resume
# checkpoints (the bench resumes whole runs: an unfinished one restarts, resume=false), no
# per-epoch validation (a trial is scored by the val/* its finalized model records, a seed
# run by its test/*; per-epoch curves would go nowhere without a logger)
RUN_OVERRIDES = ["logger=none", "trainer.enable_progress_bar=false", "checkpoint_every=0", "val_every=0"]


def default_workers() -> int:
    """One single-threaded worker per available core, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def execute(
    experiment: str, method: str, seed: int, overrides: list[str], out_dir: Path, cache: Path, data: Path, log_file: bool
) -> tuple[dict, float]:
    """Run one configuration into ``out_dir`` in this process: ``(results, seconds)``. A
    failure is recorded as ``status: failed`` and returned like any result. With
    ``log_file``, everything the run prints goes to ``<out_dir>/run.log`` (a worker
    process: its console is not the user's)."""
    from slope_bench.report import record_failure
    from slope_bench.train import run

    cfg = compose_run(
        [f"experiment={experiment}", f"method={method}", f"seed={seed}", *RUN_OVERRIDES, *overrides],
        out_dir,
        cache,
        data,
    )
    t0 = time.perf_counter()
    with redirect_output(out_dir / "run.log" if log_file else None):
        try:
            results = run(cfg)
        except Exception as e:  # recorded, listed on the leaderboard, the benchmark goes on
            record_failure(cfg, e)
            results = json.loads((out_dir / "results.json").read_text())
    return results, time.perf_counter() - t0


@contextlib.contextmanager
def redirect_output(path: Path | None) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so C-level output
    too) to ``path`` inside the block; ``None``: unchanged."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _init_worker(threads: int) -> None:
    import torch

    from slope_bench.utils import quiet_third_party

    torch.set_num_threads(threads)
    quiet_third_party()


class Workers:
    """``workers`` processes of ``threads`` torch threads each; the most urgent job first.

    Jobs wait in a priority queue (lowest ``priority`` first, then first come) and at most
    ``workers`` run at once, so the runs on a critical path (the ratio reference's tuning
    trials, which CoDeQ's and SQS's tuning waits for) never queue behind a fan-out of seed
    runs. A run's result does not depend on which worker ran it or when: each run seeds
    itself and every worker has the same thread count.
    """

    def __init__(self, workers: int, threads: int) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.pool = ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker, initargs=(threads,)
        )
        self.free = workers
        self.queue: list = []
        self.order = itertools.count()
        self.lock = threading.RLock()

    def submit(self, priority: tuple, fn: Callable, *args) -> Future:
        """Queue ``fn(*args)`` (a picklable module-level function) and return its future."""
        future: Future = Future()
        with self.lock:
            heapq.heappush(self.queue, (priority, next(self.order), fn, args, future))
        self._dispatch()
        return future

    def _dispatch(self) -> None:
        with self.lock:
            while self.free and self.queue:
                _, _, fn, args, future = heapq.heappop(self.queue)
                self.free -= 1
                try:
                    inner = self.pool.submit(fn, *args)
                except Exception as e:  # the pool is broken (a worker was killed) or shut down
                    self.free += 1
                    self._fail_queued(e, future)
                    return
                inner.add_done_callback(partial(self._finished, future))

    def _finished(self, future: Future, inner: Future) -> None:
        with self.lock:
            self.free += 1
        error = CancelledError() if inner.cancelled() else inner.exception()
        if error is None:
            future.set_result(inner.result())
        else:
            future.set_exception(error)
        self._dispatch()

    def _fail_queued(self, error: BaseException, *futures: Future) -> None:
        """Fail ``futures`` and every queued job with ``error``: whoever waits on them stops waiting."""
        with self.lock:
            waiting = [*futures, *(item[-1] for item in self.queue)]
            self.queue.clear()
        for future in waiting:
            if not future.done():
                future.set_exception(error)

    def close(self) -> None:
        """Fail the queued jobs, let the running ones finish, stop the processes."""
        self._fail_queued(RuntimeError("the benchmark stopped before this run started"))
        self.pool.shutdown(wait=True)  # at most `workers` jobs were handed to the pool: they finish


class Runner:
    """Runs configurations into folders (reading back the ones that already finished),
    in this process or on :class:`Workers`."""

    def __init__(
        self, experiment: str, cache: Path, data: Path, extra: list[str], workers: int = 1, threads: int | None = None, bar=None
    ) -> None:
        self.experiment, self.cache, self.data, self.extra, self.bar = experiment, cache, data, extra, bar
        self.workers, self.threads = workers, threads
        self.timings: list[dict] = []
        self._pool: Workers | None = None
        self._lock = threading.Lock()

    @property
    def parallel(self) -> bool:
        """Whether runs go to worker processes (``workers > 1``)."""
        return self.workers > 1

    def __call__(self, out_dir: Path, method: str, seed: int, overrides: list[str], priority: tuple = ()) -> dict:
        """Run one configuration (blocking) and return its results."""
        return self.many([(out_dir, method, seed, overrides)], priority)[0]

    def many(self, calls: list[tuple[Path, str, int, list[str]]], priority: tuple = ()) -> list[dict]:
        """Run independent configurations (on the workers at once) and return their results in order."""
        from slope_bench.obs import torch_threads

        results: list = [None] * len(calls)
        pending = []
        for i, (out_dir, method, seed, overrides) in enumerate(calls):
            done = out_dir / "results.json"
            if done.is_file():
                previous = json.loads(done.read_text())
                if previous.get("status") in ("ok", "diverged"):
                    results[i] = previous
                    continue
            args = (self.experiment, method, seed, [*overrides, *self.extra], out_dir, self.cache, self.data, self.parallel)
            if self.parallel:
                pending.append((i, out_dir, self._submit(priority, args)))
            else:
                with torch_threads(self.threads):
                    results[i], seconds = execute(*args)
                self._log(out_dir, results[i], seconds)
        for i, out_dir, future in pending:
            results[i], seconds = future.result()
            self._log(out_dir, results[i], seconds)
        return results

    def _submit(self, priority: tuple, args: tuple) -> Future:
        with self._lock:
            if self._pool is None:
                self._pool = Workers(self.workers, self.threads or 1)
        return self._pool.submit(priority, execute, *args)

    def _log(self, out_dir: Path, results: dict, seconds: float) -> None:
        with self._lock:
            self.timings.append({"run": str(out_dir), "seconds": round(seconds, 1)})
            count = len(self.timings)
        if self.bar is not None:
            val = results.get(f"val/{results.get('main_metric', 'top1')}")
            score = f" val {val:.4f}" if isinstance(val, float) else ""
            self.bar(f"[{count}] {out_dir.parent.name}/{out_dir.name}: {results.get('status')}{score} ({seconds:.0f} s)")

    def close(self) -> None:
        """Stop the worker processes (if any were started)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None


PRIORITY = {RATIO_REFERENCE: 0, **dict.fromkeys(RATIO_MATCHED, 1)}  # then every other method (2)


def protocol(args: argparse.Namespace, runner: Runner) -> dict:
    """Tune → seeds → controls; returns the record of what was chosen.

    Every (setting, method) is one pipeline: its trials in order (TPE proposes from the
    ones before), then its seeds at once. With a parallel ``runner`` the pipelines run
    side by side (CoDeQ's and SQS's wait for SLOPE's seed runs at the same setting, whose
    ratio they are matched to); otherwise one after the other, in the same order.
    """
    from slope_bench.tune import tunable, tune

    runs_dir, tune_dir = args.out / "runs", args.out / "tune"
    jobs = [(setting, method) for setting in args.settings for method in [*JOINT, *RATIO_MATCHED] if method in args.methods]
    references: dict[str, Future] = {setting: Future() for setting in args.settings}  # SLOPE's mean ratio per setting

    def pipeline(setting: str, method: str) -> dict:
        target = None
        if method in RATIO_MATCHED:
            target = references[setting].result() if RATIO_REFERENCE in args.methods else None
            if target is None:
                log.warning("%s at %s: no %s run to match the ratio of: tuning without a target", method, setting, RATIO_REFERENCE)
        fixed = setting_overrides(method, setting)
        tag = tag_of(method, setting)
        rank = PRIORITY.get(method, 2)

        def trial_dir(number: int) -> Path:
            return tune_dir / tag / f"trial_{number:02d}"

        def trial(number: int, overrides: list[str]) -> dict:
            return runner(trial_dir(number), method, args.tune_seed, [*fixed, *overrides], (rank, 0))

        try:
            tuned = tune(method, trial, args.trials, seed=args.tune_seed, target_ratio=target, tolerance=args.tolerance)
            if tuned.chosen is not None and args.tune_seed < args.seeds:
                number = next(i for i, t in enumerate(tuned.trials) if t is tuned.chosen)
                reuse_trial(trial_dir(number), runs_dir / f"{tag}_s{args.tune_seed}")
            calls = [(runs_dir / f"{tag}_s{seed}", method, seed, [*fixed, *tuned.overrides]) for seed in range(args.seeds)]
            finals = runner.many(calls, (rank, 1))
            ok = [r for r in finals if r.get("status") == "ok"]
            if method == RATIO_REFERENCE and ok:
                references[setting].set_result(sum(r["compress/ratio"] for r in ok) / len(ok))
        finally:
            if method == RATIO_REFERENCE and not references[setting].done():
                references[setting].set_result(None)  # failed: the ratio-matched methods tune without a target
        return {
            "method": method,
            "setting": setting,
            "overrides": tuned.overrides,
            "searched": tuned.searched,
            "trials": len(tuned.trials),
            "not_tunable": sum(1 for t in tuned.trials if not tunable(t)),  # failed, diverged, or no val/* recorded
            "val": None if tuned.chosen is None else tuned.chosen.get(f"val/{tuned.chosen.get('main_metric')}"),
            "target_ratio": target,
        }

    if runner.parallel and len(jobs) > 1:
        threads = ThreadPoolExecutor(len(jobs), thread_name_prefix="pipeline")
        try:
            futures = [threads.submit(pipeline, *job) for job in jobs]
            outcomes = [f.result() for f in futures]
        except BaseException:  # one pipeline failed, or Ctrl-C: the queued runs fail, so every pipeline stops
            runner.close()
            raise
        finally:
            threads.shutdown(wait=False, cancel_futures=True)
    else:
        outcomes = [pipeline(*job) for job in jobs]
    chosen = {tag_of(method, setting): outcome for (setting, method), outcome in zip(jobs, outcomes, strict=True)}
    if "dense" in args.methods:
        runner.many([(runs_dir / f"dense_s{seed}", "dense", seed, []) for seed in range(args.seeds)], (2, 1))
    return chosen


def reuse_trial(trial_dir: Path, run_dir: Path) -> None:
    """The chosen trial *is* the chosen configuration's run at the tuning seed: copy it to
    ``run_dir`` instead of training it again (``results.json`` gains ``bench/reused_trial``).

    Both run with the same overrides (``RUN_OVERRIDES``, the setting, the chosen
    configuration) at the same seed; a ``run_dir`` that already finished is kept. Its
    test metrics are not read for the choice either way: the choice is on ``val/*``.
    """
    from slope_bench.utils import atomic_write_json

    if (run_dir / "results.json").is_file() or not (trial_dir / "results.json").is_file():
        return
    if run_dir.exists():  # an unfinished run's leftovers
        shutil.rmtree(run_dir)
    shutil.copytree(trial_dir, run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    results["bench/reused_trial"] = str(trial_dir.relative_to(trial_dir.parent.parent.parent))
    atomic_write_json(run_dir / "results.json", results)


def history(path: Path, record: dict) -> dict:
    """``invocations`` (every invocation that wrote into this folder: date, runs executed,
    wall minutes, workers, threads, per-run seconds), ``runs_executed_total`` and ``wall_minutes_total``:
    a bench resumed over several invocations still says what the whole took. An earlier
    ``bench.json`` without ``invocations`` counts as one invocation."""
    earlier: list[dict] = []
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except (OSError, ValueError):
            previous = {}
        earlier = previous.get("invocations") or (
            [{k: previous.get(k) for k in INVOCATION_KEYS}] if "runs_executed_now" in previous else []
        )
    invocations = [*earlier, {k: record.get(k) for k in INVOCATION_KEYS}]
    return {
        "invocations": invocations,
        "runs_executed_total": sum(i.get("runs_executed_now") or 0 for i in invocations),
        "wall_minutes_total": round(sum(i.get("wall_minutes") or 0.0 for i in invocations), 2),
    }


INVOCATION_KEYS = ("date", "runs_executed_now", "wall_minutes", "workers", "threads_per_worker", "settings", "methods", "timings")


def mean_sd(values: list[float], fmt: str) -> str:
    """``mean ± sd`` (sample sd; 0 for one value), ``—`` for none."""
    import numpy as np

    if not values:
        return "—"
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{float(np.mean(values)):{fmt}} ± {sd:{fmt}}"


def summary_table(runs_dir: Path, chosen: dict, setting: str, seeds: int) -> list[str]:
    """Markdown lines: each method's seed runs at ``setting`` (test top-1 and whole-model
    ratio, mean ± sd over the finished seeds) and the controls every run carries (the dense
    reference and the dense model fine-tuned with the shared budget, one value per seed;
    a post-training method's run carries a 0-step control, which is left out)."""
    rows, controls = [], {"test/top1_dense": {}, "test/top1_dense_ft": {}}
    for c in chosen.values():
        if c["setting"] != setting:
            continue
        paths = [runs_dir / f"{tag_of(c['method'], setting)}_s{seed}" / "results.json" for seed in range(seeds)]
        ok = [r for r in (json.loads(p.read_text()) for p in paths if p.is_file()) if r.get("status") == "ok"]
        controls["test/top1_dense"].update({r["seed"]: r["test/top1_dense"] for r in ok if isinstance(r.get("test/top1_dense"), float)})
        fine_tuned = [
            r for r in ok if isinstance(r.get("test/top1_dense_ft"), float) and r.get("train/steps_dense_ft")
        ]  # not OBC's 0-step "control"
        controls["test/top1_dense_ft"].update({r["seed"]: r["test/top1_dense_ft"] for r in fine_tuned})
        top1 = [r["test/top1"] for r in ok if isinstance(r.get("test/top1"), float)]
        ratio = [r["compress/ratio"] for r in ok if isinstance(r.get("compress/ratio"), float)]
        rows.append(f"| {c['method']} | {len(ok)}/{seeds} | {mean_sd(top1, '.4f')} | {mean_sd(ratio, '.2f')} |")
    if not rows:
        return []
    lines = ["| method | seeds ok | test top-1 | whole-model ratio |", "|---|---|---|---|", *rows]
    for key, name in (("test/top1_dense", "dense reference"), ("test/top1_dense_ft", "dense fine-tuned (same budget)")):
        if controls[key]:
            lines.append(f"| *{name}* | {len(controls[key])} | {mean_sd(list(controls[key].values()), '.4f')} | 1 |")
    return [*lines, ""]


def verdicts_markdown(table, chosen: dict, record: dict, runs_dir: Path | None = None) -> str:
    """``VERDICTS.md``: per setting, who wins, by how much, with the interval; each
    method's mean test top-1 and ratio next to the dense controls (from ``runs_dir``)."""
    lines = [
        "# Who wins on the embedded benchmark (digits_hard, ResNet-18 width 16)",
        "",
        f"Measured {record['date']} on {record['machine']['cpu']} ({record['machine']['cores']} cores), "
        f"this invocation of `make bench`: {record['runs_executed_now']} runs in {record['wall_minutes']:.1f} min "
        f"(runs already finished in an earlier invocation are read back, not rerun; all {len(record.get('invocations') or [record])} "
        f"invocation(s) into this folder: {record.get('runs_executed_total', record['runs_executed_now'])} runs in "
        f"{record.get('wall_minutes_total', record['wall_minutes']):.1f} min, `bench.json`). Protocol: {record['trials']} tuning trials per method and setting "
        f"(seeded TPE, chosen on validation top-1 only), then {record['seeds']} seeds of the chosen configuration on test"
        + (
            f" (seed {record['tune_seed']} is the chosen trial itself, copied: the same configuration and seed)"
            if record.get("tune_seed", record["seeds"]) < record["seeds"]
            else ""
        )
        + ". "
        "Differences are paired by seed (same split, same dense reference): mean difference of test top-1 with a 95% paired "
        f"bootstrap interval and a sign-flip permutation test, every method against {record['baseline']}, Holm-corrected across "
        "the whole table; CoDeQ and SQS are paired "
        f"with the joint methods at the nearest whole-model ratio within {record['tolerance']:.0%}.",
        "",
    ]
    main = table[table["metric"] != "compress/ratio"] if len(table) else table
    for setting in record["settings"]:
        lines += [f"## {setting}", ""]
        rows = main[main["setting"].astype(str).str.contains(setting, regex=False)] if len(main) else main
        if not len(rows):
            lines += ["No comparisons (not enough runs).", ""]
            continue
        lines += ["| A | B | pairs | mean diff (A − B) | 95% CI | p (Holm) | verdict |", "|---|---|---|---|---|---|---|"]
        for _, r in rows.iterrows():
            ci = f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]" if r["ci_low"] == r["ci_low"] else "—"
            p = f"{r['p_holm']:.3g}" if r["p_holm"] == r["p_holm"] else "—"
            lines.append(f"| {r['method_a']} | {r['method_b']} | {r['n_pairs']} | {r['mean_diff']:+.4f} | {ci} | {p} | {r['verdict']} |")
        wins = rows[rows["verdict"].isin(["a_better", "b_better"])]
        lines.append("")
        if len(wins):
            for _, r in wins.iterrows():
                a_wins = r["verdict"] == "a_better"
                winner, loser = (r["method_a"], r["method_b"]) if a_wins else (r["method_b"], r["method_a"])
                low, high = (r["ci_low"], r["ci_high"]) if a_wins else (-r["ci_high"], -r["ci_low"])  # the interval of winner − loser
                lines.append(
                    f"- **{winner}** beats {loser} by {abs(r['mean_diff']):.4f} top-1 (95% CI of the margin [{low:+.4f}, {high:+.4f}])."
                )
        else:
            lines.append("- No detectable difference between any two methods at this setting.")
        compared = set(rows["method_a"]) | set(rows["method_b"])
        for c in chosen.values():
            if c["setting"] == setting and c["method"] != record["baseline"] and c["method"] not in compared:
                target = f" (target ratio {c['target_ratio']:.1f}×)" if c.get("target_ratio") else ""
                lines.append(
                    f"- {c['method']}: not compared — no paired run within the tolerance of {record['baseline']}'s ratio{target}; "
                    "see the leaderboard for its own ratio."
                )
        lines.append("")
        lines += summary_table(runs_dir, chosen, setting, record["seeds"]) if runs_dir is not None else []
        lines += ["Tuned configurations:", ""]
        for c in chosen.values():
            if c["setting"] == setting:
                knobs = ", ".join(c["overrides"]) if c["overrides"] else ("defaults (no search space)" if not c["searched"] else "defaults")
                lines.append(f"- {c['method']}: {knobs} (val top-1 {c['val'] if c['val'] is None else round(c['val'], 4)})")
        lines.append("")
    return "\n".join(lines) + "\n"


log = logging.getLogger("slope_bench")


def progress(line: str) -> None:
    print(line, flush=True)


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    workers = default_workers()
    parser.add_argument(
        "--workers",
        type=int,
        default=workers,
        help=f"runs at once, each in its own process (default here: {workers}, one per core); 1: one after the other in this process",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per run (default: 1 with several workers; torch's own with --workers 1). "
        "Results depend on it in the last bits: bench.json records it",
    )


def check_workers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--workers``/``--threads`` are positive (exit 2 otherwise); fills in the default thread count."""
    if args.workers < 1 or (args.threads is not None and args.threads < 1):
        parser.error(f"--workers and --threads must be >= 1 (got {args.workers} and {args.threads})")
    if args.threads is None and args.workers > 1:
        args.threads = 1


def check_search_spaces(parser: argparse.ArgumentParser, methods: list[str]) -> None:
    """Every method's ``search`` names its own knobs and parses (exit 2 with one line otherwise), before any run."""
    from slope_bench.errors import ConfigError
    from slope_bench.tune import distributions, search_space
    from slope_bench.validate import check_search_space

    for method in methods:
        try:
            check_search_space(OmegaConf.load(CONF_DIR / "method" / f"{method}.yaml"))
            distributions(search_space(method))
        except ConfigError as e:
            parser.error(f"conf/method/{method}.yaml: {e}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["grid"]:
        return grid_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("experiments/digits_resnet18"))
    parser.add_argument("--trials", type=int, default=12, help="tuning trials per method and setting (the same for every method)")
    parser.add_argument(
        "--seeds", type=int, default=10, help="seeds of each chosen configuration (a sign-flip test needs >= 6 pairs to reach p < 0.05)"
    )
    parser.add_argument("--baseline", default="slope", help="every method is compared with this one (the Holm family: methods x settings)")
    parser.add_argument("--tune-seed", type=int, default=0, help="the seed the trials run at (and the sampler's)")
    parser.add_argument("--methods", nargs="*", default=[*JOINT, *RATIO_MATCHED, "dense"])
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), help=f"from {', '.join(SETTINGS)}")
    parser.add_argument("--tolerance", type=float, default=0.1, help="relative ratio tolerance of ratio matching and pairing")
    parser.add_argument("--experiment", default="bench_digits")
    parser.add_argument("--cache", type=Path, default=Path(".cache/slope_bench"))
    add_worker_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (e.g. finetune.epochs=5)")
    args = parser.parse_args(argv)
    check_names(parser, "method", args.methods)
    check_workers(parser, args)
    check_search_spaces(parser, args.methods)
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown setting(s) {unknown}: expected some of {', '.join(SETTINGS)}")
    if args.trials < 1 or args.seeds < 1 or not 0 < args.tolerance < 1:
        parser.error("--trials and --seeds must be >= 1 and --tolerance in (0, 1)")

    from slope_bench import compare, leaderboard
    from slope_bench.utils import quiet_third_party

    quiet_third_party()
    t_start = time.perf_counter()
    runner = Runner(args.experiment, args.cache, args.out / "data", args.overrides, args.workers, args.threads, bar=progress)
    if runner.parallel:
        print(f"{args.workers} worker processes x {args.threads} torch thread(s); each run's output: <run dir>/run.log", flush=True)
    try:
        chosen = protocol(args, runner)
    finally:
        runner.close()
    total = time.perf_counter() - t_start
    runs_dir = args.out / "runs"
    paths = leaderboard.write([runs_dir], args.out, baseline=args.baseline, tolerance=args.tolerance)
    csv_path = compare.write([runs_dir], args.out, baseline=args.baseline, tolerance=args.tolerance)
    record = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "experiment": args.experiment,
        "protocol": "tune (val) -> seeds (test) -> paired comparisons",
        "trials": args.trials,
        "seeds": args.seeds,
        "tune_seed": args.tune_seed,
        "tolerance": args.tolerance,
        "baseline": args.baseline,
        "settings": args.settings,
        "methods": args.methods,
        "extra_overrides": args.overrides,
        "workers": args.workers,
        "threads_per_worker": args.threads,
        "chosen": chosen,
        "runs_executed_now": len(runner.timings),
        "wall_minutes": round(total / 60, 2),
        "timings": runner.timings,
    }
    record.update(history(args.out / "bench.json", record))
    (args.out / "bench.json").write_text(json.dumps(record, indent=2) + "\n")
    import pandas as pd

    table = pd.read_csv(csv_path) if csv_path.is_file() else pd.DataFrame()
    (args.out / "VERDICTS.md").write_text(verdicts_markdown(table, chosen, record, runs_dir))
    print(f"{len(runner.timings)} runs executed now in {total / 60:.1f} min -> {args.out}")
    for name, path in {**paths, "comparisons": csv_path, "verdicts": args.out / "VERDICTS.md"}.items():
        print(f"  {name}: {path}")
    return 0


def grid_main(argv: list[str]) -> int:
    """``python -m slope_bench.bench grid``: every method at its default knobs on the
    untuned grid (2:4 and 1:4 × 4/3/2 bits where it applies), several seeds."""
    parser = argparse.ArgumentParser(prog="python -m slope_bench.bench grid", description=grid_main.__doc__)
    parser.add_argument("--out", type=Path, default=Path("experiments/digits_resnet18_grid"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", nargs="*", default=None, help="subset of conf/method/*.yaml (default: all)")
    parser.add_argument("--experiment", default="bench_digits")
    parser.add_argument("--cache", type=Path, default=Path(".cache/slope_bench"))
    add_worker_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (e.g. finetune.epochs=5)")
    args = parser.parse_args(argv)
    check_workers(parser, args)
    from slope_bench import leaderboard
    from slope_bench.utils import quiet_third_party

    quiet_third_party()
    methods = args.methods or available_methods()
    check_names(parser, "method", methods)
    jobs = [(m, o, s) for s in range(args.seeds) for m, o in grid(methods)]
    runs_dir = args.out / "runs"
    t_start = time.perf_counter()
    runner = Runner(args.experiment, args.cache, args.out / "data", args.overrides, args.workers, args.threads, bar=progress)
    calls = [
        (runs_dir / ("_".join([m, *(o.split("=", 1)[1] for o in overrides)]) + f"_s{seed}"), m, seed, overrides)
        for m, overrides, seed in jobs
    ]
    try:
        runner.many(calls)
    finally:
        runner.close()
    total = time.perf_counter() - t_start
    paths = leaderboard.write([runs_dir], args.out)
    record = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "experiment": args.experiment,
        "seeds": args.seeds,
        "methods": methods,
        "extra_overrides": args.overrides,
        "workers": args.workers,
        "threads_per_worker": args.threads,
        "runs": len(jobs),
        "runs_executed_now": len(runner.timings),
        "wall_seconds_now": round(total, 1),
        "timings": runner.timings,
    }
    (args.out / "bench.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"{len(jobs)} runs ({len(runner.timings)} executed now, {total / 60:.1f} min) -> {args.out}")
    for name, path in paths.items():
        print(f"  {name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
