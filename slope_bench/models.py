"""Models: plain ``nn.Module``s plus which layers to compress.

Every builder returns an ordinary module with two metadata attributes used by
:func:`target_names`: ``first_layers`` (kept dense unless the method compresses the
first layer) and ``classifier_layers`` (kept dense unless the method compresses the
classifier). Pretrained weights (torchvision) or a user checkpoint can be loaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from slope_bench.errors import ConfigError

COMPRESSIBLE = (nn.Conv2d, nn.Linear)


def target_names(model: nn.Module, compress_first: bool = False, compress_classifier: bool = False) -> list[str]:
    """Names of the Conv2d/Linear modules to compress.

    Args:
        model: a model built by this module (carries ``first_layers`` /
            ``classifier_layers``; plain modules are treated as having none).
        compress_first: include the first layer(s).
        compress_classifier: include the classifier / final predictors.
    """
    skip = set()
    if not compress_first:
        skip |= set(getattr(model, "first_layers", []))
    if not compress_classifier:
        skip |= set(getattr(model, "classifier_layers", []))
    return [n for n, m in model.named_modules() if isinstance(m, COMPRESSIBLE) and n not in skip and getattr(m, "weight", None) is not None]


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors, or a torch file with ``weights_only=True``.

    Lightning checkpoints (``state_dict`` with a ``model.`` prefix) are unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError("model.checkpoint", str(path), "an existing .safetensors/.pt/.ckpt file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if any(k.startswith("model.") for k in state):
        state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    return state


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    state = load_state(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing:
        raise ConfigError("model.checkpoint", str(path), f"a state dict for this model (missing {missing[:3]}...)")
    return model


def resnet18(
    num_classes: int,
    in_chans: int = 3,
    image_size: int = 224,
    width: int = 64,
    small_input: bool | None = None,
    pretrained: bool = False,
    checkpoint: str | None = None,
) -> nn.Module:
    """ResNet-18 (BasicBlock ×[2, 2, 2, 2]) with a width knob.

    Args:
        num_classes: classifier outputs.
        in_chans: input channels.
        image_size: input side; decides the stem when ``small_input`` is None.
        width: base channels (64 is the standard network; stages use w, 2w, 4w, 8w).
        small_input: 3×3 stride-1 first conv and no max-pool (CIFAR-style); default
            ``image_size <= 64``.
        pretrained: load torchvision's ImageNet weights (width 64 only; the
            small-input stem and a resized classifier stay randomly initialised).
        checkpoint: a state dict file for this exact model.
    """
    from timm.models.resnet import BasicBlock, ResNet

    if not isinstance(width, int) or width < 1:
        raise ConfigError("model.width", width, "an integer >= 1")
    model = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, in_chans=in_chans, stem_width=width, channels=(width, 2 * width, 4 * width, 8 * width))
    if small_input is None:
        small_input = image_size <= 64
    if pretrained:
        if width != 64:
            raise ConfigError("model.pretrained", pretrained, "false when model.width != 64 (weights exist for width 64)")
        from torchvision.models import ResNet18_Weights

        state = ResNet18_Weights.DEFAULT.get_state_dict(progress=True)
        if num_classes != 1000 or in_chans != 3:
            state = {k: v for k, v in state.items() if not k.startswith("fc.") and (in_chans == 3 or not k.startswith("conv1."))}
        model.load_state_dict(state, strict=False)
    if small_input:
        model.conv1 = nn.Conv2d(in_chans, width, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    model.first_layers = ["conv1"]
    model.classifier_layers = ["fc"]
    if checkpoint:
        load_checkpoint(model, checkpoint)
    return model
