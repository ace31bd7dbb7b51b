"""The public contract between ktcore and its backends.

A backend is a Python distribution that declares an entry point in the group ``ktcore``::

    [project.entry-points.ktcore]
    my_backend = "my_backend.plugin"

The module it names implements any of the hooks below with ``@ktcore.hookimpl``. Every hook receives a
``register`` callable, as in ``llm``'s ``register_models(register)``; the plugin calls it once per thing it
provides. The op hooks take ``register(OpClass, *, op=None, preference=None, devices=None, aliases=())``:
``OpClass`` becomes a *backend* of op ``op or OpClass.name`` for its device types, chosen per device by
preference among the backends whose ``available()`` accepts the device (see ``ktcore.registry``).

The contract is enforced: a hook name no spec below defines (a misspelling) is rejected by pluggy's
``check_pending()``, and a plugin whose hook raises or registers something invalid is not loaded; both
become problems ``kt plugins`` shows, and the other plugins load. Plugins import ktcore only through
``ktcore.sdk`` (and this package for ``hookimpl``).
"""

import pluggy

PROJECT = "ktcore"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

from . import attention, experts, linear, rope, rules, weights  # noqa: E402

SPEC_MODULES = (linear, experts, attention, rope, weights, rules)

__all__ = ["PROJECT", "hookspec", "hookimpl", "SPEC_MODULES"]
