"""Issue 17's benchmark: how the 2-bit and 3-bit rows of the embedded bench moved with the papers' grids.

Same machine, same seeds, same dense references: each method at its new defaults (the
papers' grids: signed 2^b levels for LSQ-based methods, OBC's signed grid with its MSE
clipping search) against the same method with the pre-issue-17 grid (symmetric 2^b - 1
levels, min-max range), at 2 and 3 bits, untuned (every method at its yaml defaults)::

    python scripts/fidelity_grid_rows.py --out experiments/fidelity_rows --cache .cache/slope_bench

Writes ``rows.csv`` (one row per run) and prints the paired mean difference per method and
bit width (new minus old, test top-1, over the seeds).
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

from slope_bench.bench import Runner, machine

SETTINGS = {  # method -> overrides that fix its compression (N:M where it has one)
    "quantize": [],
    "slope": ["method.n=2", "method.m=4"],
    "obc": ["method.n=2", "method.m=4"],
}
OLD_GRID = {  # the only grid before issue 17: 2^(b-1) - 1 levels per side, min-max range
    "quantize": ["method.grid=symmetric", "method.range=minmax"],
    "slope": ["method.grid=symmetric", "method.range=minmax"],
    "obc": ["method.grid=symmetric", "method.range=minmax"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("experiments/fidelity_rows"))
    parser.add_argument("--cache", type=Path, default=Path(".cache/slope_bench"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--bits", type=int, nargs="*", default=[2, 3])
    parser.add_argument("--methods", nargs="*", default=list(SETTINGS))
    args = parser.parse_args()
    runner = Runner("bench_digits", args.cache, args.out / "data", [], bar=lambda tag: print(f"-- {tag}", flush=True))
    rows = []
    for method in args.methods:
        for bits in args.bits:
            for grid, extra in (("new", []), ("old", OLD_GRID[method])):
                for seed in range(args.seeds):
                    tag = f"{method}_w{bits}_{grid}_s{seed}"
                    r = runner(args.out / "runs" / tag, method, seed, [*SETTINGS[method], f"method.w_bits={bits}", *extra])
                    rows.append(
                        {
                            "method": method,
                            "bits": bits,
                            "grid": grid,
                            "seed": seed,
                            "status": r.get("status"),
                            "test/top1": r.get("test/top1"),
                            "val/top1": r.get("val/top1"),
                            "compress/ratio": r.get("compress/ratio"),
                            "setting": r.get("setting"),
                        }
                    )
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "rows.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(machine())
    for method in args.methods:
        for bits in args.bits:
            new = {r["seed"]: r["test/top1"] for r in rows if (r["method"], r["bits"], r["grid"]) == (method, bits, "new")}
            old = {r["seed"]: r["test/top1"] for r in rows if (r["method"], r["bits"], r["grid"]) == (method, bits, "old")}
            diffs = [new[s] - old[s] for s in new if s in old and new[s] is not None and old[s] is not None]
            if diffs:
                spread = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
                print(
                    f"{method} w{bits}: new {statistics.mean(new.values()):.4f} old {statistics.mean(old.values()):.4f} diff {statistics.mean(diffs):+.4f} ± {spread:.4f} ({len(diffs)} pairs)"
                )


if __name__ == "__main__":
    main()
