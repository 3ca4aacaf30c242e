"""ViT-S and Mask R-CNN builders: forward/backward, targets, MACs, every method's lifecycle, run.py end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from slope_bench.errors import ConfigError
from slope_bench.lit import param_groups
from slope_bench.metrics import count_macs, measure
from slope_bench.models import MASKRCNN_PREDICTORS, default_patch_size, maskrcnn, target_names, vit_small
from slope_bench.sparsity import NM, satisfies_nm
from slope_bench.train import build_method, run
from tests.conftest import CONF, METHODS, compose_config

TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2}
TINY_MASKRCNN = {
    "backbone": "resnet18",
    "backbone_width": 8,
    "fpn_channels": 16,
    "anchor_sizes": [4, 8, 16, 32, 64],
    "rpn_pre_nms_top_n_train": 50,
    "rpn_post_nms_top_n_train": 30,
    "rpn_pre_nms_top_n_test": 50,
    "rpn_post_nms_top_n_test": 30,
    "rpn_batch_size_per_image": 16,
    "box_batch_size_per_image": 16,
    "box_detections_per_img": 10,
    "box_head_dim": 32,
    "mask_head_channels": 16,
    "mask_head_layers": 2,
}


def detection_batch(n: int = 2, size: int = 32) -> tuple[list[torch.Tensor], list[dict]]:
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    for i in range(n):
        image = torch.rand(3, size, size, generator=g) * 0.1
        masks = torch.zeros(1, size, size, dtype=torch.uint8)
        masks[0, 4 + i : 16 + i, 6:18] = 1
        image[:, masks[0].bool()] = 0.9
        images.append(image)
        targets.append({"boxes": torch.tensor([[6.0, 4.0 + i, 18.0, 16.0 + i]]), "labels": torch.tensor([3 + i]), "masks": masks})
    return images, targets


# ---------------------------------------------------------------------------- ViT-S
def test_vit_small_identity_and_default_patch():
    model = vit_small(num_classes=10, in_chans=3, image_size=8)
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (384, 12, 6)
    assert model.patch_embed.num_patches == 16  # patch 2 on 8x8 digits
    assert (default_patch_size(8), default_patch_size(32), default_patch_size(224)) == (2, 8, 16)


def test_vit_forward_backward_and_targets():
    torch.manual_seed(0)
    model = vit_small(num_classes=10, in_chans=3, image_size=16, patch_size=4, **TINY_VIT)
    x = torch.randn(4, 3, 16, 16)
    logits = model(x)
    assert logits.shape == (4, 10)
    nn.functional.cross_entropy(logits, torch.arange(4)).backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0 and model.patch_embed.proj.weight.grad is not None
    names = target_names(model)
    per_block = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
    assert names == [f"blocks.{b}.{leaf}" for b in range(2) for leaf in per_block]
    assert target_names(model, compress_first=True, compress_classifier=True)[0] == "patch_embed.proj"
    assert "head" in target_names(model, compress_classifier=True)


def test_vit_macs_count_attention_and_mlp_linears():
    model = vit_small(num_classes=10, in_chans=3, image_size=16, patch_size=4, **TINY_VIT)
    per_module, total = count_macs(model, torch.randn(1, 3, 16, 16))
    tokens = 16 + 1  # patches + class token
    assert per_module["blocks.0.attn.qkv"] == tokens * 32 * 96
    assert per_module["blocks.1.mlp.fc1"] == tokens * 32 * 128
    assert per_module["patch_embed.proj"] == 16 * 3 * 4 * 4 * 32
    attention = 2 * 2 * tokens * tokens * 16  # per block: q kᵀ and attn v, 2 heads of 16
    assert total == sum(per_module.values()) + 2 * attention  # the attention matmuls count too


def test_vit_bad_values_raise_config_error():
    with pytest.raises(ConfigError, match="model.patch_size"):
        vit_small(10, 3, 8, patch_size=3)
    with pytest.raises(ConfigError, match="model.num_heads"):
        vit_small(10, 3, 8, embed_dim=32, num_heads=5)
    with pytest.raises(ConfigError, match="model.pretrained"):
        vit_small(10, 3, 8, pretrained=True)  # patch 2 is not ViT-S/16: refused before any download
    with pytest.raises(ConfigError, match="model.depth"):
        vit_small(10, 3, 8, depth=0)


# ---------------------------------------------------------------------------- Mask R-CNN
def test_maskrcnn_train_losses_backward_and_eval_outputs():
    torch.manual_seed(0)
    model = maskrcnn(num_classes=11, in_chans=3, image_size=32, **TINY_MASKRCNN)
    images, targets = detection_batch()
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.backbone.body.conv1.weight.grad.abs().sum() > 0
    assert model.roi_heads.mask_predictor.mask_fcn_logits.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    assert len(outputs) == 2
    for out in outputs:
        assert len(out["boxes"]) <= 10 and out["masks"].shape[1:] == (1, 32, 32)
        assert out["masks"].is_floating_point() and bool(((out["masks"] >= 0) & (out["masks"] <= 1)).all())


def test_maskrcnn_targets_and_dense_layers():
    model = maskrcnn(num_classes=11, in_chans=3, image_size=32, **TINY_MASKRCNN)
    names = target_names(model)
    assert "backbone.body.conv1" not in names and not set(MASKRCNN_PREDICTORS) & set(names)
    for expected in (
        "backbone.body.layer1.0.conv1",
        "backbone.body.layer4.1.conv2",
        "backbone.fpn.inner_blocks.0.0",
        "backbone.fpn.layer_blocks.3.0",
        "rpn.head.conv.0.0",
        "rpn.head.cls_logits",
        "roi_heads.box_head.fc6",
        "roi_heads.mask_head.1.0",
    ):
        assert expected in names
    assert isinstance(model.roi_heads.mask_predictor.mask_fcn_logits, nn.Conv2d)
    everything = target_names(model, compress_first=True, compress_classifier=True)
    assert set(everything) - set(names) == {"backbone.body.conv1", *MASKRCNN_PREDICTORS}


def test_maskrcnn_macs_cover_backbone_and_heads():
    torch.manual_seed(0)
    model = maskrcnn(num_classes=11, in_chans=3, image_size=32, **TINY_MASKRCNN)
    images, _ = detection_batch(1)
    per_module, total = count_macs(model, images)
    for name in (
        "backbone.body.layer1.0.conv1",
        "backbone.fpn.layer_blocks.0.0",
        "rpn.head.conv.0.0",
        "roi_heads.box_head.fc6",
        "roi_heads.box_predictor.cls_score",
    ):
        assert per_module.get(name, 0) > 0, name
    assert per_module["backbone.body.conv1"] == 16 * 16 * 8 * 3 * 7 * 7  # 32 px -> 16 x 16 outputs, width 8
    assert total >= sum(per_module.values())


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_resnet_body_at_width_64_is_torchvision_resnet(backbone):
    import torchvision

    from slope_bench.models import resnet_body

    reference = torchvision.models.get_model(backbone, weights=None).eval()
    body = resnet_body(backbone).eval()
    expected = {k: v.shape for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in body.state_dict().items()} == expected  # torchvision weights load as they are
    body.load_state_dict({k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")})
    features = nn.Sequential(*list(reference.children())[:-2])
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(nn.Sequential(*list(body.children())[:-2])(x), features(x))
    narrow = resnet_body(backbone, in_chans=1, width=8).eval()
    assert narrow.conv1.out_channels == 8 and narrow.layer4[-1].conv1.in_channels == 64 * (4 if backbone == "resnet50" else 1)
    assert nn.Sequential(*list(narrow.children())[:-2])(torch.randn(1, 1, 32, 32)).shape[1] == 64 * (4 if backbone == "resnet50" else 1)


def test_maskrcnn_knobs_and_bad_values():
    model = maskrcnn(num_classes=5, in_chans=1, image_size=40, trainable_backbone_layers=3, **TINY_MASKRCNN)
    assert model.backbone.body.conv1.in_channels == 1 and len(model.transform.image_mean) == 1
    assert (model.transform.min_size, model.transform.max_size) == ((40,), round(40 * 1333 / 800))
    assert not model.backbone.body.conv1.weight.requires_grad and not model.backbone.body.layer1[0].conv1.weight.requires_grad
    assert model.backbone.body.layer2[0].conv1.weight.requires_grad
    assert isinstance(model.backbone.body.bn1, nn.BatchNorm2d)
    frozen = maskrcnn(num_classes=5, image_size=32, norm="frozen", **TINY_MASKRCNN)
    assert type(frozen.backbone.body.bn1).__name__ == "FrozenBatchNorm2d"
    assert model.roi_heads.detections_per_img == 10 and model.roi_heads.fg_bg_sampler.batch_size_per_image == 16
    with pytest.raises(ConfigError, match="model.backbone"):
        maskrcnn(num_classes=5, backbone="vgg16")
    with pytest.raises(ConfigError, match="model.pretrained"):
        maskrcnn(num_classes=5, backbone="resnet18", pretrained=True)  # refused before any download
    with pytest.raises(ConfigError, match="model.anchor_sizes"):
        maskrcnn(num_classes=5, anchor_sizes=[8, 16])
    with pytest.raises(ConfigError, match="model.trainable_backbone_layers"):
        maskrcnn(num_classes=5, trainable_backbone_layers=6)
    with pytest.raises(ConfigError, match="model.pretrained_backbone"):
        maskrcnn(num_classes=5, backbone_width=32, pretrained_backbone=True)
    wide = maskrcnn(num_classes=5, image_size=32, **{**TINY_MASKRCNN, "backbone": "resnet50"})
    assert wide.backbone.fpn.inner_blocks[3][0].in_channels == 8 * 8 * 4  # bottleneck outputs


# ---------------------------------------------------------------------------- every method on both models
def method_compressor(name: str, *overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"method={name}", *overrides])
    return build_method(cfg.method)


def tiny_vit():
    return vit_small(num_classes=10, in_chans=3, image_size=8, **TINY_VIT)


def tiny_maskrcnn():
    return maskrcnn(num_classes=11, in_chans=3, image_size=32, **TINY_MASKRCNN)


def classification_steps(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def detection_steps(model, batch):
    images, targets = batch
    return sum(model(images, targets).values())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["vit_small", "maskrcnn"])
def test_every_method_lifecycle_on_both_models(method, kind):
    torch.manual_seed(0)
    name, epochs, compressor = method_compressor(method)
    if kind == "vit_small":
        model, loss_fn, example = tiny_vit(), classification_steps, torch.randn(1, 3, 8, 8)
        data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))) for _ in range(3)]
        calib = [x for x, _ in data]
    else:
        model, loss_fn = tiny_maskrcnn(), detection_steps
        data = [detection_batch(2) for _ in range(3)]
        example, calib = data[0][0][:1], [images for images, _ in data]
    compressor.num_train = 64
    targets = target_names(model, compressor.compress_first, compressor.compress_classifier)
    references = {n: model.get_submodule(n).weight.detach().clone() for n in targets}
    model = compressor.prepare(model, targets)
    model.train()
    steps = 0 if epochs == 0 else len(data)
    optimizer = torch.optim.AdamW(param_groups(model, compressor, 1e-3, 1e-4))
    for step in range(steps):
        loss = loss_fn(model, data[step]) + compressor.penalty()
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        compressor.on_step(step, steps)
    model = compressor.finalize(model, calib)
    model.eval()
    assert set(compressor.specs) == set(targets)
    for n in targets:
        module = model.get_submodule(n)
        assert not parametrize.is_parametrized(module)
        spec = compressor.specs[n]
        if isinstance(spec.pattern, NM) and spec.pattern.applies_to(module.weight):
            assert satisfies_nm(module.weight, spec.pattern), n
    with torch.no_grad():
        out = model(example)
    if kind == "maskrcnn":
        assert set(out[0]) >= {"boxes", "labels", "scores", "masks"}
    else:
        assert torch.isfinite(out).all()
    report = measure(model, compressor.specs, example, references)
    assert {layer["name"] for layer in report["layers"]} == set(targets)
    if method == "dense":
        assert report["compress/sparsity"] == 0 and report["compress/bops_ratio"] == pytest.approx(1.0)
    else:
        assert report["compress/ratio"] > 1.5 and report["compress/bops_ratio"] < 1.0


# ---------------------------------------------------------------------------- run.py end to end
def read_results(cfg) -> dict:
    return json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())


def test_run_vit_small_on_digits_end_to_end(make_cfg):
    shrink = [
        "dense.epochs=1",
        "finetune.epochs=1",
        "task.batch_size=128",
        "val_every=0",
        "logger=none",
        "trainer.enable_progress_bar=false",
        "control.dense_ft=false",
    ]
    cfg = make_cfg("model=vit_small", "model.embed_dim=32", "model.depth=2", "model.num_heads=2", *shrink, shrink=False)
    results = run(cfg)
    assert results["model"] == "vit_small" and results["task"] == "digits" and results["setting"] == "2:4 w4"
    assert 0 <= results["test/top1"] <= 1 and 0 <= results["test/top1_dense"] <= 1
    assert results["time/step_ms"] > 0 and results["train/steps"] == 10  # 1,257 training digits / 128
    names = [layer["name"] for layer in read_results(cfg)["layers"]]
    assert names == [f"blocks.{b}.{leaf}" for b in range(2) for leaf in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert all(layer["pattern"] == "2:4" and layer["w_bits"] <= 4 for layer in results["layers"])
    assert results["compress/bops_ratio"] < 1.0


MASKRCNN_RUN = [
    "model=maskrcnn",
    *(f"model.{k}={v}".replace(" ", "") for k, v in TINY_MASKRCNN.items()),
    "task.canvas_size=32",
    "task.min_digit_size=8",
    "task.max_digit_size=14",
    "task.max_digits=2",
    "task.n_train=256",  # the pipeline's default calibration set is 256 training images
    "task.n_val=4",
    "task.n_test=4",
    "task.batch_size=64",
    "task.eval_batch_size=4",
    "dense.epochs=0",
    "finetune.epochs=1",
    "control.dense_ft=false",
    "val_every=1",
    "logger=none",
    "trainer.enable_progress_bar=false",
]


def test_run_maskrcnn_on_digits_instances_end_to_end(make_cfg):
    cfg = make_cfg(*MASKRCNN_RUN, shrink=False)
    results = run(cfg)
    assert results["model"] == "maskrcnn" and results["task"] == "digits_instances" and results["main_metric"] == "bbox_map"
    on_disk = read_results(cfg)
    for key in ("bbox_map", "segm_map", "bbox_map50", "segm_map50"):
        for suffix in ("", "_dense"):
            assert 0 <= on_disk[f"test/{key}{suffix}"] <= 1
    names = {layer["name"] for layer in on_disk["layers"]}
    assert {"backbone.body.layer1.0.conv1", "rpn.head.conv.0.0", "roi_heads.box_head.fc6", "roi_heads.mask_head.0.0"} <= names
    assert not names & {"backbone.body.conv1", *MASKRCNN_PREDICTORS}
    assert all(layer["pattern"] == "2:4" for layer in on_disk["layers"])
    assert on_disk["compress/ratio"] > 3 and on_disk["compress/bops_ratio"] < 1.0


def test_run_maskrcnn_obc_calibrates_through_detection(make_cfg):
    cfg = make_cfg(*MASKRCNN_RUN, "method=obc", "method.n_calib=16", "dense.epochs=1", shrink=False)
    results = run(cfg)
    assert results["method"] == "obc" and "test/segm_map" in results
    assert results["compress/sparsity"] >= 0.5
    assert all(layer.get("calib_rows", 0) > 0 for layer in results["layers"] if not layer["name"].startswith("roi_heads.mask"))


@pytest.mark.parametrize(
    "overrides,dense_lr,finetune_lr",
    [
        (["model=vit_small"], 5e-4, 2e-4),  # the ViT's own recipe (conf/model/vit_small.yaml)
        (["model=vit_small", "dense.lr=1e-3"], 1e-3, 2e-4),  # an explicit value wins
        (["model=resnet18"], 2e-3, 5e-4),
        (["model=maskrcnn"], 2e-3, 5e-4),
    ],
)
def test_a_model_may_name_its_own_training_recipe(overrides, dense_lr, finetune_lr, tmp_path):
    cfg = compose_config(overrides, tmp_path)
    assert (cfg.dense.lr, cfg.finetune.lr) == (dense_lr, finetune_lr)
