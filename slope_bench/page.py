"""The leaderboard as text: ``leaderboard.md`` and the self-contained ``leaderboard.html``.

The page inlines ``slope_bench/static/leaderboard.css`` and ``leaderboard.js`` (package
data) and the plot as base64, so it opens offline from one file. Everything taken from a
``results.json`` is escaped: HTML-escaped on the page, and in Markdown cells too (with
``|``, ``[`` and ``]`` backslash-escaped), so a method name cannot inject markup or links.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Iterable, Sequence
from importlib import resources
from typing import Any

import numpy as np
import pandas as pd

from slope_bench.results_table import PROBLEM_COLUMNS, group_keys

# Columns shown in the md/html table: (column, header). Only those present are shown.
DISPLAY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("metric", "score"),
    ("metric_dense", "dense"),
    ("metric_dense_ft", "dense ft"),
    ("test/retention", "retention"),
    ("compress/ratio", "ratio (kernel-ready, accounted)"),
    ("compress/measured_ratio", "ratio (kernel-ready file)"),
    ("compress/coded_ratio", "ratio (stored, coded file)"),
    ("compress/ratio_nominal", "ratio (nominal)"),
    ("compress/bits_per_weight", "bits/weight"),
    ("compress/sparsity", "sparsity"),
    ("compress/bops_ratio", "BOPs ratio"),
    ("time/fit_s", "fit s"),
    ("time/step_ms", "step ms"),
    ("time/step_ms_dense", "step ms dense"),
)
RATIO_NOTE = (
    "Ratios: *kernel-ready, accounted* = `compress/ratio`, dense bits over every bit a fixed-width "
    "kernel format needs (values, N:M indices or masks, scales, fp32 leftovers); *kernel-ready file* "
    "= `compress/measured_ratio`, the packed file on disk; *stored, coded file* = "
    "`compress/coded_ratio`, the entropy-coded file (storage/transmission size, not directly "
    "executable); *nominal* = the papers' 32 / (bits × density) over targeted weights."
)
COMPARISON_NOTE = (
    "Paired comparisons (`python -m slope_bench.compare`): runs sharing model, task, setting and seed "
    "are pairs (settings the other method lacks: paired at the nearest whole-model ratio within the "
    "stated tolerance). `mean diff` = mean of A − B; 95% paired bootstrap interval; two-sided sign-flip "
    "permutation p, Holm-corrected across the table. A verdict needs `p (Holm)` < alpha and an interval "
    "excluding 0; fewer than 3 pairs: `not_enough_pairs`. With n pairs the smallest possible p is 2/2ⁿ "
    "(3 seeds: 0.25), so a verdict needs 6 or more seeds."
)
LAYER_FIRST = ("name", "shape", "pattern", "w_bits", "granularity", "sparsity", "levels", "sqnr_db")
COMPARISON_HEADERS = (
    "A",
    "B",
    "model",
    "task",
    "setting",
    "metric",
    "pairs",
    "mean diff (A − B)",
    "95% CI",
    "p",
    "p (Holm)",
    "verdict",
)


def static_text(name: str) -> str:
    """A file shipped in ``slope_bench/static/`` (package data)."""
    return resources.files("slope_bench").joinpath("static", name).read_text(encoding="utf-8")


# --------------------------------------------------------------------------- formatting


def fmt(value: Any, digits: int = 4) -> str:
    """A table cell: empty for missing values, ``✓`` for true, numbers to ``digits``."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "✓" if value else ""
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.{digits}g}"
    return str(value)


def mean_std(row: pd.Series, column: str, show_n: bool = False) -> str:
    """``"mean ± std (n=k)"`` of an aggregated column (std hidden when exactly 0)."""
    mean = row.get(column)
    if mean is None or pd.isna(mean):
        return ""
    text = fmt(mean)
    std = row.get(f"{column}_std")
    if std is not None and pd.notna(std) and (std != 0 or show_n):
        text += f" ± {fmt(std, 2)}"
    n = row.get(f"{column}_n", row.get("n"))
    if show_n or (pd.notna(n) and n != row.get("n")):
        text += f" (n={fmt(n)})"
    return text


def identity_columns(table: pd.DataFrame) -> list[str]:
    """Identity columns shown in the table, main metric name last."""
    return [k for k in group_keys(table) if k in table and k != "metric_name"] + ["metric_name"]


def display(table: pd.DataFrame) -> tuple[list[tuple[str, str]], list[list[tuple[str, Any]]]]:
    """Headers ``(key, label)`` and cells ``(text, sort value)`` of the leaderboard table."""
    identity = identity_columns(table)
    headers = [("rank", "rank")] + [(k, "metric" if k == "metric_name" else k) for k in identity] + [("n", "n")]
    shown = [(c, label) for c, label in DISPLAY_COLUMNS if c in table and table[c].notna().any()]
    headers += shown + [("pareto", "pareto"), ("vs_best", "vs best")]
    rows = []
    for _, row in table.iterrows():
        cells: list[tuple[str, Any]] = [(fmt(row["rank"]), row["rank"])]
        cells += [(fmt(row.get(k)), row.get(k)) for k in identity]
        cells.append((fmt(row["n"]), row["n"]))
        cells += [(mean_std(row, c, show_n=c == "metric"), row.get(c)) for c, _ in shown]
        cells += [("✓" if row["pareto"] else "", int(bool(row["pareto"]))), (row["vs_best"], row["vs_best"])]
        rows.append(cells)
    return headers, rows


def comparison_cells(comparisons: pd.DataFrame) -> list[list[str]]:
    """Text cells (:data:`COMPARISON_HEADERS`) of the comparisons table."""
    rows = []
    for _, c in comparisons.iterrows():
        interval = f"{fmt(c['ci_low'], 3)} … {fmt(c['ci_high'], 3)}" if pd.notna(c["ci_low"]) else ""
        rows.append(
            [fmt(c[k]) for k in ("method_a", "method_b", "model", "task", "setting", "metric", "n_pairs")]
            + [fmt(c["mean_diff"], 3), interval, fmt(c["p_value"], 3), fmt(c["p_holm"], 3), str(c["verdict"])]
        )
    return rows


# --------------------------------------------------------------------------- markdown


def md_cell(text: Any) -> str:
    """A Markdown table cell: HTML escaped, ``|``/``[``/``]`` backslash-escaped, one line."""
    text = html.escape(str(text), quote=False)
    for char in ("\\", "|", "[", "]"):
        text = text.replace(char, "\\" + char)
    return " ".join(text.splitlines())


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table with every cell escaped by :func:`md_cell`."""
    lines = ["| " + " | ".join(md_cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def to_markdown(
    table: pd.DataFrame,
    problems: Sequence[dict[str, Any]],
    figure: str | None = "pareto.png",
    comparisons: pd.DataFrame | None = None,
    notes: Sequence[str] = (),
) -> str:
    """The leaderboard as Markdown: table, plot, paired comparisons, problem runs.

    Args:
        table: aggregated leaderboard.
        problems: failed, diverged, broken, incomplete and duplicate runs.
        figure: file name of the plot next to the Markdown file (``None``: no plot).
        comparisons: :func:`slope_bench.compare.compare` output (``None``: no section).
        notes: extra lines shown under the title (e.g. an output that could not be written).

    Returns:
        The Markdown text.
    """
    parts = ["# slope_bench leaderboard", ""] + [f"> {md_cell(note)}" for note in notes] + ([""] if notes else [])
    if table.empty:
        parts += ["No completed runs.", ""]
    else:
        headers, rows = display(table)
        parts += [
            "Seeds aggregated as mean ± std (n = runs). `vs best`: best retention of its model/task, or a tie "
            "(within the seeds' std of the best). `pareto`: not beaten on both the main metric and `compress/ratio`.",
            "",
            RATIO_NOTE,
            "",
            md_table([label for _, label in headers], [[text for text, _ in row] for row in rows]),
            "",
        ]
        if figure:
            parts += [f"![Pareto front]({figure})", ""]
    if comparisons is not None:
        parts += [f"## Paired comparisons ({len(comparisons)})", "", COMPARISON_NOTE, ""]
        parts += [md_table(COMPARISON_HEADERS, comparison_cells(comparisons)) if len(comparisons) else "None.", ""]
    parts += [f"## Failed, diverged or incomplete runs ({len(problems)})", ""]
    if problems:
        parts.append(md_table(PROBLEM_COLUMNS, [[fmt(p.get(k)) for k in PROBLEM_COLUMNS] for p in problems]))
    else:
        parts.append("None.")
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------- html


def _e(value: Any) -> str:
    return html.escape(fmt(value) if not isinstance(value, str) else value, quote=True)


def _layer_value(value: Any) -> str:
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return "×".join(str(v) for v in value)
    return json.dumps(value) if isinstance(value, (dict, list)) else fmt(value)


def _layers_html(layers: Sequence[dict[str, Any]]) -> str:
    if not layers:
        return "<p class='note'>no layer records</p>"
    keys = [k for k in LAYER_FIRST if any(k in layer for layer in layers)]
    keys += sorted({k for layer in layers for k in layer} - set(keys))
    head = "".join(f"<th class='text'>{_e(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{_e(_layer_value(layer.get(k)))}</td>" for k in keys) + "</tr>" for layer in layers)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _details_html(runs: pd.DataFrame) -> str:
    parts = [f"<details><summary>{len(runs)} run{'s' if len(runs) != 1 else ''}</summary>"]
    for _, run in runs.iterrows():
        facts = {"seed": "seed", "score": "metric", "retention": "test/retention", "ratio": "compress/ratio", "fit s": "time/fit_s"}
        line = ", ".join(f"{k} {fmt(run.get(c))}" for k, c in facts.items() if fmt(run.get(c)))
        layers = run.get("layers") if isinstance(run.get("layers"), list) else []
        parts.append(
            f"<details><summary>{_e(line)} — {len(layers)} layers</summary>"
            f"<p class='note'>{_e(str(run.get('run_dir', '')))}</p>{_layers_html(layers)}</details>"
        )
    return "".join(parts) + "</details>"


def _select(name: str, values: Iterable[Any]) -> str:
    options = "".join(f"<option value='{_e(v)}'>{_e(v)}</option>" for v in sorted({fmt(v) for v in values if fmt(v)}))
    return f"<label>{_e(name)} <select data-filter='{_e(name)}'><option value=''>all</option>{options}</select></label>"


def verdict_summary(comparisons: pd.DataFrame | None, key: str) -> tuple[str, int]:
    """HTML summary of one leaderboard row's paired verdicts on the main metric, and wins − losses."""
    if comparisons is None or comparisons.empty:
        return "no paired comparison", 0
    main = comparisons[comparisons["metric"] != "compress/ratio"]
    wins, losses, counts = [], [], {"no_detectable_difference": 0, "not_enough_pairs": 0}
    for _, c in main[(main["key_a"] == key) | (main["key_b"] == key)].iterrows():
        mine = "a" if c["key_a"] == key else "b"
        other = "b" if mine == "a" else "a"
        name = c[f"method_{other}"] + (f" {c[f'setting_{other}']}" if c["pairing"] != "seed" else "")
        if c["verdict"] in counts:
            counts[c["verdict"]] += 1
        else:
            (wins if c["verdict"] == f"{mine}_better" else losses).append(f"{name} ({fmt(abs(c['mean_diff']), 2)})")
    parts = [f"<span class='win'>beats {_e(', '.join(wins))}</span>"] if wins else []
    parts += [f"<span class='loss'>beaten by {_e(', '.join(losses))}</span>"] if losses else []
    parts += [
        f"{label} {n}"
        for n, label in (
            (counts["no_detectable_difference"], "no detectable difference vs"),
            (counts["not_enough_pairs"], "too few pairs vs"),
        )
        if n
    ]
    return "; ".join(parts) or "no paired comparison", len(wins) - len(losses)


def _leaderboard_html(table: pd.DataFrame, runs: pd.DataFrame, comparisons: pd.DataFrame | None) -> list[str]:
    from slope_bench.compare import entry_key

    keys = group_keys(table)
    headers, rows = display(table)
    text_keys = set(identity_columns(table)) | {"vs_best"}
    with_verdicts = comparisons is not None
    parts = [
        "<p class='controls'>"
        + "".join(_select(k, table[k]) for k in ("model", "task", "method"))
        + "<span id='shown' class='note'></span></p>"
    ]
    # the verdicts go right after the score they are about
    at = next((i + 1 for i, (k, _) in enumerate(headers) if k == "metric"), len(headers))
    ths = [f"<th data-key='{_e(k)}'{' class=text' if k in text_keys else ''}>{_e(label)}</th>" for k, label in headers]
    if with_verdicts:
        ths.insert(at, "<th data-key='verdicts' class='text'>paired verdicts (main metric)</th>")
    head = "".join(ths)
    parts.append(f"<table id='leaderboard'><thead><tr>{head}<th class='text'>details</th></tr></thead><tbody>")
    for index, ((_, row), cells) in enumerate(zip(table.iterrows(), rows, strict=True)):
        mask = pd.Series(True, index=runs.index)
        for key in keys:
            column = runs[key] if key in runs else pd.Series(None, index=runs.index)
            mask &= column.isna() if pd.isna(row[key]) else column.astype(object).eq(row[key])
        attributes = " ".join(f"data-{k}='{_e(fmt(row.get(k)))}'" for k in ("model", "task", "method"))
        tds = []
        for (key, _), (text, sort) in zip(headers, cells, strict=True):
            if sort is None or (not isinstance(sort, str) and pd.isna(sort)):
                sort_text = ""
            elif isinstance(sort, (int, float, np.integer, np.floating)) and not isinstance(sort, (bool, np.bool_)):
                sort_text = repr(float(sort))
            else:
                sort_text = str(sort)
            klass = "text" if key in text_keys else ("best" if key == "vs_best" else "")
            tds.append(f"<td data-sort='{_e(sort_text)}'{f' class={klass}' if klass else ''}>{_e(text)}</td>")
        if with_verdicts:
            summary, score = verdict_summary(comparisons, entry_key(row, keys))
            tds.insert(at, f"<td class='text verdicts' data-sort='{score}'>{summary}</td>")
        parts.append(
            f"<tr class='run{' pareto' if row['pareto'] else ''}' data-row='{index}' {attributes}>"
            f"{''.join(tds)}<td class='text'>{_details_html(runs[mask])}</td></tr>"
        )
    parts.append("</tbody></table>")
    return parts


def to_html(
    table: pd.DataFrame,
    runs: pd.DataFrame,
    problems: Sequence[dict[str, Any]],
    png: bytes | None,
    comparisons: pd.DataFrame | None = None,
    notes: Sequence[str] = (),
) -> str:
    """The self-contained leaderboard page (inline CSS/JS, the plot embedded as base64).

    Args:
        table: aggregated leaderboard.
        runs: the runs behind it (per-run details and layer records).
        problems: failed, diverged, broken, incomplete and duplicate runs.
        png: the plot's bytes (``None``: the page says it is missing).
        comparisons: :func:`slope_bench.compare.compare` output; adds a verdict column next
            to the table and the comparisons table (``None``: neither).
        notes: extra lines shown under the title (e.g. an output that could not be written).

    Returns:
        The page.
    """
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>slope_bench leaderboard</title>",
        f"<style>{static_text('leaderboard.css')}</style></head><body>",
        "<h1>slope_bench leaderboard</h1>",
        *(f"<p class='warning'>{_e(note)}</p>" for note in notes),
        f"<p class='note'>{len(table)} settings from {len(runs)} runs; {len(problems)} failed, diverged or incomplete. "
        "Seeds aggregated as mean ± std (n = runs). Click a header to sort. <b>vs best</b>: best retention of its "
        "model/task, or a tie within the seeds' std. <b>pareto</b>: not beaten on both main metric and compress/ratio. "
        "<b>paired verdicts</b>: Holm-corrected paired tests against the other methods (see below).</p>",
    ]
    parts += _leaderboard_html(table, runs, comparisons) if not table.empty else ["<p>No completed runs.</p>"]
    parts.append(f"<p class='note'>{_e(RATIO_NOTE.replace('*', '').replace('`', ''))}</p>")
    if png:
        parts.append(
            "<h2>Pareto front</h2><img alt='Pareto front: main metric vs compression ratio' "
            f"src='data:image/png;base64,{base64.b64encode(png).decode('ascii')}'>"
        )
    else:
        parts.append("<h2>Pareto front</h2><p class='warning'>plot not available</p>")
    if comparisons is not None:
        parts.append(f"<h2>Paired comparisons ({len(comparisons)})</h2><p class='note'>{_e(COMPARISON_NOTE.replace('`', ''))}</p>")
        if len(comparisons):
            head = "".join(f"<th class='text'>{_e(h)}</th>" for h in COMPARISON_HEADERS)
            body = "".join(
                f"<tr class='{_e(str(c['verdict']))}'>"
                + "".join(f"<td class='text{' verdict' if i == len(cells) - 1 else ''}'>{_e(t)}</td>" for i, t in enumerate(cells))
                + "</tr>"
                for (_, c), cells in zip(comparisons.iterrows(), comparison_cells(comparisons), strict=True)
            )
            parts.append(f"<table id='comparisons'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    parts.append(f"<h2>Failed, diverged or incomplete runs ({len(problems)})</h2>")
    if problems:
        head = "".join(f"<th class='text'>{_e(k)}</th>" for k in PROBLEM_COLUMNS)
        body = "".join(
            "<tr class='problem'>" + "".join(f"<td class='text'>{_e(fmt(p.get(k)))}</td>" for k in PROBLEM_COLUMNS) + "</tr>"
            for p in problems
        )
        parts.append(f"<table id='problems'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    else:
        parts.append("<p>None.</p>")
    parts.append(f"<script>{static_text('leaderboard.js')}</script></body></html>")
    return "\n".join(parts)
