from . import hookspec


@hookspec
def register_attention_ops(register):
    """Register op classes for the ``attention`` role: ``register(OpClass)``.

    An attention op computes one layer's self-attention. It is built with the wrapper that took the
    original attention module's place (its projections and norms stay there as children, possibly
    replaced by linear ops themselves), takes the same ``forward`` arguments as that Transformers module
    (``hidden_states, position_embeddings, attention_mask, past_key_values, ...``) and returns
    ``(attn_output, None)``. It reads and writes the cache through ``past_key_values.update``.
    """
