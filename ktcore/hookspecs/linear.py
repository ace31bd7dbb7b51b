from . import hookspec


@hookspec
def register_linear_ops(register):
    """Register op classes for the ``linear`` role: ``register(OpClass)``.

    A linear op replaces one ``nn.Linear``. It is built as ``OpClass(module, device, **kwargs)`` with the
    original (meta) module, receives ``{"weight": QuantizedTensor, "bias": QuantizedTensor?}`` in
    ``load()`` and computes ``forward(x) -> x @ weight.T + bias`` over the last dimension of ``x``.
    """
