"""slope_bench: joint structured sparsity + low-bit quantization, benchmarked with measured compression."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("slope_bench")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without an install
    __version__ = "0.0.0+source"


def _register_resolvers() -> None:
    """``${method_search:...}``: a method's ``search`` space as Hydra sweeper params
    (``lam`` → ``method.lam``), used by ``hparams_search=tune``."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("method_search", lambda space: {f"method.{k}": str(v) for k, v in (space or {}).items()}, replace=True)


_register_resolvers()
