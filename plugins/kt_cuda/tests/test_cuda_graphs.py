"""CUDA-graph decode on a GPU: greedy tokens with graphs equal the eager ones, for a plain Transformers model,
an injected all-GPU MoE model and the hybrid layout (routed experts on the CPU through kt-cpu-amx's
stream-ordered path, captured into the graph); a model that cannot be captured falls back to eager and
says why. Float32 tiny models with seeded weights; 20 greedy tokens crossing a graph-length bucket (256)."""

from __future__ import annotations

import pytest
import torch

from ktcore.generate import Generator, SamplingParams
from ktcore.inject import load_model
from ktcore.modules import KExperts
from ktcore.moe import KMoE
from ktcore.testing import tiny_model
from ktcore.weights.state_dict import StateDictSource

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")

PROMPT_LEN, NEW_TOKENS = 245, 20  # decode positions 245..264: graphs of 256 and 512 slots (max_context 300)

KMOE = r"""
- match: {name: '^model\.layers\.\d+\.mlp$', class: moe}
  replace: {class: KMoE, device: cuda}
"""
ALL_GPU = KMOE + r"""
- match: {name: '^model\.layers\.\d+\.mlp\.experts$', class: experts}
  replace: {class: KExperts, device: cuda, kwargs: {op: KExpertsGPU, prefill_device: cuda, generate_device: cuda}}
  recursive: false
- match: {name: '^model\.rotary_emb$', class: rope}
  replace: {class: KRoPE, device: cuda, kwargs: {op: KRoPETorch, prefill_device: cuda, generate_device: cuda}}
- match: {name: '^model\.layers\.\d+\.self_attn$', class: attention}
  replace: {class: KAttention, device: cuda, kwargs: {op: KAttentionMLA, prefill_device: cuda, generate_device: cuda}}
- match: {name: '^(lm_head|model\.layers\.\d+\..+)$', class: linear}
  replace: {class: KLinear, device: cuda, kwargs: {op: KLinearTorch, prefill_device: cuda, generate_device: cuda}}
- match: {name: '^model\.(embed_tokens|norm|layers\.\d+)$'}
  replace: {class: default, device: cuda}
"""


def prompt_ids(vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(7)
    return torch.randint(3, vocab, (PROMPT_LEN,), generator=g).tolist()


def greedy(gen: Generator, ids: list[int]) -> list[int]:
    return list(gen.generate_ids(ids, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)))


def graphs_vs_eager(model) -> tuple[list[int], list[int], Generator]:
    ids = prompt_ids(model.config.vocab_size)
    gen = Generator(model, None, max_context=300, cuda_graph=False)
    eager = greedy(gen, ids)
    assert gen.engine.runner._graphs is None  # off: never built
    gen.cuda_graph = None
    graphed = greedy(gen, ids)
    assert gen.graph_problem is None, gen.graph_problem
    # batch 1; 256 slots, then max_context rounded up to whole blocks
    assert sorted(gen.engine.runner._graphs._graphs) == [(1, 256), (1, 304)]
    assert graphed == eager
    again = greedy(gen, ids)  # replays only: the captured graphs serve a second request
    assert again == graphed
    return eager, graphed, gen


def test_batched_graphs_equal_eager_per_sequence():
    """Three sequences of different lengths decoded together through graphs of batch 1, 2 and 3 (rows join
    after their prefill and leave as they finish): each one's greedy tokens equal its eager decode alone."""
    from ktcore.engine.core import EngineCore

    model = tiny_model("llama").cuda()
    vocab = model.config.vocab_size
    prompts = [prompt_ids(vocab)[:n] for n in (30, 200, 7)]
    lengths = [12, 20, 5]

    def run(cuda_graph, together):
        engine = EngineCore(model, None, max_context=300, max_concurrency=3, cuda_graph=cuda_graph)
        groups = [list(range(3))] if together else [[i] for i in range(3)]
        out = [None] * 3
        for group in groups:
            seqs = {i: engine.new_sequence(prompts[i], SamplingParams(max_new_tokens=lengths[i], ignore_eos=True),
                                           text=False) for i in group}
            for s in seqs.values():
                engine.add(s)
            while engine.has_work:
                engine.step()
            out = [seqs[i].generated if i in seqs else out[i] for i in range(3)]
        return out, engine

    solo, _ = run(False, together=False)
    graphed, engine = run(None, together=True)
    assert engine.runner.graph_problem is None, engine.runner.graph_problem
    assert {batch for batch, _ in engine.runner._graphs._graphs} == {1, 2, 3}
    assert graphed == solo


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_plain_transformers_model(attn):
    model = tiny_model("llama").cuda()
    model.config._attn_implementation = attn
    eager, graphed, _ = graphs_vs_eager(model)
    assert graphed == eager


def test_injected_all_gpu_moe(tmp_path):
    rules = tmp_path / "all-gpu.yaml"
    rules.write_text(ALL_GPU)
    model, _ = load_model(StateDictSource(tiny_model("deepseek_v2")), rules=rules, progress=False)
    assert any(isinstance(m, KMoE) for m in model.modules())
    eager, graphed, _ = graphs_vs_eager(model)
    assert graphed == eager


def test_hybrid_cpu_experts_inside_the_graph(tmp_path):
    """Routed experts on the CPU (KExpertsCPU): graphs == eager with the stream-ordered path == eager with
    the synchronous submit/sync (the reference), token for token."""
    try:
        from kt_cpu_amx import host_launch
    except ImportError as exc:
        pytest.skip(f"kt-cpu-amx is not installed: {exc}")
    why = host_launch.unavailable_reason(torch.device("cuda"))
    if why:
        pytest.skip(why)
    from ktcore.inject import select_rule_file

    hf = tiny_model("deepseek_v2")
    source = StateDictSource(hf)
    shipped = select_rule_file(hf.config.model_type)
    kmoe = tmp_path / "kmoe.yaml"
    kmoe.write_text(KMOE)
    model, _ = load_model(source, rules=[kmoe, shipped], progress=False)
    experts = [m for m in model.modules() if isinstance(m, KExperts)]
    assert experts and all(m.generate_op.name == "KExpertsCPU" for m in experts)
    ids = prompt_ids(model.config.vocab_size)

    for m in experts:
        m.stream_ordered = False
    reference_gen = Generator(model, None, max_context=300)
    reference = greedy(reference_gen, ids)
    assert "stream_ordered is off" in reference_gen.graph_problem  # cannot capture: fell back, said why
    for m in experts:
        m.stream_ordered = True
    eager, graphed, _ = graphs_vs_eager(model)
    assert eager == reference
    assert graphed == reference
