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

Finished runs are skipped when the benchmark is run again (resumable); failures are
recorded as ``status: failed`` and listed on the leaderboard.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from datetime import datetime, timezone
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


class Runner:
    """Runs one configuration into a folder, or reads it when it already finished."""

    def __init__(self, experiment: str, cache: Path, data: Path, extra: list[str], bar=None) -> None:
        self.experiment, self.cache, self.data, self.extra, self.bar = experiment, cache, data, extra, bar
        self.timings: list[dict] = []

    def __call__(self, out_dir: Path, method: str, seed: int, overrides: list[str]) -> dict:
        from slope_bench.report import record_failure
        from slope_bench.train import run

        done = out_dir / "results.json"
        if done.is_file():
            previous = json.loads(done.read_text())
            if previous.get("status") in ("ok", "diverged"):
                return previous
        cfg = compose_run(
            [
                f"experiment={self.experiment}",
                f"method={method}",
                f"seed={seed}",
                "logger=none",
                "trainer.enable_progress_bar=false",
                *overrides,
                *self.extra,
            ],
            out_dir,
            self.cache,
            self.data,
        )
        if self.bar is not None:
            self.bar(f"{out_dir.parent.name}/{out_dir.name}")
        t0 = time.perf_counter()
        try:
            results = run(cfg)
        except Exception as e:  # recorded, listed on the leaderboard, the benchmark goes on
            record_failure(cfg, e)
            results = json.loads(done.read_text())
        self.timings.append({"run": str(out_dir), "seconds": round(time.perf_counter() - t0, 1)})
        return results


def protocol(args: argparse.Namespace, runner: Runner) -> dict:
    """Tune → seeds → controls; returns the record of what was chosen."""
    from slope_bench.tune import tunable, tune

    runs_dir, tune_dir = args.out / "runs", args.out / "tune"
    chosen: dict[str, dict] = {}
    for setting in args.settings:
        reference_ratio = None
        for method in [m for m in [*JOINT, *RATIO_MATCHED] if m in args.methods]:
            if method in RATIO_MATCHED and reference_ratio is None:
                log.warning("%s at %s: no %s run to match the ratio of: tuning without a target", method, setting, RATIO_REFERENCE)
            fixed = setting_overrides(method, setting)
            tag = tag_of(method, setting)

            def trial(number: int, overrides: list[str], tag: str = tag, method: str = method, fixed: list[str] = fixed) -> dict:
                return runner(tune_dir / tag / f"trial_{number:02d}", method, args.tune_seed, [*fixed, *overrides])

            target = reference_ratio if method in RATIO_MATCHED else None
            tuned = tune(method, trial, args.trials, seed=args.tune_seed, target_ratio=target, tolerance=args.tolerance)
            finals = [runner(runs_dir / f"{tag}_s{seed}", method, seed, [*fixed, *tuned.overrides]) for seed in range(args.seeds)]
            ok = [r for r in finals if r.get("status") == "ok"]
            if method == RATIO_REFERENCE and ok:
                reference_ratio = sum(r["compress/ratio"] for r in ok) / len(ok)
            chosen[tag] = {
                "method": method,
                "setting": setting,
                "overrides": tuned.overrides,
                "searched": tuned.searched,
                "trials": len(tuned.trials),
                "not_tunable": sum(1 for t in tuned.trials if not tunable(t)),  # failed, diverged, or no val/* recorded
                "val": None if tuned.chosen is None else tuned.chosen.get(f"val/{tuned.chosen.get('main_metric')}"),
                "target_ratio": target,
            }
    if "dense" in args.methods:
        for seed in range(args.seeds):
            runner(runs_dir / f"dense_s{seed}", "dense", seed, [])
    return chosen


def verdicts_markdown(table, chosen: dict, record: dict) -> str:
    """``VERDICTS.md``: per setting, who wins, by how much, with the interval."""
    lines = [
        "# Who wins on the embedded benchmark (digits_hard, ResNet-18 width 16)",
        "",
        f"Measured {record['date']} on {record['machine']['cpu']} ({record['machine']['cores']} cores), "
        f"this invocation of `make bench`: {record['runs_executed_now']} runs in {record['wall_minutes']:.1f} min "
        f"(runs already finished in an earlier invocation are read back, not rerun). Protocol: {record['trials']} tuning trials per method and setting "
        f"(seeded TPE, chosen on validation top-1 only), then {record['seeds']} seeds of the chosen configuration on test. "
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
                winner, loser = (r["method_a"], r["method_b"]) if r["verdict"] == "a_better" else (r["method_b"], r["method_a"])
                lines.append(
                    f"- **{winner}** beats {loser} by {abs(r['mean_diff']):.4f} top-1 (CI [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}])."
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
        lines += ["Tuned configurations:", ""]
        for c in chosen.values():
            if c["setting"] == setting:
                knobs = ", ".join(c["overrides"]) if c["overrides"] else ("defaults (no search space)" if not c["searched"] else "defaults")
                lines.append(f"- {c['method']}: {knobs} (val top-1 {c['val'] if c['val'] is None else round(c['val'], 4)})")
        lines.append("")
    return "\n".join(lines) + "\n"


log = logging.getLogger("slope_bench")


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
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (e.g. finetune.epochs=5)")
    args = parser.parse_args(argv)
    check_names(parser, "method", args.methods)
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown setting(s) {unknown}: expected some of {', '.join(SETTINGS)}")
    if args.trials < 1 or args.seeds < 1 or not 0 < args.tolerance < 1:
        parser.error("--trials and --seeds must be >= 1 and --tolerance in (0, 1)")

    from slope_bench import compare, leaderboard
    from slope_bench.utils import quiet_third_party

    quiet_third_party()
    t_start = time.perf_counter()
    runner = Runner(args.experiment, args.cache, args.out / "data", args.overrides, bar=lambda tag: print(f"-- {tag}", flush=True))
    chosen = protocol(args, runner)
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
        "chosen": chosen,
        "runs_executed_now": len(runner.timings),
        "wall_minutes": round(total / 60, 2),
        "timings": runner.timings,
    }
    (args.out / "bench.json").write_text(json.dumps(record, indent=2) + "\n")
    import pandas as pd

    table = pd.read_csv(csv_path) if csv_path.is_file() else pd.DataFrame()
    (args.out / "VERDICTS.md").write_text(verdicts_markdown(table, chosen, record))
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
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (e.g. finetune.epochs=5)")
    args = parser.parse_args(argv)
    from slope_bench import leaderboard
    from slope_bench.utils import quiet_third_party

    quiet_third_party()
    methods = args.methods or available_methods()
    check_names(parser, "method", methods)
    jobs = [(m, o, s) for s in range(args.seeds) for m, o in grid(methods)]
    runs_dir = args.out / "runs"
    t_start = time.perf_counter()
    runner = Runner(args.experiment, args.cache, args.out / "data", args.overrides, bar=lambda tag: print(f"-- {tag}", flush=True))
    for method, overrides, seed in jobs:
        tag = "_".join([method, *(o.split("=", 1)[1] for o in overrides)]) + f"_s{seed}"
        runner(runs_dir / tag, method, seed, overrides)
    total = time.perf_counter() - t_start
    paths = leaderboard.write([runs_dir], args.out)
    record = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "experiment": args.experiment,
        "seeds": args.seeds,
        "methods": methods,
        "extra_overrides": args.overrides,
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
