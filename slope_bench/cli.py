"""Hydra entry point with readable one-line errors.

Bad group choices (``method=foo``) and unknown keys (``method.foo=1``) are caught
before Hydra starts, bad values (``method.w_bits=9``) when the run instantiates its
objects: in both cases one line on stderr naming the key and what is allowed, exit
code 2, and no ``results.json``. A run that fails later (a diverged loss, a crash)
leaves ``results.json`` with ``status: failed`` and its error; a diverged single run
prints one line and exits 1. In a multirun a failed job is recorded and the others go on.

``python -m slope_bench.cli`` is the same entry point; a multi-device run uses it to
start its other local ranks (see :func:`slope_bench.distributed.process_group`).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from slope_bench.utils import CONF_DIR

log = logging.getLogger("slope_bench")


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def worker_command(local_rank: int) -> list[str]:
    """argv that reruns the current Hydra job as ``local_rank`` of a multi-device run:
    the job's own overrides (one job of a sweep, not the sweep) into the same run dir."""
    from hydra.core.hydra_config import HydraConfig

    job = HydraConfig.get()
    return [
        sys.executable,
        "-m",
        "slope_bench.cli",
        *job.overrides.task,
        f'hydra.run.dir="{job.runtime.output_dir}"',
        "hydra.output_subdir=null",
        f"hydra.job.name=rank{local_rank}",
    ]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def precheck(argv: list[str]) -> None:
    """Validate group choices and keys of the overrides before Hydra runs."""
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    for item in overrides:
        key, value = item.split("=", 1)
        key = key.lstrip("+~")
        if key in groups and not any(c in value for c in "[]()"):
            for choice in value.split(","):
                if choice and not (CONF_DIR / key / f"{choice}.yaml").is_file():
                    fail(f"{key}={choice!r} is not allowed: expected one of {', '.join(options(key))}")
    from slope_bench.errors import ConfigError
    from slope_bench.validate import check_writable

    try:
        check_writable("hydra.run.dir", run_dir_of(argv))
    except ConfigError as e:
        fail(str(e))
    multirun = "-m" in argv or "--multirun" in argv
    plain = [a for a in overrides if not a.split("=", 1)[0].lstrip("+~").startswith("hydra")]
    if multirun:  # sweep values are checked per job; what every job shares is checked here
        plain = [a for a in plain if not is_sweep(a)]
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=plain)
    except (HydraException, OmegaConfBaseException) as e:
        if multirun:
            return
        fail(describe(e, plain))
    from slope_bench.validate import check_objectives

    try:
        check_objectives(cfg.get("objectives"))  # a sweeper's objective is the same for every job
    except ConfigError as e:
        fail(str(e))


def is_sweep(override: str) -> bool:
    """``method=slope,naive``, ``seed=range(3)``, ``method.lam=interval(0.1, 10)``: a sweep."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_overrides([override])[0].is_sweep_override()
    except Exception:
        return True


def describe(error: Exception, overrides: list[str]) -> str:
    """One line for a composition error, naming the key and the keys its parent has
    (composed with the other overrides, so ``method=codeq method.n=2`` lists CoDeQ's)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if f"'{key}'" in str(error) and "." in key:
            parent, leaf = key.rsplit(".", 1)
            others = [o for o in overrides if o is not item]
            try:
                from hydra import compose, initialize_config_dir

                with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
                    cfg = compose("config", overrides=others)
                node = OmegaConf.select(cfg, parent)
                if isinstance(node, DictConfig):
                    owner = f"{parent} ({node.name})" if parent == "method" and "name" in node else parent
                    return f"{key} is not a known key: {owner} has {', '.join(k for k in node.keys() if k != '_target_')}"
            except Exception:
                pass
    return text


def run_dir_of(argv: list[str]) -> Path:
    """Where this job will write: ``hydra.run.dir`` / ``hydra.sweep.dir`` when given,
    else the default log folder (``paths.log_dir``, ``paths.root_dir``/outputs)."""
    values = dict(a.lstrip("+~").split("=", 1) for a in argv if "=" in a and not a.startswith("-"))
    multirun = "-m" in argv or "--multirun" in argv
    for key in ("hydra.sweep.dir",) if multirun else ("hydra.run.dir",):
        if key in values:
            return Path(values[key].strip("\"'"))
    if "paths.log_dir" in values:
        return Path(values["paths.log_dir"])
    return Path(values.get("paths.root_dir", ".")) / "outputs"


def discard_empty_run_dir(cfg: DictConfig) -> None:
    """Remove the run dir Hydra made for a run that never started (config only)."""
    import shutil

    out = Path(cfg.paths.output_dir)
    if out.is_dir() and all(p.name == ".hydra" or p.suffix == ".log" for p in out.iterdir()):
        logging.shutdown()
        shutil.rmtree(out, ignore_errors=True)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | tuple | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from slope_bench import report, train
    from slope_bench.distributed import process_group
    from slope_bench.errors import ConfigError
    from slope_bench.lit import DivergenceError
    from slope_bench.tasks.base import DatasetError
    from slope_bench.utils import quiet_third_party

    quiet_third_party()
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    rank = 0
    try:
        with process_group(cfg.trainer, worker_command, cwd=hydra.utils.get_original_cwd()) as rank:
            results = train.run(cfg)
    except Exception as e:
        if rank != 0:  # rank 0 records and reports the failure
            print(f"error (rank {rank}): {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
            sys.exit(1)
        if isinstance(e, (ConfigError, DatasetError)):
            if multirun:
                report.record_failure(cfg, e)
                return None
            discard_empty_run_dir(cfg)
            fail(str(e))
        report.record_failure(cfg, e)
        if multirun:
            log.exception("job failed; recorded as status=failed")
            return None
        if isinstance(e, DivergenceError):
            fail(str(e), code=1)
        raise
    if rank != 0:
        return None
    return report.objectives(cfg, results)


if __name__ == "__main__":
    precheck(sys.argv[1:])
    main()
