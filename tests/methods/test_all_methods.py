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
