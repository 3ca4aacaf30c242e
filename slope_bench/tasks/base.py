"""The Task interface: a LightningDataModule that also knows its loss and evaluator.

A task provides the data (train/val/test loaders, calibration batches, an example
input for FLOP counting), the training loss for a model, and the evaluator of its main
metric. Classification tasks share :class:`ClassificationTask`; detection tasks
(:class:`slope_bench.tasks.coco.CocoInstancesTask`) implement the same methods.

Shared here:

* the loader knobs every task takes (``batch_size``, ``eval_batch_size``,
  ``num_workers``, ``pin_memory``, ``persistent_workers``), checked in the constructor
  (:func:`check_loader_knobs`) and turned into DataLoaders by :func:`make_loader`;
* image decoding for tasks that read files: :func:`decode_image`, the seeded decode of a
  sample at setup (:func:`check_decodable`) and :class:`CorruptImages`, which records
  the files skipped during training (also from DataLoader worker processes) and backs
  every task's ``corrupt_images`` property.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import tempfile
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchmetrics.classification import MulticlassAccuracy

from slope_bench.errors import ConfigError, check_bool, check_int

log = logging.getLogger("slope_bench")

SPLITS = ("train", "val", "test")
EVAL_SPLITS = ("val", "test")
# Task knobs that change neither what is learned nor what is measured, so a cache key or a
# config hash may leave them out. (num_workers and persistent_workers are not among them:
# worker seeding changes the random augmentation draws of most tasks.)
RESULT_NEUTRAL_KNOBS = ("pin_memory", "check_images", "synthetic_root")
# What a broken image file raises while PIL opens and decodes it.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)
MAX_SKIPS = 64  # consecutive undecodable files a dataset skips before giving up


class DatasetError(RuntimeError):
    """A missing or malformed dataset: one line saying what was expected where."""


# ---------------------------------------------------------------------------- loader knobs
def check_loader_knobs(
    batch_size: Any, eval_batch_size: Any, num_workers: Any, pin_memory: Any = None, persistent_workers: Any = None
) -> dict[str, Any]:
    """The loader knobs, checked; ``None`` knobs resolved.

    Args:
        batch_size: training samples per step (>= 1).
        eval_batch_size: samples per evaluation batch (>= 1).
        num_workers: DataLoader worker processes (>= 0).
        pin_memory: page-locked host batches; ``None``: when CUDA is available.
        persistent_workers: keep workers between epochs; ``None``: when ``num_workers > 0``.

    Returns:
        ``{batch_size, eval_batch_size, num_workers, pin_memory, persistent_workers}``.

    Raises:
        ConfigError: naming the first bad knob (unprefixed: the run adds ``task.``).
    """
    knobs = {
        "batch_size": check_int("batch_size", batch_size, 1),
        "eval_batch_size": check_int("eval_batch_size", eval_batch_size, 1),
        "num_workers": check_int("num_workers", num_workers, 0),
    }
    if pin_memory is not None:
        check_bool("pin_memory", pin_memory)
    if persistent_workers is not None:
        check_bool("persistent_workers", persistent_workers)
        if persistent_workers and knobs["num_workers"] == 0:
            raise ConfigError("persistent_workers", persistent_workers, "false or null when num_workers=0 (no workers to keep)")
    knobs["pin_memory"] = torch.cuda.is_available() if pin_memory is None else pin_memory
    knobs["persistent_workers"] = knobs["num_workers"] > 0 if persistent_workers is None else persistent_workers
    return knobs


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    collate_fn: Callable | None = None,
    sampler: Sampler | None = None,
) -> DataLoader:
    """A DataLoader with the task's knobs; a shuffling loader draws from a generator seeded by ``seed``."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        generator=generator,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
        collate_fn=collate_fn,
        drop_last=False,
    )


# ---------------------------------------------------------------------------- image files
def decode_image(path: str | Path) -> Image.Image:
    """The RGB image of a file, fully decoded (a truncated file raises here, not later).

    Raises:
        One of :data:`DECODE_ERRORS` for a missing, truncated or unreadable file.
    """
    with Image.open(path) as image:
        return image.convert("RGB")


def first_line(error: BaseException) -> str:
    """``Type: first line of the message`` of an exception."""
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _remove_log(path: Path, owner: int) -> None:
    if os.getpid() == owner:
        path.unlink(missing_ok=True)


class CorruptImages:
    """Image files found undecodable (at setup or during training), skipped and counted.

    ``record`` logs one warning per file and process, and appends the path to a small
    log file in the system temp folder (one JSON string per line) so that files met by
    DataLoader worker processes — which hold a copy of this object — are seen by the
    main process too. ``paths`` merges the main process's list with the log. The log is
    created only when a file is recorded and removed when this object is collected (or
    at exit) in the process that made it.
    """

    def __init__(self) -> None:
        self.log_file = Path(tempfile.gettempdir()) / f"slope_bench-corrupt-{os.getpid()}-{uuid.uuid4().hex[:12]}.log"
        self.seen: list[str] = []
        weakref.finalize(self, _remove_log, self.log_file, os.getpid())

    def record(self, path: str | Path, error: BaseException, replacement: str = "the next sample") -> None:
        """Note an undecodable file (a warning naming it, once per file and process).

        Args:
            path: the file.
            error: what decoding it raised.
            replacement: what the dataset serves instead, for the warning.
        """
        path = str(path)
        if path in self.seen:
            return
        self.seen.append(path)
        log.warning("skipping a corrupt image: %s (%s); %s takes its place", path, first_line(error), replacement)
        try:
            with open(self.log_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(path) + "\n")
        except OSError:  # an unwritable temp folder only loses the workers' part of the count
            pass

    def paths(self) -> list[str]:
        """Every file recorded so far, by this process or its DataLoader workers (first seen first)."""
        found = list(self.seen)
        try:
            lines = self.log_file.read_text(encoding="utf-8").splitlines()
        except OSError:
            lines = []
        for line in lines:
            try:
                path = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a killed worker
                continue
            if isinstance(path, str) and path not in found:
                found.append(path)
        return found


def sample_indices(size: int, count: int, seed: int) -> list[int]:
    """``min(count, size)`` indices of ``range(size)``, drawn by ``seed``, sorted."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    return sorted(order[: min(count, size)].tolist())


def check_decodable(paths: Sequence[str | Path], count: int, seed: int, where: str, corrupt: CorruptImages | None = None) -> None:
    """Decode a seeded sample of ``count`` files of ``paths`` (the quick check at setup).

    A split whose sample mostly fails is not a few bad files but a broken folder (wrong
    format, truncated copy): more than half failing raises; fewer are recorded in
    ``corrupt`` (the datasets skip them during training).

    Args:
        paths: the split's image files.
        count: files to decode (0: no check).
        seed: draws the sample.
        where: the split and folder, for the message (``"imagenet train/ (/data/in/train)"``).
        corrupt: where the few failures are recorded.

    Raises:
        DatasetError: naming a failing file and the knob that turns the check off.
    """
    if count <= 0 or not paths:
        return
    picked = sample_indices(len(paths), count, seed)
    failures = []
    for i in picked:
        try:
            decode_image(paths[i])
        except DECODE_ERRORS as e:
            failures.append((str(paths[i]), e))
    if 2 * len(failures) > len(picked):
        path, error = failures[0]
        raise DatasetError(
            f"{where}: {len(failures)} of {len(picked)} sampled images do not decode, e.g. {path} ({first_line(error)}): "
            "expected readable image files (task.check_images=0 skips this check)"
        )
    for path, error in failures:
        if corrupt is not None:
            corrupt.record(path, error, "another sample")


def check_split(split: Any) -> str:
    """An evaluation split name: ``val`` or ``test``."""
    if split not in EVAL_SPLITS:
        raise ConfigError("split", split, "one of " + ", ".join(EVAL_SPLITS))
    return split


# ---------------------------------------------------------------------------- classification
class ClassificationTask(pl.LightningDataModule):
    """Base for image classification: top-1 via torchmetrics, cross-entropy loss.

    Subclasses fill ``self.train_set``, ``self.val_set``, ``self.test_set`` (datasets of
    ``(image, label)``) and ``self.calib_set`` (training images with eval transforms) in
    ``setup``, set ``num_classes``, ``in_chans``, ``image_size``, and may fill
    ``self.split_ids`` (see :meth:`split_members`). Tasks that read image files record
    the undecodable ones in ``self.corrupt``.

    Args:
        name: task name recorded in results.
        batch_size: training images per step.
        eval_batch_size: images per evaluation batch.
        num_workers: DataLoader worker processes.
        seed: the task's draws (validation carve, shuffling).
        pin_memory: page-locked batches (``None``: when CUDA is available).
        persistent_workers: keep workers alive between epochs (``None``: when ``num_workers > 0``).
    """

    main_metric = "top1"

    def __init__(
        self,
        name: str,
        batch_size: int = 128,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        seed: int = 0,
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
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.calib_set: Dataset | None = None
        self.split_ids: dict[str, list] = {}
        self.corrupt = CorruptImages()

    # ---- data ------------------------------------------------------------------------
    @property
    def num_train(self) -> int:
        self.setup()
        return len(self.train_set)

    @property
    def corrupt_images(self) -> list[str]:
        """Image files skipped as undecodable so far (empty for in-memory data sets)."""
        return self.corrupt.paths()

    def split_members(self) -> dict[str, set]:
        """Identifiers of the source samples of each split (``train``, ``val``, ``test``).

        The same identifier in two splits means the same source image (an index into
        the data set's arrays or a file path), so disjoint sets mean disjoint splits.
        """
        self.setup()
        return {split: set(self.split_ids.get(split, ())) for split in SPLITS}

    def _loader(self, dataset: Dataset, shuffle: bool, batch_size: int | None = None) -> DataLoader:
        return make_loader(
            dataset,
            batch_size or self.batch_size,
            shuffle=shuffle,
            seed=self.seed,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
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
        """Main metric (and any others) of ``model`` on ``split`` (``val`` or ``test``).

        Raises:
            ConfigError: ``split`` is neither ``val`` nor ``test``.
        """
        loader = self.test_dataloader() if check_split(split) == "test" else self.val_dataloader()
        return self.score(*self.logits(model, loader))
