"""Entropy-coded export: exact round trips (every method, every form), size at the order-0
limit, the same state as the packed file, reproducible bytes, bad files refused."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save

from slope_bench import export
from slope_bench.coded import (
    CODED_NAME,
    CodedFormatError,
    code_state,
    decode_tensor,
    encode_tensor,
    export_coded,
    load_coded,
    load_coded_bytes,
    write_coded,
)
from slope_bench.export import PACKED_NAME, load_bytes, load_packed, pack_state, positive_zeros, same_bits, write_packed
from slope_bench.loop import drive
from slope_bench.methods.base import LayerSpec
from slope_bench.quant import fp16_exact
from slope_bench.sparsity import NM, Unstructured, nm_mask
from slope_bench.utils import save_state
from tests.conftest import METHODS, method_from_yaml
from tests.methods.toy import Toy, task_loss, toy_batches
from tests.test_export import NM_PATTERNS, uniform


def round_trip(weight: torch.Tensor, spec: LayerSpec) -> dict:
    """Code, decode, check bit-exactness against the input and the packed file; returns the description."""
    desc, parts = encode_tensor("w", weight, spec)
    json.dumps(desc)
    assert same_bits(decode_tensor("w", desc, parts), weight)
    state = {"w.weight": weight, "w.bias": torch.ones(weight.shape[0] if weight.dim() else 1)}
    loaded, packed = load_coded_bytes(code_state(state, {"w": spec})), load_bytes(pack_state(state, {"w": spec}))
    assert all(same_bits(loaded[k], state[k]) and same_bits(packed[k], state[k]) for k in state)
    return desc


def peaked_levels(shape, generator, scale=1.3):
    """Integer levels in -7..7 from a discretised Laplace (peaked at 0)."""
    u = torch.rand(shape, generator=generator)
    return torch.clamp(torch.round(-scale * torch.sign(u - 0.5) * torch.log1p(-2 * (u - 0.5).abs())), -7, 7)


def entropy(symbols: np.ndarray) -> float:
    """Order-0 information of a symbol sequence in bits, by counting (independent of the coder)."""
    _, counts = np.unique(symbols, return_counts=True)
    p = counts / counts.sum()
    return float(-(counts * np.log2(p)).sum())


# ---------------------------------------------------------------------------- one tensor
@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("pattern", NM_PATTERNS, ids=str)
def test_nm_uniform_round_trip(bits, pattern):
    weight = torch.randn(6, 16, 3, 3, generator=torch.Generator().manual_seed(bits))
    out, spec = uniform(weight, bits, pattern)
    desc = round_trip(out, spec)
    assert desc["structure"] == "nm" and desc["values"] == "uniform" and desc["levels"] == "alphabet"


@pytest.mark.parametrize("order", ["input", "channel_major"])
def test_nm_order_and_underfull_groups(order):
    pattern = NM(2, 4, order)
    out, spec = uniform(torch.randn(5, 8, 3, 3, generator=torch.Generator().manual_seed(0)), 3, pattern)
    out[0, :4] = 0.0  # all-zero and underfull groups are pattern symbols of their own
    desc = round_trip(out, spec)
    assert desc["structure"] == "nm" and desc["order"] == order and 0 in desc["pattern"]["symbols"]


@pytest.mark.parametrize("density", [0.0, 0.02, 0.5, 0.97, 1.0])
@pytest.mark.parametrize("shape", [(7, 13), (4, 8, 3, 3), (11,)])
def test_unstructured_round_trip(density, shape):
    out, spec = uniform(torch.randn(shape, generator=torch.Generator().manual_seed(len(shape))), 4, density=density)
    assert round_trip(out, spec)["structure"] in ("dense", "mask")


def test_all_zero_and_single_value_tensors():
    for weight, spec in (
        (torch.zeros(4, 9), LayerSpec(Unstructured(), "uniform", 4, "channel", 4)),
        (torch.zeros(4, 8), LayerSpec(NM(2, 4), "uniform", 4, "channel", 4)),
        (torch.zeros(1, 1), LayerSpec(None, "uniform", 2, "channel", 1)),
    ):
        desc = round_trip(weight, spec)
        assert desc["codes"]["coder"] == "constant"
    single = torch.zeros(4, 8)
    single[2, 5] = 0.5
    for spec in (LayerSpec(NM(2, 4), "uniform", 4, "channel", 4), LayerSpec(NM(1, 4), "uniform", 2, "tensor", 1)):
        desc = round_trip(single, spec)
        assert desc["count"] == 1 and desc["codes"]["coder"] == "constant"


@pytest.mark.parametrize("size", [2, 4, 16, 255])
def test_codebook_round_trip(size):
    generator = torch.Generator().manual_seed(size)
    means = fp16_exact(torch.randn(size, generator=generator))
    keep = torch.rand(32, 64, generator=generator) < 0.5
    out = positive_zeros(means[torch.randint(0, size, (32, 64), generator=generator)] * keep)
    desc = round_trip(out, LayerSpec(Unstructured(), "codebook", max(1, math.ceil(math.log2(size))), "tensor", size))
    assert desc["values"] == "codebook"


def test_deadzone_raw_table_and_non_finite_round_trip():
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(16, 9, 3, 3, generator=generator)
    step, offset = fp16_exact(torch.tensor(0.0371)), fp16_exact(torch.tensor(0.4123))
    q = torch.clamp(torch.round(torch.sign(weight) * torch.relu(weight.abs() - offset) / step), -7, 7)
    assert round_trip(step * q + offset * torch.sign(q), LayerSpec(Unstructured(), "deadzone", 4, "tensor", 2))["values"] == "deadzone"
    w = torch.randn(8, 64, generator=generator)
    raw = round_trip(w * nm_mask(w, NM(2, 4)), LayerSpec(NM(2, 4), "float", None))
    assert raw["values"] == "raw" and raw["codes"]["coder"] == "fixed"
    levels = torch.randn(5, 6, generator=generator)
    table = torch.gather(levels, 1, torch.randint(0, 6, (5, 40), generator=generator))
    assert round_trip(table, LayerSpec(None, "uniform", 3, "channel", 5))["values"] in ("table", "raw")
    odd = torch.tensor([[1.0, float("nan"), float("inf"), -0.0, 0.0, 2.0, -3.0, 1e30]])
    round_trip(odd, LayerSpec(None, "uniform", 4, "channel", 1))
    round_trip(torch.randn(4, 300, generator=generator), LayerSpec(None, "uniform", 4, "channel", 4))  # unquantized: raw


def test_negative_zeros_are_restored():
    weight = torch.randn(6, 16, generator=torch.Generator().manual_seed(9))
    out, spec = uniform(weight, 4, NM(2, 4))
    out = torch.where(out == 0, -torch.sign(weight) * 0.0, out)  # zeros with mixed signs
    assert round_trip(out, spec)["negative_zeros"] == "bitmask"


# ---------------------------------------------------------------------------- at the limit
def test_size_within_three_percent_of_the_order0_entropy():
    """Peaked 4-bit codes at 2:4 and dense: the coded streams (tables included) are within 3%
    of the order-0 entropy counted independently, and so is the whole file."""
    generator = torch.Generator().manual_seed(12)
    step = fp16_exact(torch.rand(256, 1, 1, 1, generator=generator) * 0.01 + 0.01)
    q = peaked_levels((256, 256, 3, 3), generator)
    score = torch.rand(q.shape, generator=generator)
    for spec, weight in (
        (LayerSpec(Unstructured(), "uniform", 4, "channel", 256), positive_zeros(q * step)),
        (LayerSpec(NM(2, 4), "uniform", 4, "channel", 256), positive_zeros(torch.where(q == 0, 1.0, q) * step * nm_mask(score, NM(2, 4)))),
    ):
        state = {"conv.weight": weight, "bn.weight": torch.ones(256)}
        data = code_state(state, {"conv": spec})
        with safe_open_bytes(data) as parts:
            streams = sum(parts[k].numel() for k in parts if k.endswith(("::codes", "::pattern", "::codes_counts")))
            other = len(data) - streams
        levels = torch.round(weight / step).reshape(-1).numpy()
        if isinstance(spec.pattern, NM):
            groups = (weight != 0).reshape(-1, 4).numpy()
            bits = entropy(levels[levels != 0]) + entropy(groups @ (1 << np.arange(4)))
        else:
            bits = entropy(levels)
        assert 0.999 * bits / 8 <= streams <= 1.03 * bits / 8
        assert len(data) <= 1.03 * (bits / 8 + other)
        assert len(data) < len(pack_state(state, {"conv": spec}))


def test_per_channel_model_when_channels_differ():
    generator = torch.Generator().manual_seed(13)
    q = torch.cat([peaked_levels((16, 4608), generator, scale=s) for s in (0.3, 3.0)])
    weight = positive_zeros(q * 0.01)
    desc = round_trip(weight, LayerSpec(None, "uniform", 4, "tensor", 1))
    assert desc["codes"]["model"] == "channel"
    same = positive_zeros(peaked_levels((128, 576), generator) * 0.01)
    assert round_trip(same, LayerSpec(None, "uniform", 4, "tensor", 1))["codes"]["model"] == "tensor"


def safe_open_bytes(data: bytes):
    """The tensors of a safetensors byte string, as a context manager yielding a dict."""
    from contextlib import nullcontext

    from safetensors.torch import load

    return nullcontext(load(data))


# ---------------------------------------------------------------------------- whole models
@pytest.fixture(scope="module")
def hardened(tmp_path_factory):
    """The packed tests' hardened resnet (width 16, 2:4 w4) written as both files."""
    from tests.test_export import hardened_resnet

    model, specs = hardened_resnet.__wrapped__()
    out = tmp_path_factory.mktemp("coded")
    state = model.state_dict()
    save_state(out / "finalized.safetensors", state)
    write_packed(state, specs, out / PACKED_NAME)
    return out, state, specs


def test_coded_equals_packed_and_is_smaller(hardened):
    out, state, specs = hardened
    keys = export_coded(state, specs, out, dense_bytes=export.dense_bytes(state))
    assert set(keys) == {"compress/coded_bytes", "compress/coded_ratio"}
    assert keys["compress/coded_bytes"] == (out / CODED_NAME).stat().st_size
    assert keys["compress/coded_ratio"] == pytest.approx(export.dense_bytes(state) / keys["compress/coded_bytes"])
    coded, packed = load_coded(out / CODED_NAME), load_packed(out / PACKED_NAME)
    assert list(coded) == list(packed) == list(state)
    assert all(same_bits(coded[k], packed[k]) for k in state)
    assert keys["compress/coded_bytes"] < (out / PACKED_NAME).stat().st_size
    assert export.verify(out) == 0


@pytest.mark.parametrize("method", METHODS)
def test_every_method_round_trips_in_both_files(method):
    """The four hooks on the toy model; both files reproduce the finalized state bit for bit."""
    torch.manual_seed(0)
    model = Toy()
    done = drive(model, method_from_yaml(method), toy_batches(count=2), task_loss)
    state = {k: positive_zeros(v) if k[: -len(".weight")] in done.finalized.specs else v for k, v in model.state_dict().items()}
    for loaded in (load_coded_bytes(code_state(state, done.finalized.specs)), load_bytes(pack_state(state, done.finalized.specs))):
        assert list(loaded) == list(state) and all(same_bits(loaded[k], state[k]) for k in state)


def test_identical_inputs_give_identical_bytes_across_processes(tmp_path):
    generator = torch.Generator().manual_seed(14)
    out, spec = uniform(torch.randn(8, 16, 3, 3, generator=generator), 4, NM(2, 4))
    state = {"layer.weight": positive_zeros(out), "layer.bias": torch.randn(8, generator=generator)}
    save_state(tmp_path / "state.safetensors", state)
    script = (
        "import sys; from safetensors.torch import load_file; from slope_bench.coded import write_coded; "
        "from slope_bench.export import write_packed; from slope_bench.methods.base import LayerSpec; from slope_bench.sparsity import NM; "
        f"s = load_file(sys.argv[1]); s = {{k: s[k] for k in {list(state)!r}}}; spec = LayerSpec(NM(2, 4), 'uniform', 4, 'channel', {spec.scale_values}); "
        "write_coded(s, {'layer': spec}, sys.argv[2] + '/c'); write_packed(s, {'layer': spec}, sys.argv[2] + '/p')"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "state.safetensors"), str(tmp_path)], check=True, timeout=120)
    write_coded(state, {"layer": spec}, tmp_path / "c2")
    write_packed(state, {"layer": spec}, tmp_path / "p2")
    assert (tmp_path / "c").read_bytes() == (tmp_path / "c2").read_bytes()
    assert (tmp_path / "p").read_bytes() == (tmp_path / "p2").read_bytes()


# ---------------------------------------------------------------------------- bad files
@pytest.fixture
def coded_file(tmp_path):
    generator = torch.Generator().manual_seed(10)
    out, spec = uniform(torch.randn(8, 16, generator=generator), 4, NM(2, 4))
    state = {"layer.weight": positive_zeros(out), "layer.bias": torch.randn(8, generator=generator), "steps": torch.tensor(3)}
    save_state(tmp_path / "finalized.safetensors", state)
    write_packed(state, {"layer": spec}, tmp_path / PACKED_NAME)
    write_coded(state, {"layer": spec}, tmp_path / CODED_NAME)
    return tmp_path / CODED_NAME


def rewrite(path, change):
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    change(meta, tensors)
    path.write_bytes(save(tensors, metadata=meta))


def edit_stream(stream, **fields):
    def change(meta, _):
        tensors = json.loads(meta["tensors"])
        tensors["layer.weight"][stream].update(fields)
        meta["tensors"] = json.dumps(tensors)

    return change


def flip_codes(meta, tensors):
    tensors["layer.weight::codes"][1] ^= 0x24


def shifted(stream, key, by):
    """Add ``by`` to every entry of the stream's ``key`` list (counts or symbols)."""

    def change(meta, tensors):
        values = json.loads(meta["tensors"])["layer.weight"][stream][key]
        edit_stream(stream, **{key: [v + by for v in values]})(meta, tensors)

    return change


def refused(path, tensor: str | None = None) -> str:
    """The one-line refusal of ``path`` (naming ``tensor`` when given)."""
    with pytest.raises(CodedFormatError) as info:
        load_coded(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and (tensor is None or f": {tensor}: " in message), message
    return message


DAMAGE = {
    "version": (lambda meta, _: meta.update(version="2"), "version '2' is not supported", None),
    "format": (lambda meta, _: meta.update(format="other"), "not a slope_bench.coded file", None),
    "table-shape": (edit_stream("codes", counts=[1, 2, 3]), "model table", "layer.weight"),
    "table-sum": (shifted("codes", "counts", 1), "sums to", "layer.weight"),
    "code-alphabet": (shifted("codes", "symbols", 40), "outside", "layer.weight"),
    "pattern-alphabet": (edit_stream("pattern", symbols=[15, 3, 5, 6, 9, 10, 12]), "outside the 2:4 alphabet", "layer.weight"),
    "corrupted": (flip_codes, "digest|left over", "layer.weight"),
    "missing-part": (lambda meta, tensors: tensors.pop("layer.weight::scales"), "disagree", None),
    "part-dtype": (lambda meta, tensors: tensors.update({"layer.weight::scales": torch.ones(8)}), "part scales", "layer.weight"),
    "raw-tensor": (lambda meta, tensors: tensors.update({"layer.bias": tensors["layer.bias"] + 1}), "digest", "layer.bias"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_coded_file_is_refused_in_one_line(coded_file, damage, capsys):
    change, match, tensor = DAMAGE[damage]
    rewrite(coded_file, change)
    message = refused(coded_file, tensor)
    assert any(m in message for m in match.split("|")), message
    capsys.readouterr()
    assert export.main(["verify", str(coded_file.parent)]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_truncated_coded_file_is_refused(coded_file):
    data = coded_file.read_bytes()
    for cut in (4, 100, len(data) - 3):
        coded_file.write_bytes(data[:cut])
        message = refused(coded_file)
        assert "truncated" in message or "unreadable" in message


def test_verify_checks_both_files(coded_file, capsys):
    assert export.main(["verify", str(coded_file.parent)]) == 0
    printed = capsys.readouterr().out
    assert CODED_NAME in printed and "coded ratio" in printed and "measured ratio" in printed
    state = load_packed(coded_file.parent / PACKED_NAME)
    spec = LayerSpec(NM(2, 4), "uniform", 4, "channel", 8)
    write_coded(dict(state, **{"layer.bias": state["layer.bias"] * 2}), {"layer": spec}, coded_file)
    assert export.main(["verify", str(coded_file.parent)]) == 1
    assert "MISMATCH in model.coded.safetensors" in capsys.readouterr().err
