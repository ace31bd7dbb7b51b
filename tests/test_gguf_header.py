"""The lazy GGUF header against gguf-py's reader, and the tokenizer built from it."""

from __future__ import annotations

import numpy as np
import pytest

from ktcore.testing import tiny_model
from ktcore.weights import WeightError
from ktcore.weights.gguf_header import GGUFHeader, LazyArray
from ktcore.weights.gguf_source import GGUFSource
from ktcore.weights.gguf_writer import write_gguf
from ktcore.weights.quants import GGML_TYPES_BY_ID


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    path = tmp_path_factory.mktemp("header") / "qwen3.gguf"
    write_gguf(tiny_model("qwen3", seed=3), path, qtypes={"default": "Q4_K", "attn_v": "Q5_0", "ffn_down": "Q8_0"})
    return path


def test_header_matches_gguf_reader(written):
    import gguf

    reader = gguf.GGUFReader(written)
    header = GGUFHeader(written)
    keys = [k for k in reader.fields if not k.startswith("GGUF.")]
    assert list(header.fields) == keys
    for key in keys:
        expected = reader.fields[key].contents()
        got = header.value(key)
        if isinstance(expected, float):
            assert got == pytest.approx(expected, rel=1e-7), key
        else:
            assert got == expected, key
    assert set(header.tensors) == {t.name for t in reader.tensors}
    for t in reader.tensors:
        entry = header.tensors[t.name]
        assert entry.shape == tuple(int(d) for d in reversed(t.shape.tolist()))
        assert GGML_TYPES_BY_ID[entry.type_id].name == t.tensor_type.name
        assert np.array_equal(entry.data, np.asarray(t.data).reshape(-1).view(np.uint8)), t.name


def test_vocabulary_is_read_only_when_asked(written):
    header = GGUFHeader(written)
    tokens = header.fields["tokenizer.ggml.tokens"]
    assert isinstance(tokens, LazyArray) and len(tokens) > 100
    source = GGUFSource(written)
    assert source.metadata["tokenizer.ggml.tokens#len"] == len(tokens)
    assert "tokenizer.ggml.tokens" not in source.metadata
    assert source.chat_template() == header.value("tokenizer.chat_template")
    vocab = source.tokenizer().get_vocab()
    assert all(vocab[t] == i for i, t in enumerate(tokens.read()))


def test_truncated_string_array_names_the_file(written, tmp_path):
    header = GGUFHeader(written)
    cut_at = header.fields["tokenizer.ggml.tokens"].start + 100
    bad = tmp_path / "cut-vocab.gguf"
    bad.write_bytes(written.read_bytes()[:cut_at])
    with pytest.raises(WeightError, match=r"cut-vocab\.gguf.*(truncated|corrupt)"):
        GGUFHeader(bad)


def test_modality_markers_are_left_out_of_replies(written):
    from ktcore.weights.gguf_tokenizer import _mark_modality_markers_special

    tokenizer = GGUFSource(written).tokenizer()
    tokenizer.add_tokens(["<start_of_image>", "<table>"])  # as a GGUF's USER_DEFINED tokens arrive
    ids = tokenizer("a <start_of_image> b <table>", add_special_tokens=False)["input_ids"]
    assert "<start_of_image>" in tokenizer.decode(ids, skip_special_tokens=True)
    _mark_modality_markers_special(tokenizer)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert "<start_of_image>" not in text and "<table>" in text  # markup stays text
