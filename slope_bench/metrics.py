"""Measure, don't trust: compression accounting and BOPs from finalized tensors.

Convention (METHODS.md, "Accounting"), stated in every report:

* Dense size: every parameter and buffer at 32 bits.
* A compressed (targeted) tensor costs value bits + pattern metadata + scale bits:
  - values: ``b`` bits each, ``b = ceil(log2 L)`` where ``L`` is the largest number of
    distinct values in one quantization group, *measured* on the tensor (``L > 256``
    means the values are not quantized: 32 bits each);
  - N:M (declared by the method and verified on the tensor): ``n`` codes per group
    of ``m`` (zero has a code) and ``ceil(log2 C(m, n))`` index bits per group;
  - otherwise the cheapest of: dense codes (zero has a code), a 1-bit mask plus the
    nonzero codes, or run-length indices (best field width ``r`` in 1..16, filler
    entries for longer gaps);
  - scales / offsets / zero points / codebooks: 16 bits each (``LayerSpec.scale_values``,
    zero points included: ``LayerSpec.zero_points`` of them). The level count of a grid
    (e.g. ``2^b`` on the signed and asymmetric grids, ``2^b − 1`` on the symmetric one) is
    measured, so it needs no declaration; a clipping search stores nothing beyond the scale.
* Tensors not targeted: 32 bits per element.
* BOPs: Σ_ops MACs × b_w × b_a × density, MACs counted with
  ``torch.utils.flop_counter.FlopCounterMode``; weight layers use their measured ``b_w``
  and density, activations stay at ``b_a = 32``; every other counted op (e.g. the
  attention matmuls) is charged 32 × 32 in both the dense and the compressed model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from slope_bench.codecs import rle_costs
from slope_bench.methods.base import LayerSpec
from slope_bench.quant import group_rows, sqnr_db
from slope_bench.sparsity import NM, satisfies_nm

SCALE_BITS = 16
FLOAT_BITS = 32
MAX_CODED_LEVELS = 256


@dataclass
class TensorAccount:
    """Measured accounting of one targeted tensor (one ``layers`` record)."""

    name: str
    shape: list[int]
    pattern: str
    w_bits: int
    granularity: str
    sparsity: float
    levels: int
    sqnr_db: float | None
    numel: int
    nnz: int
    value_bits: int
    index_bits: int
    scale_bits: int
    grid: str = "float"  # symmetric | signed | asymmetric (uniform kinds) | deadzone | codebook | float | uniform
    range: str = ""  # how the grid's range was set (LayerSpec.grid_range): lsq | minmax | mse | percentile
    zero_points: int = 0  # 16-bit zero points, counted in scale_bits

    @property
    def total_bits(self) -> int:
        return self.value_bits + self.index_bits + self.scale_bits

    def record(self) -> dict:
        out = asdict(self)
        out["total_bits"] = self.total_bits
        if out["sqnr_db"] is not None and not math.isfinite(out["sqnr_db"]):
            out["sqnr_db"] = None  # exact reconstruction; JSON has no inf
        return out


def distinct_per_row(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct values per row, with and without zero (vectorised: one numpy row sort,
    several times faster than torch's on CPU; NaNs count one each, ``-0.0 == +0.0``)."""
    if rows.numel() == 0:
        zero = torch.zeros(rows.shape[0], dtype=torch.long)
        return zero, zero
    values = rows.detach().cpu()
    values = (values.float() if values.dtype == torch.bfloat16 else values).numpy()
    s = np.sort(values, axis=1)
    distinct = torch.from_numpy((s[:, 1:] != s[:, :-1]).sum(1).astype(np.int64) + 1)
    has_zero = torch.from_numpy((values == 0).any(1))
    return distinct, distinct - has_zero.long()


def bits_for_levels(levels: int) -> int:
    """``ceil(log2 levels)`` (at least 1); 32 when there are too many levels to code."""
    if levels > MAX_CODED_LEVELS:
        return FLOAT_BITS
    return max(1, math.ceil(math.log2(max(levels, 2))))


def run_length_bits(mask: torch.Tensor, value_bits: int) -> int:
    """Cheapest run-length encoding of the nonzeros of ``mask`` (flattened).

    Each entry holds an ``r``-bit gap (zeros since the previous entry) and a value
    code; a gap of ``2^r`` or more needs filler entries holding a zero. The field
    width ``r`` is chosen in 1..16 to minimise the total
    (:func:`slope_bench.codecs.rle_costs`, vectorised over the gaps).
    """
    costs = rle_costs(mask, value_bits)
    return min(costs) if costs else 0


def account_tensor(name: str, weight: torch.Tensor, spec: LayerSpec, reference: torch.Tensor | None = None) -> TensorAccount:
    """Measure one finalized targeted tensor under the convention above."""
    w = weight.detach().float().cpu()
    numel = w.numel()
    nonzero = w != 0
    nnz = int(nonzero.sum())
    rows = group_rows(w, spec.granularity, spec.group_size)
    with_zero, without_zero = distinct_per_row(rows)
    levels_all = int(with_zero.max()) if numel else 0
    levels_nz = int(without_zero.max()) if numel else 0
    scale_bits = spec.scale_values * SCALE_BITS if spec.grid != "float" else 0

    if spec.grid == "float":  # unquantized values need no codebook: stored as float32
        levels_all = levels_nz = MAX_CODED_LEVELS + 1
    pattern = spec.pattern
    if isinstance(pattern, NM) and satisfies_nm(w, pattern):
        b = bits_for_levels(levels_all)
        groups = numel // pattern.m
        value_bits = groups * pattern.n * b
        index_bits = groups * pattern.index_bits
        label = str(pattern)
    else:
        b_all, b_nz = bits_for_levels(levels_all), bits_for_levels(levels_nz)
        options = {
            "dense": (numel * b_all, 0, b_all),
            "mask": (nnz * b_nz, numel, b_nz),
        }
        if nnz < numel:
            rle = run_length_bits(nonzero, b_all)
            options["rle"] = (rle - 0, 0, b_all) if rle else (0, 0, b_all)
        kind = min(options, key=lambda k: sum(options[k][:2]))
        value_bits, index_bits, b = options[kind]
        label = "dense" if kind == "dense" else "unstructured"
    return TensorAccount(
        name=name,
        shape=list(w.shape),
        pattern=label,
        w_bits=b,
        granularity=spec.granularity if spec.grid != "float" else "none",
        sparsity=1 - nnz / max(numel, 1),
        levels=levels_nz if spec.grid != "float" else int(without_zero.max()) if numel else 0,
        sqnr_db=sqnr_db(reference, w) if reference is not None else None,
        numel=numel,
        nnz=nnz,
        value_bits=value_bits,
        index_bits=index_bits,
        scale_bits=scale_bits,
        grid=spec.grid_kind or spec.grid,
        range=spec.grid_range,
        zero_points=spec.zero_points,
    )


def count_macs(model: nn.Module, example: object) -> tuple[dict[str, int], int]:
    """MACs per module name (leaf Conv/Linear) and in total, for one forward pass."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(example)
    model.train(was_training)
    counts = counter.get_flop_counts()
    total = sum(counts.get("Global", {}).values()) // 2
    root = type(model).__name__
    per_module: dict[str, int] = {}
    weighted = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.ConvTranspose2d)
    for name, module in model.named_modules():
        if isinstance(module, weighted):
            key = f"{root}.{name}" if name else root
            if key in counts:
                per_module[name] = sum(counts[key].values()) // 2
    return per_module, total


def bops(
    per_module_macs: dict[str, int], total_macs: int, accounts: dict[str, TensorAccount], act_bits: int = FLOAT_BITS
) -> tuple[float, float]:
    """(compressed BOPs, dense fp32 BOPs) under the convention above."""
    dense = float(total_macs) * FLOAT_BITS * FLOAT_BITS
    compressed = dense
    for name, macs in per_module_macs.items():
        acc = accounts.get(name)
        if acc is None:
            continue
        density = acc.nnz / max(acc.numel, 1)
        compressed -= macs * FLOAT_BITS * FLOAT_BITS
        compressed += macs * acc.w_bits * act_bits * density
    return compressed, dense


def model_bits(model: nn.Module) -> int:
    """Every parameter and buffer at 32 bits."""
    return FLOAT_BITS * sum(t.numel() for t in model.state_dict().values())


def measure(
    model: nn.Module,
    specs: dict[str, LayerSpec],
    example: object,
    references: dict[str, torch.Tensor] | None = None,
) -> dict:
    """All ``compress/*`` metrics and the ``layers`` records of a finalized model.

    Args:
        model: the finalized model (ordinary modules, real compressed weights).
        specs: declared encodings of the targeted tensors, by module name.
        example: one model input (batch of one) used to count MACs.
        references: full-precision weights before compression (for SQNR), by name.
    """
    references = references or {}
    accounts = {}
    for name, spec in specs.items():
        weight = model.get_submodule(name).weight
        accounts[name] = account_tensor(name, weight, spec, references.get(name))
    dense_bits = model_bits(model)
    targeted_numel = sum(a.numel for a in accounts.values())
    targeted_bits = sum(a.total_bits for a in accounts.values())
    compressed_bits = dense_bits - FLOAT_BITS * targeted_numel + targeted_bits
    nominal_bits = sum(a.w_bits * a.nnz for a in accounts.values())
    zeros = sum(a.numel - a.nnz for a in accounts.values())
    per_module, total_macs = count_macs(model, example)
    bops_c, bops_d = bops(per_module, total_macs, accounts)
    return {
        "compress/ratio": dense_bits / max(compressed_bits, 1),
        "compress/ratio_nominal": (FLOAT_BITS * targeted_numel / nominal_bits) if nominal_bits else 1.0,
        "compress/bits_per_weight": targeted_bits / targeted_numel if targeted_numel else float(FLOAT_BITS),
        "compress/sparsity": zeros / targeted_numel if targeted_numel else 0.0,
        "compress/dense_bits": dense_bits,
        "compress/compressed_bits": compressed_bits,
        "compress/targeted_params": targeted_numel,
        "compress/macs": total_macs,
        "compress/bops": bops_c,
        "compress/bops_dense": bops_d,
        "compress/bops_ratio": bops_c / bops_d if bops_d else 1.0,
        "layers": [accounts[n].record() for n in specs],
    }
