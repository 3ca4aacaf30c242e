"""Every paper preset end to end at its true input shape, without the data (issue 20 §1).

``run(cfg)`` on ``task.synthetic=true`` (slope_bench.tasks.synthetic): ImageNet presets at
224 px with 1,000 classes, ViT-S/16 at 224 px, Mask R-CNN R50-FPN on 800 px COCO images
with COCO's 91 outputs. Each run is the real pipeline (dense reference as built, dense
fine-tune control, prepare, one fine-tune step, finalize, measurement, packed and coded
export) kept small where it does not change a shape: ``task.synthetic_images`` JPEGs per
split (the 1,000 class folders stay, most of them empty), batches of 2, one optimizer step
(``trainer.limit_train_batches=1``), and ResNet-18 at ``model.width=8`` (the real
ResNet-18 layout with its 224 px stem and 1,000-way classifier; width 64 costs minutes per
evaluation on a 2-core CPU). ``slope_resnet18_2of4_w4`` runs in the default suite; the
other presets, ViT-S and Mask R-CNN are ``slow``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from slope_bench.train import run
from tests.conftest import CONF

PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml") if p.stem != "bench_digits")
IMAGES = 20  # JPEGs per split: 18 train + 2 validation (OBC calibrates on 16 of them), 20 test
SMALL = [
    "task.synthetic=true",
    f"task.synthetic_images={IMAGES}",
    "task.batch_size=2",
    f"task.eval_batch_size={IMAGES}",
    "task.num_workers=0",
    "dense.epochs=0",
    "finetune.epochs=1",
    "+trainer.limit_train_batches=1",
    "model.pretrained=false",
    "val_every=0",
    "logger=none",
    "trainer.enable_progress_bar=false",
]
OBC_CALIB = ["method.n_calib=16", "method.solver=blocked", "method.progress=false"]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    """One synthetic ImageNet / COCO for the module (written once, read by every run)."""
    return tmp_path_factory.mktemp("synthetic")


def run_at_true_shape(make_cfg, synthetic_root: Path, *overrides: str) -> tuple[dict, dict[str, list[int]]]:
    """``(results, shape of every tensor of finalized.safetensors)`` of one run."""
    cfg = make_cfg(*SMALL, *overrides, f"task.synthetic_root={synthetic_root}", shrink=False)
    results = run(cfg)
    out = Path(cfg.paths.output_dir)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["status"] == results["status"] == "ok", on_disk.get("diverged")
    assert on_disk["compress/ratio"] == pytest.approx(results["compress/ratio"]) and results["compress/ratio"] > 1
    assert results["compress/measured_ratio"] > 1
    with safe_open(str(out / "finalized.safetensors"), "pt") as f:
        shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    return results, shapes


def check_imagenet(results: dict, trains: bool) -> None:
    assert results["task"] == "imagenet"
    assert (results["input/image_size"], results["input/num_classes"], results["input/in_chans"]) == (224, 1000, 3)
    assert results["train/steps"] == (1 if trains else 0) and results["train/dense_epochs"] == 0


def resnet_preset(name: str, make_cfg, synthetic_root: Path) -> dict:
    obc = name.startswith("obc_")
    results, shapes = run_at_true_shape(make_cfg, synthetic_root, f"experiment={name}", "model.width=8", *(OBC_CALIB if obc else []))
    check_imagenet(results, trains=not obc)
    assert results["model"] == "resnet18" and results["model_width"] == 8
    assert shapes["conv1.weight"] == [8, 3, 7, 7] and shapes["fc.weight"] == [1000, 64]  # the 224 px stem, 1,000 outputs
    compressed = [layer for layer in results["layers"] if layer["w_bits"] < 32]  # every preset quantizes
    assert {layer["name"] for layer in compressed} >= {f"layer{i}.{j}.conv{k}" for i in (1, 2, 3, 4) for j in (0, 1) for k in (1, 2)}
    if obc:  # the real calibration path: 16 training images, the blocked solver on every layer
        assert {layer["solver"] for layer in compressed} == {"blocked"}
        assert all(layer["calib_rows"] > 0 for layer in compressed)
        assert results["time/obc_solve_blocked_s"] > 0 and "time/obc_solve_exact_s" not in results
    return results


def test_slope_resnet18_preset_at_224(make_cfg, synthetic_root):
    results = resnet_preset("slope_resnet18_2of4_w4", make_cfg, synthetic_root)
    assert results["setting"] == "2:4 w4" and results["train/steps_dense_ft"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", [p for p in PRESETS if p != "slope_resnet18_2of4_w4"])
def test_resnet18_preset_at_224(name, make_cfg, synthetic_root):
    resnet_preset(name, make_cfg, synthetic_root)


@pytest.mark.slow
def test_vit_small_16_at_224(make_cfg, synthetic_root):
    # ViT-S/16 (embed 384, 6 heads, patch 16: 196 tokens + cls); 2 of its 12 blocks (the same shapes, repeated)
    results, shapes = run_at_true_shape(make_cfg, synthetic_root, "task=imagenet", "model=vit_small", "model.depth=2", "method=slope")
    check_imagenet(results, trains=True)
    assert shapes["patch_embed.proj.weight"] == [384, 3, 16, 16] and shapes["pos_embed"] == [1, 197, 384]
    assert shapes["head.weight"] == [1000, 384] and shapes["blocks.1.mlp.fc1.weight"] == [1536, 384]
    assert any(layer["name"] == "blocks.1.attn.qkv" and layer["pattern"] == "2:4" for layer in results["layers"])


@pytest.mark.slow
def test_maskrcnn_r50_fpn_on_coco(make_cfg, synthetic_root):
    # R50-FPN with torchvision's heads; 2 synthetic 800 x 1067 images per split: 1 trains (1 step), 1 validates
    results, shapes = run_at_true_shape(
        make_cfg,
        synthetic_root,
        "model=maskrcnn",
        "task=coco",
        "task.synthetic_images=2",
        "task.batch_size=1",
        "task.eval_batch_size=1",
        "method=slope",
    )
    assert results["task"] == "coco" and results["model"] == "maskrcnn"
    assert (results["input/image_size"], results["input/num_classes"]) == (800, 91)
    assert results["train/steps"] == 1
    assert shapes["backbone.body.layer4.2.conv3.weight"] == [2048, 512, 1, 1]  # ResNet-50 body
    assert shapes["backbone.fpn.layer_blocks.0.0.weight"] == [256, 256, 3, 3]  # 256-wide FPN
    assert shapes["roi_heads.box_predictor.cls_score.weight"] == [91, 1024]  # COCO's 91 outputs, 1,024-wide box head
    assert shapes["roi_heads.mask_predictor.mask_fcn_logits.weight"] == [91, 256, 1, 1]
    assert any(layer["name"] == "backbone.body.layer4.2.conv3" and layer["pattern"] == "2:4" for layer in results["layers"])
