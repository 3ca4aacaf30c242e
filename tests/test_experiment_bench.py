"""experiment=bench_digits: composition, the width knob, and a shrunk end-to-end run whose
dense fine-tune control takes as many optimizer steps as the compression run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from slope_bench import references, train
from slope_bench.models import resnet18
from tests.conftest import CONF, compose_config

EXPERIMENT = "experiment=bench_digits"
TRAIN_IMAGES = 1797 - 360 - 180


def test_experiment_selects_digits_hard_and_the_bench_recipe():
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[EXPERIMENT])
        plain = compose("config")
        overridden = compose("config", overrides=[EXPERIMENT, "model.width=8", "finetune.epochs=3", "task=digits"])
    assert plain.task.name == "digits"  # the model's default task without the experiment
    assert cfg.task.name == "digits_hard" and cfg.task._target_ == "slope_bench.tasks.digits_hard.DigitsHard"
    assert cfg.task.copies == 5 and cfg.task.resolution == 8
    assert cfg.model.name == "resnet18" and cfg.model.width == 16
    assert (cfg.dense.epochs, cfg.dense.lr, cfg.finetune.epochs) == (60, 5e-3, 10)
    assert cfg.logger._target_ == "pytorch_lightning.loggers.CSVLogger"
    assert cfg.method.name == "slope"
    # command-line overrides still win over the experiment
    assert (overridden.model.width, overridden.finetune.epochs, overridden.task.name) == (8, 3, "digits")


@pytest.mark.parametrize(("width", "millions"), [(16, 0.70), (64, 11.17)])
def test_width_sets_the_parameter_count(width, millions):
    model = resnet18(10, image_size=8, width=width)
    assert model(torch.zeros(2, 3, 8, 8)).shape == (2, 10)
    count = sum(p.numel() for p in model.parameters())
    assert count / 1e6 == pytest.approx(millions, abs=0.01)
    # every stage is w, 2w, 4w, 8w wide, the stem included
    assert model.conv1.out_channels == model.bn1.num_features == width
    assert model.fc.in_features == 8 * width


def test_bench_digits_end_to_end_with_a_matched_dense_control(tmp_path, monkeypatch):
    steps: dict[str, int] = {}
    original_fit = train.fit

    def recording_fit(*args, tag: str = "train", **kwargs):
        fitted = original_fit(*args, tag=tag, **kwargs)
        steps[tag] = fitted.steps
        return fitted

    monkeypatch.setattr(train, "fit", recording_fit)
    monkeypatch.setattr(references, "fit", recording_fit)
    batch = 256
    cfg = compose_config(
        [
            EXPERIMENT,
            "method=naive",
            "dense.epochs=1",
            "finetune.epochs=1",
            f"task.batch_size={batch}",
            "val_every=0",
            "logger=none",
            "trainer.enable_progress_bar=false",
        ],
        tmp_path,
        tmp_path / "cache",  # a fresh cache: the control is trained here, not loaded
    )
    results = train.run(cfg)
    assert results["task"] == "digits_hard" and results["model_width"] == 16 and results["status"] == "ok"
    per_epoch = math.ceil(TRAIN_IMAGES / batch)
    assert results["train/steps"] == per_epoch == steps["naive fine-tune"]
    assert steps["dense fine-tune control"] == results["train/steps"], steps
    assert steps["dense reference"] == per_epoch
    for key in ("test/top1", "test/top1_dense", "test/top1_dense_ft"):
        assert 0.0 <= results[key] <= 1.0
        assert results[key] * 1800 == pytest.approx(round(results[key] * 1800), abs=1e-3)  # 1,800 test images
    on_disk = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    assert on_disk["model_width"] == 16 and on_disk["setting"] == "2:4 w4"
