"""The offline leaderboard: every ``results.json`` below some folders, on one page.

``python -m slope_bench.leaderboard DIR... [--out OUT] [--wandb] [--x COLUMN] [--baseline METHOD]``
writes, into ``OUT`` (default: the first ``DIR``):

* ``leaderboard.csv`` — one row per setting (method, model, task, setting and any
  ``model_*`` identity keys); seeds are aggregated into ``<column>`` (mean),
  ``<column>_std`` (sample std, ddof=1) and ``<column>_n`` (runs that report it), plus
  ``n``, ``seeds``, ``rank``, ``vs_best``, ``pareto``, ``setting_base`` and
  ``config_label``; text cells a spreadsheet would run as formulas get a leading ``'``;
* ``leaderboard.md`` — the same table, "mean ± std (n=3)", the paired comparisons (see
  :mod:`slope_bench.compare`) and every failed, diverged, broken, incomplete or duplicate
  run with its error line; cells are escaped (no HTML or links from the results);
* ``pareto.png`` — main metric against ``--x`` (default ``compress/ratio``; also
  ``compress/measured_ratio`` or ``compress/coded_ratio``), full view and zoom (see
  :mod:`slope_bench.plots`);
* ``leaderboard.html`` — one self-contained page (see :mod:`slope_bench.page`): sortable,
  filterable table with the paired verdicts next to it, the plot, per-run layer records.
  The URL hash ``#sort=compress/ratio`` (``#sort=-compress/ratio`` descending) and
  ``#model=resnet18&task=digits`` sort and filter on load.

Collecting lives in :mod:`slope_bench.results_table`, aggregating in
:mod:`slope_bench.aggregate` (both re-exported here).
Each output is written on its own: one that fails (a plot error, a read-only file) is
reported on one line and the others are still written.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from slope_bench.aggregate import aggregate, pareto_front  # noqa: F401  (re-exported: the leaderboard API)
from slope_bench.page import fmt, to_html, to_markdown
from slope_bench.plots import plot_pareto
from slope_bench.results_table import (  # noqa: F401  (re-exported: the leaderboard API)
    IDENTITY_KEYS,
    PROBLEM_COLUMNS,
    collect,
    comparison_keys,
    group_keys,
    label_configurations,
    write_csv,
)

FILES = {"csv": "leaderboard.csv", "md": "leaderboard.md", "png": "pareto.png", "html": "leaderboard.html"}


class Written(dict):
    """``{name: path}`` of the outputs written; ``failed`` maps the others to their error line."""

    def __init__(self) -> None:
        super().__init__()
        self.failed: dict[str, str] = {}


def write(
    dirs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str] | None = None,
    use_wandb: bool = False,
    *,
    x: str = "compress/ratio",
    baseline: str | None = None,
    tolerance: float = 0.10,
) -> Written:
    """Collect, aggregate and write the leaderboard files.

    Args:
        dirs: folders searched for runs.
        out: output folder (default: the first of ``dirs``); created if missing.
        use_wandb: also log the table and plot to W&B (see :func:`log_wandb`).
        x: ratio column on the plot's x axis (``compress/ratio``, ``compress/coded_ratio``, ...).
        baseline: compare every method against this one only in the comparisons section.
        tolerance: equal-ratio pairing tolerance of the comparisons (see :func:`slope_bench.compare.compare`).

    Returns:
        ``{"csv", "md", "png", "html"}`` paths of the files written (plus ``"wandb"``, the
        W&B run dir, when logged); outputs that could not be written are missing from it
        and listed in its ``failed`` attribute with their error line.
    """
    out = Path(out if out is not None else dirs[0])
    runs, problems = collect(dirs)
    return _write_files(runs, problems, out, use_wandb, x=x, baseline=baseline, tolerance=tolerance)


def _shown_path(path: str, out: Path) -> str:
    """``path`` relative to ``out`` when it lies below it, else unchanged."""
    try:
        return str(Path(path).resolve().relative_to(out.resolve()))
    except ValueError:
        return str(path)


def _attempt(written: Written, name: str, action: Callable[[], Any]) -> Any:
    """Run one output's writer; a failure is recorded and reported, never raised."""
    try:
        return action()
    except Exception as error:  # one broken output must not cost the others
        line = f"{type(error).__name__}: {error}".splitlines()[0]
        written.failed[name] = line
        print(f"leaderboard: could not write {name}: {line}", file=sys.stderr)
        return None


def _write_files(
    runs: pd.DataFrame,
    problems: list[dict[str, Any]],
    out: Path,
    use_wandb: bool,
    *,
    x: str = "compress/ratio",
    baseline: str | None = None,
    tolerance: float = 0.10,
) -> Written:
    written = Written()
    out.mkdir(parents=True, exist_ok=True)
    table = aggregate(runs)
    # Paths below the output folder are shown relative to it (the md/html live there).
    problems = [{**p, "path": _shown_path(p["path"], out)} for p in problems]
    shown_runs = runs.assign(run_dir=[_shown_path(d, out) for d in runs["run_dir"]]) if "run_dir" in runs else runs
    paths = {name: out / file for name, file in FILES.items()}

    def comparisons() -> pd.DataFrame:
        from slope_bench.compare import compare

        return compare(runs, baseline=baseline, tolerance=tolerance)

    paired = _attempt(written, "comparisons", comparisons)
    if _attempt(written, "csv", lambda: write_csv(table, paths["csv"])) is not None:
        written["csv"] = paths["csv"]
    if _attempt(written, "png", lambda: plot_pareto(table, paths["png"], x=x)) is not None:
        written["png"] = paths["png"]
    notes = [f"{FILES.get(name, name)} could not be made: {line}" for name, line in written.failed.items()]
    md = _attempt(written, "md", lambda: to_markdown(table, problems, paths["png"].name if "png" in written else None, paired, notes))
    if md is not None and _attempt(written, "md", lambda: paths["md"].write_text(md, encoding="utf-8")) is not None:
        written["md"] = paths["md"]
    png = paths["png"].read_bytes() if "png" in written else None
    page = _attempt(written, "html", lambda: to_html(table, shown_runs, problems, png, paired, notes))
    if page is not None and _attempt(written, "html", lambda: paths["html"].write_text(page, encoding="utf-8")) is not None:
        written["html"] = paths["html"]
    if use_wandb and "png" in written:
        run_dir = _attempt(written, "wandb", lambda: log_wandb(table, paths["png"]))
        if run_dir is not None:
            written["wandb"] = run_dir
    return written


def log_wandb(table: pd.DataFrame, png: str | os.PathLike[str], project: str = "slope_bench") -> Path | None:
    """Log the leaderboard as a ``wandb.Table`` plus the Pareto plot to a run "leaderboard".

    The run is offline unless ``WANDB_MODE`` says otherwise, so no API key is needed.

    Args:
        table: aggregated leaderboard.
        png: the Pareto plot.
        project: W&B project.

    Returns:
        The W&B run's local folder, or ``None`` when wandb is not importable.
    """
    try:
        import wandb
    except ImportError:
        print("leaderboard: wandb is not installed; skipping --wandb", file=sys.stderr)
        return None
    frame = table.copy()
    for column in frame.columns:
        if frame[column].dtype == object or str(frame[column].dtype) in ("Int64", "boolean", "string", "str"):
            frame[column] = frame[column].map(lambda v: fmt(v) if not isinstance(v, str) else v)
    run = wandb.init(
        project=project,
        name="leaderboard",
        job_type="leaderboard",
        mode=os.environ.get("WANDB_MODE", "offline"),
        dir=os.environ.get("WANDB_DIR") or str(Path(png).parent),
        reinit="finish_previous",
    )
    try:
        run.log({"leaderboard": wandb.Table(dataframe=frame), "pareto": wandb.Image(str(png))})
        return Path(run.dir)
    finally:
        run.finish()


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m slope_bench.leaderboard DIR... [--out OUT] [--wandb] [--x COLUMN]``."""
    parser = argparse.ArgumentParser(
        prog="python -m slope_bench.leaderboard",
        description="Gather results.json files into leaderboard.csv/.md/.html and pareto.png.",
    )
    parser.add_argument("dirs", nargs="+", help="folders searched recursively for results.json")
    parser.add_argument("--out", default=None, help="output folder (default: the first DIR)")
    parser.add_argument(
        "--wandb", action="store_true", help="also log a wandb.Table and the plot (offline unless WANDB_MODE says otherwise)"
    )
    parser.add_argument(
        "--x",
        default="compress/ratio",
        help="plot x axis: compress/ratio (whole model, kernel-ready; default), compress/measured_ratio (packed file), "
        "compress/coded_ratio (stored size)",
    )
    parser.add_argument("--baseline", default=None, help="paired comparisons against this method only")
    parser.add_argument("--tolerance", type=float, default=0.10, help="equal-ratio pairing tolerance of the comparisons (default 0.10)")
    args = parser.parse_args(argv)
    existing = [d for d in args.dirs if Path(d).is_dir()]
    for missing in sorted(set(args.dirs) - set(existing)):
        print(f"leaderboard: skipping {missing}: not a folder", file=sys.stderr)
    if not existing:
        print(f"leaderboard: none of {' '.join(args.dirs)} is a folder", file=sys.stderr)
        return 2
    runs, problems = collect(existing)
    out = Path(args.out if args.out is not None else args.dirs[0])
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        print(f"leaderboard: cannot create output folder {out}: {error.strerror or error}", file=sys.stderr)
        return 2
    paths = _write_files(runs, problems, out, args.wandb, x=args.x, baseline=args.baseline, tolerance=args.tolerance)
    print(f"leaderboard: {len(runs)} runs, {len(problems)} failed or incomplete")
    for problem in problems:
        print(f"  {problem['status']}: {problem['path']}: {problem['error']}")
    for name, path in paths.items():
        print(f"  {name}: {path}")
    return 1 if paths.failed else 0


if __name__ == "__main__":
    sys.exit(main())
