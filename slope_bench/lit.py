"""The Lightning module that drives a model, a task and a compressor through training,
and the plumbing that lets a run scale out and survive interruptions.

* :class:`LitCompress` — ``loss = task_loss + compressor.penalty()``; checkpoints carry
  the compressor's Python-side state (see :func:`compressor_state`) and the RNG states,
  so a resumed fit continues exactly where the killed one stopped.
* :func:`process_group` — starts the other processes of a multi-device (DDP) run once,
  before the run, and joins their process group; :func:`global_rank`,
  :func:`broadcast_object` and :func:`barrier` are no-ops in a single-process run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from slope_bench.methods.base import Compressor

log = logging.getLogger("slope_bench")
DIGEST_ENV = "SLOPE_BENCH_RANK_DIGESTS"  # folder: every rank appends its end-of-fit state digest there
PLAIN_SCALARS = (bool, int, float, str, type(None))


class DivergenceError(RuntimeError):
    """The training loss became NaN or infinite."""


# ---------------------------------------------------------------------------- compressor state
def is_plain(value: Any) -> bool:
    """True for JSON-like data: scalars, strings, None, and lists/tuples/str-keyed dicts of them."""
    if isinstance(value, PLAIN_SCALARS):
        return True
    if isinstance(value, (list, tuple)):
        return all(is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_plain(v) for k, v in value.items())
    return False


def plain_attributes(obj: Any) -> dict[str, Any]:
    """Public attributes of ``obj`` holding plain data (``training`` of a module excluded)."""
    return {k: v for k, v in vars(obj).items() if not k.startswith("_") and k != "training" and is_plain(v)}


def compressor_state(compressor: Compressor) -> dict[str, Any]:
    """The Python-side state of a compressor that its tensors do not hold.

    Tensors (weights, LSQ steps, masks, gates, logits) are in the model's state dict
    already. What is left is plain data on the compressor and on each of its layer
    parametrizations (a stage flag, a switch step, the current sparsity of a schedule,
    a hard-gates flag); it is saved as is and loads with ``weights_only=True``.
    """
    layers = getattr(compressor, "layers", {}) or {}
    return {"attributes": plain_attributes(compressor), "layers": {name: plain_attributes(p) for name, p in layers.items()}}


def load_compressor_state(compressor: Compressor, state: dict[str, Any]) -> None:
    """Set the attributes saved by :func:`compressor_state` back on ``compressor``."""
    for key, value in state.get("attributes", {}).items():
        setattr(compressor, key, value)
    layers = getattr(compressor, "layers", {}) or {}
    for name, attributes in state.get("layers", {}).items():
        if name in layers:
            for key, value in attributes.items():
                setattr(layers[name], key, value)


def state_digest(model: nn.Module, compressor: Compressor) -> str:
    """sha256 of the compression state: every parameter of ``model`` (weights, LSQ steps,
    gates, logits, codebooks), every buffer of the compressor's layer parametrizations
    (masks) and the compressor's plain state. Equal digests = equal state.

    Batch-norm statistics are left out: under DDP each rank updates its own from its own
    batches and the ranks use rank 0's (see :meth:`LitCompress.on_train_end`).
    """
    h = hashlib.sha256()
    tensors = dict(model.named_parameters())
    for name, layer in (getattr(compressor, "layers", {}) or {}).items():
        tensors.update({f"{name}/{b}": t for b, t in layer.named_buffers()})
    for name, tensor in sorted(tensors.items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    state = compressor_state(compressor)
    state["layers"] = {name: {k: v for k, v in attributes.items() if v is not None} for name, attributes in state["layers"].items()}
    h.update(json.dumps(state, sort_keys=True, default=str).encode())  # None marks an empty cache, not state
    return h.hexdigest()


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


def param_groups(model: nn.Module, compressor: Compressor, lr: float, weight_decay: float) -> list[dict]:
    """Optimizer groups: parameters whose last name component is a key of
    ``compressor.optim_groups`` get that group's ``lr`` / ``weight_decay``; 1-D
    parameters (norms, biases) get no weight decay; everything else the defaults."""
    overrides = compressor.optim_groups or {}
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        tag = name.rsplit(".", 1)[-1]
        if tag in overrides:
            key = f"method:{tag}"
            spec = {"lr": lr, "weight_decay": weight_decay, **overrides[tag]}
        elif p.dim() <= 1:
            key, spec = "no_decay", {"lr": lr, "weight_decay": 0.0}
        else:
            key, spec = "default", {"lr": lr, "weight_decay": weight_decay}
        groups.setdefault(key, {"params": [], "name": key, **spec})["params"].append(p)
    return list(groups.values())


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
    """

    def __init__(
        self, model: nn.Module, task, compressor: Compressor, optimizer: Callable, scheduler: Callable | None = None, val_every: int = 1
    ) -> None:
        super().__init__()
        self.model = model
        self.task = task
        self.compressor = compressor
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.val_every = val_every
        self._resumed: dict[str, Any] | None = None

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
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

    def on_train_epoch_end(self) -> None:
        if self.val_every and (self.current_epoch + 1) % self.val_every == 0 and self.trainer.is_global_zero:
            metrics = self.task.evaluate(self.model, "val")  # every rank holds the same weights: rank 0 evaluates
            self.log_dict({f"val/{k}": v for k, v in metrics.items()}, prog_bar=True, rank_zero_only=True)

    # ---- checkpoints: resume where a killed fit stopped -------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add the compressor's plain state, the ``requires_grad`` flags, the step budget and
        the RNG states to the checkpoint (all loadable with ``weights_only=True``)."""
        checkpoint["slope_bench"] = {
            "compressor": compressor_state(self.compressor),
            "requires_grad": {n: p.requires_grad for n, p in self.model.named_parameters()},
            "total_steps": int(self.trainer.estimated_stepping_batches),
            "rng": collect_rng_states(self.train_loaders()),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Bring the compressor to the checkpoint's state before the model's tensors load.

        1. One catch-up ``on_step(global_step - 1, total)``: what a method derives from the
           step (a stage switch, a pruning schedule, hard gates) is redone, creating any
           buffer a switch adds (a frozen mask) so the state dict loads strictly; the
           tensors it computes are overwritten by the checkpoint's right after.
        2. The plain attributes saved by :func:`compressor_state` are set back exactly
           (the step a switch happened at, the current sparsity, flags).
        3. ``requires_grad`` flags stay as at the start of a fit until the optimizer is
           built (its parameter groups must match the saved optimizer state); the saved
           flags and RNG states are applied in :meth:`on_train_start`.
        """
        saved = checkpoint.get("slope_bench")
        if saved is None:
            return
        start = {n: p.requires_grad for n, p in self.model.named_parameters()}
        step = int(checkpoint.get("global_step", 0))
        if step > 0:
            self.compressor.on_step(step - 1, int(saved["total_steps"]))
        load_compressor_state(self.compressor, saved["compressor"])
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


# ---------------------------------------------------------------------------- multi-process runs
RANK_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def global_rank() -> int:
    """This process's rank in the run's process group (0 without one)."""
    dist = _dist()
    return dist.get_rank() if dist is not None else 0


def is_global_zero() -> bool:
    """True in the process that finalizes, measures and writes (every single-process run)."""
    return global_rank() == 0


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself without a process group)."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    dist = _dist()
    if dist is not None and dist.get_world_size() > 1:
        dist.barrier()


@contextmanager
def process_group(
    trainer_node, command: Callable[[int], list[str]] | None = None, cwd: str | None = None, wait_s: float = 60.0
) -> Iterator[int]:
    """Start the processes of a multi-device run once, before the run, and join their group.

    Lightning's ``ddp`` strategy would start the other ranks at the first
    ``trainer.fit``; a run has three fits (dense reference, dense fine-tune control,
    compression), each of which may be skipped by a cache hit, so the ranks are
    started here instead and every fit reuses the group: cache decisions are made by
    rank 0 and broadcast (:func:`broadcast_object`). On one node the other local ranks
    are started with ``command(local_rank)`` (they rerun the same job into the same run
    dir); under SLURM / torchrun, where the cluster starts every process, nothing is
    started. Yields this process's global rank; single-process runs yield 0 and do nothing.

    Args:
        trainer_node: the run's ``trainer`` config (``pytorch_lightning.Trainer`` kwargs).
        command: argv that starts local rank ``k`` of this job (needed on one node).
        cwd: working directory of those processes.
        wait_s: how long rank 0 waits for the other local ranks to exit at the end.

    Raises:
        ConfigError: for a strategy that trains in processes started per fit
            (``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``): the compressor's Python-side
            state would be lost between fits.
    """
    if trainer_node.get("devices", 1) in (1, "1") and trainer_node.get("num_nodes", 1) in (1, "1"):
        yield 0
        return
    import hydra
    from pytorch_lightning.strategies import ParallelStrategy
    from pytorch_lightning.strategies.launchers import _SubprocessScriptLauncher

    from slope_bench.errors import ConfigError

    probe = hydra.utils.instantiate(
        trainer_node, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    strategy = probe.strategy
    if probe.world_size == 1 or not isinstance(strategy, ParallelStrategy):
        yield 0
        return
    if not isinstance(strategy.launcher, _SubprocessScriptLauncher):
        raise ConfigError(
            "trainer.strategy",
            trainer_node.get("strategy"),
            "ddp or ddp_find_unused_parameters_true (processes that live for the whole run)",
        )
    environment = strategy.cluster_environment
    saved_env = {k: os.environ.get(k) for k in RANK_ENV}
    children: list[subprocess.Popen] = []
    dist = None
    try:
        if not environment.creates_processes_externally:
            if command is None:
                raise RuntimeError("a multi-device run starts its other processes with the job's command: run it through run.py")
            os.environ.update(
                MASTER_ADDR=environment.main_address,
                MASTER_PORT=str(environment.main_port),
                NODE_RANK=str(environment.node_rank()),
                LOCAL_RANK="0",
                WORLD_SIZE=str(probe.world_size),
            )
            for local_rank in range(1, strategy.num_processes):
                children.append(subprocess.Popen(command(local_rank), env={**os.environ, "LOCAL_RANK": str(local_rank)}, cwd=cwd))
            log.info("started %d more local processes for %d-process DDP", len(children), probe.world_size)
        strategy.setup_environment()  # joins the process group: gloo on CPU, nccl on GPUs
        import torch.distributed as dist

        yield strategy.global_rank
    finally:
        if dist is not None and dist.is_initialized():
            dist.destroy_process_group()
        deadline = time.monotonic() + wait_s
        for child in children:
            try:
                child.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                log.warning("local rank process %d did not exit: terminating it", child.pid)
                child.terminate()
                child.wait()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
