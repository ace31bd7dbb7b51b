"""KExpertsCPU against KExpertsTorch (and a plain-torch reference) on the same dequantized weights.

Tolerance: relative Frobenius error <= 3e-2 of the layer output (two quantized activations in a row:
the input and the intermediate, int8 per block of 32, or bf16 on the AMX path)."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from cpu_amx_helpers import float_tensor, gguf_dequantize, random_blocks, rel_err
from kt_cpu_amx.ops import KExpertsCPU
from torch import nn

from ktcore.builtin.experts import KExpertsTorch

TOL = 3e-2
E, H, I, TOPK = 8, 256, 256, 2


class FakeExperts(nn.Module):
    """Stands in for a Transformers fused experts module (shapes and act_fn are all an op reads)."""

    def __init__(self, act=None):
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = E, H, I
        self.act_fn = act or nn.SiLU()


def expert_weights(type_name: str, seed: int = 0) -> dict:
    if type_name in ("F32", "BF16"):
        g = torch.Generator().manual_seed(seed)
        return {n: float_tensor(torch.randn(E, *s, generator=g) / s[-1] ** 0.5, type_name, n)
                for n, s in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I)))}
    return {"gate_proj": random_blocks(type_name, (E, I, H), seed, 0.05),
            "up_proj": random_blocks(type_name, (E, I, H), seed + 1, 0.05),
            "down_proj": random_blocks(type_name, (E, H, I), seed + 2, 0.05)}


def routing(tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, H, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:TOPK] for _ in range(tokens)])
    w = torch.softmax(torch.randn(tokens, TOPK, generator=g), -1)
    return x, idx, w


def reference(weights, x, idx, w, act=F.silu):
    deq = {n: (gguf_dequantize(q) if q.ggml_type not in ("F32", "BF16") else q.dequantize()) for n, q in weights.items()}
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for s in range(idx.shape[1]):
            e = int(idx[t, s])
            if not 0 <= e < E:
                continue
            h = act(deq["gate_proj"][e] @ x[t]) * (deq["up_proj"][e] @ x[t])
            out[t] += w[t, s] * (deq["down_proj"][e] @ h)
    return out


@pytest.mark.parametrize("type_name", ["Q4_K", "Q4_0", "Q5_K", "Q6_K", "Q8_0", "BF16"])
@pytest.mark.parametrize("tokens", (1, 3, 64, 512))
def test_experts_match_torch(isa, type_name, tokens):
    weights = expert_weights(type_name)
    ours = KExpertsCPU(FakeExperts())
    ours.load(weights)
    theirs = KExpertsTorch(FakeExperts(), dtype=torch.float32)
    theirs.load(weights)
    x, idx, w = routing(tokens, seed=tokens)
    y = ours(x, idx, w)
    ref = theirs(x, idx, w)
    assert y.shape == (tokens, H)
    assert rel_err(y, ref) < TOL
    if tokens <= 3:
        assert rel_err(y, reference(weights, x, idx, w)) < TOL


def test_gelu_tanh_family(isa):
    weights = expert_weights("Q8_0", seed=4)
    act = nn.GELU(approximate="tanh")
    ours = KExpertsCPU(FakeExperts(act))
    assert ours.activation == "gelu_tanh"
    ours.load(weights)
    x, idx, w = routing(5, seed=4)
    ref = reference(weights, x, idx, w, act=lambda v: F.gelu(v, approximate="tanh"))
    assert rel_err(ours(x, idx, w), ref) < TOL


def test_unsupported_activation_is_named():
    with pytest.raises(ValueError, match="ReLU"):
        KExpertsCPU(FakeExperts(nn.ReLU()))


def test_out_of_range_expert_contributes_nothing():
    weights = expert_weights("Q4_0", seed=5)
    ours = KExpertsCPU(FakeExperts())
    ours.load(weights)
    x, idx, w = routing(4, seed=5)
    idx[1, 0] = -1
    idx[2, 1] = E  # an expert held elsewhere
    assert rel_err(ours(x, idx, w), reference(weights, x, idx, w)) < TOL


def test_submit_returns_before_sync_and_matches_forward():
    weights = expert_weights("Q4_K", seed=6)
    ours = KExpertsCPU(FakeExperts())
    ours.load(weights)
    x, idx, w = routing(64, seed=6)
    expected = ours(x, idx, w)
    ours.submit(x.bfloat16(), idx, w)
    # the caller keeps running Python (the GPU part of a layer) while the pool works
    side = torch.ones(8).sum()
    with pytest.raises(RuntimeError, match="not synced"):
        ours.submit(x, idx, w)
    out = ours.sync()
    assert side == 8 and out.dtype == torch.bfloat16
    assert rel_err(out, expected) < 1e-2
    with pytest.raises(RuntimeError, match="sync without submit"):
        ours.sync()


def test_two_layers_from_two_python_threads():
    layers = []
    for seed in (7, 8):
        op = KExpertsCPU(FakeExperts())
        op.load(expert_weights("Q8_0", seed))
        layers.append(op)
    x, idx, w = routing(16, seed=9)
    expected = [op(x, idx, w) for op in layers]
    results = [None, None]

    def run(i):
        for _ in range(3):
            results[i] = layers[i](x, idx, w)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, exp in zip(results, expected):
        assert torch.equal(got, exp)


@pytest.fixture(params=("amx", "avx512"))
def int8_prefill(request):
    """(ISA, set_rows): an ISA with an int8 prefill kernel (AMX tiles, AVX512-VNNI) and a setter of its runtime's
    expert-row threshold for one test (restored after)."""
    from kt_cpu_amx import runtime

    why = runtime.unavailable_reason(request.param)
    if why:
        pytest.skip(f"{request.param}: {why}")
    rt = runtime.get_runtime(None, request.param)
    saved = rt.amx_min_expert_rows
    yield request.param, lambda rows: setattr(rt, "amx_min_expert_rows", rows)
    rt.amx_min_expert_rows = saved


@pytest.mark.parametrize("type_name,inter", [(t, I) for t in ("Q4_K", "Q4_0", "Q4_1", "Q5_0", "Q5_K", "Q6_K", "Q8_0", "BF16")]
                         + [("Q4_0", 288), ("Q8_0", 288)])  # 9 groups of 32 in down's rows: the odd-group tails
def test_int8_prefill_matches_integer_path(int8_prefill, type_name, inter):
    """The int8 prefill kernel (every expert on it: AMX-INT8 tiles or AVX512-VNNI) against the integer-dot path
    (none) and the reference.

    Both read the same int8 input activations and the exact integer weights, so they differ only in float
    summation order (about 3e-7 here; a rounding flip of the int8 intermediate would show as more)."""
    if inter == I:
        weights = expert_weights(type_name, seed=7)
    else:
        weights = {"gate_proj": random_blocks(type_name, (E, inter, H), 7, 0.05),
                   "up_proj": random_blocks(type_name, (E, inter, H), 8, 0.05),
                   "down_proj": random_blocks(type_name, (E, H, inter), 9, 0.05)}
    module = FakeExperts()
    module.intermediate_dim = inter
    isa, amx_expert_rows = int8_prefill
    ours = KExpertsCPU(module, isa=isa)
    ours.load(weights)
    x, idx, w = routing(40, seed=7)  # about 10 rows per expert: a partial token block of 16
    amx_expert_rows(1)
    y_tiles = ours(x, idx, w)
    amx_expert_rows(10**9)
    y_dots = ours(x, idx, w)
    assert rel_err(y_tiles, y_dots) < 1e-5
    assert rel_err(y_tiles, reference(weights, x, idx, w)) < TOL
