"""A Transformers tokenizer (with its chat template) built from GGUF metadata alone.

Uses Transformers' own GGUF tokenizer converters (``get_gguf_tokenizer`` / ``convert_gguf_tokenizer``)
and the tokenizer class Transformers picks for the model type, so the result is the tokenizer
``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` builds, for every architecture (Transformers'
own path needs a config it can derive, which it cannot for e.g. deepseek2).
"""

from __future__ import annotations

from .source import WeightError


def tokenizer_class_for(model_type: str):
    from transformers import TokenizersBackend
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES, tokenizer_class_from_name

    names = TOKENIZER_MAPPING_NAMES.get(model_type)
    if isinstance(names, (tuple, list)):
        names = next((n for n in reversed(names) if n), None)
    cls = tokenizer_class_from_name(names) if names else None
    return cls or TokenizersBackend


def tokenizer_from_gguf(path: str, model_type: str, reader=None):
    """``reader``: the file's open ``gguf.GGUFReader``, used where this Transformers reads no GGUF
    tokenizer by itself (before 5.2x the converters lived in ``integrations.ggml``)."""
    try:
        from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer
    except ImportError:
        from transformers.integrations.ggml import convert_gguf_tokenizer

        def get_gguf_tokenizer(path):
            return _tokenizer_metadata(reader or _open(path), model_type)

    try:
        architecture, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(path)
    except KeyError as e:
        raise WeightError(f"{path}: no tokenizer in the GGUF metadata (missing {e})") from e
    if "tokens" not in tokenizer_dict:
        return None
    try:
        backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
    except ValueError as e:
        raise WeightError(f"{path}: cannot build the tokenizer: {e}") from e
    cls = tokenizer_class_for(model_type)
    kwargs = dict(tokenizer_config) | dict(extra)
    return cls(tokenizer_object=backend, **kwargs)


def _open(path: str):
    import gguf

    return gguf.GGUFReader(path, "r")


def _tokenizer_metadata(reader, model_type: str) -> tuple[str, dict, dict]:
    """``(converter name, tokenizer_dict, tokenizer_config)`` from a reader's ``tokenizer.*`` fields, keyed
    as Transformers' ``GGUF_TOKENIZER_MAPPING`` says (what newer Transformers' ``get_gguf_tokenizer`` does)."""
    from transformers.integrations.ggml import GGUF_TO_FAST_CONVERTERS, GGUF_TOKENIZER_MAPPING

    tokenizer_dict, tokenizer_config = {}, {}
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        suffix = key[len("tokenizer."):]
        for section, out in (("tokenizer", tokenizer_dict), ("tokenizer_config", tokenizer_config)):
            if suffix in GGUF_TOKENIZER_MAPPING[section]:
                out[GGUF_TOKENIZER_MAPPING[section][suffix]] = field.contents()
    kind = tokenizer_dict.get("tokenizer_type")
    converter = model_type if model_type in GGUF_TO_FAST_CONVERTERS else ("llama" if kind == "llama" else "gpt2")
    return converter, tokenizer_dict, tokenizer_config
