"""From a finalized model to its record: ``results.json``, artifacts, W&B, console.

:func:`record` measures the finalized model (every number from its tensors), assembles
the flat ``results.json`` (keys ``stage/name``, see DESIGN.md), writes the run-dir
artifacts (``finalized.safetensors``, ``model.packed.safetensors``) and the results
atomically. :func:`record_failure` leaves a ``status: failed`` record for a run that
did not finish; :func:`objectives` is what a sweeper optimises.
"""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from slope_bench.coded import export_coded
from slope_bench.distributed import is_global_zero
from slope_bench.export import export_packed, positive_zeros
from slope_bench.lit import Fit
from slope_bench.methods.base import Compressor, Finalized
from slope_bench.metrics import measure
from slope_bench.references import Reference, config_id
from slope_bench.utils import atomic_write_bytes, atomic_write_json, save_state


def record(
    cfg: DictConfig,
    task,
    model: nn.Module,
    compressor: Compressor,
    finalized: Finalized,
    skipped: dict[str, str],
    references: dict[str, torch.Tensor],
    dense: Reference,
    control: Reference,
    fitted: Fit,
    epochs: int,
    dense_val: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Measure the finalized ``model``, write the run's artifacts and ``results.json``.

    Args:
        cfg: the run's config.
        task: the task (evaluator, example input).
        model: the finalized model (eval mode).
        compressor: the method (its name and setting).
        finalized: what ``finalize`` returned.
        skipped: layers the method does not support (name → reason): kept dense and
            listed in ``layers`` with ``pattern: dense`` and the reason.
        references: full-precision weights of the targets before compression (SQNR).
        dense: the dense reference.
        control: the dense fine-tune control.
        fitted: the compression fit.
        epochs: its budget.
        dense_val: validation metrics of the dense reference.

    Returns:
        The results dict (also written to ``<output_dir>/results.json``).
    """
    out_dir = Path(cfg.paths.output_dir)
    with torch.no_grad():  # -0.0 -> +0.0 (same model): zeros need no sign bit in the packed file
        for name in finalized.specs:
            weight = model.get_submodule(name).weight
            weight.copy_(positive_zeros(weight))
    main = task.main_metric
    test = task.evaluate(model)
    val = task.evaluate(model, "val")
    report = measure(model, finalized.specs, task.example_input(), references)
    layers = report.pop("layers")
    for layer in layers:
        layer.update(finalized.layer_extras.get(layer["name"], {}))
    layers += [skipped_record(name, model.get_submodule(name), reason) for name, reason in skipped.items()]
    results: dict[str, Any] = {
        "method": compressor.name,
        "model": cfg.model.name,
        "task": cfg.task.name,
        "seed": cfg.seed,
        "setting": compressor.setting(),
        "status": "ok",
        "main_metric": main,
        "model_width": cfg.model.get("width"),
        "input/num_classes": task.num_classes,
        "input/in_chans": task.in_chans,
        "input/image_size": task.image_size,
        "config_id": config_id(cfg),
        "method_config": {k: v for k, v in OmegaConf.to_container(cfg.method, resolve=True).items() if k != "_target_"},
    }
    results.update({f"test/{k}": v for k, v in test.items()})
    results.update({f"test/{k}_dense": v for k, v in dense.metrics.items()})
    results.update({f"test/{k}_dense_ft": v for k, v in control.metrics.items()})
    results["test/retention"] = test[main] / dense.metrics[main] if dense.metrics[main] else None
    results.update({f"val/{k}": v for k, v in val.items()})
    results.update({f"val/{k}_dense": v for k, v in (dense_val or {}).items()})
    results["data/corrupt_images"] = len(getattr(task, "corrupt_images", []) or [])
    if finalized.samples and hasattr(task, "logits"):  # Bayesian averaging of logits (classification)
        results.update({f"test/{k}_bayes_avg": v for k, v in evaluate_ensemble(model, task, finalized.samples).items()})
    results.update(report)
    results.update(finalized.results)
    results.update(
        {
            "time/fit_s": fitted.fit_s,
            "time/step_ms": fitted.step_ms,
            "time/step_ms_dense": control.step_ms,
            "train/steps_dense_ft": control.steps,
            "train/steps_dense": dense.steps,
            "train/epochs": epochs,
            "train/steps": fitted.steps,
            "train/dense_epochs": cfg.dense.epochs,
            "train/loss_first": fitted.loss_first,
            "train/loss_last": fitted.loss_last,
        }
    )
    reason = divergence(cfg, task, fitted, test[main], dense.metrics[main])
    if reason:
        results["status"], results["diverged"] = "diverged", reason
    results.update({f"paper/{k}": v for k, v in (cfg.get("paper") or {}).items()})
    state = model.state_dict()
    save_state(out_dir / "finalized.safetensors", state, metadata={"method": compressor.name, "model": cfg.model.name})
    results.update(export_packed(state, finalized.specs, out_dir))  # the real artifact, verified on write
    results.update(export_coded(state, finalized.specs, out_dir, dense_bytes=results["compress/dense_bytes"]))  # its entropy-coded twin
    results["layers"] = layers
    atomic_write_json(out_dir / "results.json", results)
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)  # resume points are kept only until the run is recorded
    return results


def divergence(cfg: DictConfig, task, fitted: Fit, metric: float | None, dense_metric: float | None) -> str | None:
    """Why a fine-tune that finished counts as diverged (``None`` when it does not).

    Two rules (``divergence`` in the config): its mean task loss over the last steps ends
    above ``loss_factor`` × that over the first steps, or (``at_chance``) the compressed
    model scores at chance (within 0.02 of ``1/num_classes`` for top-1, of 0 for other
    metrics) while the dense reference is at least 0.1 above chance.
    """
    rules = cfg.get("divergence")
    if rules is None:
        return None
    if fitted.loss_first and fitted.loss_last is not None and fitted.loss_last > rules.loss_factor * fitted.loss_first:
        return f"fine-tune loss ended at {fitted.loss_last:.4g}, above {rules.loss_factor}x its start ({fitted.loss_first:.4g})"
    chance = 1.0 / task.num_classes if task.main_metric == "top1" else 0.0
    if rules.at_chance and metric is not None and dense_metric is not None and metric <= chance + 0.02 and dense_metric >= chance + 0.1:
        return f"compressed {task.main_metric} {metric:.4f} is at chance ({chance:.4f}) while the dense reference has {dense_metric:.4f}"
    return None


def skipped_record(name: str, module: nn.Module, reason: str) -> dict[str, Any]:
    """The ``layers`` record of a layer the method does not support (kept dense, fp32)."""
    weight = module.weight.detach()
    return {
        "name": name,
        "shape": list(weight.shape),
        "pattern": "dense",
        "w_bits": 32,
        "granularity": "none",
        "sparsity": float((weight == 0).double().mean()),
        "levels": None,
        "sqnr_db": None,
        "numel": weight.numel(),
        "skipped": reason,
    }


def evaluate_ensemble(model: nn.Module, task, samples: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Main metric of the mean logits of sampled networks (Bayesian averaging)."""
    keep = {n: model.get_submodule(n).weight.detach().clone() for n in samples[0]}
    total, targets = None, None
    for weights in samples:
        for n, w in weights.items():
            model.get_submodule(n).weight.data.copy_(w)
        logits, targets = task.logits(model, task.test_dataloader())
        total = logits if total is None else total + logits
    for n, w in keep.items():
        model.get_submodule(n).weight.data.copy_(w)
    return task.score(total / len(samples), targets)


def make_logger(cfg: DictConfig):
    """The run's logger, or ``None``. A W&B logger gets a run id kept in the run dir
    (``wandb_id.txt``) and ``resume="allow"``, so a resumed job is the same W&B run."""
    import hydra

    if not cfg.get("logger"):
        return None
    if str(cfg.logger.get("_target_", "")).endswith("WandbLogger"):
        id_file = Path(cfg.paths.output_dir) / "wandb_id.txt"
        if cfg.get("resume", False) and id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            run_id = secrets.token_hex(4)  # W&B run ids: 8 characters of [a-z0-9]
            if is_global_zero():  # the other ranks of a DDP run log nothing
                atomic_write_bytes(id_file, (run_id + "\n").encode())
        logger = hydra.utils.instantiate(cfg.logger, id=run_id, resume="allow")
        # Lightning always passes wandb.init(anonymous=None), and wandb >= 0.19 warns on any
        # value ("The anonymous setting has no effect"): leave the key out unless it was set.
        init = getattr(logger, "_wandb_init", None)
        if isinstance(init, dict) and init.get("anonymous") is None:
            init.pop("anonymous", None)
        return logger
    return hydra.utils.instantiate(cfg.logger)


def log_results(logger, cfg: DictConfig, results: dict) -> None:
    """Config, results summary and the per-layer table to the run's logger."""
    flat = {k: v for k, v in results.items() if k != "layers"}
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    experiment = getattr(logger, "experiment", None)
    if hasattr(experiment, "summary"):  # W&B
        import wandb

        experiment.summary.update({k: v for k, v in flat.items() if v is not None})
        experiment.tags = tuple(experiment.tags or ()) + (results["setting"],)
        if results["layers"]:
            cols = list(dict.fromkeys(k for r in results["layers"] for k in r))
            experiment.log(
                {
                    "layers": wandb.Table(
                        columns=cols,
                        data=[[str(r.get(c)) if isinstance(r.get(c), list) else r.get(c) for c in cols] for r in results["layers"]],
                    )
                }
            )
        experiment.finish()
    else:
        logger.log_metrics({k: v for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        logger.save()


def print_summary(results: dict) -> None:
    """A short table of the headline numbers."""
    from rich.console import Console
    from rich.table import Table

    main = results["main_metric"]

    def fmt(v, spec=".4f"):
        return "—" if v is None else format(v, spec)

    table = Table(title=f"{results['method']} · {results['model']} · {results['task']} · {results['setting']} · seed {results['seed']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        (f"test/{main}", fmt(results.get(f"test/{main}"))),
        (f"test/{main}_dense", fmt(results.get(f"test/{main}_dense"))),
        (f"test/{main}_dense_ft", fmt(results.get(f"test/{main}_dense_ft"))),
        ("test/retention", fmt(results.get("test/retention"))),
        (f"val/{main}", fmt(results.get(f"val/{main}"))),
        ("compress/ratio (whole model)", fmt(results.get("compress/ratio"), ".2f") + "×"),
        ("compress/ratio_nominal (paper)", fmt(results.get("compress/ratio_nominal"), ".2f") + "×"),
        ("compress/measured_ratio (file)", fmt(results.get("compress/measured_ratio"), ".2f") + "×"),
        ("compress/bits_per_weight", fmt(results.get("compress/bits_per_weight"), ".3f")),
        ("compress/sparsity", fmt(results.get("compress/sparsity"), ".3f")),
        ("compress/bops_ratio", fmt(results.get("compress/bops_ratio"), ".4f")),
        ("time/step_ms vs dense", f"{fmt(results.get('time/step_ms'), '.1f')} / {fmt(results.get('time/step_ms_dense'), '.1f')}"),
    ]
    if results.get("compress/coded_ratio") is not None:
        rows.insert(7, ("compress/coded_ratio (stored)", fmt(results.get("compress/coded_ratio"), ".2f") + "×"))
    for k in sorted(results):
        if k.endswith("_bayes_avg"):
            rows.insert(3, (k, fmt(results[k])))
    for row in rows:
        table.add_row(*row)
    Console(stderr=False).print(table)
    if results.get("status") == "diverged":
        print(f"warning: recorded as diverged: {results['diverged']}")


def record_failure(cfg: DictConfig, error: BaseException) -> None:
    """A failed run still leaves a ``results.json`` (``status: failed``) for the leaderboard,
    with the root cause's one line as its ``error``."""
    try:
        identity = {"method": cfg.method.name, "model": cfg.model.name, "task": cfg.task.name, "seed": cfg.seed}
    except Exception:
        identity = {}
    out = {**identity, "status": "failed", "error": error_line(error)}
    atomic_write_json(Path(cfg.paths.output_dir) / "results.json", out)


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception of a chain (Hydra wraps the real error in its own); a
    ``raise ... from None`` ends the chain where it was written."""
    seen = {id(error)}
    while True:
        inner = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        if inner is None or id(inner) in seen:
            return error
        seen.add(id(inner))
        error = inner


def error_line(error: BaseException) -> str:
    """``Type: message`` of the root cause, first line only."""
    cause = root_cause(error)
    text = str(cause).strip()
    return f"{type(cause).__name__}: {text}".splitlines()[0] if text else type(cause).__name__


def objectives(cfg: DictConfig, results: dict) -> float | tuple | None:
    """What a sweeper optimises: ``cfg.objectives`` lists result keys (a tuple for several;
    ``val/main`` is the task's main validation metric, the default). Test metrics are never
    an objective (:func:`slope_bench.validate.validate` refuses them)."""
    main = f"val/{results['main_metric']}"
    keys = [main if k == "val/main" else k for k in (cfg.get("objectives") or ["val/main"])]
    values = tuple(float(results.get(k) or 0.0) for k in keys)
    return values if len(values) > 1 else values[0]
