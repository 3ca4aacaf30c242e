"""Seeds aggregated into settings: means, stds, ranks, ties and the Pareto front.

:func:`aggregate` turns the runs of :func:`slope_bench.results_table.collect` into one row
per setting (method, model, task, setting, ``model_*`` keys, main metric). Settings are
compared within a *comparison group* (same model, task, ``model_*`` keys and main metric):
``rank`` orders them by mean retention (``test/retention``; the main metric where retention
is missing); ``vs_best`` is ``"best"`` for rank 1, ``"tie"`` when a setting's mean is within
the seeds' spread of the best one's (``|mean_best - mean| <= max(std_best, std)``; a
descriptive mark, not a test: :mod:`slope_bench.compare` has the paired tests), else empty;
``pareto`` marks the settings no other setting of the group beats on both the main metric
and ``compress/ratio``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from slope_bench.results_table import comparison_keys, group_keys

COMPARE_BY = ("test/retention", "metric")


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


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _numeric_columns(df: pd.DataFrame, keys: Sequence[str]) -> list[str]:
    skip = set(keys) | {"seed", "layers"}
    return [c for c in df.columns if c not in skip and len(df[c].dropna()) and all(_is_number(v) for v in df[c].dropna())]


def _rank_and_ties(table: pd.DataFrame) -> pd.DataFrame:
    """Add ``rank``, ``vs_best`` and ``pareto`` within each comparison group."""
    table["rank"] = pd.Series(pd.NA, index=table.index, dtype="Int64")
    table["vs_best"] = ""
    table["pareto"] = False
    for _, group in table.groupby(comparison_keys(table), dropna=False, sort=False):
        column = next((c for c in COMPARE_BY if c in group and group[c].notna().all()), "metric")
        means = pd.to_numeric(group[column], errors="coerce")
        stds = pd.to_numeric(group.get(f"{column}_std", pd.Series(np.nan, index=group.index)), errors="coerce").fillna(0.0)
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
    skip = {*keys, *numeric, "seed", "layers", "path", "run_dir", "status"}
    other = [c for c in df.columns if c not in skip]
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
    table = _rank_and_ties(pd.DataFrame(records))
    sort_keys = comparison_keys(table) + ["rank"]
    table = table.sort_values(sort_keys, key=lambda c: c if c.name == "rank" else c.astype(str), kind="stable").reset_index(drop=True)
    front = keys + base + [c for c in ("metric", "metric_std", "metric_n") if c in table]
    return table[front + [c for c in table.columns if c not in front]]
