"""Helpers of the kt_cuda kernel tests (a uniquely named module: several plugins' tests run together)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def half_dtypes() -> list[torch.dtype]:
    """Activation dtypes to test: both halves on a GPU; float16 alone in the interpreter (numpy has no bf16)."""
    return [torch.float16, torch.bfloat16] if torch.cuda.is_available() else [torch.float16]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    assert torch.isfinite(got).all(), "non-finite values in the output"
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def run_interpreted(script: str) -> None:
    """Runs ``script`` (kernel checks that print "ok" last) in a subprocess under Triton's interpreter on the
    CPU. The tier exists for CPU-only CI: where CUDA is available the kernels are tested compiled instead
    (and Triton 3.6's interpreter, shipped with torch 2.11, trips over NumPy >= 2.4 there)."""
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: the kernels are tested compiled on the GPU instead of interpreted")
    plugin = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([str(plugin), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert run.stdout.strip().endswith("ok")


def torch_gpu_rules(tmp_path: Path, model_type: str, **replace: str) -> Path:
    """The shipped gpu-cpu rule file of ``model_type`` on ktcore's torch backends (each op pinned to
    ``backend: torch``), except the ops named in ``replace`` (``KAttentionMLA="KMLAAttention"``), which
    take the given op: the reference layout around one kt-cuda op under test."""
    from ktcore.rule_selection import RULE_FILES_DIR

    lines, named = [], set()
    for line in (RULE_FILES_DIR / f"{model_type}-gpu-cpu.yaml").read_text().splitlines():
        key, _, op = line.strip().partition(": ")
        if key in ("op", "prefill_op", "generate_op"):
            named.add(op)
            indent = line[: len(line) - len(line.lstrip())]
            line = f"{indent}{key}: {replace[op]}" if op in replace else f"{line}\n{indent}backend: torch"
        lines.append(line)
    assert set(replace) <= named, f"{model_type}-gpu-cpu.yaml names none of {sorted(set(replace) - named)}"
    path = tmp_path / f"{model_type}-torch-gpu-cpu.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path
