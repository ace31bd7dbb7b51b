"""``kt bench``'s pieces: the per-round ratio line, the options, the process-wide OpenMP
wait policy `import ktcore` sets (for ktcore; llama.cpp is timed in a process of its own with the user's policy)."""

from __future__ import annotations

import os
from pathlib import Path
import subprocess
import sys

import pytest

from ktcore.cli import bench


def test_round_ratios_take_the_median_of_per_round_ratios():
    ours = [(100.0, 10.0), (50.0, 30.0), (90.0, 12.0)]
    ref = [(50.0, 10.0), (100.0, 10.0), (60.0, 12.0)]  # ratios: prefill 2.0, 0.5, 1.5; decode 1.0, 3.0, 1.0
    assert bench.round_ratios(ours, ref) == ("ktcore / llama.cpp, median of 3 per-round ratios: prefill 1.50x, "
                                             "decode 1.00x")
    assert bench.medians(ours) == (90.0, 12.0)


def test_bench_options():
    import argparse

    sub = argparse.ArgumentParser().add_subparsers()
    p = bench.add_parser(sub)
    args = p.parse_args(["m.gguf", "--sequential", "--profile"])
    assert args.sequential and args.profile
    args = p.parse_args(["m.gguf"])
    assert not args.sequential and not args.profile


@pytest.mark.parametrize("given, want", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_import_sets_passive_omp_wait_unless_set(given, want):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    code = "import ktcore, os; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == want


@pytest.mark.peer
@pytest.mark.parametrize("given, want", [(None, None), ("ACTIVE", "ACTIVE")])
def test_llamacpp_peer_runs_in_its_own_process_with_the_users_policy(given, want, monkeypatch):
    """llama.cpp is timed in a child process (ktcore.cli.llamacpp_peer) that gets the user's OpenMP wait policy
    back, not the passive one ktcore sets for itself; its figures come back as (prefill, decode) tok/s."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from models import ModelUnavailable, smollm2_gguf

    import ktcore
    from ktcore.cli import llamacpp_peer

    try:
        path = smollm2_gguf()
    except ModelUnavailable as exc:
        pytest.skip(str(exc))
    monkeypatch.setattr(ktcore, "OMP_POLICY_SET_HERE", given is None)
    seen = {}
    popen = llamacpp_peer.subprocess.Popen

    def spy(cmd, **kwargs):
        seen["env"] = kwargs["env"]
        return popen(cmd, **kwargs)

    monkeypatch.setattr(llamacpp_peer.subprocess, "Popen", spy)
    if given:
        monkeypatch.setenv("OMP_WAIT_POLICY", given)
    with llamacpp_peer.LlamaCppProcess(path, threads=1, n_ctx=64, extra_bufts=False) as peer:
        prefill, decode = peer.bench(list(range(100, 116)), 4, warm_up=True)
        assert peer.proc.pid != os.getpid()
    assert seen["env"].get("OMP_WAIT_POLICY") == want
    assert prefill > 0 and decode > 0


def test_bench_scripts_import_ktcore_before_torch():
    # import ktcore sets OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP; a script importing torch first keeps
    # spinning OpenMP workers that take kt-cpu-amx's cores (a 2000-token prefill 3.5x slower)
    import re
    from pathlib import Path

    late = []
    for script in sorted((Path(__file__).resolve().parents[1] / "bench").glob("*.py")):
        lines = script.read_text().splitlines()
        torch_at = next((i for i, line in enumerate(lines) if re.match(r"(import torch\b|from torch\b)", line)), None)
        ktcore_at = next((i for i, line in enumerate(lines) if re.match(r"(import ktcore\b|from ktcore\b)", line)), None)
        if torch_at is not None and (ktcore_at is None or ktcore_at > torch_at):
            late.append(script.name)
    assert not late, f"these bench scripts import torch before ktcore: {late}"


@pytest.mark.parametrize("given, want", [(None, None), ("ACTIVE", "ACTIVE")])
def test_llama_bench_peer_gets_the_users_policy_and_its_json(given, want, tmp_path, monkeypatch):
    """bench/models.py's ``llama_bench`` (bench_hybrid's llama.cpp CUDA peer, bench_decode's ik_llama.cpp): the
    binary runs with the user's OpenMP wait policy, not the passive one ktcore set for itself (under it,
    ik_llama.cpp decoded the 27-layer MoE at 9.2 tok/s on 2 threads instead of 12.4), and its JSON is read past
    the notes ik_llama.cpp prints to stdout between the JSON's lines."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from models import llama_bench

    import ktcore

    monkeypatch.setattr(ktcore, "OMP_POLICY_SET_HERE", given is None)
    monkeypatch.setenv("OMP_WAIT_POLICY", given or "PASSIVE")
    seen = tmp_path / "policy"
    fake = tmp_path / "llama-bench"
    fake.write_text(f"""#!/bin/sh
echo "${{OMP_WAIT_POLICY:-unset}}" > {seen}
echo '['
echo '  {{"n_prompt": 128, "n_gen": 0, "avg_ts": 80.5}},'
echo 'Computed blk.0.attn_k_b.weight as 128 x 512 x 16 of type q8_0 and stored in buffer CPU'
echo '  {{"n_prompt": 0, "n_gen": 16, "avg_ts": 12.25}}'
echo ']'
""")
    fake.chmod(0o755)
    prefill, decode = llama_bench(fake, tmp_path / "model.gguf", 2, [128], 16, 1, ["-fmoe", "1"])
    assert prefill == {128: 80.5} and decode == 12.25
    assert seen.read_text().strip() == (want or "unset")
