"""scikit-learn digits made harder, deterministically: random affine distortions + noise.

The plain digits task cannot rank compression methods: a ResNet-18 keeps its accuracy
at almost any compression and its 360-image test set moves 0.28 points per image. This
task keeps the split and the normalisation of :class:`~slope_bench.tasks.digits.Digits`
but

* distorts every training image on the fly with a random affine transform (rotation,
  translation, scale, shear) and adds Gaussian pixel noise;
* replaces the val and test sets by ``copies`` fixed distorted copies of the held-out
  images (5 copies: 900 val and 1,800 test images), drawn from the seed, so every run
  with the same seed sees the same tensors;
* calibrates on one fixed distorted copy of the training images.

Every random draw comes from a generator seeded by ``(seed, split, draw)``, never from
the global RNG: the training draws of epoch ``e`` are the same whether or not the dense
reference was loaded from the cache, and with any number of loader workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, Dataset, Sampler

from slope_bench.errors import ConfigError, check_int, check_range
from slope_bench.tasks.base import make_loader
from slope_bench.tasks.digits import Digits, TensorImages, split_indices, to_tensor

MEAN, STD = 0.3, 0.4  # the normalisation of digits.to_tensor (pixels in [0, 1])
STREAMS = {"train": 0, "val": 1, "test": 2, "calib": 3}  # independent random streams per split


@dataclass(frozen=True)
class Distortion:
    """Ranges of the random affine transform and the pixel noise.

    Attributes:
        rotation: angle drawn uniformly in ``[-rotation, rotation]`` degrees.
        translation: shift drawn uniformly in ``[-translation, translation]`` of the
            image side, independently along x and y.
        scale: zoom factor drawn uniformly in ``[scale[0], scale[1]]``.
        shear: x-shear angle drawn uniformly in ``[-shear, shear]`` degrees.
        noise: standard deviation of the additive Gaussian noise, in pixel units
            (pixels span ``[0, 1]`` before normalisation).
    """

    rotation: float = 20.0
    translation: float = 0.15
    scale: tuple[float, float] = (0.8, 1.1)
    shear: float = 10.0
    noise: float = 0.1


def affine_matrices(n: int, distortion: Distortion, generator: torch.Generator) -> torch.Tensor:
    """``n`` random forward affine maps in normalised image coordinates, ``(n, 2, 3)``.

    The forward map sends a source point ``p`` (coordinates in ``[-1, 1]``, square
    image) to ``A p + t`` with ``A = R(angle) · Shear_x(shear) · diag(scale, scale)``
    and ``t`` = translation × 2 (the normalised side spans 2), as in torchvision's
    ``RandomAffine``.

    Args:
        n: number of matrices.
        distortion: the ranges.
        generator: the random stream (draw order: angle, translation, scale, shear).
    """

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=generator, dtype=torch.float64)

    angle = torch.deg2rad(uniform(-distortion.rotation, distortion.rotation, n))
    shift = 2.0 * uniform(-distortion.translation, distortion.translation, n, 2)
    zoom = uniform(distortion.scale[0], distortion.scale[1], n)
    shear = torch.deg2rad(uniform(-distortion.shear, distortion.shear, n))
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    shearing = torch.zeros(n, 2, 2, dtype=torch.float64)
    shearing[:, 0, 0] = 1.0
    shearing[:, 0, 1] = torch.tan(shear)
    shearing[:, 1, 1] = 1.0
    linear = rotation @ shearing * zoom[:, None, None]
    return torch.cat([linear, shift[:, :, None]], dim=2)


def rotation_degrees(forward: torch.Tensor) -> torch.Tensor:
    """Rotation angle in degrees of forward maps built by :func:`affine_matrices`.

    The first column of ``R · Shear_x · s`` is ``s (cos a, sin a)``.
    """
    return torch.rad2deg(torch.atan2(forward[:, 1, 0], forward[:, 0, 0]))


def warp(images: torch.Tensor, forward: torch.Tensor) -> torch.Tensor:
    """Apply forward affine maps to ``(N, C, H, W)`` images (bilinear, zero fill).

    ``F.affine_grid`` takes the map from output to input coordinates, so each forward
    map ``[A | t]`` is inverted to ``[A⁻¹ | -A⁻¹ t]``.
    """
    inverse_linear = torch.linalg.inv(forward[:, :, :2])
    inverse = torch.cat([inverse_linear, -inverse_linear @ forward[:, :, 2:]], dim=2).to(images.dtype)
    grid = F.affine_grid(inverse, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def distort(pixels: torch.Tensor, distortion: Distortion, generator: torch.Generator) -> torch.Tensor:
    """Random affine + Gaussian noise on ``(N, 1, H, W)`` pixels in ``[0, 1]``; returns
    normalised 3-channel images ``(N, 3, H, W)``."""
    out = warp(pixels, affine_matrices(len(pixels), distortion, generator))
    if distortion.noise:
        out = out + distortion.noise * torch.randn(out.shape, generator=generator, dtype=out.dtype)
    return normalise(out)


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """``(N, 1, H, W)`` pixels in ``[0, 1]`` → normalised ``(N, 3, H, W)`` (as digits)."""
    return ((pixels - MEAN) / STD).repeat(1, 3, 1, 1).contiguous()


def generator_for(seed: int, stream: str, draw: int = 0) -> torch.Generator:
    """An independent generator per ``(seed, split stream, draw)``."""
    key = (seed * len(STREAMS) + STREAMS[stream]) * 2**32 + draw
    return torch.Generator().manual_seed(key % 2**63)


def fixed_copies(
    pixels: torch.Tensor, labels: torch.Tensor, copies: int, distortion: Distortion, seed: int, stream: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``copies`` distorted copies of every image (copy-major order), drawn from the seed."""
    generator = generator_for(seed, stream)
    images = torch.cat([distort(pixels, distortion, generator) for _ in range(copies)])
    return images, labels.repeat(copies)


class DistortedImages(Dataset):
    """Training images distorted on the fly; indexed by ``(index, draw)`` pairs.

    ``draw`` numbers the sample within the whole sequence of epochs (see
    :class:`EpochSampler`). A batch is distorted at once (``__getitems__``, used by the
    DataLoader) with a generator seeded by ``(seed, draw of its first sample)``, so the
    distortions are a pure function of the seed, the batch size and the epoch. A plain
    integer index returns the undistorted image.
    """

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, distortion: Distortion, seed: int) -> None:
        self.pixels, self.labels, self.distortion, self.seed = pixels, labels, distortion, seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, items: list[tuple[int, int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        index = torch.tensor([i for i, _ in items])
        images = distort(self.pixels[index], self.distortion, generator_for(self.seed, "train", items[0][1]))
        return list(zip(images, self.labels[index], strict=True))

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(item, tuple):
            return self.__getitems__([item])[0]
        return normalise(self.pixels[item : item + 1])[0], self.labels[item]


class EpochSampler(Sampler):
    """Shuffles ``size`` indices per epoch and numbers every sample drawn.

    Epoch ``e`` (``e``-th call of ``__iter__`` on this sampler) yields
    ``(permutation_e[k], e * size + k)``; the permutation comes from a generator seeded
    by ``(seed, e)``. A fresh sampler (one per ``train_dataloader()`` call, i.e. per
    fit) starts again at epoch 0; Lightning's ``set_epoch`` (called before every epoch)
    pins the epoch number to the trainer's.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def __len__(self) -> int:
        return self.size

    def set_epoch(self, epoch: int) -> None:
        """Use the draws of epoch ``epoch`` on the next ``__iter__``."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = generator_for(self.seed, "train", 2**31 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        base = self.epoch * self.size
        self.epoch += 1
        return iter([(index, base + k) for k, index in enumerate(order)])


class DigitsHard(Digits):
    """Distorted digits: a classification task small enough for CPU that still ranks methods.

    Args:
        name: task name recorded in results.
        resolution: image side (8 native; 16/32/64 bilinear upscaling before distortion).
        augment: distort the training images on the fly (False: clean training images).
        copies: distorted copies of each held-out image in the val and test sets.
        rotation, translation, scale, shear, noise: the :class:`Distortion` ranges.
        batch_size, eval_batch_size, num_workers, pin_memory, persistent_workers: loader
            knobs (see :class:`~slope_bench.tasks.base.ClassificationTask`).
        seed: fixes the split, the fixed copies and every training draw.
    """

    def __init__(
        self,
        name: str = "digits_hard",
        resolution: int = 8,
        augment: bool = True,
        copies: int = 5,
        rotation: float = 20.0,
        translation: float = 0.15,
        scale: tuple[float, float] | list[float] = (0.8, 1.1),
        shear: float = 10.0,
        noise: float = 0.1,
        batch_size: int = 128,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool | None = None,
    ) -> None:
        super().__init__(name, resolution, augment, batch_size, eval_batch_size, num_workers, seed, pin_memory, persistent_workers)
        check_int("copies", copies, 1)
        check_range("rotation", rotation, 0.0, 180.0)
        check_range("translation", translation, 0.0, 0.5)
        check_range("shear", shear, 0.0, 45.0)
        check_range("noise", noise, 0.0, 10.0)
        try:
            scale = tuple(scale)
        except TypeError:  # a bare number
            raise ConfigError("scale", scale, "[low, high] with 0 < low <= high") from None
        if (
            len(scale) != 2
            or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scale)
            or not 0 < scale[0] <= scale[1]
        ):
            raise ConfigError("scale", list(scale), "[low, high] with 0 < low <= high")
        self.copies = copies
        self.distortion = Distortion(float(rotation), float(translation), (float(scale[0]), float(scale[1])), float(shear), float(noise))

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        data = load_digits()
        labels = data.target.astype(np.int64)
        pixels = to_tensor(data.images, self.resolution)[:, :1] * STD + MEAN  # back to [0, 1], resized
        y = torch.as_tensor(labels)
        train, val, test = split_indices(labels, self.seed)
        if self.augment:
            self.train_set = DistortedImages(pixels[train], y[train], self.distortion, self.seed)
        else:
            self.train_set = DistortedImages(pixels[train], y[train], Distortion(0.0, 0.0, (1.0, 1.0), 0.0, 0.0), self.seed)
        self.calib_set = TensorImages(*fixed_copies(pixels[train], y[train], 1, self.distortion, self.seed, "calib"))
        self.val_set = TensorImages(*fixed_copies(pixels[val], y[val], self.copies, self.distortion, self.seed, "val"))
        self.test_set = TensorImages(*fixed_copies(pixels[test], y[test], self.copies, self.distortion, self.seed, "test"))
        self.split_ids = {"train": train.tolist(), "val": val.tolist(), "test": test.tolist()}  # indices into load_digits()
        self._ready = True

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return make_loader(
            self.train_set,
            self.batch_size,
            sampler=EpochSampler(len(self.train_set), self.seed),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )
