"""Paired comparisons of methods: who wins, by how much, and can it be trusted.

``python -m slope_bench.compare DIR... [--baseline METHOD] [--out OUT] [--tolerance 0.1]``
writes ``comparisons.csv`` with exactly the columns :data:`COLUMNS`.

*Entries.* An entry is one leaderboard row: a method in one setting of one model/task
(``model_*`` keys and main metric included). A method with several configurations
(``config_id``) in one setting is several entries, named ``"codeq (sparsity_decay=2.0)"``.

*Pairs.* Two entries of the same model/task/setting are paired on the seed: runs with the
same seed share the data split and the dense reference. Entries in settings the other
method does not have (e.g. CoDeQ ``unstructured w4`` vs SLOPE ``2:4 w4``) are paired at
equal compression instead: each is matched with the other method's entry whose mean
whole-model ``compress/ratio`` is nearest, when the two ratios are within ``tolerance``
(``max/min - 1 <= tolerance``); such rows say so in their ``setting`` cell
(``"unstructured w4 vs 2:4 w4 (equal ratio: 10.3 vs 9.84, tolerance 10%)"``) and are
then paired on the seed too. Runs of different models, tasks or ``model_*`` keys are never
paired, nor are runs of different configurations within one entry.

*Metrics.* The main metric ``test/<main_metric>``, and ``compress/ratio`` when either
entry chooses its own ratio (an unstructured setting: CoDeQ, SQS; see :func:`chooses_ratio`).

*Statistics.* ``mean_diff`` is the mean of ``a - b`` over pairs (higher is better for
both metrics). ``ci_low``/``ci_high``: a 95% bootstrap interval of that mean
(``scipy.stats.bootstrap`` on the paired differences, BCa, percentile where BCa is
undefined), ``p_value``: a two-sided paired sign-flip permutation test
(``scipy.stats.permutation_test``, ``permutation_type="samples"``; exact up to 13 pairs),
both seeded from the row's identity so a row's numbers do not depend on the others.
``p_holm``: Holm's step-down correction across every p-value of the table. ``verdict``:
``a_better`` / ``b_better`` when ``p_holm < alpha`` and the interval excludes 0,
``no_detectable_difference`` otherwise, ``not_enough_pairs`` (no interval, no p-value)
with fewer than :data:`MIN_PAIRS` pairs. With the exact test, the smallest two-sided
p-value of ``n`` pairs is ``2 / 2**n``: at ``alpha = 0.05`` a verdict needs at least 6 pairs
(more once Holm divides ``alpha`` among many rows).
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import math
import os
import sys
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from slope_bench.results_table import collect, comparison_keys, group_keys, write_csv

COLUMNS = (
    "method_a",
    "method_b",
    "model",
    "task",
    "setting",
    "metric",
    "n_pairs",
    "mean_diff",
    "ci_low",
    "ci_high",
    "p_value",
    "p_holm",
    "verdict",
)
VERDICTS = ("a_better", "b_better", "no_detectable_difference", "not_enough_pairs")
MIN_PAIRS = 3
RATIO = "compress/ratio"


def entry_key(row: pd.Series | dict[str, Any], keys: Sequence[str]) -> str:
    """The identity of one leaderboard row (method, setting, model, task, ``model_*``, metric)."""
    return json.dumps([None if _missing(row.get(k)) else str(row.get(k)) for k in keys])


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


@dataclass(frozen=True)
class Entry:
    """One method (one configuration) in one setting of one comparison group."""

    key: str
    group: tuple
    method: str
    name: str
    setting: str
    model: str
    task: str
    metric: str
    values: pd.DataFrame  # index: seed; columns: "metric", "compress/ratio"
    chooses_ratio: bool  # the method picks its own sparsity, hence its compression ratio

    @property
    def ratio(self) -> float:
        """Mean whole-model compression ratio over seeds (NaN when not recorded)."""
        return float(self.values[RATIO].mean()) if self.values[RATIO].notna().any() else math.nan


def chooses_ratio(setting: str) -> bool:
    """Whether a setting leaves the sparsity to the method (``"unstructured w4"``, CoDeQ, SQS).

    N:M settings fix the pattern and ``w<bits>``-only settings fix the quantization: their
    whole-model ratio is set by the grid (up to bookkeeping of a few exact zeros).
    """
    return "unstructured" in setting.lower()


def entries(runs: pd.DataFrame) -> list[Entry]:
    """The entries of ``runs`` (as returned by :func:`slope_bench.results_table.collect`)."""
    if runs.empty:
        return []
    keys, groups = group_keys(runs), comparison_keys(runs)
    model_keys = [k for k in groups if k.startswith("model_")]
    varying = {k for k in model_keys if runs.groupby("model", dropna=False)[k].nunique(dropna=False).gt(1).any()}
    found = []
    for _, part in runs.groupby(keys, dropna=False, sort=False):
        first = part.iloc[0]
        label = first.get("config_label") or ""
        extra = ", ".join(f"{k.removeprefix('model_')}={first.get(k)}" for k in model_keys if k in varying)
        values = part.assign(**{RATIO: pd.to_numeric(part.get(RATIO, pd.Series(np.nan, index=part.index)), errors="coerce")})
        values = values.drop_duplicates("seed").set_index("seed")[["metric", RATIO]]
        found.append(
            Entry(
                key=entry_key(first, keys),
                group=tuple(str(first.get(k)) for k in groups),
                method=str(first["method"]),
                name=f"{first['method']} ({label})" if label else str(first["method"]),
                setting=str(first.get("setting_base", first["setting"])),
                model=f"{first['model']} [{extra}]" if extra else str(first["model"]),
                task=str(first["task"]),
                metric=f"test/{first['metric_name']}",
                values=values,
                chooses_ratio=chooses_ratio(str(first.get("setting_base", first["setting"]))),
            )
        )
    return found


def _rng(function: Any, seed: int) -> dict[str, Any]:
    """The seeded generator keyword of a scipy resampling function (``rng`` since 1.15)."""
    name = "rng" if "rng" in inspect.signature(function).parameters else "random_state"
    return {name: np.random.default_rng(seed)}


def paired_test(a: Sequence[float], b: Sequence[float], *, confidence: float = 0.95, seed: int = 0) -> dict[str, float]:
    """Paired bootstrap interval and sign-flip permutation test of ``mean(a - b)``.

    Args:
        a: values of entry A, one per pair.
        b: values of entry B, same order.
        confidence: level of the bootstrap interval.
        seed: seeds both resampling procedures.

    Returns:
        ``n_pairs``, ``mean_diff``, ``ci_low``, ``ci_high``, ``p_value`` (the last three NaN
        with fewer than :data:`MIN_PAIRS` pairs).
    """
    from scipy import stats

    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    result = {"n_pairs": len(diff), "mean_diff": float(diff.mean()) if len(diff) else math.nan}
    result.update(ci_low=math.nan, ci_high=math.nan, p_value=math.nan)
    if len(diff) < MIN_PAIRS:
        return result
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BCa on (near-)constant differences: handled below
        interval = stats.bootstrap((diff,), np.mean, confidence_level=confidence, method="BCa", **_rng(stats.bootstrap, seed))
        low, high = interval.confidence_interval
        if not (np.isfinite(low) and np.isfinite(high)):
            interval = stats.bootstrap((diff,), np.mean, confidence_level=confidence, method="percentile", **_rng(stats.bootstrap, seed))
            low, high = interval.confidence_interval
    test = stats.permutation_test(
        (np.asarray(a, dtype=float), np.asarray(b, dtype=float)),
        lambda x, y, axis: np.mean(x - y, axis=axis),
        permutation_type="samples",
        vectorized=True,
        alternative="two-sided",
        **_rng(stats.permutation_test, seed + 1),
    )
    result.update(ci_low=float(low), ci_high=float(high), p_value=float(test.pvalue))
    return result


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (NaN entries stay NaN and are not counted)."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full_like(p, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    order = finite[np.argsort(p[finite], kind="stable")]
    m = len(order)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted


def _within(r_a: float, r_b: float, tolerance: float) -> bool:
    return r_a > 0 and r_b > 0 and max(r_a, r_b) / min(r_a, r_b) - 1 <= tolerance + 1e-12


def _matches(group: list[Entry], baseline: str | None, tolerance: float) -> list[tuple[Entry, Entry]]:
    """``(a, b)`` for every comparison within one comparison group (``b`` is the baseline)."""
    found: dict[tuple[str, str], tuple[Entry, Entry]] = {}
    methods = sorted({e.method for e in group})
    settings = {m: {e.setting for e in group if e.method == m} for m in methods}
    for a, b in itertools.combinations(sorted(group, key=lambda e: (e.method, e.name, e.setting)), 2):
        if a.setting == b.setting:
            found[(a.key, b.key)] = (a, b)
    for m_a, m_b in itertools.combinations(methods, 2):  # settings the other method lacks: equal ratio
        own_a = [e for e in group if e.method == m_a and e.setting not in settings[m_b] and math.isfinite(e.ratio)]
        own_b = [e for e in group if e.method == m_b and e.setting not in settings[m_a] and math.isfinite(e.ratio)]
        if not own_a or not own_b:
            continue
        nearest = [(a, min(own_b, key=lambda b, a=a: abs(math.log(b.ratio / a.ratio)))) for a in own_a]
        nearest += [(min(own_a, key=lambda a, b=b: abs(math.log(a.ratio / b.ratio))), b) for b in own_b]
        found.update({(a.key, b.key): (a, b) for a, b in nearest if _within(a.ratio, b.ratio, tolerance)})
    pairs = list(found.values())
    if baseline is not None:
        pairs = [(b, a) if a.method == baseline else (a, b) for a, b in pairs if baseline in (a.method, b.method)]
        pairs = [(a, b) for a, b in pairs if a.method != baseline]
    return pairs


def _setting_cell(a: Entry, b: Entry, tolerance: float) -> str:
    """The shared setting, or what was paired at equal ratio and within which tolerance."""
    if a.setting == b.setting:
        return a.setting
    return f"{a.setting} vs {b.setting} (equal ratio: {a.ratio:.3g} vs {b.ratio:.3g}, tolerance {tolerance:.0%})"


def compare(
    runs: pd.DataFrame,
    *,
    baseline: str | None = None,
    tolerance: float = 0.10,
    alpha: float = 0.05,
    confidence: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Every paired comparison of ``runs`` with its verdict.

    Args:
        runs: runs as returned by :func:`slope_bench.results_table.collect`.
        baseline: compare every other method against this one only (it is ``method_b``).
        tolerance: equal-ratio pairing across settings accepts ratios with
            ``max/min - 1 <= tolerance``.
        alpha: family-wise error rate of the Holm-corrected verdicts.
        confidence: level of the bootstrap intervals.
        seed: base seed of the resampling.

    Returns:
        One row per comparison and metric: the columns :data:`COLUMNS`, then ``key_a``,
        ``key_b`` (the leaderboard rows compared, see :func:`entry_key`), ``setting_a``,
        ``setting_b`` and ``pairing`` (``"seed"`` or ``"equal ratio"``).
    """
    extra = ["key_a", "key_b", "setting_a", "setting_b", "pairing"]
    rows = []
    by_group: dict[tuple, list[Entry]] = {}
    for entry in entries(runs):
        by_group.setdefault(entry.group, []).append(entry)
    for group in by_group.values():
        for a, b in _matches(group, baseline, tolerance):
            metrics = [("metric", a.metric)] + ([(RATIO, RATIO)] if a.chooses_ratio or b.chooses_ratio else [])
            for column, metric in metrics:
                both = pd.merge(a.values[[column]], b.values[[column]], left_index=True, right_index=True, suffixes=("_a", "_b")).dropna()
                both = both.sort_index(key=lambda s: s.astype(str))
                identity = "|".join((a.key, b.key, metric))
                stats_row = paired_test(
                    both[f"{column}_a"], both[f"{column}_b"], confidence=confidence, seed=seed + zlib.crc32(identity.encode())
                )
                rows.append(
                    {
                        "method_a": a.name,
                        "method_b": b.name,
                        "model": a.model,
                        "task": a.task,
                        "setting": _setting_cell(a, b, tolerance),
                        "metric": metric,
                        **stats_row,
                        "key_a": a.key,
                        "key_b": b.key,
                        "setting_a": a.setting,
                        "setting_b": b.setting,
                        "pairing": "seed" if a.setting == b.setting else "equal ratio",
                    }
                )
    table = pd.DataFrame(rows, columns=[c for c in COLUMNS if c not in ("p_holm", "verdict")] + extra)
    table["p_holm"] = holm(table["p_value"]) if len(table) else pd.Series(dtype=float)
    table["verdict"] = [_verdict(row, alpha) for _, row in table.iterrows()]
    table["n_pairs"] = table["n_pairs"].astype(int)
    # the main metric first, then same-setting pairs before equal-ratio ones
    table = table.assign(_ratio=table["metric"] == RATIO, _cross=table["pairing"] != "seed")
    order = ["model", "task", "_ratio", "_cross", "setting", "method_a", "method_b"]
    table = table.sort_values(order, key=lambda c: c if c.name.startswith("_") else c.astype(str), kind="stable")
    table = table.reset_index(drop=True)
    return table[list(COLUMNS) + extra]


def _verdict(row: pd.Series, alpha: float) -> str:
    if row["n_pairs"] < MIN_PAIRS or not math.isfinite(row["p_holm"]):
        return "not_enough_pairs"
    excludes_zero = row["ci_low"] > 0 or row["ci_high"] < 0
    if row["p_holm"] < alpha and excludes_zero:
        return "a_better" if row["mean_diff"] > 0 else "b_better"
    return "no_detectable_difference"


def write(
    dirs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str] | None = None,
    *,
    baseline: str | None = None,
    tolerance: float = 0.10,
    alpha: float = 0.05,
    seed: int = 0,
) -> Path:
    """Collect the runs below ``dirs`` and write ``comparisons.csv`` into ``out``.

    Args:
        dirs: folders searched for runs.
        out: output folder (default: the first of ``dirs``); created if missing.
        baseline: see :func:`compare`.
        tolerance: see :func:`compare`.
        alpha: see :func:`compare`.
        seed: see :func:`compare`.

    Returns:
        The path of ``comparisons.csv``.
    """
    runs, _ = collect(dirs)
    table = compare(runs, baseline=baseline, tolerance=tolerance, alpha=alpha, seed=seed)
    folder = Path(out if out is not None else dirs[0])
    folder.mkdir(parents=True, exist_ok=True)
    return write_csv(table[list(COLUMNS)], folder / "comparisons.csv")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m slope_bench.compare DIR... [--baseline METHOD] [--out OUT]``."""
    parser = argparse.ArgumentParser(prog="python -m slope_bench.compare", description="Paired comparisons of methods -> comparisons.csv.")
    parser.add_argument("dirs", nargs="+", help="folders searched recursively for results.json")
    parser.add_argument("--baseline", default=None, help="compare every method against this one only")
    parser.add_argument("--out", default=None, help="output folder (default: the first DIR)")
    parser.add_argument("--tolerance", type=float, default=0.10, help="equal-ratio pairing across settings: max/min - 1 (default 0.10)")
    parser.add_argument("--alpha", type=float, default=0.05, help="family-wise error rate of the verdicts (default 0.05)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and permutation resampling")
    args = parser.parse_args(argv)
    missing = [d for d in args.dirs if not Path(d).is_dir()]
    if missing:
        print(f"compare: not a folder: {' '.join(missing)}", file=sys.stderr)
        return 2
    if not 0 <= args.tolerance < 10 or not 0 < args.alpha < 1:
        print("compare: --tolerance must be in [0, 10) and --alpha in (0, 1)", file=sys.stderr)
        return 2
    runs, problems = collect(args.dirs)
    if args.baseline is not None and args.baseline not in set(runs["method"].astype(str)):
        methods = ", ".join(sorted(set(runs["method"].astype(str)))) or "none"
        print(f"compare: --baseline {args.baseline!r} has no completed runs; methods found: {methods}", file=sys.stderr)
        return 2
    table = compare(runs, baseline=args.baseline, tolerance=args.tolerance, alpha=args.alpha, seed=args.seed)
    folder = Path(args.out if args.out is not None else args.dirs[0])
    folder.mkdir(parents=True, exist_ok=True)
    path = write_csv(table[list(COLUMNS)], folder / "comparisons.csv")
    counts = table["verdict"].value_counts()
    print(f"compare: {len(runs)} runs ({len(problems)} not counted), {len(table)} comparisons -> {path}")
    print("  " + ", ".join(f"{v}: {int(counts.get(v, 0))}" for v in VERDICTS))
    for _, row in table[table["verdict"].isin(("a_better", "b_better"))].iterrows():
        winner, loser = (row["method_a"], row["method_b"]) if row["verdict"] == "a_better" else (row["method_b"], row["method_a"])
        print(
            f"  {row['model']} / {row['task']} / {row['setting']}: {winner} > {loser} on {row['metric']} "
            f"by {abs(row['mean_diff']):.4g} (95% CI {row['ci_low']:.4g} .. {row['ci_high']:.4g}, p_holm {row['p_holm']:.3g}, n={row['n_pairs']})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
