"""``trainer.channels_last``: the model and the image batches in NHWC during every fit (issue 20)."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
from torch import nn

from slope_bench.errors import ConfigError
from slope_bench.tasks.base import ClassificationTask
from slope_bench.train import run
from slope_bench.validate import check_channels_last, validate
from tests.conftest import ROOT, compose_config

ONE_STEP = ["dense.epochs=0", "finetune.epochs=1", "+trainer.limit_train_batches=1", "control.dense_ft=false", "task.batch_size=32"]


def test_channels_last_on_a_cpu_warns_that_its_gradients_are_not_trustworthy(make_cfg, caplog):
    """torch 2.14.1's NHWC convolution backward on CPUs: gradients ~100x less accurate than
    NCHW, at times 5% off, and heap corruption at tiny widths (experiments/digits_resnet18/README.md)."""
    with caplog.at_level(logging.WARNING, logger="slope_bench"):
        run(make_cfg(*ONE_STEP, "trainer.channels_last=true"))
    assert any("trainer.channels_last on a CPU" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="slope_bench"):
        run(make_cfg(*ONE_STEP))
    assert not any("channels_last" in r.getMessage() for r in caplog.records)


def test_channels_last_trains_in_nhwc_with_the_default_loss(make_cfg, monkeypatch):
    seen: list[tuple[bool, bool]] = []
    loss = ClassificationTask.loss

    def watching_loss(self, model, batch):
        convs = [p for p in model.parameters() if p.dim() == 4]
        nhwc = all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
        seen.append((batch[0].is_contiguous(memory_format=torch.channels_last), nhwc and len(convs) > 0))
        return loss(self, model, batch)

    monkeypatch.setattr(ClassificationTask, "loss", watching_loss)
    results = {}
    for flag in (False, True):
        seen.clear()
        cfg = make_cfg(*ONE_STEP, f"trainer.channels_last={str(flag).lower()}")
        results[flag] = run(cfg)
        assert results[flag]["status"] == "ok" and results[flag]["train/steps"] == 1
        assert seen == [(flag, flag)]  # one step: batch and every conv weight in channels_last exactly when asked
    # the same step in another memory layout: the same loss (up to float summation order)
    assert results[True]["train/loss_first"] == pytest.approx(results[False]["train/loss_first"], rel=1e-5)


def test_channels_last_model_is_back_in_the_default_layout_after_the_fit():
    from omegaconf import OmegaConf

    from slope_bench.lit import to_channels_last

    x = torch.randn(2, 3, 8, 8)
    y = torch.tensor([1, 2])
    out = to_channels_last((x, y, [torch.randn(3, 8, 8)]))
    assert out[0].is_contiguous(memory_format=torch.channels_last) and torch.equal(out[0], x)
    assert out[1] is y and out[2][0].is_contiguous()  # only 4-D tensors change
    assert OmegaConf.load(ROOT / "conf/trainer/default.yaml").channels_last is False


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        (["model=vit_small", "model.embed_dim=32", "model.depth=1", "model.num_heads=2"], "its only Conv2d is its first layer"),
    ],
)
def test_channels_last_on_a_model_without_conv_chain_is_one_line(overrides, why, tmp_path):
    cfg = compose_config([*overrides, *ONE_STEP, "trainer.channels_last=true", "logger=none"], tmp_path)
    with pytest.raises(ConfigError) as error:
        run(cfg)
    line = str(error.value)
    assert line.startswith("trainer.channels_last=True is not allowed: expected false for vit_small: ") and why in line, line
    assert "\n" not in line and not list(tmp_path.rglob("results.json")) and not (tmp_path / "cache").exists()


def test_channels_last_rules():
    check_channels_last(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), False)  # off: never checked
    with pytest.raises(ConfigError, match=r"^trainer\.channels_last=True .*expected false for mlp: it has no Conv2d layer"):
        check_channels_last(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), True, "mlp")
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    check_channels_last(net, True)  # two convs: a conv chain
    net.first_layers = ["0"]
    check_channels_last(net, True)
    del net[1]
    with pytest.raises(ConfigError, match=r"its only Conv2d is its first layer \(0\)"):
        check_channels_last(net, True)


def test_channels_last_must_be_a_boolean(tmp_path):
    with pytest.raises(ConfigError, match=r"^trainer\.channels_last='yes' is not allowed: expected true or false$"):
        validate(compose_config(["trainer.channels_last=yes"], tmp_path))
    validate(compose_config(["trainer=ddp", "trainer.channels_last=true"], tmp_path))  # every trainer config takes it


@pytest.mark.slow  # a fresh interpreter (~20 s idle): the raise above is the same line
def test_cli_channels_last_on_vit_is_one_line_exit_2(tmp_path):
    cmd = [
        sys.executable, "run.py", "model=vit_small", "trainer.channels_last=true", "logger=none", "dense.epochs=0",
        f"hydra.run.dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path}/cache",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "trainer.channels_last=True" in lines[0] and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run").exists() and not list(tmp_path.rglob("*.safetensors"))
