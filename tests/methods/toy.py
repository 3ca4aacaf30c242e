"""A toy model and data shared by the method suites that run every ``conf/method/*.yaml``
(built with ``tests.conftest.method_from_yaml``).

The model declares its first layer and classifier (kept dense unless a method compresses
them), holds a depthwise convolution (OBC does not support it; the others do) and a layer
whose input size (6) is not divisible by ``m = 4`` (quantized, not pruned).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ODD_LAYER = "tail"  # input size 6: no N:M pattern applies
GROUPED_LAYER = "depthwise"


class Toy(nn.Module):
    first_layers = ["stem"]
    classifier_layers = ["fc"]

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, stride=2)
        self.odd = nn.Conv2d(16, 6, 1)
        self.tail = nn.Conv2d(6, 8, 1)
        self.fc = nn.Linear(8 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.depthwise(torch.relu(self.conv1(x))))
        x = torch.relu(self.odd(torch.relu(self.conv2(x))))
        return self.fc(torch.relu(self.tail(x)).flatten(1))


def toy_batches(count: int = 4, size: int = 16, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 8, 8, generator=generator), torch.randint(0, 10, (size,), generator=generator)) for _ in range(count)]


def task_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])
