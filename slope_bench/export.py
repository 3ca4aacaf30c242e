"""Packed export: the compressed model as a real file, its measured size, an exact round trip.

``write_packed`` stores a finalized state dict as ``model.packed.safetensors``: every
targeted weight is bit-packed under exactly the encoding that
:func:`slope_bench.metrics.account_tensor` charges for it (same bit width, same N:M /
dense / mask / run-length choice, same filler rule), so the file size is the accounted
size plus the safetensors header; every other tensor is stored as it is. ``load_packed``
rebuilds every tensor bit for bit (checked against a SHA-256 of the state stored in the
header) and rejects a truncated, re-versioned or inconsistent file with a
:class:`PackedFormatError`.

File layout (version 1). A safetensors file whose ``__metadata__`` holds ``format``
(``slope_bench.packed``), ``version`` (``1``), ``keys`` (JSON list of the state-dict
keys, in order), ``tensors`` (JSON object: one description per packed key),
``sha256`` (of the decoded state) and ``encoding`` (this description in words). A key
that is not in ``tensors`` is stored as it is under its own name. A packed key ``K`` is
stored as the parts ``K::codes``, ``K::index``, ``K::scales``, ``K::offsets``,
``K::levelmap``, ``K::table`` and ``K::negzero`` (only those its description needs):

* bit streams (``codes``, ``index``, ``levelmap``, ``negzero``, all ``uint8``) are
  little-endian: value ``i`` of width ``b`` occupies stream bits ``[i·b, (i+1)·b)``,
  least significant bit first, stream bit ``j`` being bit ``j mod 8`` of byte ``⌊j/8⌋``;
* ``structure`` says which elements carry a code (flat row-major order):
  ``dense`` — all of them; ``mask`` — the nonzeros, ``index`` is a 1-bit mask over
  all elements; ``nm`` — in every group of ``m`` consecutive elements of
  :func:`slope_bench.sparsity.as_matrix` (``order``) exactly ``n`` positions, the
  nonzeros then the first zeros, named by their colex rank ``Σ_i C(c_i, i)``
  (``c_1 < … < c_n``, ``index_bits`` bits per group); ``rle`` — ``index`` holds one
  ``rle_width``-bit gap per entry (entry position = previous entry position + gap + 1,
  the first gap counts from position −1), and a gap of ``2^r`` or more is split by
  filler entries of gap ``2^r − 1`` whose code is the code of zero;
* ``g = position // group_len`` is an element's group; ``levels`` turns a code into an
  integer level ``a``: ``alphabet`` — ``a = alphabet[code]``; ``offsets`` —
  ``a = code + offsets[g]`` (int16); ``levelmap`` — ``levelmap`` holds one bit per
  (group, alphabet entry), row-major, and ``a`` is the ``code``-th level its group uses;
* ``values`` turns the level into a float32 value: ``uniform`` —
  ``float32(a) · float32(scales[g])``; ``deadzone`` — ``s·a + δ·sign(a)`` in float32
  with ``(s, δ) = scales``; ``codebook`` — ``0`` if ``a = 0`` else ``scales[a − 1]``;
  ``raw`` — the code is the float32 bit pattern; ``table`` — ``table[g, code]``;
* every element without a code is ``+0.0``; ``negative_zeros`` restores the sign of
  zeros: ``none``, ``all``, or ``bitmask`` (``negzero``: one bit per zero element);
* ``fallback`` is null, or says why the tensor departs from the accounted encoding
  (a level map or a float32 table when the declared form does not reproduce it).

Example::

    nbytes = write_packed(model.state_dict(), compressor.specs, run_dir / PACKED_NAME)
    assert all(torch.equal(a, b) for a, b in zip(load_packed(run_dir / PACKED_NAME).values(), model.state_dict().values()))

Command line: ``python -m slope_bench.export verify RUN_DIR`` compares
``RUN_DIR/model.packed.safetensors`` with ``RUN_DIR/finalized.safetensors``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from slope_bench.methods.base import LayerSpec
from slope_bench.metrics import FLOAT_BITS, account_tensor, group_rows, run_length_bits
from slope_bench.sparsity import NM, as_matrix
from slope_bench.utils import atomic_write_bytes

FORMAT = "slope_bench.packed"
VERSION = "1"
PACKED_NAME = "model.packed.safetensors"
FINALIZED_NAME = "finalized.safetensors"
SEPARATOR = "::"
PART_DTYPES = {
    "codes": torch.uint8,
    "index": torch.uint8,
    "scales": torch.float16,
    "offsets": torch.int16,
    "levelmap": torch.uint8,
    "table": torch.float32,
    "negzero": torch.uint8,
}
MAX_RLE_WIDTH = 16
MAX_SCALE_DIVISOR = 256
NEGATIVE_ZERO_BITS = 0x80000000
CHUNK = 1 << 20  # codes per packing block (a multiple of 8: blocks start on byte boundaries)
ENCODING_DOC = " ".join(
    line.strip() for line in (__doc__ or "").partition("File layout (version 1).")[2].partition("Example::")[0].splitlines()
).strip()


class PackedFormatError(ValueError):
    """A packed file that cannot be trusted: truncated, another version, inconsistent."""


# ---------------------------------------------------------------------------- bit streams
def _check_width(bits: int, high: int = 32) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 0 <= bits <= high:
        raise ValueError(f"bit width must be an integer in 0..{high}, got {bits!r}")


def _pack_block(codes: torch.Tensor, bits: int) -> torch.Tensor:
    count = codes.numel()
    nbytes = (count * bits + 7) // 8
    if bits % 8 == 0:
        shifts = torch.arange(0, bits, 8, dtype=torch.int64)
        return ((codes[:, None] >> shifts) & 255).to(torch.uint8).reshape(-1)
    offsets = torch.arange(count, dtype=torch.int64) * bits
    first_byte = offsets >> 3
    shifted = codes << (offsets & 7)
    span = (bits + 7 + 7) // 8
    acc = torch.zeros(nbytes + span, dtype=torch.int64)
    for j in range(span):  # bytes a code can touch; the codes' bits never overlap, so add == or
        acc.index_add_(0, first_byte + j, (shifted >> (8 * j)) & 255)
    return acc[:nbytes].to(torch.uint8)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integer codes into a little-endian ``uint8`` bit stream.

    Args:
        codes: integers in ``[0, 2^bits)``, any shape (flattened).
        bits: code width, 0..32 (0: every code must be 0; nothing is stored).

    Returns:
        ``ceil(count·bits/8)`` bytes; code ``i`` occupies stream bits ``[i·bits, (i+1)·bits)``.
    """
    _check_width(bits)
    flat = codes.detach().reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, 2^{bits}), got [{int(flat.min())}, {int(flat.max())}]")
    if bits == 0:
        return torch.zeros(0, dtype=torch.uint8)
    out = torch.zeros((flat.numel() * bits + 7) // 8, dtype=torch.uint8)
    for start in range(0, flat.numel(), CHUNK):
        block = _pack_block(flat[start : start + CHUNK], bits)
        first = start * bits // 8
        out[first : first + block.numel()] = block
    return out


def unpack_bits(data: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` codes of a ``uint8`` stream (int64)."""
    _check_width(bits)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if bits == 0 or count == 0:
        return torch.zeros(count, dtype=torch.int64)
    data = data.detach().reshape(-1)
    need = (count * bits + 7) // 8
    if data.numel() < need:
        raise ValueError(f"{count} codes of {bits} bits need {need} bytes, got {data.numel()}")
    out = torch.empty(count, dtype=torch.int64)
    span = (bits + 7 + 7) // 8
    for start in range(0, count, CHUNK):
        n = min(CHUNK, count - start)
        first = start * bits // 8
        block = data[first : first + (n * bits + 7) // 8].to(torch.int64)
        if bits % 8 == 0:
            shifts = torch.arange(0, bits, 8, dtype=torch.int64)
            out[start : start + n] = (block.reshape(n, bits // 8) << shifts).sum(1)
            continue
        padded = torch.cat([block, block.new_zeros(span)])
        offsets = torch.arange(n, dtype=torch.int64) * bits
        first_byte = offsets >> 3
        word = torch.zeros(n, dtype=torch.int64)
        for j in range(span):
            word |= padded[first_byte + j] << (8 * j)
        out[start : start + n] = (word >> (offsets & 7)) & ((1 << bits) - 1)
    return out


# ---------------------------------------------------------------------------- N:M ranks
def binomial_table(m: int) -> torch.Tensor:
    """``C(p, k)`` for ``p, k`` in ``0..m`` as an ``(m+1, m+1)`` int64 table."""
    if not 1 <= m <= 62:
        raise ValueError(f"m must be in 1..62, got {m}")
    return torch.tensor([[math.comb(p, k) for k in range(m + 1)] for p in range(m + 1)], dtype=torch.int64)


def nm_rank(keep: torch.Tensor) -> torch.Tensor:
    """Colex rank ``Σ_i C(c_i, i)`` of the kept positions ``c_1 < … < c_n`` of each row.

    Args:
        keep: ``(groups, m)`` bool, the same number ``n`` of True in every row.

    Returns:
        ``(groups,)`` int64 ranks in ``[0, C(m, n))``.
    """
    groups, m = keep.shape
    if groups == 0:
        return torch.zeros(0, dtype=torch.int64)
    counts = keep.sum(1)
    if bool((counts != counts[0]).any()):
        raise ValueError("every group must keep the same number of positions")
    order = keep.long().cumsum(1)  # i of position p when p is kept
    positions = torch.arange(m).expand(groups, m)
    return (binomial_table(m)[positions, order] * keep).sum(1)


def nm_unrank(ranks: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Inverse of :func:`nm_rank`: ``(groups, m)`` bool keep patterns from colex ranks."""
    ranks = ranks.reshape(-1).to(torch.int64)
    table = binomial_table(m)
    if ranks.numel() and (int(ranks.min()) < 0 or int(ranks.max()) >= math.comb(m, n)):
        raise ValueError(f"N:M ranks must lie in [0, C({m}, {n}) = {math.comb(m, n)})")
    keep = torch.zeros(ranks.numel(), m, dtype=torch.bool)
    rest = ranks.clone()
    rows = torch.arange(ranks.numel())
    for i in range(n, 0, -1):  # greedy: the largest c with C(c, i) <= rest
        column = table[:m, i]
        c = (column[None, :] <= rest[:, None]).sum(1) - 1
        keep[rows, c] = True
        rest = rest - column[c]
    return keep


def nm_keep(nonzero: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` coded positions per row: the nonzeros, then the first zeros."""
    missing = n - nonzero.sum(1, keepdim=True)
    if bool((missing < 0).any()):
        raise ValueError(f"a group holds more than n={n} nonzeros")
    zero_order = (~nonzero).long().cumsum(1)
    return nonzero | (~nonzero & (zero_order <= missing))


# ---------------------------------------------------------------------------- run length
def rle_width(nonzero: torch.Tensor, value_bits: int) -> tuple[int, int]:
    """(field width ``r`` in 1..16, total bits) of the cheapest run-length encoding.

    Same cost as :func:`slope_bench.metrics.run_length_bits` (entries × (r + value bits),
    ``⌊gap / 2^r⌋`` fillers per gap); ties go to the smallest ``r``.
    """
    index = nonzero.reshape(-1).bool().nonzero().reshape(-1)
    if index.numel() == 0:
        return 1, 0
    gaps = index - torch.cat([index.new_tensor([-1]), index[:-1]]) - 1
    costs = [(index.numel() + int((gaps >> r).sum())) * (r + value_bits) for r in range(1, MAX_RLE_WIDTH + 1)]
    best = min(range(len(costs)), key=costs.__getitem__)
    return best + 1, costs[best]


def rle_encode(nonzero: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Run-length entries of the nonzeros of a flat mask.

    Returns:
        ``(gaps, positions)``: one ``width``-bit gap per entry and the element position
        each entry codes (fillers sit on zeros, each covering ``2^width`` positions).
    """
    index = nonzero.reshape(-1).bool().nonzero().reshape(-1)
    if index.numel() == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty
    gaps = index - torch.cat([index.new_tensor([-1]), index[:-1]]) - 1
    fillers = gaps >> width
    per_nonzero = fillers + 1
    last = per_nonzero.cumsum(0) - 1
    entries = torch.full((int(per_nonzero.sum()),), (1 << width) - 1, dtype=torch.int64)
    entries[last] = gaps - (fillers << width)
    return entries, rle_decode(entries)


def rle_decode(gaps: torch.Tensor) -> torch.Tensor:
    """Element positions of run-length entries: ``cumsum(gap + 1) − 1``."""
    return (gaps.to(torch.int64) + 1).cumsum(0) - 1


# ---------------------------------------------------------------------------- float helpers
def float_bits(values: torch.Tensor) -> torch.Tensor:
    """float32 bit patterns as int64 in ``[0, 2^32)``."""
    return values.detach().float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def bits_float(patterns: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`float_bits`."""
    signed = torch.where(patterns >= 1 << 31, patterns - (1 << 32), patterns)
    return signed.to(torch.int32).view(torch.float32)


def fp16_round(values: torch.Tensor) -> torch.Tensor:
    """Nearest float16 value, kept as float32 (inf when out of range)."""
    return values.to(torch.float16).to(torch.float32)


def positive_zeros(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` with every ``-0.0`` replaced by ``+0.0`` (numerically the same model).

    Hardening with ``w · mask`` leaves ``-0.0`` wherever a negative weight was pruned;
    the packed file stores the sign of every zero (one bit per zero unless all zeros
    share it), so a pipeline that applies this to finalized weights gets files at the
    accounted size.
    """
    return torch.where(weight == 0, torch.zeros_like(weight), weight)


def width_for(levels: int) -> int:
    """Bits that index ``levels`` values (at least 1)."""
    return max(1, (max(levels, 1) - 1).bit_length())


def _group_amin(groups: torch.Tensor, values: torch.Tensor, count: int, empty: float) -> torch.Tensor:
    out = torch.full((count,), empty, dtype=values.dtype)
    return out.scatter_reduce(0, groups, values, "amin", include_self=True)


# ---------------------------------------------------------------------------- value maps
def uniform_scales(flat: torch.Tensor, group_len: int, max_divisor: int = MAX_SCALE_DIVISOR) -> torch.Tensor | None:
    """Per-group float16 scales ``s`` with every value an integer multiple ``a·s`` (float32-exact).

    Candidates are ``fp16(v_min / k)``, ``v_min`` the group's smallest nonzero ``|v|`` and
    ``k = 1, 2, …``; the first candidate that reproduces every value of the group wins.
    Works on the distinct ``(group, value)`` pairs only.

    Returns:
        ``(groups,)`` float32 scales, or None when some group has no such scale.
    """
    groups = flat.numel() // group_len
    nonzero = (flat != 0).nonzero().reshape(-1)
    keys = torch.unique((nonzero // group_len) << 32 | float_bits(flat[nonzero]))
    pair_group, pair_value = keys >> 32, bits_float(keys & 0xFFFFFFFF)
    smallest = _group_amin(pair_group, pair_value.abs(), groups, math.inf)
    scales = torch.ones(groups)
    done = torch.isinf(smallest)
    for k in range(1, max_divisor + 1):
        if bool(done.all()):
            break
        candidate = torch.where(done, scales, fp16_round(smallest / k))
        select = ~done[pair_group]
        s, v = candidate[pair_group[select]], pair_value[select]
        a = torch.round(v / s)
        good = (a * s == v) & (a.abs() < 1 << 15) & (s > 0) & torch.isfinite(s)
        bad = torch.zeros(groups, dtype=torch.bool)
        bad[pair_group[select][~good]] = True
        accept = ~done & ~bad
        scales = torch.where(accept, candidate, scales)
        done = done | accept
    return scales if bool(done.all()) else None


def deadzone_grid(flat: torch.Tensor, max_divisor: int = MAX_SCALE_DIVISOR) -> tuple[float, float, torch.Tensor, torch.Tensor] | None:
    """float16 ``(s, δ)`` with every nonzero ``|v| = s·a + δ`` in float32, ``a ≥ 1`` an integer.

    Candidates: ``s = fp16(g / j)`` for the smallest gap ``g`` between distinct magnitudes
    (the smallest magnitude when there is one) and ``δ = fp16(v_min − s·a_1)``.

    Returns:
        ``(s, δ, magnitudes, integer levels of the magnitudes)`` or None.
    """
    magnitudes = torch.unique(flat[flat != 0].abs())
    if magnitudes.numel() == 0:
        return 1.0, 0.0, magnitudes, torch.zeros(0, dtype=torch.int64)
    gap = (magnitudes[1:] - magnitudes[:-1]).min() if magnitudes.numel() > 1 else magnitudes[0]
    first = torch.arange(1, max_divisor + 1, dtype=torch.float32)
    for j in range(1, max_divisor + 1):
        s = fp16_round(gap / j)
        if not (bool(torch.isfinite(s)) and float(s) > 0):
            continue
        delta = fp16_round(magnitudes[0] - s * first)
        a = torch.round((magnitudes[None, :] - delta[:, None]) / s)
        rebuilt = s * a + delta[:, None]
        good = ((rebuilt == magnitudes[None, :]) & (a >= 1) & (a < 1 << 15)).all(1) & torch.isfinite(delta)
        if bool(good.any()):
            pick = int(good.nonzero()[0])
            return float(s), float(delta[pick]), magnitudes, a[pick].to(torch.int64)
    return None


def unique_integers(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.unique(values, return_inverse=True)`` for int64, by counting when the range is small."""
    if values.numel() == 0:
        return values.new_zeros(0), values.new_zeros(0)
    low, high = int(values.min()), int(values.max())
    if high - low >= 1 << 20:
        return torch.unique(values, return_inverse=True)
    present = torch.bincount(values - low, minlength=high - low + 1) > 0
    lookup = present.long().cumsum(0) - 1
    return present.nonzero().reshape(-1) + low, lookup[values - low]


def level_codes(
    levels: torch.Tensor, groups: torch.Tensor, group_count: int, bits: int, offsets: bool = False
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
    options = []
    if offsets:
        low = _group_amin(groups, levels, group_count, 0)
        high = -_group_amin(groups, -levels, group_count, 0)
        if int((high - low).max()) < 1 << bits and int(low.abs().max()) < 1 << 15:
            options.append(
                (16 * group_count, {"levels": "offsets", "alphabet": None}, {"offsets": low.to(torch.int16)}, levels - low[groups])
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


def _levels_note(desc: dict, bits: int, spec_scale_values: int, groups: int) -> str | None:
    if desc["levels"] == "alphabet" or (desc["levels"] == "offsets" and spec_scale_values >= 2 * groups):
        return None  # in the accounting (offsets: a declared zero point per group)
    used = f"{len(desc['alphabet'])} levels" if desc["alphabet"] else "levels"
    return f"per-group {desc['levels']}: the tensor uses {used}, more than 2^{bits}, each group at most 2^{bits} (not in the accounting)"


def _fit_uniform(flat, positions, bits, group_lens, scale_values):
    values = flat[positions]
    reason = "no float16 scale per group makes the values integer multiples of it"
    for group_len in group_lens:
        scales = uniform_scales(flat, group_len)
        if scales is None:
            continue
        groups = positions // group_len
        levels = torch.round(values / scales[groups]).to(torch.int64)
        fitted = level_codes(levels, groups, scales.numel(), bits, offsets=True)
        if fitted is None:
            reason = "some group uses more than 2^bits integer levels"
            continue
        desc = {"values": "uniform", "group_len": group_len, "scales_dtype": "float16", **fitted[0]}
        return desc, {"scales": scales.to(torch.float16), **fitted[1]}, fitted[2], _levels_note(desc, bits, scale_values, scales.numel())
    return None, None, None, reason


def _fit_levels(kind, levels, positions, bits, group_len, group_count, scales):
    groups = positions // group_len
    fitted = level_codes(levels, groups, group_count, bits)
    if fitted is None:
        return None, None, None, f"some group uses more than 2^bits {kind} levels"
    desc = {"values": kind, "group_len": group_len, "scales_dtype": "float16", **fitted[0]}
    return desc, {"scales": scales, **fitted[1]}, fitted[2], _levels_note(desc, bits, 0, group_count)


def _fit_deadzone(flat, positions, bits, group_len):
    grid = deadzone_grid(flat)
    if grid is None:
        return None, None, None, "no float16 (step, offset) reproduces the dead-zone values"
    step, offset, magnitudes, integer = grid
    values = flat[positions]
    found = torch.searchsorted(magnitudes, values.abs()).clamp_max(max(magnitudes.numel() - 1, 0))
    levels = (
        torch.where(values == 0, 0, integer[found] * torch.sign(values).to(torch.int64))
        if magnitudes.numel()
        else torch.zeros_like(positions)
    )
    return _fit_levels(
        "deadzone", levels, positions, bits, group_len, flat.numel() // group_len, torch.tensor([step, offset], dtype=torch.float16)
    )


def _fit_codebook(flat, positions, bits, group_len):
    book = torch.unique(flat[flat != 0])
    if not bool((fp16_round(book) == book).all()):
        return None, None, None, "codebook values are not float16-exact"
    values = flat[positions]
    levels = torch.where(values == 0, 0, torch.searchsorted(book, values) + 1)
    return _fit_levels("codebook", levels, positions, bits, group_len, flat.numel() // group_len, book.to(torch.float16))


def _fit_table(flat, positions, group_len):
    """Per-group float32 table of the coded values (always exact)."""
    groups = positions // group_len
    count = flat.numel() // group_len
    keys, inverse = torch.unique(groups << 32 | float_bits(flat[positions]), return_inverse=True)
    key_group = keys >> 32
    starts = torch.searchsorted(keys, torch.arange(count, dtype=torch.int64) << 32)
    rank = torch.arange(keys.numel()) - starts[key_group]
    levels = int(rank.max()) + 1 if rank.numel() else 1
    table = torch.zeros(count, levels)
    table[key_group, rank] = bits_float(keys & 0xFFFFFFFF)
    return {"values": "table", "group_len": group_len, "table_levels": levels}, {"table": table}, rank[inverse]


# ---------------------------------------------------------------------------- one tensor
def _structure(flat, shape, spec, account):
    """Which elements carry codes, in stream order, and the index part (per the accounting)."""
    numel = flat.numel()
    nonzero = flat != 0
    pattern = spec.pattern
    if isinstance(pattern, NM) and account.pattern == str(pattern):
        grid = as_matrix(torch.arange(numel).reshape(shape), pattern.order).reshape(-1, pattern.m)
        keep = nm_keep(nonzero[grid], pattern.n)
        desc = {"structure": "nm", "n": pattern.n, "m": pattern.m, "order": pattern.order, "index_bits": pattern.index_bits}
        return desc, grid[keep], pack_bits(nm_rank(keep), pattern.index_bits)
    if account.pattern == "dense":
        return {"structure": "dense"}, torch.arange(numel), None
    if account.index_bits > 0:
        return {"structure": "mask"}, nonzero.nonzero().reshape(-1), pack_bits(nonzero.long(), 1)
    width, cost = rle_width(nonzero, account.w_bits)
    if cost != run_length_bits(nonzero, account.w_bits):
        raise RuntimeError("run-length cost disagrees with metrics.run_length_bits")
    gaps, positions = rle_encode(nonzero, width)
    return {"structure": "rle", "rle_width": width}, positions, pack_bits(gaps, width)


def _part_bytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def _expected_parts(desc: dict) -> dict[str, int]:
    """Element count of every part a description implies (the reader's consistency check)."""
    numel = math.prod(desc["shape"])
    parts = {"codes": _part_bytes(desc["count"], desc["bits"])}
    structure = desc["structure"]
    if structure == "nm":
        parts["index"] = _part_bytes(numel // desc["m"], desc["index_bits"])
    elif structure == "mask":
        parts["index"] = _part_bytes(numel, 1)
    elif structure == "rle":
        parts["index"] = _part_bytes(desc["count"], desc["rle_width"])
    values = desc["values"]
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
            parts["levelmap"] = _part_bytes(groups * len(desc["alphabet"]), 1)
        elif desc["levels"] != "alphabet":
            raise ValueError(f"unknown level mapping {desc['levels']!r}")
    if desc["negative_zeros"] == "bitmask":
        parts["negzero"] = _part_bytes(numel - desc["nnz"], 1)
    return parts


def encode_tensor(name: str, weight: torch.Tensor, spec: LayerSpec) -> tuple[dict, dict[str, torch.Tensor]]:
    """Pack one finalized float32 weight under the encoding that the accounting charges.

    Args:
        name: the tensor's name (for messages and the account).
        weight: the finalized weight.
        spec: its declared encoding.

    Returns:
        ``(description, parts)``; the description is JSON-serialisable.
    """
    w = weight.detach().cpu().contiguous()
    flat = w.reshape(-1)
    negative = float_bits(flat) == NEGATIVE_ZERO_BITS
    flat = positive_zeros(flat)  # the signs of zeros go to `negzero`
    account = account_tensor(name, w, spec)
    structure, positions, index = _structure(flat, w.shape, spec, account)
    bits = account.w_bits
    level_len = max(flat.numel(), 1) // max(group_rows(w, spec.granularity, spec.group_size).shape[0], 1)

    desc, parts, codes, note = None, {}, None, None
    if bits == FLOAT_BITS:
        desc, codes = {"values": "raw"}, float_bits(flat[positions])
    elif spec.grid == "uniform":
        lens = [level_len] + [flat.numel() // k for k in (spec.scale_values, spec.scale_values // 2) if k > 0 and flat.numel() % k == 0]
        desc, parts, codes, note = _fit_uniform(flat, positions, bits, list(dict.fromkeys(lens)), spec.scale_values)
    elif spec.grid == "deadzone":
        desc, parts, codes, note = _fit_deadzone(flat, positions, bits, level_len)
    elif spec.grid == "codebook":
        desc, parts, codes, note = _fit_codebook(flat, positions, bits, level_len)
    else:
        note = f"float values coded at {bits} bits need a codebook the accounting does not charge"
    if desc is None:  # the declared form does not reproduce the tensor: exact, bigger storage
        desc, parts, codes = _fit_table(flat, positions, level_len)
        bits = max(bits, width_for(desc["table_levels"]))
        if positions.numel() * FLOAT_BITS <= positions.numel() * bits + parts["table"].numel() * FLOAT_BITS:
            desc, parts, codes = {"values": "raw"}, {}, float_bits(flat[positions])
            bits = FLOAT_BITS
            note = f"{note}; stored as raw float32"
        else:
            note = f"{note}; stored as a per-group float32 table"
    if "scales" in parts and desc["values"] == "codebook":
        desc["codebook_size"] = parts["scales"].numel()

    negatives = int(negative.sum())
    zeros = flat.numel() - account.nnz
    mode = "none" if negatives == 0 else "all" if negatives == zeros else "bitmask"
    if mode == "bitmask":
        parts["negzero"] = pack_bits(negative[flat == 0].long(), 1)
    desc = {
        "shape": list(w.shape),
        "dtype": "float32",
        **structure,
        "bits": bits,
        "count": positions.numel(),
        **desc,
        "nnz": account.nnz,
        "negative_zeros": mode,
        "negative_zero_count": negatives,
        "fallback": note,
        "accounted_bits": account.total_bits,
    }
    parts["codes"] = pack_bits(codes, bits)
    if index is not None:
        parts["index"] = index
    return desc, parts


def _fail(where: str, message: str) -> PackedFormatError:
    return PackedFormatError(f"{where}: {message}")


def decode_tensor(name: str, desc: dict, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Rebuild one float32 tensor from its description and parts (see the module docstring).

    Raises:
        PackedFormatError: the parts disagree with the description.
    """
    try:
        shape = [int(s) for s in desc["shape"]]
        numel = math.prod(shape)
        structure, bits, count = desc["structure"], int(desc["bits"]), int(desc["count"])
        if structure == "nm":
            n, m = int(desc["n"]), int(desc["m"])
            matrix = as_matrix(torch.arange(numel).reshape(shape), desc["order"])
            if matrix.shape[1] % m or count != numel // m * n:
                raise _fail(name, f"N:M {n}:{m} does not fit shape {shape} with {count} codes")
            ranks = unpack_bits(parts["index"], int(desc["index_bits"]), numel // m)
            keep = nm_unrank(ranks, n, m)
            positions = matrix.reshape(-1, m)[keep]
        elif structure == "dense":
            positions = torch.arange(numel)
        elif structure == "mask":
            positions = unpack_bits(parts["index"], 1, numel).bool().nonzero().reshape(-1)
        elif structure == "rle":
            positions = rle_decode(unpack_bits(parts["index"], int(desc["rle_width"]), count))
        else:
            raise _fail(name, f"unknown structure {structure!r}")
        if positions.numel() != count or (count and int(positions[-1]) >= numel):
            raise _fail(name, f"structure {structure} gives {positions.numel()} coded positions, header says {count} within {numel}")
        codes = unpack_bits(parts["codes"], bits, count)
        values = _decode_values(name, desc, parts, codes, positions)
        out = torch.zeros(numel)
        out[positions] = values
        zeros = (out == 0).nonzero().reshape(-1)
        if zeros.numel() != numel - int(desc["nnz"]):
            raise _fail(name, f"decoded {numel - zeros.numel()} nonzeros, header says {desc['nnz']}")
        if desc["negative_zeros"] == "all":
            out[zeros] = -0.0
        elif desc["negative_zeros"] == "bitmask":
            out[zeros[unpack_bits(parts["negzero"], 1, zeros.numel()).bool()]] = -0.0
        return out.reshape(shape)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        if isinstance(e, PackedFormatError):
            raise
        raise _fail(name, f"inconsistent description or parts ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def _decode_values(name, desc, parts, codes, positions):
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
                raise _fail(name, "a code names a level its group does not use")
            levels = table[groups, codes]
        else:
            if codes.numel() and int(codes.max()) >= alphabet.numel():
                raise _fail(name, f"code {int(codes.max())} outside an alphabet of {alphabet.numel()} levels")
            levels = alphabet[codes]
    if kind == "uniform":
        return levels.to(torch.float32) * scales[positions // group_len]
    if kind == "deadzone":
        a = levels.to(torch.float32)
        return scales[0] * a + scales[1] * torch.sign(a)
    if kind == "codebook":
        return torch.cat([scales.new_zeros(1), scales])[levels]
    raise _fail(name, f"unknown value kind {kind!r}")


# ---------------------------------------------------------------------------- whole files
def state_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in order."""
    digest = hashlib.sha256()
    for key, tensor in state.items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{list(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (``-0.0 ≠ +0.0``, NaN payloads compared)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(
        a.detach().cpu().contiguous().reshape(-1).view(torch.uint8), b.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    )


def pack_state(state_dict: Mapping[str, torch.Tensor], specs: Mapping[str, LayerSpec]) -> bytes:
    """The packed file's bytes (see :func:`write_packed`)."""
    from safetensors.torch import save

    targeted = {}
    for module, spec in specs.items():
        key = f"{module}.weight" if module else "weight"
        if key not in state_dict:
            raise KeyError(f"targeted module {module!r} has no {key!r} in the state dict")
        targeted[key] = spec
    descriptions, tensors = {}, {}
    for key, tensor in state_dict.items():
        if SEPARATOR in key:
            raise ValueError(f"state-dict key {key!r} contains the reserved {SEPARATOR!r}")
        if key not in targeted or tensor.dtype != torch.float32:
            tensors[key] = tensor.detach().cpu().contiguous().clone()
            continue
        desc, parts = encode_tensor(key, tensor, targeted[key])
        if not same_bits(decode_tensor(key, desc, parts), tensor):
            raise RuntimeError(f"{key}: packed encoding does not reproduce the tensor (a bug in slope_bench.export)")
        descriptions[key] = desc
        tensors.update({f"{key}{SEPARATOR}{part}": value.contiguous() for part, value in parts.items()})
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "keys": json.dumps(list(state_dict)),
        "tensors": json.dumps(descriptions, separators=(",", ":")),
        "sha256": state_sha256(state_dict),
        "encoding": ENCODING_DOC,
    }
    return save(tensors, metadata=metadata)


def write_packed(state_dict: Mapping[str, torch.Tensor], specs: Mapping[str, LayerSpec], path: str | Path) -> int:
    """Write ``model.packed.safetensors`` (atomically); returns the bytes written.

    Args:
        state_dict: the finalized model's ``state_dict()``.
        specs: declared encodings by targeted module name (weight key ``<name>.weight``).
        path: the file to write.

    Every packed tensor is decoded again before writing and compared bit for bit with
    the input; an encoding that would not reproduce it raises instead of writing.
    """
    data = pack_state(state_dict, specs)
    atomic_write_bytes(path, data)
    return len(data)


def read_metadata(data: bytes, where: str) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors byte string, checked for format and version."""
    if len(data) < 8:
        raise _fail(where, f"truncated file ({len(data)} bytes, no safetensors header)")
    size = int.from_bytes(data[:8], "little")
    if 8 + size > len(data):
        raise _fail(where, f"truncated file (header of {size} bytes, file of {len(data)})")
    try:
        header = json.loads(data[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(where, f"unreadable safetensors header ({e})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _fail(where, f"not a {FORMAT} file (metadata format {None if not isinstance(meta, dict) else meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise _fail(where, f"format version {meta.get('version')!r} is not supported (this reader reads version {VERSION})")
    return meta


def load_packed(path: str | Path) -> dict[str, torch.Tensor]:
    """Rebuild the exact state dict stored by :func:`write_packed`.

    Raises:
        PackedFormatError: truncated file, another format or version, a header that
            disagrees with the stored tensors, or a decoded state whose SHA-256 differs.
    """
    return load_bytes(Path(path).read_bytes(), str(path))


def load_bytes(data: bytes, where: str = "packed model") -> dict[str, torch.Tensor]:
    """:func:`load_packed` on the file's bytes; ``where`` names it in error messages."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    meta = read_metadata(data, where)
    try:
        stored = load(data)
        keys = json.loads(meta["keys"])
        descriptions = json.loads(meta["tensors"])
    except (SafetensorError, KeyError, json.JSONDecodeError) as e:
        raise _fail(where, f"unreadable file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(keys, list) or not isinstance(descriptions, dict) or not set(descriptions) <= set(keys):
        raise _fail(where, "header lists packed tensors that are not among its keys")
    expected = {}
    for key in keys:
        if key not in descriptions:
            expected[key] = None
            continue
        try:
            sizes = _expected_parts(descriptions[key])
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            raise _fail(where, f"{key}: incomplete description ({type(e).__name__}: {e})") from None
        for part, numel in sizes.items():
            expected[f"{key}{SEPARATOR}{part}"] = (PART_DTYPES[part], numel)
    if set(expected) != set(stored):
        missing, extra = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
        raise _fail(where, f"header and tensors disagree (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, want in expected.items():
        if want is not None and (stored[name].dtype != want[0] or stored[name].numel() != want[1]):
            raise _fail(where, f"{name}: {stored[name].numel()} × {stored[name].dtype} stored, header implies {want[1]} × {want[0]}")
    state = {}
    for key in keys:
        if key not in descriptions:
            state[key] = stored[key]
            continue
        prefix = f"{key}{SEPARATOR}"
        parts = {name[len(prefix) :]: t for name, t in stored.items() if name.startswith(prefix)}
        state[key] = decode_tensor(f"{where}: {key}", descriptions[key], parts)
    if state_sha256(state) != meta.get("sha256"):
        raise _fail(where, "decoded state does not match the stored SHA-256 (corrupted data)")
    return state


def dense_bytes(state_dict: Mapping[str, torch.Tensor]) -> int:
    """Size of the state dict saved as plain safetensors (the fp32 reference file)."""
    from safetensors.torch import save

    return len(save({k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}))


def export_packed(state_dict: Mapping[str, torch.Tensor], specs: Mapping[str, LayerSpec], out_dir: str | Path) -> dict[str, float]:
    """Write ``out_dir/model.packed.safetensors``; returns the ``compress/*`` file-size keys."""
    packed = write_packed(state_dict, specs, Path(out_dir) / PACKED_NAME)
    dense = dense_bytes(state_dict)
    return {"compress/packed_bytes": packed, "compress/dense_bytes": dense, "compress/measured_ratio": dense / packed}


# ---------------------------------------------------------------------------- command line
def verify(run_dir: str | Path) -> int:
    """Compare ``RUN_DIR/model.packed.safetensors`` with ``RUN_DIR/finalized.safetensors``.

    Prints both sizes and the measured ratio; returns 0 when every tensor is identical,
    1 on any mismatch or unreadable packed file, 2 when a file is missing.
    """
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    packed_path, finalized_path = run_dir / PACKED_NAME, run_dir / FINALIZED_NAME
    for path in (packed_path, finalized_path):
        if not path.is_file():
            print(f"error: {path} does not exist", file=sys.stderr)
            return 2
    finalized = load_file(str(finalized_path))
    try:
        packed = load_packed(packed_path)
    except PackedFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finalized_size, packed_size = finalized_path.stat().st_size, packed_path.stat().st_size
    print(f"{FINALIZED_NAME}: {finalized_size} bytes")
    print(f"{PACKED_NAME}: {packed_size} bytes")
    print(f"measured ratio: {finalized_size / packed_size:.3f}x")
    problems = [f"missing {k}" for k in finalized if k not in packed] + [f"unexpected {k}" for k in packed if k not in finalized]
    problems += [f"differs: {k}" for k in finalized if k in packed and not same_bits(finalized[k], packed[k])]
    if problems:
        print(f"MISMATCH: {len(problems)} tensor(s): " + ", ".join(problems[:5]), file=sys.stderr)
        return 1
    print(f"ok: {len(finalized)} tensors identical bit for bit")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slope_bench.export", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("verify", help="check RUN_DIR/model.packed.safetensors against RUN_DIR/finalized.safetensors")
    check.add_argument("run_dir")
    args = parser.parse_args(argv)
    return verify(args.run_dir)


if __name__ == "__main__":
    sys.exit(main())
