"""Paper claims checked on a CPU: ``python -m slope_bench.analysis CHECK --out DIR [--run RUN_DIR]``.

Checks (issue 19): ``prune-vs-quant`` (Kuzmin et al. 2023), ``order`` (Harma et al. 2025),
``obc-layerwise`` (Frantar et al. 2022), ``alignment`` (SLOPE), ``deadzone`` (CoDeQ) and
``all``. Each writes ``<check>.csv`` and ``<check>.png`` into ``--out``, and
``paper_checks.md`` (claim, where published, the paper's figure, ours, tolerance,
agrees) for the checks run. Everything is written into a temporary folder first and moved
into ``--out`` only when every check has finished: bad input (one line naming the
argument, exit 2) or a failure leaves ``--out`` untouched. ``--quick`` shrinks every check
(the tests use it): fewer samples and steps, and without ``--run`` fewer layers.

``--run RUN_DIR`` (a ``run.py`` run directory: ``results.json`` and the ``.hydra/config.yaml``
Hydra saves) uses that run's cached dense reference, its task with its seed (so its
calibration data) and exactly the layers it compressed (``results.json``'s ``layers``):
``prune-vs-quant`` adds ``prune_vs_quant_layers.csv`` (one row per layer and bit width),
``order`` has one row per layer, pattern and bit width, ``obc-layerwise`` one per layer and
setting (a layer with more than 300 input columns, 100 with ``--quick``, is skipped and
named in the claim) and ``alignment`` one per layer that SLOPE's 2:4 applies to and
alignment mode. Without ``--run`` the model-level checks use a narrow ResNet-18 trained
briefly here on the embedded digits task, and say so.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from slope_bench.analysis.checks import CHECKS, Context, run_check, write_markdown
from slope_bench.analysis.layers import AnalysisError
from slope_bench.obs import torch_threads

__all__ = ["CHECKS", "main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        sys.stderr.write(f"slope_bench.analysis: error: {message}\n")
        raise SystemExit(2)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(prog="python -m slope_bench.analysis", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("check", help="one of " + ", ".join([*CHECKS, "all"]))
    parser.add_argument("--out", type=Path, required=True, help="folder for the csv, png and paper_checks.md")
    parser.add_argument("--run", type=Path, default=None, help="a finished run directory: use its dense reference and task")
    parser.add_argument("--bits", type=int, nargs="+", default=list(range(2, 9)), help="bit widths (2..8) of prune-vs-quant and order")
    parser.add_argument("--quick", action="store_true", help="shrunk checks (tests): fewer samples, layers and steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: small tensors; avoids oversubscribing a shared CPU)")
    args = parser.parse_args(argv)
    if args.check not in (*CHECKS, "all"):
        parser.error(f"check={args.check!r} is not allowed: expected one of {', '.join([*CHECKS, 'all'])}")
    bad = [b for b in args.bits if not 2 <= b <= 8]
    if bad:
        parser.error(f"--bits {bad[0]} is not allowed: expected integers in 2..8")
    if args.threads < 1:
        parser.error(f"--threads {args.threads} is not allowed: expected an integer >= 1")
    if args.run is not None and not args.run.is_dir():
        parser.error(f"--run {args.run}: not a directory")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    with torch_threads(args.threads):
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    names = list(CHECKS) if args.check == "all" else [args.check]
    try:
        ctx = Context(run=args.run, bits=sorted(set(args.bits)), quick=args.quick, seed=args.seed)
        if args.run is not None:
            ctx.setup()  # a bad run directory fails before any work
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".paper_checks-", dir=args.out.parent) as tmp:
            claims = []
            for name in names:
                start = time.perf_counter()
                claims += run_check(name, ctx, Path(tmp))
                print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)
            write_markdown(Path(tmp) / "paper_checks.md", claims, ctx)
            args.out.mkdir(parents=True, exist_ok=True)
            for path in sorted(Path(tmp).iterdir()):
                shutil.move(str(path), str(args.out / path.name))
    except AnalysisError as e:
        sys.stderr.write(f"slope_bench.analysis: error: {e}\n")
        return 2
    print(f"-> {args.out / 'paper_checks.md'}")
    return 0
