"""The Lightning module that drives a model, a task and a compressor through training.

* :class:`LitCompress` — ``loss = task_loss + compressor.penalty()``, then
  ``compressor.on_step``; checkpoints carry the compressor's
  :meth:`~slope_bench.methods.base.Compressor.state_dict`, the ``requires_grad`` flags
  and the RNG states, so a resumed fit continues exactly where the killed one stopped.
* :func:`fit` — one training phase of a run (dense reference, dense fine-tune control,
  compression) with the run's optimizer, schedule, trainer and per-epoch checkpoints;
  with ``trainer.channels_last=true`` the model and the 4-D image batches are in
  ``torch.channels_last`` (NHWC) during the fit, and back in the default layout after it.

Multi-process plumbing lives in :mod:`slope_bench.distributed`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from slope_bench import __version__
from slope_bench.distributed import DIGEST_ENV, state_digest
from slope_bench.errors import ConfigError
from slope_bench.loop import param_groups
from slope_bench.methods.base import Compressor

log = logging.getLogger("slope_bench")


class DivergenceError(RuntimeError):
    """The training loss became NaN or infinite."""


# trainer.* keys the run reads itself: never passed to pytorch_lightning.Trainer
RUN_TRAINER_KEYS = ("channels_last",)


def lightning_trainer_spec(trainer_node: Any) -> dict:
    """The run's ``trainer`` node as ``pytorch_lightning.Trainer`` kwargs (the run's own keys left out)."""
    from omegaconf import OmegaConf

    spec = OmegaConf.to_container(trainer_node, resolve=True) if OmegaConf.is_config(trainer_node) else dict(trainer_node)
    return {k: v for k, v in spec.items() if k not in RUN_TRAINER_KEYS}


def to_channels_last(batch: Any) -> Any:
    """``batch`` with every 4-D tensor in ``torch.channels_last`` (others as they are)."""
    from lightning_utilities.core.apply_func import apply_to_collection

    return apply_to_collection(batch, torch.Tensor, lambda t: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t)


# ---------------------------------------------------------------------------- RNG states
def collect_rng_states(loaders: list) -> dict[str, Any]:
    """Global torch / numpy / python RNG states and the generators of the training loaders
    (all as tensors and plain data, so they load with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
        "loaders": [g.get_state() for g in loader_generators(loaders)],
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any], loaders: list) -> None:
    """Inverse of :func:`collect_rng_states`."""
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    for generator, state in zip(loader_generators(loaders), states.get("loaders", [])):
        generator.set_state(state)
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def loader_generators(loaders: list) -> list[torch.Generator]:
    """The distinct ``torch.Generator`` objects that drive the shuffling of ``loaders``."""
    found: list[torch.Generator] = []
    for loader in loaders:
        for owner in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
            g = getattr(owner, "generator", None)
            if isinstance(g, torch.Generator) and all(g is not f for f in found):
                found.append(g)
    return found


class StepTimer(pl.Callback):
    """Wall time of each training step (forward, backward, optimizer, compressor)."""

    def __init__(self, skip: int = 3) -> None:
        self.skip = skip
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: D102
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: D102
        self.times.append(time.perf_counter() - self._t0)

    def state_dict(self) -> dict[str, Any]:
        """The step times so far: kept in checkpoints, so a resumed fit reports all its steps."""
        return {"times": list(self.times)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # noqa: D102
        self.times = list(state_dict.get("times", []))

    @property
    def step_ms(self) -> float | None:
        t = self.times[self.skip :] or self.times
        if not t:
            return None
        return 1000 * float(torch.tensor(t).median())


class LitCompress(pl.LightningModule):
    """Training loop of one run: ``loss = task_loss + compressor.penalty()``.

    Args:
        model: the (prepared) model.
        task: the task (loss and evaluator).
        compressor: the method; ``on_step`` is called after every optimizer step.
        optimizer: partial optimizer ``(params) -> Optimizer`` (lr/weight_decay read from it).
        scheduler: partial scheduler ``(optimizer, total_steps) -> LRScheduler`` or None.
        val_every: evaluate on the validation split every this many epochs (0: never).
        fingerprint: the run's deciding configuration (:func:`fingerprint`), written into
            every checkpoint so that a resume with another configuration is refused.
        tag: the phase's name in progress lines (``slope fine-tune``).
        channels_last: every 4-D tensor of a training batch in ``torch.channels_last``
            (on the device, before the forward; the model is converted by :func:`fit`).
    """

    def __init__(
        self,
        model: nn.Module,
        task,
        compressor: Compressor,
        optimizer: Callable,
        scheduler: Callable | None = None,
        val_every: int = 1,
        fingerprint: dict[str, Any] | None = None,
        tag: str = "train",
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.channels_last = channels_last
        self.model = model
        self.task = task
        self.compressor = compressor
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.val_every = val_every
        self.fingerprint = fingerprint or {}
        self.tag = tag
        self.losses: list[float] = []  # task loss of every step (divergence check)
        self._resumed: dict[str, Any] | None = None

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        if self.channels_last:
            batch = to_channels_last(batch)
        task_loss = self.task.loss(self.model, batch)
        penalty = self.compressor.penalty()
        loss = task_loss + penalty
        finite = bool(torch.isfinite(loss))
        if self.trainer.world_size > 1:  # every rank stops together, none waits in a collective
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            raise DivergenceError(
                f"training diverged: loss is {float(loss.detach())} at step {self.global_step} (task loss {float(task_loss.detach())}): lower the learning rate or the method's penalty weight"
            )
        self.losses.append(float(task_loss.detach()))
        bs = len(batch[0]) if isinstance(batch, (list, tuple)) else None
        self.log("train/loss", task_loss.detach(), prog_bar=True, batch_size=bs)
        if isinstance(penalty, torch.Tensor):
            self.log("train/penalty", penalty.detach(), batch_size=bs)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        total = int(self.trainer.estimated_stepping_batches)
        self.compressor.on_step(self.global_step - 1, total)
        stats = self.compressor.stats()
        if stats:
            self.log_dict({f"train/{k}": float(v) for k, v in stats.items()}, batch_size=1)

    def on_train_epoch_start(self) -> None:
        self._epoch_start = (time.perf_counter(), len(self.losses))

    def on_train_epoch_end(self) -> None:
        metrics = {}
        if self.val_every and (self.current_epoch + 1) % self.val_every == 0 and self.trainer.is_global_zero:
            metrics = self.task.evaluate(self.model, "val")  # every rank holds the same weights: rank 0 evaluates
            self.log_dict({f"val/{k}": v for k, v in metrics.items()}, prog_bar=True, rank_zero_only=True)
        if self.trainer.is_global_zero:  # one line per epoch: progress readable in a log file (SLURM, nohup, CI)
            start, first = getattr(self, "_epoch_start", (time.perf_counter(), 0))
            losses = self.losses[first:]
            parts = [f"{self.tag}: epoch {self.current_epoch + 1}/{self.trainer.max_epochs}"]
            if losses:
                parts.append(f"loss {sum(losses) / len(losses):.4f}")
            parts += [f"val/{k} {v:.4f}" for k, v in metrics.items()]
            parts.append(f"{time.perf_counter() - start:.1f} s")
            log.info(" · ".join(parts))

    # ---- checkpoints: resume where a killed fit stopped -------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add the compressor's state, the ``requires_grad`` flags, the step budget and
        the RNG states to the checkpoint (all loadable with ``weights_only=True``)."""
        checkpoint["slope_bench"] = {
            "compressor": self.compressor.state_dict(),
            "requires_grad": {n: p.requires_grad for n, p in self.model.named_parameters()},
            "total_steps": int(self.trainer.estimated_stepping_batches),
            "rng": collect_rng_states(self.train_loaders()),
            "losses": list(self.losses),
            "config": self.fingerprint,
            "version": __version__,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Bring the compressor to the checkpoint's state before the model's tensors load.

        ``compressor.load_state_dict`` restores its plain state and recreates any buffer
        that state implies (a frozen mask), so the model's state dict then loads
        strictly. ``requires_grad`` flags stay as at the start of a fit until the
        optimizer is built (its parameter groups must match the saved optimizer state);
        the saved flags and RNG states are applied in :meth:`on_train_start`.
        """
        saved = checkpoint.get("slope_bench")
        if saved is None:
            return
        start = {n: p.requires_grad for n, p in self.model.named_parameters()}
        self.compressor.load_state_dict(saved["compressor"])
        self.losses = list(saved.get("losses", []))
        for n, p in self.model.named_parameters():
            p.requires_grad_(start.get(n, p.requires_grad))
        self._resumed = saved

    def on_train_start(self) -> None:
        if self._resumed is None:
            return
        self.restore_requires_grad()
        set_rng_states(self._resumed["rng"], self.train_loaders())
        # Lightning made this epoch's loader iterator before this hook (drawing from the fresh
        # loader generator); make it again from the restored states, as the killed run did.
        fetcher = getattr(self.trainer.fit_loop, "_data_fetcher", None)
        if fetcher is not None:
            iter(fetcher)
        self._resumed = None

    def restore_requires_grad(self) -> None:
        """Apply the ``requires_grad`` flags of the checkpoint being resumed (a held LSQ step)."""
        flags = (self._resumed or {}).get("requires_grad", {})
        for n, p in self.model.named_parameters():
            if n in flags:
                p.requires_grad_(flags[n])

    def on_train_end(self) -> None:
        """Check that every rank ends the fit with the same compression state
        (:func:`state_digest`), then give every rank rank 0's batch-norm statistics. With
        ``$SLOPE_BENCH_RANK_DIGESTS`` set, each rank also appends its digest to
        ``<folder>/rank<k>.jsonl``.

        Raises:
            RuntimeError: on every rank, when the digests differ.
        """
        folder = os.environ.get(DIGEST_ENV)
        world = self.trainer.world_size
        if world == 1 and not folder:
            return
        digest = state_digest(self.model, self.compressor)
        if folder:
            record = {
                "rank": self.global_rank,
                "world_size": world,
                "compressor": type(self.compressor).__name__,
                "global_step": self.global_step,
                "sha256": digest,
            }
            with open(Path(folder) / f"rank{self.global_rank}.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        if world > 1:
            import torch.distributed as dist

            digests: list[str] = [""] * world
            dist.all_gather_object(digests, digest)
            if len(set(digests)) > 1:
                raise RuntimeError(
                    "the compression state differs between ranks after training: "
                    + ", ".join(f"rank {r} {d[:12]}" for r, d in enumerate(digests))
                )
            for buffer in self.model.buffers():
                dist.broadcast(buffer, src=0)

    def train_loaders(self) -> list:
        """The training DataLoader(s) of the running fit (empty before they exist)."""
        loaders = self.trainer.train_dataloader
        if loaders is None:
            return []
        return list(loaders.values()) if isinstance(loaders, dict) else list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]

    def configure_optimizers(self):
        probe = self.optimizer_factory([torch.nn.Parameter(torch.zeros(1))])
        lr, wd = probe.defaults["lr"], probe.defaults.get("weight_decay", 0.0)
        optimizer = self.optimizer_factory(param_groups(self.model, self.compressor, lr, wd))
        if self.scheduler_factory is None:
            return optimizer
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = self.scheduler_factory(optimizer, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup: float = 0.05) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` of the steps, then cosine decay to zero."""
    import math

    warm = max(int(warmup * total_steps), 0)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(total_steps - warm, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------- one training phase
@dataclass
class Fit:
    """Wall time of a fit, the median step time (ms), the optimizer steps taken, and the
    mean task loss over its first and last steps (a tenth of them, 1 to 20 steps)."""

    fit_s: float
    step_ms: float | None
    steps: int
    loss_first: float | None = None
    loss_last: float | None = None


def loss_ends(losses: list[float]) -> tuple[float | None, float | None]:
    """Mean task loss over the first and the last tenth of ``losses`` (1 to 20 steps each)."""
    if not losses:
        return None, None
    k = min(max(len(losses) // 10, 1), 20)
    return sum(losses[:k]) / k, sum(losses[-k:]) / k


FINGERPRINT_KEYS = ("seed", "model", "task", "dense", "optimizer", "method", "finetune", "scheduler", "control")


def fingerprint(cfg) -> dict[str, Any]:
    """The run's deciding configuration as flat ``key: value`` pairs (``method.w_bits: 4``):
    what a checkpoint must match to be resumed (where files go is left out)."""
    from omegaconf import OmegaConf

    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = value

    for key in FINGERPRINT_KEYS:
        if cfg.get(key) is not None:
            walk(key, OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key])
    from slope_bench.tasks.base import RESULT_NEUTRAL_KNOBS

    flat.pop("dense.cache", None)
    return {k: v for k, v in flat.items() if not (k.startswith("task.") and k.split(".", 1)[1] in RESULT_NEUTRAL_KNOBS)}


def usable_checkpoint(path: Path, expected: dict[str, Any], tag: str) -> str | None:
    """``path`` when it can be resumed, ``None`` when it is unreadable (it is then renamed
    ``last.ckpt.unreadable-<n>`` with a warning, and the phase restarts).

    Raises:
        ConfigError: naming ``resume`` and the first setting that differs, when the
            checkpoint belongs to another configuration or another slope_bench version.
    """
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        meta = saved["slope_bench"] if "slope_bench" in saved else {}
    except Exception as e:  # truncated, damaged or not plain data: never executed, never used
        aside = path.with_name(f"{path.name}.unreadable-{time.time_ns()}")
        path.rename(aside)
        log.warning(
            "%s: checkpoint %s is unreadable (%s): set aside as %s, restarting this phase", tag, path, str(e).splitlines()[0], aside.name
        )
        return None
    version = meta.get("version", __version__)
    if version != __version__:
        raise ConfigError("resume", True, f"a checkpoint of slope_bench {__version__}: {path} was written by {version}")
    recorded = meta.get("config")
    if recorded is not None and recorded != expected:
        for key in sorted(set(recorded) | set(expected)):
            if recorded.get(key, "<unset>") != expected.get(key, "<unset>"):
                raise ConfigError(
                    "resume",
                    True,
                    f"the configuration {path} was written with: {key} is {expected.get(key, '<unset>')!r} here, "
                    f"{recorded.get(key, '<unset>')!r} there",
                )
    return str(path)


def fit(
    model: nn.Module,
    task,
    compressor: Compressor,
    epochs: int,
    lr: float,
    cfg,
    logger=None,
    tag: str = "train",
    checkpoint: str | None = None,
) -> Fit:
    """Train ``model`` for ``epochs`` at peak ``lr`` with the run's optimizer, schedule and trainer.

    With ``checkpoint`` set, ``<run dir>/checkpoints/<checkpoint>/last.ckpt`` is written
    every ``checkpoint_every`` epochs (0: never), and ``resume=true`` continues from it
    (loaded with ``weights_only=True``).
    """
    import hydra

    if epochs == 0:
        return Fit(0.0, None, 0)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # a fit's randomness must not depend on which earlier fits were cache hits
    timer = StepTimer()
    callbacks: list[pl.Callback] = [timer]
    ckpt_path = None
    every = int(cfg.get("checkpoint_every", 1))
    if checkpoint is not None and every > 0:
        from pytorch_lightning.callbacks import ModelCheckpoint

        folder = Path(cfg.paths.output_dir) / "checkpoints" / checkpoint
        # one file, last.ckpt, replaced (atomically) after every epoch
        callbacks.append(
            ModelCheckpoint(folder, "last", save_top_k=1, every_n_epochs=every, save_on_train_epoch_end=True, enable_version_counter=False)
        )
        if cfg.get("resume", False) and (folder / "last.ckpt").is_file():
            ckpt_path = usable_checkpoint(folder / "last.ckpt", fingerprint(cfg), tag)
            if ckpt_path:
                log.info("%s: resuming from %s", tag, ckpt_path)
    channels_last = bool(cfg.trainer.get("channels_last", False))
    lit = LitCompress(
        model,
        task,
        compressor,
        optimizer=hydra.utils.instantiate(cfg.optimizer, lr=lr),
        scheduler=hydra.utils.instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        val_every=cfg.get("val_every", 1),
        fingerprint=fingerprint(cfg),
        tag=tag,
        channels_last=channels_last,
    )
    trainer_spec = lightning_trainer_spec(cfg.trainer)
    trainer = hydra.utils.instantiate(
        trainer_spec,
        enable_progress_bar=bool(cfg.trainer.get("enable_progress_bar", True)) and sys.stderr.isatty(),  # a live bar in a terminal only
        max_epochs=epochs,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        enable_checkpointing=checkpoint is not None and every > 0,
        default_root_dir=cfg.paths.output_dir,
    )
    log.info("%s: %d epochs%s", tag, epochs, " (channels_last)" if channels_last else "")
    if channels_last and isinstance(trainer.accelerator, pl.accelerators.CPUAccelerator):  # as Lightning resolved it
        log.warning(
            "%s: trainer.channels_last on a CPU: torch's NHWC convolution backward has given gradients ~100x less "
            "accurate than NCHW (at times 5%% off) and heap corruption at tiny widths on torch 2.14.1 "
            "(experiments/digits_resnet18/README.md); its results are not comparable",
            tag,
        )
    t0 = time.perf_counter()
    if channels_last:  # in place: the same Parameter objects (the compressor's references stay valid)
        model.to(memory_format=torch.channels_last)
    try:
        trainer.fit(lit, datamodule=task, ckpt_path=ckpt_path, weights_only=True)
    except DivergenceError as e:
        raise DivergenceError(f"{tag}: {e}") from None
    finally:
        if channels_last:  # finalize, measurement and export see the default layout
            model.to(memory_format=torch.contiguous_format)
    return Fit(time.perf_counter() - t0, timer.step_ms, int(trainer.global_step), *loss_ends(lit.losses))
