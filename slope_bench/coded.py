"""Entropy-coded export: ``model.coded.safetensors``, the stored / transmitted size.

The packed file (:mod:`slope_bench.export`) stores fixed-width codes a kernel can index;
this file stores the same finalized state at its order-0 information content: per
targeted tensor the integer codes are range-coded under their observed frequencies, and
so is the N:M pattern. ``load_coded`` returns exactly what ``load_packed`` returns.

File layout (version 1). A safetensors file whose ``__metadata__`` holds ``format``
(``slope_bench.coded``), ``version`` (``1``), ``coder`` and ``coder_version`` (the entropy
coder and its library version), ``keys`` (JSON list of the state-dict keys, in order),
``digests`` (JSON list, per key: the first 16 hex digits of the SHA-256 of
``dtype|shape|`` and the tensor's bytes), ``tensors`` (JSON object: one description per
coded key) and ``encoding`` (this description in words). A key that is not in ``tensors``
is stored as it is. A coded key ``K`` is stored as the parts ``K::codes``,
``K::codes_counts``, ``K::pattern``, ``K::scales``, ``K::table`` and ``K::negzero`` (only
those its description needs). ``structure`` says which elements carry a code: ``dense`` —
all of them, in flat order (zero is a code, so an unstructured mask is coded at its
density); ``nm`` — the nonzeros, group by group of ``m`` consecutive elements of
:func:`slope_bench.sparsity.as_matrix` (``order``), each group's nonzero set (at most
``n``) given by one ``pattern`` symbol ``Σ_j nonzero_j·2^j`` (a bijection with the packed
file's (count, colex rank); all-zero and underfull groups are symbols of their own);
``mask`` — the same with groups of ``m`` consecutive elements in flat order and any count
(an unstructured mask, chosen over ``dense`` when its estimate is smaller).
``values``, ``group_len``, ``alphabet``, ``codebook_size``, ``table_levels`` and the
``scales`` / ``table`` parts turn codes into float32 values exactly as in the packed file
(``levels`` is always ``alphabet``). Each symbol stream (``codes``, ``pattern``) says
its ``coder``: ``constant`` — every symbol is ``symbols[0]`` (nothing stored);
``fixed`` — ``bits``-bit little-endian bit stream; ``range`` — the part holds the
little-endian ``uint32`` words of a constriction ``RangeEncoder`` that coded, for each
symbol, its index ``i`` into ``symbols`` with ``Categorical(counts, perfect=False)``;
``model`` ``tensor`` — one table ``counts`` (in the header, summing to the stream
length); ``channel`` — one row of counts per output channel (the rows of ``as_matrix``)
in ``K::codes_counts`` (``rows × len(symbols)``, ``counts_dtype``), each row summing to
that channel's number of codes, the channel's symbols coded in turn. Elements without a
code are ``+0.0``; ``negative_zeros`` (``none``, ``all``, ``bitmask`` over the zeros in
``K::negzero``) restores the sign of zeros.

Example::

    export_coded(model.state_dict(), specs, run_dir, dense_bytes=44_745_160)
    state = load_coded(run_dir / CODED_NAME)  # == load_packed(run_dir / PACKED_NAME)
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from importlib.metadata import version as package_version
from pathlib import Path

import numpy as np
import torch

from slope_bench.codecs import (
    CodecError,
    decode_stream,
    encode_stream,
    entropy_bits,
    flat_nonzero,
    float_bits,
    group_symbols,
    nm_fits,
    nm_grid,
    nm_groups,
    nm_positions,
    pack_bits,
    pattern_counts,
    symbol_bits,
    take,
)
from slope_bench.export import (
    CODED_NAME,
    SEPARATOR,
    PackedFormatError,
    encode_state,
    one_thread,
    read_metadata,
    read_tensors,
)
from slope_bench.export import dense_bytes as state_dense_bytes
from slope_bench.levels import (
    decode_values,
    fit_values,
    level_group_len,
    negative_zero_mode,
    negative_zeros,
    positive_zeros,
    restore_zeros,
    value_parts,
)
from slope_bench.methods.base import LayerSpec
from slope_bench.metrics import FLOAT_BITS, MAX_CODED_LEVELS
from slope_bench.sparsity import NM
from slope_bench.utils import atomic_write_bytes

FORMAT = "slope_bench.coded"
VERSION = "1"
CODER = "constriction.stream.queue.RangeEncoder + constriction.stream.model.Categorical(counts, perfect=False)"
CODE_BITS = 16  # widest alphabet index the value fit may use here
MASK_M = 8  # an unstructured nonzero mask is coded in groups of this many elements
STREAM_OVERHEAD_BITS = 8 * 256  # one more stream: its header entry, description and table (estimate)
COUNT_DTYPES = {"uint8": torch.uint8, "uint16": torch.uint16, "uint32": torch.uint32}  # torch dtypes of the count tables
PART_DTYPES = {"scales": torch.float16, "table": torch.float32}  # every other part is uint8 (or the counts dtype)
ENCODING_DOC = " ".join(
    line.strip() for line in (__doc__ or "").partition("File layout (version 1).")[2].partition("Example::")[0].splitlines()
).strip()


class CodedFormatError(PackedFormatError):
    """A coded file that cannot be trusted: truncated, another version, inconsistent."""


def _fail(where: str, message: str) -> CodedFormatError:
    return CodedFormatError(f"{where}: {message}")


def coder_version() -> str:
    """Version of the installed ``constriction`` package."""
    return package_version("constriction")


def digest(tensor: torch.Tensor) -> str:
    """First 16 hex digits of the SHA-256 of ``dtype|shape|`` and the tensor's bytes."""
    t = tensor.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}|{list(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------- one tensor
def _rows(shape: list[int]) -> int:
    return shape[0] if len(shape) >= 2 else 1


def encode_tensor(name: str, weight: torch.Tensor, spec: LayerSpec) -> tuple[dict, dict[str, torch.Tensor]]:
    """Code one finalized float32 weight (see the module docstring).

    Returns:
        ``(description, parts)``; the description is JSON-serialisable.
    """
    w = weight.detach().cpu().contiguous()
    shape, flat = list(w.shape), w.reshape(-1)
    negative = negative_zeros(flat)
    flat = positive_zeros(flat)
    nonzero = flat != 0
    nnz, rows, numel = int(nonzero.sum()), _rows(shape), flat.numel()
    desc: dict = {"shape": shape, "dtype": "float32"}
    pattern, symbols = spec.pattern, None
    if isinstance(pattern, NM) and numel and nm_fits(shape, pattern.m):
        grid = nm_grid(shape, pattern.m, pattern.order)
        symbols = group_symbols(nm_groups(nonzero, grid, pattern.m))
        if int(pattern_counts(symbols, pattern.m).max()) <= pattern.n:
            desc.update(structure="nm", n=pattern.n, m=pattern.m, order=pattern.order)
            positions = nm_positions(symbol_bits(symbols, pattern.m), grid)
            values, value_parts, codes, bits = _fit(flat, positions, spec, w)
        else:
            symbols = None  # declared N:M, not satisfied: coded as unstructured
    if symbols is None:
        positions = torch.arange(numel)
        values, value_parts, codes, bits = _fit(flat, positions, spec, w)
        desc["structure"] = "dense"
        if 0 < nnz < numel and nm_fits(shape, MASK_M):  # the nonzero mask in groups of 8, if smaller
            symbols = group_symbols(nonzero.reshape(-1, MASK_M))
            nonzero_index = flat_nonzero(nonzero)
            nonzero_codes = take(codes, nonzero_index)
            pattern_bits = entropy_bits(_counts(symbols)) + STREAM_OVERHEAD_BITS
            if bits == FLOAT_BITS:
                dense, masked = FLOAT_BITS * numel, pattern_bits + FLOAT_BITS * nnz
            else:
                dense, masked = entropy_bits(_counts(codes)), pattern_bits + entropy_bits(_counts(nonzero_codes))
            if masked < dense:
                desc.update(structure="mask", m=MASK_M)
                positions, codes = nonzero_index, nonzero_codes
            else:
                symbols = None
    parts: dict[str, torch.Tensor] = dict(value_parts)
    if symbols is not None:
        desc["pattern"], stream = encode_stream(symbols)
        _store(parts, "pattern", stream)
        row_sizes = pattern_counts(symbols, desc["m"]).reshape(rows, -1).sum(1)
    else:
        row_sizes = torch.full((rows,), numel // max(rows, 1), dtype=torch.int64)
    desc.update(count=positions.numel(), **values)
    if bits == FLOAT_BITS:
        desc["codes"], parts["codes"] = {"coder": "fixed", "bits": FLOAT_BITS}, pack_bits(codes, FLOAT_BITS)
    else:
        desc["codes"], stream = encode_stream(codes, row_sizes)
        _store(parts, "codes", stream)
    mode, _, negzero = negative_zero_mode(negative, flat, nnz)
    desc.update(nnz=nnz, negative_zeros=mode)
    if negzero is not None:
        parts["negzero"] = negzero
    return desc, parts


def _fit(flat: torch.Tensor, positions: torch.Tensor, spec: LayerSpec, weight: torch.Tensor):
    """Value description, parts, codes (alphabet indices, or float32 bit patterns) and their width."""
    bits = FLOAT_BITS if spec.grid == "float" else CODE_BITS
    values, parts, codes, bits, _ = fit_values(flat, positions, spec, bits, level_group_len(weight, spec), MAX_CODED_LEVELS)
    if values.get("levels", "alphabet") != "alphabet":  # > 2^16 levels: not worth a model table
        return {"values": "raw"}, {}, float_bits(take(flat, positions)), FLOAT_BITS
    return values, parts, codes, bits


def _counts(symbols: torch.Tensor) -> np.ndarray:
    return torch.bincount(symbols - symbols.min()).numpy() if symbols.numel() else np.zeros(0)


def decode_tensor(name: str, desc: dict, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Rebuild one float32 tensor from its description and parts.

    Raises:
        CodedFormatError: the parts disagree with the description (names ``name``).
    """
    try:
        shape = [int(s) for s in desc["shape"]]
        numel, rows = math.prod(shape), _rows(shape)
        if desc["structure"] in ("nm", "mask"):
            m = int(desc["m"])
            n = int(desc["n"]) if desc["structure"] == "nm" else m
            if not nm_fits(shape, m):
                raise _fail(name, f"N:M groups of {m} do not fit shape {shape}")
            listed = torch.tensor(desc["pattern"]["symbols"], dtype=torch.int64).reshape(-1)
            if listed.numel() and (int(listed.min()) < 0 or int(listed.max()) >= 1 << m or int(pattern_counts(listed, m).max()) > n):
                raise _fail(name, f"a pattern symbol outside the {n}:{m} alphabet")
            symbols = decode_stream(desc["pattern"], _prefixed(parts, "pattern"), torch.tensor([numel // m]))
            positions = nm_positions(symbol_bits(symbols, m), nm_grid(shape, m, desc.get("order", "input")))
            row_sizes = pattern_counts(symbols, m).reshape(rows, -1).sum(1)
        elif desc["structure"] == "dense":
            positions = torch.arange(numel)
            row_sizes = torch.full((rows,), numel // max(rows, 1), dtype=torch.int64)
        else:
            raise _fail(name, f"unknown structure {desc['structure']!r}")
        if positions.numel() != int(desc["count"]):
            raise _fail(name, f"structure gives {positions.numel()} coded positions, header says {desc['count']}")
        codes = decode_stream(desc["codes"], _prefixed(parts, "codes"), row_sizes)
        if desc["values"] not in ("raw", "table") and codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= len(desc["alphabet"])):
            raise _fail(name, f"code {int(codes.max())} outside an alphabet of {len(desc['alphabet'])} levels")
        if desc["values"] == "table" and codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= int(desc["table_levels"])):
            raise _fail(name, f"code outside a table of {desc['table_levels']} levels")
        values = decode_values(desc, parts, codes, positions)
        out = values if desc["structure"] == "dense" else torch.zeros(numel).index_put_((positions,), values)
        return restore_zeros(out, desc, parts.get("negzero")).reshape(shape)
    except PackedFormatError as e:
        raise CodedFormatError(str(e)) from None
    except CodecError as e:
        raise _fail(name, str(e)) from None
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, OverflowError) as e:
        raise _fail(name, f"inconsistent description or parts ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def _store(parts: dict[str, torch.Tensor], stream: str, stream_parts: Mapping[str, torch.Tensor]) -> None:
    if "data" in stream_parts:
        parts[stream] = stream_parts["data"]
    if "counts" in stream_parts:
        parts[f"{stream}_counts"] = stream_parts["counts"]


def _prefixed(parts: Mapping[str, torch.Tensor], stream: str) -> dict[str, torch.Tensor]:
    out = {"data": parts[stream]} if stream in parts else {}
    if f"{stream}_counts" in parts:
        out["counts"] = parts[f"{stream}_counts"]
    return out


def expected_parts(desc: dict) -> dict[str, tuple[torch.dtype, int | None]]:
    """Dtype and element count (None: any multiple of 4 bytes) of every part a description implies."""
    numel = math.prod(desc["shape"])
    parts: dict[str, tuple[torch.dtype, int | None]] = {k: (PART_DTYPES.get(k, torch.uint8), v) for k, v in value_parts(desc).items()}
    for stream in ("pattern", "codes"):
        coder = desc.get(stream, {"coder": "constant"})
        if coder["coder"] == "fixed":
            parts[stream] = (torch.uint8, (int(desc["count"]) * int(coder["bits"]) + 7) // 8)
        elif coder["coder"] == "range":
            parts[stream] = (torch.uint8, None)
            if coder["model"] == "channel":
                parts[f"{stream}_counts"] = (COUNT_DTYPES[coder["counts_dtype"]], int(coder["rows"]) * len(coder["symbols"]))
    if desc["negative_zeros"] == "bitmask":
        parts["negzero"] = (torch.uint8, (numel - int(desc["nnz"]) + 7) // 8)
    return parts


# ---------------------------------------------------------------------------- whole files
def code_state(state_dict: Mapping[str, torch.Tensor], specs: Mapping[str, LayerSpec]) -> bytes:
    """The coded file's bytes; every coded tensor is decoded again and compared bit for bit."""
    with one_thread():
        return _code_state(state_dict, specs)


def _code_state(state_dict: Mapping[str, torch.Tensor], specs: Mapping[str, LayerSpec]) -> bytes:
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "coder": CODER,
        "coder_version": coder_version(),
        "keys": json.dumps(list(state_dict)),
        "digests": json.dumps([digest(t) for t in state_dict.values()]),
        "encoding": ENCODING_DOC,
    }
    return encode_state(state_dict, specs, encode_tensor, decode_tensor, metadata, "coded encoding", "slope_bench.coded")


def write_coded(state_dict: Mapping[str, torch.Tensor], specs: Mapping[str, LayerSpec], path: str | Path) -> int:
    """Write ``model.coded.safetensors`` atomically; returns the bytes written."""
    data = code_state(state_dict, specs)
    atomic_write_bytes(path, data)
    return len(data)


def export_coded(
    state_dict: Mapping[str, torch.Tensor], specs: Mapping[str, LayerSpec], out_dir: str | Path, dense_bytes: int | None = None
) -> dict[str, float]:
    """Write ``out_dir/model.coded.safetensors``; returns ``compress/coded_bytes`` and
    ``compress/coded_ratio`` (fp32 dense safetensors bytes / coded bytes).

    Args:
        state_dict: the finalized model's ``state_dict()``.
        specs: declared encodings by targeted module name.
        out_dir: the run directory.
        dense_bytes: size of the fp32 state as plain safetensors (computed when None).
    """
    coded = write_coded(state_dict, specs, Path(out_dir) / CODED_NAME)
    dense = state_dense_bytes(state_dict) if dense_bytes is None else dense_bytes
    return {"compress/coded_bytes": coded, "compress/coded_ratio": dense / coded}


def load_coded(path: str | Path) -> dict[str, torch.Tensor]:
    """Rebuild the exact state dict stored by :func:`write_coded` (same as ``load_packed``).

    Raises:
        CodedFormatError: one line naming the file (and the tensor): truncated, another
            format or version, inconsistent header, bad model table or symbol, or a
            decoded tensor whose digest differs.
    """
    return load_coded_bytes(Path(path).read_bytes(), str(path))


def load_coded_bytes(data: bytes, where: str = "coded model") -> dict[str, torch.Tensor]:
    """:func:`load_coded` on the file's bytes; ``where`` names it in error messages."""
    with one_thread():
        return _load_coded_bytes(data, where)


def _load_coded_bytes(data: bytes, where: str) -> dict[str, torch.Tensor]:
    try:
        meta = read_metadata(data, where, FORMAT, VERSION)
        stored = read_tensors(data, where)
    except CodedFormatError:
        raise
    except PackedFormatError as e:
        raise CodedFormatError(str(e)) from None
    try:
        keys, digests, descriptions = (json.loads(meta[k]) for k in ("keys", "digests", "tensors"))
        if not (isinstance(keys, list) and isinstance(digests, list) and len(digests) == len(keys) and isinstance(descriptions, dict)):
            raise ValueError("keys, digests and tensors do not match")
        expected = {key: {} if key not in descriptions else expected_parts(descriptions[key]) for key in keys}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise _fail(where, f"unreadable header ({type(e).__name__}: {e})") from None
    names = {key for key in keys if key not in descriptions} | {f"{k}{SEPARATOR}{p}" for k, ps in expected.items() for p in ps}
    if names != set(stored) or not set(descriptions) <= set(keys):
        missing, extra = sorted(names - set(stored)), sorted(set(stored) - names)
        raise _fail(where, f"header and tensors disagree (missing {missing[:3]}, unexpected {extra[:3]})")
    state = {}
    for key, want in zip(keys, digests):
        if key in descriptions:
            parts = {}
            for part, (dtype, numel) in expected[key].items():
                t = stored[f"{key}{SEPARATOR}{part}"]
                if t.dtype != dtype or (numel is not None and t.numel() != numel) or (numel is None and t.numel() % 4):
                    raise _fail(
                        f"{where}: {key}", f"part {part}: {t.numel()} × {t.dtype} stored, header implies {numel or 'words'} × {dtype}"
                    )
                parts[part] = t
            state[key] = decode_tensor(f"{where}: {key}", descriptions[key], parts)
        else:
            state[key] = stored[key]
        if digest(state[key]) != want:
            raise _fail(
                f"{where}: {key}",
                f"decoded tensor does not match its stored digest (corrupted data, or written by a coder other than constriction {coder_version()})",
            )
    return state
