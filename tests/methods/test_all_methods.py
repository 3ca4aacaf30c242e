"""Every ``conf/method/*.yaml`` composes and runs prepare → steps → finalize on a toy model."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn
from torch.nn.utils import parametrize

from slope_bench.lit import param_groups
from slope_bench.metrics import measure
from slope_bench.models import target_names
from slope_bench.sparsity import NM, satisfies_nm
from slope_bench.train import build_method
from tests.conftest import CONF, METHODS


class Toy(nn.Module):
    first_layers = ["stem"]
    classifier_layers = ["fc"]

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, stride=2)
        self.fc = nn.Linear(16 * 16, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.flatten(1))


def method_compressor(name: str):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"method={name}"])
    return build_method(cfg.method)


@pytest.mark.parametrize("method", METHODS)
def test_method_lifecycle_on_toy_model(method):
    torch.manual_seed(0)
    name, epochs, c = method_compressor(method)
    assert name == method
    model = Toy()
    c.num_train = 64
    targets = target_names(model, c.compress_first, c.compress_classifier)
    references = {n: model.get_submodule(n).weight.detach().clone() for n in targets}
    model = c.prepare(model, targets)
    data = [(torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))) for _ in range(4)]
    steps = 0 if epochs == 0 else len(data)
    opt = torch.optim.AdamW(param_groups(model, c, 1e-3, 1e-4))
    for step in range(steps):
        x, y = data[step]
        loss = nn.functional.cross_entropy(model(x), y) + c.penalty()
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        c.on_step(step, steps)
    model = c.finalize(model, [x for x, _ in data])
    model.eval()
    assert torch.isfinite(model(data[0][0])).all()

    assert set(c.specs) == set(targets), "finalize must declare a spec for every targeted layer"
    for n in targets:
        module = model.get_submodule(n)
        assert not parametrize.is_parametrized(module), f"{n} still parametrized after finalize"
        spec = c.specs[n]
        if isinstance(spec.pattern, NM) and spec.pattern.applies_to(module.weight):
            assert satisfies_nm(module.weight, spec.pattern), f"{n}: N:M does not hold"
    report = measure(model, c.specs, data[0][0][:1], references)
    for layer in report["layers"]:
        spec = c.specs[layer["name"]]
        if spec.bits is not None:
            assert layer["levels"] <= 2**spec.bits, f"{layer['name']}: {layer['levels']} levels > 2^{spec.bits}"
            assert layer["w_bits"] <= spec.bits
    if method == "dense":
        assert report["compress/sparsity"] == 0
    else:
        assert report["compress/ratio"] > 1.0
    assert isinstance(c.setting(), str) and c.setting()
