"""The hybrid MoE method without an engine (vLLM is not needed): ``HybridExperts`` over a tiny Qwen3-MoE GGUF,
the GPU experts through a torch function over their slots (what vLLM's own method computes), the CPU experts
through kt-cpu-amx's ``KExpertsCPU`` (ktcore's torch op where it is absent), against the torch reference of
all experts on the GGUF's values. On a CUDA device the whole call is captured into a CUDA graph, the CPU part
through kt-cpu-amx's stream-ordered host functions (``KExperts.stream_path``), and replayed on new inputs.

GPU host: ``.venv-test/bin/python -m pytest -q plugins/kt_vllm/tests/test_kt_vllm_hybrid.py``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ktcore.testing import tiny_model
from ktcore.weights import open_source
from ktcore.weights.gguf_writer import write_gguf
from kt_vllm.hybrid import HybridExperts, cpu_experts, gpu_expert_ids

LAYER = "model.layers.1.mlp.experts"
E, K = 8, 2
MASKS = {"none": None, "half": [0, 2, 4, 6], "all": "all"}
# KExpertsCPU computes with int8 (or, on AMX, bf16) activations over the Q8_0 blocks; the reference in fp32
REL_TOL = 2e-2


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("hybrid") / "qwen3_moe.gguf"
    return str(write_gguf(tiny_model("qwen3_moe"), path, qtypes={r"_exps\.": "Q8_0", "default": "F32"}))


@pytest.fixture(scope="module")
def weights(gguf):
    """The layer's gate, up, down ``[E, ...]`` as the GGUF holds them, dequantized."""
    source = open_source(gguf)
    return [source.get(f"{LAYER}.{p}").dequantize(torch.float32) for p in ("gate_proj", "up_proj", "down_proj")]


def experts_reference(weights, x, ids, w) -> torch.Tensor:
    """Routed experts, one expert at a time, in float32 (an index outside ``[0, E)`` contributes nothing)."""
    gate, up, down = (t.to(x.device) for t in weights)
    out = torch.zeros_like(x, dtype=torch.float32)
    xf = x.float()
    for e in range(gate.shape[0]):
        rows, slot = (ids == e).nonzero(as_tuple=True)
        if rows.numel():
            h = F.silu(xf[rows] @ gate[e].T) * (xf[rows] @ up[e].T)
            out.index_add_(0, rows, (h @ down[e].T) * w[rows, slot, None].float())
    return out


def gpu_part(weights, gpu_ids, device=None):
    """What vLLM's method computes for the GPU experts: the same experts over their slots ``0..n-1`` (every
    slot on every token, weighted by how the token chose it: no data-dependent shapes, so capturable once the
    weights are on ``device``, as vLLM's are)."""
    gate, up, down = (t[gpu_ids].to(device) if device is not None else t[gpu_ids] for t in weights)

    def run(x, slots, w):
        g, u, d = (t.to(x.device) for t in (gate, up, down))
        xf = x.float()
        chosen = (slots[:, :, None] == torch.arange(len(gpu_ids), device=x.device)).float()  # [T, K, n]
        per_slot = (chosen * w[:, :, None].float()).sum(1)  # [T, n]
        h = F.silu(torch.einsum("th,nih->tni", xf, g)) * torch.einsum("th,nih->tni", xf, u)
        return torch.einsum("tni,nhi,tn->th", h, d, per_slot).to(x.dtype)

    return run


def routing(tokens: int, seed: int, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 256, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(tokens)])
    w = torch.softmax(torch.randn(tokens, K, generator=g), -1)
    return x.to(device), ids.to(device), w.to(device)


def relative_error(out, ref) -> float:
    return float((out.float() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("mask", list(MASKS))
def test_split_sums_to_the_whole_layer(gguf, weights, mask):
    gpu_ids = gpu_expert_ids(MASKS[mask], 1, E, LAYER)
    cpu = cpu_experts(gguf, LAYER, "KExpertsCPU", dims=(E, 256, 256)) if len(gpu_ids) < E else None
    hybrid = HybridExperts(E, gpu_ids, cpu, LAYER)
    x, ids, w = routing(5, seed=1)
    shared = []
    out = hybrid.run(x, w, ids, gpu_part(weights, gpu_ids), beside=lambda: shared.append(True))
    ref = experts_reference(weights, x, ids, w)
    assert shared == [True]
    assert relative_error(out, ref) < REL_TOL
    # another TP rank computes no CPU experts: its part is the GPU experts' alone (the all-reduce adds them)
    rank1 = HybridExperts(E, gpu_ids, None, LAYER).run(x, w, ids, gpu_part(weights, gpu_ids))
    on_gpu = torch.isin(ids, torch.tensor(gpu_ids, dtype=ids.dtype))
    gpu_only = experts_reference(weights, x, torch.where(on_gpu, ids, -1), w)
    assert relative_error(rank1, gpu_only) < 1e-5 if gpu_ids else rank1.abs().max() == 0


def test_split_routes_each_choice_to_one_side():
    hybrid = HybridExperts(E, [1, 5], None, LAYER)
    ids = torch.tensor([[1, 2], [5, 1], [0, 7]], dtype=torch.int32)
    w = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5]])
    slots, gpu_w, cpu_ids = hybrid.split(ids, w)
    assert slots.tolist() == [[0, 0], [1, 0], [0, 0]] and slots.dtype == torch.int32
    assert torch.equal(gpu_w, torch.tensor([[0.6, 0.0], [0.7, 0.3], [0.0, 0.0]]))
    assert cpu_ids.tolist() == [[-1, 2], [-1, -1], [0, 7]]


def test_gpu_experts_option_errors_name_the_option():
    with pytest.raises(ValueError, match=r"gpu_experts \[9\] outside 0..7"):
        gpu_expert_ids([1, 9], 1, E, LAYER)
    with pytest.raises(ValueError, match="gpu_experts must be"):
        gpu_expert_ids("some", 1, E, LAYER)
    assert gpu_expert_ids({"1": "all", "3": [2]}, 3, E, LAYER) == [2]
    assert gpu_expert_ids({"1": "all"}, 2, E, LAYER) == []


def test_gguf_of_another_model_is_refused(gguf):
    with pytest.raises(ValueError, match=r"holds \(experts, hidden, intermediate\) = \(8, 256, 256\).*\(8, 256, 512\)"):
        cpu_experts(gguf, LAYER, "KExpertsCPU", dims=(E, 256, 512))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (a CUDA graph captures the hybrid call)")
@pytest.mark.parametrize("mask", ["none", "half"])
def test_cuda_graph_captures_the_hybrid_call(gguf, weights, mask):
    pytest.importorskip("kt_cpu_amx", reason="the stream-ordered CPU experts are kt-cpu-amx's")
    device = torch.device("cuda")
    gpu_ids = gpu_expert_ids(MASKS[mask], 1, E, LAYER)
    cpu = cpu_experts(gguf, LAYER, "KExpertsCPU", dims=(E, 256, 256))
    hybrid = HybridExperts(E, gpu_ids, cpu, LAYER)
    gpu = gpu_part(weights, gpu_ids, device)
    x, ids, w = routing(4, seed=2, device=device)
    assert cpu.stream_path(cpu.pick(4), x, 4), "KExpertsCPU should take the stream-ordered path on CUDA"
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph (allocations, buffers of the host functions)
        for _ in range(2):
            hybrid.run(x, w, ids, gpu)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = hybrid.run(x, w, ids, gpu)
    for seed in (3, 4):
        new_x, new_ids, new_w = routing(4, seed=seed, device=device)
        x.copy_(new_x), ids.copy_(new_ids), w.copy_(new_w)
        graph.replay()
        torch.cuda.synchronize()
        cpu.generate_op.raise_stream_error()
        assert relative_error(out, experts_reference(weights, new_x, new_ids, new_w)) < REL_TOL, seed


def test_vllm_version_range_is_checked():
    from kt_vllm import VLLM_RANGE, vllm_version_problem

    assert vllm_version_problem("0.32.0") is None and vllm_version_problem("0.32.3+cpu") is None
    for version in ("0.31.2", "0.33.0", "1.0.0"):
        problem = vllm_version_problem(version)
        assert f"supports vllm{VLLM_RANGE}" in problem and f"this is vLLM {version}" in problem
    assert "cannot read the vLLM version 'dev'" in vllm_version_problem("dev")
