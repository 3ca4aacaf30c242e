"""The run's two references: the dense model and the dense fine-tune control, cached.

* :func:`dense_reference` — the model as built trained for ``dense.epochs`` (0: the
  model as built *is* the reference, e.g. pretrained weights).
* :func:`dense_control` — the dense reference fine-tuned with the compression run's
  exact budget and schedule, so that compression can be told from extra training.

Both are trained once and cached under ``paths.cache_dir`` (keyed by everything that
decides them), behind a lock file and checked by sha256 before use; :func:`config_id`
names a run's configuration (everything that decides its result except the seed).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from slope_bench.distributed import barrier, broadcast_object, is_global_zero
from slope_bench.lit import fit
from slope_bench.methods.base import Compressor
from slope_bench.tasks.base import RESULT_NEUTRAL_KNOBS
from slope_bench.utils import atomic_write_json, load_state_file, save_state, stable_hash

log = logging.getLogger("slope_bench")
CACHE_VERSION = 1


@dataclass
class Reference:
    """A trained dense model: its weights, test metrics, median step time and steps."""

    state: dict[str, torch.Tensor]
    metrics: dict[str, float]
    step_ms: float | None
    steps: int = 0


def dense_reference(cfg: DictConfig, task, new_model: Callable[[], nn.Module]) -> Reference:
    """The dense reference of this configuration and seed (trained once, then cached)."""

    def train() -> Reference:
        model = new_model()
        fitted = fit(model, task, Compressor(), cfg.dense.epochs, cfg.dense.lr, cfg, tag="dense reference", checkpoint="dense")
        return Reference(model.state_dict(), task.evaluate(model) if is_global_zero() else {}, fitted.step_ms, fitted.steps)

    return cached_training(cache_path(cfg, "dense", dense_key(cfg)), train)


def dense_control(cfg: DictConfig, task, new_model: Callable[[], nn.Module], dense: Reference, epochs: int) -> Reference:
    """The dense model fine-tuned with the run's budget and schedule (cached); the dense
    reference itself when the control is off or the method does not train."""
    if not (cfg.control.dense_ft and epochs > 0):
        return Reference({}, dense.metrics, dense.step_ms, 0)

    def train() -> Reference:
        model = new_model()
        model.load_state_dict(dense.state)
        fitted = fit(model, task, Compressor(), epochs, cfg.finetune.lr, cfg, tag="dense fine-tune control", checkpoint="dense_ft")
        return Reference(model.state_dict(), task.evaluate(model) if is_global_zero() else {}, fitted.step_ms, fitted.steps)

    key = {
        **dense_key(cfg),
        "finetune": OmegaConf.to_container(cfg.finetune, resolve=True),
        "finetune_epochs": epochs,
        "scheduler": OmegaConf.to_container(cfg.scheduler, resolve=True),
    }
    return cached_training(cache_path(cfg, "dense_ft", key), train)


def cached_training(cache_file: Path | None, train_fn: Callable[[], Reference]) -> Reference:
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
    """Hex sha256 of a file, read in 1 MiB blocks."""
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


def task_key(cfg: DictConfig) -> dict:
    """The task's knobs that decide results (loader-only knobs and paths of generated data left out)."""
    task = OmegaConf.to_container(cfg.task, resolve=True)
    return {k: v for k, v in task.items() if k not in RESULT_NEUTRAL_KNOBS}


def dense_key(cfg: DictConfig) -> dict:
    """Everything that decides the dense reference."""
    return {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "task": task_key(cfg),
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
    """``<cache_dir>/<kind>/<model>-<task>-<hash of key>.safetensors`` (None: caching off)."""
    if not cfg.dense.cache:
        return None
    return Path(cfg.paths.cache_dir) / kind / f"{cfg.model.name}-{cfg.task.name}-{stable_hash(key)}.safetensors"
