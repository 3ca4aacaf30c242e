"""Packed export: the compressed model as a real file, its measured size, an exact round trip.

``write_packed`` stores a finalized state dict as ``model.packed.safetensors``: every
targeted weight is bit-packed under exactly the encoding that
:func:`slope_bench.metrics.account_tensor` charges for it (same bit width, same N:M /
dense / mask / run-length choice, same filler rule), so the file size is the accounted
size plus the safetensors header; every other tensor is stored as it is. ``load_packed``
rebuilds every tensor bit for bit (checked against a SHA-256 of the state stored in the
header) and rejects a truncated, re-versioned or inconsistent file with a
:class:`PackedFormatError`. The bit-level codecs live in :mod:`slope_bench.codecs`; the
entropy-coded sibling ``model.coded.safetensors`` in :mod:`slope_bench.coded`. Metadata
keys are written sorted, so identical inputs give identical bytes.

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
  (a level map or a float32 table when the declared form does not reproduce it);
* the declared grid, from the method's :class:`~slope_bench.methods.base.LayerSpec`:
  ``grid_kind`` (``symmetric``, ``signed``, ``asymmetric``; null when not a uniform
  grid or not declared), ``grid_range`` (how its range was set: ``lsq``, ``minmax``,
  ``mse``, ``percentile``; null when not declared), ``zero_points`` (the declared count
  of 16-bit zero points, charged in ``accounted_bits``) and ``zero_points_stored``
  (true when the file holds them: ``offsets`` per group, the levels being
  ``a = code + offsets[g]``; false when the levels ``q − z`` fit one ``alphabet``, as
  for every grid without zero points). Readers need none of these to decode.

Example::

    nbytes = write_packed(model.state_dict(), specs, run_dir / PACKED_NAME)
    assert all(same_bits(a, b) for a, b in zip(load_packed(run_dir / PACKED_NAME).values(), model.state_dict().values()))

Command line: ``python -m slope_bench.export verify RUN_DIR`` compares
``RUN_DIR/model.packed.safetensors`` (and ``RUN_DIR/model.coded.safetensors`` when
present) with ``RUN_DIR/finalized.safetensors``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

from slope_bench.codecs import (
    CodecError,
    flat_nonzero,
    nm_fits,
    nm_grid,
    nm_groups,
    nm_keep,
    nm_positions,
    nm_rank,
    nm_unrank,
    pack_bits,
    rle_decode,
    rle_encode,
    rle_width,
    unpack_bits,
)
from slope_bench.levels import (
    decode_values,
    fit_values,
    level_group_len,
    negative_zero_mode,
    negative_zeros,
    positive_zeros,  # noqa: F401  (public here: the run applies it before writing finalized weights)
    restore_zeros,
    value_parts,
)
from slope_bench.methods.base import LayerSpec
from slope_bench.metrics import account_tensor, run_length_bits
from slope_bench.sparsity import NM
from slope_bench.utils import atomic_write_bytes

FORMAT = "slope_bench.packed"
VERSION = "1"
PACKED_NAME = "model.packed.safetensors"
CODED_NAME = "model.coded.safetensors"
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
ENCODING_DOC = " ".join(
    line.strip() for line in (__doc__ or "").partition("File layout (version 1).")[2].partition("Example::")[0].splitlines()
).strip()


class PackedFormatError(ValueError):
    """A packed (or coded) file that cannot be trusted: truncated, another version, inconsistent."""


def _fail(where: str, message: str) -> PackedFormatError:
    return PackedFormatError(f"{where}: {message}")


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


# ---------------------------------------------------------------------------- one tensor
def _structure(flat, shape, spec, account):
    """Which elements carry codes, in stream order, and the index part (per the accounting)."""
    numel = flat.numel()
    nonzero = flat != 0
    pattern = spec.pattern
    if isinstance(pattern, NM) and account.pattern == str(pattern):
        grid = nm_grid(list(shape), pattern.m, pattern.order)
        keep = nm_keep(nm_groups(nonzero, grid, pattern.m), pattern.n)  # the nonzeros, then the first zeros
        desc = {"structure": "nm", "n": pattern.n, "m": pattern.m, "order": pattern.order, "index_bits": pattern.index_bits}
        return desc, nm_positions(keep, grid), pack_bits(nm_rank(keep), pattern.index_bits)
    if account.pattern == "dense":
        return {"structure": "dense"}, torch.arange(numel), None
    if account.index_bits > 0:
        return {"structure": "mask"}, flat_nonzero(nonzero), pack_bits(nonzero.long(), 1)
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
    parts.update(value_parts(desc))
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
    negative = negative_zeros(flat)
    flat = positive_zeros(flat)  # the signs of zeros go to `negzero`
    account = account_tensor(name, w, spec)
    structure, positions, index = _structure(flat, w.shape, spec, account)
    values, parts, codes, bits, note = fit_values(flat, positions, spec, account.w_bits, level_group_len(w, spec))
    mode, negatives, negzero = negative_zero_mode(negative, flat, account.nnz)
    if negzero is not None:
        parts["negzero"] = negzero
    desc = {
        "shape": list(w.shape),
        "dtype": "float32",
        **structure,
        "bits": bits,
        "count": positions.numel(),
        **values,
        "nnz": account.nnz,
        "negative_zeros": mode,
        "negative_zero_count": negatives,
        "fallback": note,
        "accounted_bits": account.total_bits,
        "grid_kind": spec.grid_kind or None,
        "grid_range": spec.grid_range or None,
        "zero_points": spec.zero_points,
        "zero_points_stored": values.get("levels") == "offsets",
    }
    parts["codes"] = pack_bits(codes, bits)
    if index is not None:
        parts["index"] = index
    return desc, parts


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
            if not nm_fits(shape, m) or count != numel // m * n:
                raise _fail(name, f"N:M {n}:{m} does not fit shape {shape} with {count} codes")
            keep = nm_unrank(unpack_bits(parts["index"], int(desc["index_bits"]), numel // m), n, m)
            positions = nm_positions(keep, nm_grid(shape, m, desc["order"]))
        elif structure == "dense":
            positions = torch.arange(numel)
        elif structure == "mask":
            positions = flat_nonzero(unpack_bits(parts["index"], 1, numel).bool())
        elif structure == "rle":
            positions = rle_decode(unpack_bits(parts["index"], int(desc["rle_width"]), count))
        else:
            raise _fail(name, f"unknown structure {structure!r}")
        if positions.numel() != count or (count and int(positions[-1]) >= numel):
            raise _fail(name, f"structure {structure} gives {positions.numel()} coded positions, header says {count} within {numel}")
        values = decode_values(desc, parts, unpack_bits(parts["codes"], bits, count), positions)
        out = values if structure == "dense" else torch.zeros(numel).index_put_((positions,), values)
        return restore_zeros(out, desc, parts.get("negzero")).reshape(shape)
    except PackedFormatError:
        raise
    except CodecError as e:
        raise _fail(name, str(e)) from None
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise _fail(name, f"inconsistent description or parts ({_first_line(e)})") from None


# ---------------------------------------------------------------------------- containers
@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch single-threaded inside the block (restored after).

    Coding is a chain of short vectorised passes: on a shared 2-core machine, intra-op
    threads mostly wait for each other (measured 2–5× slower wall time under load).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """``safetensors.torch.save`` with the ``__metadata__`` keys sorted (reproducible bytes).

    ``save`` writes metadata in hash-map order, which changes from process to process;
    the tensors' order and offsets are already deterministic and are kept as they are.
    """
    from safetensors.torch import save

    data = save(dict(tensors), metadata=dict(metadata) if metadata else None)
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    if "__metadata__" not in header:
        return data
    header = {"__metadata__": dict(sorted(header.pop("__metadata__").items())), **header}
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + size :]


def read_metadata(data: bytes, where: str, fmt: str = FORMAT, version: str = VERSION) -> dict[str, str]:
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
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise _fail(where, f"not a {fmt} file (metadata format {None if not isinstance(meta, dict) else meta.get('format')!r})")
    if meta.get("version") != version:
        raise _fail(where, f"format version {meta.get('version')!r} is not supported (this reader reads version {version})")
    return meta


def read_tensors(data: bytes, where: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors byte string; PackedFormatError when unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise _fail(where, f"unreadable file ({_first_line(e)})") from None


# ---------------------------------------------------------------------------- packed files
def pack_state(state_dict: Mapping[str, torch.Tensor], specs: Mapping[str, LayerSpec]) -> bytes:
    """The packed file's bytes (see :func:`write_packed`)."""
    with one_thread():
        return _pack_state(state_dict, specs)


def _pack_state(state_dict: Mapping[str, torch.Tensor], specs: Mapping[str, LayerSpec]) -> bytes:
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "keys": json.dumps(list(state_dict)),
        "sha256": state_sha256(state_dict),
        "encoding": ENCODING_DOC,
    }
    return encode_state(state_dict, specs, encode_tensor, decode_tensor, metadata, "packed encoding", "slope_bench.export")


def encode_state(
    state_dict: Mapping[str, torch.Tensor],
    specs: Mapping[str, LayerSpec],
    encode: Callable[[str, torch.Tensor, LayerSpec], tuple[dict, dict[str, torch.Tensor]]],
    decode: Callable[[str, dict, Mapping[str, torch.Tensor]], torch.Tensor],
    metadata: Mapping[str, str],
    label: str,
    module: str,
) -> bytes:
    """The safetensors bytes of an encoded state (the packed and the coded file's writer).

    Every targeted float32 weight becomes the parts ``K::<part>`` of ``encode(key, tensor,
    spec)``, decoded again with ``decode`` and compared bit for bit (a mismatch raises
    ``RuntimeError`` naming ``label`` and ``module``); every other tensor is stored as it
    is. ``metadata`` gets ``tensors`` (the JSON descriptions) and is written with sorted
    keys (:func:`safetensors_bytes`).
    """
    targeted = targeted_keys(state_dict, specs)
    descriptions, tensors = {}, {}
    for key, tensor in state_dict.items():
        if key not in targeted or tensor.dtype != torch.float32:
            tensors[key] = tensor.detach().cpu().contiguous().clone()
            continue
        desc, parts = encode(key, tensor, targeted[key])
        if not same_bits(decode(key, desc, parts), tensor):
            raise RuntimeError(f"{key}: {label} does not reproduce the tensor (a bug in {module})")
        descriptions[key] = desc
        tensors.update({f"{key}{SEPARATOR}{part}": value.contiguous() for part, value in parts.items()})
    return safetensors_bytes(tensors, {**metadata, "tensors": json.dumps(descriptions, separators=(",", ":"))})


def targeted_keys(state_dict: Mapping[str, torch.Tensor], specs: Mapping[str, LayerSpec]) -> dict[str, LayerSpec]:
    """Weight key → spec of every targeted module; refuses keys holding the reserved separator."""
    for key in state_dict:
        if SEPARATOR in key:
            raise ValueError(f"state-dict key {key!r} contains the reserved {SEPARATOR!r}")
    targeted = {}
    for module, spec in specs.items():
        key = f"{module}.weight" if module else "weight"
        if key not in state_dict:
            raise KeyError(f"targeted module {module!r} has no {key!r} in the state dict")
        targeted[key] = spec
    return targeted


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


def load_packed(path: str | Path) -> dict[str, torch.Tensor]:
    """Rebuild the exact state dict stored by :func:`write_packed`.

    Raises:
        PackedFormatError: truncated file, another format or version, a header that
            disagrees with the stored tensors, or a decoded state whose SHA-256 differs.
    """
    return load_bytes(Path(path).read_bytes(), str(path))


def load_bytes(data: bytes, where: str = "packed model") -> dict[str, torch.Tensor]:
    """:func:`load_packed` on the file's bytes; ``where`` names it in error messages."""
    with one_thread():
        return _load_bytes(data, where)


def _load_bytes(data: bytes, where: str) -> dict[str, torch.Tensor]:
    meta = read_metadata(data, where)
    stored = read_tensors(data, where)
    try:
        keys, descriptions = json.loads(meta["keys"]), json.loads(meta["tensors"])
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise _fail(where, f"unreadable header ({_first_line(e)})") from None
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
        parts = {part: stored[prefix + part] for part in _expected_parts(descriptions[key])}
        state[key] = decode_tensor(f"{where}: {key}", descriptions[key], parts)
    if state_sha256(state) != meta.get("sha256"):
        raise _fail(where, "decoded state does not match the stored SHA-256 (corrupted data)")
    return state


def dense_bytes(state_dict: Mapping[str, torch.Tensor]) -> int:
    """Size of the state dict saved as plain safetensors (the fp32 reference file)."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    try:
        return len(save(tensors))
    except RuntimeError:  # tensors sharing memory (tied weights): saved as copies
        return len(save({k: v.clone() for k, v in tensors.items()}))


def export_packed(state_dict: Mapping[str, torch.Tensor], specs: Mapping[str, LayerSpec], out_dir: str | Path) -> dict[str, float]:
    """Write ``out_dir/model.packed.safetensors``; returns the ``compress/*`` file-size keys."""
    packed = write_packed(state_dict, specs, Path(out_dir) / PACKED_NAME)
    dense = dense_bytes(state_dict)
    return {"compress/packed_bytes": packed, "compress/dense_bytes": dense, "compress/measured_ratio": dense / packed}


# ---------------------------------------------------------------------------- command line
def _compare(label: str, finalized: Mapping[str, torch.Tensor], loaded: Mapping[str, torch.Tensor]) -> list[str]:
    problems = [f"missing {k}" for k in finalized if k not in loaded] + [f"unexpected {k}" for k in loaded if k not in finalized]
    problems += [f"differs: {k}" for k in finalized if k in loaded and not same_bits(finalized[k], loaded[k])]
    if problems:
        print(f"MISMATCH in {label}: {len(problems)} tensor(s): " + ", ".join(problems[:5]), file=sys.stderr)
    return problems


def verify(run_dir: str | Path) -> int:
    """Compare ``RUN_DIR/model.packed.safetensors`` (and ``model.coded.safetensors`` when
    present) with ``RUN_DIR/finalized.safetensors``, bit for bit.

    Prints the sizes and ratios; returns 0 when every tensor is identical, 1 on any
    mismatch or unreadable file (one line naming it), 2 when a required file is missing.
    """
    from slope_bench.coded import load_coded

    run_dir = Path(run_dir)
    packed_path, coded_path, finalized_path = run_dir / PACKED_NAME, run_dir / CODED_NAME, run_dir / FINALIZED_NAME
    for path in (packed_path, finalized_path):
        if not path.is_file():
            print(f"error: {path} does not exist", file=sys.stderr)
            return 2
    try:
        finalized = read_tensors(finalized_path.read_bytes(), str(finalized_path))
        artifacts = [(PACKED_NAME, packed_path, load_packed(packed_path))]
        if coded_path.is_file():
            artifacts.append((CODED_NAME, coded_path, load_coded(coded_path)))
    except (PackedFormatError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finalized_size = finalized_path.stat().st_size
    print(f"{FINALIZED_NAME}: {finalized_size} bytes")
    failed = False
    for (label, path, loaded), ratio in zip(artifacts, ("measured ratio", "coded ratio")):
        size = path.stat().st_size
        print(f"{label}: {size} bytes")
        print(f"{ratio}: {finalized_size / size:.3f}x")
        failed |= bool(_compare(label, finalized, loaded))
    if failed:
        return 1
    print(f"ok: {len(finalized)} tensors identical bit for bit in {', '.join(label for label, _, _ in artifacts)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m slope_bench.export verify RUN_DIR``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m slope_bench.export", description=(__doc__ or "").splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("verify", help="check RUN_DIR/model.{packed,coded}.safetensors against RUN_DIR/finalized.safetensors")
    check.add_argument("run_dir")
    args = parser.parse_args(argv)
    return verify(args.run_dir)


if __name__ == "__main__":
    sys.exit(main())
