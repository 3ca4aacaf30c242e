"""Synthetic ImageNet / COCO (task.synthetic=true): written at the real shapes, read by the real loaders."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from slope_bench.errors import ConfigError
from slope_bench.tasks.base import DatasetError
from slope_bench.tasks.coco import Coco
from slope_bench.tasks.synthetic import COCO_CATEGORY_IDS, synthetic_coco, synthetic_imagenet
from slope_bench.tasks.vision import ImageNet


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture(scope="module")
def imagenet(synthetic_root) -> ImageNet:
    """The default synthetic ImageNet: 1,000 classes, one 256 px JPEG per class and split."""
    task = ImageNet(root="/nonexistent", synthetic=True, synthetic_root=str(synthetic_root), batch_size=4, num_workers=0, seed=0)
    task.setup()
    return task


def test_synthetic_imagenet_has_the_real_shapes(imagenet, synthetic_root, caplog):
    from torchvision.datasets import ImageFolder

    assert len(COCO_CATEGORY_IDS) == 80 and max(COCO_CATEGORY_IDS) == 90
    assert imagenet.num_classes == 1000 and imagenet.image_size == 224
    folder = synthetic_imagenet(synthetic_root, 1000, 1, 256)  # the folder the task read (reused, not rewritten)
    stock = ImageFolder(str(folder / "train"))  # torchvision reads it as is
    assert len(stock.classes) == 1000 and len(stock) == 1000 and stock.classes == imagenet.classes
    with Image.open(stock.samples[0][0]) as image:
        assert image.format == "JPEG" and image.size == (256, 256)
    assert len(imagenet.test_set) == 1000 and len(imagenet.val_set) == 100 and imagenet.num_train == 900  # val_size 10,000 clamped
    x, y = next(iter(imagenet.train_dataloader()))
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32 and y.shape == (4,)
    assert imagenet.test_set[0][0].shape == (3, 224, 224) and imagenet.example_input().shape == (1, 3, 224, 224)
    assert imagenet.corrupt_images == []
    with caplog.at_level(logging.INFO, logger="slope_bench"):
        again = ImageNet(root="/nonexistent", synthetic=True, synthetic_root=str(synthetic_root), val_size=5, num_workers=0)
        again.setup()
    assert len(again.val_set) == 5 and "clamped" not in caplog.text  # a small val_size is kept as given


def test_synthetic_imagenet_small_and_keyed_by_knobs(synthetic_root):
    task = ImageNet(
        root="/nonexistent",
        synthetic=True,
        synthetic_root=str(synthetic_root),
        synthetic_classes=3,
        synthetic_images_per_class=4,
        image_size=32,
        synthetic_size=40,
        val_size=100,
        num_workers=0,
    )
    assert task.num_classes == 3 and task.num_train + len(task.val_set) == 12 and len(task.val_set) == 1  # 12 // 10
    assert task.train_set[0][0].shape == (3, 32, 32)
    assert len({p.name for p in synthetic_root.iterdir() if p.name.startswith("imagenet-")}) == 2  # one folder per knob setting


def test_synthetic_imagenet_few_images_keep_the_classes(synthetic_root):
    """synthetic_images=5: 1,000 class folders (995 empty), 5 JPEGs per split in evenly spaced classes."""
    task = ImageNet(root="/nonexistent", synthetic=True, synthetic_root=str(synthetic_root), synthetic_images=5, num_workers=0)
    assert task.num_classes == 1000 and task.image_size == 224
    assert [label for _, label in task.test_set.samples] == [0, 249, 499, 749, 999]
    assert len(task.val_set) == 1 and task.num_train == 4  # the carve: a tenth of 5, at least 1
    assert task.test_set[4][0].shape == (3, 224, 224) and task.train_set[0][0].shape == (3, 224, 224)
    assert task.calib_batches(4)[0].shape == (4, 3, 224, 224)
    from slope_bench.tasks.vision import scan_image_folder

    folder = task.data_root
    assert len([p for p in (folder / "train").iterdir() if p.is_dir()]) == 1000
    with pytest.raises(DatasetError, match="malformed"):  # real data: an empty class folder is still refused
        scan_image_folder(folder / "train", "task.root")


@pytest.mark.parametrize(
    ("knobs", "key"),
    [
        ({"synthetic_classes": 1}, "synthetic_classes"),
        ({"synthetic_classes": 2.5}, "synthetic_classes"),
        ({"synthetic_images_per_class": 0}, "synthetic_images_per_class"),
        ({"synthetic_images": 1}, "synthetic_images"),
        ({"synthetic_images": 1001}, "synthetic_images"),  # more than the classes: synthetic_images_per_class is the knob
        ({"synthetic_size": 200}, "synthetic_size"),  # smaller than the 224 px crop
        ({"synthetic": "yes"}, "synthetic"),
        ({"val_root": "/data/val_holdout"}, "val_root"),  # the synthetic set has no validation folder
    ],
)
def test_synthetic_imagenet_bad_knobs(knobs, key, tmp_path):
    with pytest.raises(ConfigError, match=rf"^{key}="):
        ImageNet(root=str(tmp_path), synthetic_root=str(tmp_path), num_workers=0, **{"synthetic": True, **knobs})
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.fixture(scope="module")
def coco(synthetic_root) -> Coco:
    task = Coco(root="/nonexistent", synthetic=True, synthetic_root=str(synthetic_root), batch_size=2, num_workers=0, seed=0)
    task.setup()
    return task


def test_synthetic_coco_has_the_real_shapes(coco, synthetic_root):
    from pycocotools.coco import COCO

    folder = synthetic_coco(synthetic_root, 4, 800)
    for split in ("train2017", "val2017"):
        stock = COCO(str(folder / "annotations" / f"instances_{split}.json"))  # pycocotools reads it as is
        assert len(stock.imgs) == 4 and len(stock.anns) >= 4 and max(stock.cats) == 90
        for ann in stock.anns.values():
            assert isinstance(ann["segmentation"], list) and len(ann["bbox"]) == 4 and ann["area"] > 0
            assert stock.annToMask(ann).sum() == pytest.approx(ann["area"])
        with Image.open(folder / split / stock.imgs[min(stock.imgs)]["file_name"]) as image:
            assert image.format == "JPEG" and min(image.size) == 800 and image.size == (1067, 800)
    assert coco.num_classes == 91 and coco.image_size == 800
    assert coco.num_train == 3 and len(coco.datasets["val"]) == 1 and len(coco.datasets["test"]) == 4  # val_images 500 clamped
    images, targets = next(iter(coco.train_dataloader()))
    assert len(images) == 2 and images[0].shape == (3, 800, 1067)
    for target in targets:
        n = len(target["labels"])
        assert n >= 1 and target["boxes"].shape == (n, 4) and target["masks"].shape == (n, 800, 1067)
        for mask, box in zip(target["masks"].bool(), target["boxes"]):
            rows, cols = mask.nonzero(as_tuple=True)
            assert abs(cols.min().item() - box[0].item()) <= 1 and abs(rows.max().item() + 1 - box[3].item()) <= 1
    assert coco.example_input()[0].shape == (3, 800, 1067)


class Replay(nn.Module):
    """Returns each image's ground truth in loader order: a perfect detector."""

    def __init__(self, dataset) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.outputs = []
        for i in range(len(dataset)):
            _, target = dataset[i]
            n = len(target["labels"])
            self.outputs.append({**target, "scores": torch.ones(n), "masks": target["masks"].float()[:, None]})

    def forward(self, images):
        return [self.outputs.pop(0) for _ in images]


def test_synthetic_coco_evaluates_val_and_test(coco):
    for split in ("val", "test"):
        metrics = coco.evaluate(Replay(coco.datasets[split]), split)
        assert metrics == pytest.approx({"bbox_map": 1.0, "segm_map": 1.0, "bbox_map50": 1.0, "segm_map50": 1.0}), split


@pytest.mark.parametrize(
    ("knobs", "key"),
    [({"synthetic_images": 1}, "synthetic_images"), ({"image_size": 0}, "image_size"), ({"synthetic": 1}, "synthetic")],
)
def test_synthetic_coco_bad_knobs(knobs, key, tmp_path):
    with pytest.raises(ConfigError, match=rf"^{key}="):
        Coco(root=str(tmp_path), synthetic_root=str(tmp_path), num_workers=0, **{"synthetic": True, **knobs})
    assert not any(tmp_path.iterdir())


def test_unwritable_synthetic_root_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    task = ImageNet(root="/nonexistent", synthetic=True, synthetic_root=str(blocker / "sub"), synthetic_classes=2, num_workers=0)
    with pytest.raises(DatasetError, match=r"^task\.synthetic_root='.*sub': cannot write the generated data set"):
        task.setup()
    assert [p.name for p in tmp_path.iterdir()] == ["file"]  # no temp folder left behind


def test_synthetic_tasks_from_the_real_configs(tmp_path):
    from slope_bench.train import build
    from tests.conftest import compose_config

    cfg = compose_config(["task=imagenet", "task.synthetic=true", "task.synthetic_classes=4", "task.num_workers=0"], tmp_path)
    task = build("task", cfg.task, seed=0)
    assert task.num_classes == 4 and task.synthetic_root == tmp_path / "cache" / "synthetic" and task.image_size == 224
    assert task.pin_memory == torch.cuda.is_available() and task.persistent_workers is False
    cfg = compose_config(["task=coco", "task.synthetic=true", "task.image_size=64", "task.num_workers=0"], tmp_path)
    task = build("task", cfg.task, seed=0)
    assert task.num_classes == 91 and task.num_train == 3
    cfg = compose_config(["task=imagenet", "task.synthetic=true", "task.val_root=/data/holdout"], tmp_path)
    with pytest.raises(ConfigError, match=r"^task\.val_root='/data/holdout' is not allowed: expected null with synthetic=true"):
        build("task", cfg.task, seed=0)
