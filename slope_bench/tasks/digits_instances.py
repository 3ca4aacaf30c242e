"""The embedded instance-segmentation task: real scikit-learn digits placed on canvases.

Each canvas (``canvas_size`` px square, grey) holds 1 to ``max_digits`` handwritten
digits from scikit-learn's 8×8 set, each upscaled (bilinear) to a random side in
``[min_digit_size, max_digit_size]`` and placed at random without overlapping another
digit's square. A digit's mask is its pixels above ``mask_threshold`` (intensity in
[0, 1]), its box the mask's extent, its class the digit (category id = digit + 1; 0 is
the background). Optional Gaussian pixel noise (``noise``) is added to the canvas.

Train, val and test canvases draw their digits from disjoint pools (the stratified
split of :func:`slope_bench.tasks.digits.split_indices`), so test digits are unseen
writers' samples. The data set is generated deterministically from ``data_seed`` and
the knobs, written once in COCO format (``{train,val,test}/NNNNNN.png`` and
``instances_{train,val,test}.json`` with RLE masks) under
``root/<hash of the knobs>/``, and read back through the COCO loader of
:mod:`slope_bench.tasks.coco` like real COCO. ``data_seed`` is separate from the run's
seed so that every seed of a benchmark sees the same images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from slope_bench.errors import ConfigError, check_int, check_range
from slope_bench.tasks.coco import CocoInstancesTask, encode_masks
from slope_bench.tasks.digits import split_indices
from slope_bench.tasks.synthetic import place_squares, write_once
from slope_bench.utils import stable_hash

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")


def render_digit(image: np.ndarray, size: int) -> np.ndarray:
    """An 8×8 digit (values 0..16) as a ``size``×``size`` float image in [0, 1] (bilinear)."""
    x = torch.as_tensor(image, dtype=torch.float32)[None, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x[0, 0].clamp_(0.0, 1.0).numpy()


def make_canvas(
    rng: np.random.Generator,
    images: np.ndarray,
    labels: np.ndarray,
    canvas_size: int,
    max_digits: int,
    min_digit_size: int,
    max_digit_size: int,
    mask_threshold: float,
    noise: float,
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One canvas: ``(uint8 image (H, W), [(digit, bool mask (H, W)), ...])``."""
    count = int(rng.integers(1, max_digits + 1))
    sizes = [int(s) for s in rng.integers(min_digit_size, max_digit_size + 1, size=count)]
    canvas = np.zeros((canvas_size, canvas_size), dtype=np.float32)
    objects = []
    for x, y, size in place_squares(rng, sizes, canvas_size):
        index = int(rng.integers(len(labels)))
        digit = render_digit(images[index], size)
        mask = np.zeros_like(canvas, dtype=bool)
        mask[y : y + size, x : x + size] = digit > mask_threshold
        if not mask.any():
            continue
        canvas[y : y + size, x : x + size] = np.maximum(canvas[y : y + size, x : x + size], digit)
        objects.append((int(labels[index]), mask))
    if noise > 0:
        canvas = canvas + rng.normal(0.0, noise, size=canvas.shape).astype(np.float32)
    return (np.clip(canvas, 0.0, 1.0) * 255).round().astype(np.uint8), objects


def mask_box(mask: np.ndarray) -> list[float]:
    """Tight COCO box ``[x, y, w, h]`` of a boolean mask (pixel extents, inclusive)."""
    rows, cols = np.nonzero(mask)
    return [float(cols.min()), float(rows.min()), float(cols.max() - cols.min() + 1), float(rows.max() - rows.min() + 1)]


def write_split(folder: Path, split: str, canvases: list[tuple[np.ndarray, list[tuple[int, np.ndarray]]]]) -> None:
    """PNG images under ``folder/split/`` and ``folder/instances_split.json`` (RLE masks)."""
    (folder / split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id, (pixels, objects) in enumerate(canvases, start=1):
        file_name = f"{image_id:06d}.png"
        Image.fromarray(pixels, mode="L").save(folder / split / file_name)
        height, width = pixels.shape
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        if not objects:
            continue
        rles = encode_masks(torch.from_numpy(np.stack([m for _, m in objects])))
        for (digit, mask), rle in zip(objects, rles):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": digit + 1,
                    "segmentation": rle,
                    "area": float(mask.sum()),
                    "bbox": mask_box(mask),
                    "iscrowd": 0,
                }
            )
    categories = [{"id": d + 1, "name": str(d), "supercategory": "digit"} for d in range(10)]
    data = {"info": {"description": "slope_bench digits_instances"}, "images": images, "annotations": annotations, "categories": categories}
    (folder / f"instances_{split}.json").write_text(json.dumps(data))


def generate(folder: Path, params: dict) -> None:
    """Generate the three splits of the data set described by ``params`` into ``folder``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    labels = data.target.astype(np.int64)
    pools = dict(zip(SPLITS, split_indices(labels, params["data_seed"])))
    rng = np.random.default_rng(params["data_seed"])
    for split in SPLITS:
        pool = pools[split]
        canvases = [
            make_canvas(
                rng,
                data.images[pool],
                labels[pool],
                params["canvas_size"],
                params["max_digits"],
                params["min_digit_size"],
                params["max_digit_size"],
                params["mask_threshold"],
                params["noise"],
            )
            for _ in range(params[f"n_{split}"])
        ]
        write_split(folder, split, canvases)
    (folder / "meta.json").write_text(json.dumps(params, indent=2))


class DigitsInstances(CocoInstancesTask):
    """The embedded default task of ``model=maskrcnn``.

    Args:
        root: where generated data sets live (one sub-folder per knob setting).
        canvas_size: canvas side in pixels (also the model's resize target).
        n_train, n_val, n_test: canvases per split.
        max_digits: digits per canvas are drawn uniformly from 1..max_digits.
        min_digit_size, max_digit_size: side of an upscaled digit, in pixels.
        mask_threshold: digit intensity (0..1) above which a pixel belongs to the mask.
        noise: standard deviation of Gaussian pixel noise on the canvas (0..1 scale).
        data_seed: seed of the generation (fixed across run seeds).
        batch_size, eval_batch_size, num_workers, seed, augment, check_images, pin_memory,
            persistent_workers: see :class:`slope_bench.tasks.coco.CocoInstancesTask`.
    """

    def __init__(
        self,
        root: str,
        name: str = "digits_instances",
        canvas_size: int = 64,
        n_train: int = 400,
        n_val: int = 100,
        n_test: int = 100,
        max_digits: int = 4,
        min_digit_size: int = 16,
        max_digit_size: int = 28,
        mask_threshold: float = 0.3,
        noise: float = 0.05,
        data_seed: int = 0,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
        augment: bool = True,
        check_images: int = 16,
        pin_memory: bool | None = None,
        persistent_workers: bool | None = None,
    ) -> None:
        super().__init__(name, batch_size, eval_batch_size, num_workers, seed, augment, check_images, pin_memory, persistent_workers)
        for key, value in (
            ("canvas_size", canvas_size),
            ("n_train", n_train),
            ("n_val", n_val),
            ("n_test", n_test),
            ("max_digits", max_digits),
        ):
            check_int(key, value, 1)
        check_int("min_digit_size", min_digit_size, 1, canvas_size)
        if isinstance(max_digit_size, bool) or not isinstance(max_digit_size, int) or not min_digit_size <= max_digit_size <= canvas_size:
            raise ConfigError(
                "max_digit_size", max_digit_size, f"an integer in min_digit_size..canvas_size ({min_digit_size}..{canvas_size})"
            )
        check_range("mask_threshold", mask_threshold, 0.0, 1.0, low_open=True, high_open=True)
        check_range("noise", noise, 0.0, 1.0, high_open=True)
        check_int("data_seed", data_seed, 0)
        self.root = Path(str(root)).expanduser()
        self.image_size = canvas_size
        self.params = {
            "version": FORMAT_VERSION,
            "canvas_size": canvas_size,
            "n_train": n_train,
            "n_val": n_val,
            "n_test": n_test,
            "max_digits": max_digits,
            "min_digit_size": min_digit_size,
            "max_digit_size": max_digit_size,
            "mask_threshold": float(mask_threshold),
            "noise": float(noise),
            "data_seed": data_seed,
        }

    @property
    def folder(self) -> Path:
        """The generated data set of these knobs: ``root/<hash>``."""
        return self.root / stable_hash(self.params)

    def ensure_written(self) -> Path:
        """Generate the data set unless it is already on disk (atomic: temp folder + rename)."""
        return write_once(self.folder, lambda tmp: generate(tmp, self.params), f"digits_instances (task.root={str(self.root)!r})")

    def sources(self) -> dict[str, tuple[Path, Path, list[int] | None]]:
        folder = self.ensure_written()
        return {split: (folder / split, folder / f"instances_{split}.json", None) for split in SPLITS}
