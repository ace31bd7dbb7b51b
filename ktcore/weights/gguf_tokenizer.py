"""A Transformers tokenizer (with its chat template) built from GGUF metadata alone.

Uses Transformers' own GGUF tokenizer converters (``get_gguf_tokenizer`` / ``convert_gguf_tokenizer``)
and the tokenizer class Transformers picks for the model type, so the result is the tokenizer
``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` builds, for every architecture (Transformers'
own path needs a config it can derive, which it cannot for e.g. deepseek2). Those converters split every BPE
text as GPT-2 does; where llama.cpp's ``tokenizer.ggml.pre`` names a model whose own split differs and is listed in
``PRE_TOKENIZER_PATTERNS``, that split replaces it. The conversion is cached on disk (``tokenizer_cache.py``), so
it runs once per file.
"""

from __future__ import annotations

import re

from .source import WeightError

# Modality markers of multimodal vocabularies (Gemma 3's <start_of_image>, <end_of_image>, [multimodal]): the
# GGUF types them USER_DEFINED, which makes them ordinary text, but the model's own tokenizer marks them special.
# A text-only run has nothing to show for them, so they are special here too (and left out of decoded replies).
MODALITY_MARKER = re.compile(r"<(start|end)_of_(image|audio|video)>|<(image|audio|video)_soft_token>|\[multimodal\]")

# tokenizer.ggml.pre -> the split pattern of the model's own tokenizer (byte-level BPE; Oniguruma syntax, which
# the tokenizers library uses: ``&&`` intersects character classes)
PRE_TOKENIZER_PATTERNS = {
    # Kimi-K2's tiktoken pattern (tokenization_kimi.py): Han runs apart from other letters (which exclude Han),
    # digits in groups of up to three, a punctuation run keeps its trailing newlines
    "kimi-k2": "|".join([
        r"[\p{Han}]+",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]),
}


def tokenizer_class_for(model_type: str):
    from transformers import TokenizersBackend
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES, tokenizer_class_from_name

    names = TOKENIZER_MAPPING_NAMES.get(model_type)
    if isinstance(names, (tuple, list)):
        names = next((n for n in reversed(names) if n), None)
    cls = tokenizer_class_from_name(names) if names else None
    return cls or TokenizersBackend


def tokenizer_from_gguf(path: str, model_type: str, reader=None):
    """The tokenizer the GGUF file at ``path`` describes (``None`` when it has no vocabulary), converted once
    and then read from the cache (``tokenizer_cache.py``). ``reader``: the file's ``GGUFHeader``."""
    from . import tokenizer_cache

    reader = reader if reader is not None else _open(path)
    if "tokenizer.ggml.tokens" not in reader.fields:
        return None
    cls = tokenizer_class_for(model_type)
    key = tokenizer_cache.entry_key(reader, model_type)
    tokenizer = tokenizer_cache.load(key, cls)
    if tokenizer is None:
        backend, kwargs = _convert(path, model_type, reader)
        if tokenizer_cache.store(key, cls, backend, kwargs) is not None:
            tokenizer = tokenizer_cache.load(key, cls)  # as cheap as the copy cls(tokenizer_object=) makes
        if tokenizer is None:
            tokenizer = cls(tokenizer_object=backend, **kwargs)
    _mark_modality_markers_special(tokenizer)
    return tokenizer


def _convert(path: str, model_type: str, reader):
    """``(tokenizers.Tokenizer, tokenizer class kwargs)`` by Transformers' GGUF converters (before 5.2x they
    lived in ``integrations.ggml`` and read no GGUF tokenizer by themselves: ``reader`` gives the metadata)."""
    try:
        from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer
    except ImportError:
        from transformers.integrations.ggml import convert_gguf_tokenizer

        def get_gguf_tokenizer(path):
            return _tokenizer_metadata(reader, model_type)

    try:
        architecture, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(path)
    except KeyError as e:
        raise WeightError(f"{path}: no tokenizer in the GGUF metadata (missing {e})") from e
    try:
        backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
    except ValueError as e:
        raise WeightError(f"{path}: cannot build the tokenizer: {e}") from e
    _apply_pre_tokenizer(backend, reader)
    return backend, dict(tokenizer_config) | dict(extra)


def _apply_pre_tokenizer(backend, reader) -> None:
    """Split a byte-level BPE's text with the pattern ``PRE_TOKENIZER_PATTERNS`` gives for the file's
    ``tokenizer.ggml.pre`` (then map bytes as before, without GPT-2's own split)."""
    fields = reader.fields
    if "tokenizer.ggml.pre" not in fields or fields.get("tokenizer.ggml.model") is None:
        return
    pattern = PRE_TOKENIZER_PATTERNS.get(str(reader.value("tokenizer.ggml.pre")))
    if pattern is None or str(reader.value("tokenizer.ggml.model")) != "gpt2":
        return
    from tokenizers import Regex, pre_tokenizers

    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _mark_modality_markers_special(tokenizer) -> None:
    from tokenizers import AddedToken

    markers = [AddedToken(t.content, normalized=False, special=True)
               for t in tokenizer.added_tokens_decoder.values() if not t.special and MODALITY_MARKER.fullmatch(t.content)]
    if markers:
        tokenizer.add_special_tokens({"additional_special_tokens": markers}, replace_extra_special_tokens=False)


def _open(path: str):
    from .gguf_header import GGUFHeader

    return GGUFHeader(path)


def _tokenizer_metadata(reader, model_type: str) -> tuple[str, dict, dict]:
    """``(converter name, tokenizer_dict, tokenizer_config)`` from a ``GGUFHeader``'s ``tokenizer.*`` fields,
    keyed as Transformers' ``GGUF_TOKENIZER_MAPPING`` says (what newer Transformers' ``get_gguf_tokenizer`` does)."""
    from transformers.integrations.ggml import GGUF_TO_FAST_CONVERTERS, GGUF_TOKENIZER_MAPPING

    tokenizer_dict, tokenizer_config = {}, {}
    for key in reader.fields:
        if not key.startswith("tokenizer."):
            continue
        suffix = key[len("tokenizer."):]
        for section, out in (("tokenizer", tokenizer_dict), ("tokenizer_config", tokenizer_config)):
            if suffix in GGUF_TOKENIZER_MAPPING[section]:
                out[GGUF_TOKENIZER_MAPPING[section][suffix]] = reader.value(key)
    kind = tokenizer_dict.get("tokenizer_type")
    converter = model_type if model_type in GGUF_TO_FAST_CONVERTERS else ("llama" if kind == "llama" else "gpt2")
    return converter, tokenizer_dict, tokenizer_config
