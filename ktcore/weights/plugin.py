"""Hook implementations for ktcore's own weight sources; the built-in plugin registers this module
(``pm.register(ktcore.weights.plugin)``) or calls these functions from its own hooks."""

from ..hookspecs import hookimpl


@hookimpl
def register_weight_sources(register):
    from . import builtin_source_classes

    for cls in builtin_source_classes():
        register(cls)
