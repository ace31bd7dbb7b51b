"""ktcore: run large (Mixture-of-Experts) LLMs on one machine through pluggable ops and rule files."""

from importlib.metadata import PackageNotFoundError, version

from .hookspecs import hookimpl
from .ops import Op

try:
    __version__ = version("ktcore")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"


def load_model(path_or_source, rules=None, device=None, dtype=None, **kwargs):
    """See ``ktcore.inject.load_model``."""
    from .inject import load_model as _load_model

    return _load_model(path_or_source, rules=rules, device=device, dtype=dtype, **kwargs)


def get_registry():
    """See ``ktcore.registry.get_registry``."""
    from .registry import get_registry as _get_registry

    return _get_registry()


__all__ = ["hookimpl", "Op", "load_model", "get_registry", "__version__"]
