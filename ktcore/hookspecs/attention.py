from . import hookspec


@hookspec
def register_attention_ops(register):
    """Register backends of ``attention`` ops: ``register(OpClass, *, op=None, preference=None, devices=None,
    aliases=())`` (see the package docstring). The shipped rule files name ``KAttentionSDPA`` and
    ``KAttentionMLA``; a vendor's faster kernel registers as their backend for its device type.

    An attention op computes one layer's self-attention. It is built with the wrapper that took the
    original attention module's place (its projections and norms stay there as children, possibly
    replaced by linear ops themselves), takes the same ``forward`` arguments as that Transformers module
    (``hidden_states, position_embeddings, attention_mask, past_key_values, ...``) and returns
    ``(attn_output, None)``. It reads and writes the cache through ``past_key_values.update``.
    """
