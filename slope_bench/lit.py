"""The Lightning module that drives a model, a task and a compressor through training."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytorch_lightning as pl
import torch
from torch import nn

from slope_bench.methods.base import Compressor


class DivergenceError(RuntimeError):
    """The training loss became NaN or infinite."""


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

    def __init__(self, model: nn.Module, task, compressor: Compressor, optimizer: Callable, scheduler: Callable | None = None, val_every: int = 1) -> None:
        super().__init__()
        self.model = model
        self.task = task
        self.compressor = compressor
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.val_every = val_every

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        task_loss = self.task.loss(self.model, batch)
        penalty = self.compressor.penalty()
        loss = task_loss + penalty
        if not torch.isfinite(loss):
            raise DivergenceError(f"training loss is {float(loss)} at step {self.global_step} (task loss {float(task_loss)}): lower the learning rate or the method's penalty weight")
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
        if self.val_every and (self.current_epoch + 1) % self.val_every == 0:
            metrics = self.task.evaluate(self.model, "val")
            self.log_dict({f"val/{k}": v for k, v in metrics.items()}, prog_bar=True, sync_dist=False)

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
