from . import hookspec


@hookspec
def register_weight_sources(register):
    """Register weight source classes: ``register(SourceClass)``.

    A source class has ``SourceClass.can_open(path) -> bool`` and ``SourceClass(path)`` returning an
    object that follows ``ktcore.weights.source.WeightSource``: Transformers-named tensors as
    ``QuantizedTensor``, plus the config and tokenizer when the format carries them.
    """


@hookspec
def register_dequantizers(register):
    """Register faster dequantizers: ``register(ggml_type_name, device_type, fn)``.

    ``fn(raw: torch.Tensor[uint8], shape, dtype) -> torch.Tensor`` expands raw GGML blocks that are
    already on a device of ``device_type``. ktcore's own torch dequantizers are the fallback for every
    type and device.
    """
