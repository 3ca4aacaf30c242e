"""Bad task input found before any work (issue 16): knobs, folder structure, annotation fields, image files."""

from __future__ import annotations

import gc
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from slope_bench.errors import ConfigError
from slope_bench.tasks.base import CorruptImages, DatasetError, check_loader_knobs
from slope_bench.tasks.coco import Coco, quiet_coco
from slope_bench.tasks.digits import Digits
from slope_bench.tasks.digits_hard import DigitsHard
from slope_bench.tasks.digits_instances import DigitsInstances
from slope_bench.tasks.vision import Cifar, ImageNet
from tests.conftest import compose_config
from tests.tasks.test_coco import write_coco, write_coco2017
from tests.tasks.test_vision import write_image_folder

BAD_LOADER_KNOBS = [
    ({"batch_size": "abc"}, "batch_size"),
    ({"batch_size": 2.5}, "batch_size"),
    ({"eval_batch_size": -1}, "eval_batch_size"),
    ({"eval_batch_size": 0}, "eval_batch_size"),
    ({"eval_batch_size": "8"}, "eval_batch_size"),
    ({"num_workers": -1}, "num_workers"),
    ({"num_workers": True}, "num_workers"),
    ({"pin_memory": "yes"}, "pin_memory"),
    ({"persistent_workers": 1}, "persistent_workers"),
    ({"num_workers": 0, "persistent_workers": True}, "persistent_workers"),
]


def every_task(tmp_path: Path) -> dict:
    """A constructor per task (no data is read at construction)."""
    return {
        "digits": lambda **k: Digits(**k),
        "digits_hard": lambda **k: DigitsHard(**k),
        "cifar10": lambda **k: Cifar(root=str(tmp_path), **k),
        "imagenet": lambda **k: ImageNet(root=str(tmp_path), **k),
        "coco": lambda **k: Coco(root=str(tmp_path), **k),
        "digits_instances": lambda **k: DigitsInstances(root=str(tmp_path), **k),
    }


@pytest.mark.parametrize(("knobs", "key"), BAD_LOADER_KNOBS)
def test_every_task_refuses_bad_loader_knobs_in_its_constructor(knobs, key, tmp_path):
    for name, make in every_task(tmp_path).items():
        with pytest.raises(ConfigError, match=rf"^{key}=.* is not allowed: expected ") as info:
            make(**{"num_workers": 2, **knobs})
        assert info.value.key == key, name
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("make", "knobs", "key"),
    [
        (Digits, {"augment": "no"}, "augment"),
        (Digits, {"resolution": True}, "resolution"),
        (DigitsHard, {"copies": 0}, "copies"),
        (DigitsHard, {"noise": math.inf}, "noise"),
        (DigitsHard, {"scale": 1.0}, "scale"),
        (DigitsHard, {"rotation": math.nan}, "rotation"),
        (Cifar, {"val_size": 0}, "val_size"),
        (Cifar, {"download": "no"}, "download"),
        (Cifar, {"classes": True}, "classes"),
        (ImageNet, {"image_size": 4}, "image_size"),
        (ImageNet, {"val_size": -5}, "val_size"),
        (ImageNet, {"check_images": -1}, "check_images"),
        (ImageNet, {"augment": None}, "augment"),
        (ImageNet, {"val_root": 3}, "val_root"),
        (Coco, {"val_images": 0}, "val_images"),
        (Coco, {"image_size": 2.0}, "image_size"),
        (Coco, {"check_images": "16"}, "check_images"),
        (DigitsInstances, {"mask_threshold": 1.0}, "mask_threshold"),
        (DigitsInstances, {"data_seed": -1}, "data_seed"),
        (DigitsInstances, {"min_digit_size": 100}, "min_digit_size"),
    ],
)
def test_task_knobs_are_checked(make, knobs, key, tmp_path):
    kwargs = {} if make in (Digits, DigitsHard) else {"root": str(tmp_path)}
    with pytest.raises(ConfigError, match=rf"^{key}="):
        make(**kwargs, **knobs)


def test_val_root_must_not_be_a_test_or_train_folder(tmp_path):
    for folder in (tmp_path / "val", tmp_path / "train", tmp_path):
        with pytest.raises(ConfigError, match=r"^val_root=.*other than root/train and root/val"):
            ImageNet(root=str(tmp_path), val_root=str(folder))


def test_run_prefixes_task_keys(tmp_path):
    from slope_bench.train import build

    cfg = compose_config(["task=imagenet", "task.eval_batch_size=-1"], tmp_path)
    with pytest.raises(ConfigError) as info:
        build("task", cfg.task, seed=0)
    assert str(info.value) == "task.eval_batch_size=-1 is not allowed: expected an integer >= 1"
    cfg = compose_config(["task=digits", "task.num_workers=-2"], tmp_path)
    with pytest.raises(ConfigError, match=r"^task\.num_workers=-2 is not allowed"):
        build("task", cfg.task, seed=0)


def test_loader_knob_defaults_follow_the_machine():
    auto = check_loader_knobs(8, 16, 2)
    assert auto["pin_memory"] == torch.cuda.is_available() and auto["persistent_workers"] is True
    assert check_loader_knobs(8, 16, 0)["persistent_workers"] is False
    fixed = check_loader_knobs(8, 16, 2, pin_memory=True, persistent_workers=False)
    assert fixed["pin_memory"] is True and fixed["persistent_workers"] is False
    task = Digits(num_workers=0, pin_memory=True)
    loader = task.val_dataloader()
    assert loader.pin_memory is True and loader.persistent_workers is False and loader.batch_size == 512


# ---------------------------------------------------------------------------- structure
def test_image_folder_with_one_class_fails_at_setup(tmp_path):
    write_image_folder(tmp_path / "train", {"cat": 4})
    write_image_folder(tmp_path / "val", {"cat": 1})
    with pytest.raises(DatasetError, match=r"^task\.root='.*': .*train has 1 class folder \(cat\): expected at least 2"):
        _ = ImageNet(root=str(tmp_path), val_size=1, num_workers=0).num_classes


def test_val_root_is_the_validation_split(tmp_path):
    write_image_folder(tmp_path / "in" / "train", {"cat": 3, "dog": 3})
    write_image_folder(tmp_path / "in" / "val", {"cat": 1, "dog": 1})
    write_image_folder(tmp_path / "holdout", {"cat": 2, "dog": 2})
    task = ImageNet(root=str(tmp_path / "in"), val_root=str(tmp_path / "holdout"), image_size=16, num_workers=0)
    assert task.num_train == 6 and len(task.val_set) == 4 and len(task.test_set) == 2
    assert all("holdout" in p for p, _ in task.val_set.samples)
    write_image_folder(tmp_path / "odd", {"cat": 1})
    with pytest.raises(DatasetError, match=r"^task\.val_root='.*odd': 1 class folders but train/ has 2"):
        ImageNet(root=str(tmp_path / "in"), val_root=str(tmp_path / "odd"), num_workers=0).setup()
    with pytest.raises(DatasetError, match=r"^task\.val_root='.*nowhere': image folder not found"):
        ImageNet(root=str(tmp_path / "in"), val_root=str(tmp_path / "nowhere"), num_workers=0).setup()


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        ("annotations", "bbox"),
        ("annotations", "image_id"),
        ("annotations", "category_id"),
        ("annotations", "segmentation"),
        ("annotations", "area"),
        ("annotations", "id"),
        ("images", "file_name"),
        ("images", "height"),
        ("images", "width"),
        ("images", "id"),
    ],
)
def test_coco_annotation_without_a_field_is_one_line(entry, field, tmp_path):
    write_coco(tmp_path, tmp_path / "images", tmp_path / "instances.json", 3)
    data = json.loads((tmp_path / "instances.json").read_text())
    del data[entry][1][field]
    (tmp_path / "instances.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError) as info:
        quiet_coco(tmp_path / "instances.json")
    line = str(info.value)
    assert "\n" not in line and str(tmp_path / "instances.json") in line and f"{entry}[1]" in line and f"no '{field}'" in line


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), r"bbox=\[1, 2, 3\]: expected \[x, y, width, height\]"),
        (lambda d: d["annotations"][0].update(image_id=999), "image_id=999: expected the id of an entry of images"),
        (lambda d: d["annotations"][0].update(category_id=55), "category_id=55: expected the id of an entry of categories"),
        (lambda d: d["annotations"][0].update(segmentation="x"), "segmentation='x': expected polygons"),
        (lambda d: d["images"][0].update(height=0), "height=0: expected an integer >= 1"),
        (lambda d: d.update(categories=[]), "'categories' is empty"),
        (lambda d: d.update(annotations={}), "'annotations' is dict: expected a list"),
    ],
)
def test_coco_annotation_bad_values_are_one_line(change, expected, tmp_path):
    write_coco(tmp_path, tmp_path / "images", tmp_path / "instances.json", 2)
    data = json.loads((tmp_path / "instances.json").read_text())
    change(data)
    (tmp_path / "instances.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=expected):
        quiet_coco(tmp_path / "instances.json")


def test_coco_task_refuses_missing_bbox_at_setup(tmp_path):
    write_coco2017(tmp_path)
    path = tmp_path / "annotations" / "instances_train2017.json"
    data = json.loads(path.read_text())
    del data["annotations"][2]["bbox"]
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"instances_train2017\.json is malformed: annotations\[2\] \(id 3\) has no 'bbox'"):
        _ = Coco(root=str(tmp_path), val_images=1, num_workers=0).num_classes


def test_run_with_nonexistent_imagenet_root_names_task_root(tmp_path):
    """What ``python run.py task=imagenet task.root=/nonexistent`` prints after ``error:``
    (the CLI's one-line path for ConfigError is covered by test_coco's CLI test)."""
    from slope_bench.train import run

    missing = tmp_path / "nonexistent"
    cfg = compose_config(["task=imagenet", f"task.root={missing}", "logger=none"], tmp_path)
    with pytest.raises(ConfigError) as info:
        run(cfg)
    assert str(info.value) == (
        f"task.root='{missing}' is not allowed: expected a folder with train/ and val/ in ImageFolder layout (one sub-folder of images per class)"
    )
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- image files
def truncate(path: Path) -> None:
    """Cut a valid image file in half (PIL: ``OSError: image file is truncated``)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def jpeg_folder(root: Path, classes: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)).save(root / name / f"{i}.jpg", quality=90)


def test_folder_of_undecodable_files_fails_at_setup_naming_a_file(tmp_path):
    write_image_folder(tmp_path / "train", {"cat": 3, "dog": 3})
    write_image_folder(tmp_path / "val", {"cat": 1, "dog": 1})
    for path in (tmp_path / "val").rglob("*.png"):
        path.write_bytes(b"not an image")
    with pytest.raises(DatasetError) as info:
        ImageNet(root=str(tmp_path), val_size=1, num_workers=0).setup()
    line = str(info.value)
    assert line.startswith(f"task.root='{tmp_path}': test images: 2 of 2 sampled images do not decode, e.g. {tmp_path / 'val'}")
    assert "UnidentifiedImageError" in line and "task.check_images=0" in line and "\n" not in line
    task = ImageNet(root=str(tmp_path), val_size=1, num_workers=0, check_images=0)
    task.setup()  # the check can be turned off


def test_corrupt_image_is_skipped_with_a_warning_and_counted(tmp_path, caplog):
    jpeg_folder(tmp_path / "train", {"cat": 4, "dog": 4})
    jpeg_folder(tmp_path / "val", {"cat": 1, "dog": 1})
    bad = tmp_path / "train" / "cat" / "2.jpg"
    truncate(bad)
    with pytest.raises(OSError):  # "image file is truncated" / "cannot load this image", by PIL version
        Image.open(bad).convert("RGB")
    task = ImageNet(root=str(tmp_path), val_size=1, image_size=16, augment=False, num_workers=0, check_images=0)
    task.setup()
    assert task.corrupt_images == []
    samples = task.train_set.samples
    i = next(k for k, (p, _) in enumerate(samples) if p == str(bad))
    with caplog.at_level("WARNING", logger="slope_bench"):
        image, label = task.train_set[i]
    assert task.corrupt_images == [str(bad)] and f"skipping a corrupt image: {bad}" in caplog.text
    following, following_label = task.train_set[(i + 1) % len(samples)]
    assert torch.equal(image, following) and label == following_label  # deterministic: the next sample
    assert sum(x.shape[0] for x, _ in task.train_dataloader()) == len(samples)  # an epoch runs through
    assert task.corrupt_images == [str(bad)]  # counted once
    # the setup sample records a few bad files without failing
    sampled = ImageNet(root=str(tmp_path), val_size=1, image_size=16, num_workers=0, check_images=16)
    sampled.setup()
    assert sampled.corrupt_images == [str(bad)]


def test_corrupt_images_met_by_loader_workers_are_counted(tmp_path):
    jpeg_folder(tmp_path / "train", {"cat": 4, "dog": 4})
    jpeg_folder(tmp_path / "val", {"cat": 1, "dog": 1})
    bad = [tmp_path / "train" / "cat" / "1.jpg", tmp_path / "train" / "dog" / "3.jpg"]
    for path in bad:
        truncate(path)
    task = ImageNet(root=str(tmp_path), val_size=1, image_size=16, batch_size=2, num_workers=2, check_images=0)
    seen = sum(x.shape[0] for x, _ in task.train_dataloader())
    assert seen == task.num_train
    carved = {p for p, _ in task.val_set.samples}
    assert sorted(task.corrupt_images) == sorted(str(p) for p in bad if str(p) not in carved)


def test_corrupt_log_is_removed_with_its_tracker(tmp_path):
    tracker = CorruptImages()
    tracker.record(tmp_path / "a.jpg", OSError("image file is truncated"))
    tracker.record(tmp_path / "a.jpg", OSError("again"))
    log_file = tracker.log_file
    assert log_file.is_file() and tracker.paths() == [str(tmp_path / "a.jpg")]
    with open(log_file, "a") as f:  # what a worker process appends
        f.write(json.dumps(str(tmp_path / "b\nc.jpg")) + "\n" + '"cut sho')
    assert tracker.paths() == [str(tmp_path / "a.jpg"), str(tmp_path / "b\nc.jpg")]
    del tracker
    gc.collect()
    assert not log_file.exists()


def test_coco_corrupt_images_train_skips_eval_blanks(tmp_path):
    write_coco2017(tmp_path)
    task = Coco(root=str(tmp_path), val_images=1, num_workers=0, check_images=0, augment=False)
    task.setup()
    train, test = task.datasets["train"], task.datasets["test"]
    truncate(train.path(0))
    truncate(test.path(1))
    image, target = train[0]
    next_image, next_target = train[1]
    assert torch.equal(image, next_image) and int(target["image_id"]) == int(next_target["image_id"])
    image, target = test[1]
    assert int(target["image_id"]) == test.image_ids[1] and image.abs().sum() == 0 and len(target["labels"]) >= 1
    assert task.corrupt_images == [str(train.path(0)), str(test.path(1))]
    for split in ("train2017", "val2017"):
        for path in (tmp_path / split).glob("*.png"):
            path.write_bytes(b"")
    with pytest.raises(
        DatasetError, match=r"^coco: train images under .*train2017: 4 of 4 sampled images do not decode, e\.g\. .*000001\.png"
    ):
        Coco(root=str(tmp_path), val_images=1, num_workers=0).setup()


def test_evaluate_refuses_an_unknown_split(tmp_path):
    with pytest.raises(ConfigError, match="^split='train' is not allowed: expected one of val, test"):
        Digits().evaluate(torch.nn.Identity(), "train")
    write_coco2017(tmp_path)
    with pytest.raises(ConfigError, match="^split='validation'"):
        Coco(root=str(tmp_path), val_images=1, num_workers=0).evaluate(torch.nn.Identity(), "validation")
