"""One plain-PyTorch loop through the four hooks, without Lightning.

:func:`drive` runs a compressor exactly as a run does (see :mod:`slope_bench.methods.base`):
targets chosen with the method's ``supports`` filter, ``prepare`` with a
:class:`~slope_bench.methods.base.RunInfo`, ``steps`` optimizer steps of
``loss + penalty()`` followed by ``on_step`` (none when the method is post-training),
then ``finalize`` with calibration batches when the method asks for them. The step
timer (``step_time``), the method tests and the paper checks use it; the run uses the
Lightning module, which calls the same hooks in the same order.

Example::

    done = drive(model, compressor, batches, lambda m, b: F.cross_entropy(m(b[0]), b[1]))
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from slope_bench.methods.base import Compressor, Finalized, RunInfo


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


@dataclass
class Driven:
    """What :func:`drive` returns: the finalized record, the targets, the skipped layers
    (name → reason), and the wall time of every training step in seconds."""

    finalized: Finalized | None
    targets: list[str]
    skipped: dict[str, str]
    step_seconds: list[float] = field(default_factory=list)


def drive(
    model: nn.Module,
    compressor: Compressor,
    batches: Sequence,
    loss_fn: Callable[[nn.Module, object], torch.Tensor],
    *,
    steps: int | None = None,
    info: RunInfo | None = None,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    calib: Callable[[int, int], list] | None = None,
    finalize: bool = True,
) -> Driven:
    """Run ``compressor`` on ``model`` through the four hooks with AdamW.

    Args:
        model: the dense model (changed in place: finalized on return).
        compressor: the method.
        batches: training batches, cycled; ``loss_fn(model, batch)`` gives the task loss.
        loss_fn: the task loss of a batch.
        steps: optimizer steps (default ``len(batches)``); 0 when the method does not train.
        info: the run facts given to ``prepare`` (default: ``num_train`` from the batches).
        lr: AdamW's learning rate (the method's ``optim_groups`` may override it).
        weight_decay: AdamW's weight decay (likewise).
        calib: ``(samples, passes) -> list of model inputs``; default: the inputs
            (``batch[0]``) of ``batches``.
        finalize: call ``finalize`` at the end (``False``: stop after the steps, e.g. to time them).

    Returns:
        A :class:`Driven`.
    """
    from slope_bench.models import choose_targets

    needs = compressor.requirements
    if info is None:
        info = RunInfo(num_train=sum(len(b[0]) for b in batches))
    targets, skipped = choose_targets(model, compressor)
    model = compressor.prepare(model, targets, info)
    model.train()
    total = 0 if not needs.trains else (len(batches) if steps is None else steps)
    times: list[float] = []
    if total:
        optimizer = torch.optim.AdamW(param_groups(model, compressor, lr, weight_decay), lr=lr, weight_decay=weight_decay)
        for step in range(total):
            start = time.perf_counter()
            loss = loss_fn(model, batches[step % len(batches)]) + compressor.penalty()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            compressor.on_step(step, total)
            times.append(time.perf_counter() - start)
    if not finalize:
        return Driven(None, targets, skipped, times)
    calib_batches = None
    if needs.calib_samples:
        calib_batches = calib(needs.calib_samples, needs.calib_passes) if calib else [b[0] for b in batches] * needs.calib_passes
    finalized = compressor.finalize(model, calib_batches)
    model.eval()
    return Driven(finalized, targets, skipped, times)
