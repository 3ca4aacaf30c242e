"""Deployment, measured: the packed artifact run with the fastest kernels torch has here.

``python -m slope_bench.deploy RUN_DIR [--device cpu|cuda] [--batch 1 256] [--repeats N]``
reads ``RUN_DIR/model.packed.safetensors`` (timing the read and the decode), rebuilds the
model from ``RUN_DIR/.hydra/config.yaml``, loads the decoded state and replaces every
targeted layer by the first kernel of the device's list that can run it:

=====================  ==========================================================  ==========
kernel                 what runs                                                   device
=====================  ==========================================================  ==========
semi_structured_2of4   ``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt /    CUDA
                       CUTLASS), fp16/bf16, a weight that is 2:4 along its input
int4_weight_only       ``torch._weight_int4pack_mm`` (CUDA tinygemm) /             CUDA, CPU
                       ``torch._weight_int4pack_mm_for_cpu``: weights that are an
                       integer times a scale, ≤ 16 consecutive levels per group
int8_weight_only       ``torch._weight_int8pack_mm``: integers in [-128, 127]      CUDA, CPU
                       times one scale per output channel
dense                  the decoded weights, run as an ordinary layer               all
=====================  ==========================================================  ==========

Every kernel is tried on a probe input and compared with the dense layer before it is
used; a kernel that is missing, refuses the shape or dtype, or gives another result is
skipped, and the layer's record says why (``reason``). Torch has these kernels for
linear layers only: convolutions run densely ("dense fallback: Conv2d ..."). On the CPU
the int kernels get bf16 activations (their fp32/fp16 paths are slow reference loops:
10-100× slower than fp32 ``F.linear`` here) and the per-channel scale is applied in
fp32 afterwards, so the weights stay exact; the output differs from the fp32 model by
bf16 rounding of the activations (``deploy/max_abs_diff``).

The baseline is the same architecture with the decoded weights run densely in the same
dtype (``--dtype``: fp32 on the CPU, bf16 on CUDA by default). Latency is the median of
``--repeats`` forward passes at each batch size, compressed and dense interleaved so a
busy machine slows both alike; the verdict says plainly when there is no speed-up.

Keys written into ``RUN_DIR/results.json`` (atomically; every other key is kept, stale
``deploy/*`` keys are replaced): ``deploy/device``, ``deploy/device_name``,
``deploy/torch``, ``deploy/threads``, ``deploy/dtype``, ``deploy/date``,
``deploy/read_s``, ``deploy/decode_s``, ``deploy/build_s``, ``deploy/load_s`` (read +
decode + build: time to a ready model), ``deploy/load_peak_mem_mb``,
``deploy/weights_mb`` / ``deploy/weights_mb_dense`` (bytes held by each model),
per batch ``b``: ``deploy/latency_ms_b{b}``, ``deploy/latency_ms_dense_b{b}``,
``deploy/speedup_b{b}`` (median over the interleaved passes of dense / compressed time),
``deploy/peak_mem_mb_b{b}``,
``deploy/peak_mem_mb_dense_b{b}`` (weights + the forward's peak working memory);
``deploy/peak_mem_mb``, ``deploy/peak_mem_mb_dense`` (largest over the batches),
``deploy/mem_method``, ``deploy/batches``, ``deploy/repeats``, ``deploy/verdict``,
``deploy/kernels`` (count by kernel over the targeted layers), ``deploy/max_abs_diff``,
``deploy/max_abs_ref``, ``deploy/tolerance``, ``deploy/outputs_match``,
``deploy/top1_agreement``, ``deploy/layers`` (one record per targeted layer: ``name``,
``type``, ``shape``, ``kernel``, ``act_dtype``, ``reason``).

Bad input (no ``results.json`` or no packed file in RUN_DIR, ``--device cuda`` without
CUDA, a batch or repeat count below 1, an unknown kernel) → one line naming the
argument, exit status 2, nothing written.

:func:`write_run` makes such a run directory from a model driven by
:func:`slope_bench.loop.drive` (finalized + packed weights, a minimal
``.hydra/config.yaml``, ``results.json``); :func:`synthetic_run` drives a
``conf/method`` on a ``conf/model`` with random inputs and writes one.

Example::

    python -m slope_bench.deploy outputs/runs/2026-11-30_slope_resnet18 --batch 1 64
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import math
import os
import re
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slope_bench.utils import atomic_write_json, save_state

PACKED_NAME = "model.packed.safetensors"
FINALIZED_NAME = "finalized.safetensors"
RESULTS_NAME = "results.json"
CONFIG_PATH = Path(".hydra") / "config.yaml"

KERNELS = ("semi_structured_2of4", "int4_weight_only", "int8_weight_only", "dense")
DEFAULT_KERNELS = {
    # 2:4 first on CUDA: the order; --kernels int4_weight_only ... puts int4 first
    "cuda": ("semi_structured_2of4", "int4_weight_only", "int8_weight_only", "dense"),
    # listed on the CPU too, so a 2:4 layer's record says the sparsity is not exploited here
    "cpu": ("semi_structured_2of4", "int4_weight_only", "int8_weight_only", "dense"),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_DTYPE = {"cpu": "fp32", "cuda": "bf16"}
CPU_INT_ACT = torch.bfloat16  # the fast path of torch's CPU int4/int8 kernels (fp32/fp16: reference loops)
INT4_GROUPS = (256, 128, 64, 32)  # group sizes tinygemm / the CPU int4 kernel accept
GRID_TOL = 1e-3  # |w / s - round(w / s)| allowed when reading integer levels out of a weight
PROBE_ROWS = 32
PROBE_RTOL = 0.05  # a kernel whose probe output is further than this (relative) from F.linear is refused
FP32_RTOL = 1e-4  # end-to-end tolerance (relative to max |output|) when every kernel computes in fp32
REDUCED_RTOL = 0.05  # ... when bf16 / fp16 is involved
SPEEDUP_MIN = 1.05  # below this the verdict says "no speed-up"


class DeployError(ValueError):
    """Bad input: printed as one line naming the argument; exit status 2, nothing written.

    Example: ``DeployError("--device", "cuda", "CUDA is not available here")``.
    """

    def __init__(self, argument: str, value: Any, problem: str) -> None:
        self.argument, self.value, self.problem = argument, value, problem
        super().__init__(f"{argument}={value}: {problem}")


def first_line(error: BaseException) -> str:
    """``Type: first line of the message`` (one line, for records and errors)."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


# ---------------------------------------------------------------------------- reading weights
def is_two_of_four(matrix: torch.Tensor) -> bool:
    """Whether every group of 4 consecutive entries along each row has at most 2 nonzeros."""
    rows, cols = matrix.shape
    if cols % 4:
        return False
    return bool(((matrix != 0).reshape(rows, cols // 4, 4).sum(-1) <= 2).all())


def integer_grid(matrix: torch.Tensor, group: int, max_level: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Read integer levels out of a weight: ``matrix ≈ ints · scale``, one scale per group.

    Every ``group`` consecutive entries of a row share a scale ``s = max|w| / k`` for the
    smallest ``k ≤ max_level`` that makes every ``w / s`` an integer (within
    :data:`GRID_TOL`); the levels are measured from the tensor, never taken from what the
    method says. A few rows are checked first so a dense fp32 weight is refused quickly.

    Args:
        matrix: a 2-D weight ``(out, in)``.
        group: entries per scale (``in`` for one scale per output channel); divides ``in``.
        max_level: the largest ``|level|`` the kernel can hold at the max-abs entry.

    Returns:
        ``(ints, scales)`` — int32 levels shaped like ``matrix`` and float32 scales, one
        per group in row-major order — or ``None`` when the weight is not on such a grid.
    """
    if matrix.dim() != 2 or group < 1 or matrix.shape[1] % group:
        return None
    rows = matrix.detach().double().reshape(-1, group)
    head = rows[: max(1, min(8, rows.shape[0]))]
    if rows.shape[0] > head.shape[0] and _grid_scales(head, max_level) is None:
        return None
    scales = _grid_scales(rows, max_level)
    if scales is None:
        return None
    ints = (rows / scales[:, None]).round()
    return ints.reshape(matrix.shape).to(torch.int32), scales.float()


def _grid_scales(rows: torch.Tensor, max_level: int) -> torch.Tensor | None:
    amax = rows.abs().amax(1)
    scales = torch.ones_like(amax)
    todo = amax > 0
    for k in range(1, max_level + 1):
        idx = todo.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        s = amax[idx] / k
        ratio = rows[idx] / s[:, None]
        ok = (ratio - ratio.round()).abs().amax(1) <= GRID_TOL
        scales[idx[ok]] = s[ok]
        todo[idx[ok]] = False
    return None if bool(todo.any()) else scales


# ---------------------------------------------------------------------------- kernel layers
class Int8WeightOnlyLinear(nn.Module):
    """A linear layer on ``torch._weight_int8pack_mm``: int8 weights, one scale per output.

    The kernel gets unit scales in its activation dtype; the true scale is applied in
    fp32 afterwards, so no scale is rounded to bf16.
    """

    def __init__(
        self, ints: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, device: torch.device, act_dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = ints.shape
        self.act_dtype = act_dtype
        self.register_buffer("weight_int8", ints.to(device=device, dtype=torch.int8).contiguous())
        self.register_buffer("unit", torch.ones(self.out_features, device=device, dtype=act_dtype))
        self.register_buffer("scale", scales.to(device=device, dtype=torch.float32))
        self.register_buffer("bias", None if bias is None else bias.detach().to(device=device, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(self.act_dtype)
        y = torch._weight_int8pack_mm(flat, self.weight_int8, self.unit).float() * self.scale
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


class Int4WeightOnlyLinear(nn.Module):
    """A linear layer on torch's int4 weight-only kernel (tinygemm on CUDA, its CPU twin).

    The kernel computes ``x @ ((q - 8) · s_g + z_g)ᵀ`` with ``q`` in ``0..15``; a layer
    with one scale per output channel runs with ``s_g = 1`` and an integer ``z_g`` (both
    exact in bf16) and applies the channel scale in fp32 afterwards; a layer with group
    scales passes them to the kernel (rounded to its activation dtype).
    """

    def __init__(
        self,
        ints: torch.Tensor,
        scales: torch.Tensor,
        per_channel: bool,
        group_size: int,
        bias: torch.Tensor | None,
        device: torch.device,
        act_dtype: torch.dtype,
        nibbles: str = "high_first",
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = n, k = ints.shape
        self.group_size, self.act_dtype, self.cuda = group_size, act_dtype, device.type == "cuda"
        groups = k // group_size
        blocks = ints.reshape(n, groups, group_size)
        low = blocks.amin(-1)  # (n, groups)
        q = (blocks - low[..., None]).reshape(n, k).to(torch.int32)
        if int(q.max()) > 15:
            raise ValueError("more than 16 levels in a group")
        if per_channel:
            kscale, zero = torch.ones(n, groups), (low + 8).float()
            self.register_buffer("scale", scales.to(device=device, dtype=torch.float32))
        else:
            kscale = scales.reshape(n, groups)
            zero = (low + 8).float() * kscale
            self.register_buffer("scale", None)
        self.register_buffer("scales_and_zeros", torch.stack([kscale.t(), zero.t()], -1).to(device=device, dtype=act_dtype).contiguous())
        if self.cuda:
            pairs = (q[:, ::2] << 4 | q[:, 1::2]) if nibbles == "high_first" else (q[:, 1::2] << 4 | q[:, ::2])
            tiles = next(t for t in (8, 4, 2) if k % (t * 16) == 0)
            packed = torch._convert_weight_to_int4pack(pairs.to(torch.uint8).to(device), tiles)
        else:
            packed = torch._convert_weight_to_int4pack_for_cpu(q.to(device), 1)
        self.register_buffer("weight_int4", packed)
        self.register_buffer("bias", None if bias is None else bias.detach().to(device=device, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(self.act_dtype)
        mm = torch._weight_int4pack_mm if self.cuda else torch._weight_int4pack_mm_for_cpu
        y = mm(flat, self.weight_int4, self.group_size, self.scales_and_zeros).float()
        if self.scale is not None:
            y = y * self.scale
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


class SemiStructuredLinear(nn.Module):
    """A linear layer whose 2:4 weight is a torch semi-structured sparse tensor."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        from torch.sparse import to_sparse_semi_structured

        self.out_features, self.in_features = weight.shape
        self.dtype = dtype
        self.weight = nn.Parameter(
            to_sparse_semi_structured(weight.detach().to(device=device, dtype=dtype).contiguous()), requires_grad=False
        )
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(device=device, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.reshape(-1, self.in_features).to(self.dtype), self.weight, self.bias)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def _probe(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, device: torch.device, dtype: torch.dtype) -> str | None:
    """Run ``layer`` on a random input; why it cannot be used, or None."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(PROBE_ROWS, weight.shape[1], generator=gen)
    ref = F.linear(x, weight.float(), None if bias is None else bias.detach().float())
    with torch.inference_mode():
        y = layer(x.to(device=device, dtype=dtype)).float().cpu()
    scale = float(ref.abs().max()) or 1.0
    err = float((y - ref).abs().max()) / scale
    if not math.isfinite(err) or err > PROBE_RTOL:
        return f"its output differs from the dense layer's (relative error {err:.2g} > {PROBE_RTOL})"
    return None


NOT_APPLICABLE = "not applicable"  # the layer lacks the structure the kernel exploits: left out of the record's reason


def kernel_layer(kernel: str, module: nn.Module, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module | None, str, str | None]:
    """Build ``kernel`` for one linear layer and check it on a probe input.

    Args:
        kernel: one of :data:`KERNELS` other than ``dense``.
        module: the ``nn.Linear`` with its decoded fp32 weights (on the CPU).
        device: where the deployed model runs.
        dtype: the deployed model's dtype.

    Returns:
        ``(layer, why_not, note)``: the replacement layer (``None`` when the kernel
        cannot run it; ``why_not`` then says why, or is :data:`NOT_APPLICABLE` when
        the weight lacks the structure the kernel exploits) and an optional note.
    """
    weight, bias = module.weight.detach().float().cpu(), module.bias
    note = None
    try:
        if kernel == "semi_structured_2of4":
            if not is_two_of_four(weight):
                return None, NOT_APPLICABLE, None
            if device.type != "cuda":
                return None, "2:4 sparsity not exploited: torch's semi-structured sparse kernels are CUDA-only", None
            candidates = [lambda: SemiStructuredLinear(weight, bias, device, dtype)]
        elif kernel == "int8_weight_only":
            grid = integer_grid(weight, weight.shape[1], 128)
            if grid is None or int(grid[0].max()) > 127:
                return None, NOT_APPLICABLE, None
            if not hasattr(torch, "_weight_int8pack_mm"):
                return None, f"torch {torch.__version__} has no torch._weight_int8pack_mm", None
            act = _int_act_dtype(device, dtype)
            candidates = [lambda: Int8WeightOnlyLinear(grid[0], grid[1], bias, device, act)]
        elif kernel == "int4_weight_only":
            act = torch.bfloat16 if device.type == "cuda" else CPU_INT_ACT  # tinygemm: bf16 only
            grid, per_channel, group = integer_grid(weight, weight.shape[1], 15), True, None
            if grid is not None and weight.shape[1] % 32 == 0:
                group = next(g for g in INT4_GROUPS if weight.shape[1] % g == 0)
                grid = grid if _span_ok(grid[0], group) else None
            if grid is None:
                per_channel = False
                group = next((g for g in INT4_GROUPS if weight.shape[1] % g == 0 and _grid_fits(weight, g)), None)
                grid = None if group is None else integer_grid(weight, group, 15)
                note = None if group is None else f"group scales ({group}) rounded to {str(act).removeprefix('torch.')}"
            if grid is None:
                return None, NOT_APPLICABLE, None
            if group is None:
                return None, f"input size {weight.shape[1]} is not a multiple of 32", None
            name = "_weight_int4pack_mm" if device.type == "cuda" else "_weight_int4pack_mm_for_cpu"
            if not hasattr(torch, name):
                return None, f"torch {torch.__version__} has no torch.{name}", None
            orders = ("high_first", "low_first") if device.type == "cuda" else ("high_first",)
            candidates = [
                (lambda o=o: Int4WeightOnlyLinear(grid[0], grid[1], per_channel, group, bias, device, act, nibbles=o)) for o in orders
            ]
        else:
            raise ValueError(f"unknown kernel {kernel!r}")
    except Exception as e:  # noqa: BLE001 - a kernel that cannot be prepared is a fallback, with the reason
        return None, first_line(e), None
    why = "no candidate"
    for make in candidates:
        try:
            layer = make()
            why = _probe(layer, weight, bias, device, dtype)
        except Exception as e:  # noqa: BLE001 - missing kernel, refused shape or dtype: fall back with the reason
            layer, why = None, first_line(e)
        if why is None:
            return layer, "", note
    return None, why, None


def _int_act_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    if device.type == "cpu":
        return CPU_INT_ACT
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def _span_ok(ints: torch.Tensor, group: int) -> bool:
    blocks = ints.reshape(ints.shape[0], -1, group)
    return bool((blocks.amax(-1) - blocks.amin(-1) <= 15).all())


def _grid_fits(weight: torch.Tensor, group: int) -> bool:
    grid = integer_grid(weight, group, 15)
    return grid is not None and _span_ok(grid[0], group)


def act_dtype_name(layer: nn.Module | None, dtype: torch.dtype) -> str:
    """The dtype the layer's matmul sees (``bf16`` for the int kernels on the CPU)."""
    act = getattr(layer, "act_dtype", None) or getattr(layer, "dtype", None) or dtype
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(act, str(act))


def build_deployed(
    base: nn.Module, targets: Sequence[str], device: torch.device, dtype: torch.dtype, kernels: Sequence[str]
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """A copy of ``base`` on ``device`` / ``dtype`` with each targeted layer on its kernel.

    Args:
        base: the model with the decoded fp32 weights (on the CPU; not changed).
        targets: names of the targeted layers.
        device: where the deployed model runs.
        dtype: its dtype (the layers left dense, and the activations between layers).
        kernels: kernels in order of preference; ``dense`` is always the last resort.

    Returns:
        The deployed model (eval mode) and one record per targeted layer: ``name``,
        ``type``, ``shape``, ``kernel``, ``act_dtype``, ``reason`` (why the kernels
        ranked above the one used were not; ``None`` when the first one ran) and, for
        some kernels, ``note``.
    """
    order = [k for k in kernels if k != "dense"] + ["dense"]
    model = copy.deepcopy(base).to(device=device, dtype=dtype).eval()
    records = []
    for name in targets:
        source = base.get_submodule(name)
        skipped: list[str] = []
        chosen, layer, note, reason = "dense", None, None, None
        if not isinstance(source, nn.Linear):
            kind = "Conv2d" if isinstance(source, nn.Conv2d) else type(source).__name__  # models.SmallMapConv2d too
            reason = f"dense fallback: {kind}: torch's 2:4 sparse and weight-only int kernels cover linear layers only"
        else:
            for kernel in order:
                if kernel == "dense":
                    break
                layer, why, note = kernel_layer(kernel, source, device, dtype)
                if layer is not None:
                    chosen = kernel
                    break
                if why != NOT_APPLICABLE:
                    skipped.append(f"{kernel}: {why}")
            reason = "; ".join(skipped) or None
            if chosen == "dense":
                if reason:
                    reason = f"dense fallback: {reason}"
                elif order == ["dense"]:
                    reason = "dense: only the dense kernel was asked for (--kernels dense)"
                else:
                    reason = "dense: the weight is neither 2:4 nor on an integer grid a kernel here takes"
        if layer is not None:
            _set_submodule(model, name, layer.eval())
        record = {
            "name": name,
            "type": type(source).__name__,
            "shape": list(source.weight.shape),
            "kernel": chosen,
            "act_dtype": act_dtype_name(layer, dtype),
            "reason": reason,
        }
        if note:
            record["note"] = note
        records.append(record)
    return model, records


def _set_submodule(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, layer)


# ---------------------------------------------------------------------------- memory
def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes held by a tensor; a tensor subclass (semi-structured sparse) counts its parts."""
    if hasattr(tensor, "__tensor_flatten__") and type(tensor) is not torch.Tensor and type(tensor) is not nn.Parameter:
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, n)) for n in names if isinstance(getattr(tensor, n, None), torch.Tensor))
    return tensor.numel() * tensor.element_size()


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model``."""
    return sum(tensor_bytes(t) for t in [*model.parameters(), *model.buffers()])


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so the next peak is not hidden
    except (OSError, AttributeError):
        pass


def _proc_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+)", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


class MemoryMeter:
    """Peak memory of a phase: CUDA ``max_memory_allocated``, on the CPU the process's
    resident high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``), or
    ``ru_maxrss`` (a lower bound: it cannot be reset) where that is not possible."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated"
        elif self._reset_hwm() and _proc_kib("VmHWM") is not None:
            self.method = "VmHWM (resident high-water mark)"
        else:
            self.method = "ru_maxrss (lower bound)"

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def start(self) -> None:
        """Begin a phase."""
        _trim()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif self.method.startswith("VmHWM"):
            self._reset_hwm()
            self.base = (_proc_kib("VmRSS") or 0) * 1024
        else:
            import resource

            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def peak_bytes(self) -> int:
        """Peak bytes above the start of the phase."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return max(torch.cuda.max_memory_allocated(self.device) - self.base, 0)
        if self.method.startswith("VmHWM"):
            return max((_proc_kib("VmHWM") or 0) * 1024 - self.base, 0)
        import resource

        return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base, 0)


# ---------------------------------------------------------------------------- the run directory
def read_results(run_dir: Path) -> dict[str, Any]:
    """``RUN_DIR/results.json`` as a dict.

    Raises:
        DeployError: naming ``RUN_DIR`` when it is missing or unreadable.
    """
    path = run_dir / RESULTS_NAME
    if not path.is_file():
        raise DeployError("RUN_DIR", run_dir, f"no {RESULTS_NAME} (not a finished run directory)")
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DeployError("RUN_DIR", run_dir, f"{RESULTS_NAME} is unreadable ({first_line(e)})") from None
    if not isinstance(results, dict):
        raise DeployError("RUN_DIR", run_dir, f"{RESULTS_NAME} is not a JSON object")
    return results


def read_config(run_dir: Path) -> Any:
    """``RUN_DIR/.hydra/config.yaml`` with ``paths`` pointed at this machine.

    Raises:
        DeployError: naming ``RUN_DIR`` when it is missing, unreadable or has no model.
    """
    from omegaconf import OmegaConf, open_dict

    path = run_dir / CONFIG_PATH
    if not path.is_file():
        raise DeployError("RUN_DIR", run_dir, f"no {CONFIG_PATH} (the run's config is needed to rebuild the model)")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # noqa: BLE001 - any parse error is one line
        raise DeployError("RUN_DIR", run_dir, f"{CONFIG_PATH} is unreadable ({first_line(e)})") from None
    if "model" not in cfg or "_target_" not in cfg.model:
        raise DeployError("RUN_DIR", run_dir, f"{CONFIG_PATH} has no model node with a _target_")
    if "paths" in cfg:  # ${hydra:...} cannot resolve outside the run: use the recorded cwd, else this one
        cwd = os.getcwd()
        try:
            cwd = str(OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.runtime.cwd)
        except Exception:  # noqa: BLE001, S110 - no hydra.yaml: stay with this cwd
            pass
        with open_dict(cfg):
            cfg.paths.root_dir = cwd
            cfg.paths.output_dir = str(run_dir)
    return cfg


def input_shape(cfg: Any, run_dir: Path, results: Mapping[str, Any] | None = None) -> tuple[int, int, int]:
    """``(num_classes, in_chans, image_size)``: from ``results.json``'s ``input/*`` keys
    when the run recorded them, else from ``cfg.task`` when it states them, else from the
    task built as the run built it (``instantiate(cfg.task, seed=cfg.seed)``).

    Raises:
        DeployError: naming ``RUN_DIR`` when the task cannot be built here.
    """
    import hydra

    keys = ("num_classes", "in_chans", "image_size")
    if results is not None and all(isinstance(results.get(f"input/{k}"), int) for k in keys):
        return tuple(int(results[f"input/{k}"]) for k in keys)  # type: ignore[return-value]
    task = cfg.get("task")
    if task is None:
        raise DeployError("RUN_DIR", run_dir, f"{CONFIG_PATH} has no task node (input shape unknown)")
    if all(k in task and task.get(k) is not None for k in keys):
        return tuple(int(task.get(k)) for k in keys)  # type: ignore[return-value]
    try:
        built = hydra.utils.instantiate(task, seed=cfg.get("seed", 0))
        return int(built.num_classes), int(built.in_chans), int(built.image_size)
    except Exception as e:  # noqa: BLE001 - e.g. a dataset path that does not exist on this machine
        raise DeployError("RUN_DIR", run_dir, f"its task cannot be built here to learn the input shape ({first_line(e)})") from None


def build_model(cfg: Any, num_classes: int, in_chans: int, image_size: int) -> nn.Module:
    """The run's model, built from ``cfg.model`` as the run built it, without any
    pretrained download or checkpoint (the packed weights replace them)."""
    import hydra
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(cfg.model, resolve=True)
    node = {k: v for k, v in node.items() if k not in ("defaults", "dense_lr", "finetune_lr")}
    for key in ("pretrained", "pretrained_backbone"):
        if key in node:
            node[key] = False
    if "checkpoint" in node:
        node["checkpoint"] = None
    return hydra.utils.instantiate(OmegaConf.create(node), num_classes=num_classes, in_chans=in_chans, image_size=image_size)


def targeted_layers(model: nn.Module, results: Mapping[str, Any]) -> list[str]:
    """The layers the method compressed: ``results['layers']`` minus the skipped ones;
    every Conv2d/Linear when the run has no ``layers`` record."""
    names = {n for n, _ in model.named_modules()}
    layers = results.get("layers")
    if isinstance(layers, list) and layers:
        return [r["name"] for r in layers if isinstance(r, dict) and r.get("name") in names and not r.get("skipped")]
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


# ---------------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(
    models: Mapping[str, nn.Module], example: torch.Tensor, repeats: int, warmup: int, meter: MemoryMeter, weights: Mapping[str, int]
) -> dict[str, dict[str, float]]:
    """Median latency (ms), peak memory (MB) and the timed passes (s) of each model on
    ``example``.

    The first warm-up pass of each model measures its peak working memory (added to
    the bytes its weights hold); the timed passes interleave the models, so that pass
    ``i`` of one model and pass ``i`` of another ran under the same machine load.
    """
    device = example.device
    out = {name: {"times": []} for name in models}
    with torch.inference_mode():
        for name, model in models.items():
            meter.start()
            model(example)
            _sync(device)
            out[name]["peak_mem_mb"] = (weights[name] + meter.peak_bytes()) / 2**20
            for _ in range(max(warmup - 1, 0)):
                model(example)
            _sync(device)
        for _ in range(repeats):
            for name, model in models.items():
                _sync(device)
                start = time.perf_counter()
                model(example)
                _sync(device)
                out[name]["times"].append(time.perf_counter() - start)
    return {
        name: {"latency_ms": 1000 * statistics.median(v["times"]), "peak_mem_mb": v["peak_mem_mb"], "times": v["times"]}
        for name, v in out.items()
    }


def verdict(speedups: Mapping[int, float], device: str, kernels: Mapping[str, int] | None = None) -> str:
    """One honest line: the speed-ups, or "no speed-up on this device".

    When every targeted layer runs on the dense kernel the deployed model *is* the dense
    model, and the line says so (a measured ratio away from 1 is then noise).
    """
    parts = ", ".join(f"{s:.2f}x at batch {b}" for b, s in speedups.items())
    if kernels is not None and set(kernels) <= {"dense"}:
        return f"no speed-up on this device ({device}): every targeted layer runs densely, so the deployed model is the dense model (measured {parts}: noise)"
    if not speedups or max(speedups.values()) < SPEEDUP_MIN:
        return f"no speed-up on this device ({device}): {parts} vs dense"
    return f"speed-up vs dense on {device}: {parts}"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def deploy(
    run_dir: str | Path,
    device: str = "cpu",
    batches: Sequence[int] = (1, 256),
    repeats: int = 5,
    warmup: int = 1,
    dtype: str | None = None,
    kernels: Sequence[str] | None = None,
    write: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Deploy a run's packed model, measure it against the dense model, record ``deploy/*``.

    Args:
        run_dir: a run directory (``results.json``, ``model.packed.safetensors``,
            ``.hydra/config.yaml``; ``finalized.safetensors`` when present is the
            reference the outputs are checked against).
        device: ``cpu`` or ``cuda``.
        batches: batch sizes to time.
        repeats: timed forward passes per model and batch (median reported).
        warmup: untimed passes per model and batch (the first measures peak memory).
        dtype: ``fp32`` | ``bf16`` | ``fp16`` (default: fp32 on the CPU, bf16 on CUDA).
        kernels: kernels in order of preference (default :data:`DEFAULT_KERNELS`).
        write: write the keys into ``results.json``.
        log: where progress lines go.

    Returns:
        The ``deploy/*`` keys.

    Raises:
        DeployError: bad input (checked before any work; nothing is written).
    """
    run_dir = Path(run_dir)
    dev, dtype_name, order = check_arguments(run_dir, device, batches, repeats, warmup, dtype, kernels)
    results = read_results(run_dir)
    packed_path = run_dir / PACKED_NAME
    if not packed_path.is_file():
        raise DeployError("RUN_DIR", run_dir, f"no {PACKED_NAME} (this run has no packed artifact to deploy)")
    cfg = read_config(run_dir)
    num_classes, in_chans, image_size = input_shape(cfg, run_dir, results)
    torch_dtype = DTYPES[dtype_name]

    from slope_bench.export import load_packed

    meter = MemoryMeter(dev)
    meter.start()
    start = time.perf_counter()
    packed_path.read_bytes()
    read_s = time.perf_counter() - start
    start = time.perf_counter()
    try:
        state = load_packed(packed_path)
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file is bad input: one line
        raise DeployError("RUN_DIR", run_dir, f"{PACKED_NAME} cannot be loaded ({first_line(e)})") from None
    decode_s = time.perf_counter() - start
    start = time.perf_counter()
    try:
        base = build_model(cfg, num_classes, in_chans, image_size)
    except Exception as e:  # noqa: BLE001
        raise DeployError("RUN_DIR", run_dir, f"the model in {CONFIG_PATH} cannot be built ({first_line(e)})") from None
    if type(base).__name__ in ("MaskRCNN", "FasterRCNN", "GeneralizedRCNN"):
        raise DeployError(
            "RUN_DIR", run_dir, f"model {type(base).__name__}: deploy times image classifiers (a batch of images in, logits out)"
        )
    try:
        base.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise DeployError("RUN_DIR", run_dir, f"the packed state does not fit the model in {CONFIG_PATH} ({first_line(e)})") from None
    base.eval()
    targets = targeted_layers(base, results)
    deployed, records = build_deployed(base, targets, dev, torch_dtype, order)
    _sync(dev)
    build_s = time.perf_counter() - start
    load_peak = meter.peak_bytes()
    log(f"deploy {run_dir}: read {read_s:.3f}s, decode {decode_s:.3f}s, build {build_s:.3f}s on {dev.type} ({dtype_name})")

    out: dict[str, Any] = {
        "deploy/device": dev.type,
        "deploy/device_name": device_name(dev),
        "deploy/torch": torch.__version__,
        "deploy/threads": torch.get_num_threads(),
        "deploy/dtype": dtype_name,
        "deploy/date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "deploy/read_s": read_s,
        "deploy/decode_s": decode_s,
        "deploy/build_s": build_s,
        "deploy/load_s": read_s + decode_s + build_s,
        "deploy/load_peak_mem_mb": load_peak / 2**20,
        "deploy/mem_method": meter.method,
        "deploy/batches": list(batches),
        "deploy/repeats": repeats,
    }

    # correctness: the deployed model against the finalized model in fp32 on this device
    reference = copy.deepcopy(base)
    finalized_path = run_dir / FINALIZED_NAME
    if finalized_path.is_file():
        from safetensors.torch import load_file

        reference.load_state_dict(load_file(str(finalized_path)), strict=True)
    reference = reference.to(dev).eval()
    gen = torch.Generator().manual_seed(0)
    check = torch.randn(4, in_chans, image_size, image_size, generator=gen).to(dev)
    with torch.inference_mode():
        want = reference(check).float()
        got = deployed(check.to(torch_dtype)).float()
    del reference
    reduced = torch_dtype != torch.float32 or any(r["act_dtype"] != "fp32" for r in records)
    max_ref = float(want.abs().max())
    tolerance = (REDUCED_RTOL if reduced else FP32_RTOL) * max(max_ref, 1.0)
    diff = float((got - want).abs().max())
    out.update(
        {
            "deploy/max_abs_diff": diff,
            "deploy/max_abs_ref": max_ref,
            "deploy/tolerance": tolerance,
            "deploy/outputs_match": bool(diff <= tolerance),
            "deploy/top1_agreement": float((got.argmax(-1) == want.argmax(-1)).float().mean()) if got.dim() == 2 else None,
        }
    )

    dense = copy.deepcopy(base).to(device=dev, dtype=torch_dtype).eval()
    weights = {"compressed": model_bytes(deployed), "dense": model_bytes(dense)}
    out["deploy/weights_mb"] = weights["compressed"] / 2**20
    out["deploy/weights_mb_dense"] = weights["dense"] / 2**20
    del state
    speedups = {}
    for b in batches:
        example = torch.randn(b, in_chans, image_size, image_size, generator=gen).to(device=dev, dtype=torch_dtype)
        timed = measure_latency({"compressed": deployed, "dense": dense}, example, repeats, warmup, meter, weights)
        del example
        c, d = timed["compressed"], timed["dense"]
        speedups[b] = statistics.median(t_d / t_c for t_c, t_d in zip(c["times"], d["times"]))  # paired: robust to a busy machine
        out[f"deploy/latency_ms_b{b}"] = c["latency_ms"]
        out[f"deploy/latency_ms_dense_b{b}"] = d["latency_ms"]
        out[f"deploy/speedup_b{b}"] = speedups[b]
        out[f"deploy/peak_mem_mb_b{b}"] = c["peak_mem_mb"]
        out[f"deploy/peak_mem_mb_dense_b{b}"] = d["peak_mem_mb"]
        log(
            f"  batch {b:>4}: {c['latency_ms']:9.2f} ms vs dense {d['latency_ms']:9.2f} ms ({speedups[b]:.2f}x), "
            f"peak {c['peak_mem_mb']:.1f} MB vs {d['peak_mem_mb']:.1f} MB"
        )
    out["deploy/peak_mem_mb"] = max(out[f"deploy/peak_mem_mb_b{b}"] for b in batches)
    out["deploy/peak_mem_mb_dense"] = max(out[f"deploy/peak_mem_mb_dense_b{b}"] for b in batches)
    out["deploy/kernels"] = dict(Counter(r["kernel"] for r in records))
    out["deploy/verdict"] = verdict(speedups, dev.type, out["deploy/kernels"])
    out["deploy/layers"] = records
    log(f"  kernels {out['deploy/kernels']}; max |diff| {diff:.3g} (tolerance {tolerance:.3g}); {out['deploy/verdict']}")
    if write:
        latest = read_results(run_dir)  # re-read: keep every key written meanwhile
        latest = {k: v for k, v in latest.items() if not k.startswith("deploy/")}
        latest.update(out)
        atomic_write_json(run_dir / RESULTS_NAME, latest)
    return out


def check_arguments(
    run_dir: Path,
    device: str,
    batches: Sequence[int],
    repeats: int,
    warmup: int,
    dtype: str | None,
    kernels: Sequence[str] | None,
) -> tuple[torch.device, str, list[str]]:
    """Validate every argument before any work.

    Returns:
        ``(device, dtype name, kernel order)``.

    Raises:
        DeployError: naming the first bad argument.
    """
    if not run_dir.is_dir():
        raise DeployError("RUN_DIR", run_dir, "not a directory")
    if device not in ("cpu", "cuda"):
        raise DeployError("--device", device, "expected cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise DeployError("--device", device, "CUDA is not available here (use --device cpu)")
    if not batches:
        raise DeployError("--batch", "[]", "expected at least one batch size")
    for b in batches:
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise DeployError("--batch", b, "expected integers >= 1")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise DeployError("--repeats", repeats, "expected an integer >= 1")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
        raise DeployError("--warmup", warmup, "expected an integer >= 1 (the first pass measures peak memory)")
    dtype = dtype or DEFAULT_DTYPE[device]
    if dtype not in DTYPES:
        raise DeployError("--dtype", dtype, f"expected one of {', '.join(DTYPES)}")
    order = list(kernels) if kernels else list(DEFAULT_KERNELS[device])
    for k in order:
        if k not in KERNELS:
            raise DeployError("--kernels", k, f"expected some of {', '.join(KERNELS)}")
    return torch.device(device), dtype, order


# ---------------------------------------------------------------------------- making a run directory
def write_run(
    out_dir: str | Path,
    model: nn.Module,
    finalized: Any,
    *,
    model_cfg: Mapping[str, Any],
    method: str,
    setting: str,
    num_classes: int,
    in_chans: int,
    image_size: int,
    seed: int = 0,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a run directory :func:`deploy` can read from a finalized model.

    Writes ``finalized.safetensors``, ``model.packed.safetensors`` (through
    :func:`slope_bench.export.export_packed`), ``.hydra/config.yaml`` (``seed``, the
    model node, a ``task`` node stating ``num_classes`` / ``in_chans`` / ``image_size``,
    the method's name) and ``results.json`` (identity, ``compress/*`` measured from the
    tensors, ``input/*`` (the input shape), ``layers``, and ``extra``). Zeros are made
    ``+0.0`` first, as a run does.

    Args:
        out_dir: the directory (created).
        model: the finalized model (moved to the CPU in fp32).
        finalized: what the method's ``finalize`` returned (``.specs``: layer specs).
        model_cfg: the ``conf/model`` node the model was built from (``_target_`` ...).
        method: the method's name.
        setting: its human-readable setting (``"2:4 w4"``).
        num_classes: classifier outputs.
        in_chans: input channels.
        image_size: input side.
        seed: the seed recorded.
        extra: more ``results.json`` keys (e.g. ``time/*``).

    Returns:
        The results dict written.
    """
    from omegaconf import OmegaConf

    from slope_bench.export import export_packed, positive_zeros
    from slope_bench.metrics import measure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.cpu().float().eval()
    with torch.no_grad():
        for name in finalized.specs:
            weight = model.get_submodule(name).weight
            weight.copy_(positive_zeros(weight))
    state = model.state_dict()
    name = str(model_cfg.get("name", type(model).__name__))
    save_state(out_dir / FINALIZED_NAME, state, metadata={"method": method, "model": name})
    results: dict[str, Any] = {"method": method, "model": name, "task": "synthetic", "seed": seed, "setting": setting, "status": "ok"}
    results.update({"input/num_classes": num_classes, "input/in_chans": in_chans, "input/image_size": image_size})
    report = measure(model, finalized.specs, torch.zeros(1, in_chans, image_size, image_size))
    layers = report.pop("layers")
    for layer in layers:
        layer.update(getattr(finalized, "layer_extras", {}).get(layer["name"], {}))
    results.update(report)
    results.update(export_packed(state, finalized.specs, out_dir))
    results.update(extra or {})
    results["layers"] = layers
    cfg = {
        "seed": seed,
        "model": dict(model_cfg),
        "task": {"name": "synthetic", "num_classes": num_classes, "in_chans": in_chans, "image_size": image_size},
        "method": {"name": method},
    }
    (out_dir / CONFIG_PATH).parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(cfg), out_dir / CONFIG_PATH)
    atomic_write_json(out_dir / RESULTS_NAME, results)
    return results


def synthetic_run(
    out_dir: str | Path,
    model: str = "resnet18",
    method: str = "magnitude_rtn",
    *,
    image_size: int = 224,
    num_classes: int = 10,
    model_overrides: Mapping[str, Any] | None = None,
    method_overrides: Mapping[str, Any] | None = None,
    steps: int = 2,
    batch: int = 8,
    calib_batch: int = 64,
    device: str = "cpu",
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Drive ``conf/method/<method>.yaml`` on ``conf/model/<model>.yaml`` with random
    inputs (:func:`slope_bench.loop.drive`) and write the run with :func:`write_run`.

    A cheap way to get a real compressed artifact at the true shapes: a few training
    steps (methods that train) or calibration on random images (post-training methods;
    ``calib_batch`` images per batch). The drive's wall time is recorded as
    ``time/drive_s`` (on CUDA, synchronized).

    Args:
        out_dir: the run directory to write.
        model: a ``conf/model`` name.
        method: a ``conf/method`` name.
        image_size: input side.
        num_classes: classifier outputs.
        model_overrides: ``conf/model`` keys to change (e.g. ``{"width": 8}``).
        method_overrides: ``conf/method`` keys to change (e.g. ``{"n": None, "m": None}``).
        steps: training steps for methods that train.
        batch: training batch size.
        calib_batch: calibration images per batch.
        device: where the method runs (``cpu`` / ``cuda``).
        seed: torch seed.
        log: where the progress line goes.

    Returns:
        The results dict written.
    """
    import hydra
    from omegaconf import OmegaConf

    from slope_bench.loop import drive
    from slope_bench.methods.base import RunInfo
    from slope_bench.utils import CONF_DIR

    torch.manual_seed(seed)
    dev = torch.device(device)
    node = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / f"{model}.yaml"))
    node = {k: v for k, v in node.items() if k not in ("defaults", "dense_lr", "finetune_lr")}
    node.update(model_overrides or {})
    net = hydra.utils.instantiate(OmegaConf.create(node), num_classes=num_classes, in_chans=3, image_size=image_size).to(dev)
    from slope_bench.train import METHOD_SEARCH, build

    spec = OmegaConf.load(CONF_DIR / "method" / f"{method}.yaml")
    for key, value in (method_overrides or {}).items():
        spec[key] = value
    compressor = build("method", spec, METHOD_SEARCH)
    data = [(torch.randn(batch, 3, image_size, image_size, device=dev), torch.randint(0, num_classes, (batch,), device=dev))]

    def calib(samples: int, passes: int) -> list[torch.Tensor]:
        sizes = [min(calib_batch, samples - i) for i in range(0, samples, calib_batch)]
        return [torch.randn(s, 3, image_size, image_size, device=dev) for s in sizes] * passes

    _sync(dev)
    start = time.perf_counter()
    driven = drive(
        net,
        compressor,
        data,
        lambda m, b: F.cross_entropy(m(b[0]), b[1]),
        steps=steps,
        info=RunInfo(num_train=max(batch, 1024), seed=seed),
        calib=calib,
    )
    _sync(dev)
    drive_s = time.perf_counter() - start
    log(f"{method} on {model} at {image_size}px ({device}): {len(driven.targets)} layers in {drive_s:.1f}s")
    return write_run(
        out_dir,
        net,
        driven.finalized,
        model_cfg=node,
        method=compressor.name,
        setting=compressor.setting(),
        num_classes=num_classes,
        in_chans=3,
        image_size=image_size,
        seed=seed,
        extra={"time/drive_s": drive_s, "time/drive_device": device, "compress/targets": len(driven.targets)},
    )


# ---------------------------------------------------------------------------- command line
class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    """``python -m slope_bench.deploy RUN_DIR ...``; returns the exit status (0 ok, 1 the
    deployed outputs do not match the finalized model, 2 bad input)."""
    parser = _Parser(prog="python -m slope_bench.deploy", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (results.json, model.packed.safetensors, .hydra/config.yaml)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 256], help="batch sizes to time (default 1 256)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per model and batch (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes per model and batch (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's setting)")
    parser.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default fp32 on cpu, bf16 on cuda)")
    parser.add_argument(
        "--kernels", nargs="+", default=None, help=f"kernels in order of preference (default: {' '.join(DEFAULT_KERNELS['cuda'])})"
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave results.json as it is")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        print(f"{parser.prog}: error: --threads={args.threads}: expected an integer >= 1", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        out = deploy(args.run_dir, args.device, args.batch, args.repeats, args.warmup, args.dtype, args.kernels, write=not args.no_write)
    except DeployError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    if not out["deploy/outputs_match"]:
        print(
            f"{parser.prog}: error: deployed outputs differ from the finalized model by {out['deploy/max_abs_diff']:.3g} "
            f"(tolerance {out['deploy/tolerance']:.3g})",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
