"""One run, top to bottom: instantiate → references → prepare → fit → finalize → report.

``run(cfg)`` returns the results dict (also written to ``results.json``), so tests call
it directly; ``run.py`` is the Hydra entry point around it. The run talks to the method
only through the contract of :mod:`slope_bench.methods.base`.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from slope_bench import report
from slope_bench.distributed import is_global_zero
from slope_bench.errors import ConfigError
from slope_bench.lit import fit
from slope_bench.methods.base import Compressor, RunInfo
from slope_bench.models import choose_targets
from slope_bench.references import dense_control, dense_reference
from slope_bench.utils import CONF_DIR
from slope_bench.validate import check_channels_last, validate

log = logging.getLogger("slope_bench")
MODEL_RECIPE = ("dense_lr", "finetune_lr")  # a model's own recipe (read by conf/config.yaml), not constructor arguments
METHOD_SEARCH = ("search",)  # a method's search space (read by the tuner, slope_bench.tune), not a constructor argument


def build(group: str, node: DictConfig, drop: tuple[str, ...] = (), **kwargs: Any) -> Any:
    """Instantiate a config group (minus the ``drop`` keys); a ConfigError is re-raised
    with the group's prefix (``method.w_bits``)."""
    if drop:
        spec = OmegaConf.to_container(node, resolve=True)
        node = OmegaConf.create({k: v for k, v in spec.items() if k not in drop})
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except ConfigError as e:
        raise e.within(group) from None
    except hydra.errors.InstantiationException as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__
        if isinstance(cause, ConfigError):
            raise cause.within(group) from None
        raise


def method_from_yaml(name: str) -> Compressor:
    """The compressor of ``conf/method/<name>.yaml`` with its defaults, built as a run builds it."""
    return build("method", OmegaConf.load(CONF_DIR / "method" / f"{name}.yaml"), METHOD_SEARCH)


def run(cfg: DictConfig) -> dict:
    """Run one configuration end to end; returns the results dict."""
    validate(cfg)
    pl.seed_everything(cfg.seed, workers=True)

    # 1. instantiate everything first: every bad value fails here, before any training
    task = build("task", cfg.task, seed=cfg.seed)
    compressor: Compressor = build("method", cfg.method, METHOD_SEARCH)
    new_model = partial(
        build, "model", cfg.model, MODEL_RECIPE, num_classes=task.num_classes, in_chans=task.in_chans, image_size=task.image_size
    )
    model = new_model()
    check_channels_last(model, (cfg.get("trainer") or {}).get("channels_last", False), cfg.model.name)
    needs = compressor.requirements
    info = RunInfo(num_train=task.num_train, seed=cfg.seed)
    if needs.calib_samples > info.num_train:
        raise ConfigError("method.n_calib", needs.calib_samples, f"at most the training set size ({info.num_train})")
    targets, skipped = choose_targets(model, compressor)
    epochs = cfg.finetune.epochs if needs.trains else 0
    if epochs < 0 or cfg.dense.epochs < 0:
        raise ConfigError("finetune.epochs" if epochs < 0 else "dense.epochs", min(epochs, cfg.dense.epochs), "an integer >= 0")
    logger = report.make_logger(cfg)

    # 2. references: the dense model (trained once and cached, or as built) and the
    #    dense fine-tune control with this run's exact budget and schedule (cached)
    dense = dense_reference(cfg, task, new_model)
    model.load_state_dict(dense.state)
    dense_val = task.evaluate(model, "val")
    control = dense_control(cfg, task, new_model, dense, epochs)

    # 3. compress: prepare -> fine-tune with the method's penalty/schedule -> finalize
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in targets}
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # same state whether the dense models were trained or loaded
    model = compressor.prepare(model, targets, info)
    fitted = fit(
        model, task, compressor, epochs, cfg.finetune.lr, cfg, logger=logger, tag=f"{compressor.name} fine-tune", checkpoint="compress"
    )
    if not is_global_zero():
        return {}  # other ranks of a multi-device run stop here: finalize, measure and record happen once, on rank 0
    calib = task.calib_batches(needs.calib_samples, needs.calib_passes) if needs.calib_samples else None
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # finalize's sampling does not depend on how the fit went (resumed or not)
    finalized = compressor.finalize(model, calib)
    model.eval()

    # 4. measure from the finalized tensors and record
    results = report.record(cfg, task, model, compressor, finalized, skipped, originals, dense, control, fitted, epochs, dense_val)
    if logger is not None:
        report.log_results(logger, cfg, results)
    report.print_summary(results)
    return results
