"""Shared fixtures: compose the real Hydra configs, shrunk for a 2-core CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(min(2, torch.get_num_threads()))

# A tiny but real run: resnet18 at width 8 on digits, one epoch each.
SHRINK = [
    "model.width=8",
    "dense.epochs=1",
    "finetune.epochs=1",
    "task.batch_size=256",
    "val_every=0",
    "logger=none",
    "trainer.enable_progress_bar=false",
]


def compose_config(overrides: list[str], out: Path, cache: Path | None = None) -> DictConfig:
    """The real config tree with ``overrides``, writing under ``out``."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.root_dir = str(out)
        cfg.paths.log_dir = str(out / "logs")
        cfg.paths.output_dir = str(out / "run")
        cfg.paths.data_dir = str(out / "data")
        cfg.paths.cache_dir = str(cache or out / "cache")
    return cfg


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One dense-reference cache for the whole session (trained once)."""
    return tmp_path_factory.mktemp("dense_cache")


@pytest.fixture
def make_cfg(tmp_path, shared_cache):
    def _make(*overrides: str, shrink: bool = True, cache: Path | None = None) -> DictConfig:
        return compose_config([*(SHRINK if shrink else []), *overrides], tmp_path, cache or shared_cache)

    return _make


# ---------------------------------------------------------------------------- every model
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))

# Per-model shrink for tests (model.* overrides); a model not listed runs as it is.
TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2}
TINY_MASKRCNN = {
    "backbone": "resnet18",
    "backbone_width": 8,
    "fpn_channels": 16,
    "anchor_sizes": [4, 8, 16, 32, 64],
    "rpn_pre_nms_top_n_train": 50,
    "rpn_post_nms_top_n_train": 30,
    "rpn_pre_nms_top_n_test": 50,
    "rpn_post_nms_top_n_test": 30,
    "rpn_batch_size_per_image": 16,
    "box_batch_size_per_image": 16,
    "box_detections_per_img": 10,
    "box_head_dim": 32,
    "mask_head_channels": 16,
    "mask_head_layers": 2,
}
MODEL_SHRINK: dict[str, dict] = {"resnet18": {"width": 8}, "vit_small": TINY_VIT, "maskrcnn": TINY_MASKRCNN}
# Per-model shrink of its default task for end-to-end runs (task.* overrides).
TASK_SHRINK: dict[str, list[str]] = {
    "maskrcnn": [
        "task.canvas_size=32",
        "task.min_digit_size=8",
        "task.max_digit_size=14",
        "task.max_digits=2",
        "task.n_train=64",
        "task.n_val=4",
        "task.n_test=4",
        "task.batch_size=32",
        "task.eval_batch_size=4",
    ]
}
# A shrunk end-to-end run of any model (the model's own shrink comes from model_overrides).
RUN_SHRINK = ["dense.epochs=1", "finetune.epochs=1", "val_every=0", "logger=none", "trainer.enable_progress_bar=false"]


def model_overrides(name: str) -> list[str]:
    """``model=<name>`` plus its shrink and its default task's shrink, as Hydra overrides."""
    model = [f"model.{k}={v}".replace(" ", "") for k, v in MODEL_SHRINK.get(name, {}).items()]
    return [f"model={name}", *model, *TASK_SHRINK.get(name, [])]


def is_detection(name: str) -> bool:
    """True when the model's default task is a detection task (Mask R-CNN)."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={name}"])
    return cfg.task.get("main_metric", None) == "bbox_map" or cfg.task.name in ("digits_instances", "coco")


def detection_batch(n: int = 2, size: int = 32) -> tuple[list[torch.Tensor], list[dict]]:
    """``n`` images with one boxed, masked instance each (Mask R-CNN training input)."""
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    for i in range(n):
        image = torch.rand(3, size, size, generator=g) * 0.1
        masks = torch.zeros(1, size, size, dtype=torch.uint8)
        masks[0, 4 + i : 16 + i, 6:18] = 1
        image[:, masks[0].bool()] = 0.9
        images.append(image)
        targets.append({"boxes": torch.tensor([[6.0, 4.0 + i, 18.0, 16.0 + i]]), "labels": torch.tensor([3 + i]), "masks": masks})
    return images, targets


def tiny_model(name: str):
    """``(model, loss_fn, batches, example)`` for a conf/model/<name>.yaml, shrunk."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from slope_bench.train import MODEL_RECIPE

    node = OmegaConf.load(CONF / "model" / f"{name}.yaml")
    spec = {k: v for k, v in OmegaConf.to_container(node).items() if k not in ("defaults", *MODEL_RECIPE)}
    spec.update(MODEL_SHRINK.get(name, {}))
    if is_detection(name):
        model = instantiate(spec, num_classes=11, in_chans=3, image_size=32)
        batches = [detection_batch(2) for _ in range(3)]
        return model, lambda m, b: sum(m(b[0], b[1]).values()), batches, batches[0][0][:1]
    model = instantiate(spec, num_classes=10, in_chans=3, image_size=8)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(3)]
    return model, lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]), batches, torch.randn(1, 3, 8, 8)


class ToyNet(torch.nn.Module):
    """A four-layer CNN for 8×8 inputs that declares its first layer and classifier."""

    first_layers = ["stem"]
    classifier_layers = ["fc"]

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.conv1 = torch.nn.Conv2d(8, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 16, 3, padding=1, stride=2)
        self.fc = torch.nn.Linear(16 * 16, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.flatten(1))


def method_from_yaml(name: str):
    """The compressor of ``conf/method/<name>.yaml`` exactly as a run builds it."""
    from slope_bench.train import method_from_yaml as build

    return build(name)
