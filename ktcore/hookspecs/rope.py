from . import hookspec


@hookspec
def register_rope_ops(register):
    """Register backends of ``rope`` ops: ``register(OpClass, *, op=None, preference=None, devices=None,
    aliases=())`` (see the package docstring).

    A rope op replaces a model's rotary embedding module: ``forward(x, position_ids) -> (cos, sin)`` as
    Transformers' ``*RotaryEmbedding`` returns them (or the complex ``freqs_cis`` where the model's own
    module returns that). Its tables are computed when it is built, never read from weights.
    """
