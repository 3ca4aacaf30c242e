"""Real image-classification data sets: CIFAR-10/100 (python pickle format) and ImageNet (ImageFolder).

Both carve a validation split deterministically (by the seed) from the training set
(ImageNet: or read it from ``val_root``) and keep the official test / validation set as
the test split, so validation never sees a test image. A missing or malformed data set
raises :class:`slope_bench.tasks.base.DatasetError` (or a ``ConfigError`` naming
``task.root``) at the first ``setup`` — before any training or DataLoader worker — with
one line saying what was expected where.

ImageNet reads image files: ``setup`` decodes a seeded sample of each split
(``check_images`` files), and a file that fails to decode later is skipped (the next
sample takes its place) and listed in ``task.corrupt_images``. ``synthetic=true``
writes an ImageFolder at the real shapes (:mod:`slope_bench.tasks.synthetic`) and reads
it the same way.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from slope_bench.errors import ConfigError, check_bool, check_int
from slope_bench.tasks.base import DECODE_ERRORS, MAX_SKIPS, ClassificationTask, CorruptImages, DatasetError, check_decodable, decode_image
from slope_bench.tasks.synthetic import default_synthetic_root, synthetic_imagenet

log = logging.getLogger("slope_bench")

CIFAR_FOLDERS = {10: "cifar-10-batches-py", 100: "cifar-100-python"}
CIFAR_FILES = {10: ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]), 100: (["train"], ["test"])}
CIFAR_LABEL_KEYS = {10: "labels", 100: "fine_labels"}
CIFAR_MEAN = {10: (0.4914, 0.4822, 0.4465), 100: (0.5071, 0.4865, 0.4409)}
CIFAR_STD = {10: (0.2470, 0.2435, 0.2616), 100: (0.2673, 0.2564, 0.2762)}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
        batch_size, eval_batch_size, num_workers, seed, pin_memory, persistent_workers:
            loader knobs (see :class:`~slope_bench.tasks.base.ClassificationTask`; the
            seed fixes the validation carve and the shuffling).
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
        pin_memory: bool | None = None,
        persistent_workers: bool | None = None,
    ) -> None:
        if isinstance(classes, bool) or classes not in CIFAR_FOLDERS:
            raise ConfigError("classes", classes, "10 or 100")
        super().__init__(name or f"cifar{classes}", batch_size, eval_batch_size, num_workers, seed, pin_memory, persistent_workers)
        self.root = Path(str(root)).expanduser()
        self.classes = classes
        self.download = check_bool("download", download)
        self.val_size = check_int("val_size", val_size, 1)
        self.augment = check_bool("augment", augment)
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
        # (file group, index): train and val index the training batches, test the test batch
        self.split_ids = {
            "train": [("train", i) for i in train_idx],
            "val": [("train", i) for i in val_idx],
            "test": [("test", i) for i in range(len(test_labels))],
        }
        self._ready = True


class FileSamples(Dataset):
    """``(path, class)`` samples of an image folder, decoded with PIL and transformed.

    A file that fails to decode is recorded in ``corrupt`` (a warning naming it) and
    skipped: the next decodable sample (index + 1, + 2, …, wrapping) takes its place,
    so the substitute is the same in every run and in every worker.

    Args:
        samples: ``(path, class index)`` pairs.
        transform: applied to the decoded RGB image.
        corrupt: where skipped files are recorded (a private tracker when ``None``).
    """

    def __init__(self, samples: list[tuple[str, int]], transform: Callable, corrupt: CorruptImages | None = None) -> None:
        self.samples, self.transform = samples, transform
        self.corrupt = corrupt if corrupt is not None else CorruptImages()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        for step in range(min(len(self.samples), MAX_SKIPS)):
            path, label = self.samples[(i + step) % len(self.samples)]
            try:
                image = decode_image(path)
            except DECODE_ERRORS as e:
                self.corrupt.record(path, e)
                continue
            return self.transform(image), label
        raise DatasetError(
            f"{min(len(self.samples), MAX_SKIPS)} consecutive images from {self.samples[i][0]} on do not decode: expected readable image files"
        )


def scan_image_folder(folder: Path, where: str | None = None, allow_empty: bool = False) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes and samples of an ImageFolder-layout folder (``folder/<class>/<image>``).

    Args:
        folder: the folder to scan (torchvision's ImageFolder rules: one sub-folder per
            class, image files by extension, every class folder non-empty).
        where: the knob the folder comes from, prefixed to messages (``task.root='/x'``).
        allow_empty: accept empty class folders (the synthetic set with ``synthetic_images``).

    Raises:
        DatasetError: the folder is missing or holds no class folder with images.
    """
    from torchvision.datasets import ImageFolder

    prefix = f"{where}: " if where else ""
    if not folder.is_dir():
        raise DatasetError(f"{prefix}image folder not found: expected {folder} with one sub-folder of images per class")
    try:
        dataset = ImageFolder(str(folder), allow_empty=allow_empty)
    except (FileNotFoundError, RuntimeError) as e:
        raise DatasetError(
            f"{prefix}image folder {folder} is malformed: expected one sub-folder of images per class ({str(e).splitlines()[0]})"
        ) from None
    return dataset.classes, dataset.samples


class ImageNet(ClassificationTask):
    """ImageNet (or any ImageFolder data set) from ``root/train`` and ``root/val``.

    Standard transforms: RandomResizedCrop + horizontal flip for training, Resize
    (``image_size / 0.875``) + CenterCrop for evaluation, ImageNet normalisation. The
    test split is ``root/val`` (the reported numbers); the validation split is
    ``val_size`` training images carved deterministically by the seed, or the
    ImageFolder ``val_root`` when given (then every training image trains).

    ``setup`` checks the structure (train/ and val/ with the same ≥ 2 class folders)
    and decodes ``check_images`` seeded files of each split; every problem is one line
    naming ``task.root`` (or the knob at fault).

    With ``synthetic=true`` nothing is read from ``root``: an ImageFolder of
    ``synthetic_classes`` classes × ``synthetic_images_per_class`` JPEGs of
    ``synthetic_size`` px per split is written under ``synthetic_root`` (once per knob
    setting) and read the same way. Its validation carve is clamped to a tenth of its
    training images (``val_size`` is meant for the real 1.28 M), which is logged.
    ``synthetic_images`` keeps the 1,000 classes (and a model's 1,000 outputs) but writes
    only that many JPEGs per split, one in each of as many evenly spaced classes (the other
    class folders stay empty): a true-shape run whose evaluations read a handful of images.

    Args:
        root: folder with ``train/`` and ``val/`` in ImageFolder layout (same classes).
        name: task name recorded in results.
        image_size: crop side (224).
        val_size: training images held out for validation (unused with ``val_root``).
        augment: random resized crops and flips for training (otherwise eval transforms).
        batch_size, eval_batch_size, num_workers, seed, pin_memory, persistent_workers:
            loader knobs (see :class:`~slope_bench.tasks.base.ClassificationTask`).
        val_root: optional ImageFolder used as the validation split (same classes;
            neither ``root/train`` nor ``root/val``).
        check_images: files of each split decoded at setup (0: no check).
        synthetic: write and read a synthetic ImageFolder instead of ``root``.
        synthetic_classes: its classes (1,000 like ImageNet).
        synthetic_images_per_class: its JPEGs per class in train/ and in val/.
        synthetic_size: its image side in px (at least ``image_size``).
        synthetic_images: ``None`` (``synthetic_classes`` × ``synthetic_images_per_class``),
            or its JPEGs per split in all, 2 … ``synthetic_classes``, spread over the classes.
        synthetic_root: where synthetic sets are written (``None``: the system temp folder).
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
        val_root: str | None = None,
        check_images: int = 16,
        synthetic: bool = False,
        synthetic_classes: int = 1000,
        synthetic_images_per_class: int = 1,
        synthetic_size: int = 256,
        synthetic_images: int | None = None,
        synthetic_root: str | None = None,
        pin_memory: bool | None = None,
        persistent_workers: bool | None = None,
    ) -> None:
        super().__init__(name, batch_size, eval_batch_size, num_workers, seed, pin_memory, persistent_workers)
        self.root = Path(str(root)).expanduser()
        self.image_size = check_int("image_size", image_size, 8)
        self.val_size = check_int("val_size", val_size, 1)
        self.augment = check_bool("augment", augment)
        self.check_images = check_int("check_images", check_images, 0)
        self.synthetic = check_bool("synthetic", synthetic)
        self.synthetic_classes = check_int("synthetic_classes", synthetic_classes, 2)
        self.synthetic_images_per_class = check_int("synthetic_images_per_class", synthetic_images_per_class, 1)
        self.synthetic_size = check_int("synthetic_size", synthetic_size, self.image_size)
        self.synthetic_images = (
            None if synthetic_images is None else check_int("synthetic_images", synthetic_images, 2, self.synthetic_classes)
        )
        self.synthetic_root = Path(str(synthetic_root)).expanduser() if synthetic_root is not None else default_synthetic_root()
        self.val_root = self._check_val_root(val_root)
        self.classes: list[str] = []
        self._ready = False

    def _check_val_root(self, val_root: Any) -> Path | None:
        if val_root is None:
            return None
        if self.synthetic:
            raise ConfigError(
                "val_root",
                val_root,
                "null with synthetic=true (the synthetic set has no validation folder: its validation split is carved from train/)",
            )
        if not isinstance(val_root, (str, os.PathLike)) or not str(val_root):
            raise ConfigError("val_root", val_root, "null or the path of an ImageFolder")
        path = Path(val_root).expanduser()
        if path.resolve() in {(self.root / "train").resolve(), (self.root / "val").resolve(), self.root.resolve()}:
            raise ConfigError(
                "val_root",
                str(val_root),
                "a folder other than root/train and root/val (validation must not share images with training or test)",
            )
        return path

    @property
    def num_classes(self) -> int:
        self.setup()
        return len(self.classes)

    @property
    def data_root(self) -> Path:
        """The folder holding ``train/`` and ``val/``: ``root``, or the synthetic set (written on first use)."""
        if not self.synthetic:
            return self.root
        return synthetic_imagenet(
            self.synthetic_root,
            self.synthetic_classes,
            self.synthetic_images_per_class,
            self.synthetic_size,
            where=f"task.synthetic_root={str(self.synthetic_root)!r}",
            images=self.synthetic_images,
        )

    def transforms(self) -> tuple[Callable, Callable]:
        normalize = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        evaluation = v2.Compose([v2.Resize(round(self.image_size / 0.875), antialias=True), v2.CenterCrop(self.image_size), *normalize])
        if not self.augment:
            return evaluation, evaluation
        train = v2.Compose([v2.RandomResizedCrop(self.image_size, antialias=True), v2.RandomHorizontalFlip(), *normalize])
        return train, evaluation

    def _validation_size(self, n_train: int) -> int:
        if not self.synthetic:
            if self.val_size >= n_train:
                raise ConfigError("task.val_size", self.val_size, f"fewer than the {n_train} training images")
            return self.val_size
        size = min(self.val_size, max(1, n_train // 10))
        if size != self.val_size:
            log.info(
                "synthetic imagenet: validation carve of %d images (task.val_size=%d clamped to a tenth of %d)",
                size,
                self.val_size,
                n_train,
            )
        return size

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        where = f"task.synthetic_root={str(self.synthetic_root)!r}" if self.synthetic else f"task.root={str(self.root)!r}"
        if not self.synthetic and not self.root.is_dir():
            raise ConfigError(
                "task.root", str(self.root), "a folder with train/ and val/ in ImageFolder layout (one sub-folder of images per class)"
            )
        root = self.data_root
        sparse = self.synthetic and self.synthetic_images is not None  # empty class folders by design
        classes, train_samples = scan_image_folder(root / "train", where, allow_empty=sparse)
        test_classes, test_samples = scan_image_folder(root / "val", where, allow_empty=sparse)
        if len(classes) < 2:
            raise DatasetError(
                f"{where}: {root / 'train'} has {len(classes)} class folder ({', '.join(classes)}): expected at least 2 (one sub-folder of images per class)"
            )
        if classes != test_classes:
            raise DatasetError(
                f"{where}: train/ has {len(classes)} classes and val/ has {len(test_classes)}: expected the same class folders in both"
            )
        if self.val_root is not None:
            val_where = f"task.val_root={str(self.val_root)!r}"
            val_classes, val_samples = scan_image_folder(self.val_root, val_where)
            if val_classes != classes:
                raise DatasetError(
                    f"{val_where}: {len(val_classes)} class folders but train/ has {len(classes)}: expected the same class folders"
                )
            train = train_samples
        else:
            train_idx, val_idx = carve_validation(len(train_samples), self._validation_size(len(train_samples)), self.seed)
            train, val_samples = [train_samples[i] for i in train_idx], [train_samples[i] for i in val_idx]
        for samples, split in ((train, "training"), (val_samples, "validation"), (test_samples, "test")):
            check_decodable([p for p, _ in samples], self.check_images, self.seed, f"{where}: {split} images", self.corrupt)
        train_tf, eval_tf = self.transforms()
        self.classes = classes
        self.train_set = FileSamples(train, train_tf, self.corrupt)
        self.calib_set = FileSamples(train, eval_tf, self.corrupt)
        self.val_set = FileSamples(val_samples, eval_tf, self.corrupt)
        self.test_set = FileSamples(test_samples, eval_tf, self.corrupt)
        self.split_ids = {"train": [p for p, _ in train], "val": [p for p, _ in val_samples], "test": [p for p, _ in test_samples]}
        self._ready = True
