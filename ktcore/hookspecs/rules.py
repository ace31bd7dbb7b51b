from . import hookspec


@hookspec
def register_rule_dirs(register):
    """Register directories of shipped rule files: ``register(path)``.

    A directory holds ``<model_type>-<layout>.yaml`` files (layouts ``cpu``, ``gpu-cpu``). When a model is
    loaded without explicit rules, plugin directories are searched before ktcore's own ``rule_files/``;
    the first file whose every op is registered and can run here is used.
    """
