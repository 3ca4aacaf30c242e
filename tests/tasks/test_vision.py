"""CIFAR-10/100 (python pickle format) and ImageNet (ImageFolder) on tiny data sets in tmp_path."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from slope_bench.errors import ConfigError
from slope_bench.tasks.base import DatasetError
from slope_bench.tasks.vision import CIFAR_MEAN, CIFAR_STD, Cifar, ImageNet, carve_validation


def write_cifar(root: Path, classes: int, per_file: int = 6) -> dict[str, np.ndarray]:
    """CIFAR batches in torchvision's python format; returns the pixels written per file."""
    folder = root / ("cifar-10-batches-py" if classes == 10 else "cifar-100-python")
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if classes == 10 else ["train", "test"]
    key = "labels" if classes == 10 else "fine_labels"
    rng = np.random.default_rng(classes)
    written = {}
    for name in names:
        data = rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, classes, size=per_file)]
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, key: labels, "batch_label": name}, f)
        written[name] = (data, labels)
    return written


def test_cifar10_reads_pickles_carves_val_and_normalises(tmp_path):
    written = write_cifar(tmp_path, 10)
    task = Cifar(root=str(tmp_path), classes=10, val_size=6, augment=False, batch_size=4, num_workers=0)
    assert task.num_classes == 10 and task.image_size == 32 and task.in_chans == 3
    assert task.num_train == 24 and len(task.val_set) == 6 and len(task.test_set) == 6
    image, label = task.test_set[0]
    data, labels = written["test_batch"]
    expected = torch.from_numpy(data[0].reshape(3, 32, 32)).float() / 255
    expected = (expected - torch.tensor(CIFAR_MEAN[10])[:, None, None]) / torch.tensor(CIFAR_STD[10])[:, None, None]
    assert torch.allclose(image, expected, atol=1e-5) and label == labels[0]
    assert set(task.train_set.indices).isdisjoint(task.val_set.indices)
    assert sorted(task.train_set.indices + task.val_set.indices) == list(range(30))
    again = Cifar(root=str(tmp_path), classes=10, val_size=6, num_workers=0)
    again.setup()
    assert again.val_set.indices == task.val_set.indices  # same seed, same carve
    x, y = next(iter(task.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and y.dtype == torch.int64
    assert task.example_input().shape == (1, 3, 32, 32)
    assert sum(b.shape[0] for b in task.calib_batches(10)) == 10


def test_cifar_training_augmentation_keeps_shape(tmp_path):
    write_cifar(tmp_path, 10)
    task = Cifar(root=str(tmp_path), classes=10, val_size=6, augment=True, num_workers=0)
    task.setup()
    torch.manual_seed(0)
    image, _ = task.train_set[0]
    plain, _ = task.calib_set[0]
    assert image.shape == plain.shape == (3, 32, 32)


def test_cifar100_uses_fine_labels(tmp_path):
    written = write_cifar(tmp_path, 100, per_file=8)
    task = Cifar(root=str(tmp_path), classes=100, val_size=2, augment=False, num_workers=0)
    assert task.name == "cifar100" and task.num_classes == 100 and task.num_train == 6
    assert [task.test_set[i][1] for i in range(8)] == written["test"][1]


def test_cifar_missing_or_malformed_raises_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match=r"CIFAR-10 not found: expected .*cifar-10-batches-py"):
        Cifar(root=str(tmp_path), classes=10, num_workers=0).setup()
    write_cifar(tmp_path, 10)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="data_batch_3 is malformed"):
        Cifar(root=str(tmp_path), classes=10, val_size=2, num_workers=0).setup()
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match="CIFAR batch not found: expected .*data_batch_3"):
        Cifar(root=str(tmp_path), classes=10, val_size=2, num_workers=0).setup()
    with pytest.raises(ConfigError, match="classes"):
        Cifar(root=str(tmp_path), classes=20)


def write_image_folder(root: Path, classes: dict[str, int], size=(30, 40)) -> None:
    rng = np.random.default_rng(0)
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)).save(root / name / f"{i}.png")


def test_imagenet_image_folder_transforms_and_splits(tmp_path):
    write_image_folder(tmp_path / "train", {"cat": 5, "dog": 5})
    write_image_folder(tmp_path / "val", {"cat": 2, "dog": 1})
    task = ImageNet(root=str(tmp_path), image_size=16, val_size=3, batch_size=4, num_workers=0)
    assert task.num_classes == 2 and task.classes == ["cat", "dog"]
    assert task.num_train == 7 and len(task.val_set) == 3 and len(task.test_set) == 3
    image, label = task.test_set[2]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and label == 1
    train_image, _ = task.train_set[0]
    assert train_image.shape == (3, 16, 16)
    x, y = next(iter(task.train_dataloader()))
    assert x.shape == (4, 3, 16, 16) and y.shape == (4,)
    held_out = {p for p, _ in task.val_set.samples}
    assert held_out.isdisjoint(p for p, _ in task.train_set.samples)
    assert task.example_input().shape == (1, 3, 16, 16)


def test_imagenet_missing_or_mismatched_names_task_root(tmp_path):
    with pytest.raises(ConfigError, match=r"^task\.root='.*none' is not allowed: expected a folder with train/ and val/"):
        _ = ImageNet(root=str(tmp_path / "none"), num_workers=0).num_classes
    write_image_folder(tmp_path / "train", {"cat": 3, "dog": 3})
    with pytest.raises(DatasetError, match=r"^task\.root='.*': image folder not found: expected .*val"):
        ImageNet(root=str(tmp_path), val_size=1, num_workers=0).setup()
    write_image_folder(tmp_path / "val", {"cat": 1})
    with pytest.raises(DatasetError, match=r"^task\.root=.*expected the same class folders"):
        ImageNet(root=str(tmp_path), val_size=1, num_workers=0).setup()
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"^task\.root=.*malformed"):
        ImageNet(root=str(tmp_path / "empty"), val_size=1, num_workers=0).setup()


def test_carve_validation_is_a_deterministic_partition():
    train, val = carve_validation(20, 5, seed=3)
    assert len(val) == 5 and sorted(train + val) == list(range(20))
    assert carve_validation(20, 5, seed=3) == (train, val)
    assert carve_validation(20, 5, seed=4)[1] != val
