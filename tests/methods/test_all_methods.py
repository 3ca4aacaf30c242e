"""Every ``conf/method/*.yaml`` builds and runs the four hooks (``slope_bench.loop.drive``) on a
toy model: finalized weights are real (no parametrization left, N:M holds where declared,
no more levels than the bits allow) and the accounting sees a compressed model. A new
method yaml is picked up with no edit here."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils import parametrize

from slope_bench.loop import drive
from slope_bench.metrics import measure
from slope_bench.sparsity import NM, satisfies_nm
from tests.conftest import METHODS, method_from_yaml
from tests.methods.toy import Toy, task_loss, toy_batches


@pytest.mark.parametrize("method", METHODS)
def test_method_lifecycle_on_toy_model(method):
    torch.manual_seed(0)
    compressor = method_from_yaml(method)
    assert compressor.name == method
    model = Toy()
    references = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight") and m.weight is not None}
    data = toy_batches()
    driven = drive(model, compressor, data, task_loss, lr=1e-3)
    assert torch.isfinite(model(data[0][0])).all()
    done = driven.finalized

    assert set(done.specs) == set(driven.targets), "finalize must declare a spec for every targeted layer"
    for n in driven.targets:
        module = model.get_submodule(n)
        assert not parametrize.is_parametrized(module), f"{n} still parametrized after finalize"
        spec = done.specs[n]
        if isinstance(spec.pattern, NM):
            assert spec.pattern.applies_to(module.weight) and satisfies_nm(module.weight, spec.pattern), f"{n}: N:M does not hold"
    report = measure(model, done.specs, data[0][0][:1], references)
    for layer in report["layers"]:
        spec = done.specs[layer["name"]]
        if spec.bits is not None:
            assert layer["levels"] <= 2**spec.bits, f"{layer['name']}: {layer['levels']} levels > 2^{spec.bits}"
            assert layer["w_bits"] <= spec.bits
    if method == "dense":
        assert report["compress/sparsity"] == 0
    else:
        assert report["compress/ratio"] > 1.0
    assert isinstance(compressor.setting(), str) and compressor.setting()
    assert all(isinstance(v, (int, float)) for v in done.results.values())


# ---------------------------------------------------------------------------- grids and the packed file
GRID_VARIANTS = [
    *[
        ("magnitude_rtn", {"grid": g, "range": r, "w_bits": b})
        for g in ("signed", "symmetric", "asymmetric")
        for r in ("minmax", "mse")
        for b in (2, 4)
    ],
    *[("obc", {"grid": g, "w_bits": b}) for g in ("signed", "symmetric", "asymmetric") for b in (2, 3)],
    ("slope", {"grid": "symmetric", "w_bits": 2}),
    ("slope", {"w_bits": 2, "range": "minmax"}),
    ("codeq", {"w_bits": 2}),
]


def build(method: str, **overrides):
    """``conf/method/<method>.yaml`` with ``overrides``, built as a run builds it."""
    import hydra
    from omegaconf import OmegaConf

    from tests.conftest import CONF

    cfg = OmegaConf.load(CONF / "method" / f"{method}.yaml")
    cfg.pop("search", None)
    cfg.update(overrides)
    return hydra.utils.instantiate(cfg)


@pytest.mark.parametrize(
    ("method", "overrides"),
    [(m, {}) for m in METHODS] + GRID_VARIANTS,
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()) or "default",
)
def test_packed_file_round_trips_every_grid_bit_for_bit(method, overrides, tmp_path):
    """Every method and grid (signed / symmetric / asymmetric with its zero points, min-max
    or clipping search): the packed file rebuilds the finalized weights bit for bit, each
    targeted tensor within byte rounding of the accounted size (plus the export's level map
    where the groups' level sets differ); ``w_bits`` levels: 2^b (signed, asymmetric) or 2^b − 1."""
    from slope_bench.export import encode_tensor, load_packed, same_bits, write_packed
    from slope_bench.levels import positive_zeros

    torch.manual_seed(0)
    compressor = build(method, **overrides)
    model = Toy()
    references = {n: m.weight.detach().clone() for n, m in model.named_modules() if getattr(m, "weight", None) is not None}
    done = drive(model, compressor, toy_batches(), task_loss, lr=1e-3).finalized
    with torch.no_grad():
        for name in done.specs:  # as the run does before it measures and packs
            model.get_submodule(name).weight.copy_(positive_zeros(model.get_submodule(name).weight))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    write_packed(state, done.specs, tmp_path / "model.packed.safetensors")
    loaded = load_packed(tmp_path / "model.packed.safetensors")
    assert list(loaded) == list(state) and all(same_bits(loaded[k], state[k]) for k in state)
    report = measure(model, done.specs, toy_batches()[0][0][:1], references)
    for layer in report["layers"]:
        name, spec = layer["name"], done.specs[layer["name"]]
        weight = model.get_submodule(name).weight
        desc, parts = encode_tensor(name, weight, spec)
        # the accounting counts levels per group; when the groups' level sets differ the file
        # adds a per-group level map (the export's documented fallback, small odd layers here)
        extra = 8 * parts["levelmap"].numel() if "levelmap" in parts else 0
        assert (desc["fallback"] is None) == (extra == 0), f"{name}: {desc['fallback']}"
        overhead = 8 * sum(p.numel() * p.element_size() for p in parts.values()) - layer["total_bits"] - extra
        assert overhead < 8 * len(parts)
        # the file may be smaller: it keeps only the codebook entries in use, and it needs no
        # zero points when one alphabet of 2^b integer levels covers every group
        assert overhead >= -16 * spec.zero_points or spec.grid == "codebook"
        assert layer["grid"] == (spec.grid_kind or spec.grid) and layer["range"] == spec.grid_range
        assert layer["zero_points"] == spec.zero_points
        if spec.grid_kind == "asymmetric":
            assert spec.zero_points == weight.shape[0] and layer["scale_bits"] == 16 * 2 * weight.shape[0]
        if spec.grid == "uniform" and spec.bits is not None:
            levels = 2**spec.bits - (1 if spec.grid_kind == "symmetric" else 0)
            per_row = max(torch.unique(row).numel() for row in weight.reshape(weight.shape[0], -1))
            assert per_row <= levels and layer["w_bits"] <= spec.bits
