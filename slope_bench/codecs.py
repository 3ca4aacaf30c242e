"""Pure bit-level codecs shared by the packed and the entropy-coded artifacts.

Every function here maps tensors to tensors (no files, no specs), vectorised over all
codes / groups at once (numpy / torch; no Python loop over groups):

* bit streams: :func:`pack_bits` / :func:`unpack_bits` — little-endian, least significant
  bit first, code ``i`` of width ``b`` in stream bits ``[i·b, (i+1)·b)``;
* N:M patterns: :func:`group_symbols` / :func:`symbol_bits` (a group's keep pattern as the
  integer ``Σ_j keep_j·2^j``), :func:`nm_rank` / :func:`nm_unrank` (colex ranks
  ``Σ_i C(c_i, i)``), :func:`nm_keep`;
* run length: :func:`rle_costs`, :func:`rle_width`, :func:`rle_encode`, :func:`rle_decode`;
* float bit views: :func:`float_bits` / :func:`bits_float`;
* range-coded symbol streams: :func:`encode_stream` / :func:`decode_stream` (constriction's
  ``RangeEncoder`` under the observed frequencies, one table per stream or per row).

Float values ↔ integer levels under float16 scales live in :mod:`slope_bench.levels`.

Example::

    assert torch.equal(unpack_bits(pack_bits(codes, 3), 3, codes.numel()), codes)
    assert torch.equal(nm_unrank(nm_rank(keep), 2, 4), keep)
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from functools import lru_cache

import numpy as np
import torch

from slope_bench.sparsity import as_matrix

COUNT_DTYPES = ("uint8", "uint16", "uint32")  # model-table count dtypes, smallest first

CHUNK = 1 << 20  # codes per block of the generic (bit-by-bit) path; a multiple of 8
MAX_RLE_WIDTH = 16
TABLE_M = 16  # N:M ranks go through 2^m lookup tables up to this m


class CodecError(ValueError):
    """Stored codes that do not decode: a code outside its alphabet or group, an unknown kind."""


# ---------------------------------------------------------------------------- bit streams
def check_width(bits: int, high: int = 32) -> None:
    """Raise ValueError unless ``bits`` is an integer in ``0..high``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 0 <= bits <= high:
        raise ValueError(f"bit width must be an integer in 0..{high}, got {bits!r}")


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integer codes into a little-endian ``uint8`` bit stream.

    Args:
        codes: integers in ``[0, 2^bits)``, any shape (flattened).
        bits: code width, 0..32 (0: every code must be 0; nothing is stored).

    Returns:
        ``ceil(count·bits/8)`` bytes; code ``i`` occupies stream bits ``[i·bits, (i+1)·bits)``.
    """
    check_width(bits)
    flat = codes.detach().reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, 2^{bits}), got [{int(flat.min())}, {int(flat.max())}]")
    if bits == 0:
        return torch.zeros(0, dtype=torch.uint8)
    count = flat.numel()
    nbytes = (count * bits + 7) // 8
    values = flat.numpy().astype("<u8")
    if bits % 8 == 0:  # whole bytes: the low bytes of each little-endian word
        out = values.view(np.uint8).reshape(-1, 8)[:, : bits // 8].reshape(-1)
    elif bits < 8:  # 8 codes fill exactly `bits` bytes of one 64-bit word
        rows = np.zeros(-(-count // 8) * 8, dtype="<u8")
        rows[:count] = values
        rows = rows.reshape(-1, 8)
        word = rows[:, 0].copy()
        for j in range(1, 8):
            word |= rows[:, j] << np.uint64(j * bits)
        out = word.view(np.uint8).reshape(-1, 8)[:, :bits].reshape(-1)[:nbytes]
    else:  # generic: one byte per bit, then np.packbits, block by block
        out = np.empty(nbytes, dtype=np.uint8)
        shifts = np.arange(bits, dtype="<u8")
        for start in range(0, count, CHUNK):
            block = ((values[start : start + CHUNK, None] >> shifts) & np.uint64(1)).astype(np.uint8)
            packed = np.packbits(block.reshape(-1), bitorder="little")
            out[start * bits // 8 : start * bits // 8 + packed.size] = packed
    return torch.from_numpy(np.ascontiguousarray(out))


def unpack_bits(data: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` codes of a ``uint8`` stream (int64)."""
    check_width(bits)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if bits == 0 or count == 0:
        return torch.zeros(count, dtype=torch.int64)
    need = (count * bits + 7) // 8
    stream = data.detach().reshape(-1)
    if stream.numel() < need:
        raise ValueError(f"{count} codes of {bits} bits need {need} bytes, got {stream.numel()}")
    raw = stream[:need].numpy()
    if bits % 8 == 0:
        words = np.zeros((count, 8), dtype=np.uint8)
        words[:, : bits // 8] = raw.reshape(count, bits // 8)
        out = words.view("<u8").reshape(-1)
    elif bits < 8:
        rows = -(-count // 8)  # 8 codes per `bits` bytes, widened to one 64-bit word
        words = np.zeros((rows, 8), dtype=np.uint8)
        padded = np.zeros(rows * bits, dtype=np.uint8)
        padded[:need] = raw
        words[:, :bits] = padded.reshape(rows, bits)
        word = words.view("<u8")  # (rows, 1)
        shifts = np.arange(0, 8 * bits, bits, dtype="<u8")
        out = ((word >> shifts) & np.uint64((1 << bits) - 1)).reshape(-1)[:count]
    else:
        out = np.empty(count, dtype="<u8")
        weights = np.left_shift(np.uint64(1), np.arange(bits, dtype="<u8"))
        for start in range(0, count, CHUNK):
            n = min(CHUNK, count - start)
            first = start * bits // 8
            block = np.unpackbits(raw[first : first + (n * bits + 7) // 8], bitorder="little")[: n * bits]
            out[start : start + n] = block.reshape(n, bits).astype("<u8") @ weights
    return torch.from_numpy(out.astype(np.int64))


# ---------------------------------------------------------------------------- gathers
def take(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[index]`` for a 1-D ``values`` and an integer ``index`` (numpy's gather:
    several times faster than torch's on CPU; IndexError when out of range)."""
    return torch.from_numpy(np.take(values.detach().cpu().numpy(), index.detach().cpu().numpy()))


def flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """``mask.reshape(-1).nonzero().reshape(-1)`` (int64; numpy's, several times faster)."""
    return torch.from_numpy(np.flatnonzero(mask.detach().cpu().numpy()).astype(np.int64, copy=False))


# ---------------------------------------------------------------------------- N:M groups
def binomial_table(m: int) -> torch.Tensor:
    """``C(p, k)`` for ``p, k`` in ``0..m`` as an ``(m+1, m+1)`` int64 table."""
    if not 1 <= m <= 62:
        raise ValueError(f"m must be in 1..62, got {m}")
    return torch.tensor([[math.comb(p, k) for k in range(m + 1)] for p in range(m + 1)], dtype=torch.int64)


def group_symbols(keep: torch.Tensor) -> torch.Tensor:
    """Each row's pattern as one integer ``Σ_j keep[:, j]·2^j`` (``(groups,)`` int64)."""
    groups, m = keep.shape
    if groups and 8 % m == 0:  # whole groups per byte: pack the flat bits, split the bytes
        data = np.packbits(keep.reshape(-1).numpy(), bitorder="little").astype(np.int64)
        fields = [(data >> (j * m)) & ((1 << m) - 1) for j in range(8 // m)]
        return torch.from_numpy(np.stack(fields, 1).reshape(-1)[:groups].copy())
    out = torch.zeros(groups, dtype=torch.int64)
    for j in range(m):
        out |= keep[:, j].long() << j
    return out


def symbol_bits(symbols: torch.Tensor, m: int) -> torch.Tensor:
    """Inverse of :func:`group_symbols`: ``(groups, m)`` bool from pattern integers."""
    symbols = symbols.reshape(-1).to(torch.int64)
    groups = symbols.numel()
    if groups and 8 % m == 0:
        per_byte = 8 // m
        fields = np.zeros(-(-groups // per_byte) * per_byte, dtype=np.int64)
        fields[:groups] = symbols.numpy()
        data = (fields.reshape(-1, per_byte) << (np.arange(per_byte) * m)).sum(1).astype(np.uint8)
        bits = np.unpackbits(data, bitorder="little")[: groups * m]
        return torch.from_numpy(bits.astype(np.bool_).reshape(groups, m))
    return ((symbols[:, None] >> torch.arange(m)) & 1).bool()


@lru_cache(maxsize=16)
def _rank_tables(m: int) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """For every m-bit pattern: its popcount and colex rank; per n, the patterns by rank and
    each pattern filled up to n positions with its first unset ones (−1: more than n set)."""
    every = ((torch.arange(1 << m)[:, None] >> torch.arange(m)) & 1).bool()
    counts = every.sum(1)
    rank = (binomial_table(m)[torch.arange(m).expand(1 << m, m), every.long().cumsum(1)] * every).sum(1)
    by_rank, filled = {}, {}
    for n in range(m + 1):
        members = (counts == n).nonzero().reshape(-1)
        table = torch.empty(members.numel(), dtype=torch.int64)
        table[rank[members]] = members
        by_rank[n] = table
        zero_order = (~every).long().cumsum(1)
        keep = every | (~every & (zero_order <= (n - counts)[:, None]))
        filled[n] = torch.where(counts <= n, (keep.long() << torch.arange(m)).sum(1), -1)
    return counts, rank, by_rank, filled


def pattern_counts(symbols: torch.Tensor, m: int) -> torch.Tensor:
    """Number of positions set in each pattern integer (``(groups,)`` int64)."""
    if m <= TABLE_M:
        return take(_rank_tables(m)[0], symbols)
    return symbol_bits(symbols, m).sum(1)


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
    if m <= TABLE_M:
        return symbol_ranks(group_symbols(keep), m)
    counts = keep.sum(1)
    if bool((counts != counts[0]).any()):
        raise ValueError("every group must keep the same number of positions")
    order = keep.long().cumsum(1)  # i of position p when p is kept
    return (binomial_table(m)[torch.arange(m).expand(groups, m), order] * keep).sum(1)


def symbol_ranks(symbols: torch.Tensor, m: int) -> torch.Tensor:
    """:func:`nm_rank` of patterns given as integers (``m`` ≤ 16)."""
    counts, rank, _, _ = _rank_tables(m)
    if symbols.numel() and bool((take(counts, symbols) != counts[symbols[0]]).any()):
        raise ValueError("every group must keep the same number of positions")
    return take(rank, symbols)


def nm_unrank(ranks: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Inverse of :func:`nm_rank`: ``(groups, m)`` bool keep patterns from colex ranks."""
    ranks = ranks.reshape(-1).to(torch.int64)
    if ranks.numel() and (int(ranks.min()) < 0 or int(ranks.max()) >= math.comb(m, n)):
        raise ValueError(f"N:M ranks must lie in [0, C({m}, {n}) = {math.comb(m, n)})")
    if m <= TABLE_M:
        return symbol_bits(take(_rank_tables(m)[2][n], ranks), m)
    table = binomial_table(m)
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
    m = nonzero.shape[1]
    if m <= TABLE_M:
        return symbol_bits(keep_symbols(group_symbols(nonzero), n, m), m)
    missing = n - nonzero.sum(1, keepdim=True)
    if bool((missing < 0).any()):
        raise ValueError(f"a group holds more than n={n} nonzeros")
    zero_order = (~nonzero).long().cumsum(1)
    return nonzero | (~nonzero & (zero_order <= missing))


def keep_symbols(symbols: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """:func:`nm_keep` on patterns given as integers (``m`` ≤ 16)."""
    out = take(_rank_tables(m)[3][n], symbols)
    if out.numel() and int(out.min()) < 0:
        raise ValueError(f"a group holds more than n={n} nonzeros")
    return out


def nm_grid(shape: list[int], m: int, order: str) -> torch.Tensor | None:
    """Flat element index of every N:M group member, ``(groups, m)`` in stream order (the
    groups of :func:`slope_bench.sparsity.as_matrix`); None when that is just ``0..numel−1``."""
    if len(shape) <= 2 or order != "channel_major":
        return None
    return as_matrix(torch.arange(math.prod(shape)).reshape(shape), order).reshape(-1, m)


def nm_fits(shape: list[int], m: int) -> bool:
    """Whether the rows of ``as_matrix`` split into groups of ``m``."""
    rows = shape[0] if len(shape) >= 2 else 1
    return rows > 0 and math.prod(shape) % rows == 0 and (math.prod(shape) // rows) % m == 0


def nm_groups(values: torch.Tensor, grid: torch.Tensor | None, m: int) -> torch.Tensor:
    """``(groups, m)`` view of a flat tensor in N:M group order."""
    if grid is None:
        return values.reshape(-1, m)
    return torch.from_numpy(values.detach().cpu().numpy()[grid.numpy()])  # numpy's gather: several times faster


def nm_positions(keep: torch.Tensor, grid: torch.Tensor | None) -> torch.Tensor:
    """Flat positions of the True entries of a ``(groups, m)`` pattern, in stream order."""
    index = np.flatnonzero(keep.detach().cpu().numpy())
    if grid is None:
        return torch.from_numpy(index)
    return torch.from_numpy(np.take(grid.numpy().reshape(-1), index))


# ---------------------------------------------------------------------------- run length
def _gaps(nonzero: torch.Tensor) -> torch.Tensor:
    index = flat_nonzero(nonzero.reshape(-1).bool())
    return index - torch.cat([index.new_tensor([-1]), index[:-1]]) - 1


def rle_costs(nonzero: torch.Tensor, value_bits: int) -> list[int]:
    """Total bits of the run-length encoding of the nonzeros of a mask for every field
    width ``r`` in 1..16 (``[]`` when there is no nonzero): entries × (r + value bits),
    one entry per nonzero plus ``⌊gap / 2^r⌋`` fillers per gap.

    Vectorised, in exact integer arithmetic: only the gaps of one or more zeros add
    fillers, so they are found from whichever is fewer, the nonzeros (differences of
    their positions) or the zeros (lengths of the zero runs followed by a nonzero).
    """
    mask = nonzero.detach().reshape(-1).bool().cpu().numpy()
    count = int(np.count_nonzero(mask))
    if count == 0:
        return []
    if count <= mask.size - count:
        index = np.flatnonzero(mask)
        gaps = np.diff(index, prepend=-1) - 1
    elif count == mask.size:
        gaps = np.zeros(0, dtype=np.int64)
    else:
        zeros = np.flatnonzero(~mask)
        breaks = np.flatnonzero(np.diff(zeros) != 1)
        starts = zeros[np.concatenate(([0], breaks + 1))]
        ends = zeros[np.concatenate((breaks, [zeros.size - 1]))]
        gaps = (ends - starts + 1)[ends < mask.size - 1]  # a run that ends the tensor codes nothing
    costs = []
    for r in range(1, MAX_RLE_WIDTH + 1):
        costs.append((count + int((gaps >> r).sum())) * (r + value_bits))
    return costs


def rle_width(nonzero: torch.Tensor, value_bits: int) -> tuple[int, int]:
    """(field width ``r`` in 1..16, total bits) of the cheapest run-length encoding.

    Same cost as :func:`slope_bench.metrics.run_length_bits` (:func:`rle_costs`); ties go
    to the smallest ``r``.
    """
    costs = rle_costs(nonzero, value_bits)
    if not costs:
        return 1, 0
    best = min(range(len(costs)), key=costs.__getitem__)
    return best + 1, costs[best]


def rle_encode(nonzero: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Run-length entries of the nonzeros of a flat mask.

    Returns:
        ``(gaps, positions)``: one ``width``-bit gap per entry and the element position
        each entry codes (fillers sit on zeros, each covering ``2^width`` positions).
    """
    gaps = _gaps(nonzero)
    if gaps.numel() == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty
    fillers = gaps >> width
    per_nonzero = fillers + 1
    entries = torch.full((int(per_nonzero.sum()),), (1 << width) - 1, dtype=torch.int64)
    entries[per_nonzero.cumsum(0) - 1] = gaps - (fillers << width)
    return entries, rle_decode(entries)


def rle_decode(gaps: torch.Tensor) -> torch.Tensor:
    """Element positions of run-length entries: ``cumsum(gap + 1) − 1``."""
    return (gaps.to(torch.int64) + 1).cumsum(0) - 1


# ---------------------------------------------------------------------------- float views
def float_bits(values: torch.Tensor) -> torch.Tensor:
    """float32 bit patterns as int64 in ``[0, 2^32)``."""
    return values.detach().float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def bits_float(patterns: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`float_bits`."""
    signed = torch.where(patterns >= 1 << 31, patterns - (1 << 32), patterns)
    return signed.to(torch.int32).view(torch.float32)


def sorted_unique(values: torch.Tensor) -> torch.Tensor:
    """``torch.unique(values)`` (sorted) through numpy, whose sort is many times faster on CPU."""
    return torch.from_numpy(np.unique(values.detach().reshape(-1).numpy()))


def unique_integers(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.unique(values, return_inverse=True)`` for int64, by counting when the range is small."""
    if values.numel() == 0:
        return values.new_zeros(0), values.new_zeros(0)
    low, high = int(values.min()), int(values.max())
    if high - low >= 1 << 20:
        present = sorted_unique(values)
        return present, torch.searchsorted(present, values)
    shifted = values - low if low else values
    present = torch.bincount(shifted, minlength=high - low + 1) > 0
    if bool(present.all()):  # every value in low..high occurs: the inverse is the shift
        return torch.arange(low, high + 1), shifted
    lookup = present.long().cumsum(0) - 1
    return present.nonzero().reshape(-1) + low, take(lookup, shifted)


# ---------------------------------------------------------------------------- range-coded streams
def entropy_bits(counts: np.ndarray) -> float:
    """Order-0 information ``Σ c·log2(total / c)`` of a count table (bits; rows of a 2-D
    table are separate models, summed)."""
    c = np.asarray(counts, dtype=np.float64)
    totals = np.broadcast_to(c.sum(-1, keepdims=True), c.shape)
    used = c > 0
    return float((c[used] * np.log2(totals[used] / c[used])).sum())


def _categorical(counts: np.ndarray):
    import constriction

    return constriction.stream.model.Categorical(counts.astype(np.float64), perfect=False)


def _words(encoder) -> torch.Tensor:
    return torch.from_numpy(encoder.get_compressed().astype("<u4").view(np.uint8).copy())


def encode_stream(symbols: torch.Tensor, row_sizes: torch.Tensor | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Range-code integer symbols under their observed frequencies.

    Args:
        symbols: int64 symbols (any values).
        row_sizes: when given, the symbols are consecutive rows of these lengths and a
            per-row table is tried too; the smaller all-in (tables counted) wins.

    Returns:
        ``(stream description, parts)`` with parts ``data`` and maybe ``counts``.
    """
    import constriction

    present, inverse = unique_integers(symbols.reshape(-1).to(torch.int64))
    values, index = present.numpy(), inverse.numpy().astype(np.int32)
    if values.size <= 1:
        return {"coder": "constant", "symbols": values.tolist()}, {}
    counts = np.bincount(index, minlength=values.size)
    tensor_bits = entropy_bits(counts) + 8 * len(json.dumps(counts.tolist()))
    table = None
    if row_sizes is not None and row_sizes.numel() > 1:
        rows = np.repeat(np.arange(row_sizes.numel()), row_sizes.numpy())
        table = np.bincount(rows * values.size + index, minlength=row_sizes.numel() * values.size).reshape(-1, values.size)
        dtype = next(name for name in COUNT_DTYPES if table.max() <= np.iinfo(name).max)
        channel_bits = entropy_bits(table) + 8 * (table.size * np.dtype(dtype).itemsize + 64)
        if channel_bits >= tensor_bits:
            table = None
    encoder = constriction.stream.queue.RangeEncoder()
    desc = {"coder": "range", "symbols": values.tolist()}
    if table is None:
        encoder.encode(index, _categorical(counts))
        return {**desc, "model": "tensor", "counts": counts.tolist()}, {"data": _words(encoder)}
    start = 0
    for row, size in zip(table, row_sizes.tolist()):
        if size:
            encoder.encode(index[start : start + size], _categorical(row))
            start += size
    parts = {"data": _words(encoder), "counts": torch.from_numpy(table.astype(dtype))}
    return {**desc, "model": "channel", "rows": int(row_sizes.numel()), "counts_dtype": dtype}, parts


def decode_stream(desc: dict, parts: Mapping[str, torch.Tensor], row_sizes: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode_stream` (``row_sizes``: the stream's rows; their sum is its length).

    Raises:
        CodecError: a table that does not sum to its length, a symbol outside its table,
            data left over or missing.
    """
    import constriction

    count, coder = int(row_sizes.sum()), desc["coder"]
    if coder == "fixed":
        return unpack_bits(parts["data"], int(desc["bits"]), count)
    symbols = torch.tensor(desc["symbols"], dtype=torch.int64).reshape(-1)
    if coder == "constant":
        if count and symbols.numel() != 1:
            raise CodecError(f"a constant stream of {count} symbols lists {symbols.numel()} symbols")
        return symbols.repeat(count) if count else torch.zeros(0, dtype=torch.int64)
    if coder != "range":
        raise CodecError(f"unknown coder {coder!r}")
    raw = parts["data"].numpy()
    if raw.size % 4:
        raise CodecError(f"range-coded data of {raw.size} bytes is not whole 32-bit words")
    if desc["model"] == "tensor":
        table = np.asarray(desc["counts"], dtype=np.int64).reshape(1, -1)
        row_sizes = torch.tensor([count])
    else:
        table = parts["counts"].to(torch.int64).numpy().reshape(int(desc["rows"]), -1)
    if table.shape != (row_sizes.numel(), symbols.numel()) or (table < 0).any():
        raise CodecError(f"model table of shape {list(table.shape)} for {row_sizes.numel()} rows of {symbols.numel()} symbols")
    sums = table.sum(1)
    if not np.array_equal(sums, row_sizes.numpy()):
        bad = int(np.nonzero(sums != row_sizes.numpy())[0][0])
        raise CodecError(f"model table row {bad} sums to {int(sums[bad])}, the stream has {int(row_sizes[bad])} symbols there")
    decoder = constriction.stream.queue.RangeDecoder(raw.view("<u4").astype(np.uint32))
    out = [decoder.decode(_categorical(row), int(size)) for row, size in zip(table, row_sizes.tolist()) if size]
    if not decoder.maybe_exhausted():
        raise CodecError("range-coded data left over after the last symbol (corrupted data)")
    index = torch.from_numpy(np.concatenate(out).astype(np.int64)) if out else torch.zeros(0, dtype=torch.int64)
    return take(symbols, index)
