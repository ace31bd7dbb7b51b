from . import hookspec


@hookspec
def register_rule_dirs(register):
    """Register directories of shipped rule files: ``register(path)``.

    A directory holds ``<model_type>-<layout>.yaml`` files (layouts ``cpu``, ``gpu-cpu``, ``gpu``). When a
    model is loaded without explicit rules, plugin directories are searched before ktcore's own ``rules/``
    tree; the first file whose every op resolves here is used. First-party plugins register none: the
    shipped files name ops, and a backend makes them faster by registering its implementation of those
    ops; a directory is for model families or layouts ktcore does not ship.
    """
