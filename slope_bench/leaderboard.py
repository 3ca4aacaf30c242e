"""The offline leaderboard: every ``results.json`` below some folders, on one page.

``python -m slope_bench.leaderboard DIR... [--out OUT] [--wandb]`` writes, into ``OUT``
(default: the first ``DIR``):

* ``leaderboard.csv`` — one row per setting (method, model, task, setting and any
  ``model_*`` identity keys); seeds are aggregated into ``<column>`` (mean),
  ``<column>_std`` (sample std, ddof=1) and ``<column>_n`` (runs that report it), plus
  ``n``, ``seeds``, ``rank``, ``vs_best`` and ``pareto``;
* ``leaderboard.md`` — the same table, "mean ± std (n=3)", and a section listing every
  failed, broken or incomplete run with its error line;
* ``pareto.png`` — main metric against ``compress/ratio`` (log x), one colour per method,
  the Pareto front marked, the dense model as a horizontal reference line; one panel per
  model/task;
* ``leaderboard.html`` — one self-contained page (inline CSS and JS, the plot embedded as
  base64): a table sorted by clicking a header, select boxes to filter by model, task and
  method, per-run details with the ``layers`` records. The page honours a URL hash such as
  ``#sort=compress/ratio`` (``#sort=-compress/ratio`` for descending) and
  ``#model=resnet18&task=digits`` by clicking the header / setting the select boxes on load,
  so a headless browser's ``--dump-dom`` shows the result.

Runs are compared within a *comparison group* (same model, task, ``model_*`` keys and main
metric). ``rank`` orders the settings of a group by mean retention (``test/retention``; the
main metric where retention is missing); ``vs_best`` is ``"best"`` for rank 1, ``"tie"``
when a setting's mean is within the seeds' spread of the best one's
(``|mean_best - mean| <= max(std_best, std)``), else empty. ``pareto`` marks the settings
no other setting of the group beats on both the main metric and ``compress/ratio``.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

RESULTS_FILE = "results.json"
IDENTITY_KEYS = ("method", "model", "task", "setting")
REQUIRED_KEYS = ("method",)
COMPARE_BY = ("test/retention", "metric")
METRIC_FALLBACKS = ("top1", "bbox_map")

# Columns shown in the md/html table: (column, header). Only those present are shown.
DISPLAY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("metric", "score"),
    ("metric_dense", "dense"),
    ("metric_dense_ft", "dense ft"),
    ("test/retention", "retention"),
    ("compress/ratio", "ratio"),
    ("compress/ratio_nominal", "ratio (nominal)"),
    ("compress/measured_ratio", "ratio (file)"),
    ("compress/bits_per_weight", "bits/weight"),
    ("compress/sparsity", "sparsity"),
    ("compress/bops_ratio", "BOPs ratio"),
    ("time/fit_s", "fit s"),
    ("time/step_ms", "step ms"),
    ("time/step_ms_dense", "step ms dense"),
)
PROBLEM_COLUMNS = (
    "status",
    "method",
    "model",
    "task",
    "seed",
    "setting",
    "path",
    "error",
)


# --------------------------------------------------------------------------- collect


def _error_line(text: Any, limit: int = 300) -> str:
    """The last non-empty line of an error text (a traceback ends with the message)."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    line = lines[-1] if lines else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _main_metric(record: dict[str, Any]) -> str | None:
    """Name of the main metric: ``main_metric`` if given, else ``top1``, else ``bbox_map``."""
    name = record.get("main_metric")
    if isinstance(name, str) and name:
        return name.removeprefix("test/")
    for name in METRIC_FALLBACKS:
        if f"test/{name}" in record:
            return name
    return None


def _number(value: Any) -> float | None:
    """A finite-or-nan float for numbers (bools excluded), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _identity(record: dict[str, Any]) -> dict[str, Any]:
    keys = list(IDENTITY_KEYS) + ["seed"] + sorted(k for k in record if k.startswith("model_"))
    return {k: record.get(k) for k in keys if not isinstance(record.get(k), (dict, list))}


def _read_yaml(path: Path) -> Any:
    """Parsed YAML file, or ``None`` when it is missing or unreadable."""
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None


def _hydra_identity(run_dir: Path) -> dict[str, Any]:
    """Best-effort identity of an unfinished Hydra run from ``.hydra/`` (never raises)."""
    found: dict[str, Any] = {}
    config = _read_yaml(run_dir / ".hydra" / "config.yaml")
    if isinstance(config, dict):
        for key in ("method", "model", "task"):
            value = config.get(key)
            if isinstance(value, dict):
                value = value.get("name") or value.get("_name_")
            if isinstance(value, str):
                found[key] = value
        if isinstance(config.get("seed"), int):
            found["seed"] = config["seed"]
    overrides = _read_yaml(run_dir / ".hydra" / "overrides.yaml")
    if isinstance(overrides, list) and overrides:
        found["setting"] = " ".join(map(str, overrides))
    return found


def _log_error(run_dir: Path) -> str:
    """The last line mentioning an error in the run's ``*.log`` files, if any."""
    for log in sorted(run_dir.glob("*.log")):
        try:
            lines = log.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in reversed(lines):
            if "error" in line.lower() or "exception" in line.lower():
                return _error_line(line)
    return ""


def _walk(dirs: Iterable[str | os.PathLike[str]]) -> tuple[list[Path], list[Path]]:
    """``results.json`` files and Hydra run dirs without one, each listed once."""
    results: dict[Path, None] = {}
    unfinished: dict[Path, None] = {}
    for top in dirs:
        for root, subdirs, files in os.walk(top):
            subdirs[:] = sorted(d for d in subdirs if d not in (".hydra", "wandb", "__pycache__"))
            here = Path(root)
            if RESULTS_FILE in files:
                results[(here / RESULTS_FILE).resolve()] = None
            elif (here / ".hydra").is_dir():
                unfinished[here.resolve()] = None
    return list(results), list(unfinished)


def _problem(status: str, path: Path, error: str, identity: dict[str, Any]) -> dict[str, Any]:
    row = {key: identity.get(key) for key in PROBLEM_COLUMNS if key in identity}
    row.update(status=status, path=str(path), error=error)
    return row


def collect(
    dirs: Sequence[str | os.PathLike[str]],
) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Read every run below ``dirs``.

    Args:
        dirs: folders searched recursively for ``results.json`` files and for Hydra run
            dirs (a ``.hydra/`` folder) that have none.

    Returns:
        ``(runs, problems)``: ``runs`` has one row per completed run with its scalar
        results keys, ``metric_name`` / ``metric`` / ``metric_dense`` / ``metric_dense_ft``
        (the main metric under one name), ``path``, ``run_dir`` and ``layers`` (the list of
        layer records); ``problems`` lists failed (``status: failed``), broken (unreadable
        JSON) and incomplete (no main metric, missing keys, no ``results.json``) runs as
        dicts with ``status``, ``path``, ``error`` and whatever identity keys are known.
    """
    result_files, unfinished = _walk(dirs)
    rows: list[dict[str, Any]] = []
    problems: list[dict[str, Any]] = []
    for path in result_files:
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            problems.append(
                _problem(
                    "broken",
                    path,
                    _error_line(f"unreadable {RESULTS_FILE}: {error}"),
                    {},
                )
            )
            continue
        if not isinstance(record, dict):
            problems.append(
                _problem(
                    "broken",
                    path,
                    f"{RESULTS_FILE} holds a {type(record).__name__}, not an object",
                    {},
                )
            )
            continue
        identity = _identity(record)
        status = record.get("status")
        name = _main_metric(record)
        metric = _number(record.get(f"test/{name}")) if name else None
        if status == "failed":
            error = _error_line(record.get("error", "")) or "failed (no error recorded)"
            problems.append(_problem("failed", path, error, identity))
            continue
        missing = [key for key in REQUIRED_KEYS if not record.get(key)]
        if metric is None:
            missing.append(f"test/{name}" if name else "test/<main metric>")
        reasons = [f"missing keys: {', '.join(missing)}"] if missing else []
        if metric is not None and not math.isfinite(metric):
            reasons.append(f"test/{name} is {metric}")
        if status not in (None, "ok"):
            reasons.insert(0, f"status {status!r}")
        if reasons:
            error = _error_line(record.get("error", "")) or "; ".join(reasons)
            problems.append(_problem("incomplete", path, error, identity))
            continue
        row: dict[str, Any] = {}
        for key, value in record.items():
            if isinstance(value, (str, int, float, bool)) or value is None:
                row[key] = value
        row.update(
            status="ok",
            metric_name=name,
            metric=metric,
            metric_dense=_number(record.get(f"test/{name}_dense")),
            metric_dense_ft=_number(record.get(f"test/{name}_dense_ft")),
            path=str(path),
            run_dir=str(path.parent),
            layers=[layer for layer in record.get("layers") or [] if isinstance(layer, dict)]
            if isinstance(record.get("layers"), list)
            else [],
            method_config=record.get("method_config") if isinstance(record.get("method_config"), dict) else None,
        )
        rows.append(row)
    for run_dir in unfinished:
        error = _log_error(run_dir) or f"no {RESULTS_FILE} (the run did not finish)"
        problems.append(_problem("incomplete", run_dir, error, _hydra_identity(run_dir)))
    runs = pd.DataFrame(rows)
    for key in IDENTITY_KEYS + ("seed", "metric_name"):
        if key not in runs:
            runs[key] = pd.Series(dtype=object)
    for key in ("metric", "metric_dense", "metric_dense_ft"):
        runs[key] = pd.to_numeric(runs.get(key, pd.Series(dtype=float)), errors="coerce")
    runs = label_configurations(runs)
    if len(runs):
        runs = runs.sort_values(
            ["model", "task", "method", "setting", "seed", "path"],
            key=lambda c: c.astype(str),
            kind="stable",
        ).reset_index(drop=True)
    problems.sort(key=lambda p: (p["status"], p["path"]))
    return runs, problems


def label_configurations(runs: pd.DataFrame) -> pd.DataFrame:
    """Keep different configurations of one setting apart.

    Runs that share method, model, task and ``setting`` but not ``config_id`` (e.g. a
    sweep of CoDeQ's ``sparsity_decay``, which does not change the ``w4`` setting name)
    are not seeds of one setting: their ``setting`` gets the method knobs that differ,
    ``"unstructured w4 (sparsity_decay=2)"``, or ``"(config <id>)"`` when no method knob
    differs (another part of the recipe does). Runs without a ``config_id`` (older
    results) are left as they are.
    """
    if runs.empty or "config_id" not in runs:
        return runs
    runs = runs.copy()
    for _, group in runs.groupby(group_keys(runs), dropna=False, sort=False):
        ids = group["config_id"].dropna().unique()
        if len(ids) < 2:
            continue
        configs = [c for c in group["method_config"] if isinstance(c, dict)] if "method_config" in group else []
        varying = sorted({k for c in configs for k in c if len({json.dumps(d.get(k), sort_keys=True) for d in configs}) > 1} - {"name"})
        labels: dict[str, str] = {}
        for _, row in group.drop_duplicates("config_id").iterrows():
            if pd.isna(row["config_id"]):
                continue
            config = row.get("method_config") if isinstance(row.get("method_config"), dict) else {}
            labels[row["config_id"]] = ", ".join(f"{k}={config.get(k)}" for k in varying)
        taken = list(labels.values())
        for cid, label in labels.items():  # knobs alone do not tell these apart: add the id
            if not label or taken.count(label) > 1:
                labels[cid] = ", ".join(filter(None, (label, f"config {str(cid)[:6]}")))
        for index, row in group.iterrows():
            if not pd.isna(row["config_id"]):
                runs.at[index, "setting"] = f"{row['setting']} ({labels[row['config_id']]})"
    return runs


# --------------------------------------------------------------------------- aggregate


def group_keys(df: pd.DataFrame) -> list[str]:
    """Keys that identify one setting: method, model, task, setting, ``model_*``, metric name."""
    model_keys = sorted(c for c in df.columns if c.startswith("model_"))
    return list(IDENTITY_KEYS) + model_keys + ["metric_name"]


def comparison_keys(df: pd.DataFrame) -> list[str]:
    """Keys of the groups whose settings are compared (rank, ties, Pareto front)."""
    return [k for k in group_keys(df) if k not in ("method", "setting")]


def pareto_front(df: pd.DataFrame, x: str, y: str) -> pd.Series:
    """Points no other point beats on both ``x`` and ``y`` (both maximized).

    A point is dominated when another has ``x' >= x`` and ``y' >= y`` with at least one
    strict inequality; identical points do not dominate each other. Rows with a missing
    ``x`` or ``y`` are never on the front.

    Args:
        df: the points.
        x: column maximized along the x axis (e.g. ``compress/ratio``).
        y: column maximized along the y axis (e.g. ``metric``).

    Returns:
        Boolean Series aligned with ``df.index``.
    """
    if x not in df or y not in df:
        return pd.Series(False, index=df.index)
    xs = pd.to_numeric(df[x], errors="coerce").to_numpy(dtype=float)
    ys = pd.to_numeric(df[y], errors="coerce").to_numpy(dtype=float)
    valid = np.isfinite(xs) & np.isfinite(ys)
    px, py = xs[valid][None, :], ys[valid][None, :]
    qx, qy = xs[valid][:, None], ys[valid][:, None]
    dominated = ((px >= qx) & (py >= qy) & ((px > qx) | (py > qy))).any(axis=1)
    mask = np.zeros(len(df), dtype=bool)
    mask[np.flatnonzero(valid)] = ~dominated
    return pd.Series(mask, index=df.index)


def _numeric_columns(df: pd.DataFrame, keys: Sequence[str]) -> list[str]:
    skip = set(keys) | {"seed", "layers"}
    columns = []
    for column in df.columns:
        if column in skip:
            continue
        values = df[column].dropna()
        if len(values) and all(
            isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)) for v in values
        ):
            columns.append(column)
    return columns


def _rank_and_ties(table: pd.DataFrame) -> pd.DataFrame:
    """Add ``rank``, ``vs_best`` and ``pareto`` within each comparison group."""
    table["rank"] = pd.Series(pd.NA, index=table.index, dtype="Int64")
    table["vs_best"] = ""
    table["pareto"] = False
    keys = comparison_keys(table)
    for _, group in table.groupby(keys, dropna=False, sort=False):
        column = next((c for c in COMPARE_BY if c in group and group[c].notna().all()), "metric")
        means = pd.to_numeric(group[column], errors="coerce")
        stds = pd.to_numeric(
            group.get(f"{column}_std", pd.Series(np.nan, index=group.index)),
            errors="coerce",
        ).fillna(0.0)
        order = means.sort_values(ascending=False, na_position="last", kind="stable").index
        table.loc[order, "rank"] = np.arange(1, len(order) + 1)
        best = order[0]
        if pd.notna(means[best]):
            table.loc[best, "vs_best"] = "best"
            for other in order[1:]:
                if pd.notna(means[other]) and abs(means[best] - means[other]) <= max(stds[best], stds[other]):
                    table.loc[other, "vs_best"] = "tie"
        table.loc[group.index, "pareto"] = pareto_front(group, "compress/ratio", "metric")
    return table


def _spread(values: pd.Series) -> float:
    """Sample std (ddof=1); NaN for one value; exactly 0 when the values agree to rounding."""
    if len(values) < 2:
        return math.nan
    std = float(values.std(ddof=1))
    return 0.0 if std <= 1e-12 * max(1.0, float(values.abs().max())) else std


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """One row per setting: seeds aggregated, ranked, ties and Pareto front marked.

    Args:
        df: runs as returned by :func:`collect`.

    Returns:
        A DataFrame with the identity keys, ``n`` (runs), ``seeds``, for every numeric
        column ``<c>`` its mean ``<c>``, sample std ``<c>_std`` (ddof=1, NaN for one run)
        and count ``<c>_n``, other columns' value when all runs agree (else the distinct
        values joined by ``" | "``), ``rank``, ``vs_best`` and ``pareto``; sorted by
        comparison group then rank.
    """
    keys = group_keys(df)
    base = ["n", "seeds", "rank", "vs_best", "pareto"]
    if df.empty:
        return pd.DataFrame(columns=keys + base + ["metric", "metric_std", "metric_n"])
    df = df.copy()
    for key in [*keys, "seed"]:
        if key not in df:
            df[key] = None
    numeric = _numeric_columns(df, keys)
    other = [c for c in df.columns if c not in keys and c not in numeric and c not in ("seed", "layers", "path", "run_dir", "status")]
    records = []
    for key_values, group in df.groupby(keys, dropna=False, sort=False):
        record: dict[str, Any] = dict(zip(keys, key_values, strict=True))
        record["n"] = len(group)
        record["seeds"] = ",".join(str(s) for s in sorted(group["seed"].dropna().tolist(), key=str))
        for column in numeric:
            values = pd.to_numeric(group[column], errors="coerce").dropna()
            record[column] = values.mean() if len(values) else np.nan
            record[f"{column}_std"] = _spread(values)
            record[f"{column}_n"] = len(values)
        for column in other:
            distinct = list(dict.fromkeys(str(v) for v in group[column].dropna()))
            record[column] = " | ".join(distinct) if distinct else None
        records.append(record)
    table = pd.DataFrame(records)
    table = _rank_and_ties(table)
    sort_keys = comparison_keys(table) + ["rank"]
    table = table.sort_values(sort_keys, key=lambda c: c if c.name == "rank" else c.astype(str), kind="stable").reset_index(drop=True)
    front = keys + base + [c for c in ("metric", "metric_std", "metric_n") if c in table]
    return table[front + [c for c in table.columns if c not in front]]


# --------------------------------------------------------------------------- formatting


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "✓" if value else ""
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.{digits}g}"
    return str(value)


def _mean_std(row: pd.Series, column: str, show_n: bool = False) -> str:
    mean = row.get(column)
    if mean is None or pd.isna(mean):
        return ""
    text = _fmt(mean)
    std = row.get(f"{column}_std")
    if std is not None and pd.notna(std) and (std != 0 or show_n):
        text += f" ± {_fmt(std, 2)}"
    n = row.get(f"{column}_n", row.get("n"))
    if show_n or (pd.notna(n) and n != row.get("n")):
        text += f" (n={_fmt(n)})"
    return text


def _identity_columns(table: pd.DataFrame) -> list[str]:
    return [k for k in group_keys(table) if k in table and k != "metric_name"] + ["metric_name"]


def _display(
    table: pd.DataFrame,
) -> tuple[list[tuple[str, str]], list[list[tuple[str, Any]]]]:
    """Headers ``(key, label)`` and cells ``(text, sort value)`` of the leaderboard table."""
    identity = _identity_columns(table)
    headers = [("rank", "rank")] + [(k, "metric" if k == "metric_name" else k) for k in identity] + [("n", "n")]
    shown = [(c, label) for c, label in DISPLAY_COLUMNS if c in table and table[c].notna().any()]
    headers += shown + [("pareto", "pareto"), ("vs_best", "vs best")]
    rows = []
    for _, row in table.iterrows():
        cells: list[tuple[str, Any]] = [(_fmt(row["rank"]), row["rank"])]
        cells += [(_fmt(row.get(k)), row.get(k)) for k in identity]
        cells.append((_fmt(row["n"]), row["n"]))
        cells += [(_mean_std(row, c, show_n=c == "metric"), row.get(c)) for c, _ in shown]
        cells += [
            ("✓" if row["pareto"] else "", int(bool(row["pareto"]))),
            (row["vs_best"], row["vs_best"]),
        ]
        rows.append(cells)
    return headers, rows


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = [
        "| " + " | ".join(_md_cell(h) for h in headers) + " |",
        "|" + "---|" * len(headers),
    ]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def to_markdown(table: pd.DataFrame, problems: Sequence[dict[str, Any]], figure: str = "pareto.png") -> str:
    """The leaderboard as Markdown: the table, the plot and the failed/incomplete runs."""
    parts = ["# slope_bench leaderboard", ""]
    if table.empty:
        parts += ["No completed runs.", ""]
    else:
        headers, rows = _display(table)
        parts += [
            "Seeds aggregated as mean ± std (n = runs). `vs best`: best retention of its model/task, or a tie (within the seeds' std of the best). `pareto`: not beaten on both the main metric and `compress/ratio`.",
            "",
            _md_table(
                [label for _, label in headers],
                [[text for text, _ in row] for row in rows],
            ),
            "",
            f"![Pareto front]({figure})",
            "",
        ]
    parts += [f"## Failed or incomplete runs ({len(problems)})", ""]
    if problems:
        parts.append(
            _md_table(
                PROBLEM_COLUMNS,
                [[_fmt(p.get(k)) for k in PROBLEM_COLUMNS] for p in problems],
            )
        )
    else:
        parts.append("None.")
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------- plot


def ratio_ticks(values: Iterable[float], spacing: float = 1.15) -> list[float]:
    """Tick positions for a log axis: the data's distinct values, at least ``spacing`` apart.

    A log axis spanning less than a decade gets crowded minor labels; labelling the
    compression ratios actually reached is more useful.
    """
    ticks: list[float] = []
    for value in sorted({float(v) for v in values if np.isfinite(v) and v > 0}):
        if not ticks or value / ticks[-1] >= spacing:
            ticks.append(value)
    return ticks


def plot_pareto(table: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Draw ``pareto.png``: main metric vs ``compress/ratio`` per model/task panel.

    One colour per method (settings of a method joined by a line, seeds' std as error
    bars), the Pareto front as a black step line with ringed points, the dense model's
    mean metric as a dashed horizontal line (dense fine-tuned control dotted).

    Args:
        table: aggregated leaderboard from :func:`aggregate`.
        path: PNG file to write.

    Returns:
        The path written.
    """
    import matplotlib
    from matplotlib import ticker
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    points = (
        table[pd.to_numeric(table.get("compress/ratio", pd.Series(dtype=float)), errors="coerce").notna()] if not table.empty else table
    )
    groups = list(points.groupby(comparison_keys(points), dropna=False, sort=False)) if not points.empty else []
    columns = min(len(groups), 2) or 1
    lines = math.ceil(len(groups) / columns) or 1
    figure = Figure(figsize=(6.4 * columns, 4.6 * lines), dpi=110)
    FigureCanvasAgg(figure)
    if not groups:
        axis = figure.add_subplot(1, 1, 1)
        axis.text(
            0.5,
            0.5,
            "no completed runs with compress/ratio",
            ha="center",
            va="center",
            transform=axis.transAxes,
        )
        axis.set_axis_off()
    methods = sorted({str(m) for m in points["method"]}) if not points.empty else []
    palette = (
        [
            matplotlib.colormaps["tab10"](i % 10) if len(methods) <= 10 else matplotlib.colormaps["tab20"](i % 20)
            for i in range(len(methods))
        ]
        if methods
        else []
    )
    colours = dict(zip(methods, palette, strict=True))
    for index, (key_values, group) in enumerate(groups, start=1):
        axis = figure.add_subplot(lines, columns, index)
        ratio = pd.to_numeric(group["compress/ratio"], errors="coerce")
        for method, part in group.groupby("method", sort=True):
            part = part.assign(_x=ratio[part.index]).sort_values("_x")
            yerr = part["metric_std"].fillna(0.0) if "metric_std" in part else None
            axis.errorbar(
                part["_x"],
                part["metric"],
                yerr=yerr,
                marker="o",
                ms=5,
                capsize=3,
                lw=1.2,
                color=colours[str(method)],
                label=str(method),
            )
        front = group[group["pareto"].astype(bool)].assign(_x=ratio).sort_values("_x")
        if len(front):
            axis.step(
                front["_x"],
                front["metric"],
                where="pre",
                color="black",
                lw=1.0,
                ls="-",
                alpha=0.6,
                zorder=1,
            )
            axis.scatter(
                front["_x"],
                front["metric"],
                s=140,
                facecolors="none",
                edgecolors="black",
                lw=1.3,
                label="Pareto front",
                zorder=3,
            )
        for column, style, label in (
            ("metric_dense", "--", "dense"),
            ("metric_dense_ft", ":", "dense fine-tuned"),
        ):
            if column in group and group[column].notna().any():
                axis.axhline(
                    float(group[column].mean()),
                    color="grey",
                    ls=style,
                    lw=1.2,
                    label=label,
                )
        if (ratio > 0).all():
            axis.set_xscale("log")
            axis.set_xticks(ratio_ticks(ratio))
            axis.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:.3g}"))
            axis.xaxis.set_minor_formatter(ticker.NullFormatter())
            if ratio.nunique() == 1:
                axis.set_xlim(ratio.iloc[0] / 1.5, ratio.iloc[0] * 1.5)
        keys = dict(
            zip(
                comparison_keys(points),
                key_values if isinstance(key_values, tuple) else (key_values,),
                strict=True,
            )
        )
        metric_name = keys.pop("metric_name", None) or "main metric"
        axis.set_title(" / ".join(_fmt(v) for v in keys.values() if _fmt(v)))
        axis.set_xlabel("compress/ratio (whole model, log scale)")
        axis.set_ylabel(f"test/{metric_name}")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8, loc="best")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


# --------------------------------------------------------------------------- html

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right;vertical-align:top}
td.text,th.text{text-align:left}
#leaderboard>tbody>tr>td{white-space:nowrap}
thead th{background:#f0f0f0;position:sticky;top:0}
thead th[data-key]{cursor:pointer;user-select:none}
thead th[aria-sort=ascending]::after{content:" \\25B2"}
thead th[aria-sort=descending]::after{content:" \\25BC"}
tr.pareto td{background:#f3fbf3}
td.best{font-weight:bold}
details table{margin:4px 0 8px 0;font-size:12px}
.controls label{margin-right:1em}
img{max-width:100%}
.note{color:#555;font-size:13px}
"""

_JS = """
(function () {
  var table = document.getElementById('leaderboard');
  if (!table) { return; }
  var tbody = table.tBodies[0];
  var headers = Array.prototype.slice.call(table.tHead.rows[0].cells);
  function value(row, index) {
    var cell = row.cells[index];
    var raw = cell.getAttribute('data-sort');
    if (raw === null) { raw = cell.textContent.trim(); }
    if (raw === '') { return null; }
    var number = Number(raw);
    return isNaN(number) ? raw : number;
  }
  function sortBy(th) {
    var index = headers.indexOf(th);
    var direction = th.getAttribute('aria-sort') === 'ascending' ? 'descending' : 'ascending';
    headers.forEach(function (h) { h.removeAttribute('aria-sort'); });
    th.setAttribute('aria-sort', direction);
    var sign = direction === 'ascending' ? 1 : -1;
    var rows = Array.prototype.slice.call(tbody.rows);
    rows.sort(function (a, b) {
      var x = value(a, index), y = value(b, index);
      if (x === null && y === null) { return 0; }
      if (x === null) { return 1; }
      if (y === null) { return -1; }
      if (typeof x === 'number' && typeof y === 'number') { return sign * (x - y); }
      return sign * String(x).localeCompare(String(y), undefined, {numeric: true});
    });
    rows.forEach(function (row) { tbody.appendChild(row); });
  }
  headers.forEach(function (th) {
    if (th.hasAttribute('data-key')) { th.addEventListener('click', function () { sortBy(th); }); }
  });
  var selects = Array.prototype.slice.call(document.querySelectorAll('select[data-filter]'));
  var counter = document.getElementById('shown');
  function filter() {
    var shown = 0;
    Array.prototype.slice.call(tbody.rows).forEach(function (row) {
      var keep = selects.every(function (s) { return s.value === '' || row.getAttribute('data-' + s.getAttribute('data-filter')) === s.value; });
      row.hidden = !keep;
      if (keep) { shown += 1; }
    });
    if (counter) { counter.textContent = shown + ' of ' + tbody.rows.length + ' settings shown'; }
  }
  selects.forEach(function (s) { s.addEventListener('change', filter); });
  filter();
  var hash = location.hash.replace(/^#/, '');
  var params = {};
  hash.split('&').forEach(function (part) {
    if (!part) { return; }
    var at = part.indexOf('=');
    if (at > 0) { params[decodeURIComponent(part.slice(0, at))] = decodeURIComponent(part.slice(at + 1)); }
  });
  selects.forEach(function (s) {
    var wanted = params[s.getAttribute('data-filter')];
    if (wanted !== undefined) { s.value = wanted; s.dispatchEvent(new Event('change')); }
  });
  if (params.sort) {
    var descending = params.sort.charAt(0) === '-';
    var key = descending ? params.sort.slice(1) : params.sort;
    var th = headers.filter(function (h) { return h.getAttribute('data-key') === key; })[0];
    if (th) { th.click(); if (descending) { th.click(); } }
  }
})();
"""

_LAYER_FIRST = (
    "name",
    "shape",
    "pattern",
    "w_bits",
    "granularity",
    "sparsity",
    "levels",
    "sqnr_db",
)


def _layer_value(value: Any) -> str:
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return "×".join(str(v) for v in value)
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return _fmt(value)


def _layers_html(layers: Sequence[dict[str, Any]]) -> str:
    if not layers:
        return "<p class='note'>no layer records</p>"
    keys = [k for k in _LAYER_FIRST if any(k in layer for layer in layers)]
    keys += sorted({k for layer in layers for k in layer} - set(keys))
    head = "".join(f"<th class='text'>{html.escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_layer_value(layer.get(k)))}</td>" for k in keys) + "</tr>" for layer in layers)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _details_html(runs: pd.DataFrame) -> str:
    parts = [f"<details><summary>{len(runs)} run{'s' if len(runs) != 1 else ''}</summary>"]
    for _, run in runs.iterrows():
        facts = {
            "seed": run.get("seed"),
            "score": run.get("metric"),
            "retention": run.get("test/retention"),
            "ratio": run.get("compress/ratio"),
            "fit s": run.get("time/fit_s"),
        }
        line = ", ".join(f"{k} {_fmt(v)}" for k, v in facts.items() if _fmt(v))
        layers = run.get("layers") if isinstance(run.get("layers"), list) else []
        parts.append(
            f"<details><summary>{html.escape(line)} — {len(layers)} layers</summary><p class='note'>{html.escape(str(run.get('run_dir', '')))}</p>{_layers_html(layers)}</details>"
        )
    parts.append("</details>")
    return "".join(parts)


def _select(name: str, values: Iterable[Any]) -> str:
    options = "".join(
        f"<option value='{html.escape(v, quote=True)}'>{html.escape(v)}</option>" for v in sorted({_fmt(v) for v in values if _fmt(v)})
    )
    return f"<label>{html.escape(name)} <select data-filter='{name}'><option value=''>all</option>{options}</select></label>"


def to_html(
    table: pd.DataFrame,
    runs: pd.DataFrame,
    problems: Sequence[dict[str, Any]],
    png: bytes,
) -> str:
    """The self-contained leaderboard page (inline CSS/JS, the plot embedded as base64)."""
    keys = group_keys(table)
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>slope_bench leaderboard</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>slope_bench leaderboard</h1>",
        f"<p class='note'>{len(table)} settings from {len(runs)} runs; {len(problems)} failed or incomplete. Seeds aggregated as mean ± std (n = runs). Click a header to sort. <b>vs best</b>: best retention of its model/task, or a tie within the seeds' std. <b>pareto</b>: not beaten on both main metric and compress/ratio.</p>",
    ]
    if table.empty:
        parts.append("<p>No completed runs.</p>")
    else:
        headers, rows = _display(table)
        text_keys = set(_identity_columns(table)) | {"vs_best"}
        parts.append(
            "<p class='controls'>"
            + "".join(_select(k, table[k]) for k in ("model", "task", "method"))
            + "<span id='shown' class='note'></span></p>"
        )
        head = "".join(
            f"<th data-key='{html.escape(k, quote=True)}'{' class=text' if k in text_keys else ''}>{html.escape(label)}</th>"
            for k, label in headers
        )
        parts.append(f"<table id='leaderboard'><thead><tr>{head}<th class='text'>details</th></tr></thead><tbody>")
        for index, ((_, row), cells) in enumerate(zip(table.iterrows(), rows, strict=True)):
            mask = pd.Series(True, index=runs.index)
            for key in keys:
                column = runs[key] if key in runs else pd.Series(None, index=runs.index)
                mask &= column.isna() if pd.isna(row[key]) else column.astype(object).eq(row[key])
            attributes = " ".join(f"data-{k}='{html.escape(_fmt(row.get(k)), quote=True)}'" for k in ("model", "task", "method"))
            classes = "run pareto" if row["pareto"] else "run"
            tds = []
            for (key, _), (text, sort) in zip(headers, cells, strict=True):
                sort_text = (
                    ""
                    if sort is None or (not isinstance(sort, str) and pd.isna(sort))
                    else (
                        repr(float(sort))
                        if isinstance(sort, (int, float, np.integer, np.floating)) and not isinstance(sort, (bool, np.bool_))
                        else str(sort)
                    )
                )
                klass = "text" if key in text_keys else ("best" if key == "vs_best" else "")
                tds.append(
                    f"<td data-sort='{html.escape(sort_text, quote=True)}'{f' class={klass}' if klass else ''}>{html.escape(text)}</td>"
                )
            parts.append(
                f"<tr class='{classes}' data-row='{index}' {attributes}>{''.join(tds)}<td class='text'>{_details_html(runs[mask])}</td></tr>"
            )
        parts.append("</tbody></table>")
    parts.append(
        f"<h2>Pareto front</h2><img alt='Pareto front: main metric vs compress/ratio' src='data:image/png;base64,{base64.b64encode(png).decode('ascii')}'>"
    )
    parts.append(f"<h2>Failed or incomplete runs ({len(problems)})</h2>")
    if problems:
        head = "".join(f"<th class='text'>{html.escape(k)}</th>" for k in PROBLEM_COLUMNS)
        body = "".join(
            "<tr class='problem'>" + "".join(f"<td class='text'>{html.escape(_fmt(p.get(k)))}</td>" for k in PROBLEM_COLUMNS) + "</tr>"
            for p in problems
        )
        parts.append(f"<table id='problems'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    else:
        parts.append("<p>None.</p>")
    parts.append(f"<script>{_JS}</script></body></html>")
    return "\n".join(parts)


# --------------------------------------------------------------------------- write / wandb


def write(
    dirs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str] | None = None,
    use_wandb: bool = False,
) -> dict[str, Path]:
    """Collect, aggregate and write the leaderboard files.

    Args:
        dirs: folders searched for runs.
        out: output folder (default: the first of ``dirs``); created if missing.
        use_wandb: also log the table and plot to W&B (see :func:`log_wandb`).

    Returns:
        ``{"csv", "md", "png", "html"}`` paths (plus ``"wandb"``, the W&B run dir, when
        logged).
    """
    out = Path(out if out is not None else dirs[0])
    runs, problems = collect(dirs)
    return _write_files(runs, problems, out, use_wandb)


def _shown_path(path: str, out: Path) -> str:
    """``path`` relative to ``out`` when it lies below it, else unchanged."""
    try:
        return str(Path(path).resolve().relative_to(out.resolve()))
    except ValueError:
        return str(path)


def _write_files(runs: pd.DataFrame, problems: list[dict[str, Any]], out: Path, use_wandb: bool) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    table = aggregate(runs)
    # Paths below the output folder are shown relative to it (the md/html live there).
    problems = [{**p, "path": _shown_path(p["path"], out)} for p in problems]
    runs = runs.assign(run_dir=[_shown_path(d, out) for d in runs["run_dir"]]) if "run_dir" in runs else runs
    paths = {
        name: out / file
        for name, file in (
            ("csv", "leaderboard.csv"),
            ("md", "leaderboard.md"),
            ("png", "pareto.png"),
            ("html", "leaderboard.html"),
        )
    }
    table.to_csv(paths["csv"], index=False)
    plot_pareto(table, paths["png"])
    paths["md"].write_text(to_markdown(table, problems, figure=paths["png"].name), encoding="utf-8")
    paths["html"].write_text(to_html(table, runs, problems, paths["png"].read_bytes()), encoding="utf-8")
    if use_wandb:
        run_dir = log_wandb(table, paths["png"])
        if run_dir is not None:
            paths["wandb"] = run_dir
    return paths


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
    mode = os.environ.get("WANDB_MODE", "offline")
    frame = table.copy()
    for column in frame.columns:
        if frame[column].dtype == object or str(frame[column].dtype) in (
            "Int64",
            "boolean",
            "string",
            "str",
        ):
            frame[column] = frame[column].map(lambda v: _fmt(v) if not isinstance(v, str) else v)
    run = wandb.init(
        project=project,
        name="leaderboard",
        job_type="leaderboard",
        mode=mode,
        dir=os.environ.get("WANDB_DIR") or str(Path(png).parent),
        reinit="finish_previous",
    )
    try:
        run.log(
            {
                "leaderboard": wandb.Table(dataframe=frame),
                "pareto": wandb.Image(str(png)),
            }
        )
        return Path(run.dir)
    finally:
        run.finish()


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m slope_bench.leaderboard DIR... [--out OUT] [--wandb]``."""
    parser = argparse.ArgumentParser(
        prog="python -m slope_bench.leaderboard",
        description="Gather results.json files into leaderboard.csv/.md/.html and pareto.png.",
    )
    parser.add_argument("dirs", nargs="+", help="folders searched recursively for results.json")
    parser.add_argument("--out", default=None, help="output folder (default: the first DIR)")
    parser.add_argument(
        "--wandb",
        action="store_true",
        help="also log a wandb.Table and the plot (offline unless WANDB_MODE says otherwise)",
    )
    args = parser.parse_args(argv)
    existing = [d for d in args.dirs if Path(d).is_dir()]
    for missing in sorted(set(args.dirs) - set(existing)):
        print(f"leaderboard: skipping {missing}: not a folder", file=sys.stderr)
    if not existing:
        print(f"leaderboard: none of {' '.join(args.dirs)} is a folder", file=sys.stderr)
        return 2
    runs, problems = collect(existing)
    paths = _write_files(
        runs,
        problems,
        Path(args.out if args.out is not None else args.dirs[0]),
        args.wandb,
    )
    print(f"leaderboard: {len(runs)} runs, {len(problems)} failed or incomplete")
    for problem in problems:
        print(f"  {problem['status']}: {problem['path']}: {problem['error']}")
    for name, path in paths.items():
        print(f"  {name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
