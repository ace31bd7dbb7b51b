"""The public contract between ktcore and its backends.

A backend is a Python distribution that declares an entry point in the group ``ktcore``::

    [project.entry-points.ktcore]
    my_backend = "my_backend.plugin"

The module it names implements any of the hooks below with ``@ktcore.hookimpl``. Every hook receives a
``register`` callable, as in ``llm``'s ``register_models(register)``; the plugin calls it once per op class
it provides. The registry records which plugin registered what, so errors can name it.
"""

import pluggy

PROJECT = "ktcore"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

from . import attention, experts, linear, rope, rules, weights  # noqa: E402

SPEC_MODULES = (linear, experts, attention, rope, weights, rules)

__all__ = ["PROJECT", "hookspec", "hookimpl", "SPEC_MODULES"]
