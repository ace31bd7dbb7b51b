from . import hookspec


@hookspec
def register_experts_ops(register):
    """Register op classes for the ``experts`` role: ``register(OpClass)``.

    An experts op replaces the routed experts of one MoE layer (Transformers 5's fused experts module,
    e.g. ``Qwen3MoeExperts``). ``load()`` receives ``{"gate_proj", "up_proj", "down_proj"}``, each a
    ``QuantizedTensor`` of shape ``[num_experts, out_features, in_features]``. ``forward(hidden_states
    [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H]`` returns
    ``sum_k w_k * down_k(act(gate_k(x)) * up_k(x))``; the activation is the module's ``act_fn``.
    """
