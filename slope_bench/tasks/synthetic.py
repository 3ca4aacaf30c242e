"""Data sets written on the fly at the real shapes: ImageNet and COCO without the data.

``task=imagenet task.synthetic=true`` and ``task=coco task.synthetic=true`` read these
through the real loaders (torchvision's ImageFolder scan, pycocotools), so a preset runs
end to end at its true input shape in CI:

* :func:`synthetic_imagenet`: ``train/`` and ``val/`` in ImageFolder layout, ``classes``
  class folders (WordNet-like names ``n00000000`` …) holding ``per_class`` JPEGs each,
  ``size`` × ``size`` px (256: large enough for 224 px crops). The pixels are smooth
  random colour fields; a pool of at most 97 distinct JPEGs is encoded once and written
  to every file (1,000 classes × 2 splits take well under a second to write). With
  ``images`` set, each split holds only that many JPEGs, spread evenly over the classes
  (the other class folders stay empty; the class list, and so a model's 1,000 outputs,
  is unchanged): a 1,000-class run at 224 px that evaluates a handful of images.
* :func:`synthetic_coco`: ``train2017/``, ``val2017/`` and
  ``annotations/instances_{train,val}2017.json`` with ``images`` landscape JPEGs per
  split whose short side is ``short_side`` px (800) and 1–3 filled random polygons each:
  polygon segmentations, with box and area computed by pycocotools; category ids drawn
  from COCO's 80 ids (1…90), so the task has COCO's 91 outputs.

Both are deterministic in their knobs, written once under ``root/<kind>-<hash of the
knobs>/`` by :func:`write_once` (a temp folder renamed into place, so concurrent runs
never see half a data set) and reused afterwards.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from slope_bench.tasks.base import DatasetError
from slope_bench.utils import stable_hash

FORMAT_VERSION = 1
JPEG_POOL = 97  # distinct synthetic ImageNet images (files reuse their bytes)
# COCO 2017's 80 category ids (1..90 with gaps): the largest is 90, so num_classes = 91.
COCO_CATEGORY_IDS = (
    *range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70, *range(72, 83), *range(84, 91)
)  # fmt: skip


def default_synthetic_root() -> Path:
    """Where synthetic data sets go when ``synthetic_root`` is null: a per-user folder in the system temp folder."""
    user = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"slope_bench-synthetic-{user}"


def write_once(folder: Path, generate: Callable[[Path], None], where: str) -> Path:
    """Write a generated data set into ``folder`` unless it is there already.

    ``generate(tmp)`` writes the data set into a temp folder, ``meta.json`` last; the
    temp folder is then renamed to ``folder`` (another process that wins the race keeps
    its copy). A folder holding ``meta.json`` is complete and is reused.

    Args:
        folder: the data set's folder (its parent is created).
        generate: writes the data set into the folder it is given.
        where: how messages name the location (``"task.synthetic_root='/x'"``).

    Returns:
        ``folder``.

    Raises:
        DatasetError: the folder cannot be written.
    """
    if (folder / "meta.json").is_file():
        return folder
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        generate(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process wrote it first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DatasetError(f"{where}: cannot write the generated data set under {folder.parent} ({e.strerror or e})") from None
    if not (folder / "meta.json").is_file():
        raise DatasetError(f"{where}: generation failed: expected {folder / 'meta.json'}")
    return folder


def place_squares(rng: np.random.Generator, sizes: list[int], canvas_size: int, tries: int = 50) -> list[tuple[int, int, int]]:
    """Random top-left corners for squares of ``sizes`` that do not overlap.

    Returns:
        ``(x, y, size)`` for each square placed (a square that finds no free spot in
        ``tries`` attempts is dropped).
    """
    placed: list[tuple[int, int, int]] = []
    for size in sizes:
        for _ in range(tries):
            x, y = (int(v) for v in rng.integers(0, canvas_size - size + 1, size=2))
            if all(x + size <= px or px + ps <= x or y + size <= py or py + ps <= y for px, py, ps in placed):
                placed.append((x, y, size))
                break
    return placed


def smooth_image(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """A smooth random RGB colour field (a 4×4 grid of colours, bicubic-upscaled)."""
    grid = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return Image.fromarray(grid).resize((width, height), Image.BICUBIC)


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def class_names(classes: int) -> list[str]:
    """WordNet-like class folder names ``n00000000`` … (sorted = index order)."""
    return [f"n{c:08d}" for c in range(classes)]


def images_per_class(classes: int, per_class: int, images: int | None = None) -> list[int]:
    """JPEGs in each class folder of a split: ``per_class`` each, or ``images`` in all,
    one each in ``images`` evenly spaced classes (the first and the last among them)."""
    if images is None:
        return [per_class] * classes
    counts = [0] * classes
    for k in range(images):
        counts[k * (classes - 1) // max(images - 1, 1)] += 1
    return counts


def write_image_folders(folder: Path, classes: int, per_class: int, size: int, seed: int = 0, images: int | None = None) -> None:
    """``folder/{train,val}/<class>/<class>_<k>.JPEG``: ``per_class`` images per class and
    split, or ``images`` per split spread over the classes (every class folder is made)."""
    rng = np.random.default_rng(seed)
    counts = images_per_class(classes, per_class, images)
    pool = [jpeg_bytes(smooth_image(rng, size, size)) for _ in range(min(JPEG_POOL, 2 * sum(counts)))]
    written = 0
    for split in ("train", "val"):
        for name, count in zip(class_names(classes), counts):
            (folder / split / name).mkdir(parents=True)
            for k in range(count):
                (folder / split / name / f"{name}_{k}.JPEG").write_bytes(pool[written % len(pool)])
                written += 1


def synthetic_imagenet(
    root: Path, classes: int, per_class: int, size: int, where: str = "synthetic imagenet", images: int | None = None
) -> Path:
    """The synthetic ImageNet of these knobs under ``root`` (written on the first call).

    Args:
        root: where generated data sets live.
        classes: class folders in ``train/`` and ``val/``.
        per_class: JPEGs per class in each split.
        size: image side in pixels.
        where: how messages name ``root``.
        images: ``None``, or JPEGs per split in all (``2 … classes``), one in each of
            ``images`` evenly spaced classes; ``per_class`` is then unused.

    Returns:
        The data set's folder, holding ``train/`` and ``val/``.
    """
    params = {"kind": "imagenet", "version": FORMAT_VERSION, "classes": classes, "per_class": per_class, "size": size}
    if images is not None:  # (absent otherwise: the folders written before this knob keep their names)
        params = {**params, "per_class": None, "images": images}

    def generate(tmp: Path) -> None:
        write_image_folders(tmp, classes, per_class, size, images=images)
        (tmp / "meta.json").write_text(json.dumps(params, indent=2))

    return write_once(Path(root) / f"imagenet-{stable_hash(params)}", generate, where)


def random_polygon(rng: np.random.Generator, x: int, y: int, size: int) -> list[float]:
    """A star-shaped polygon (3–8 vertices) inside the square at ``(x, y)``, flattened ``[x1, y1, …]``."""
    count = int(rng.integers(3, 9))
    angles = np.sort(rng.uniform(0.0, 2 * np.pi, size=count))
    radii = rng.uniform(0.3, 0.5, size=count) * size
    cx, cy = x + size / 2, y + size / 2
    points = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
    return [round(float(v), 2) for v in points.reshape(-1)]


def write_coco_split(
    image_dir: Path, annotation_file: Path, first_id: int, count: int, height: int, width: int, rng: np.random.Generator
) -> None:
    """``count`` JPEGs with 1–3 filled polygons each, and their COCO instances file."""
    from pycocotools import mask as mask_utils

    image_dir.mkdir(parents=True, exist_ok=True)
    annotation_file.parent.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    low, high = max(height // 8, 4), max(height // 3, 5)
    for image_id in range(first_id, first_id + count):
        canvas = smooth_image(rng, height, width)
        draw = ImageDraw.Draw(canvas)
        sizes = [int(s) for s in rng.integers(low, high + 1, size=int(rng.integers(1, 4)))]
        for x, y, size in place_squares(rng, sizes, height):
            polygon = random_polygon(rng, x, y, size)
            colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
            draw.polygon(polygon, fill=colour)
            rle = mask_utils.merge(mask_utils.frPyObjects([polygon], height, width))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(rng.choice(COCO_CATEGORY_IDS)),
                    "segmentation": [polygon],
                    "area": float(mask_utils.area(rle)),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": 0,
                }
            )
        file_name = f"{image_id:012d}.jpg"
        canvas.save(image_dir / file_name, format="JPEG", quality=85)
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
    categories = [{"id": c, "name": f"category_{c}", "supercategory": "synthetic"} for c in COCO_CATEGORY_IDS]
    data = {"info": {"description": "slope_bench synthetic COCO"}, "images": images, "annotations": annotations, "categories": categories}
    annotation_file.write_text(json.dumps(data))


def synthetic_coco(root: Path, images: int, short_side: int, where: str = "synthetic coco") -> Path:
    """The synthetic COCO 2017 layout of these knobs under ``root`` (written on the first call).

    Args:
        root: where generated data sets live.
        images: images in train2017 and in val2017.
        short_side: image height in pixels (width ``round(4/3 × short_side)``).
        where: how messages name ``root``.

    Returns:
        The data set's folder, laid out as COCO 2017.
    """
    params = {"kind": "coco", "version": FORMAT_VERSION, "images": images, "short_side": short_side}
    height, width = short_side, round(short_side * 4 / 3)

    def generate(tmp: Path) -> None:
        rng = np.random.default_rng(0)
        for split, first_id in (("train2017", 1), ("val2017", images + 1)):
            write_coco_split(tmp / split, tmp / "annotations" / f"instances_{split}.json", first_id, images, height, width, rng)
        (tmp / "meta.json").write_text(json.dumps(params, indent=2))

    return write_once(Path(root) / f"coco-{stable_hash(params)}", generate, where)
