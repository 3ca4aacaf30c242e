"""The embedded benchmark grid behind ``make bench``.

Runs every method that exists (``conf/method/*.yaml``) on ``experiment=bench_digits``
(digits_hard + ResNet-18 width 16) at 2:4 and 1:4 with 2/3/4 bits where it applies,
for several seeds, in this process (dense references are trained once per seed and
cached), then writes the leaderboard and the machine/date record::

    python -m slope_bench.bench                      # 3 seeds -> experiments/digits_resnet18/
    python -m slope_bench.bench --seeds 1 --methods slope naive --out /tmp/b

Finished runs are skipped when the grid is run again (resumable); failures are recorded
as ``status: failed`` and listed on the leaderboard.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

NM_BITS = [(n, bits) for n in (2, 1) for bits in (4, 3, 2)]


def grid(methods: list[str]) -> list[tuple[str, list[str]]]:
    """(method, overrides) for every setting of the benchmark, for existing methods."""
    out: list[tuple[str, list[str]]] = []
    for method in methods:
        if method == "dense":
            out.append((method, []))
        elif method == "prune":
            out += [(method, [f"method.n={n}", "method.m=4"]) for n in (2, 1)]
        elif method in ("quantize", "codeq", "sqs"):
            out += [(method, [f"method.w_bits={b}"]) for b in (4, 3, 2)]
        else:  # joint N:M + bits methods
            out += [(method, [f"method.n={n}", "method.m=4", f"method.w_bits={b}"]) for n, b in NM_BITS]
    return out


def available_methods() -> list[str]:
    """The methods that exist: the stems of ``conf/method/*.yaml``."""
    return sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))


def check_methods(parser: argparse.ArgumentParser, methods: list[str]) -> None:
    """Exit through ``parser.error`` (code 2) when a name is not a method config."""
    available = available_methods()
    unknown = sorted(set(methods) - set(available))
    if unknown:
        parser.error(f"unknown method(s) {unknown}: expected some of {', '.join(available)}")


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("experiments/digits_resnet18"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", nargs="*", default=None, help="subset of conf/method/*.yaml (default: all)")
    parser.add_argument("--experiment", default="bench_digits")
    parser.add_argument("--cache", type=Path, default=Path(".cache/slope_bench"))
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (e.g. finetune.epochs=5)")
    args = parser.parse_args(argv)

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from slope_bench import leaderboard
    from slope_bench.train import record_failure, run

    methods = args.methods or available_methods()
    check_methods(parser, methods)
    jobs = [(m, o, s) for s in range(args.seeds) for m, o in grid(methods)]
    runs_dir = args.out / "runs"
    timings: list[dict] = []
    t_start = time.perf_counter()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ) as bar:
        task_id = bar.add_task("bench", total=len(jobs))
        for method, overrides, seed in jobs:
            tag = "_".join([method, *(o.split("=", 1)[1] for o in overrides)]) + f"_s{seed}"
            out_dir = runs_dir / tag
            done = out_dir / "results.json"
            bar.update(task_id, description=tag)
            if done.is_file() and json.loads(done.read_text()).get("status") == "ok":
                bar.advance(task_id)
                continue
            cfg = compose_run(
                [
                    f"experiment={args.experiment}",
                    f"method={method}",
                    f"seed={seed}",
                    "logger=none",
                    "trainer.enable_progress_bar=false",
                    *overrides,
                    *args.overrides,
                ],
                out_dir,
                args.cache,
                args.out / "data",
            )
            t0 = time.perf_counter()
            try:
                run(cfg)
            except Exception as e:  # recorded, listed on the leaderboard, the grid goes on
                record_failure(cfg, e)
            timings.append({"run": tag, "seconds": round(time.perf_counter() - t0, 1)})
            bar.advance(task_id)
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
        "runs_executed_now": len(timings),
        "wall_seconds_now": round(total, 1),
        "timings": timings,
    }
    (args.out / "bench.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"{len(jobs)} runs ({len(timings)} executed now, {total / 60:.1f} min) -> {args.out}")
    for name, path in paths.items():
        print(f"  {name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
