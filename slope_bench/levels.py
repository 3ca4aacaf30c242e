"""Exact maps between float32 values and integer levels under float16 scales.

A finalized tensor's values are (per quantization group ``g``) ``a·s_g`` (``uniform``),
``s·a + δ·sign(a)`` (``deadzone``), ``codebook[a − 1]`` (``codebook``), or anything
(``table``: a per-group float32 table; ``raw``: the float32 bit pattern). :func:`fit_values`
finds the declared form that reproduces every value bit for bit and returns integer
codes; :func:`decode_values` inverts it. The packed file (:mod:`slope_bench.export`) and the
entropy-coded file (:mod:`slope_bench.coded`) both store these codes and parts.

Example::

    desc, parts, codes, bits, note = fit_values(flat, positions, spec, 4, level_len)
    assert torch.equal(decode_values(desc | {"shape": shape}, parts, codes, positions), flat[positions])
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from slope_bench.codecs import (
    CodecError,
    bits_float,
    flat_nonzero,
    float_bits,
    pack_bits,
    sorted_unique,
    take,
    unique_integers,
    unpack_bits,
)
from slope_bench.methods.base import LayerSpec
from slope_bench.metrics import FLOAT_BITS, bits_for_levels, group_rows
from slope_bench.quant import fp16_exact

MAX_SCALE_DIVISOR = 256


# ---------------------------------------------------------------------------- grids
def group_amin(groups: torch.Tensor, values: torch.Tensor, count: int, empty: float) -> torch.Tensor:
    """Per-group minimum of ``values`` (``empty`` where a group has none)."""
    out = torch.full((count,), empty, dtype=values.dtype)
    return out.scatter_reduce(0, groups, values, "amin", include_self=True)


def uniform_scales(
    flat: torch.Tensor, group_len: int, max_divisor: int = MAX_SCALE_DIVISOR, max_levels: int | None = None
) -> torch.Tensor | None:
    """Per-group float16 scales ``s`` with every value an integer multiple ``a·s`` (float32-exact).

    Candidates are ``fp16(v_min / k)``, ``v_min`` the group's smallest nonzero ``|v|`` and
    ``k = 1, 2, …``; the first candidate that reproduces every value of the group wins.
    ``k = 1`` is tried on every group at once (rows of ``(groups, group_len)``); the groups
    it does not fit go on with their distinct ``(group, value)`` pairs only.

    Args:
        flat: the flat tensor.
        group_len: elements per scale group.
        max_divisor: the largest ``k`` tried.
        max_levels: give up (None) when a group that ``k = 1`` does not fit holds more
            distinct nonzero values than this (None: no limit).

    Returns:
        ``(groups,)`` float32 scales, or None when some group has no such scale.
    """
    groups = flat.numel() // group_len
    rows = flat[: groups * group_len].reshape(groups, group_len)
    nonzero = rows != 0
    smallest = torch.where(nonzero, rows.abs(), math.inf).amin(1) if group_len else torch.full((groups,), math.inf)
    first = fp16_exact(smallest)
    a = torch.round(rows / first[:, None])
    fits = ((a * first[:, None] == rows) & (a.abs() < 1 << 15)).all(1) & (first > 0) & torch.isfinite(first)
    empty = ~nonzero.any(1)
    done = empty | fits
    scales = torch.where(fits & ~empty, first, torch.ones(groups))
    if bool(done.all()):
        return scales
    index = flat_nonzero(nonzero & ~done[:, None])
    keys = sorted_unique((index // group_len) << 32 | float_bits(take(flat, index)))
    pair_group, pair_value = keys >> 32, bits_float(keys & 0xFFFFFFFF)
    if max_levels is not None and int(torch.bincount(pair_group).max()) > max_levels:
        return None
    for k in range(2, max_divisor + 1):
        if bool(done.all()):
            break
        done, scales = _accept(pair_group, pair_value, fp16_exact(smallest / k), done, scales)
    return scales if bool(done.all()) else None


def _accept(group: torch.Tensor, value: torch.Tensor, candidate: torch.Tensor, done: torch.Tensor, scales: torch.Tensor):
    """Take ``candidate[g]`` for every open group ``g`` whose values it reproduces."""
    select = ~done[group]
    g, v = (group, value) if bool(select.all()) else (group[select], value[select])
    s = candidate[g]
    a = torch.round(v / s)
    good = (a * s == v) & (a.abs() < 1 << 15)
    bad = ~((candidate > 0) & torch.isfinite(candidate))
    if not bool(good.all()):
        bad[g[~good]] = True
    accept = ~done & ~bad
    return done | accept, torch.where(accept, candidate, scales)


def deadzone_grid(
    flat: torch.Tensor, max_divisor: int = MAX_SCALE_DIVISOR, max_levels: int | None = None
) -> tuple[float, float, torch.Tensor, torch.Tensor] | None:
    """float16 ``(s, δ)`` with every nonzero ``|v| = s·a + δ`` in float32, ``a ≥ 1`` an integer.

    Candidates: ``s = fp16(g / j)`` for the smallest gap ``g`` between distinct magnitudes
    (the smallest magnitude when there is one) and ``δ = fp16(v_min − s·a_1)``.

    Returns:
        ``(s, δ, magnitudes, integer levels of the magnitudes)`` or None (also when there
        are more than ``max_levels`` magnitudes).
    """
    magnitudes = sorted_unique(flat[flat != 0].abs())
    if max_levels is not None and magnitudes.numel() > max_levels:
        return None
    if magnitudes.numel() == 0:
        return 1.0, 0.0, magnitudes, torch.zeros(0, dtype=torch.int64)
    gap = (magnitudes[1:] - magnitudes[:-1]).min() if magnitudes.numel() > 1 else magnitudes[0]
    first = torch.arange(1, max_divisor + 1, dtype=torch.float32)
    for j in range(1, max_divisor + 1):
        s = fp16_exact(gap / j)
        if not (bool(torch.isfinite(s)) and float(s) > 0):
            continue
        delta = fp16_exact(magnitudes[0] - s * first)
        a = torch.round((magnitudes[None, :] - delta[:, None]) / s)
        rebuilt = s * a + delta[:, None]
        good = ((rebuilt == magnitudes[None, :]) & (a >= 1) & (a < 1 << 15)).all(1) & torch.isfinite(delta)
        if bool(good.any()):
            pick = int(good.nonzero()[0])
            return float(s), float(delta[pick]), magnitudes, a[pick].to(torch.int64)
    return None


def level_codes(
    levels: torch.Tensor, positions: torch.Tensor, group_len: int, group_count: int, bits: int, offsets: bool = False
) -> tuple[dict, dict, torch.Tensor] | None:
    """Map integer levels to ``bits``-bit codes, cheapest exact way first.

    ``alphabet``: one sorted list of the levels used in the tensor (in the header);
    otherwise, when each group uses at most ``2^bits`` levels, the cheaper of
    ``offsets`` (code = level − the group's 16-bit offset; only when ``offsets``) and
    ``levelmap`` (a bitmap per group over the alphabet; code = rank among the group's
    levels).

    Returns:
        ``(description fields, parts, codes)`` or None when no mapping fits.
    """
    alphabet, index = unique_integers(levels)
    if alphabet.numel() <= 1 << bits:
        return {"levels": "alphabet", "alphabet": alphabet.tolist()}, {}, index
    groups = positions // group_len
    options = []
    if offsets:
        low = group_amin(groups, levels, group_count, 0)
        high = -group_amin(groups, -levels, group_count, 0)
        if int((high - low).max()) < 1 << bits and int(low.abs().max()) < 1 << 15:
            options.append(
                (16 * group_count, {"levels": "offsets", "alphabet": None}, {"offsets": low.to(torch.int16)}, levels - take(low, groups))
            )
    used = torch.zeros(group_count, alphabet.numel(), dtype=torch.bool)
    used[groups, index] = True
    if int(used.sum(1).max()) <= 1 << bits:
        rank = used.long().cumsum(1) - 1
        levelmap = pack_bits(used.reshape(-1).long(), 1)
        options.append((used.numel(), {"levels": "levelmap", "alphabet": alphabet.tolist()}, {"levelmap": levelmap}, rank[groups, index]))
    if not options:
        return None
    _, desc, parts, codes = min(options, key=lambda option: option[0])
    return desc, parts, codes


# ---------------------------------------------------------------------------- declared forms
def _levels_note(desc: dict, bits: int, spec_scale_values: int, groups: int) -> str | None:
    if desc["levels"] == "alphabet" or (desc["levels"] == "offsets" and spec_scale_values >= 2 * groups):
        return None  # in the accounting (offsets: a declared zero point per group)
    used = f"{len(desc['alphabet'])} levels" if desc["alphabet"] else "levels"
    return f"per-group {desc['levels']}: the tensor uses {used}, more than 2^{bits}, each group at most 2^{bits} (not in the accounting)"


def _fit_uniform(flat, positions, bits, group_lens, scale_values, max_levels):
    values = take(flat, positions)
    reason = "no float16 scale per group makes the values integer multiples of it"
    for group_len in group_lens:
        scales = uniform_scales(flat, group_len, max_levels=max_levels)
        if scales is None:
            continue
        levels = torch.round(values / per_position(scales, positions, group_len)).to(torch.int64)
        fitted = level_codes(levels, positions, group_len, scales.numel(), bits, offsets=True)
        if fitted is None:
            reason = "some group uses more than 2^bits integer levels"
            continue
        desc = {"values": "uniform", "group_len": group_len, "scales_dtype": "float16", **fitted[0]}
        return desc, {"scales": scales.to(torch.float16), **fitted[1]}, fitted[2], _levels_note(desc, bits, scale_values, scales.numel())
    return None, None, None, reason


def _fit_levels(kind, levels, positions, bits, group_len, group_count, scales):
    fitted = level_codes(levels, positions, group_len, group_count, bits)
    if fitted is None:
        return None, None, None, f"some group uses more than 2^bits {kind} levels"
    desc = {"values": kind, "group_len": group_len, "scales_dtype": "float16", **fitted[0]}
    return desc, {"scales": scales, **fitted[1]}, fitted[2], _levels_note(desc, bits, 0, group_count)


def _fit_deadzone(flat, positions, bits, group_len, max_levels):
    grid = deadzone_grid(flat, max_levels=max_levels)
    if grid is None:
        return None, None, None, "no float16 (step, offset) reproduces the dead-zone values"
    step, offset, magnitudes, integer = grid
    values = take(flat, positions)
    levels = _deadzone_levels(values, step, offset, magnitudes, integer)
    return _fit_levels(
        "deadzone", levels, positions, bits, group_len, flat.numel() // group_len, torch.tensor([step, offset], dtype=torch.float16)
    )


def _deadzone_levels(values: torch.Tensor, step: float, offset: float, magnitudes: torch.Tensor, integer: torch.Tensor) -> torch.Tensor:
    """Signed integer level of every value: ``±integer[j]`` where ``|v| = magnitudes[j]`` (0 for 0).

    Fast path: the level ``round((|v| − δ) / s)`` is looked up in a level → magnitude
    table and accepted when that gives ``|v|`` exactly for every nonzero value (the
    magnitudes are distinct, so this is the same ``j``); otherwise a search.
    """
    if magnitudes.numel() == 0:
        return torch.zeros(values.numel(), dtype=torch.int64)
    v = values.detach().numpy()
    mag = np.abs(v)
    top = int(integer.max())
    with np.errstate(invalid="ignore", over="ignore"):
        guess = np.clip(np.rint((mag - np.float32(offset)) / np.float32(step)), 0, top)
    guess = np.nan_to_num(guess).astype(np.int64)
    table = np.full(top + 1, np.nan, dtype=np.float32)
    table[integer.numpy()] = magnitudes.numpy()
    nonzero = v != 0
    if bool(((table[guess] == mag) | ~nonzero).all()):
        return torch.from_numpy(np.where(nonzero, guess * np.sign(v).astype(np.int64), 0))
    found = torch.searchsorted(magnitudes, values.abs()).clamp_max(magnitudes.numel() - 1)
    return torch.where(values == 0, 0, integer[found] * torch.sign(values).to(torch.int64))


def _half_keys(values: torch.Tensor) -> np.ndarray | None:
    """float16 bit patterns of float32 values, or None unless every value is float16-exact."""
    half = values.to(torch.float16)
    return half.view(torch.int16).numpy().view(np.uint16) if torch.equal(half.to(torch.float32), values) else None


def _fit_codebook(flat, positions, bits, group_len, max_levels):
    v = flat.numpy()
    nonzero = torch.from_numpy(v[v != 0])
    keys = _half_keys(nonzero)
    if keys is None:
        book = sorted_unique(nonzero)
    else:  # the distinct values by counting their 2^16 float16 patterns (no sort of the tensor)
        present = np.flatnonzero(np.bincount(keys, minlength=1 << 16)).astype(np.uint16)
        book = torch.from_numpy(np.sort(present.view(np.float16).astype(np.float32)))
    if max_levels is not None and book.numel() > max_levels:
        return None, None, None, f"more than {max_levels} codebook values"
    if not bool((fp16_exact(book) == book).all()):
        return None, None, None, "codebook values are not float16-exact"
    values = take(flat, positions)
    lookup = np.zeros(1 << 16, dtype=np.int64)  # float16 pattern -> 1 + index into the book
    lookup[book.numpy().astype(np.float16).view(np.uint16)] = np.arange(1, book.numel() + 1)
    value_keys = _half_keys(values)
    if value_keys is not None:
        levels = torch.from_numpy(np.where(values.numpy() == 0, 0, lookup[value_keys]))
    else:
        levels = torch.where(values == 0, 0, torch.searchsorted(book, values) + 1)
    return _fit_levels("codebook", levels, positions, bits, group_len, flat.numel() // group_len, book.to(torch.float16))


def _fit_table(flat, positions, group_len):
    """Per-group float32 table of the coded values (always exact)."""
    groups = positions // group_len
    count = flat.numel() // group_len
    pairs = groups << 32 | float_bits(take(flat, positions))
    keys = sorted_unique(pairs)
    inverse = torch.searchsorted(keys, pairs)
    key_group = keys >> 32
    starts = torch.searchsorted(keys, torch.arange(count, dtype=torch.int64) << 32)
    rank = torch.arange(keys.numel()) - starts[key_group]
    levels = int(rank.max()) + 1 if rank.numel() else 1
    table = torch.zeros(count, levels)
    table[key_group, rank] = bits_float(keys & 0xFFFFFFFF)
    return {"values": "table", "group_len": group_len, "table_levels": levels}, {"table": table}, take(rank, inverse)


def fit_values(
    flat: torch.Tensor, positions: torch.Tensor, spec: LayerSpec, bits: int, level_len: int, max_levels: int | None = None
) -> tuple[dict, dict[str, torch.Tensor], torch.Tensor, int, str | None]:
    """Integer codes for the values at ``positions`` in the form ``spec`` declares.

    Args:
        flat: the flat float32 tensor (zeros +0.0).
        positions: the elements that carry a code.
        spec: the declared encoding (grid, scale count).
        bits: code width (``FLOAT_BITS``: store the float32 bit patterns).
        level_len: elements per quantization group (the accounting's level groups).
        max_levels: skip a declared form whose groups hold more distinct values than
            this (bounds the search on unquantized values; None: no limit).

    Returns:
        ``(value description, parts, codes, code width, fallback note)``; the code width
        grows when the declared form does not reproduce the values (exact per-group
        float32 table, or raw float32).
    """
    desc, parts, codes, note = None, {}, None, None
    if bits == FLOAT_BITS:
        desc, codes = {"values": "raw"}, float_bits(take(flat, positions))
    elif spec.grid == "uniform":
        lens = [level_len] + [flat.numel() // k for k in (spec.scale_values, spec.scale_values // 2) if k > 0 and flat.numel() % k == 0]
        desc, parts, codes, note = _fit_uniform(flat, positions, bits, list(dict.fromkeys(lens)), spec.scale_values, max_levels)
    elif spec.grid == "deadzone":
        desc, parts, codes, note = _fit_deadzone(flat, positions, bits, level_len, max_levels)
    elif spec.grid == "codebook":
        desc, parts, codes, note = _fit_codebook(flat, positions, bits, level_len, max_levels)
    else:
        note = f"float values coded at {bits} bits need a codebook the accounting does not charge"
    if desc is None:  # the declared form does not reproduce the tensor: exact, bigger storage
        desc, parts, codes = _fit_table(flat, positions, level_len)
        bits = max(bits, bits_for_levels(desc["table_levels"]))
        if positions.numel() * FLOAT_BITS <= positions.numel() * bits + parts["table"].numel() * FLOAT_BITS:
            desc, parts, codes = {"values": "raw"}, {}, float_bits(take(flat, positions))
            bits = FLOAT_BITS
            note = f"{note}; stored as raw float32"
        else:
            note = f"{note}; stored as a per-group float32 table"
    if "scales" in parts and desc["values"] == "codebook":
        desc["codebook_size"] = parts["scales"].numel()
    return desc, parts, codes, bits, note


def value_parts(desc: dict) -> dict[str, int]:
    """Element count of the scale / offset / level-map / table parts a value description implies."""
    numel = math.prod(desc["shape"])
    values, parts = desc["values"], {}
    groups = numel // desc["group_len"] if desc.get("group_len") else 0
    if values == "uniform":
        parts["scales"] = groups
    elif values == "deadzone":
        parts["scales"] = 2
    elif values == "codebook":
        parts["scales"] = desc["codebook_size"]
    elif values == "table":
        parts["table"] = groups * desc["table_levels"]
    if values in ("uniform", "deadzone", "codebook"):
        if desc["levels"] == "offsets":
            parts["offsets"] = groups
        elif desc["levels"] == "levelmap":
            parts["levelmap"] = (groups * len(desc["alphabet"]) + 7) // 8
        elif desc["levels"] != "alphabet":
            raise ValueError(f"unknown level mapping {desc['levels']!r}")
    return parts


def per_position(values: torch.Tensor, positions: torch.Tensor, group_len: int) -> torch.Tensor:
    """``values[positions // group_len]`` (one value per group, looked up per position)."""
    count = values.numel() * group_len
    if positions.numel() == count and torch.equal(positions, torch.arange(count)):  # every position, in order
        return values.repeat_interleave(group_len)
    return take(values, positions // group_len)


def decode_values(desc: dict, parts: Mapping[str, torch.Tensor], codes: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """float32 values of the codes at ``positions`` (inverse of :func:`fit_values`).

    Raises:
        CodecError: a code outside its alphabet or group, an unknown value kind.
    """
    kind = desc["values"]
    if kind == "raw":
        return bits_float(codes)
    if kind == "table":
        table = parts["table"].reshape(-1, int(desc["table_levels"]))
        return table[positions // int(desc["group_len"]), codes]
    scales = parts["scales"].to(torch.float32)
    group_len = int(desc["group_len"])
    mapping = desc["levels"]
    if mapping == "offsets":
        levels = codes + parts["offsets"].to(torch.int64)[positions // group_len]
    else:
        alphabet = torch.tensor(desc["alphabet"], dtype=torch.int64)
        if mapping == "levelmap":  # row g: the group's levels in order, from its bitmap over the alphabet
            group_count = math.prod(desc["shape"]) // group_len
            used = unpack_bits(parts["levelmap"], 1, group_count * alphabet.numel()).reshape(group_count, -1).bool()
            width = max(int(used.sum(1).max()) if used.numel() else 1, 1)
            table = torch.zeros(used.shape[0], width, dtype=torch.int64)
            rows, columns = used.nonzero(as_tuple=True)
            table[rows, used.long().cumsum(1)[rows, columns] - 1] = alphabet[columns]
            groups = positions // group_len
            if codes.numel() and bool((codes >= used.sum(1)[groups]).any()):
                raise CodecError("a code names a level its group does not use")
            levels = table[groups, codes]
        else:
            if codes.numel() and int(codes.max()) >= alphabet.numel():
                raise CodecError(f"code {int(codes.max())} outside an alphabet of {alphabet.numel()} levels")
            levels = take(alphabet, codes)
    if kind == "uniform":
        return levels.to(torch.float32) * per_position(scales, positions, group_len)
    if kind == "deadzone":
        a = levels.to(torch.float32)
        return scales[0] * a + scales[1] * torch.sign(a)
    if kind == "codebook":
        if levels.numel() and (int(levels.min()) < 0 or int(levels.max()) > scales.numel()):
            raise CodecError(f"codebook level outside 0..{scales.numel()}")
        return take(torch.cat([scales.new_zeros(1), scales]), levels)
    raise CodecError(f"unknown value kind {kind!r}")


def level_group_len(weight: torch.Tensor, spec: LayerSpec) -> int:
    """Elements per quantization group, as :func:`slope_bench.metrics.group_rows` counts levels."""
    return max(weight.numel(), 1) // max(group_rows(weight, spec.granularity, spec.group_size).shape[0], 1)


# ---------------------------------------------------------------------------- zeros
def positive_zeros(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` with every ``-0.0`` replaced by ``+0.0`` (numerically the same model).

    Hardening with ``w · mask`` leaves ``-0.0`` wherever a negative weight was pruned;
    the packed file stores the sign of every zero (one bit per zero unless all zeros
    share it), so a pipeline that applies this to finalized weights gets files at the
    accounted size.
    """
    return torch.where(weight == 0, torch.zeros_like(weight), weight)


def negative_zero_mode(negative: torch.Tensor, flat: torch.Tensor, nnz: int) -> tuple[str, int, torch.Tensor | None]:
    """How the signs of zeros are stored: ``(none | all | bitmask, count, bitmask part)``."""
    negatives = int(negative.sum())
    mode = "none" if negatives == 0 else "all" if negatives == flat.numel() - nnz else "bitmask"
    return mode, negatives, pack_bits(negative[flat == 0].long(), 1) if mode == "bitmask" else None


def restore_zeros(out: torch.Tensor, desc: dict, negzero: torch.Tensor | None) -> torch.Tensor:
    """Check the nonzero count and give the zeros of a decoded flat tensor their signs."""
    nonzeros = int(np.count_nonzero(out.numpy()))  # numpy's count is several times faster
    if nonzeros != int(desc["nnz"]):
        raise CodecError(f"decoded {nonzeros} nonzeros, header says {desc['nnz']}")
    mode = desc["negative_zeros"]
    if mode not in ("none", "all", "bitmask"):
        raise CodecError(f"unknown negative_zeros {mode!r}")
    if mode != "none":
        zeros = flat_nonzero(out == 0)
        out[zeros if mode == "all" else zeros[unpack_bits(negzero, 1, zeros.numel()).bool()]] = -0.0
    return out


def negative_zeros(flat: torch.Tensor) -> torch.Tensor:
    """Where ``flat`` holds ``-0.0``."""
    return torch.signbit(flat) & (flat == 0)
