"""One validation pass over a composed config, before any work.

Every value that a constructor, a loader or Lightning would check later is checked here
first, and a bad one stops the run with one line naming the key and what is allowed
(:class:`~slope_bench.errors.ConfigError`; the CLI prints it and exits 2, writing
nothing):

* the seed (an integer in 0 … 2³²−1) and the run's own knobs (``dense``, ``finetune``,
  ``control``, ``divergence``, ``val_every``, ``resume``, ``checkpoint_every``);
* unknown top-level keys and unknown keys of the plain blocks (``+foo=1``);
* the run's own trainer knob ``trainer.channels_last`` (a boolean; whether the model can
  take it is checked by :func:`check_channels_last` as soon as the model is built, still
  before any work);
* every instantiated group (``task``, ``model``, ``method``, ``trainer``): keys the
  target does not take (``method=codeq method.n=2`` lists CoDeQ's knobs), and values of
  the wrong type for the target's annotations (``task.batch_size=abc``);
* the run directory can be written.

Value ranges specific to one class (``method.w_bits=9``) stay in its constructor, which
runs right after, still before any training.
"""

from __future__ import annotations

import inspect
import os
import tempfile
import types
import typing
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from slope_bench.errors import ConfigError, check_bool, check_int, check_range
from slope_bench.utils import CONF_DIR

SEED_MAX = 2**32 - 1
# keys the run passes to a group's target itself, or reads without passing them on
PASSED_BY_RUN = {"task": ("seed",), "model": ("num_classes", "in_chans", "image_size")}
NOT_PASSED = {"model": ("dense_lr", "finetune_lr"), "method": ("search",), "trainer": ("channels_last",)}
GROUPS_TO_CHECK = ("task", "model", "method", "trainer")
PLAIN_BLOCKS = ("dense", "finetune", "control", "divergence")
SIMPLE = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}


def validate(cfg: DictConfig) -> None:
    """Check ``cfg`` as described in the module docstring.

    Raises:
        ConfigError: the first bad value, naming its key and what is allowed.
    """
    check_int("seed", cfg.get("seed"), 0, SEED_MAX)
    check_known_keys(cfg)
    check_run_knobs(cfg)
    for group in GROUPS_TO_CHECK:
        if isinstance(cfg.get(group), DictConfig) and "_target_" in cfg[group]:
            check_arguments(group, cfg[group])
    if isinstance(cfg.get("method"), DictConfig):
        check_search_space(cfg.method)
    if cfg.get("paths") is not None and cfg.paths.get("output_dir"):
        check_writable("paths.output_dir", Path(cfg.paths.output_dir))


def base_config() -> DictConfig:
    """``conf/config.yaml`` as written (no defaults applied)."""
    return OmegaConf.load(CONF_DIR / "config.yaml")


def check_known_keys(cfg: DictConfig) -> None:
    """No top-level key and no key of a plain block that the base config does not define."""
    base = base_config()
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    known = (set(base.keys()) - {"defaults"}) | groups | {"hydra"}
    for key in cfg.keys():
        if key not in known:
            raise ConfigError(str(key), cfg.get(key), "a known top-level key: " + ", ".join(sorted(known - {"hydra"})))
    for block in PLAIN_BLOCKS:
        if block in base and isinstance(cfg.get(block), DictConfig):
            allowed = set(base[block].keys())
            for key in cfg[block].keys():
                if key not in allowed:
                    raise ConfigError(f"{block}.{key}", cfg[block].get(key), f"a key of {block}: {', '.join(sorted(allowed))}")


def check_run_knobs(cfg: DictConfig) -> None:
    """The run's own knobs (outside any instantiated group)."""
    check_int("dense.epochs", cfg.dense.epochs, 0)
    check_range("dense.lr", cfg.dense.lr, 0.0, low_open=True)
    check_bool("dense.cache", cfg.dense.cache)
    check_int("finetune.epochs", cfg.finetune.epochs, 0)
    check_range("finetune.lr", cfg.finetune.lr, 0.0, low_open=True)
    check_bool("control.dense_ft", cfg.control.dense_ft)
    check_int("val_every", cfg.get("val_every", 1), 0)
    check_bool("resume", cfg.get("resume", False))
    check_int("checkpoint_every", cfg.get("checkpoint_every", 1), 0)
    if isinstance(cfg.get("trainer"), DictConfig):
        check_bool("trainer.channels_last", cfg.trainer.get("channels_last", False))
    check_objectives(cfg.get("objectives"))
    if cfg.get("divergence") is not None:
        check_range("divergence.loss_factor", cfg.divergence.loss_factor, 1.0, low_open=True)
        check_bool("divergence.at_chance", cfg.divergence.at_chance)


def check_channels_last(model: Any, enabled: bool, name: str = "the model") -> None:
    """``trainer.channels_last=true`` only for a convolutional network.

    ``torch.channels_last`` lays out 4-D tensors (NCHW as NHWC): it pays off when image
    batches run through a chain of ``Conv2d`` layers. A model with no ``Conv2d``, or whose
    only convolutions are its declared first layers (a ViT's patch embedding, after which
    everything is tokens), has no such chain, and the knob is refused.

    Raises:
        ConfigError: naming ``trainer.channels_last``.
    """
    if not enabled:
        return
    from torch import nn

    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    first = set(getattr(model, "first_layers", []) or [])
    if not convs:
        why = "it has no Conv2d layer"
    elif all(n in first for n in convs):
        why = f"its only Conv2d is its first layer ({', '.join(convs)}), after which it runs on tokens"
    else:
        return
    raise ConfigError("trainer.channels_last", True, f"false for {name}: {why} (channels_last is for convolutional networks)")


def check_objectives(objectives: Any) -> None:
    """What a sweeper optimises: result keys, never ``test/*`` (tuning reads validation data only)."""
    for key in objectives or []:
        if not isinstance(key, str) or key.startswith("test/") or "/" not in key:
            value = OmegaConf.to_container(objectives) if isinstance(objectives, ListConfig) else objectives
            raise ConfigError("objectives", value, "result keys other than test/* (e.g. val/main, compress/ratio)")


def target_signature(node: DictConfig) -> inspect.Signature | None:
    """The signature of a node's ``_target_`` (``None`` when it cannot be found)."""
    from hydra.utils import get_method

    try:
        target = get_method(node._target_)
    except Exception:
        return None
    try:
        return inspect.signature(target.__init__ if inspect.isclass(target) else target)
    except (TypeError, ValueError):
        return None


def type_hints(node: DictConfig) -> dict[str, Any]:
    """Resolved annotations of the target's parameters (empty when they cannot be resolved)."""
    from hydra.utils import get_method

    try:
        target = get_method(node._target_)
        return typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:
        return {}


def check_arguments(group: str, node: DictConfig) -> None:
    """Keys the target takes, with values of the annotated types."""
    signature = target_signature(node)
    if signature is None:
        return
    params = {n: p for n, p in signature.parameters.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL,)}
    open_kwargs = any(p.kind == p.VAR_KEYWORD for p in params.values())
    named = [n for n, p in params.items() if p.kind != p.VAR_KEYWORD and n not in PASSED_BY_RUN.get(group, ()) and n != "name"]
    hints = type_hints(node)
    for key in node.keys():
        if str(key).startswith("_") or key in NOT_PASSED.get(group, ()) or key == "defaults":
            continue
        if key not in params or key in PASSED_BY_RUN.get(group, ()):
            if open_kwargs and key not in PASSED_BY_RUN.get(group, ()):
                continue
            owner = node.get("name", group) if group == "method" else group
            raise ConfigError(f"{group}.{key}", node.get(key), f"a knob of {owner}: {', '.join(named)}")
        value = node.get(key)
        allowed = allowed_types(hints.get(key))
        if group == "method" and key == "search":
            continue
        if allowed is not None and not matches(value, allowed):
            raise ConfigError(f"{group}.{key}", value, " or ".join(dict.fromkeys(SIMPLE.get(t, t.__name__) for t in allowed)))


def check_search_space(node: DictConfig) -> None:
    """Every knob of ``method.search`` is a knob of the method, never a compression knob."""
    search = node.get("search")
    if not search:
        return
    signature = target_signature(node)
    knobs = set() if signature is None else {n for n in signature.parameters if n not in ("self", "name")}
    for key in search.keys():
        if signature is not None and key not in knobs:
            raise ConfigError(
                f"method.search.{key}", search.get(key), f"a search over knobs of {node.get('name')}: {', '.join(sorted(knobs))}"
            )
        if key in ("n", "m", "w_bits"):
            raise ConfigError(
                f"method.search.{key}", search.get(key), "a search over training knobs (compression knobs n, m, w_bits stay fixed)"
            )


def allowed_types(annotation: Any) -> tuple[type, ...] | None:
    """The simple types an annotation admits (``None``: not a simple annotation, unchecked)."""
    if annotation is None:
        return None
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [allowed_types(a) for a in typing.get_args(annotation)]
        if any(m is None for m in members):
            return None
        return tuple(t for m in members for t in m)
    if annotation in SIMPLE:
        return (annotation,)
    if origin in (list, tuple) or annotation in (list, tuple):
        return (list,)
    return None


def matches(value: Any, allowed: tuple[type, ...]) -> bool:
    """``value`` (as composed by OmegaConf) is one of ``allowed`` (an int is a number)."""
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int):
        return int in allowed or float in allowed
    if isinstance(value, float):
        return float in allowed
    if isinstance(value, (ListConfig, list, tuple)):
        return list in allowed
    if value is None:
        return type(None) in allowed
    return type(value) in allowed


def check_writable(key: str, folder: Path) -> None:
    """``folder`` exists and takes a file, or can be created (checked by really writing)."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise OSError(f"{probe} is not a directory")
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".write-check-"):
            pass
        if not os.access(probe, os.W_OK | os.X_OK):
            raise PermissionError(f"{probe} is not writable")
    except OSError as e:
        raise ConfigError(key, str(folder), f"a writable directory ({type(e).__name__}: {e})") from None
