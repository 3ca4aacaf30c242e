"""ViT-S and Mask R-CNN builders: forward/backward, targets, MACs, every method's lifecycle, run.py end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from slope_bench.errors import ConfigError
from slope_bench.loop import drive
from slope_bench.metrics import count_macs, measure
from slope_bench.models import MASKRCNN_PREDICTORS, choose_targets, default_patch_size, maskrcnn, target_names, timm_model, vit_small
from slope_bench.sparsity import NM, satisfies_nm
from slope_bench.train import run
from tests.conftest import METHODS, MODELS, TINY_MASKRCNN, TINY_VIT, compose_config, detection_batch, method_from_yaml, tiny_model


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


# ---------------------------------------------------------------------------- every method on every model
def tiny_vit():
    return vit_small(num_classes=10, in_chans=3, image_size=8, **TINY_VIT)


def tiny_maskrcnn():
    return maskrcnn(num_classes=11, in_chans=3, image_size=32, **TINY_MASKRCNN)


SLOW_PAIRS = {("mobilenetv3_small_100", "obc")}  # 22 s (calibration and solves over its many layers); every other pair < 9 s


@pytest.mark.parametrize(
    ("model_name", "method"),
    [pytest.param(m, k, id=f"{m}-{k}", marks=[pytest.mark.slow] if (m, k) in SLOW_PAIRS else []) for m in MODELS for k in METHODS],
)
def test_every_method_lifecycle_on_every_model(method, model_name):
    """Every conf/method/*.yaml × every conf/model/*.yaml through the shared four-hook loop."""
    torch.manual_seed(0)
    compressor = method_from_yaml(method)
    model, loss_fn, batches, example = tiny_model(model_name)
    targets, skipped = choose_targets(model, compressor)
    references = {n: model.get_submodule(n).weight.detach().clone() for n in targets}
    untouched = {n: model.get_submodule(n).weight.detach().clone() for n in skipped}
    driven = drive(model, compressor, batches, loss_fn, steps=1 if compressor.requirements.trains else None)
    specs = driven.finalized.specs
    assert set(specs) == set(targets) == set(driven.targets) and driven.skipped == skipped
    for name, reason in skipped.items():  # kept dense: not wrapped, not hardened
        assert isinstance(reason, str) and reason
        assert not parametrize.is_parametrized(model.get_submodule(name))
        if not compressor.requirements.trains:  # post-training: nothing else may have moved it
            torch.testing.assert_close(model.get_submodule(name).weight, untouched[name], rtol=0, atol=0)
    for n in targets:
        module = model.get_submodule(n)
        assert not parametrize.is_parametrized(module)
        spec = specs[n]
        if isinstance(spec.pattern, NM) and spec.pattern.applies_to(module.weight):
            assert satisfies_nm(module.weight, spec.pattern), n
    with torch.no_grad():
        out = model(example)
    if isinstance(out, list):
        assert set(out[0]) >= {"boxes", "labels", "scores", "masks"}
    else:
        assert torch.isfinite(out).all()
    report = measure(model, specs, example, references)
    assert {layer["name"] for layer in report["layers"]} == set(targets)
    if method == "dense":
        assert report["compress/sparsity"] == 0 and report["compress/bops_ratio"] == pytest.approx(1.0)
    else:
        assert report["compress/ratio"] > 1.5 and report["compress/bops_ratio"] < 1.0


def test_timm_model_takes_first_conv_and_classifier_from_its_config():
    model = timm_model("mobilenetv3_small_100", num_classes=10, in_chans=3)
    assert model.first_layers == ["conv_stem"] and model.classifier_layers == ["classifier"]
    names = target_names(model)
    assert "conv_stem" not in names and "classifier" not in names and names
    depthwise = [n for n in names if model.get_submodule(n).groups > 1] if names else []
    assert depthwise, "mobilenetv3 has depthwise convolutions"


def test_obc_keeps_depthwise_convolutions_dense_with_a_reason():
    model = timm_model("mobilenetv3_small_100", num_classes=10, in_chans=3)
    targets, skipped = choose_targets(model, method_from_yaml("obc"))
    assert skipped and all("group" in reason for reason in skipped.values())
    assert all(model.get_submodule(n).groups == 1 for n in targets)
    slope_targets, slope_skipped = choose_targets(model, method_from_yaml("slope"))
    assert not slope_skipped and set(slope_targets) == set(targets) | set(skipped)


def test_unknown_timm_model_is_one_line_naming_model_name():
    with pytest.raises(ConfigError, match=r"^model\.name='no_such_net' is not allowed"):
        timm_model("no_such_net", num_classes=10)


def test_a_model_without_declared_layers_is_an_error_naming_the_knob():
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match="method.compress_first"):
        target_names(plain)
    plain.first_layers = ["0"]
    with pytest.raises(ConfigError, match="method.compress_classifier"):
        target_names(plain)
    assert target_names(plain, compress_classifier=True) == ["2"]
    assert target_names(plain, compress_first=True, compress_classifier=True) == ["0", "2"]


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
