from . import hookspec


@hookspec
def register_linear_ops(register):
    """Register backends of ``linear`` ops: ``register(OpClass, *, op=None, preference=None, devices=None,
    aliases=())`` (see the package docstring). The shipped rule files name ``KLinearCPU`` and ``KLinearGPU``.

    A linear op replaces one ``nn.Linear``. It is built as ``OpClass(module, device, **kwargs)`` with the
    original (meta) module, receives ``{"weight": QuantizedTensor, "bias": QuantizedTensor?}`` in
    ``load()`` and computes ``forward(x) -> x @ weight.T + bias`` over the last dimension of ``x``.
    """
