"""Real image-classification data sets: CIFAR-10/100 (python pickle format) and ImageNet (ImageFolder).

Both carve a validation split deterministically (by the seed) from the training set
and keep the official test / validation set as the test split. A missing or malformed
data set raises :class:`slope_bench.tasks.base.DatasetError` at the first ``setup``
(before any DataLoader worker starts) with one line saying what was expected where.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from slope_bench.errors import ConfigError
from slope_bench.tasks.base import ClassificationTask, DatasetError

CIFAR_FOLDERS = {10: "cifar-10-batches-py", 100: "cifar-100-python"}
CIFAR_FILES = {10: ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]), 100: (["train"], ["test"])}
CIFAR_LABEL_KEYS = {10: "labels", 100: "fine_labels"}
CIFAR_MEAN = {10: (0.4914, 0.4822, 0.4465), 100: (0.5071, 0.4865, 0.4409)}
CIFAR_STD = {10: (0.2470, 0.2435, 0.2616), 100: (0.2673, 0.2564, 0.2762)}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _int_at_least(key: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(key, value, f"an integer >= {low}")
    return value


def carve_validation(size: int, val_size: int, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic ``(train, val)`` index lists: ``val_size`` indices of ``range(size)`` held out."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[val_size:]), sorted(order[:val_size])


class IndexedImages(Dataset):
    """A subset of uint8 images ``(N, 3, H, W)`` with labels and a transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, indices: list[int], transform: Callable) -> None:
        self.images, self.labels, self.indices, self.transform = images, labels, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = self.indices[i]
        return self.transform(self.images[j]), int(self.labels[j])


def read_cifar_batches(folder: Path, files: list[str], label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 3, 32, 32)`` uint8 and labels from CIFAR python pickle batches.

    Raises:
        DatasetError: a file is missing or is not a CIFAR batch.
    """
    images, labels = [], []
    for name in files:
        path = folder / name
        if not path.is_file():
            raise DatasetError(f"CIFAR batch not found: expected {path} (python version of the data set; task.download=true fetches it)")
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            targets = np.asarray(entry[label_key], dtype=np.int64)
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as e:
            raise DatasetError(
                f"CIFAR batch {path} is malformed: expected a pickled dict with 'data' (N x 3072 uint8) and '{label_key}' ({type(e).__name__})"
            ) from None
        if len(data) != len(targets):
            raise DatasetError(f"CIFAR batch {path} is malformed: {len(data)} images but {len(targets)} labels")
        images.append(torch.from_numpy(data))
        labels.append(torch.from_numpy(targets))
    return torch.cat(images), torch.cat(labels)


class Cifar(ClassificationTask):
    """CIFAR-10 or CIFAR-100 (torchvision's python pickle format under ``root``).

    Expects ``root/cifar-10-batches-py/{data_batch_1..5,test_batch}`` or
    ``root/cifar-100-python/{train,test}``; ``download=true`` fetches them with
    torchvision first. Training: random crop (4 px padding) and horizontal flip;
    per-channel normalisation.

    Args:
        root: folder holding the extracted data set.
        classes: 10 or 100.
        download: download with torchvision when missing.
        val_size: training images held out as the validation split.
        augment: crop + flip augmentation for training.
        batch_size, eval_batch_size, num_workers, seed: loader knobs (the seed fixes the
            validation carve and the shuffling).
    """

    in_chans = 3
    image_size = 32

    def __init__(
        self,
        root: str,
        name: str | None = None,
        classes: int = 10,
        download: bool = False,
        val_size: int = 5000,
        augment: bool = True,
        batch_size: int = 128,
        eval_batch_size: int = 512,
        num_workers: int = 2,
        seed: int = 0,
    ) -> None:
        if classes not in CIFAR_FOLDERS:
            raise ConfigError("classes", classes, "10 or 100")
        super().__init__(name or f"cifar{classes}", batch_size, eval_batch_size, num_workers, seed)
        self.root = Path(str(root)).expanduser()
        self.classes = classes
        self.download = bool(download)
        self.val_size = _int_at_least("val_size", val_size, 1)
        self.augment = bool(augment)
        self._ready = False

    @property
    def num_classes(self) -> int:
        return self.classes

    def transforms(self) -> tuple[Callable, Callable]:
        normalize = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(CIFAR_MEAN[self.classes], CIFAR_STD[self.classes])]
        train = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()] if self.augment else []
        return v2.Compose(train + normalize), v2.Compose(normalize)

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        folder = self.root / CIFAR_FOLDERS[self.classes]
        if self.download and not folder.is_dir():
            from torchvision import datasets

            dataset = datasets.CIFAR10 if self.classes == 10 else datasets.CIFAR100
            try:
                dataset(str(self.root), train=True, download=True)
            except Exception as e:  # network or disk failure: one readable line
                raise DatasetError(
                    f"CIFAR-{self.classes} download into {self.root} failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                ) from None
        if not folder.is_dir():
            raise DatasetError(f"CIFAR-{self.classes} not found: expected {folder} (python version; set task.download=true to fetch it)")
        train_files, test_files = CIFAR_FILES[self.classes]
        label_key = CIFAR_LABEL_KEYS[self.classes]
        train_images, train_labels = read_cifar_batches(folder, train_files, label_key)
        test_images, test_labels = read_cifar_batches(folder, test_files, label_key)
        for labels, split in ((train_labels, "training"), (test_labels, "test")):
            if len(labels) and (labels.min() < 0 or labels.max() >= self.classes):
                raise DatasetError(f"CIFAR-{self.classes} {split} labels under {folder} are outside 0..{self.classes - 1}")
        if self.val_size >= len(train_labels):
            raise ConfigError("task.val_size", self.val_size, f"fewer than the {len(train_labels)} training images")
        train_idx, val_idx = carve_validation(len(train_labels), self.val_size, self.seed)
        train_tf, eval_tf = self.transforms()
        self.train_set = IndexedImages(train_images, train_labels, train_idx, train_tf)
        self.calib_set = IndexedImages(train_images, train_labels, train_idx, eval_tf)
        self.val_set = IndexedImages(train_images, train_labels, val_idx, eval_tf)
        self.test_set = IndexedImages(test_images, test_labels, list(range(len(test_labels))), eval_tf)
        self._ready = True


class FileSamples(Dataset):
    """``(path, class)`` samples of an image folder, read with PIL and transformed."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable) -> None:
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from torchvision.datasets.folder import default_loader

        path, label = self.samples[i]
        return self.transform(default_loader(path)), label


def scan_image_folder(folder: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes and samples of an ImageFolder-layout folder (``folder/<class>/<image>``).

    Raises:
        DatasetError: the folder is missing or holds no class folder with images.
    """
    from torchvision.datasets import ImageFolder

    if not folder.is_dir():
        raise DatasetError(f"image folder not found: expected {folder} with one sub-folder of images per class")
    try:
        dataset = ImageFolder(str(folder))
    except (FileNotFoundError, RuntimeError) as e:
        raise DatasetError(
            f"image folder {folder} is malformed: expected one sub-folder of images per class ({str(e).splitlines()[0]})"
        ) from None
    return dataset.classes, dataset.samples


class ImageNet(ClassificationTask):
    """ImageNet (or any ImageFolder data set) from ``root/train`` and ``root/val``.

    Standard transforms: RandomResizedCrop + horizontal flip for training, Resize
    (``image_size / 0.875``) + CenterCrop for evaluation, ImageNet normalisation. The
    test split is ``root/val`` (the reported numbers); the validation split is
    ``val_size`` training images carved deterministically by the seed.

    Args:
        root: folder with ``train/`` and ``val/`` in ImageFolder layout (same classes).
        image_size: crop side (224).
        val_size: training images held out for validation.
        augment: random resized crops and flips for training (otherwise eval transforms).
        batch_size, eval_batch_size, num_workers, seed: loader knobs.
    """

    in_chans = 3

    def __init__(
        self,
        root: str,
        name: str = "imagenet",
        image_size: int = 224,
        val_size: int = 10000,
        augment: bool = True,
        batch_size: int = 256,
        eval_batch_size: int = 256,
        num_workers: int = 8,
        seed: int = 0,
    ) -> None:
        super().__init__(name, batch_size, eval_batch_size, num_workers, seed)
        self.root = Path(str(root)).expanduser()
        self.image_size = _int_at_least("image_size", image_size, 8)
        self.val_size = _int_at_least("val_size", val_size, 1)
        self.augment = bool(augment)
        self.classes: list[str] = []
        self._ready = False

    @property
    def num_classes(self) -> int:
        self.setup()
        return len(self.classes)

    def transforms(self) -> tuple[Callable, Callable]:
        normalize = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        evaluation = v2.Compose([v2.Resize(round(self.image_size / 0.875), antialias=True), v2.CenterCrop(self.image_size), *normalize])
        if not self.augment:
            return evaluation, evaluation
        train = v2.Compose([v2.RandomResizedCrop(self.image_size, antialias=True), v2.RandomHorizontalFlip(), *normalize])
        return train, evaluation

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        if not self.root.is_dir():
            raise DatasetError(f"ImageNet not found: expected a folder {self.root} with train/ and val/ (one sub-folder per class)")
        classes, train_samples = scan_image_folder(self.root / "train")
        val_classes, test_samples = scan_image_folder(self.root / "val")
        if classes != val_classes:
            raise DatasetError(
                f"ImageNet at {self.root}: train/ has {len(classes)} classes and val/ has {len(val_classes)}: expected the same class folders"
            )
        if self.val_size >= len(train_samples):
            raise ConfigError("task.val_size", self.val_size, f"fewer than the {len(train_samples)} training images")
        train_idx, val_idx = carve_validation(len(train_samples), self.val_size, self.seed)
        train_tf, eval_tf = self.transforms()
        train = [train_samples[i] for i in train_idx]
        self.classes = classes
        self.train_set = FileSamples(train, train_tf)
        self.calib_set = FileSamples(train, eval_tf)
        self.val_set = FileSamples([train_samples[i] for i in val_idx], eval_tf)
        self.test_set = FileSamples(test_samples, eval_tf)
        self._ready = True
