"""Equal tuning budget on validation data: every method gets the same number of trials.

Each ``conf/method/*.yaml`` declares its search space under ``search`` in the Optuna
sweeper's syntax (compression knobs such as N:M and bits are held fixed)::

    search:
      lam: tag(log, interval(0.1, 10.0))
      sr_ste_decay: tag(log, interval(1.0e-5, 1.0e-3))

:func:`tune` runs ``trials`` trials of one method at one setting with Optuna's seeded
TPE sampler (ask-and-tell), scores each finished run by its **validation** main metric
only, and :func:`select` picks the configuration: the best ``val/<main>``, or — for
methods that choose their own compression (CoDeQ, SQS) — the best among the trials whose
whole-model ratio lies within ``tolerance`` of a target ratio (the nearest ratio when
none does). Test metrics are never read. A method without a search space runs its
defaults once, and the tables say so. ``hparams_search=tune`` is the same search as a
Hydra multirun for one method.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf

from slope_bench.errors import ConfigError
from slope_bench.utils import CONF_DIR


def search_space(method: str) -> dict[str, str]:
    """``{knob: sweep expression}`` declared under ``search`` in ``conf/method/<method>.yaml``."""
    node = OmegaConf.load(CONF_DIR / "method" / f"{method}.yaml")
    space = node.get("search")
    if not space:
        return {}
    return {str(k): str(v) for k, v in OmegaConf.to_container(space).items()}


def distributions(space: dict[str, str]) -> dict[str, Any]:
    """Optuna distributions of a search space (parsed as Hydra's Optuna sweeper does).

    Raises:
        ConfigError: naming ``method.search`` for an expression that does not parse.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override

    parser = OverridesParser.create()
    out = {}
    for knob, expression in space.items():
        try:
            override = parser.parse_overrides([f"method.{knob}={expression}"])[0]
            out[knob] = create_optuna_distribution_from_override(override)
        except Exception as e:
            raise ConfigError(f"method.search.{knob}", expression, f"an Optuna sweep expression ({str(e).splitlines()[0]})") from None
    return out


def metric_of(results: dict, split: str = "val") -> float | None:
    """``<split>/<main metric>`` of a finished run, ``None`` when it is missing or not finite."""
    value = results.get(f"{split}/{results.get('main_metric', 'top1')}")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def tunable(results: dict) -> bool:
    """A finished (``status: ok``) run that recorded its validation metric."""
    return results.get("status") == "ok" and metric_of(results, "val") is not None


def select(trials: list[dict], target_ratio: float | None = None, tolerance: float = 0.1) -> dict | None:
    """The chosen trial: best validation main metric (ties: the earlier trial).

    With ``target_ratio``, only trials whose ``compress/ratio`` is within ``tolerance``
    (relative) of it compete; when none is, the trial with the nearest ratio is chosen.
    Runs that are not :func:`tunable` never compete (they are "not tunable"); test
    metrics are never read.
    """
    candidates = [t for t in trials if tunable(t)]
    if not candidates:
        return None
    if target_ratio is not None:
        near = [t for t in candidates if abs(t["compress/ratio"] / target_ratio - 1) <= tolerance]
        if not near:
            return min(candidates, key=lambda t: abs(math.log(t["compress/ratio"] / target_ratio)))
        candidates = near
    best = max(metric_of(t) for t in candidates)
    return next(t for t in candidates if metric_of(t) == best)


@dataclass
class Tuned:
    """The outcome of :func:`tune`: the chosen overrides, its trial results and all trials."""

    overrides: list[str]
    chosen: dict | None
    trials: list[dict] = field(default_factory=list)
    searched: bool = True


def tune(
    method: str,
    run_trial: Callable[[int, list[str]], dict],
    trials: int,
    seed: int = 0,
    target_ratio: float | None = None,
    tolerance: float = 0.1,
) -> Tuned:
    """Run ``trials`` trials of ``method`` and choose on validation data.

    Args:
        method: a ``conf/method/*.yaml`` name.
        run_trial: ``(trial number, overrides) -> results`` (runs one configuration at the
            tuning seed and returns its results dict, ``status: failed`` included).
        trials: the budget, the same for every method.
        seed: the sampler's seed.
        target_ratio: see :func:`select`.
        tolerance: see :func:`select`.

    Returns:
        A :class:`Tuned`; a method without a search space runs its defaults once.
    """
    import optuna

    space = search_space(method)
    if not space:
        result = run_trial(0, [])
        return Tuned([], result if tunable(result) else None, [result], searched=False)
    dists = distributions(space)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    records = []
    for number in range(trials):
        trial = study.ask(dists)
        overrides = [f"method.{k}={v}" for k, v in trial.params.items()]
        result = run_trial(number, overrides)
        result = {**result, "tune/overrides": overrides}
        records.append(result)
        value = metric_of(result) if tunable(result) else None
        if value is None:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        elif target_ratio is not None:  # ratio-matched methods: off-target trials score lower, so TPE steers to the target
            miss = abs(math.log(result["compress/ratio"] / target_ratio))
            study.tell(trial, value - max(0.0, miss - math.log1p(tolerance)))
        else:
            study.tell(trial, value)
    chosen = select(records, target_ratio, tolerance)
    return Tuned(list(chosen["tune/overrides"]) if chosen else [], chosen, records)
