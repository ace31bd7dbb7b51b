"""The on-disk cache of tokenizers converted from GGUF metadata (ktcore/weights/tokenizer_cache.py): the second
load reads the entry instead of converting and gives the same tokenizer; a damaged entry is rebuilt with a
warning; a changed file gets its own entry; an unwritable cache still gives a tokenizer."""

from __future__ import annotations

import warnings

import pytest

from ktcore.testing import tiny_model
from ktcore.weights import gguf_tokenizer, tokenizer_cache
from ktcore.weights.gguf_header import GGUFHeader
from ktcore.weights.gguf_source import GGUFSource
from ktcore.weights.gguf_writer import write_gguf

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
