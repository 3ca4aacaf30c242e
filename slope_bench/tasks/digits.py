"""scikit-learn's 8×8 handwritten digits (1,797 images, shipped with the package).

A deterministic, stratified train/val/test split (about 70/10/20, fixed by the seed),
3-channel normalised tensors, light augmentation for training (random ±1 pixel
shifts at 8×8, scaled with the resolution), and an optional upscaling knob.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset

from slope_bench.errors import ConfigError, check_bool
from slope_bench.tasks.base import ClassificationTask

RESOLUTIONS = (8, 16, 32, 64)


class TensorImages(Dataset):
    """Images ``(N, C, H, W)`` and labels with an optional random shift augmentation."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, shift: int = 0) -> None:
        self.images, self.labels, self.shift = images, labels, shift

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.images[i]
        if self.shift:
            dy, dx = torch.randint(-self.shift, self.shift + 1, (2,)).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(1, 2))
            if dy > 0:
                x[:, :dy] = x.min()
            elif dy < 0:
                x[:, dy:] = x.min()
            if dx > 0:
                x[:, :, :dx] = x.min()
            elif dx < 0:
                x[:, :, dx:] = x.min()
        return x, self.labels[i]


def split_indices(labels: np.ndarray, seed: int, val: float = 0.1, test: float = 0.2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified train/val/test indices, deterministic in ``seed``."""
    idx = np.arange(len(labels))
    rest, test_idx = train_test_split(idx, test_size=test, stratify=labels, random_state=seed)
    train_idx, val_idx = train_test_split(rest, test_size=val / (1 - test), stratify=labels[rest], random_state=seed)
    return np.sort(train_idx), np.sort(val_idx), np.sort(test_idx)


def to_tensor(images: np.ndarray, resolution: int) -> torch.Tensor:
    """``(N, 8, 8)`` in 0..16 → normalised ``(N, 3, r, r)`` float tensor."""
    x = torch.as_tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
    if resolution != 8:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    x = (x - 0.3) / 0.4  # fixed normalisation (digits pixel mean ≈ 0.30, std ≈ 0.40)
    return x.repeat(1, 3, 1, 1).contiguous()


class Digits(ClassificationTask):
    """The embedded default classification task.

    Args:
        resolution: image side (8 native; 16/32/64 bilinear upscaling).
        augment: random shifts of up to ``resolution // 8`` pixels for training.
        batch_size, eval_batch_size, num_workers, pin_memory, persistent_workers: loader
            knobs (see :class:`~slope_bench.tasks.base.ClassificationTask`).
        seed: fixes the split (and the loader shuffling).
    """

    num_classes = 10
    in_chans = 3

    def __init__(
        self,
        name: str = "digits",
        resolution: int = 8,
        augment: bool = True,
        batch_size: int = 128,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool | None = None,
    ) -> None:
        super().__init__(name, batch_size, eval_batch_size, num_workers, seed, pin_memory, persistent_workers)
        if isinstance(resolution, bool) or resolution not in RESOLUTIONS:
            raise ConfigError("resolution", resolution, "one of " + ", ".join(map(str, RESOLUTIONS)))
        self.resolution = resolution
        self.image_size = resolution
        self.augment = check_bool("augment", augment)
        self._ready = False

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        data = load_digits()
        labels = data.target.astype(np.int64)
        images = to_tensor(data.images, self.resolution)
        y = torch.as_tensor(labels)
        tr, va, te = split_indices(labels, self.seed)
        shift = max(self.resolution // 8, 1) if self.augment else 0
        self.train_set = TensorImages(images[tr], y[tr], shift)
        self.calib_set = TensorImages(images[tr], y[tr], 0)
        self.val_set = TensorImages(images[va], y[va], 0)
        self.test_set = TensorImages(images[te], y[te], 0)
        self.split_ids = {"train": tr.tolist(), "val": va.tolist(), "test": te.tolist()}  # indices into load_digits()
        self._ready = True
