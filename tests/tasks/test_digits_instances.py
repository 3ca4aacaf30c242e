"""The embedded instance-segmentation task: generation, COCO files, loader and evaluator."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from slope_bench.errors import ConfigError
from slope_bench.tasks.digits_instances import DigitsInstances, mask_box, place_squares, render_digit

SMALL = {
    "canvas_size": 32,
    "n_train": 6,
    "n_val": 3,
    "n_test": 4,
    "min_digit_size": 8,
    "max_digit_size": 14,
    "max_digits": 3,
    "num_workers": 0,
}


@pytest.fixture
def task(tmp_path) -> DigitsInstances:
    return DigitsInstances(root=str(tmp_path / "di"), **SMALL)


def test_written_once_in_coco_format_and_deterministic(task, tmp_path):
    task.setup()
    folder = task.folder
    assert folder.parent == tmp_path / "di"
    for split, count in (("train", 6), ("val", 3), ("test", 4)):
        data = json.loads((folder / f"instances_{split}.json").read_text())
        assert len(data["images"]) == count and len(list((folder / split).glob("*.png"))) == count
        assert {c["id"] for c in data["categories"]} == set(range(1, 11))
        for ann in data["annotations"]:
            assert 1 <= ann["category_id"] <= 10 and ann["iscrowd"] == 0 and isinstance(ann["segmentation"]["counts"], str)
    stamp = (folder / "instances_train.json").stat().st_mtime_ns
    again = DigitsInstances(root=str(tmp_path / "di"), **SMALL)
    again.setup()
    assert again.folder == folder and (folder / "instances_train.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    other = DigitsInstances(root=str(tmp_path / "other"), **SMALL)
    other.setup()
    assert (other.folder / "instances_test.json").read_text() == (folder / "instances_test.json").read_text()
    assert (other.folder / "test" / "000001.png").read_bytes() == (folder / "test" / "000001.png").read_bytes()
    reseeded = DigitsInstances(root=str(tmp_path / "di"), data_seed=1, **SMALL)
    assert reseeded.folder != folder


def test_targets_boxes_are_mask_extents_and_masks_disjoint(task):
    assert task.num_classes == 11 and task.image_size == 32 and task.num_train == 6
    dataset = task.datasets["train"]
    dataset.flip = False
    total = 0
    for i in range(len(dataset)):
        image, target = dataset[i]
        assert image.shape == (3, 32, 32)
        masks = target["masks"].bool()
        assert 1 <= len(masks) <= 3
        assert int(masks.sum(0).max()) == 1  # digits never overlap
        for mask, box in zip(masks, target["boxes"]):
            rows, cols = mask.nonzero(as_tuple=True)
            assert box.tolist() == [cols.min().item(), rows.min().item(), cols.max().item() + 1, rows.max().item() + 1]
            assert float(image[0][mask].mean()) > float(image[0][~masks.any(0)].mean()) + 0.3  # digits are bright
        total += len(masks)
    assert total >= 6


class GroundTruthModel(nn.Module):
    """Predicts each test image's ground truth (looked up by pixels): a perfect detector."""

    def __init__(self, dataset) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.table = [dataset[i] for i in range(len(dataset))]

    def forward(self, images):
        outputs = []
        for image in images:
            target = next(t for x, t in self.table if torch.equal(x, image))
            n = len(target["labels"])
            outputs.append(
                {"boxes": target["boxes"], "labels": target["labels"], "scores": torch.ones(n), "masks": target["masks"].float()[:, None]}
            )
        return outputs


def test_evaluate_perfect_detector_and_interface(task):
    task.setup()
    metrics = task.evaluate(GroundTruthModel(task.datasets["test"]), "test")
    assert metrics == pytest.approx({"bbox_map": 1.0, "segm_map": 1.0, "bbox_map50": 1.0, "segm_map50": 1.0})
    assert task.main_metric == "bbox_map"
    example = task.example_input()
    assert isinstance(example, list) and example[0].shape == (3, 32, 32)
    batch = next(iter(task.train_dataloader()))
    assert len(batch[0]) == 6  # all 6 training canvases fit one batch of 8
    assert all(a is b for a, b in zip(task.inputs(batch), batch[0], strict=True))
    calib = task.calib_batches(5)
    assert sum(len(b) for b in calib) == 5 and all(isinstance(x, torch.Tensor) for b in calib for x in b)


def test_loss_is_the_sum_of_mask_rcnn_losses(task):
    class Losses(nn.Module):
        def forward(self, images, targets):
            assert len(images) == len(targets) and "masks" in targets[0]
            return {"a": torch.tensor(1.5), "b": torch.tensor(0.25)}

    batch = next(iter(task.train_dataloader()))
    assert float(task.loss(Losses(), batch)) == pytest.approx(1.75)


def test_render_place_and_box_helpers():
    digit = np.zeros((8, 8))
    digit[2:6, 3:5] = 16
    rendered = render_digit(digit, 16)
    assert rendered.shape == (16, 16) and 0 <= rendered.min() and rendered.max() <= 1 and rendered[6:10, 7:9].min() > 0.9
    rng = np.random.default_rng(0)
    squares = place_squares(rng, [10, 10, 10, 10], 32)
    for i, (x, y, s) in enumerate(squares):
        assert 0 <= x <= 32 - s and 0 <= y <= 32 - s
        for px, py, ps in squares[i + 1 :]:
            assert x + s <= px or px + ps <= x or y + s <= py or py + ps <= y
    mask = np.zeros((5, 6), dtype=bool)
    mask[1:3, 2:5] = True
    assert mask_box(mask) == [2.0, 1.0, 3.0, 2.0]


def test_bad_knobs_raise_config_error(tmp_path):
    with pytest.raises(ConfigError, match="max_digit_size"):
        DigitsInstances(root=str(tmp_path), canvas_size=16, min_digit_size=8, max_digit_size=20)
    with pytest.raises(ConfigError, match="n_train"):
        DigitsInstances(root=str(tmp_path), n_train=0)
    with pytest.raises(ConfigError, match="noise"):
        DigitsInstances(root=str(tmp_path), noise=-0.1)
    with pytest.raises(ConfigError, match="batch_size"):
        DigitsInstances(root=str(tmp_path), batch_size=0)
