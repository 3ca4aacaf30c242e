"""Packed export: exact round trips in every declared form, measured size, reproducible bytes,
bad files, the verify command line. (Bit-level codecs: tests/test_codecs.py; the coded
file and every method's finalized weights: tests/test_coded.py.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save

from slope_bench import export
from slope_bench.export import (
    PACKED_NAME,
    PackedFormatError,
    decode_tensor,
    dense_bytes,
    encode_tensor,
    export_packed,
    load_packed,
    pack_state,
    positive_zeros,
    safetensors_bytes,
    same_bits,
    write_packed,
)
from slope_bench.levels import uniform_scales, unique_integers
from slope_bench.methods.base import LayerSpec
from slope_bench.metrics import account_tensor, measure
from slope_bench.models import resnet18
from slope_bench.quant import UniformGrid, fp16_exact, grouped, harden, rtn_step
from slope_bench.sparsity import NM, Unstructured, nm_mask, satisfies_nm
from slope_bench.utils import save_state

NM_PATTERNS = [NM(1, 4), NM(2, 4), NM(2, 8), NM(4, 8)]


def round_trip(weight: torch.Tensor, spec: LayerSpec) -> dict:
    """Encode, decode, check bit-exactness; returns the description."""
    desc, parts = encode_tensor("w", weight, spec)
    json.dumps(desc)  # the description is plain JSON
    assert same_bits(decode_tensor("w", desc, parts), weight)
    return desc


def check_size(weight: torch.Tensor, spec: LayerSpec, desc: dict) -> None:
    """Packed size = accounted size up to byte rounding of each stream, plus the level map
    when the tensor uses more levels than ``2^bits`` (each group fewer: the accounting's
    per-group level count is optimistic there, and the header says so)."""
    _, parts = encode_tensor("w", weight, spec)
    extra = 8 * parts["levelmap"].numel() if "levelmap" in parts else 0
    assert (desc["fallback"] is None) == (extra == 0)
    overhead = 8 * sum(p.numel() * p.element_size() for p in parts.values()) - account_tensor("w", weight, spec).total_bits
    assert 0 <= overhead - extra < 8 * len(parts)


def uniform(
    weight: torch.Tensor, bits: int, pattern: NM | None = None, density: float | None = None, seed: int = 0
) -> tuple[torch.Tensor, LayerSpec]:
    """A ``quant.harden`` tensor (+ N:M or a random unstructured mask) and its spec."""
    grid = UniformGrid(bits)
    mask = None
    if pattern is not None:
        mask = nm_mask(weight, pattern)
    elif density is not None:
        mask = torch.rand(weight.shape, generator=torch.Generator().manual_seed(seed)) < density
    kept = weight * mask if mask is not None else weight
    out = positive_zeros(harden(kept, rtn_step(kept, grid), grid, mask))
    spec = LayerSpec(pattern if pattern is not None else Unstructured(), "uniform", bits, "channel", grouped(weight, grid).shape[0])
    return out, spec


# ---------------------------------------------------------------------------- one tensor
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("pattern", NM_PATTERNS, ids=str)
def test_nm_uniform_tensor_round_trip(bits, pattern):
    weight = torch.randn(6, 16, 3, 3, generator=torch.Generator().manual_seed(bits))
    out, spec = uniform(weight, bits, pattern)
    desc = round_trip(out, spec)
    assert desc["structure"] == "nm" and desc["values"] == "uniform"
    assert desc["bits"] == account_tensor("w", out, spec).w_bits
    check_size(out, spec, desc)
    if bits <= 4:
        assert desc["fallback"] is None  # rows of 144 use every level of a small grid


@pytest.mark.parametrize("order", ["input", "channel_major"])
def test_nm_order_and_underfull_groups(order):
    pattern = NM(2, 4, order)
    weight = torch.randn(5, 8, 3, 3, generator=torch.Generator().manual_seed(0))
    out, spec = uniform(weight, 3, pattern)
    out[0, :4] = 0.0  # groups holding fewer than n nonzeros
    assert satisfies_nm(out, pattern)
    desc = round_trip(out, spec)
    assert desc["structure"] == "nm" and desc["order"] == order


@pytest.mark.parametrize("density", [0.02, 0.2, 0.6, 0.97, 1.0])
@pytest.mark.parametrize("shape", [(7, 13), (3, 5, 3, 3), (11,)])
def test_unstructured_tensor_round_trip_matches_accounting(density, shape):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape)))
    out, spec = uniform(weight, 4, density=density)
    desc = round_trip(out, spec)
    account = account_tensor("w", out, spec)
    expected = {"dense": "dense"}.get(account.pattern, "mask" if account.index_bits else "rle")
    assert desc["structure"] == expected and desc["bits"] == account.w_bits
    check_size(out, spec, desc)


def test_all_zero_tensors():
    for weight in (torch.zeros(4, 9), torch.zeros(1, 1)):
        spec = LayerSpec(Unstructured(), "uniform", 4, "channel", weight.shape[0])
        round_trip(weight, spec)


def test_group_granularity_found_from_declared_scales():
    """SLOPE declares ``granularity="group"`` without ``group_size``: levels are counted
    per row, the scales are found per group of ``numel / scale_values``."""
    grid = UniformGrid(4, granularity="group", group_size=8)
    weight = torch.randn(4, 32, generator=torch.Generator().manual_seed(2))
    out = harden(weight, rtn_step(weight, grid), grid)
    spec = LayerSpec(None, "uniform", 4, "group", 16)
    desc = round_trip(out, spec)
    assert desc["values"] == "uniform" and desc["group_len"] == 8


def test_asymmetric_levels_use_an_alphabet_or_offsets():
    """``(q − z)·s`` per row (OBC's asymmetric grid) is exact with per-row integer offsets."""
    generator = torch.Generator().manual_seed(4)
    scale = fp16_exact(torch.rand(6, 1, generator=generator) * 0.1 + 0.01)
    zero = torch.randint(0, 16, (6, 1), generator=generator).float()
    q = torch.randint(0, 16, (6, 40), generator=generator).float()
    out = (q - zero) * scale
    desc = round_trip(out, LayerSpec(None, "uniform", 4, "channel", 12))
    assert desc["values"] == "uniform"
    assert desc["levels"] in ("alphabet", "offsets") and desc["fallback"] is None  # offsets are declared (2 values per row)


def test_header_names_grid_kind_range_and_zero_points(tmp_path):
    """Issue 17: every packed tensor's description names its declared grid kind, range
    choice and zero points (declared count, and whether the file stores them)."""
    generator = torch.Generator().manual_seed(11)
    signed_weight = torch.randn(6, 32, generator=generator)
    grid = UniformGrid(4, "signed")
    signed = harden(signed_weight, rtn_step(signed_weight, grid), grid)
    scale = fp16_exact(torch.rand(6, 1, generator=generator) * 0.1 + 0.01)
    zero = torch.arange(6).float()[:, None] * 2 + 1  # a different zero point per row
    q = torch.randint(0, 16, (6, 40), generator=generator).float()
    q[:, 0], q[:, 1] = 0, 15  # every row uses its whole range: the levels q − z need more than 16 codes in all
    asymmetric = positive_zeros((q - zero) * scale)
    state = {"signed.weight": signed, "asym.weight": asymmetric, "asym.bias": torch.zeros(6)}
    specs = {
        "signed": LayerSpec(None, "uniform", 4, "channel", 6, grid_kind="signed", grid_range="mse"),
        "asym": LayerSpec(None, "uniform", 4, "channel", 12, grid_kind="asymmetric", grid_range="minmax", zero_points=6),
    }
    path = tmp_path / PACKED_NAME
    write_packed(state, specs, path)
    data = path.read_bytes()
    tensors = json.loads(json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]["tensors"])
    assert {k: tensors["signed.weight"][k] for k in ("grid_kind", "grid_range", "zero_points", "zero_points_stored")} == {
        "grid_kind": "signed",
        "grid_range": "mse",
        "zero_points": 0,
        "zero_points_stored": False,
    }
    asym = tensors["asym.weight"]
    assert (asym["grid_kind"], asym["grid_range"], asym["zero_points"], asym["zero_points_stored"]) == ("asymmetric", "minmax", 6, True)
    assert asym["levels"] == "offsets" and asym["fallback"] is None
    loaded = load_packed(path)
    assert all(same_bits(loaded[k], state[k]) for k in state)


def test_deadzone_form_round_trip():
    """CoDeQ's ``ŵ = s16·q + δ16·sign(q)`` with a dead zone of exact zeros."""
    weight = torch.randn(16, 9, 3, 3, generator=torch.Generator().manual_seed(5))
    step, offset = fp16_exact(torch.tensor(0.0371)), fp16_exact(torch.tensor(0.4123))
    q = torch.clamp(torch.round(torch.sign(weight) * torch.relu(weight.abs() - offset) / step), -7, 7)
    out = step * q + offset * torch.sign(q)
    spec = LayerSpec(Unstructured(), "deadzone", 4, "tensor", 2)
    desc = round_trip(out, spec)
    assert desc["values"] == "deadzone" and desc["fallback"] is None
    check_size(out, spec, desc)


def test_codebook_form_round_trip():
    """SQS: every weight one of K fp16-exact means, pruned weights exactly zero."""
    generator = torch.Generator().manual_seed(6)
    means = fp16_exact(torch.tensor([-0.31, -0.07, 0.05, 0.29]))
    index = torch.randint(0, 4, (32, 50), generator=generator)
    keep = torch.rand(32, 50, generator=generator) < 0.3
    out = positive_zeros(means[index] * keep)
    spec = LayerSpec(Unstructured(), "codebook", 2, "tensor", 4)
    desc = round_trip(out, spec)
    assert desc["values"] == "codebook" and desc["codebook_size"] == 4 and desc["fallback"] is None
    check_size(out, spec, desc)


def test_float_values_are_stored_raw():
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(7))
    out = weight * nm_mask(weight, NM(2, 4))
    desc = round_trip(out, LayerSpec(NM(2, 4), "float", None))
    assert desc["values"] == "raw" and desc["bits"] == 32


def test_undeclared_form_falls_back_exactly():
    """Values that no float16 scale explains: exact per-group table, recorded in the header."""
    generator = torch.Generator().manual_seed(8)
    levels = torch.randn(5, 6, generator=generator)
    out = torch.gather(levels, 1, torch.randint(0, 6, (5, 40), generator=generator))
    for spec in (
        LayerSpec(None, "uniform", 3, "channel", 5),
        LayerSpec(None, "codebook", 3, "tensor", 6),
        LayerSpec(None, "deadzone", 3, "tensor", 2),
    ):
        desc = round_trip(out, spec)
        assert desc["values"] in ("table", "raw") and desc["fallback"]


def test_negative_zeros_are_restored():
    weight = torch.randn(6, 16, generator=torch.Generator().manual_seed(9))
    grid = UniformGrid(4)
    mask = nm_mask(weight, NM(2, 4))
    out = harden(weight * mask, rtn_step(weight * mask, grid), grid, mask)  # -0.0 where a negative weight was pruned
    assert bool((torch.signbit(out) & (out == 0)).any())
    spec = LayerSpec(NM(2, 4), "uniform", 4, "channel", 6)
    assert round_trip(out, spec)["negative_zeros"] == "bitmask"
    assert round_trip(-positive_zeros(out).abs(), spec)["negative_zeros"] in ("all", "none")
    assert round_trip(positive_zeros(out), spec)["negative_zeros"] == "none"


# ---------------------------------------------------------------------------- whole model
@pytest.fixture(scope="module")
def hardened_resnet():
    """resnet18 width 16, every conv hardened at 2:4 w4 (zeros made +0.0 as the pipeline does)."""
    torch.manual_seed(0)
    model = resnet18(num_classes=10, image_size=8, width=16)
    pattern = NM(2, 4)
    specs = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d) and pattern.applies_to(module.weight):
            out, specs[name] = uniform(module.weight.detach(), 4, pattern)
            module.weight.data.copy_(out)
    return model, specs


def test_model_round_trip_and_size_matches_accounting(hardened_resnet, tmp_path):
    model, specs = hardened_resnet
    state = model.state_dict()
    path = tmp_path / PACKED_NAME
    written = write_packed(state, specs, path)
    assert written == path.stat().st_size
    loaded = load_packed(path)
    assert list(loaded) == list(state)
    assert all(same_bits(loaded[k], state[k]) for k in state)
    data = path.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    accounted = measure(model, specs, torch.randn(1, 3, 8, 8))["compress/compressed_bits"] / 8
    assert abs((written - header) - accounted) / accounted < 0.02
    assert dense_bytes(state) > 5 * (written - header)


def test_export_packed_keys(hardened_resnet, tmp_path):
    model, specs = hardened_resnet
    out = export_packed(model.state_dict(), specs, tmp_path)
    assert set(out) == {"compress/packed_bytes", "compress/dense_bytes", "compress/measured_ratio"}
    assert out["compress/packed_bytes"] == (tmp_path / PACKED_NAME).stat().st_size
    assert out["compress/dense_bytes"] == len(save({k: v.contiguous() for k, v in model.state_dict().items()}))
    assert out["compress/measured_ratio"] == pytest.approx(out["compress/dense_bytes"] / out["compress/packed_bytes"])


# ---------------------------------------------------------------------------- bad files
@pytest.fixture
def small_file(tmp_path):
    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(10))
    out, spec = uniform(weight, 4, NM(2, 4))
    state = {"layer.weight": out, "layer.bias": torch.randn(8), "steps": torch.tensor(3)}
    path = tmp_path / PACKED_NAME
    write_packed(state, {"layer": spec}, path)
    return path, state, {"layer": spec}


def rewrite_metadata(path, change):
    """Re-save the file with its metadata edited by ``change(meta)``."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(meta, tensors)
    path.write_bytes(save(tensors, metadata=meta))


def test_truncated_file_is_rejected(small_file):
    path, _, _ = small_file
    data = path.read_bytes()
    for cut in (4, 100, len(data) - 3):
        path.write_bytes(data[:cut])
        with pytest.raises(PackedFormatError, match="truncated|unreadable"):
            load_packed(path)


def test_wrong_version_and_format_are_rejected(small_file):
    path, _, _ = small_file
    rewrite_metadata(path, lambda meta, _: meta.update(version="2"))
    with pytest.raises(PackedFormatError, match="version '2' is not supported"):
        load_packed(path)
    rewrite_metadata(path, lambda meta, _: meta.update(format="other"))
    with pytest.raises(PackedFormatError, match="not a slope_bench.packed file"):
        load_packed(path)
    path.write_bytes(save({"a": torch.ones(2)}))
    with pytest.raises(PackedFormatError, match="not a slope_bench.packed file"):
        load_packed(path)


def edit_description(key, **fields):
    def change(meta, _):
        tensors = json.loads(meta["tensors"])
        tensors[key].update(fields)
        meta["tensors"] = json.dumps(tensors)

    return change


@pytest.mark.parametrize(
    "change",
    [
        edit_description("layer.weight", shape=[8, 32]),
        edit_description("layer.weight", bits=5),
        edit_description("layer.weight", count=63),
        edit_description("layer.weight", nnz=3),
        lambda meta, tensors: tensors.pop("layer.weight::scales"),
        lambda meta, tensors: tensors.update({"extra": torch.ones(1)}),
        lambda meta, tensors: tensors.update({"layer.weight::scales": torch.ones(9, dtype=torch.float16)}),
        lambda meta, tensors: meta.update(keys=json.dumps(["layer.bias", "steps"])),
    ],
    ids=["shape", "bits", "count", "nnz", "missing-part", "extra-tensor", "part-size", "keys"],
)
def test_header_disagreeing_with_tensors_is_rejected(small_file, change):
    path, _, _ = small_file
    rewrite_metadata(path, change)
    with pytest.raises(PackedFormatError) as info:
        load_packed(path)
    assert "\n" not in str(info.value)


def test_corrupted_data_is_rejected(small_file):
    path, _, _ = small_file

    def flip(meta, tensors):
        codes = tensors["layer.weight::codes"]
        codes[0] ^= 0x10

    rewrite_metadata(path, flip)
    with pytest.raises(PackedFormatError, match="SHA-256"):
        load_packed(path)


def test_writer_refuses_bad_input():
    with pytest.raises(KeyError, match="no 'missing.weight'"):
        pack_state({"a": torch.ones(2)}, {"missing": LayerSpec(None, "float", None)})
    with pytest.raises(ValueError, match="reserved"):
        pack_state({"a::b": torch.ones(2)}, {})


def test_writer_handles_non_finite_values():
    """A diverged run's NaN / inf weights (and an all-inf group) are stored exactly."""
    weight = torch.tensor([[1.0, float("nan"), float("inf"), 0.0], [float("inf"), float("-inf"), float("inf"), float("inf")]])
    for spec in (LayerSpec(None, "uniform", 4, "channel", 2), LayerSpec(NM(2, 4), "uniform", 4, "channel", 2)):
        round_trip(weight, spec)


# ---------------------------------------------------------------------------- value forms
def _slow_uniform_scales(flat, group_len, max_divisor=256):
    """The documented search, group by group: the first fp16(v_min / k) that fits every value."""
    scales = []
    for group in flat.reshape(-1, group_len):
        values = group[group != 0]
        if values.numel() == 0:
            scales.append(1.0)
            continue
        for k in range(1, max_divisor + 1):
            s = fp16_exact(values.abs().min() / k)
            a = torch.round(values / s)
            if bool(torch.isfinite(s)) and float(s) > 0 and bool((a * s == values).all()) and bool((a.abs() < 1 << 15).all()):
                scales.append(float(s))
                break
        else:
            return None
    return torch.tensor(scales)


def test_uniform_scales_matches_the_documented_search():
    generator = torch.Generator().manual_seed(11)
    step = fp16_exact(torch.rand(12, 1, generator=generator) * 0.1 + 0.01)
    q = torch.randint(-7, 8, (12, 30), generator=generator).float()
    q[:4] = q[:4] * 2 + torch.sign(q[:4]) * 2  # smallest |level| 2 or 4: needs k > 1
    q[5] = 0  # an empty group
    flat = (q * step).reshape(-1)
    assert torch.equal(uniform_scales(flat, 30), _slow_uniform_scales(flat, 30))
    assert uniform_scales(torch.randn(64, generator=generator), 32) is None
    assert uniform_scales(torch.randn(64, generator=generator), 32, max_levels=16) is None


def test_unique_integers_matches_torch_unique():
    for values in (torch.randint(-40, 40, (999,)), torch.arange(-3, 9), torch.tensor([5, 1 << 40, -3]), torch.zeros(0, dtype=torch.int64)):
        got, want = unique_integers(values), torch.unique(values, return_inverse=True)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ---------------------------------------------------------------------------- reproducible bytes
def test_metadata_keys_are_sorted(small_file):
    path, _, _ = small_file
    data = path.read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
    assert (8 + int.from_bytes(data[:8], "little")) % 8 == 0
    tensors = {"b": torch.ones(3), "a": torch.arange(4, dtype=torch.int16)}
    meta = {f"k{i}": str(i) for i in range(20)}
    again = safetensors_bytes(tensors, dict(reversed(meta.items())))
    assert safetensors_bytes(tensors, meta) == again
    from safetensors.torch import load

    assert torch.equal(load(again)["a"], tensors["a"])


# ---------------------------------------------------------------------------- command line
def test_verify_cli(small_file, capsys):
    path, state, _ = small_file
    run_dir = path.parent
    save_state(run_dir / "finalized.safetensors", state, metadata={"method": "test"})
    assert export.main(["verify", str(run_dir)]) == 0  # an old run dir: packed file only
    printed = capsys.readouterr().out
    assert "measured ratio" in printed and "identical" in printed
    tampered = dict(state, **{"layer.bias": state["layer.bias"] + 1})
    save_state(run_dir / "finalized.safetensors", tampered)
    assert export.main(["verify", str(run_dir)]) == 1
    assert "differs: layer.bias" in capsys.readouterr().err
    path.write_bytes(path.read_bytes()[:-5])
    assert export.main(["verify", str(run_dir)]) == 1
    assert export.main(["verify", str(run_dir / "nowhere")]) == 2


@pytest.mark.parametrize("damage", ["truncate", "garbage", "header"])
def test_verify_on_a_damaged_finalized_file_is_one_line(small_file, capsys, damage):
    path, state, _ = small_file
    finalized = path.parent / "finalized.safetensors"
    save_state(finalized, state)
    data = finalized.read_bytes()
    finalized.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00" * 7, "header": data[:9] + b"#" + data[10:]}[damage])
    capsys.readouterr()
    assert export.main(["verify", str(path.parent)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "finalized.safetensors" in err, err


def test_verify_module_entry_point(small_file):
    path, state, _ = small_file
    save_state(path.parent / "finalized.safetensors", state)
    done = subprocess.run(
        [sys.executable, "-m", "slope_bench.export", "verify", str(path.parent)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "measured ratio" in done.stdout
