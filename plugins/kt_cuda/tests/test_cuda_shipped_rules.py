"""The shipped gpu-cpu rule files end to end with kt-cuda installed, on tiny models written to GGUF (Q4_K:
the int4 path of kt-cuda's ``KLinearGPU``, ``KExpertsCPU`` on the CPU, ``KMLAAttention`` /
``KAttentionFlashGQA`` as the CUDA backends of ``KAttentionMLA`` / ``KAttentionSDPA``), against the same GGUF
through the shipped cpu rule files on ktcore's torch backends alone (dequantized weights, float32).

Tolerance: relative Frobenius error of the prefill logits and of the Generator's teacher-forced
log-probabilities (greedy steps then run in CUDA graphs): 5e-2 (half-precision activations on the GPU,
int8 activations in the CPU experts), 1e-1 for the tiny DeepSeek-V3, whose random router amplifies them
(as in tests/test_moe_hybrid.py)."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")

FAMILIES = ["llama", "qwen3_moe", "deepseek_v2", "deepseek_v3"]
TOL = {"deepseek_v3": 1e-1}
DEFAULT_TOL = 5e-2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("family", FAMILIES)
def test_shipped_gpu_rules_match_the_cpu_reference(family, tmp_path):
    from ktcore.generate import Generator, SamplingParams
    from ktcore.inject import RULE_FILES_DIR, load_model
    from ktcore.registry import Registry
    from ktcore.testing import MODEL_TYPES, tiny_model
    from ktcore.weights import open_source
    from ktcore.weights.gguf_writer import write_gguf

    registry = Registry()
    shipped = RULE_FILES_DIR / f"{MODEL_TYPES[family]}-gpu-cpu.yaml"
    if family != "llama" and "KExpertsCPU" not in registry.ops("experts"):
        pytest.skip("kt-cpu-amx (KExpertsCPU) is not installed")
    path = write_gguf(tiny_model(family, seed=0), tmp_path / f"{family}.gguf", qtypes="Q4_K")
    ref, _ = load_model(open_source(path), rules=RULE_FILES_DIR / f"{MODEL_TYPES[family]}-cpu.yaml",
                        dtype=torch.float32, registry=Registry(entrypoints=False), progress=False)
    model, report = load_model(open_source(path), rules=shipped, registry=registry, progress=False)
    ops = {(row.generate_op, row.generate_backend) for row in report.rows}
    assert ("KLinearGPU", "cuda") in ops and (family == "llama" or ("KExpertsCPU", "cpu_amx") in ops), ops
    tol = TOL.get(family, DEFAULT_TOL)
    ids = torch.randint(3, 500, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(ids).logits
        got = model(ids.cuda()).logits.cpu()
    assert _rel(got, expected) < tol, f"{family} prefill: {_rel(got, expected):.4f}"
    # the Generator: teacher-forced log-probabilities through its cache, then greedy steps in CUDA graphs
    tokenizer = open_source(path).tokenizer()
    gen_ref = Generator(ref, tokenizer, max_context=64)
    gen = Generator(model, tokenizer, max_context=64)
    params = SamplingParams(max_new_tokens=4, temperature=0.0)
    want = list(gen_ref.generate_ids(ids[0].tolist(), params))
    seq = ids[0].tolist() + want
    assert _rel(gen.score(seq), gen_ref.score(seq)) < tol
    steps = list(gen.generate_ids(ids[0].tolist(), params))
    assert len(steps) == len(want) and gen.graph_problem is None, gen.graph_problem
