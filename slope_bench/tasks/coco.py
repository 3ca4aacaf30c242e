"""Instance segmentation in COCO format: the loader, the COCOeval evaluator and COCO 2017.

:class:`CocoInstancesTask` reads any COCO-format split (an image folder plus an
``instances`` JSON with polygon or RLE segmentations) with pycocotools, feeds
torchvision detection models (``model(images, targets)`` returns the loss dict in
training, ``model(images)`` the detections in eval mode) and scores detections with
pycocotools' ``COCOeval``: box and mask AP averaged over IoU 0.50:0.95 (``bbox_map``,
``segm_map``) and at IoU 0.50 (``bbox_map50``, ``segm_map50``). Labels are the COCO
category ids themselves (background is 0), so ``num_classes = max id + 1`` (91 on COCO,
matching torchvision's pretrained Mask R-CNN).

:class:`Coco` is COCO 2017 from a path; ``slope_bench.tasks.digits_instances`` writes
the embedded task in the same format and reads it back through the same loader;
``Coco(synthetic=True)`` reads a COCO-format set written at the real shapes by
:mod:`slope_bench.tasks.synthetic`.

Before any training, ``setup`` checks every annotation file (the fields the loader and
COCOeval read: images' ``id``/``file_name``/``height``/``width``, annotations'
``id``/``image_id``/``category_id``/``bbox``/``area``/``segmentation``) and decodes a
seeded sample of each split's images; a problem is one line naming the file and the
field. An image that fails to decode later is recorded in ``task.corrupt_images`` and
skipped (training: the next image takes its place; evaluation: a blank image of its
size, so its ground truth still counts).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from slope_bench.errors import ConfigError, check_bool, check_int
from slope_bench.tasks.base import (
    DECODE_ERRORS,
    MAX_SKIPS,
    SPLITS,
    CorruptImages,
    DatasetError,
    check_decodable,
    check_loader_knobs,
    check_split,
    make_loader,
)
from slope_bench.tasks.synthetic import default_synthetic_root, synthetic_coco

log = logging.getLogger("slope_bench")
IMAGE_FIELDS = ("id", "file_name", "height", "width")
ANNOTATION_FIELDS = ("id", "image_id", "category_id", "bbox", "area", "segmentation")
METRICS = ("bbox_map", "segm_map", "bbox_map50", "segm_map50")
MASK_THRESHOLD = 0.5


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_instances(data: dict, path: Path, masks: bool = True) -> None:
    """Check the fields of a COCO instances file that the loader and COCOeval read.

    Args:
        data: the parsed JSON (a dict with ``images``, ``annotations``, ``categories``).
        path: the file, for the message.
        masks: annotations must carry ``segmentation`` (instance segmentation).

    Raises:
        DatasetError: one line naming the file, the entry and the field at fault.
    """

    def bad(what: str) -> DatasetError:
        return DatasetError(f"COCO annotation file {path} is malformed: {what}")

    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            raise bad(f"'{key}' is {type(data[key]).__name__}: expected a list")
    if not data["categories"]:
        raise bad("'categories' is empty: expected at least one category")
    categories = set()
    for i, category in enumerate(data["categories"]):
        if not isinstance(category, dict) or not isinstance(category.get("id"), int) or isinstance(category.get("id"), bool):
            raise bad(f"categories[{i}] has no integer 'id'")
        categories.add(category["id"])
    image_ids = set()
    for i, image in enumerate(data["images"]):
        if not isinstance(image, dict):
            raise bad(f"images[{i}] is {type(image).__name__}: expected an object with {', '.join(IMAGE_FIELDS)}")
        label = f"images[{i}] (id {image.get('id')!r})"
        for field in IMAGE_FIELDS:
            if field not in image:
                raise bad(f"{label} has no '{field}': expected {', '.join(IMAGE_FIELDS)} on every image")
        if not isinstance(image["id"], int) or isinstance(image["id"], bool):
            raise bad(f"{label} has id={_short(image['id'])}: expected an integer")
        if not isinstance(image["file_name"], str) or not image["file_name"]:
            raise bad(f"{label} has file_name={_short(image['file_name'])}: expected a file name")
        for field in ("height", "width"):
            if not isinstance(image[field], int) or isinstance(image[field], bool) or image[field] < 1:
                raise bad(f"{label} has {field}={_short(image[field])}: expected an integer >= 1")
        image_ids.add(image["id"])
    fields = ANNOTATION_FIELDS if masks else tuple(f for f in ANNOTATION_FIELDS if f != "segmentation")
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise bad(f"annotations[{i}] is {type(ann).__name__}: expected an object with {', '.join(fields)}")
        label = f"annotations[{i}] (id {ann.get('id')!r})"
        for field in fields:
            if field not in ann:
                raise bad(f"{label} has no '{field}': expected {', '.join(fields)} on every annotation")
        box = ann["bbox"]
        if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
            raise bad(f"{label} has bbox={_short(box)}: expected [x, y, width, height] numbers")
        if not _is_number(ann["area"]):
            raise bad(f"{label} has area={_short(ann['area'])}: expected a number")
        if ann["image_id"] not in image_ids:
            raise bad(f"{label} has image_id={_short(ann['image_id'])}: expected the id of an entry of images")
        if ann["category_id"] not in categories:
            raise bad(f"{label} has category_id={_short(ann['category_id'])}: expected the id of an entry of categories")
        if masks and not isinstance(ann["segmentation"], (list, dict)):
            raise bad(f"{label} has segmentation={_short(ann['segmentation'])}: expected polygons (a list) or an RLE (an object)")


def quiet_coco(annotation_file: str | Path, masks: bool = True):
    """Load a COCO annotation file with pycocotools, without its prints.

    Args:
        annotation_file: the instances JSON.
        masks: annotations must carry ``segmentation`` (see :func:`check_instances`).

    Raises:
        DatasetError: the file is missing, is not JSON, lacks ``images`` /
            ``annotations`` / ``categories``, or an entry lacks a field the loader or
            COCOeval reads (one line naming the file and the field).
    """
    from pycocotools.coco import COCO

    path = Path(annotation_file)
    if not path.is_file():
        raise DatasetError(f"COCO annotation file not found: expected {path}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"COCO annotation file {path} is not valid JSON ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(data, dict) or key not in data]
    if missing:
        raise DatasetError(
            f"COCO annotation file {path} is malformed: expected the keys images, annotations, categories (missing {', '.join(missing)})"
        )
    check_instances(data, path, masks)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def training_annotations(coco, image_id: int) -> list[dict]:
    """Annotations of one image usable as training targets: not crowd, box at least 1 px."""
    return [a for a in coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0) and a["bbox"][2] >= 1 and a["bbox"][3] >= 1]


class CocoInstances(Dataset):
    """``(image, target)`` pairs of a COCO-format split for torchvision detection models.

    ``image`` is a float ``(3, H, W)`` tensor in [0, 1]; ``target`` holds ``boxes``
    (``(N, 4)`` xyxy float), ``labels`` (category ids), ``masks`` (``(N, H, W)`` uint8)
    and ``image_id``. Crowd annotations and boxes under 1 px are left out of the targets
    (the evaluator still sees them).

    An image file that fails to decode is recorded in ``corrupt`` (a warning naming it)
    and replaced: with ``substitute`` (training) by the next decodable image of the split
    with its targets (index + 1, + 2, …, wrapping: the same in every run and worker);
    otherwise (evaluation) by a blank image of its recorded size, keeping its own
    targets and ``image_id``, so the evaluator still counts its ground truth.

    Args:
        image_dir: folder holding the images' ``file_name``.
        coco: the split's ``pycocotools.coco.COCO`` object.
        image_ids: images of the split, in order.
        flip: random horizontal flips (training augmentation).
        corrupt: where undecodable files are recorded (a private tracker when ``None``).
        substitute: replace an undecodable image by the next one (else by a blank image).
    """

    def __init__(
        self,
        image_dir: str | Path,
        coco,
        image_ids: Sequence[int],
        flip: bool = False,
        corrupt: CorruptImages | None = None,
        substitute: bool = True,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.coco = coco
        self.image_ids = list(image_ids)
        self.flip = flip
        self.corrupt = corrupt if corrupt is not None else CorruptImages()
        self.substitute = substitute

    def __len__(self) -> int:
        return len(self.image_ids)

    def path(self, index: int) -> Path:
        """The image file of ``index``."""
        return self.image_dir / self.coco.imgs[self.image_ids[index]]["file_name"]

    def load(self, index: int) -> torch.Tensor:
        """The decoded image of ``index`` as a float ``(3, H, W)`` tensor in [0, 1] (raises on a bad file)."""
        with Image.open(self.path(index)) as img:
            array = np.asarray(img.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)

    def decoded(self, index: int) -> tuple[int, torch.Tensor]:
        """``(index served, image)``: ``index`` itself unless its file does not decode."""
        size = len(self.image_ids)
        for step in range(min(size, MAX_SKIPS)):
            j = (index + step) % size
            try:
                return j, self.load(j)
            except DECODE_ERRORS as e:
                self.corrupt.record(self.path(j), e, "the next image" if self.substitute else "a blank image of its size")
                if not self.substitute:
                    info = self.coco.imgs[self.image_ids[j]]
                    return j, torch.zeros(3, int(info["height"]), int(info["width"]))
        raise DatasetError(
            f"{min(size, MAX_SKIPS)} consecutive images from {self.path(index)} on do not decode: expected readable image files"
        )

    def image(self, index: int) -> torch.Tensor:
        """The image of ``index`` (or its replacement when the file does not decode)."""
        return self.decoded(index)[1]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        index, image = self.decoded(index)
        image_id = self.image_ids[index]
        height, width = image.shape[1:]
        anns = training_annotations(self.coco, image_id)
        boxes = torch.tensor(
            [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns], dtype=torch.float32
        ).reshape(-1, 4)
        labels = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
        if anns:
            masks = torch.from_numpy(np.stack([self.coco.annToMask(a) for a in anns])).to(torch.uint8)
        else:
            masks = torch.zeros((0, height, width), dtype=torch.uint8)
        if self.flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
            masks = masks.flip(-1)
            boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
        target = {"boxes": boxes, "labels": labels, "masks": masks, "image_id": torch.tensor(image_id)}
        return image, target


class EvalImages(Dataset):
    """The images of a :class:`CocoInstances` split (no targets): calibration inputs."""

    def __init__(self, source: CocoInstances) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.source.image(index)


def collate_detection(batch: list) -> tuple[list[torch.Tensor], list[dict]]:
    """``[(image, target), ...]`` → ``(images, targets)`` lists (sizes may differ)."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def collate_images(batch: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(batch)


# ---------------------------------------------------------------------------- evaluation
def encode_masks(masks: torch.Tensor, threshold: float = MASK_THRESHOLD) -> list[dict]:
    """Probability masks ``(N, 1, H, W)`` or binary ``(N, H, W)`` → COCO RLEs (JSON-ready)."""
    from pycocotools import mask as mask_utils

    if masks.dim() == 4:
        masks = masks[:, 0]
    binary = (masks > threshold) if masks.is_floating_point() else masks.bool()
    if binary.shape[0] == 0:
        return []
    array = np.asfortranarray(binary.permute(1, 2, 0).cpu().numpy().astype(np.uint8))
    rles = mask_utils.encode(array)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def detections_to_coco(image_id: int, output: dict[str, torch.Tensor]) -> tuple[list[dict], list[dict]]:
    """One image's detections (torchvision output dict) → COCO box and mask results."""
    boxes = output["boxes"].detach().float().cpu()
    scores = output["scores"].detach().float().cpu().tolist()
    labels = output["labels"].detach().cpu().tolist()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    box_results = [{"image_id": image_id, "category_id": int(c), "bbox": b, "score": float(s)} for b, s, c in zip(xywh, scores, labels)]
    mask_results = []
    if "masks" in output:
        rles = encode_masks(output["masks"].detach())
        mask_results = [
            {"image_id": image_id, "category_id": int(c), "segmentation": r, "score": float(s)} for r, s, c in zip(rles, scores, labels)
        ]
    return box_results, mask_results


def coco_average_precision(coco_gt, results: list[dict], iou_type: str, image_ids: Sequence[int]) -> tuple[float, float]:
    """``(AP@[.50:.95], AP@.50)`` of ``results`` against ``coco_gt`` with pycocotools' COCOeval.

    Args:
        coco_gt: ground truth (``pycocotools.coco.COCO``).
        results: COCO result dicts (``bbox`` or ``segmentation`` plus ``score``).
        iou_type: ``"bbox"`` or ``"segm"``.
        image_ids: the images evaluated (a split may be a subset of the file).

    Returns:
        Both APs in [0, 1]; 0 when there are no detections (or no ground truth).
    """
    from pycocotools.cocoeval import COCOeval

    if not results:
        return 0.0, 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return max(float(evaluator.stats[0]), 0.0), max(float(evaluator.stats[1]), 0.0)


def coco_metrics(coco_gt, box_results: list[dict], mask_results: list[dict], image_ids: Sequence[int]) -> dict[str, float]:
    """``bbox_map``, ``segm_map``, ``bbox_map50``, ``segm_map50`` (COCOeval)."""
    bbox, bbox50 = coco_average_precision(coco_gt, box_results, "bbox", image_ids)
    segm, segm50 = coco_average_precision(coco_gt, mask_results, "segm", image_ids)
    return {"bbox_map": bbox, "segm_map": segm, "bbox_map50": bbox50, "segm_map50": segm50}


# ---------------------------------------------------------------------------- the task
class CocoInstancesTask(pl.LightningDataModule):
    """Base of the instance-segmentation tasks: COCO-format splits, Mask R-CNN loss, COCOeval.

    Subclasses implement :meth:`sources` (image folder, annotation file and optional
    image subset per split) and set ``image_size`` (the model's resize target).
    Datasets are read at the first :meth:`setup`, which raises :class:`DatasetError`
    for a missing or malformed dataset.

    Args:
        name: task name recorded in results.
        batch_size: training images per step.
        eval_batch_size: images per evaluation batch.
        num_workers: DataLoader workers.
        seed: loader shuffling (and subclasses' deterministic splits).
        augment: random horizontal flips for training.
        check_images: images of each split decoded at setup (0: no check).
        pin_memory: page-locked batches (``None``: when CUDA is available).
        persistent_workers: keep workers alive between epochs (``None``: when ``num_workers > 0``).
    """

    main_metric = "bbox_map"
    in_chans = 3
    image_size = 800

    def __init__(
        self,
        name: str,
        batch_size: int = 2,
        eval_batch_size: int = 2,
        num_workers: int = 0,
        seed: int = 0,
        augment: bool = True,
        check_images: int = 16,
        pin_memory: bool | None = None,
        persistent_workers: bool | None = None,
    ) -> None:
        super().__init__()
        knobs = check_loader_knobs(batch_size, eval_batch_size, num_workers, pin_memory, persistent_workers)
        self.name = name
        self.batch_size = knobs["batch_size"]
        self.eval_batch_size = knobs["eval_batch_size"]
        self.num_workers = knobs["num_workers"]
        self.pin_memory = knobs["pin_memory"]
        self.persistent_workers = knobs["persistent_workers"]
        self.seed = seed
        self.augment = check_bool("augment", augment)
        self.check_images = check_int("check_images", check_images, 0)
        self.corrupt = CorruptImages()
        self.datasets: dict[str, CocoInstances] = {}
        self.annotations: dict[Path, object] = {}
        self._num_classes = 0
        self._ready = False

    # ---- data ------------------------------------------------------------------------
    def sources(self) -> dict[str, tuple[Path, Path, list[int] | None]]:
        """``{split: (image_dir, annotation_file, image_ids or None)}`` for train/val/test.

        ``None`` takes every image of the file (training drops images without usable
        annotations). Raise :class:`DatasetError` for missing paths.
        """
        raise NotImplementedError

    def load_annotations(self, annotation_file: str | Path):
        """The ``COCO`` object of an annotation file, read once per task."""
        path = Path(annotation_file)
        if path not in self.annotations:
            self.annotations[path] = quiet_coco(path)
        return self.annotations[path]

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        max_category = 0
        for split, (image_dir, annotation_file, ids) in self.sources().items():
            if not Path(image_dir).is_dir():
                raise DatasetError(f"{self.name}: image folder of the {split} split not found: expected {image_dir}")
            coco = self.load_annotations(annotation_file)
            if ids is None:
                ids = sorted(coco.imgs)
                if split == "train":
                    ids = [i for i in ids if training_annotations(coco, i)]
            if not ids:
                raise DatasetError(
                    f"{self.name}: the {split} split has no images: expected entries under images (with annotations for training) in {annotation_file}"
                )
            max_category = max([max_category, *coco.cats])
            dataset = CocoInstances(
                image_dir, coco, ids, flip=self.augment and split == "train", corrupt=self.corrupt, substitute=split == "train"
            )
            where = f"{self.name}: {split} images under {image_dir}"
            check_decodable([dataset.path(i) for i in range(len(dataset))], self.check_images, self.seed, where, self.corrupt)
            self.datasets[split] = dataset
        self._num_classes = max_category + 1
        self._ready = True

    @property
    def corrupt_images(self) -> list[str]:
        """Image files skipped as undecodable so far (at setup, in training or evaluation)."""
        return self.corrupt.paths()

    def split_members(self) -> dict[str, set]:
        """The image files of each split (``train``, ``val``, ``test``): disjoint sets mean disjoint splits."""
        self.setup()
        return {split: {str(d.path(i)) for i in range(len(d))} for split, d in self.datasets.items() if split in SPLITS}

    @property
    def num_classes(self) -> int:
        """Predictor outputs: the largest category id + 1 (0 is the background)."""
        self.setup()
        return self._num_classes

    @property
    def num_train(self) -> int:
        self.setup()
        return len(self.datasets["train"])

    def _loader(self, dataset: Dataset, shuffle: bool, batch_size: int, collate=collate_detection) -> DataLoader:
        return make_loader(
            dataset,
            batch_size,
            shuffle=shuffle,
            seed=self.seed,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            collate_fn=collate,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.datasets["train"], True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.datasets["val"], False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.datasets["test"], False, self.eval_batch_size)

    def calib_batches(self, n_samples: int, passes: int = 1) -> list[list[torch.Tensor]]:
        """Model inputs (lists of image tensors, no augmentation) of ``n_samples`` training images."""
        self.setup()
        train = self.datasets["train"]
        n = min(n_samples, len(train))
        g = torch.Generator().manual_seed(self.seed + 1)
        idx = torch.randperm(len(train), generator=g)[:n].tolist()
        loader = self._loader(Subset(EvalImages(train), idx), False, self.batch_size, collate=collate_images)
        return [batch for _ in range(passes) for batch in loader]

    def example_input(self) -> list[torch.Tensor]:
        """One model input: a list holding the first test image."""
        self.setup()
        return [self.datasets["test"].image(0)]

    # ---- model interface ---------------------------------------------------------------
    def inputs(self, batch) -> list[torch.Tensor]:
        return list(batch[0])

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        """Sum of the Mask R-CNN losses (RPN objectness/box, ROI class/box, mask)."""
        images, targets = batch
        losses = model(list(images), list(targets))
        return sum(losses.values())

    @torch.no_grad()
    def predict(self, model: nn.Module, loader) -> tuple[list[dict], list[dict]]:
        """COCO box and mask results of ``model`` (eval mode) over ``loader``."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        box_results: list[dict] = []
        mask_results: list[dict] = []
        try:
            for images, targets in loader:
                outputs = model([image.to(device) for image in images])
                for target, output in zip(targets, outputs):
                    boxes, masks = detections_to_coco(int(target["image_id"]), output)
                    box_results += boxes
                    mask_results += masks
        finally:
            model.train(was_training)
        return box_results, mask_results

    def evaluate(self, model: nn.Module, split: str = "test") -> dict[str, float]:
        """``bbox_map``, ``segm_map``, ``bbox_map50``, ``segm_map50`` on ``split`` (``val`` or ``test``, COCOeval).

        Raises:
            ConfigError: ``split`` is neither ``val`` nor ``test``.
        """
        check_split(split)
        self.setup()
        dataset = self.datasets[split]
        loader = self.test_dataloader() if split == "test" else self.val_dataloader()
        box_results, mask_results = self.predict(model, loader)
        return coco_metrics(dataset.coco, box_results, mask_results, dataset.image_ids)


class Coco(CocoInstancesTask):
    """COCO 2017 instance segmentation from a path (or synthetic, at the real shapes).

    Expects ``root/train2017/``, ``root/val2017/`` and
    ``root/annotations/instances_{train,val}2017.json``. Training uses train2017 minus
    a validation subset of ``val_images`` images carved from it deterministically by the
    seed; the test split is val2017 (the papers' reported numbers), never seen in
    training or validation.

    With ``synthetic=true`` nothing is read from ``root``: the same layout is written
    under ``synthetic_root`` (once per knob setting) with ``synthetic_images`` JPEGs per
    split whose short side is ``image_size`` px and a few annotated polygons each, and
    read by the same code. Its validation carve is clamped to a quarter of its training
    images (``val_images`` is meant for the real 118 k), which is logged.

    Args:
        root: the COCO folder.
        name: task name recorded in results.
        image_size: shorter side the model resizes to (800 in the papers' setting).
        val_images: train2017 images held out for validation during training.
        batch_size, eval_batch_size, num_workers, seed, augment, check_images, pin_memory,
            persistent_workers: see :class:`CocoInstancesTask`.
        synthetic: write and read a synthetic COCO-format set instead of ``root``.
        synthetic_images: its images in train2017/ and in val2017/ (>= 2).
        synthetic_root: where synthetic sets are written (``None``: the system temp folder).
    """

    def __init__(
        self,
        root: str,
        name: str = "coco",
        image_size: int = 800,
        val_images: int = 500,
        batch_size: int = 2,
        eval_batch_size: int = 2,
        num_workers: int = 2,
        seed: int = 0,
        augment: bool = True,
        check_images: int = 16,
        synthetic: bool = False,
        synthetic_images: int = 4,
        synthetic_root: str | None = None,
        pin_memory: bool | None = None,
        persistent_workers: bool | None = None,
    ) -> None:
        super().__init__(name, batch_size, eval_batch_size, num_workers, seed, augment, check_images, pin_memory, persistent_workers)
        self.val_images = check_int("val_images", val_images, 1)
        self.image_size = check_int("image_size", image_size, 32)
        self.synthetic = check_bool("synthetic", synthetic)
        self.synthetic_images = check_int("synthetic_images", synthetic_images, 2)
        self.root = Path(str(root)).expanduser()
        self.synthetic_root = Path(str(synthetic_root)).expanduser() if synthetic_root is not None else default_synthetic_root()

    @property
    def where(self) -> str:
        """The knob naming the data's location, for messages (``task.root='/data/coco'``)."""
        return f"task.synthetic_root={str(self.synthetic_root)!r}" if self.synthetic else f"task.root={str(self.root)!r}"

    @property
    def data_root(self) -> Path:
        """The COCO folder: ``root``, or the synthetic set (written on first use)."""
        if not self.synthetic:
            return self.root
        return synthetic_coco(self.synthetic_root, self.synthetic_images, self.image_size, where=self.where)

    def _validation_size(self, n_train: int) -> int:
        if not self.synthetic:
            return self.val_images
        size = min(self.val_images, max(1, n_train // 4))
        if size != self.val_images:
            log.info(
                "synthetic coco: validation carve of %d images (task.val_images=%d clamped to a quarter of %d)",
                size,
                self.val_images,
                n_train,
            )
        return size

    def sources(self) -> dict[str, tuple[Path, Path, list[int] | None]]:
        root = self.data_root
        expected = [
            root / "train2017",
            root / "val2017",
            root / "annotations" / "instances_train2017.json",
            root / "annotations" / "instances_val2017.json",
        ]
        missing = [str(p.relative_to(root)) for p in expected if not p.exists()]
        if missing:
            raise DatasetError(
                f"{self.where}: COCO 2017 not found at {root}: expected train2017/, val2017/ and annotations/instances_{{train,val}}2017.json (missing {', '.join(missing)})"
            )
        train_file = root / "annotations" / "instances_train2017.json"
        coco = self.load_annotations(train_file)
        ids = [i for i in sorted(coco.imgs) if training_annotations(coco, i)]
        val_images = self._validation_size(len(ids))
        if len(ids) <= val_images:
            raise ConfigError("task.val_images", val_images, f"fewer than the {len(ids)} annotated images of {train_file}")
        order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(self.seed)).tolist()
        val = sorted(ids[i] for i in order[:val_images])
        held_out = set(val)
        train = [i for i in ids if i not in held_out]
        return {
            "train": (root / "train2017", train_file, train),
            "val": (root / "train2017", train_file, val),
            "test": (root / "val2017", root / "annotations" / "instances_val2017.json", None),
        }
