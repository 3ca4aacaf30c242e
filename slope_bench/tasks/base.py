"""The Task interface: a LightningDataModule that also knows its loss and evaluator.

A task provides the data (train/val/test loaders, calibration batches, an example
input for FLOP counting), the training loss for a model, and the evaluator of its main
metric. Classification tasks share :class:`ClassificationTask`; detection tasks
implement the same methods.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchmetrics.classification import MulticlassAccuracy


class DatasetError(RuntimeError):
    """A missing or malformed dataset: one line saying what was expected where."""


class ClassificationTask(pl.LightningDataModule):
    """Base for image classification: top-1 via torchmetrics, cross-entropy loss.

    Subclasses fill ``self.train_set``, ``self.val_set``, ``self.test_set`` (datasets of
    ``(image, label)``) and ``self.calib_set`` (training images with eval transforms) in
    ``setup``, and set ``num_classes``, ``in_chans``, ``image_size``.
    """

    main_metric = "top1"

    def __init__(self, name: str, batch_size: int = 128, eval_batch_size: int = 512, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            from slope_bench.errors import ConfigError

            raise ConfigError("batch_size", batch_size, "an integer >= 1")
        self.name = name
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.calib_set: Dataset | None = None

    # ---- data ------------------------------------------------------------------------
    @property
    def num_train(self) -> int:
        self.setup()
        return len(self.train_set)

    def _loader(self, dataset: Dataset, shuffle: bool, batch_size: int | None = None) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=batch_size or self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            generator=generator,
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_set, shuffle=False, batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.test_set, shuffle=False, batch_size=self.eval_batch_size)

    def calib_batches(self, n_samples: int, passes: int = 1) -> list[torch.Tensor]:
        """Model inputs of ``n_samples`` training images (eval transforms), batched."""
        self.setup()
        n = min(n_samples, len(self.calib_set))
        g = torch.Generator().manual_seed(self.seed + 1)
        idx = torch.randperm(len(self.calib_set), generator=g)[:n].tolist()
        loader = self._loader(Subset(self.calib_set, idx), shuffle=False)
        return [self.inputs(b) for _ in range(passes) for b in loader]

    def example_input(self) -> torch.Tensor:
        """One input of batch size 1 (for FLOP counting)."""
        self.setup()
        return self.test_set[0][0].unsqueeze(0)

    # ---- model interface ---------------------------------------------------------------
    def inputs(self, batch) -> torch.Tensor:
        return batch[0]

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    @torch.no_grad()
    def logits(self, model: nn.Module, loader: Iterable) -> tuple[torch.Tensor, torch.Tensor]:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        out, targets = [], []
        for x, y in loader:
            out.append(model(x.to(device)).float().cpu())
            targets.append(y)
        model.train(was_training)
        return torch.cat(out), torch.cat(targets)

    def score(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        metric = MulticlassAccuracy(num_classes=self.num_classes, average="micro")
        return {"top1": float(metric(logits, targets))}

    def evaluate(self, model: nn.Module, split: str = "test") -> dict[str, float]:
        """Main metric (and any others) of ``model`` on ``split``."""
        loader = self.test_dataloader() if split == "test" else self.val_dataloader()
        return self.score(*self.logits(model, loader))
