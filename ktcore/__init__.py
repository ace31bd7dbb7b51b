"""ktcore: run large (Mixture-of-Experts) LLMs on one machine through pluggable ops and rule files."""

import os
from importlib.metadata import PackageNotFoundError, version

# OpenMP worker threads spin after every parallel torch op (libgomp's default), and on a CPU whose cores the
# CPU plugins' own thread pools share, that spinning takes their time slices: a few milliseconds per torch op
# on a small machine. Passive waiting (sleep at once) is set here, before torch is imported and its OpenMP
# runtime reads the variable, unless the user chose a policy. llama.cpp, whose OpenMP threads meet at a barrier
# for every op, decodes several times slower under it: `kt bench` runs it in a child process of its own
# (ktcore.cli.llamacpp_peer), which gets the user's policy back (OMP_POLICY_SET_HERE).
OMP_POLICY_SET_HERE = "OMP_WAIT_POLICY" not in os.environ
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .hookspecs import hookimpl  # noqa: E402

try:
    __version__ = version("ktcore")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"


def __getattr__(name: str):
    # ``Op`` imports torch: only when asked for, so `kt run` can print its first line before that import
    if name == "Op":
        from .ops import Op

        return Op
    raise AttributeError(f"module 'ktcore' has no attribute {name!r}")


def load_model(path_or_source, rules=None, device=None, dtype=None, **kwargs):
    """See ``ktcore.inject.load_model``."""
    from .inject import load_model as _load_model

    return _load_model(path_or_source, rules=rules, device=device, dtype=dtype, **kwargs)


def get_registry():
    """See ``ktcore.registry.get_registry``."""
    from .registry import get_registry as _get_registry

    return _get_registry()


__all__ = ["hookimpl", "Op", "load_model", "get_registry", "__version__"]
