"""One run, top to bottom: instantiate → dense reference → compress → measure → record.

``run(cfg)`` returns the results dict (also written to ``results.json``), so tests call
it directly; ``run.py`` is the Hydra entry point around it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from slope_bench.errors import ConfigError
from slope_bench.export import export_packed, positive_zeros
from slope_bench.lit import DivergenceError, LitCompress, StepTimer, barrier, broadcast_object, is_global_zero
from slope_bench.methods.base import Compressor
from slope_bench.metrics import measure
from slope_bench.models import target_names
from slope_bench.utils import atomic_write_json, load_state_file, save_state, stable_hash

log = logging.getLogger("slope_bench")
METHOD_RESERVED = ("name", "epochs")
MODEL_RESERVED = ("name", "dense_lr", "finetune_lr")  # a model's own recipe (read by conf/config.yaml), not constructor arguments
CACHE_VERSION = 1


# ---------------------------------------------------------------------------- building
def build(group: str, node: DictConfig, drop: tuple[str, ...] = (), **kwargs: Any) -> Any:
    """Instantiate a config group (minus the ``drop`` keys); a ConfigError is re-raised
    with the group's prefix (``method.w_bits``)."""
    if drop:
        spec = OmegaConf.to_container(node, resolve=True)
        node = OmegaConf.create({k: v for k, v in spec.items() if k not in drop})
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except ConfigError as e:
        raise e.within(group) from None
    except hydra.errors.InstantiationException as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__
        if isinstance(cause, ConfigError):
            raise cause.within(group) from None
        raise


def build_method(node: DictConfig) -> tuple[str, int | None, Compressor]:
    """(name, epochs override, compressor) from a ``conf/method/*.yaml`` node."""
    name, epochs = node.name, node.get("epochs")
    if epochs is not None and (not isinstance(epochs, int) or epochs < 0):
        raise ConfigError("method.epochs", epochs, "null or an integer >= 0")
    return name, epochs, build("method", node, drop=METHOD_RESERVED)


# ---------------------------------------------------------------------------- training
@dataclass
class Fit:
    fit_s: float
    step_ms: float | None
    steps: int


def fit(
    model,
    task,
    compressor: Compressor,
    epochs: int,
    lr: float,
    cfg: DictConfig,
    logger=None,
    tag: str = "train",
    checkpoint: str | None = None,
) -> Fit:
    """Train ``model`` for ``epochs`` at peak ``lr`` with the run's optimizer, schedule and trainer.

    With ``checkpoint`` set, ``<run dir>/checkpoints/<checkpoint>/last.ckpt`` is written
    after every epoch, and ``resume=true`` continues from it (loaded with ``weights_only=True``).
    """
    if epochs == 0:
        return Fit(0.0, None, 0)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # a fit's randomness must not depend on which earlier fits were cache hits
    timer = StepTimer()
    callbacks: list[pl.Callback] = [timer]
    ckpt_path = None
    if checkpoint is not None:
        from pytorch_lightning.callbacks import ModelCheckpoint

        folder = Path(cfg.paths.output_dir) / "checkpoints" / checkpoint
        # one file, last.ckpt, replaced (atomically) after every epoch
        callbacks.append(
            ModelCheckpoint(folder, "last", save_top_k=1, every_n_epochs=1, save_on_train_epoch_end=True, enable_version_counter=False)
        )
        if cfg.get("resume", False) and (folder / "last.ckpt").is_file():
            ckpt_path = str(folder / "last.ckpt")
            log.info("%s: resuming from %s", tag, ckpt_path)
    lit = LitCompress(
        model,
        task,
        compressor,
        optimizer=hydra.utils.instantiate(cfg.optimizer, lr=lr),
        scheduler=hydra.utils.instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        val_every=cfg.get("val_every", 1),
    )
    trainer = hydra.utils.instantiate(
        cfg.trainer,
        max_epochs=epochs,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        enable_checkpointing=checkpoint is not None,
        default_root_dir=cfg.paths.output_dir,
    )
    log.info("%s: %d epochs", tag, epochs)
    t0 = time.perf_counter()
    try:
        trainer.fit(lit, datamodule=task, ckpt_path=ckpt_path, weights_only=True)
    except DivergenceError as e:
        raise DivergenceError(f"{tag}: {e}") from None
    return Fit(time.perf_counter() - t0, timer.step_ms, int(trainer.global_step))


@dataclass
class Reference:
    state: dict[str, torch.Tensor]
    metrics: dict[str, float]
    step_ms: float | None
    steps: int = 0


def cached_training(cache_file: Path | None, train_fn) -> Reference:
    """Load a trained model from the cache, or train it and cache it.

    The cache is checked and written under ``<file>.lock`` (``flock``), so jobs that need
    the same model at once train it once: the others wait, then load it. The file is
    written atomically and its sha256 kept in the sidecar ``.json``; it is verified before
    the file is parsed, so a truncated or tampered cache is rebuilt, never used. In a
    multi-device run rank 0 checks, loads and writes; every rank takes its decision
    (all ranks train together on a miss) and its weights.
    """
    lead = cache_file is not None and is_global_zero()
    with cache_lock(cache_file) if lead else nullcontext():
        ref = load_cached(cache_file) if lead else None
        if broadcast_object(ref is not None):
            return broadcast_object(ref)
        ref = train_fn()
        if lead:
            save_state(cache_file, ref.state)
            meta = {
                "metrics": ref.metrics,
                "step_ms": ref.step_ms,
                "steps": ref.steps,
                "version": CACHE_VERSION,
                "sha256": file_sha256(cache_file),
            }
            atomic_write_json(cache_file.with_suffix(".json"), meta)
        barrier()
    return ref


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_cached(cache_file: Path) -> Reference | None:
    """The cached model if its weights file matches the sha256 in its sidecar, else None."""
    if not cache_file.is_file():
        return None
    try:
        meta = json.loads(cache_file.with_suffix(".json").read_text())
        digest = file_sha256(cache_file)
        if digest != meta.get("sha256"):
            raise ValueError(f"sha256 {digest[:12]} does not match the recorded {str(meta.get('sha256'))[:12]}")
        state = load_state_file(cache_file)
        log.info("loaded cached model %s", cache_file.name)
        return Reference(state, meta["metrics"], meta.get("step_ms"), meta.get("steps", 0))
    except Exception as e:  # a truncated, tampered or half-written cache is rebuilt, never used
        log.warning("cache %s failed its integrity check (%s): rebuilding", cache_file.name, e)
        return None


@contextmanager
def cache_lock(cache_file: Path) -> Iterator[None]:
    """Exclusive ``flock`` on ``<cache_file>.lock`` (released when the process dies)."""
    lock = cache_file.with_name(cache_file.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def dense_key(cfg: DictConfig) -> dict:
    return {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "task": OmegaConf.to_container(cfg.task, resolve=True),
        "seed": cfg.seed,
        "dense": OmegaConf.to_container(cfg.dense, resolve=True),
        "optimizer": OmegaConf.to_container(cfg.optimizer, resolve=True),
        "version": CACHE_VERSION,
    }


def config_id(cfg: DictConfig) -> str:
    """Hash of everything that decides a run's result except the seed: runs that share it
    are repeats of one setting (the leaderboard pools their seeds, and only theirs)."""
    key = dense_key(cfg)  # model, task, dense recipe, optimizer, version ...
    del key["seed"], key["dense"]["cache"]  # ... minus the seed and where the reference is kept
    key.update(
        {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("method", "finetune", "scheduler", "control") if cfg.get(k) is not None}
    )
    return stable_hash(key)


def cache_path(cfg: DictConfig, kind: str, key: dict) -> Path | None:
    if not cfg.dense.cache:
        return None
    return Path(cfg.paths.cache_dir) / kind / f"{cfg.model.name}-{cfg.task.name}-{stable_hash(key)}.safetensors"


# ---------------------------------------------------------------------------- the run
def run(cfg: DictConfig) -> dict:
    """Run one configuration end to end; returns the results dict."""
    out_dir = Path(cfg.paths.output_dir)
    pl.seed_everything(cfg.seed, workers=True)

    # 1. instantiate everything first: every bad value fails here, before training
    task = build("task", cfg.task, seed=cfg.seed)
    method_name, method_epochs, compressor = build_method(cfg.method)

    def new_model():
        return build(
            "model", cfg.model, drop=MODEL_RESERVED, num_classes=task.num_classes, in_chans=task.in_chans, image_size=task.image_size
        )

    model = new_model()
    compressor.num_train = task.num_train
    n_calib = getattr(compressor, "n_calib", None)
    if n_calib is None:  # methods that do not ask for calibration data get at most 256 images
        n_calib = min(256, compressor.num_train)
    elif n_calib > compressor.num_train:
        raise ConfigError("method.n_calib", n_calib, f"at most the training set size ({compressor.num_train})")
    epochs = cfg.finetune.epochs if method_epochs is None else method_epochs
    if epochs < 0 or cfg.dense.epochs < 0:
        raise ConfigError("finetune.epochs" if epochs < 0 else "dense.epochs", min(epochs, cfg.dense.epochs), "an integer >= 0")
    logger = hydra.utils.instantiate(cfg.logger) if cfg.get("logger") else None
    main = task.main_metric

    # 2. dense reference: trained once and cached (or loaded from pretrained / checkpoint)
    def train_dense() -> Reference:
        dense_model = new_model()
        fitted = fit(dense_model, task, Compressor(), cfg.dense.epochs, cfg.dense.lr, cfg, tag="dense reference", checkpoint="dense")
        return Reference(dense_model.state_dict(), task.evaluate(dense_model) if is_global_zero() else {}, fitted.step_ms, fitted.steps)

    key = dense_key(cfg)
    dense = cached_training(cache_path(cfg, "dense", key), train_dense)
    model.load_state_dict(dense.state)

    # 3. control: the dense model fine-tuned with this run's budget and schedule (cached)
    def train_dense_ft() -> Reference:
        ft_model = new_model()
        ft_model.load_state_dict(dense.state)
        fitted = fit(ft_model, task, Compressor(), epochs, cfg.finetune.lr, cfg, tag="dense fine-tune control", checkpoint="dense_ft")
        return Reference(ft_model.state_dict(), task.evaluate(ft_model) if is_global_zero() else {}, fitted.step_ms, fitted.steps)

    if cfg.control.dense_ft and epochs > 0:
        ft_key = {
            **key,
            "finetune": OmegaConf.to_container(cfg.finetune, resolve=True),
            "finetune_epochs": epochs,
            "scheduler": OmegaConf.to_container(cfg.scheduler, resolve=True),
        }
        dense_ft = cached_training(cache_path(cfg, "dense_ft", ft_key), train_dense_ft)
    else:
        dense_ft = Reference({}, dense.metrics, dense.step_ms, 0)

    # 4. compress: prepare -> fine-tune with the method's penalty/schedule -> finalize
    targets = target_names(model, compressor.compress_first, compressor.compress_classifier)
    references = {n: model.get_submodule(n).weight.detach().clone() for n in targets}
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # same state whether the dense models were trained or loaded
    model = compressor.prepare(model, targets)
    tag = f"{method_name} fine-tune"
    fitted = fit(model, task, compressor, epochs, cfg.finetune.lr, cfg, logger=logger, tag=tag, checkpoint="compress")
    if not is_global_zero():
        return {}  # other ranks of a multi-device run stop here: finalize, measure and record happen once, on rank 0
    calib = task.calib_batches(n_calib, getattr(compressor, "calib_passes", 1)) if n_calib else None
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # finalize's sampling does not depend on how the fit went (resumed or not)
    model = compressor.finalize(model, calib)
    model.eval()
    with torch.no_grad():  # -0.0 -> +0.0 (same model): zeros need no sign bit in the packed file
        for name in compressor.specs:
            weight = model.get_submodule(name).weight
            weight.copy_(positive_zeros(weight))

    # 5. measure, from the finalized tensors
    test = task.evaluate(model)
    report = measure(model, compressor.specs, task.example_input(), references)
    extras = getattr(compressor, "layer_extras", {}) or {}
    for record in report["layers"]:
        record.update(extras.get(record["name"], {}))
    results: dict[str, Any] = {
        "method": method_name,
        "model": cfg.model.name,
        "task": cfg.task.name,
        "seed": cfg.seed,
        "setting": compressor.setting(),
        "status": "ok",
        "main_metric": main,
        "model_width": cfg.model.get("width"),
        "config_id": config_id(cfg),
        "method_config": {k: v for k, v in OmegaConf.to_container(cfg.method, resolve=True).items() if k != "_target_"},
    }
    results.update({f"test/{k}": v for k, v in test.items()})
    results.update({f"test/{k}_dense": v for k, v in dense.metrics.items()})
    results.update({f"test/{k}_dense_ft": v for k, v in dense_ft.metrics.items()})
    results["test/retention"] = test[main] / dense.metrics[main] if dense.metrics[main] else None
    if getattr(compressor, "ensemble", None) and hasattr(task, "logits"):  # Bayesian averaging of logits (classification)
        results.update({f"test/{k}_bayes_avg": v for k, v in evaluate_ensemble(model, task, compressor.ensemble).items()})
    results.update({k: v for k, v in report.items() if k != "layers"})
    results.update(getattr(compressor, "extra_results", {}) or {})
    results.update(
        {
            "time/fit_s": fitted.fit_s,
            "time/step_ms": fitted.step_ms,
            "time/step_ms_dense": dense_ft.step_ms,
            "train/steps_dense_ft": dense_ft.steps,
            "train/steps_dense": dense.steps,
            "train/epochs": epochs,
            "train/steps": fitted.steps,
            "train/dense_epochs": cfg.dense.epochs,
        }
    )
    results.update({f"paper/{k}": v for k, v in (cfg.get("paper") or {}).items()})
    results["layers"] = report["layers"]

    # 6. record
    state = model.state_dict()
    save_state(out_dir / "finalized.safetensors", state, metadata={"method": method_name, "model": cfg.model.name})
    packed = export_packed(state, compressor.specs, out_dir)  # the real artifact, verified on write
    layers = results.pop("layers")
    results.update(packed)
    results["layers"] = layers
    atomic_write_json(out_dir / "results.json", results)
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)  # resume points are kept only until the run is recorded
    if logger is not None:
        log_results(logger, cfg, results)
    print_summary(results)
    return results


def evaluate_ensemble(model, task, ensemble: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Main metric of the mean logits of sampled networks (Bayesian averaging)."""
    keep = {n: model.get_submodule(n).weight.detach().clone() for n in ensemble[0]}
    total, targets = None, None
    for weights in ensemble:
        for n, w in weights.items():
            model.get_submodule(n).weight.data.copy_(w)
        logits, targets = task.logits(model, task.test_dataloader())
        total = logits if total is None else total + logits
    for n, w in keep.items():
        model.get_submodule(n).weight.data.copy_(w)
    return task.score(total / len(ensemble), targets)


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
            cols = list(results["layers"][0].keys())
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
        ("compress/ratio (whole model)", fmt(results.get("compress/ratio"), ".2f") + "×"),
        ("compress/ratio_nominal (paper)", fmt(results.get("compress/ratio_nominal"), ".2f") + "×"),
        ("compress/measured_ratio (file)", fmt(results.get("compress/measured_ratio"), ".2f") + "×"),
        ("compress/bits_per_weight", fmt(results.get("compress/bits_per_weight"), ".3f")),
        ("compress/sparsity", fmt(results.get("compress/sparsity"), ".3f")),
        ("compress/bops_ratio", fmt(results.get("compress/bops_ratio"), ".4f")),
        ("time/step_ms vs dense", f"{fmt(results.get('time/step_ms'), '.1f')} / {fmt(results.get('time/step_ms_dense'), '.1f')}"),
    ]
    for k in sorted(results):
        if k.endswith("_bayes_avg"):
            rows.insert(3, (k, fmt(results[k])))
    for row in rows:
        table.add_row(*row)
    Console(stderr=False).print(table)


def record_failure(cfg: DictConfig, error: BaseException) -> None:
    """A failed run still leaves a ``results.json`` (``status: failed``) for the leaderboard."""
    try:
        identity = {"method": cfg.method.name, "model": cfg.model.name, "task": cfg.task.name, "seed": cfg.seed}
    except Exception:
        identity = {}
    out = {**identity, "status": "failed", "error": f"{type(error).__name__}: {error}".splitlines()[0]}
    atomic_write_json(Path(cfg.paths.output_dir) / "results.json", out)


def objectives(cfg: DictConfig, results: dict) -> float | tuple | None:
    """What a sweeper optimises: ``cfg.objectives`` lists result keys (tuple for several)."""
    keys = cfg.get("objectives")
    if not keys:
        return results.get(f"test/{results['main_metric']}")
    keys = [f"test/{results['main_metric']}" if k == "test/main" else k for k in keys]
    values = tuple(float(results.get(k) or 0.0) for k in keys)
    return values if len(values) > 1 else values[0]
