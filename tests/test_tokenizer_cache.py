"""The on-disk cache of tokenizers converted from GGUF metadata (ktcore/weights/tokenizer_cache.py): the second
load reads the entry instead of converting and gives the same tokenizer; a damaged entry is rebuilt with a
warning; a changed file gets its own entry; an unwritable cache still gives a tokenizer."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from ktcore.testing import tiny_model
from ktcore.weights import gguf_tokenizer, tokenizer_cache
from ktcore.weights.gguf_header import GGUFHeader
from ktcore.weights.gguf_source import GGUFSource
from ktcore.weights.gguf_writer import write_gguf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from models import ModelUnavailable, gemma3_gguf, smollm2_gguf  # noqa: E402

TEXTS = ["What is the capital of France?", "  two spaces\tand a tab\n\nnewlines", "héllo wörld 東京 🙂", "", "a" * 40]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokcache")
    write_gguf(tiny_model("llama", seed=1), folder / "llama.gguf", qtypes="Q8_0")
    write_gguf(tiny_model("qwen3", seed=1), folder / "qwen3.gguf", qtypes="Q8_0")
    return folder


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KTCORE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "tokenizers"


def _same(a, b) -> None:
    assert type(a) is type(b)
    for text in TEXTS:
        ids = a(text)["input_ids"]
        assert b(text)["input_ids"] == ids, text
        assert b.decode(ids, skip_special_tokens=True) == a.decode(ids, skip_special_tokens=True)
    assert b.chat_template == a.chat_template and b.all_special_tokens == a.all_special_tokens
    assert b.added_tokens_decoder == a.added_tokens_decoder and b.init_kwargs == a.init_kwargs


def _no_conversion(*args, **kwargs):
    raise AssertionError("converted again although the cache holds the tokenizer")


def test_second_load_reads_the_cache(written, cache, monkeypatch):
    first = GGUFSource(written / "llama.gguf").tokenizer()
    (entry,) = cache.iterdir()
    assert sorted(p.name for p in entry.iterdir()) == [tokenizer_cache.KWARGS_FILE, tokenizer_cache.TOKENIZER_FILE]
    monkeypatch.setattr(gguf_tokenizer, "_convert", _no_conversion)
    _same(first, GGUFSource(written / "llama.gguf").tokenizer())


def test_cached_equals_converted_in_memory(written, cache, monkeypatch):
    monkeypatch.setattr(tokenizer_cache, "store", lambda *a: None)  # nothing written: the in-memory path
    fresh = GGUFSource(written / "qwen3.gguf").tokenizer()
    assert not cache.exists()
    monkeypatch.undo()
    monkeypatch.setenv("KTCORE_CACHE", str(cache.parent))
    GGUFSource(written / "qwen3.gguf").tokenizer()
    monkeypatch.setattr(gguf_tokenizer, "_convert", _no_conversion)
    _same(fresh, GGUFSource(written / "qwen3.gguf").tokenizer())


def test_damaged_entry_is_rebuilt_with_a_warning(written, cache):
    first = GGUFSource(written / "llama.gguf").tokenizer()
    (entry,) = cache.iterdir()
    path = entry / tokenizer_cache.TOKENIZER_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.warns(UserWarning, match="unreadable.*rebuilding"):
        again = GGUFSource(written / "llama.gguf").tokenizer()
    _same(first, again)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _same(first, GGUFSource(written / "llama.gguf").tokenizer())  # the rebuilt entry reads cleanly


def test_key_follows_the_tokenizer_metadata(written):
    llama, qwen3 = GGUFHeader(written / "llama.gguf"), GGUFHeader(written / "qwen3.gguf")
    assert tokenizer_cache.entry_key(llama, "llama") == tokenizer_cache.entry_key(GGUFHeader(written / "llama.gguf"), "llama")
    assert tokenizer_cache.entry_key(llama, "llama") != tokenizer_cache.entry_key(llama, "qwen3")
    assert tokenizer_cache.entry_key(llama, "llama") != tokenizer_cache.entry_key(qwen3, "llama")


def test_unwritable_cache_still_gives_a_tokenizer(written, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("KTCORE_CACHE", str(blocker))
    with pytest.warns(UserWarning, match="cannot cache the converted tokenizer"):
        tokenizer = GGUFSource(written / "llama.gguf").tokenizer()
    assert tokenizer("hello")["input_ids"]


def test_merges_are_stored_as_strings_unless_a_piece_holds_a_space():
    vocab = {"a": 0, "b": 1, "ab": 2, "c d": 3, "c": 4, "abc d": 5}
    pairs = {"model": {"type": "BPE", "vocab": vocab, "merges": [["a", "b"], ["ab", "c d"]]}}
    assert json.loads(tokenizer_cache.compact_merges(json.dumps(pairs)))["model"]["merges"] == [["a", "b"], ["ab", "c d"]]
    pairs["model"]["merges"] = [["a", "b"]]
    assert json.loads(tokenizer_cache.compact_merges(json.dumps(pairs)))["model"]["merges"] == ["a b"]
    no_bpe = json.dumps({"model": {"type": "WordLevel", "vocab": vocab}})
    assert tokenizer_cache.compact_merges(no_bpe) == no_bpe


@pytest.mark.parametrize("model", [smollm2_gguf, gemma3_gguf], ids=["smollm2", "gemma3"])
def test_real_vocabularies_read_back_identically(model, cache, monkeypatch):
    """SmolLM2's byte-level BPE and Gemma 3's 262k-token SentencePiece BPE: the entry (merges as strings) gives the
    tokenizer converted in memory (merges as pairs), special and added tokens included."""
    try:
        path = model()
    except ModelUnavailable as exc:
        pytest.skip(str(exc))
    monkeypatch.setattr(tokenizer_cache, "store", lambda *a: None)
    fresh = GGUFSource(path).tokenizer()
    monkeypatch.undo()
    monkeypatch.setenv("KTCORE_CACHE", str(cache.parent))
    GGUFSource(path).tokenizer()
    (entry,) = cache.iterdir()
    stored = json.loads((entry / tokenizer_cache.TOKENIZER_FILE).read_text(encoding="utf-8"))["model"]["merges"]
    assert stored and all(isinstance(m, str) for m in stored)
    assert len(stored) == len(json.loads(fresh.backend_tokenizer.to_str())["model"]["merges"])
    monkeypatch.setattr(gguf_tokenizer, "_convert", _no_conversion)
    cached = GGUFSource(path).tokenizer()
    _same(fresh, cached)
    added = [t.content for t in fresh.added_tokens_decoder.values()]
    special = "".join(fresh.all_special_tokens) + "".join(added[:30] + added[-30:])
    chat = fresh.apply_chat_template([{"role": "user", "content": "Hi! ▁ spaces\t<b>bold</b>"}], tokenize=False,
                                     add_generation_prompt=True) if fresh.chat_template else ""
    for text in (special, chat, "ends with a special" + fresh.all_special_tokens[-1], TEXTS[2] + special):
        ids = fresh(text)["input_ids"]
        assert cached(text)["input_ids"] == ids, text
        for skip in (False, True):
            assert cached.decode(ids, skip_special_tokens=skip) == fresh.decode(ids, skip_special_tokens=skip)
    assert Tokenizer.from_file(str(entry / tokenizer_cache.TOKENIZER_FILE)).get_vocab_size() == len(fresh)
