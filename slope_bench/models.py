"""Models: plain ``nn.Module``s plus which layers to compress.

Every builder returns an ordinary module with two metadata attributes used by
:func:`target_names`: ``first_layers`` (kept dense unless the method compresses the
first layer) and ``classifier_layers`` (kept dense unless the method compresses the
classifier). Pretrained weights (torchvision) or a user checkpoint can be loaded.
"""

from __future__ import annotations

import functools
import itertools
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet

from slope_bench.errors import ConfigError, check_int

if TYPE_CHECKING:
    from slope_bench.methods.base import Compressor

COMPRESSIBLE = (nn.Conv2d, nn.Linear)


def declared_layers(model: nn.Module, attribute: str, knob: str) -> list[str]:
    """The layers a model declares as ``first_layers`` / ``classifier_layers``.

    Raises:
        ConfigError: naming ``knob`` when the model declares none, so that keeping them
            dense cannot silently fail (set the knob to ``true`` to compress them).
    """
    names = getattr(model, attribute, None)
    if names is None:
        raise ConfigError(knob, False, f"true: {type(model).__name__} declares no {attribute} (a builder in slope_bench.models sets them)")
    return list(names)


def target_names(model: nn.Module, compress_first: bool = False, compress_classifier: bool = False) -> list[str]:
    """Names of the Conv2d/Linear modules to compress, first layer and classifier kept
    dense unless asked for.

    Args:
        model: a model built by this module (carries ``first_layers`` /
            ``classifier_layers``).
        compress_first: include the first layer(s).
        compress_classifier: include the classifier / final predictors.

    Raises:
        ConfigError: a layer kind the model does not declare cannot be kept dense.
    """
    skip = set()
    if not compress_first:
        skip |= set(declared_layers(model, "first_layers", "method.compress_first"))
    if not compress_classifier:
        skip |= set(declared_layers(model, "classifier_layers", "method.compress_classifier"))
    return [n for n, m in model.named_modules() if isinstance(m, COMPRESSIBLE) and n not in skip and getattr(m, "weight", None) is not None]


def choose_targets(model: nn.Module, compressor: Compressor) -> tuple[list[str], dict[str, str]]:
    """The layers ``compressor`` will compress, and those it cannot (name → reason).

    Applies :func:`target_names` with the method's ``compress_first`` /
    ``compress_classifier``, then the method's ``supports`` filter; runs before any
    training.

    Raises:
        ConfigError: when the method supports none of the model's layers.
    """
    targets, skipped = [], {}
    for name in target_names(model, compressor.compress_first, compressor.compress_classifier):
        reason = compressor.supports(name, model.get_submodule(name))
        if reason is None:
            targets.append(name)
        else:
            skipped[name] = reason
    if skipped and not targets:
        first = next(iter(skipped.items()))
        raise ConfigError("method", compressor.name, f"a method that supports at least one layer of this model ({first[0]}: {first[1]})")
    return targets, skipped


def load_state(path: str | Path, key: str = "model.checkpoint") -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors, or a torch file with ``weights_only=True``.

    Lightning checkpoints (``state_dict`` with a ``model.`` prefix) are unwrapped.

    Raises:
        ConfigError: naming ``key`` when the file is missing, unreadable, or not a
            mapping of names to tensors.
    """
    path = Path(path)
    allowed = "a readable .safetensors/.pt/.ckpt state dict"
    if not path.is_file():
        raise ConfigError(key, str(path), f"{allowed} (no such file)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(
            key, str(path), f"{allowed} ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})"
        ) from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ConfigError(key, str(path), f"{allowed}: a mapping of names to tensors, got {type(state).__name__}")
    if any(k.startswith("model.") for k in state):
        state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    return state


def load_checkpoint(model: nn.Module, path: str | Path, key: str = "model.checkpoint") -> nn.Module:
    """Load a state dict for this exact model (every key, every shape).

    Raises:
        ConfigError: naming ``key``, with the first missing key or the first key whose
            shape differs (both shapes), in one line.
    """
    state = load_state(path, key)
    own = model.state_dict()
    for name, tensor in state.items():
        if name in own and own[name].shape != tensor.shape:
            raise ConfigError(
                key, str(path), f"a state dict of this model: {name} is {list(tensor.shape)} there, {list(own[name].shape)} here"
            )
    missing = [k for k in own if k not in state]
    if missing:
        raise ConfigError(key, str(path), f"a state dict of this model: it lacks {missing[0]} (and {len(missing) - 1} more)")
    model.load_state_dict(state, strict=False)
    return model


@functools.lru_cache(maxsize=64)
def conv_matrix_taps(
    height: int, width: int, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]
) -> tuple[torch.Tensor, int, int, bool]:
    """Which kernel tap links each input pixel to each output pixel of a convolution.

    A zero-padded convolution on an ``height × width`` map is the linear map
    ``y[o] = Σ_i W[tap(o, i)] x[i]`` (channels aside); on a 2×2 map a 3×3 kernel reaches
    each output through at most 4 taps, the rest lands on padding.

    Args:
        height: input map height, e.g. 2.
        width: input map width, e.g. 2.
        kernel: ``(kh, kw)``, e.g. ``(3, 3)``.
        stride: ``(sh, sw)``.
        padding: ``(ph, pw)`` zeros on each side.
        dilation: ``(dh, dw)``.

    Returns:
        ``(taps, out_height, out_width, complete)``: ``taps`` is ``(out pixels, in pixels)``
        with the flat tap index ``ky·kw + kx``, or ``kh·kw`` where no tap links the two;
        ``complete`` when every pair is linked (no ``kh·kw`` entry).
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    out_h = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    taps = torch.full((out_h * out_w, height * width), kh * kw, dtype=torch.long)
    for oy, ox, ky, kx in itertools.product(range(out_h), range(out_w), range(kh), range(kw)):
        iy, ix = oy * sh - ph + ky * dh, ox * sw - pw + kx * dw
        if 0 <= iy < height and 0 <= ix < width:
            taps[oy * out_w + ox, iy * width + ix] = ky * kw + kx
    return taps, out_h, out_w, bool((taps < kh * kw).all())


def conv2d_as_matrix(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, dilation)`` (zero padding, groups 1)
    as one product ``x.flatten(1) @ M``, ``M`` the convolution's ``(C·H·W, C_out·H_out·W_out)``
    matrix gathered from the kernel (:func:`conv_matrix_taps`).

    The same linear map, summed in another order (float32 rounding differs in the last
    bits). Worth it only on tiny maps, where ``M`` is small, e.g. ``x`` of shape
    ``(128, 64, 2, 2)`` and a ``(64, 64, 3, 3)`` kernel: ``M`` is ``256 × 256``.
    """
    n, channels, height, width = x.shape
    out_channels, _, kh, kw = weight.shape
    taps, out_h, out_w, complete = conv_matrix_taps(height, width, (kh, kw), stride, padding, dilation)
    kernel = weight.reshape(out_channels, channels, kh * kw)
    if not complete:  # a last, zero "tap" for the pairs no tap links
        kernel = torch.cat([kernel, kernel.new_zeros(out_channels, channels, 1)], 2)
    taps = taps.to(weight.device)
    matrix = kernel[:, :, taps].permute(1, 3, 0, 2).reshape(channels * height * width, out_channels * out_h * out_w)
    y = (x.reshape(n, -1) @ matrix).reshape(n, out_channels, out_h, out_w)
    return y if bias is None else y + bias.reshape(1, -1, 1, 1)


SMALL_MAP_PIXELS = 4  # maps of at most 2×2 train as a matrix product (measured in SmallMapConv2d)


class SmallMapConv2d(nn.Conv2d):
    """``nn.Conv2d`` that trains on maps of at most 2×2 pixels as one matrix product.

    On 8×8 inputs (digits) ResNet-18's last stages see 2×2 and 1×1 maps, where a 3×3
    convolution mostly reaches padding. On a CPU, oneDNN's backward still runs every
    tap: forward + backward of a 128→128 3×3 layer on a 1×1 map at batch 128 took
    6.6 ms, the same map as :func:`conv2d_as_matrix` 0.5–1 ms (64→64 on 2×2: 4.6 → 3.0 ms;
    at 4×4 the matrix is slower, and so is a 1×1 kernel: those keep the convolution).
    Only in training mode on a CPU, with zero padding and ``groups == 1``: evaluation,
    calibration and the MAC counter (``metrics.count_macs`` counts the full ``k×k``) run
    the convolution itself. Weights, state dict and parametrizations are those of
    ``nn.Conv2d``; ``torch.backends.mkldnn`` is not touched.
    """

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if (
            self.training
            and input.dim() == 4
            and input.device.type == "cpu"
            and input.shape[-2] * input.shape[-1] <= SMALL_MAP_PIXELS
            and self.kernel_size != (1, 1)
            and self.groups == 1
            and self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
        ):
            return conv2d_as_matrix(input, weight, bias, self.stride, self.padding, self.dilation)
        return super()._conv_forward(input, weight, bias)


def use_small_map_convs(model: nn.Module) -> nn.Module:
    """Make every plain ``nn.Conv2d`` of ``model`` a :class:`SmallMapConv2d` in place
    (its parameters, initialisation and hooks unchanged); returns ``model``."""
    for module in model.modules():
        if type(module) is nn.Conv2d:
            module.__class__ = SmallMapConv2d
    return model


class ResNet18(tv_resnet.ResNet):
    """torchvision's ResNet-18 with a width knob and an optional small-input stem.

    Keys match torchvision's ``resnet18`` state dict, so its weights load as they are.
    """

    def __init__(self, num_classes: int, in_chans: int = 3, width: int = 64, small_input: bool = False) -> None:
        super().__init__(tv_resnet.BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
        if width == 64 and in_chans == 3 and not small_input:
            return
        self.inplanes = width
        if small_input:
            self.conv1 = nn.Conv2d(in_chans, width, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_chans, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(tv_resnet.BasicBlock, width, 2)
        self.layer2 = self._make_layer(tv_resnet.BasicBlock, 2 * width, 2, stride=2)
        self.layer3 = self._make_layer(tv_resnet.BasicBlock, 4 * width, 2, stride=2)
        self.layer4 = self._make_layer(tv_resnet.BasicBlock, 8 * width, 2, stride=2)
        self.fc = nn.Linear(8 * width, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


def resnet18(
    num_classes: int,
    in_chans: int = 3,
    image_size: int = 224,
    width: int = 64,
    small_input: bool | None = None,
    pretrained: bool = False,
    checkpoint: str | None = None,
    name: str = "resnet18",
) -> nn.Module:
    """ResNet-18 (BasicBlock ×[2, 2, 2, 2]) with a width knob.

    Args:
        num_classes: classifier outputs.
        name: the model's name as recorded in results.json (the yaml's ``name``).
        in_chans: input channels.
        image_size: input side; decides the stem when ``small_input`` is None.
        width: base channels (64 is the standard network; stages use w, 2w, 4w, 8w).
        small_input: 3×3 stride-1 first conv and no max-pool (CIFAR-style); default
            ``image_size <= 64``.
        pretrained: load torchvision's ImageNet weights (width 64 only; a small-input
            stem and a resized classifier stay randomly initialised).
        checkpoint: a state dict file for this exact model.
    """
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ConfigError("model.width", width, "an integer >= 1")
    if small_input is None:
        small_input = image_size <= 64
    model = use_small_map_convs(ResNet18(num_classes, in_chans, width, small_input))
    if pretrained:
        if width != 64:
            raise ConfigError("model.pretrained", pretrained, "false when model.width != 64 (weights exist for width 64)")
        state = tv_resnet.ResNet18_Weights.DEFAULT.get_state_dict(progress=True)
        own = model.state_dict()
        model.load_state_dict({k: v for k, v in state.items() if k in own and own[k].shape == v.shape}, strict=False)
    model.first_layers = ["conv1"]
    model.classifier_layers = ["fc"]
    if checkpoint:
        load_checkpoint(model, checkpoint)
    return model


# ---------------------------------------------------------------------------- ViT-S
VIT_SMALL = {"embed_dim": 384, "depth": 12, "num_heads": 6, "patch_size": 16}


def default_patch_size(image_size: int) -> int:
    """ViT patch side for an input side: 16 from 128 px up (ViT-S/16), otherwise
    ``image_size // 4`` so that small inputs give 4 × 4 = 16 tokens (8 px digits → 2)."""
    return 16 if image_size >= 128 else max(image_size // 4, 1)


def vit_small(
    num_classes: int,
    in_chans: int = 3,
    image_size: int = 224,
    patch_size: int | None = None,
    embed_dim: int = 384,
    depth: int = 12,
    num_heads: int = 6,
    mlp_ratio: float = 4.0,
    drop_path_rate: float = 0.1,
    fused_attention: bool = False,
    pretrained: bool = False,
    checkpoint: str | None = None,
    name: str = "vit_small",
) -> nn.Module:
    """timm's ViT-S (embed 384, depth 12, 6 heads) sized to the task's input.

    Targets are the attention (``qkv``, ``proj``) and MLP (``fc1``, ``fc2``) linears of
    every block; the patch embedding ``patch_embed.proj`` is the first layer and
    ``head`` the classifier (both kept dense unless the method says otherwise).

    Args:
        num_classes: classifier outputs.
        name: the model's name as recorded in results.json (the yaml's ``name``).
        in_chans: input channels.
        image_size: input side (square).
        patch_size: patch side; ``None`` picks :func:`default_patch_size`.
        embed_dim: token width (384 for ViT-S); must be divisible by ``num_heads``.
        depth: number of transformer blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width over ``embed_dim``.
        drop_path_rate: stochastic depth rate (DeiT-S uses 0.1).
        fused_attention: use ``scaled_dot_product_attention`` (faster on GPUs). Off by
            default: the explicit ``q @ kᵀ`` / ``attn @ v`` matmuls are what
            ``FlopCounterMode`` counts on a CPU, so BOPs include the attention matmuls.
        pretrained: load timm's ImageNet ViT-S/16 weights (downloaded from the Hugging
            Face hub; only where the user has them). Needs the ViT-S shape and patch 16;
            the position embedding is resampled to ``image_size``.
        checkpoint: a state dict file for this exact model.
    """
    from timm.models.vision_transformer import VisionTransformer

    for key, value in (("model.embed_dim", embed_dim), ("model.depth", depth), ("model.num_heads", num_heads), ("image_size", image_size)):
        check_int(key, value, 1)
    if embed_dim % num_heads:
        raise ConfigError("model.num_heads", num_heads, f"a divisor of model.embed_dim={embed_dim}")
    if patch_size is None:
        patch_size = default_patch_size(image_size)
    check_int("model.patch_size", patch_size, 1)
    if image_size % patch_size:
        raise ConfigError("model.patch_size", patch_size, f"a divisor of the task's image size {image_size}")
    if not isinstance(mlp_ratio, (int, float)) or isinstance(mlp_ratio, bool) or mlp_ratio <= 0:
        raise ConfigError("model.mlp_ratio", mlp_ratio, "a number > 0")
    if not isinstance(drop_path_rate, (int, float)) or not 0 <= drop_path_rate < 1:
        raise ConfigError("model.drop_path_rate", drop_path_rate, "a number in [0, 1)")
    shape = {"embed_dim": embed_dim, "depth": depth, "num_heads": num_heads, "patch_size": patch_size}
    if pretrained and shape != VIT_SMALL:
        raise ConfigError("model.pretrained", pretrained, f"false unless the model is ViT-S/16 ({VIT_SMALL}); got {shape}")
    if pretrained:
        import timm

        model = timm.create_model(
            "vit_small_patch16_224.augreg_in21k_ft_in1k",
            pretrained=True,
            num_classes=num_classes,
            in_chans=in_chans,
            img_size=image_size,
            drop_path_rate=drop_path_rate,
        )
    else:
        model = VisionTransformer(
            img_size=image_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=float(mlp_ratio),
            drop_path_rate=float(drop_path_rate),
        )
    for block in model.blocks:
        block.attn.fused_attn = bool(fused_attention)
    model.first_layers = ["patch_embed.proj"]
    model.classifier_layers = ["head"]
    if checkpoint:
        load_checkpoint(model, checkpoint)
    return model


# ---------------------------------------------------------------------------- any timm classifier
def timm_model(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    image_size: int = 224,
    pretrained: bool = False,
    checkpoint: str | None = None,
    **overrides,
) -> nn.Module:
    """Any timm classification model, named by its timm name: a new model is one yaml.

    Example ``conf/model/mobilenetv3_small_100.yaml``::

        _target_: slope_bench.models.timm_model
        name: mobilenetv3_small_100

    The first layer and the classifier (kept dense unless the method says otherwise)
    come from timm's ``pretrained_cfg`` (``first_conv``, ``classifier``); when a model's
    config does not name them, or names a module the model does not have, they are
    left undeclared and a method that would keep them dense stops with an error naming
    ``method.compress_first`` / ``method.compress_classifier`` (never a silent default).

    Args:
        name: the timm model name (also the name recorded in results.json).
        num_classes: classifier outputs.
        in_chans: input channels.
        image_size: the task's input side (timm's models adapt to it through global
            pooling; a model that needs it, such as a ViT, gets it via ``img_size`` in
            ``overrides``).
        pretrained: load timm's pretrained weights (hub download; only where the user has them).
        checkpoint: a state dict file for this exact model.
        **overrides: further ``timm.create_model`` keyword arguments from the yaml
            (e.g. ``drop_rate``, width-like knobs where the model has them).

    Raises:
        ConfigError: naming ``model.name`` when timm has no such model.
    """
    import timm

    if not isinstance(name, str) or not timm.is_model(name):
        close = timm.list_models(f"*{str(name).split('_')[0]}*")[:5] if isinstance(name, str) else []
        hint = f" (e.g. {', '.join(close)})" if close else ""
        raise ConfigError("model.name", name, f"a timm model name{hint}")
    check_int("num_classes", num_classes, 1)
    check_int("in_chans", in_chans, 1)
    model = timm.create_model(name, pretrained=bool(pretrained), num_classes=num_classes, in_chans=in_chans, **overrides)
    modules = dict(model.named_modules())
    config = getattr(model, "pretrained_cfg", None) or {}
    for attribute, key in (("first_layers", "first_conv"), ("classifier_layers", "classifier")):
        named = config.get(key)
        names = [named] if isinstance(named, str) else list(named or [])
        names = [n for n in names if isinstance(modules.get(n), COMPRESSIBLE)]
        if names:
            setattr(model, attribute, names)
    if checkpoint:
        load_checkpoint(model, checkpoint)
    return model


# ---------------------------------------------------------------------------- Mask R-CNN
RESNET_LAYOUTS = {
    "resnet18": ("basic", [2, 2, 2, 2]),
    "resnet34": ("basic", [3, 4, 6, 3]),
    "resnet50": ("bottleneck", [3, 4, 6, 3]),
    "resnet101": ("bottleneck", [3, 4, 23, 3]),
}
MASKRCNN_BACKBONES = tuple(RESNET_LAYOUTS)
MASKRCNN_PREDICTORS = ["roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred", "roi_heads.mask_predictor.mask_fcn_logits"]
COCO_ANCHOR_SIZES = (32, 64, 128, 256, 512)


def resnet_body(backbone: str, in_chans: int = 3, width: int = 64, norm: str = "batch", pretrained: bool = False) -> nn.Module:
    """torchvision's ResNet with a width knob: the body of the Mask R-CNN backbone.

    At ``width=64`` and 3 channels it is exactly torchvision's network (so its ImageNet
    and COCO Mask R-CNN weights load as they are); otherwise the stem and the four
    stages are rebuilt with ``width, 2·width, 4·width, 8·width`` channels (×4 outputs
    for bottleneck blocks) and torchvision's initialisation.

    Args:
        backbone: ``resnet18``, ``resnet34``, ``resnet50`` or ``resnet101``.
        in_chans: image channels.
        width: stem and first-stage channels.
        norm: ``batch`` (BatchNorm2d) or ``frozen`` (torchvision's FrozenBatchNorm2d).
        pretrained: load torchvision's ImageNet weights (width 64 only).
    """
    from torchvision.models import resnet as tv_resnet
    from torchvision.ops import FrozenBatchNorm2d

    kind, layers = RESNET_LAYOUTS[backbone]
    block = tv_resnet.BasicBlock if kind == "basic" else tv_resnet.Bottleneck
    norm_layer = FrozenBatchNorm2d if norm == "frozen" else nn.BatchNorm2d
    body = tv_resnet.ResNet(block, layers, norm_layer=norm_layer)
    if width != 64 or in_chans != 3:
        body.inplanes = width
        body.conv1 = nn.Conv2d(in_chans, width, kernel_size=7, stride=2, padding=3, bias=False)
        body.bn1 = norm_layer(width)
        body.layer1 = body._make_layer(block, width, layers[0])
        body.layer2 = body._make_layer(block, 2 * width, layers[1], stride=2)
        body.layer3 = body._make_layer(block, 4 * width, layers[2], stride=2)
        body.layer4 = body._make_layer(block, 8 * width, layers[3], stride=2)
        for module in body.modules():  # torchvision's initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)
    body.fc = nn.Identity()
    if pretrained:
        import torchvision

        state = torchvision.models.get_model_weights(backbone).DEFAULT.get_state_dict(progress=True)
        state = {k: v for k, v in state.items() if not k.startswith("fc.") and (in_chans == 3 or not k.startswith("conv1."))}
        body.load_state_dict(state, strict=False)
    return body


def maskrcnn(
    num_classes: int,
    in_chans: int = 3,
    image_size: int = 800,
    backbone: str = "resnet50",
    backbone_width: int = 64,
    pretrained: bool = False,
    pretrained_backbone: bool = False,
    checkpoint: str | None = None,
    norm: str | None = None,
    trainable_backbone_layers: int = 5,
    min_size: int | None = None,
    max_size: int | None = None,
    fpn_channels: int = 256,
    anchor_sizes: list[int] | None = None,
    rpn_pre_nms_top_n_train: int = 2000,
    rpn_post_nms_top_n_train: int = 2000,
    rpn_pre_nms_top_n_test: int = 1000,
    rpn_post_nms_top_n_test: int = 1000,
    rpn_batch_size_per_image: int = 256,
    box_batch_size_per_image: int = 512,
    box_detections_per_img: int = 100,
    box_score_thresh: float = 0.05,
    box_head_dim: int = 1024,
    mask_head_channels: int = 256,
    mask_head_layers: int = 4,
    name: str = "maskrcnn",
) -> nn.Module:
    """torchvision Mask R-CNN with a ResNet-FPN backbone (R50-FPN by default, the papers' setting).

    The ResNet body is torchvision's, with a width knob (:func:`resnet_body`).

    Every knob defaults to torchvision's ``maskrcnn_resnet50_fpn``; the embedded task
    shrinks the backbone (``resnet18``), the FPN/head widths, the sampled ROIs, the
    proposals and the detections per image for CPU-sized runs. Targets are every
    Conv2d/Linear of the backbone, FPN, RPN and ROI heads; ``backbone.body.conv1`` is the
    first layer and the three final predictors (class scores, box deltas, mask logits)
    are the classifier layers.

    Args:
        name: the model's name as recorded in results.json (the yaml's ``name``).
        num_classes: outputs of the predictors, background included (COCO: 91, the
            category ids as labels).
        in_chans: image channels (the first conv is rebuilt when not 3).
        image_size: the task's nominal image side: default ``min_size``.
        backbone: one of ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101``.
        backbone_width: ResNet stem/first-stage channels (64: the standard network;
            narrower bodies for CPU-sized runs, see :func:`resnet_body`).
        pretrained: torchvision's COCO Mask R-CNN weights (``resnet50`` with the default
            widths only; downloaded, so only where the user has them). Predictors are
            re-initialised when ``num_classes != 91``.
        pretrained_backbone: torchvision's ImageNet weights for the ResNet body.
        checkpoint: a state dict file for this exact model.
        norm: ``batch`` (BatchNorm2d) or ``frozen`` (FrozenBatchNorm2d) in the body;
            ``None``: frozen with pretrained weights, batch otherwise (torchvision's rule).
        trainable_backbone_layers: ResNet stages left trainable, 0..5 (5: all).
        min_size: GeneralizedRCNNTransform's shorter-side target; ``None``: ``image_size``.
        max_size: longer-side cap; ``None``: ``image_size * 1333 / 800``.
        fpn_channels: FPN width (256 in the paper setting).
        anchor_sizes: one anchor size per FPN level (5 values); ``None``: 32..512.
        rpn_pre_nms_top_n_train: RPN proposals kept before NMS, training.
        rpn_post_nms_top_n_train: RPN proposals kept after NMS, training.
        rpn_pre_nms_top_n_test: RPN proposals kept before NMS, evaluation.
        rpn_post_nms_top_n_test: RPN proposals kept after NMS, evaluation.
        rpn_batch_size_per_image: anchors sampled per image for the RPN loss.
        box_batch_size_per_image: ROIs sampled per image for the box/mask heads.
        box_detections_per_img: cap on detections per image at evaluation.
        box_score_thresh: minimum detection score at evaluation.
        box_head_dim: width of the two-layer MLP box head.
        mask_head_channels: width of the mask head convs and of the mask predictor.
        mask_head_layers: number of 3×3 convs in the mask head.
    """
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.models.detection.rpn import AnchorGenerator
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    if backbone not in MASKRCNN_BACKBONES:
        raise ConfigError("model.backbone", backbone, "one of " + ", ".join(MASKRCNN_BACKBONES))
    ints = {
        "model.backbone_width": backbone_width,
        "model.fpn_channels": fpn_channels,
        "model.rpn_pre_nms_top_n_train": rpn_pre_nms_top_n_train,
        "model.rpn_post_nms_top_n_train": rpn_post_nms_top_n_train,
        "model.rpn_pre_nms_top_n_test": rpn_pre_nms_top_n_test,
        "model.rpn_post_nms_top_n_test": rpn_post_nms_top_n_test,
        "model.rpn_batch_size_per_image": rpn_batch_size_per_image,
        "model.box_batch_size_per_image": box_batch_size_per_image,
        "model.box_detections_per_img": box_detections_per_img,
        "model.box_head_dim": box_head_dim,
        "model.mask_head_channels": mask_head_channels,
        "model.mask_head_layers": mask_head_layers,
        "num_classes": num_classes,
        "in_chans": in_chans,
        "image_size": image_size,
    }
    for key, value in ints.items():
        check_int(key, value, 1)
    if isinstance(trainable_backbone_layers, bool) or trainable_backbone_layers not in range(6):
        raise ConfigError("model.trainable_backbone_layers", trainable_backbone_layers, "an integer in 0..5")
    min_size = check_int("model.min_size", image_size if min_size is None else min_size, 1)
    max_size = check_int("model.max_size", max(round(image_size * 1333 / 800), min_size) if max_size is None else max_size, 1)
    anchors = tuple(COCO_ANCHOR_SIZES if anchor_sizes is None else anchor_sizes)
    if len(anchors) != 5 or not all(isinstance(a, int) and not isinstance(a, bool) and a > 0 for a in anchors):
        raise ConfigError("model.anchor_sizes", anchor_sizes, "null or 5 positive integers (one anchor size per FPN level)")
    if not isinstance(box_score_thresh, (int, float)) or not 0 <= box_score_thresh < 1:
        raise ConfigError("model.box_score_thresh", box_score_thresh, "a number in [0, 1)")
    if norm is None:
        norm = "frozen" if pretrained or pretrained_backbone else "batch"
    if norm not in ("batch", "frozen"):
        raise ConfigError("model.norm", norm, "null, batch or frozen")
    if pretrained_backbone and backbone_width != 64:
        raise ConfigError(
            "model.pretrained_backbone", pretrained_backbone, "false when model.backbone_width != 64 (weights exist for width 64)"
        )
    paper_shape = (
        backbone == "resnet50"
        and backbone_width == 64
        and fpn_channels == 256
        and box_head_dim == 1024
        and mask_head_channels == 256
        and mask_head_layers == 4
        and in_chans == 3
    )
    if pretrained and not paper_shape:
        raise ConfigError(
            "model.pretrained",
            pretrained,
            "false unless the model is the R50-FPN of torchvision (backbone=resnet50, width 64, fpn 256, box head 1024, mask head 4x256, 3 channels)",
        )

    body = resnet_body(backbone, in_chans, backbone_width, norm, pretrained_backbone and not pretrained)
    stages = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_backbone_layers]
    if trainable_backbone_layers == 5:
        stages.append("bn1")
    for name, parameter in body.named_parameters():
        if all(not name.startswith(stage) for stage in stages):
            parameter.requires_grad_(False)
    expansion = 4 if RESNET_LAYOUTS[backbone][0] == "bottleneck" else 1
    fpn = BackboneWithFPN(
        body,
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        in_channels_list=[backbone_width * 2**i * expansion for i in range(4)],
        out_channels=fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )
    resolution = 7  # MultiScaleRoIAlign output of the box branch (torchvision default)
    model = MaskRCNN(
        fpn,
        num_classes=None,
        min_size=min_size,
        max_size=max_size,
        image_mean=[0.485, 0.456, 0.406] if in_chans == 3 else [0.5] * in_chans,
        image_std=[0.229, 0.224, 0.225] if in_chans == 3 else [0.25] * in_chans,
        rpn_anchor_generator=AnchorGenerator(tuple((a,) for a in anchors), ((0.5, 1.0, 2.0),) * len(anchors)),
        rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=rpn_batch_size_per_image,
        box_batch_size_per_image=box_batch_size_per_image,
        box_detections_per_img=box_detections_per_img,
        box_score_thresh=float(box_score_thresh),
        box_head=TwoMLPHead(fpn_channels * resolution**2, box_head_dim),
        box_predictor=FastRCNNPredictor(box_head_dim, num_classes),
        mask_head=MaskRCNNHeads(fpn_channels, [mask_head_channels] * mask_head_layers, 1),
        mask_predictor=MaskRCNNPredictor(mask_head_channels, mask_head_channels, num_classes),
    )
    if pretrained:
        from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

        state = MaskRCNN_ResNet50_FPN_Weights.COCO_V1.get_state_dict(progress=True)
        if num_classes != 91:
            state = {k: v for k, v in state.items() if not any(k.startswith(p + ".") for p in MASKRCNN_PREDICTORS)}
        model.load_state_dict(state, strict=False)
    model.first_layers = ["backbone.body.conv1"]
    model.classifier_layers = list(MASKRCNN_PREDICTORS)
    if checkpoint:
        load_checkpoint(model, checkpoint)
    return model
