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
the embedded task in the same format and reads it back through the same loader.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from slope_bench.errors import ConfigError
from slope_bench.tasks.base import DatasetError

METRICS = ("bbox_map", "segm_map", "bbox_map50", "segm_map50")
MASK_THRESHOLD = 0.5


def quiet_coco(annotation_file: str | Path):
    """Load a COCO annotation file with pycocotools, without its prints.

    Raises:
        DatasetError: the file is missing, is not JSON, or lacks ``images`` /
            ``annotations`` / ``categories``.
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

    Args:
        image_dir: folder holding the images' ``file_name``.
        coco: the split's ``pycocotools.coco.COCO`` object.
        image_ids: images of the split, in order.
        flip: random horizontal flips (training augmentation).
    """

    def __init__(self, image_dir: str | Path, coco, image_ids: Sequence[int], flip: bool = False) -> None:
        self.image_dir = Path(image_dir)
        self.coco = coco
        self.image_ids = list(image_ids)
        self.flip = flip

    def __len__(self) -> int:
        return len(self.image_ids)

    def image(self, index: int) -> torch.Tensor:
        info = self.coco.imgs[self.image_ids[index]]
        with Image.open(self.image_dir / info["file_name"]) as img:
            array = np.asarray(img.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image_id = self.image_ids[index]
        image = self.image(index)
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
    """

    main_metric = "bbox_map"
    in_chans = 3
    image_size = 800

    def __init__(
        self, name: str, batch_size: int = 2, eval_batch_size: int = 2, num_workers: int = 0, seed: int = 0, augment: bool = True
    ) -> None:
        super().__init__()
        for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(key, value, "an integer >= 1")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError("num_workers", num_workers, "an integer >= 0")
        self.name = name
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.augment = bool(augment)
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
            self.datasets[split] = CocoInstances(image_dir, coco, ids, flip=self.augment and split == "train")
        self._num_classes = max_category + 1
        self._ready = True

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
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            generator=generator,
            persistent_workers=self.num_workers > 0,
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
        """``bbox_map``, ``segm_map``, ``bbox_map50``, ``segm_map50`` on ``split`` (COCOeval)."""
        self.setup()
        dataset = self.datasets["test" if split == "test" else "val"]
        loader = self.test_dataloader() if split == "test" else self.val_dataloader()
        box_results, mask_results = self.predict(model, loader)
        return coco_metrics(dataset.coco, box_results, mask_results, dataset.image_ids)


class Coco(CocoInstancesTask):
    """COCO 2017 instance segmentation from a path.

    Expects ``root/train2017/``, ``root/val2017/`` and
    ``root/annotations/instances_{train,val}2017.json``. Training uses train2017 minus
    a validation subset of ``val_images`` images carved from it deterministically by the
    seed; the test split is val2017 (the papers' reported numbers).

    Args:
        root: the COCO folder.
        image_size: shorter side the model resizes to (800 in the papers' setting).
        val_images: train2017 images held out for validation during training.
        batch_size, eval_batch_size, num_workers, seed, augment: see
            :class:`CocoInstancesTask`.
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
    ) -> None:
        super().__init__(name, batch_size, eval_batch_size, num_workers, seed, augment)
        if isinstance(val_images, bool) or not isinstance(val_images, int) or val_images < 1:
            raise ConfigError("val_images", val_images, "an integer >= 1")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ConfigError("image_size", image_size, "an integer >= 1")
        self.root = Path(str(root)).expanduser()
        self.image_size = image_size
        self.val_images = val_images

    def sources(self) -> dict[str, tuple[Path, Path, list[int] | None]]:
        root = self.root
        expected = [
            root / "train2017",
            root / "val2017",
            root / "annotations" / "instances_train2017.json",
            root / "annotations" / "instances_val2017.json",
        ]
        missing = [str(p.relative_to(root)) for p in expected if not p.exists()]
        if missing:
            raise DatasetError(
                f"COCO 2017 not found at {root}: expected train2017/, val2017/ and annotations/instances_{{train,val}}2017.json (missing {', '.join(missing)})"
            )
        train_file = root / "annotations" / "instances_train2017.json"
        coco = self.load_annotations(train_file)
        ids = [i for i in sorted(coco.imgs) if training_annotations(coco, i)]
        if len(ids) <= self.val_images:
            raise DatasetError(
                f"COCO train2017 at {train_file} has {len(ids)} annotated images: expected more than val_images={self.val_images}"
            )
        order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(self.seed)).tolist()
        val = sorted(ids[i] for i in order[: self.val_images])
        held_out = set(val)
        train = [i for i in ids if i not in held_out]
        return {
            "train": (root / "train2017", train_file, train),
            "val": (root / "train2017", train_file, val),
            "test": (root / "val2017", root / "annotations" / "instances_val2017.json", None),
        }
