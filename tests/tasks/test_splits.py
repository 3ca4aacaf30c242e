"""Every task has a validation split disjoint from its training and test data, and evaluates on it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from slope_bench.tasks.coco import Coco
from slope_bench.tasks.digits import Digits
from slope_bench.tasks.digits_hard import DigitsHard
from slope_bench.tasks.digits_instances import DigitsInstances
from slope_bench.tasks.vision import Cifar, ImageNet
from tests.tasks.test_vision import write_cifar

SMALL_INSTANCES = {"canvas_size": 32, "n_train": 6, "n_val": 3, "n_test": 4, "min_digit_size": 8, "max_digit_size": 14, "max_digits": 2}


def build(name: str, tmp_path: Path):
    """Each task that can be built offline, small."""
    if name == "digits":
        return Digits(num_workers=0, seed=1)
    if name == "digits_hard":
        return DigitsHard(num_workers=0, copies=1, seed=1)
    if name == "cifar10":
        write_cifar(tmp_path, 10)
        return Cifar(root=str(tmp_path), classes=10, val_size=6, num_workers=0)
    if name == "imagenet":
        return ImageNet(
            root="/nonexistent",
            synthetic=True,
            synthetic_root=str(tmp_path),
            synthetic_classes=3,
            synthetic_images_per_class=4,
            image_size=32,
            synthetic_size=40,
            num_workers=0,
        )
    if name == "coco":
        return Coco(root="/nonexistent", synthetic=True, synthetic_root=str(tmp_path), synthetic_images=5, image_size=64, num_workers=0)
    if name == "digits_instances":
        return DigitsInstances(root=str(tmp_path), num_workers=0, **SMALL_INSTANCES)
    raise AssertionError(name)


CLASSIFICATION = ("digits", "digits_hard", "cifar10", "imagenet")
DETECTION = ("digits_instances", "coco")


@pytest.mark.parametrize("name", CLASSIFICATION + DETECTION)
def test_validation_is_disjoint_from_train_and_test(name, tmp_path):
    task = build(name, tmp_path)
    members = task.split_members()
    assert set(members) == {"train", "val", "test"}
    assert all(members[split] for split in members), {k: len(v) for k, v in members.items()}
    assert members["val"].isdisjoint(members["test"]), name
    assert members["val"].isdisjoint(members["train"]), name
    assert members["train"].isdisjoint(members["test"]), name


def test_split_members_match_the_datasets(tmp_path):
    task = build("imagenet", tmp_path)
    members = task.split_members()
    assert members["val"] == {p for p, _ in task.val_set.samples} and members["test"] == {p for p, _ in task.test_set.samples}
    digits = build("digits", tmp_path)
    assert sum(len(v) for v in digits.split_members().values()) == 1797  # a partition of the 1,797 images
    coco = build("coco", tmp_path)
    members = coco.split_members()
    assert all("train2017" in p for p in members["train"] | members["val"]) and all("val2017" in p for p in members["test"])


class Pooled(nn.Module):
    """A tiny classifier for any input size: global average pool + linear."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(3, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.mean(dim=(2, 3)))


class Nothing(nn.Module):
    """A detector that finds nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, images):
        return [
            {
                "boxes": torch.zeros(0, 4),
                "scores": torch.zeros(0),
                "labels": torch.zeros(0, dtype=torch.int64),
                "masks": torch.zeros(0, 1, 4, 4),
            }
            for _ in images
        ]


@pytest.mark.parametrize("name", CLASSIFICATION)
def test_classification_evaluates_val(name, tmp_path):
    task = build(name, tmp_path)
    metrics = task.evaluate(Pooled(task.num_classes), "val")
    assert set(metrics) == {task.main_metric} and 0.0 <= metrics["top1"] <= 1.0


@pytest.mark.parametrize("name", DETECTION)
def test_detection_evaluates_val(name, tmp_path):
    task = build(name, tmp_path)
    metrics = task.evaluate(Nothing(), "val")
    assert metrics == {"bbox_map": 0.0, "segm_map": 0.0, "bbox_map50": 0.0, "segm_map50": 0.0}
