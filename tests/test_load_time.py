"""What load-time shortcuts must not change: the engine's end tokens (looked up one by one instead of through
the whole vocabulary) and when the model file is read ahead (only when it fits in the memory available)."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from test_weights_real_gguf import gemma3_path, smollm2_path

from ktcore import readahead
from ktcore.engine.core import end_token_ids
from ktcore.generate import END_OF_TURN_TOKENS
from ktcore.server.tiny import tiny_chat_tokenizer
from ktcore.weights import open_source


def old_end_token_ids(config, tokenizer) -> set[int]:
    """The computation before: the eos ids plus the end-of-turn markers found in ``get_vocab()``."""
    ids = set()
    for value in (config.eos_token_id, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(value)
    vocab = tokenizer.get_vocab()
    return ids | {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}


@pytest.mark.parametrize("path", [smollm2_path, gemma3_path], ids=["smollm2", "gemma3"])
def test_end_tokens_match_the_vocabulary_lookup(path):
    source = open_source(path())
    config, tokenizer = source.config(), source.tokenizer()
    model = SimpleNamespace(config=config, generation_config=None)
    got = end_token_ids(model, tokenizer)
    assert got == old_end_token_ids(config, tokenizer)
    # a real end-of-turn marker is among them (not only the eos id)
    vocab = tokenizer.get_vocab()
    assert any(t in vocab and vocab[t] in got for t in END_OF_TURN_TOKENS)


def test_missing_markers_are_not_mapped_to_unk():
    tokenizer = tiny_chat_tokenizer()
    model = SimpleNamespace(config=SimpleNamespace(eos_token_id=None), generation_config=None)
    got = end_token_ids(model, tokenizer)
    assert got == old_end_token_ids(model.config, tokenizer)
    assert tokenizer.unk_token_id not in got


@pytest.fixture
def model_file(tmp_path):
    readahead.forget()
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + bytes(1 << 20))
    yield path
    readahead.forget()


def test_read_ahead_starts_when_the_file_fits(model_file, monkeypatch):
    monkeypatch.setattr(readahead, "available_memory", lambda: 64 << 20)
    thread = readahead.read_ahead([model_file])
    assert thread is not None
    thread.join(10)
    assert readahead.read_ahead([model_file]) is None  # asked for once


def test_read_ahead_takes_the_gil_back_a_few_times_per_file(model_file, monkeypatch):
    """The file is read by sendfile in chunks of 64 MiB (a thread that takes the GIL back per 128 KiB slows the main
    thread); where sendfile fails, the rest is asked for with WILLNEED from where it stopped."""
    monkeypatch.setattr(readahead, "available_memory", lambda: 64 << 20)
    monkeypatch.setattr(readahead, "SEND_CHUNK", 256 << 10)
    sent, advised = [], []
    real_sendfile = os.sendfile

    def sendfile(out, fd, offset, count):
        sent.append((offset, count))
        if len(sent) == 3 and fail:
            raise OSError("sendfile refused")
        return real_sendfile(out, fd, offset, count)

    monkeypatch.setattr(os, "sendfile", sendfile)
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: advised.append(offset))
    size = model_file.stat().st_size  # 1 MiB + 4 bytes
    for fail in (False, True):
        sent.clear(), advised.clear(), readahead.forget()
        readahead.read_ahead([model_file]).join(10)
        assert [o for o, _ in sent] == ([0, 256 << 10, 512 << 10, 768 << 10, 1 << 20] if not fail else
                                        [0, 256 << 10, 512 << 10])
        assert sum(c for _, c in sent) == size or fail
        assert advised == ([] if not fail else list(range(512 << 10, size, readahead.CHUNK)))


@pytest.mark.parametrize("available", [None, 1 << 20, 3 << 19])
def test_read_ahead_skips_a_file_larger_than_half_the_memory(model_file, monkeypatch, available):
    monkeypatch.setattr(readahead, "available_memory", lambda: available)
    assert readahead.read_ahead([model_file]) is None


def test_placement_reads_the_same_available_memory(monkeypatch):
    from ktcore.placement import free_memory

    monkeypatch.setattr(readahead, "available_memory", lambda: 12345)
    assert free_memory("cpu") == 12345
    monkeypatch.undo()
    assert free_memory("cpu") > 0


def test_read_ahead_asks_for_every_chunk_of_the_file(model_file, monkeypatch):
    # where sendfile fails: Linux honours at most one readahead window per WILLNEED call, so one call for the whole
    # file would read its start
    asked = []
    monkeypatch.setattr(readahead, "available_memory", lambda: 64 << 20)
    monkeypatch.setattr(readahead.os, "sendfile", lambda *a: (_ for _ in ()).throw(OSError("no sendfile")))
    monkeypatch.setattr(readahead.os, "posix_fadvise", lambda fd, offset, length, advice: asked.append(
        (offset, length, advice)))
    readahead.read_ahead([model_file]).join(10)
    assert all(advice == readahead.os.POSIX_FADV_WILLNEED and length <= 128 << 10 for _, length, advice in asked)
    covered = sorted((offset, offset + length) for offset, length, _ in asked)
    assert covered[0][0] == 0 and covered[-1][1] >= model_file.stat().st_size
    assert all(b[0] <= a[1] for a, b in zip(covered, covered[1:]))


CONSOLE = [sys.executable, "-c", "from ktcore.cli import console_main; console_main()"]


def test_console_script_flushes_and_runs_exit_handlers_before_ending(tmp_path):
    # stdout to a pipe is block-buffered (no PYTHONUNBUFFERED): the reply must still arrive whole
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | {"OMP_NUM_THREADS": "2"}
    marker = tmp_path / "atexit-ran"
    code = (f"import atexit, pathlib; atexit.register(pathlib.Path({str(marker)!r}).write_text, 'yes'); "
            "from ktcore.cli import console_main; console_main()")
    r = subprocess.run([sys.executable, "-c", code, "run", "tiny:llama", "-p", "hi", "--raw", "--max-new-tokens", "3",
                        "-q"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("\n") and r.stdout.strip()
    assert marker.read_text() == "yes"
    bad = subprocess.run([*CONSOLE, "run", str(tmp_path / "missing.gguf"), "-p", "hi"], capture_output=True, text=True,
                         env=env, timeout=600)
    assert bad.returncode == 2 and "model file not found" in bad.stderr


def test_kt_run_reads_the_model_ahead_before_importing_torch(tmp_path):
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF" + bytes(60))  # passes the path check; --top-p 0 is refused once torch is imported
    probe = ("import sys; import ktcore.readahead as r\n"
             "r.read_ahead = lambda paths: print('torch' in sys.modules, *paths)\n"
             "from ktcore.cli import main; main(['run', sys.argv[1], '-p', 'hi', '--top-p', '0'])")
    r = subprocess.run([sys.executable, "-c", probe, str(model)], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert r.stdout.split() == ["False", str(model)], r.stdout + r.stderr
