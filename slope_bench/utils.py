"""Small shared utilities: atomic writes, hashing, safetensors I/O."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"  # the Hydra config tree (conf/<group>/*.yaml)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder + ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600: give the usual umask-based mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its JSON header written in sorted key order.

    The Rust writer keeps ``__metadata__`` in a hash map, so identical inputs can give
    files that differ byte for byte; tensor offsets are relative to the data section, so
    re-writing the header (padded with spaces to a multiple of 8, as the format asks)
    changes nothing else.
    """
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + size :]


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _json_safe(value.tolist())
    return value


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (non-finite floats become null)."""
    atomic_write_bytes(path, (json.dumps(_json_safe(obj), indent=2, sort_keys=False) + "\n").encode())


def save_state(path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomically save a state dict as safetensors."""
    from safetensors.torch import save

    tensors = {k: state[k].detach().contiguous().cpu() for k in sorted(state)}
    atomic_write_bytes(path, canonical_safetensors(save(tensors, metadata=metadata)))


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def stable_hash(obj: Any, length: int = 12) -> str:
    """Short sha256 of a JSON-serialisable object (key order independent)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


NOISE = (
    "GPU available",
    "TPU available",
    "HPU available",
    "💡 Tip",
    "You are using a CUDA device",
    "LOCAL_RANK:",
)
NOISY_WARNINGS = (
    r".*anonymous setting.*",
    r".*_register_pytree_node.*",
    r".*pytree.*deprecated.*",
    r".*treespec.*deprecated.*",
    r".*validation_step.*",
    r".*does not have many workers.*",
    r".*The `srun` command is available.*",
)


class _DropNoise:
    """A logging filter dropping third-party lines that say nothing about the run."""

    def filter(self, record) -> bool:  # noqa: D102
        message = record.getMessage()
        return not any(message.startswith(prefix) for prefix in NOISE)


def quiet_third_party() -> None:
    """Silence the repeated accelerator lines and tips of Lightning and known harmless
    warnings (W&B's anonymous setting, pytree deprecation, no validation_step), so the
    console shows the run's own progress lines and results."""
    import logging
    import warnings

    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())
    for pattern in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
