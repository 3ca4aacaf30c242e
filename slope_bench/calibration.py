"""Calibration for post-training methods: layer-input Hessians and BatchNorm re-estimation.

Every post-training method (OBC today, others later) minimises a layer-wise
reconstruction error ``‖WX − ŴX‖²`` whose curvature is the Hessian ``H = 2XXᵀ`` of
the layer's inputs ``X`` (``d_col × N``: one column per input row; for a convolution one
column per output position of the unfolded input, ``torch.nn.functional.unfold`` with the
layer's kernel size, stride, padding and dilation). This module collects those Hessians
with forward hooks while calibration batches run through the model in eval mode, and
re-estimates BatchNorm running statistics once the weights have changed.

``H`` is the plain sum ``2 Σ_rows x xᵀ`` accumulated in float64 (not divided by the row
count): every consumer here is invariant to its scale (relative damping, ratios of
quadratic forms), and the sum is what a hand computation gives.

Example::

    hessians = collect_hessians(model, ["layer1.0.conv1", "fc"], calib_batches)
    recalibrate_batchnorm(model, calib_batches)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LayerHessian:
    """Running ``H = 2 Σ x xᵀ`` of one layer's inputs.

    Attributes:
        hessian: float64 ``(d_col, d_col)`` sum, ``None`` until the first input arrives.
        rows: number of input rows accumulated (samples × spatial positions).
        calls: number of forward calls seen.
    """

    hessian: torch.Tensor | None = None
    rows: int = 0
    calls: int = 0

    def add(self, module: nn.Module, x: torch.Tensor) -> None:
        """Accumulate one forward input ``x`` of ``module``."""
        matrix = layer_input_matrix(module, x)
        increment = 2.0 * matrix.T @ matrix
        self.hessian = increment if self.hessian is None else self.hessian.add_(increment)
        self.rows += matrix.shape[0]
        self.calls += 1


def layer_input_matrix(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Input rows of a Linear or Conv2d layer as a float64 ``(N, d_col)`` matrix.

    For a Linear layer every leading index is a row. For a Conv2d layer the input is
    unfolded (``torch.nn.functional.unfold``) with the layer's kernel size, dilation,
    padding and stride, giving one row of length ``in_channels · kh · kw`` per output
    position, ordered like ``weight.reshape(out_channels, -1)``.

    Args:
        module: a ``nn.Linear`` or ``nn.Conv2d`` with ``groups == 1``.
        x: the module's forward input.

    Returns:
        The float64 matrix ``Xᵀ`` with ``X`` the layer's ``d_col × N`` input.

    Raises:
        TypeError: for other layer types.
        ValueError: for grouped convolutions.
    """
    x = x.detach()
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1]).to(torch.float64)
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ValueError(f"grouped convolutions (groups={module.groups}) are not supported by the calibration Hessian")
        if x.dim() == 3:
            x = x.unsqueeze(0)
        padding = module.padding
        if isinstance(padding, str) or module.padding_mode != "zeros":
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
            padding = 0
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1]).to(torch.float64)
    raise TypeError(f"calibration Hessians support nn.Linear and nn.Conv2d, got {type(module).__name__}")


def layer_inputs_hessian(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``H = 2XXᵀ`` (float64) for one forward input ``x`` of a Linear or Conv2d layer.

    Example: for ``nn.Linear(3, 2)`` and ``x`` of shape ``(5, 3)`` this is
    ``2 · x.double().T @ x.double()``.
    """
    matrix = layer_input_matrix(module, x)
    return 2.0 * matrix.T @ matrix


class _StopForward(Exception):
    """Raised from a hook to end a calibration forward pass early."""


def move_to(batch, device: torch.device):
    """``batch`` (a tensor or nested list/tuple of tensors) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(item, device) for item in batch)
    return batch


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameter-free model)."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@torch.no_grad()
def collect_layer_statistics(
    model: nn.Module,
    layer_names: Sequence[str],
    batches: Iterable,
    *,
    stop_early: bool = False,
) -> dict[str, LayerHessian]:
    """Run ``batches`` through ``model`` (eval mode, no grad) and accumulate every layer's ``H``.

    Args:
        model: any module; ``model(batch)`` must run for each batch.
        layer_names: names (``model.get_submodule``) of Linear/Conv2d layers to hook.
        batches: model inputs (tensors, or lists of tensors for detection models).
        stop_early: end each forward pass once every hooked layer has been called once.
            Only valid when each hooked layer is called once per forward (see
            :func:`forward_call_counts`); it saves the rest of the network's compute.

    Returns:
        ``{name: LayerHessian}``; a layer never called has ``hessian=None`` and ``rows=0``.
    """
    stats = {name: LayerHessian() for name in layer_names}
    pending: set[str] = set()

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: tuple, output) -> None:
            stats[name].add(module, inputs[0])
            pending.discard(name)
            if stop_early and not pending:
                raise _StopForward

        return hook

    handles = [model.get_submodule(name).register_forward_hook(make_hook(name)) for name in layer_names]
    was_training = model.training
    model.eval()
    device = model_device(model)
    try:
        for batch in batches:
            pending.update(layer_names)
            try:
                model(move_to(batch, device))
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return stats


def collect_hessians(model: nn.Module, layer_names: Sequence[str], batches: Iterable) -> dict[str, torch.Tensor]:
    """``{name: H = 2XXᵀ}`` (float64) of each layer's inputs over all ``batches``.

    A layer never reached by the calibration data gets an all-zero ``H``.

    Example::

        H = collect_hessians(model, ["fc"], [torch.randn(8, 3, 32, 32)])["fc"]
    """
    stats = collect_layer_statistics(model, layer_names, batches)
    out = {}
    for name, stat in stats.items():
        if stat.hessian is None:
            weight = model.get_submodule(name).weight
            out[name] = torch.zeros(weight[0].numel(), weight[0].numel(), dtype=torch.float64, device=weight.device)
        else:
            out[name] = stat.hessian
    return out


@torch.no_grad()
def forward_call_counts(model: nn.Module, layer_names: Sequence[str], batch) -> tuple[list[str], dict[str, int]]:
    """Execution order and per-forward call counts of ``layer_names`` on one batch.

    Returns:
        ``(order, counts)``: the layers in order of their first call (layers never called
        last, in the given order) and how often each was called.
    """
    order: list[str] = []
    counts = dict.fromkeys(layer_names, 0)

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: tuple, output) -> None:
            if counts[name] == 0:
                order.append(name)
            counts[name] += 1

        return hook

    handles = [model.get_submodule(name).register_forward_hook(make_hook(name)) for name in layer_names]
    was_training = model.training
    model.eval()
    try:
        model(move_to(batch, model_device(model)))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    order += [name for name in layer_names if counts[name] == 0]
    return order, counts


BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable) -> int:
    """Re-estimate BatchNorm running statistics on ``batches``; the model ends in eval mode.

    Running mean/var are reset and re-accumulated as a cumulative average
    (``momentum=None``) while only the BatchNorm layers are in train mode (dropout and
    the rest of the network stay in eval mode). Each layer's momentum is restored.

    Returns:
        The number of BatchNorm layers re-estimated (0 leaves the model untouched).
    """
    norms = [m for m in model.modules() if isinstance(m, BATCHNORMS) and m.track_running_stats]
    if not norms:
        model.eval()
        return 0
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    device = model_device(model)
    try:
        for batch in batches:
            model(move_to(batch, device))
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.eval()
    return len(norms)
