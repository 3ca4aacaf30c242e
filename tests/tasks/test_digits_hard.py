"""digits_hard: sizes and balance, determinism of every draw, the affine maps, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from slope_bench.errors import ConfigError
from slope_bench.tasks.digits import Digits
from slope_bench.tasks.digits_hard import MEAN, STD, DigitsHard, Distortion, affine_matrices, distort, rotation_degrees, warp

NO_DISTORTION = Distortion(rotation=0.0, translation=0.0, scale=(1.0, 1.0), shear=0.0, noise=0.0)


def first_batch(task: DigitsHard, epochs: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The first training batch of epoch ``epochs - 1`` of a fresh loader."""
    loader = task.train_dataloader()
    for _ in range(epochs):
        batch = next(iter(loader))
    return batch


def test_split_sizes_and_class_balance():
    task = DigitsHard(seed=0)
    task.setup()
    assert len(task.test_set) == 1800 and len(task.val_set) == 900
    assert len(task.train_set) == len(task.calib_set) == 1797 - 360 - 180
    counts = torch.bincount(task.test_set.labels, minlength=10)
    assert counts.sum() == 1800
    assert ((counts - 180).abs() <= 0.05 * 180).all(), counts  # stratified: 35..37 images × 5 copies
    x, _ = task.test_set[0]
    assert x.shape == (3, 8, 8) and torch.equal(x[0], x[1])  # grey images on 3 channels
    assert task.example_input().shape == (1, 3, 8, 8)


def test_held_out_sets_are_copies_of_the_digits_split():
    hard, plain = DigitsHard(seed=3), Digits(seed=3, augment=False)
    hard.setup()
    plain.setup()
    n = len(plain.test_set)
    for copy in range(5):
        assert torch.equal(hard.test_set.labels[copy * n : (copy + 1) * n], plain.test_set.labels)
    # undistorted training images reproduce the parent's normalisation exactly
    assert torch.allclose(hard.train_set[7][0], plain.train_set[7][0], atol=1e-6)
    # the distorted copies differ from each other and from the clean images
    first, second = hard.test_set.images[:n], hard.test_set.images[n : 2 * n]
    assert (first - second).abs().mean() > 0.1 and (first - plain.test_set.images).abs().mean() > 0.1


def test_same_seed_gives_identical_eval_tensors():
    a, b = DigitsHard(seed=5), DigitsHard(seed=5)
    torch.manual_seed(1)
    a.setup()
    torch.manual_seed(2)  # the global RNG plays no part
    b.setup()
    assert torch.equal(a.test_set.images, b.test_set.images) and torch.equal(a.test_set.labels, b.test_set.labels)
    assert torch.equal(a.val_set.images, b.val_set.images)
    assert torch.equal(a.calib_set.images, b.calib_set.images)
    other = DigitsHard(seed=6)
    other.setup()
    assert not torch.equal(a.test_set.images, other.test_set.images)


def test_training_draws_depend_on_seed_and_epoch_only():
    torch.manual_seed(0)
    x0, y0 = first_batch(DigitsHard(seed=1, batch_size=64))
    torch.manual_seed(123)  # e.g. a dense reference loaded from the cache instead of trained
    x1, y1 = first_batch(DigitsHard(seed=1, batch_size=64))
    assert torch.equal(x0, x1) and torch.equal(y0, y1)
    x2, _ = first_batch(DigitsHard(seed=2, batch_size=64))
    assert not torch.equal(x0, x2)
    x_epoch2, _ = first_batch(DigitsHard(seed=1, batch_size=64), epochs=2)
    assert not torch.equal(x0, x_epoch2)
    # Lightning's set_epoch pins the draws to the trainer's epoch number
    loader = DigitsHard(seed=1, batch_size=64).train_dataloader()
    loader.sampler.set_epoch(1)
    assert torch.equal(next(iter(loader))[0], x_epoch2)
    # one epoch visits every training image once
    task = DigitsHard(seed=1, batch_size=100)
    labels = torch.cat([y for _, y in task.train_dataloader()])
    assert torch.equal(labels.sort().values, task.train_set.labels.sort().values)


def test_training_images_are_distorted_every_time():
    task = DigitsHard(seed=0)
    task.setup()
    clean = task.train_set[4][0]
    a, b = task.train_set[(4, 0)][0], task.train_set[(4, 1)][0]
    assert (a - clean).abs().mean() > 0.05 and (a - b).abs().mean() > 0.05
    assert torch.equal(task.train_set[(4, 0)][0], a)
    plain = DigitsHard(seed=0, augment=False)
    plain.setup()
    assert torch.allclose(plain.train_set[(4, 0)][0], clean, atol=1e-6)


def test_affine_matrices_stay_in_their_ranges():
    d = Distortion(rotation=20.0, translation=0.15, scale=(0.8, 1.1), shear=10.0)
    m = affine_matrices(4000, d, torch.Generator().manual_seed(0))
    angles = rotation_degrees(m)
    assert angles.abs().max() <= 20.0 + 1e-9 and angles.abs().max() > 19.0
    det = torch.linalg.det(m[:, :, :2])  # rotation and shear keep area: det = scale²
    assert det.min() >= 0.8**2 - 1e-9 and det.max() <= 1.1**2 + 1e-9
    assert m[:, :, 2].abs().max() <= 0.3 + 1e-9 and m[:, :, 2].abs().max() > 0.29
    # column norms: |first column| = scale, and the shear tilts the second by up to 10°
    scale = m[:, :, 0].norm(dim=1)
    cos_between = (m[:, :, 0] * m[:, :, 1]).sum(1) / (scale * m[:, :, 1].norm(dim=1))
    assert cos_between.abs().max() <= math.sin(math.radians(10.0)) + 1e-9
    identity = affine_matrices(3, NO_DISTORTION, torch.Generator().manual_seed(0))
    assert torch.equal(identity, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64).expand(3, 2, 3))


def test_warp_moves_pixels_as_the_forward_map_says():
    image = torch.zeros(1, 1, 8, 8)
    image[0, 0, 0, 7] = 1.0  # x = +7/8, y = -7/8 in normalised coordinates (y points down)
    quarter_turn = torch.tensor([[[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]]], dtype=torch.float64)  # (x, y) -> (-y, x)
    assert warp(image, quarter_turn)[0, 0].nonzero().tolist() == [[7, 7]]
    shift = torch.tensor([[[1.0, 0.0, 2 * 2 / 8], [0.0, 1.0, 0.0]]], dtype=torch.float64)  # 2 pixels right
    image[0, 0, 3, 2] = 0.5
    moved = warp(image, shift)[0, 0]
    assert moved[3, 4] == pytest.approx(0.5) and moved.sum() == pytest.approx(0.5)  # the corner pixel left the image
    identity = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]], dtype=torch.float64)
    torch.testing.assert_close(warp(image, identity), image)


def test_noise_has_the_requested_standard_deviation():
    pixels = torch.zeros(64, 1, 16, 16)
    out = distort(pixels, Distortion(0.0, 0.0, (1.0, 1.0), 0.0, noise=0.2), torch.Generator().manual_seed(0))
    assert out.shape == (64, 3, 16, 16)
    raw = out[:, 0] * STD + MEAN
    assert float(raw.mean()) == pytest.approx(0.0, abs=0.005)
    assert float(raw.std()) == pytest.approx(0.2, rel=0.02)


def test_resolution_knob():
    task = DigitsHard(resolution=16, seed=0, batch_size=32)
    x, y = first_batch(task)
    assert x.shape == (32, 3, 16, 16) and y.shape == (32,)
    assert task.test_set.images.shape == (1800, 3, 16, 16)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"copies": 0}, "copies"),
        ({"scale": [1.1, 0.8]}, "scale"),
        ({"scale": [0.9]}, "scale"),
        ({"noise": -0.1}, "noise"),
        ({"rotation": 200.0}, "rotation"),
        ({"translation": 0.7}, "translation"),
        ({"resolution": 12}, "resolution"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_values_raise_config_errors(kwargs, key):
    with pytest.raises(ConfigError) as info:
        DigitsHard(**kwargs)
    assert info.value.key == key
