from . import hookspec


@hookspec
def register_experts_ops(register):
    """Register backends of ``experts`` ops: ``register(OpClass, *, op=None, preference=None, devices=None,
    aliases=())`` (see the package docstring). The shipped rule files name ``KExpertsCPU`` and ``KExpertsGPU``.

    An experts op replaces the routed experts of one MoE layer (Transformers 5's fused experts module,
    e.g. ``Qwen3MoeExperts``). ``load()`` receives ``{"gate_proj", "up_proj", "down_proj"}``, each a
    ``QuantizedTensor`` of shape ``[num_experts, out_features, in_features]``. ``forward(hidden_states
    [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H]`` returns
    ``sum_k w_k * down_k(act(gate_k(x)) * up_k(x))``; the activation is the module's ``act_fn``.

    Asynchronous contract (optional): an op MAY also implement ``submit(hidden_states, top_k_index,
    top_k_weights) -> None``, which starts the same computation and returns at once, and ``sync() -> [T, H]``,
    which waits for it and returns the output (on the device and in the dtype of the submitted input). One
    submit is pending at a time: ``submit`` again before ``sync`` is an error, as is ``sync`` without a
    submit. The inputs handed to ``submit`` are already on the op's device and must stay untouched until
    ``sync`` (the op keeps references). ``KExperts.submit``/``sync`` use this API when the op has both
    methods, so ``ktcore.moe.KMoE`` runs the shared experts on the GPU while the routed experts compute;
    ops without it are run synchronously inside ``KExperts.submit``.
    """
