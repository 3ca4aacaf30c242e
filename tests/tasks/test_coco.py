"""COCO loader, COCOeval evaluator and the COCO 2017 task on tiny data sets written to tmp_path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from slope_bench.tasks.base import DatasetError
from slope_bench.tasks.coco import Coco, CocoInstances, coco_metrics, detections_to_coco, encode_masks, quiet_coco
from tests.conftest import ROOT

SIZE = (40, 48)  # height, width


def square_polygon(x: int, y: int, w: int, h: int) -> list[list[float]]:
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def write_coco(folder: Path, image_dir: Path, annotation_file: Path, n_images: int, first_id: int = 1, category_ids=(1, 3, 7)) -> None:
    """Images with one or two rectangles each (polygon masks), plus a crowd region on image 1."""
    image_dir.mkdir(parents=True, exist_ok=True)
    annotation_file.parent.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    rng = np.random.default_rng(0)
    for k in range(n_images):
        image_id = first_id + k
        pixels = (rng.random((*SIZE, 3)) * 60).astype(np.uint8)
        boxes = [(4 + k, 5, 12, 10), (24, 20 - k, 14, 12)][: 1 + k % 2]
        for j, (x, y, w, h) in enumerate(boxes):
            pixels[y : y + h, x : x + w] = 200
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_ids[(k + j) % len(category_ids)],
                    "segmentation": square_polygon(x, y, w, h),
                    "area": float(w * h),
                    "bbox": [float(x), float(y), float(w), float(h)],
                    "iscrowd": 0,
                }
            )
        Image.fromarray(pixels).save(image_dir / f"{image_id:06d}.png")
        images.append({"id": image_id, "file_name": f"{image_id:06d}.png", "height": SIZE[0], "width": SIZE[1]})
    crowd = np.zeros(SIZE, dtype=np.uint8)
    crowd[30:38, 2:10] = 1
    annotations.append(
        {
            "id": len(annotations) + 1,
            "image_id": first_id,
            "category_id": category_ids[0],
            "segmentation": encode_masks(torch.from_numpy(crowd)[None])[0],
            "area": 64.0,
            "bbox": [2.0, 30.0, 8.0, 8.0],
            "iscrowd": 1,
        }
    )
    categories = [{"id": c, "name": f"c{c}", "supercategory": "thing"} for c in category_ids]
    annotation_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))


@pytest.fixture
def coco_split(tmp_path) -> tuple[Path, Path]:
    write_coco(tmp_path, tmp_path / "images", tmp_path / "instances.json", 4)
    return tmp_path / "images", tmp_path / "instances.json"


def test_loader_targets_from_polygons_skip_crowd(coco_split):
    image_dir, annotation_file = coco_split
    coco = quiet_coco(annotation_file)
    dataset = CocoInstances(image_dir, coco, sorted(coco.imgs))
    image, target = dataset[0]
    assert image.shape == (3, *SIZE) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert target["boxes"].tolist() == [[4.0, 5.0, 16.0, 15.0]]  # xyxy; the crowd region is left out
    assert target["labels"].tolist() == [1] and int(target["image_id"]) == 1
    assert target["masks"].shape == (1, *SIZE) and target["masks"].dtype == torch.uint8
    rows, cols = target["masks"][0].nonzero(as_tuple=True)
    # polygon rasterisation covers the rectangle (pycocotools includes the far edge)
    assert int(cols.min()) == 4 and int(rows.min()) == 5 and int(cols.max()) in (15, 16) and int(rows.max()) in (14, 15)
    _, second = dataset[1]
    assert second["labels"].tolist() == [3, 7] and second["boxes"].shape == (2, 4)


def test_flip_moves_boxes_with_masks(coco_split):
    image_dir, annotation_file = coco_split
    coco = quiet_coco(annotation_file)
    plain = CocoInstances(image_dir, coco, [1])[0]
    flipped_dataset = CocoInstances(image_dir, coco, [1], flip=True)
    torch.manual_seed(0)
    seen_flip = False
    for _ in range(10):
        image, target = flipped_dataset[0]
        if torch.equal(image, plain[0]):
            continue
        seen_flip = True
        assert torch.equal(image, plain[0].flip(-1))
        width = SIZE[1]
        x1, y1, x2, y2 = target["boxes"][0].tolist()
        assert (x1, x2) == (width - 16.0, width - 4.0) and (y1, y2) == (5.0, 15.0)
        assert torch.equal(target["masks"], plain[1]["masks"].flip(-1))
    assert seen_flip


def ground_truth_detections(coco, image_ids, shift: float = 0.0) -> tuple[list[dict], list[dict]]:
    boxes, masks = [], []
    for image_id in image_ids:
        anns = [a for a in coco.imgToAnns[image_id] if not a["iscrowd"]]
        xyxy = torch.tensor(
            [[a["bbox"][0] + shift, a["bbox"][1], a["bbox"][0] + a["bbox"][2] + shift, a["bbox"][1] + a["bbox"][3]] for a in anns]
        )
        output = {
            "boxes": xyxy,
            "scores": torch.linspace(0.9, 0.8, len(anns)),
            "labels": torch.tensor([a["category_id"] for a in anns]),
            "masks": torch.from_numpy(np.stack([coco.annToMask(a) for a in anns])).float()[:, None] * 0.9,
        }
        b, m = detections_to_coco(image_id, output)
        boxes += b
        masks += m
    return boxes, masks


def test_evaluator_gives_ap_one_for_ground_truth(coco_split):
    _, annotation_file = coco_split
    coco = quiet_coco(annotation_file)
    ids = sorted(coco.imgs)
    boxes, masks = ground_truth_detections(coco, ids)
    metrics = coco_metrics(coco, boxes, masks, ids)
    assert metrics == pytest.approx({"bbox_map": 1.0, "segm_map": 1.0, "bbox_map50": 1.0, "segm_map50": 1.0})


def test_evaluator_penalises_wrong_boxes_and_empty_predictions(coco_split):
    _, annotation_file = coco_split
    coco = quiet_coco(annotation_file)
    ids = sorted(coco.imgs)
    boxes, masks = ground_truth_detections(coco, ids, shift=3.0)  # IoU ≈ 0.6-0.7: counted at .50, not at .75+
    metrics = coco_metrics(coco, boxes, masks, ids)
    assert metrics["bbox_map50"] == pytest.approx(1.0)
    assert 0.1 < metrics["bbox_map"] < 0.7
    assert metrics["segm_map"] == pytest.approx(1.0)  # masks untouched
    assert coco_metrics(coco, [], [], ids) == {"bbox_map": 0.0, "segm_map": 0.0, "bbox_map50": 0.0, "segm_map50": 0.0}
    # evaluating a subset of images only scores those images
    only_first = [d for d in boxes if d["image_id"] == ids[0]]
    assert coco_metrics(coco, only_first, [], ids[:1])["bbox_map50"] == pytest.approx(1.0)


def test_encode_masks_thresholds_probabilities():
    from pycocotools import mask as mask_utils

    probabilities = torch.zeros(2, 1, 6, 5)
    probabilities[0, 0, 1:3, 2:4] = 0.7
    probabilities[1, 0, :, 0] = 0.4  # below 0.5: empty mask
    rles = encode_masks(probabilities)
    decoded = mask_utils.decode([{"size": r["size"], "counts": r["counts"].encode()} for r in rles])
    assert decoded.shape == (6, 5, 2)
    assert decoded[..., 0].sum() == 4 and decoded[1:3, 2:4, 0].all() and decoded[..., 1].sum() == 0
    assert encode_masks(torch.zeros(0, 1, 6, 5)) == []


def write_coco2017(root: Path) -> None:
    write_coco(root, root / "train2017", root / "annotations" / "instances_train2017.json", 5, first_id=1, category_ids=(1, 3, 90))
    write_coco(root, root / "val2017", root / "annotations" / "instances_val2017.json", 2, first_id=100, category_ids=(1, 3, 90))


class ReplayModel(nn.Module):
    """Returns prepared outputs in call order (the loader's order): a stand-in detector."""

    def __init__(self, outputs: list[dict]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.outputs = list(outputs)

    def forward(self, images):
        return [self.outputs.pop(0) for _ in images]


def test_coco2017_layout_splits_and_evaluate(tmp_path):
    write_coco2017(tmp_path)
    task = Coco(root=str(tmp_path), val_images=2, batch_size=2, eval_batch_size=2, num_workers=0, seed=0)
    assert task.num_classes == 91  # category ids are the labels: max id 90 + background
    assert task.num_train == 3
    train_ids, val_ids = task.datasets["train"].image_ids, task.datasets["val"].image_ids
    assert len(val_ids) == 2 and not set(train_ids) & set(val_ids) and sorted(train_ids + val_ids) == [1, 2, 3, 4, 5]
    again = Coco(root=str(tmp_path), val_images=2, num_workers=0, seed=0)
    again.setup()
    assert again.datasets["val"].image_ids == val_ids  # deterministic carve
    assert task.datasets["test"].image_ids == [100, 101]
    images, targets = next(iter(task.train_dataloader()))
    assert isinstance(images, list) and len(images) == 2 and isinstance(targets[0], dict)
    assert task.example_input()[0].shape == (3, *SIZE)
    calib = task.calib_batches(3)
    assert [len(b) for b in calib] == [2, 1] and all(isinstance(b, list) for b in calib)

    coco = task.datasets["test"].coco
    outputs = []
    for image_id in task.datasets["test"].image_ids:
        anns = [a for a in coco.imgToAnns[image_id] if not a["iscrowd"]]
        outputs.append(
            {
                "boxes": torch.tensor(
                    [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns]
                ),
                "scores": torch.ones(len(anns)),
                "labels": torch.tensor([a["category_id"] for a in anns]),
                "masks": torch.from_numpy(np.stack([coco.annToMask(a) for a in anns])).float()[:, None],
            }
        )
    model = ReplayModel(outputs).train()
    metrics = task.evaluate(model, "test")
    assert metrics == pytest.approx({"bbox_map": 1.0, "segm_map": 1.0, "bbox_map50": 1.0, "segm_map50": 1.0})
    assert model.training  # evaluate restores the mode


def test_missing_or_malformed_coco_raises_dataset_error(tmp_path):
    task = Coco(root=str(tmp_path / "nowhere"), num_workers=0)
    with pytest.raises(DatasetError, match=r"^task\.root='.*nowhere': COCO 2017 not found at .*nowhere.*train2017/"):
        task.setup()
    write_coco2017(tmp_path)
    (tmp_path / "annotations" / "instances_val2017.json").write_text("{not json")
    with pytest.raises(DatasetError, match="instances_val2017.json is not valid JSON"):
        _ = Coco(root=str(tmp_path), val_images=1, num_workers=0).num_classes
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps({"images": []}))
    with pytest.raises(DatasetError, match="missing annotations, categories"):
        Coco(root=str(tmp_path), val_images=1, num_workers=0).setup()


def test_cli_missing_coco_is_one_line_exit_2(tmp_path):
    missing = tmp_path / "no_coco"
    cmd = [
        sys.executable,
        "run.py",
        "model=maskrcnn",
        "task=coco",
        f"task.root={missing}",
        "logger=none",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and str(missing) in lines[0] and "train2017/" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "results.json").exists()
