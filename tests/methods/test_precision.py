"""Mixed precision and devices (issue 20 §2): every ``conf/method/*.yaml`` runs one training
step under ``torch.autocast`` (the ``bf16-mixed`` / ``16-mixed`` precisions): the forward
and backward run, the compressed weights are computed in float32 (the layer casts them where
autocast needs it), quantizer steps, dead-zone logits, gates and codebooks stay float32 and
every gradient is finite; then ``finalize`` gives finite weights. The CPU autocast tests
always run; the ``gpu`` tests run every method one step on CUDA and check that no tensor is
created on the CPU while the model runs (device follows the weight), skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from slope_bench.loop import param_groups
from slope_bench.methods.base import RunInfo
from slope_bench.models import choose_targets
from tests.conftest import CONF, METHODS
from tests.methods.toy import Toy, toy_batches

NO_CUDA = not torch.cuda.is_available()


def method_from_yaml(name: str):
    """``conf/method/<name>.yaml`` built with Hydra, ``search`` dropped (as the run does),
    without importing the training entry point (the GPU machine has no W&B)."""
    import hydra
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONF / "method" / f"{name}.yaml")
    cfg.pop("search", None)
    return hydra.utils.instantiate(cfg)


class CPUTensors(TorchDispatchMode):
    """Records every op that returns a tensor on the CPU (while the model lives on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = out if isinstance(out, (tuple, list)) else [out]
        if any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in flat):
            self.ops.append(str(func))
        return out


def one_step(method: str, device: str, dtype: torch.dtype, watch: CPUTensors | None = None) -> None:
    """``prepare``, one autocast step and ``finalize`` of ``method`` on the toy model."""
    torch.manual_seed(0)
    compressor = method_from_yaml(method)
    model = Toy().to(device)
    batches = [(x.to(device), y.to(device)) for x, y in toy_batches(2)]
    targets, _ = choose_targets(model, compressor)
    model = compressor.prepare(model, targets, RunInfo(num_train=32))
    model.train()
    optimizer = torch.optim.AdamW(param_groups(model, compressor, 1e-3, 1e-4), lr=1e-3)
    if compressor.requirements.trains:
        with torch.autocast(device, dtype=dtype):
            if watch is not None:
                with watch:
                    logits = model(batches[0][0])
            else:
                logits = model(batches[0][0])
            loss = F.cross_entropy(logits, batches[0][1]) + compressor.penalty()
            for name in compressor.layers:
                assert compressor.modules[name].weight.dtype == torch.float32, f"{method}: {name} Ŵ is not float32"
        assert logits.dtype == dtype  # the layers did run in low precision
        optimizer.zero_grad()
        loss.backward()
        for name, p in model.named_parameters():
            if p.grad is not None:
                assert torch.isfinite(p.grad).all(), f"{method}: {name} has a non-finite gradient"
        for layer in compressor.layers.values():
            for name, p in layer.named_parameters():
                assert p.dtype == torch.float32, f"{method}: {name} is {p.dtype}"
        optimizer.step()
        compressor.on_step(0, 2)
    calib = [b[0] for b in batches] * compressor.requirements.calib_passes if compressor.requirements.calib_samples else None
    compressor.finalize(model, calib)
    for name in targets:
        weight = model.get_submodule(name).weight
        assert weight.device.type == torch.device(device).type and torch.isfinite(weight).all()
    model.eval()
    with torch.no_grad(), torch.autocast(device, dtype=dtype):
        assert torch.isfinite(model(batches[1][0]).float()).all()


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_under_cpu_bf16_autocast(method):
    one_step(method, "cpu", torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_one_step_on_cuda(method, dtype):
    watch = CPUTensors()
    one_step(method, "cuda", dtype, watch)
    assert watch.ops == [], f"{method}: CPU tensors created in the forward: {sorted(set(watch.ops))[:5]}"


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device")
def test_obc_hessians_accumulate_in_float64_on_the_device():
    from slope_bench.calibration import collect_layer_statistics

    model = Toy().cuda()
    stats = collect_layer_statistics(model, ["conv1", "fc"], [b[0].cuda() for b in toy_batches(2)])
    for stat in stats.values():
        assert stat.hessian.dtype == torch.float64 and stat.hessian.device.type == "cuda"
