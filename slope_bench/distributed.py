"""Multi-process (DDP) plumbing of a run, kept out of the LightningModule.

* :func:`process_group` — starts the other processes of a multi-device (DDP) run once,
  before the run, and joins their process group; :func:`global_rank`,
  :func:`broadcast_object` and :func:`barrier` are no-ops in a single-process run.
* :func:`state_digest` — sha256 of the compression state, compared across ranks after
  every fit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from slope_bench.methods.base import Compressor

log = logging.getLogger("slope_bench")
DIGEST_ENV = "SLOPE_BENCH_RANK_DIGESTS"  # folder: every rank appends its end-of-fit state digest there


def state_digest(model: nn.Module, compressor: Compressor) -> str:
    """sha256 of the compression state: every parameter of ``model`` (weights, LSQ steps,
    gates, logits, codebooks), every buffer of the compressor's layer parametrizations
    (masks) and the compressor's plain state (:meth:`Compressor.state_dict`). Equal
    digests = equal state.

    Batch-norm statistics are left out: under DDP each rank updates its own from its own
    batches and the ranks use rank 0's (see :meth:`slope_bench.lit.LitCompress.on_train_end`).
    """
    h = hashlib.sha256()
    tensors = dict(model.named_parameters())
    for name, layer in compressor.layers.items():
        tensors.update({f"{name}/{b}": t for b, t in layer.named_buffers()})
    for name, tensor in sorted(tensors.items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps(compressor.state_dict(), sort_keys=True, default=str).encode())
    return h.hexdigest()


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
    from slope_bench.lit import lightning_trainer_spec

    probe = hydra.utils.instantiate(
        lightning_trainer_spec(trainer_node),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
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
