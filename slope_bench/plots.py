"""``pareto.png``: main metric against a compression ratio, readable where methods differ.

One row of two panels per comparison group (model, task, ``model_*``, main metric):

* **all settings**: every setting on a log x axis, the zoom window drawn as a dashed box;
* **zoom**: the settings within :data:`ZOOM_POINTS` points (0.10 for metrics that are
  fractions) of the dense model, over the ratios where at least two methods have such a
  setting near each other, so far-off points (a collapsed method at 0.1, the dense model at
  ratio 1) do not squeeze the region where methods differ.

One colour and marker per method (its settings joined by a line), bars of ± one std over
seeds on both axes, the Pareto front as a step line with ringed points, the dense model
dashed and the dense fine-tuned control dotted. The legend sits outside the panels; x tick
labels are "nice" numbers, thinned until no two overlap. Every text from the results is
escaped for matplotlib (no mathtext), so a method named ``$x$`` plots as ``$x$``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from slope_bench.aggregate import pareto_front
from slope_bench.results_table import comparison_keys

ZOOM_POINTS = 10.0  # points of the main metric below dense shown in the zoom panel
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
X_LABELS = {
    "compress/ratio": "compress/ratio: whole model, kernel-ready (log)",
    "compress/measured_ratio": "compress/measured_ratio: packed file, kernel-ready (log)",
    "compress/coded_ratio": "compress/coded_ratio: stored size, entropy-coded file (log)",
}
MANTISSAS = ((1,), (1, 3), (1, 2, 5), (1, 1.5, 2, 3, 5, 7), (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8))


def plain(text: Any) -> str:
    """``text`` as matplotlib shows it literally: ``$`` escaped (no mathtext), and a leading
    ``_`` (which hides a legend entry) protected by a zero-width space."""
    text = str(text).replace("$", r"\$")
    return "\u200b" + text if text.startswith("_") else text


def nice_log_ticks(low: float, high: float, max_ticks: int = 8) -> list[float]:
    """Round tick values (1, 2, 5, 10, 15, 20, ...) in ``[low, high]``: the densest set of at
    most ``max_ticks``; for a range too narrow for two round values, three log-spaced ticks."""
    if not (np.isfinite(low) and np.isfinite(high)) or low <= 0 or high <= low:
        return [low] if np.isfinite(low) and low > 0 else []
    best: list[float] = []
    for mantissas in MANTISSAS:
        ticks = [
            m * 10.0**k
            for k in range(math.floor(math.log10(low)) - 1, math.ceil(math.log10(high)) + 1)
            for m in mantissas
            if low <= m * 10.0**k * (1 + 1e-12) and m * 10.0**k <= high * (1 + 1e-12)
        ]
        if len(ticks) <= max_ticks and len(ticks) >= len(best):
            best = ticks
    if len(best) >= 2:
        return best
    return [float(f"{v:.3g}") for v in np.geomspace(low, high, 3)]


def _tick_label(value: float, _: Any = None) -> str:
    return f"{value:.3g}"


def _thin_overlapping(figure: Any, axes: list[Any]) -> None:
    """Drop every other x tick of an axis until no two of its tick labels overlap (measured
    on the drawn figure, so long labels or narrow panels are handled too)."""
    for _ in range(4):
        figure.canvas.draw()
        crowded = []
        for axis in axes:
            labels = [t for t in axis.get_xticklabels() if t.get_visible() and t.get_text()]
            boxes = sorted((t.get_window_extent() for t in labels), key=lambda b: b.x0)
            if len(boxes) > 2 and any(a.x1 + 2 > b.x0 for a, b in zip(boxes, boxes[1:])):
                crowded.append(axis)
        if not crowded:
            return
        for axis in crowded:
            axis.set_xticks(list(axis.get_xticks())[::2])


def zoom_window(group: pd.DataFrame, x: str, points: float | None = None) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """``((x_low, x_high), (y_low, y_high))`` of the zoom panel, or None when under two
    settings lie within ``points`` of the dense metric (default :data:`ZOOM_POINTS`,
    read as 0.10 when the metric is a fraction)."""
    xs = pd.to_numeric(group[x], errors="coerce")
    ys = pd.to_numeric(group["metric"], errors="coerce")
    dense = pd.to_numeric(group.get("metric_dense", pd.Series(dtype=float)), errors="coerce").dropna()
    reference = float(dense.mean()) if len(dense) else float(ys.max())
    band = (points or ZOOM_POINTS) / (100.0 if reference <= 1.5 else 1.0)
    inside = group[(ys >= reference - band) & xs.gt(0)]
    if len(inside) < 2:
        return None
    ratios, methods = xs[inside.index], inside["method"].astype(str)
    contested = [i for i in inside.index if ((methods != methods[i]) & (np.abs(np.log(ratios / ratios[i])) <= math.log(1.25))).any()]
    chosen = contested or [i for i in inside.index if ratios[i] > 1.0 + 1e-9] or list(inside.index)
    low, high = float(ratios[chosen].min()), float(ratios[chosen].max())
    pad = max(1.08, (high / low) ** 0.06)
    stds = pd.to_numeric(group.get("metric_std", pd.Series(0.0, index=group.index)), errors="coerce").fillna(0.0)
    tops = [float((ys + stds)[chosen].max()), reference]
    tops += [float(v) for v in pd.to_numeric(group.get("metric_dense_ft", pd.Series(dtype=float)), errors="coerce").dropna()]
    top = max(tops)
    y_low = reference - band
    return (low / pad, high * pad), (y_low, top + 0.04 * (top - y_low))


def _draw(axis: Any, group: pd.DataFrame, x: str, colours: dict[str, Any], markers: dict[str, str]) -> None:
    """Methods, error bars, Pareto front and dense references on one panel."""
    xs = pd.to_numeric(group[x], errors="coerce")
    for method, part in group.groupby("method", sort=True):
        part = part.assign(_x=xs[part.index]).sort_values("_x")
        yerr = part["metric_std"].fillna(0.0) if "metric_std" in part else None
        xerr = pd.to_numeric(part[f"{x}_std"], errors="coerce").fillna(0.0) if f"{x}_std" in part else None
        axis.errorbar(
            part["_x"],
            part["metric"],
            yerr=yerr,
            xerr=xerr,
            marker=markers[str(method)],
            ms=5,
            capsize=2.5,
            lw=1.2,
            elinewidth=1.0,
            color=colours[str(method)],
        )
    front = group[pareto_front(group, x, "metric")].assign(_x=xs).sort_values("_x")
    if len(front):
        axis.step(front["_x"], front["metric"], where="pre", color="black", ls=(0, (4, 2)), lw=0.9, alpha=0.8, zorder=1)
        axis.scatter(front["_x"], front["metric"], s=130, facecolors="none", edgecolors="black", lw=1.2, zorder=3)
    for column, style in (("metric_dense", "--"), ("metric_dense_ft", ":")):
        if column in group and group[column].notna().any():
            axis.axhline(float(group[column].mean()), color="grey", ls=style, lw=1.2, zorder=0)
    axis.grid(True, which="major", alpha=0.3)


def _log_x(axis: Any, low: float, high: float, width: float) -> None:
    from matplotlib import ticker

    axis.set_xscale("log")
    axis.set_xlim(low, high)
    axis.set_xticks(nice_log_ticks(low, high, max_ticks=max(3, int(width * 1.4))))
    axis.xaxis.set_major_formatter(ticker.FuncFormatter(_tick_label))
    axis.xaxis.set_minor_formatter(ticker.NullFormatter())


def _legend(figure: Any, methods: list[str], colours: dict[str, Any], markers: dict[str, str]) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colours[m], marker=markers[m], ms=5, lw=1.2, label=plain(m)) for m in methods]
    handles += [
        Line2D([], [], color="black", marker="o", ms=10, mfc="none", ls=(0, (4, 2)), lw=0.9, alpha=0.8, label="Pareto front"),
        Line2D([], [], color="grey", ls="--", lw=1.2, label="dense"),
        Line2D([], [], color="grey", ls=":", lw=1.2, label="dense fine-tuned"),
    ]
    figure.legend(handles=handles, loc="outside right upper", fontsize=8, title="bars: ± std over seeds", title_fontsize=8, frameon=False)


def plot_pareto(table: pd.DataFrame, path: str | os.PathLike[str], x: str = "compress/ratio", zoom_points: float | None = None) -> Path:
    """Draw ``pareto.png``: the main metric against ``x`` (see the module docstring).

    Args:
        table: aggregated leaderboard from :func:`slope_bench.results_table.aggregate`.
        path: PNG file to write.
        x: the ratio column on the x axis: ``compress/ratio`` (whole model, kernel-ready),
            ``compress/measured_ratio`` (packed file) or ``compress/coded_ratio`` (stored size).
        zoom_points: points below dense shown in the zoom panel (default :data:`ZOOM_POINTS`).

    Returns:
        The path written.
    """
    path = Path(path)
    figure = pareto_figure(table, x=x, zoom_points=zoom_points)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def pareto_figure(table: pd.DataFrame, x: str = "compress/ratio", zoom_points: float | None = None) -> Any:
    """The figure :func:`plot_pareto` saves (a ``matplotlib.figure.Figure``, Agg canvas)."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    values = pd.to_numeric(table[x], errors="coerce") if x in table else pd.Series(np.nan, index=table.index)
    points = table[values.notna() & pd.to_numeric(table.get("metric", values), errors="coerce").notna()]
    groups = list(points.groupby(comparison_keys(points), dropna=False, sort=False)) if not points.empty else []
    figure = Figure(figsize=(13.5, 4.6 * max(len(groups), 1)), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    if not groups:
        axis = figure.add_subplot(1, 1, 1)
        axis.text(0.5, 0.5, plain(f"no completed runs with {x}"), ha="center", va="center", transform=axis.transAxes)
        axis.set_axis_off()
    methods = sorted({str(m) for m in points["method"]}) if not points.empty else []
    cmap = matplotlib.colormaps["tab10" if len(methods) <= 9 else "tab20"]
    palette = [c for i, c in enumerate(cmap.colors) if cmap.name != "tab10" or i != 7]  # tab10's grey is the references' colour
    colours = {m: palette[i % len(palette)] for i, m in enumerate(methods)}
    markers = {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(methods)}
    label = X_LABELS.get(x, f"{x} (log)")
    for row, (key_values, group) in enumerate(groups):
        keys = dict(zip(comparison_keys(points), key_values if isinstance(key_values, tuple) else (key_values,), strict=True))
        metric = keys.pop("metric_name", None) or "main metric"
        title = " / ".join(str(v) for v in keys.values() if v is not None and not (isinstance(v, float) and math.isnan(v)))
        xs = pd.to_numeric(group[x], errors="coerce")
        full, zoom = figure.add_subplot(len(groups), 2, 2 * row + 1), figure.add_subplot(len(groups), 2, 2 * row + 2)
        window = zoom_window(group, x, zoom_points)
        for axis in (full, zoom):
            _draw(axis, group, x, colours, markers)
            axis.set_xlabel(plain(label), fontsize=9)
            axis.set_ylabel(plain(f"test/{metric}"))
        full.set_title(plain(f"{title}: all settings"), fontsize=10)
        if (xs > 0).all():
            _log_x(full, float(xs.min()) / 1.15, float(xs.max()) * 1.15, 5.0)
        if window is None:
            zoom.set_title(plain(f"{title}: fewer than two settings within {zoom_points or ZOOM_POINTS:g} points of dense"), fontsize=10)
            zoom.set_axis_off()
            continue
        (x_low, x_high), (y_low, y_high) = window
        full.add_patch(Rectangle((x_low, y_low), x_high - x_low, y_high - y_low, fill=False, ls="--", lw=0.8, ec="0.4", zorder=0))
        _log_x(zoom, x_low, x_high, 5.0)
        zoom.set_ylim(y_low, y_high)
        zoom.set_title(plain(f"{title}: zoom, within {zoom_points or ZOOM_POINTS:g} points of dense"), fontsize=10)
    if methods:
        _legend(figure, methods, colours, markers)
    _thin_overlapping(figure, [axis for axis in figure.axes if axis.get_xscale() == "log"])
    return figure
