"""Collect every ``results.json`` below some folders: the runs to pool, and the problems.

:func:`collect` reads the runs and sorts out the ones that must not be pooled:

* ``failed`` (``status: failed``), ``diverged`` (``status: diverged``: figures kept in the
  error line, never ranked), ``broken`` (unreadable JSON), ``incomplete`` (no main metric,
  a non-finite ``stage/name`` number such as ``compress/ratio: Infinity``, an unknown
  status, or a Hydra run dir without ``results.json``);
* ``duplicate``: a second run of the same ``(config_id, seed)`` (without ``config_id``: the
  same identity and seed) is listed once as a problem, with a :class:`DuplicateRunWarning`
  naming both folders, and never counted twice.

:func:`group_keys` / :func:`comparison_keys` say which runs are seeds of one setting and
which settings are compared; :func:`slope_bench.aggregate.aggregate` turns the runs into one
row per setting; :func:`write_csv` writes a table that is safe to open in a spreadsheet.
"""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

RESULTS_FILE = "results.json"
IDENTITY_KEYS = ("method", "model", "task", "setting")
REQUIRED_KEYS = ("method",)
METRIC_FALLBACKS = ("top1", "bbox_map")
PROBLEM_COLUMNS = ("status", "method", "model", "task", "seed", "setting", "path", "error")
# Characters that make a spreadsheet read a cell as a formula (OWASP "CSV injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


class DuplicateRunWarning(UserWarning):
    """Two run folders hold the same ``(config_id, seed)``: only the first is counted."""


# --------------------------------------------------------------------------- reading


def error_line(text: Any, limit: int = 300) -> str:
    """The last non-empty line of an error text (a traceback ends with the message)."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    line = lines[-1] if lines else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _main_metric(record: dict[str, Any]) -> str | None:
    """Name of the main metric: ``main_metric`` if given, else ``top1``, else ``bbox_map``."""
    name = record.get("main_metric")
    if isinstance(name, str) and name:
        return name.removeprefix("test/")
    return next((name for name in METRIC_FALLBACKS if f"test/{name}" in record), None)


def _number(value: Any) -> float | None:
    """A float for numbers (bools excluded, non-finite kept), else None."""
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
                return error_line(line)
    return ""


def _walk(dirs: Iterable[str | os.PathLike[str]]) -> tuple[list[Path], list[Path]]:
    """``results.json`` files and Hydra run dirs without one, each listed once, sorted."""
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
    return sorted(results), sorted(unfinished)


def _problem(status: str, path: Path | str, error: str, identity: dict[str, Any]) -> dict[str, Any]:
    row = {key: identity.get(key) for key in PROBLEM_COLUMNS if key in identity}
    row.update(status=status, path=str(path), error=error)
    return row


def _non_finite(record: dict[str, Any]) -> list[str]:
    """``"<key> is inf"`` for every ``stage/name`` number that is not finite."""
    found = []
    for key, value in record.items():
        number = _number(value)
        if "/" in key and number is not None and not math.isfinite(number):
            found.append(f"{key} is {number}")
    return found


def _diverged_line(record: dict[str, Any], name: str | None) -> str:
    """Why a run diverged plus the figures it kept, on one line."""
    reason = error_line(record.get("diverged") or record.get("error") or record.get("reason") or "") or "fine-tune diverged"
    figures = [(name or "metric", record.get(f"test/{name}")), ("ratio", record.get("compress/ratio"))]
    shown = ", ".join(f"{label} {value:.4g}" for label, value in figures if _number(value) is not None)
    return f"{reason} ({shown})" if shown else reason


def _read(path: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """``(row, None)`` for a run that may be pooled, else ``(None, problem)``."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return None, _problem("broken", path, error_line(f"unreadable {RESULTS_FILE}: {error}"), {})
    if not isinstance(record, dict):
        return None, _problem("broken", path, f"{RESULTS_FILE} holds a {type(record).__name__}, not an object", {})
    identity = _identity(record)
    status = record.get("status")
    name = _main_metric(record)
    metric = _number(record.get(f"test/{name}")) if name else None
    if status == "failed":
        return None, _problem("failed", path, error_line(record.get("error", "")) or "failed (no error recorded)", identity)
    if status == "diverged":
        return None, _problem("diverged", path, _diverged_line(record, name), identity)
    missing = [key for key in REQUIRED_KEYS if not record.get(key)]
    if metric is None:
        missing.append(f"test/{name}" if name else "test/<main metric>")
    reasons = [f"missing keys: {', '.join(missing)}"] if missing else []
    reasons += _non_finite(record)
    if status not in (None, "ok"):
        reasons.insert(0, f"status {status!r}")
    if reasons:
        return None, _problem("incomplete", path, error_line(record.get("error", "")) or "; ".join(reasons), identity)
    row = {k: v for k, v in record.items() if isinstance(v, (str, int, float, bool)) or v is None}
    layers = record.get("layers")
    row.update(
        status="ok",
        metric_name=name,
        metric=metric,
        metric_dense=_number(record.get(f"test/{name}_dense")),
        metric_dense_ft=_number(record.get(f"test/{name}_dense_ft")),
        path=str(path),
        run_dir=str(path.parent),
        layers=[layer for layer in layers if isinstance(layer, dict)] if isinstance(layers, list) else [],
        method_config=record.get("method_config") if isinstance(record.get("method_config"), dict) else None,
    )
    return row, None


def _drop_duplicates(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Keep the first run (path order) of each ``(config_id, seed)``; the others are problems."""
    kept: dict[tuple, dict[str, Any]] = {}
    problems = []
    for row in rows:
        if row.get("config_id"):
            key: tuple = ("config_id", str(row["config_id"]), str(row.get("seed")))
            what = f"config_id {row['config_id']}, seed {row.get('seed')}"
        else:
            identity = {k: v for k, v in _identity(row).items()}
            key = ("identity", json.dumps(identity, sort_keys=True, default=str))
            what = f"no config_id; same method, model, task, setting and seed {row.get('seed')}"
        first = kept.setdefault(key, row)
        if first is row:
            continue
        message = f"duplicate of {first['run_dir']} ({what}): counted once"
        warnings.warn(f"{row['run_dir']} is a {message}", DuplicateRunWarning, stacklevel=3)
        problems.append(_problem("duplicate", row["run_dir"], message, _identity(row)))
    return list(kept.values()), problems


def collect(dirs: Sequence[str | os.PathLike[str]]) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Read every run below ``dirs``.

    Args:
        dirs: folders searched recursively for ``results.json`` files and for Hydra run
            dirs (a ``.hydra/`` folder) that have none.

    Returns:
        ``(runs, problems)``: ``runs`` has one row per completed run with its scalar
        results keys, ``metric_name`` / ``metric`` / ``metric_dense`` / ``metric_dense_ft``
        (the main metric under one name), ``path``, ``run_dir``, ``layers`` (the list of
        layer records), ``setting_base`` (the recorded setting) and ``config_label`` (see
        :func:`label_configurations`); ``problems`` lists failed, diverged, broken,
        incomplete and duplicate runs as dicts with ``status``, ``path``, ``error`` and
        whatever identity keys are known, sorted by status then path.
    """
    result_files, unfinished = _walk(dirs)
    rows: list[dict[str, Any]] = []
    problems: list[dict[str, Any]] = []
    for path in result_files:
        row, problem = _read(path)
        if row is not None:
            rows.append(row)
        else:
            problems.append(problem)
    rows, duplicates = _drop_duplicates(rows)
    problems += duplicates
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
        order = ["model", "task", "method", "setting", "seed", "path"]
        runs = runs.sort_values(order, key=lambda c: c.astype(str), kind="stable").reset_index(drop=True)
    problems.sort(key=lambda p: (p["status"], p["path"]))
    return runs, problems


def label_configurations(runs: pd.DataFrame) -> pd.DataFrame:
    """Keep different configurations of one setting apart.

    Runs that share method, model, task and ``setting`` but not ``config_id`` (e.g. a
    sweep of CoDeQ's ``sparsity_decay``, which does not change the ``w4`` setting name)
    are not seeds of one setting: their ``config_label`` names the method knobs that
    differ (``"sparsity_decay=2"``, or ``"config <id>"`` when no method knob differs) and
    their ``setting`` becomes ``"unstructured w4 (sparsity_decay=2)"``. ``setting_base``
    keeps the recorded setting (paired comparisons pair on it). Runs without a
    ``config_id`` (older results) are left as they are.
    """
    runs = runs.copy()
    runs["setting_base"] = runs["setting"] if "setting" in runs else pd.Series(dtype=object)
    runs["config_label"] = ""
    if runs.empty or "config_id" not in runs:
        return runs
    for _, group in runs.groupby(group_keys(runs), dropna=False, sort=False):
        ids = group["config_id"].dropna().unique()
        if len(ids) < 2:
            continue
        configs = [c for c in group["method_config"] if isinstance(c, dict)] if "method_config" in group else []
        keys = {k for c in configs for k in c} - {"name"}
        varying = sorted(k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1)
        labels: dict[str, str] = {}
        for _, row in group.drop_duplicates("config_id").iterrows():
            if not pd.isna(row["config_id"]):
                config = row.get("method_config") if isinstance(row.get("method_config"), dict) else {}
                labels[row["config_id"]] = ", ".join(f"{k}={config.get(k)}" for k in varying)
        taken = list(labels.values())
        for cid, label in labels.items():  # knobs alone do not tell these apart: add the id
            if not label or taken.count(label) > 1:
                labels[cid] = ", ".join(filter(None, (label, f"config {str(cid)[:6]}")))
        for index, row in group.iterrows():
            if not pd.isna(row["config_id"]):
                runs.at[index, "config_label"] = labels[row["config_id"]]
                runs.at[index, "setting"] = f"{row['setting']} ({labels[row['config_id']]})"
    return runs


# --------------------------------------------------------------------------- keys


def group_keys(df: pd.DataFrame) -> list[str]:
    """Keys that identify one setting: method, model, task, setting, ``model_*``, metric name."""
    model_keys = sorted(c for c in df.columns if c.startswith("model_"))
    return list(IDENTITY_KEYS) + model_keys + ["metric_name"]


def comparison_keys(df: pd.DataFrame) -> list[str]:
    """Keys of the groups whose settings are compared (rank, ties, Pareto front)."""
    return [k for k in group_keys(df) if k not in ("method", "setting")]


# --------------------------------------------------------------------------- csv


def spreadsheet_safe(value: Any) -> Any:
    """``value`` with a leading ``'`` when it is text a spreadsheet would run as a formula.

    Text starting with ``= + - @``, a tab or a carriage return is neutralised the way
    spreadsheet-safe writers do; numbers (and everything that is not ``str``) are returned
    unchanged, so negative numbers stay numbers.
    """
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def write_csv(frame: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write ``frame`` (no index) with every text cell and header :func:`spreadsheet_safe`.

    Text cells are quoted (numbers are not), so a carriage return or newline inside a cell
    never splits a row.
    """
    safe = frame.copy()
    for column in safe.columns:
        if safe[column].dtype == object or pd.api.types.is_string_dtype(safe[column].dtype):
            safe[column] = safe[column].map(spreadsheet_safe).astype(object)
    safe.columns = [spreadsheet_safe(str(c)) for c in safe.columns]
    safe.to_csv(path, index=False, quoting=csv.QUOTE_NONNUMERIC)
    return Path(path)
