"""Expert placement inside ``KMoE``: hot experts on another device, routed experts streamed there for
prefill, selective experts and expert deferral.

The "GPU side" is device-generic: on a machine without CUDA it is ``KExpertsTorch`` on the CPU, which is
what these tests run; the CUDA tests at the end run ``KExpertsGPU`` for real where CUDA exists.

Tolerances (logits of a 16-token prompt, ``scale = max |reference logit|``): the split model against the
same model with all routed experts in one ``KExpertsTorch``: ``<= 1e-5 * scale`` (the two halves are
summed in another order); KExpertsGPU (bfloat16 activations) against the fp32 reference: relative
Frobenius error <= 2e-2.
"""

from __future__ import annotations

import pytest
import torch

from ktcore.builtin.experts import select_experts
from ktcore.inject import load_model
from ktcore.modules import module_role
from ktcore.moe import KMoE, MoEChain, hot_experts_problem, layer_index
from ktcore.registry import Registry
from ktcore.rules import RuleError, load_rules
from ktcore.testing import tiny_model
from ktcore.weights.state_dict import StateDictSource
from test_moe_hybrid import hybrid_rules, logits, prompt

MOE_FAMILIES = ("deepseek_v2", "deepseek_v3", "qwen2_moe", "qwen3_moe", "mixtral")
REL_TOL = 1e-5
NO_CUDA = "CUDA is not available"

def rules_file(tmp_path, kwargs="{}", device="cpu", name="rules.yaml"):
    """test_moe_hybrid's rules (routed experts in KExpertsTorch on the CPU, KMoE on ``device``, the rest there)
    with ``kwargs`` on the KMoE rule."""
    path = hybrid_rules(tmp_path, device=device, name=name)
    kmoe = f"    class: KMoE\n    device: {device}\n"
    path.write_text(path.read_text().replace(kmoe, kmoe + f"    kwargs: {kwargs}\n"))
    return path


@pytest.fixture(scope="module")
def registry():
    return Registry(entrypoints=False)


def blocks(model):
    return [m for m in model.modules() if isinstance(m, KMoE)]


def load(hf, path, registry):
    return load_model(StateDictSource(hf), path, registry=registry, progress=False)[0]


# -- pieces ------------------------------------------------------------------------------------------------


def test_select_experts_takes_whole_experts_in_order():
    from ktcore.weights.tensor import QuantizedTensor

    data = torch.arange(4 * 6, dtype=torch.uint8)
    qt = QuantizedTensor("w", "F32", (4, 6), data)
    sub = select_experts(qt, [3, 1])
    assert sub.shape == (2, 6) and sub.ggml_type == "F32"
    assert torch.equal(sub.data, torch.cat([data[18:24], data[6:12]]))
    assert select_experts(qt, [0, 1, 2, 3]).data.data_ptr() == data.data_ptr()  # all, in order: a view
    with pytest.raises(ValueError, match="outside 0..3"):
        select_experts(qt, [4])


def test_option_checks():
    assert hot_experts_problem([0, 3]) is None and hot_experts_problem("all") is None
    assert hot_experts_problem({1: [0], "2": "all"}) is None
    assert "given twice" in hot_experts_problem([1, 1])
    assert "integers >= 0" in hot_experts_problem([-1])
    assert "layer 'x'" in hot_experts_problem({"x": [0]})
    assert layer_index("model.layers.12.mlp") == 12 and layer_index("mlp") is None
    hf = tiny_model("qwen3_moe", seed=0)
    block = hf.model.layers[1].mlp
    for kwargs, message in ((dict(defer=-1), "defer must be an integer >= 0"),
                            (dict(top_k=0), "top_k must be an integer >= 1"),
                            (dict(gpu_prefill_threshold=True), "gpu_prefill_threshold must be"),
                            (dict(hot_experts=[99]), r"hot_experts \[99\] outside 0..7"),
                            (dict(gpu_device="nowhere"), "gpu_device must be a torch device")):
        with pytest.raises(ValueError, match=message):
            KMoE(block, name="model.layers.1.mlp", **kwargs)


def test_rule_file_reports_bad_kmoe_options(registry, tmp_path):
    path = rules_file(tmp_path, "{hot_experts: [1, 1], defer: x, top_k: 2}")
    with pytest.raises(RuleError) as info:
        load_rules(path, registry)
    fields = {i.field for i in info.value.issues}
    assert fields == {"replace.kwargs.hot_experts", "replace.kwargs.defer"}


# -- hot experts: split between two ops, summed ----------------------------------------------------------


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_hot_experts_split_equals_one_op(family, registry, tmp_path):
    hf = tiny_model(family, seed=0)
    ids = prompt(hf.config)
    reference = logits(load(hf, rules_file(tmp_path, name="ref.yaml"), registry), ids)
    hot = "{hot_experts: {1: [0, 3, 5], 2: all}, gpu_op: KExpertsTorch, gpu_device: cpu}"
    model = load(hf, rules_file(tmp_path, hot), registry)
    by_layer = {b.layer_index: b for b in blocks(model)}
    assert by_layer[1].hot == [0, 3, 5] and by_layer[1].hot_op.num_experts == 3
    calls = {"cold": 0, "hot": 0}

    def count(kind, expected_valid):
        def hook(module, args):
            index = args[1]
            calls[kind] += int(((index >= 0) & (index < module.num_experts)).sum())
        return hook

    by_layer[1].hot_op.register_forward_pre_hook(count("hot", None))
    by_layer[1].experts.generate_op.register_forward_pre_hook(count("cold", None))
    got = logits(model, ids)
    k = hf.config.num_experts_per_tok
    assert calls["hot"] > 0 and calls["cold"] > 0 and calls["hot"] + calls["cold"] == ids.numel() * k
    assert (got - reference).abs().max() <= REL_TOL * reference.abs().max()


def test_loaded_bytes_count_each_tensor_once_when_kmoe_reads_the_experts_too(registry, tmp_path):
    # the loading bar's MiB: hot experts make KMoE read its experts' tensors beside the experts child
    hf = tiny_model("qwen3_moe", seed=0)
    model = load(hf, rules_file(tmp_path, "{hot_experts: all, gpu_op: KExpertsTorch, gpu_device: cpu}"), registry)
    assert all(b.hot for b in blocks(model))
    assert model.ktcore_loaded_bytes == sum(t.numel() * t.element_size() for t in hf.state_dict().values())


def test_hot_experts_with_the_cpu_kernel(tmp_path):
    """KExpertsCPU for the cold experts (hot ones masked with -1, which the kernel skips) and KExpertsTorch
    for the hot ones: the same as KExpertsCPU with the hot experts' share computed in torch."""
    registry = Registry()
    if "KExpertsCPU" not in registry.ops("experts") or registry.get("experts", "KExpertsCPU").available("cpu"):
        pytest.skip("kt-cpu-amx is not installed or cannot run here")
    hf = tiny_model("qwen3_moe", seed=0)
    ids = prompt(hf.config)
    text = rules_file(tmp_path).read_text().replace("op: KExpertsTorch", "op: KExpertsCPU")
    path = tmp_path / "cpu.yaml"
    path.write_text(text)
    plain = logits(load(hf, path, registry), ids)
    path.write_text(text.replace("kwargs: {}", "kwargs: {hot_experts: all, gpu_op: KExpertsTorch, gpu_device: cpu}"))
    all_hot = logits(load(hf, path, registry), ids)
    reference = logits(load(hf, rules_file(tmp_path, name="ref.yaml"), Registry(entrypoints=False)), ids)
    # every expert hot: exactly the torch reference; none hot: the CPU kernel's own error
    assert (all_hot - reference).abs().max() <= REL_TOL * reference.abs().max()
    assert float((plain - reference).norm() / reference.norm()) < 2e-2


# -- streamed experts (the GPU prefill path, here on the CPU) --------------------------------------------


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_streamed_experts_equal_resident_ones(family, registry, tmp_path, monkeypatch):
    hf = tiny_model(family, seed=0)
    ids = prompt(hf.config)
    reference = logits(load(hf, rules_file(tmp_path, name="ref.yaml"), registry), ids)
    model = load(hf, rules_file(tmp_path, "{gpu_prefill_threshold: 4, gpu_op: KExpertsTorch, gpu_device: cpu}"),
                 registry)
    events = []
    for b in blocks(model):
        for name in ("start_copy", "take_copy"):
            original = getattr(b, name)
            monkeypatch.setattr(b, name, lambda orig=original, n=name, i=b.layer_index: (events.append((n, i)), orig())[1])
        b.experts.prefill_op.register_forward_pre_hook(lambda m, a: events.append(("cpu experts", None)))
    got = logits(model, ids)  # 16 tokens > 4: streamed
    assert (got - reference).abs().max() <= REL_TOL * reference.abs().max()
    layers = [b.layer_index for b in blocks(model)]
    assert ("cpu experts", None) not in events
    if len(layers) > 1:  # the next block's copy starts before that block is reached (prefetch)
        assert events.index(("start_copy", layers[1])) < events.index(("take_copy", layers[1]))
    events.clear()
    short = logits(model, ids[:, :4])  # 4 tokens: the resident experts
    assert ("cpu experts", None) in events and not any(n == "take_copy" for n, _ in events)
    assert short.shape[1] == 4


def test_auto_threshold_streams_when_the_pinned_copies_fit(registry, tmp_path, monkeypatch):
    """``gpu_prefill_threshold: auto`` (the shipped gpu-cpu files): the measured threshold when the devices have
    room for the pinned copies, off (and said so) when the free RAM is short; the model loads either way."""
    from ktcore import placement

    hf = tiny_model("qwen3_moe", seed=0)
    ids = prompt(hf.config)
    reference = logits(load(hf, rules_file(tmp_path, name="ref.yaml"), registry), ids)
    auto = rules_file(tmp_path, "{gpu_prefill_threshold: auto, gpu_op: KExpertsTorch, gpu_device: cpu}")
    model, report = load_model(StateDictSource(hf), auto, registry=registry, progress=False)
    assert {b.gpu_prefill_threshold for b in blocks(model)} == {placement.GPU_PREFILL_THRESHOLD}
    assert any("streamed GPU prefill on" in note for note in report.notes)
    assert all(b._host is not None for b in blocks(model))
    assert (logits(model, ids) - reference).abs().max() <= REL_TOL * reference.abs().max()

    monkeypatch.setattr(placement, "free_memory", lambda device: 2**10 if device == "cpu" else None)
    model, report = load_model(StateDictSource(hf), auto, registry=registry, progress=False, check_memory=False)
    assert {b.gpu_prefill_threshold for b in blocks(model)} == {None}
    assert any("streamed GPU prefill off" in note and "cpu needs" in note for note in report.notes)
    assert all(b._host is None for b in blocks(model))
    assert (logits(model, ids) - reference).abs().max() <= REL_TOL * reference.abs().max()


def test_auto_threshold_without_the_device_is_off(registry, tmp_path):
    hf = tiny_model("qwen3_moe", seed=0)
    path = rules_file(tmp_path, "{gpu_prefill_threshold: auto, gpu_op: KExpertsTorch, gpu_device: cuda}")
    if torch.cuda.is_available():
        pytest.skip("CUDA is present: the auto threshold may turn on")
    model = load(hf, path, registry)
    assert {b.gpu_prefill_threshold for b in blocks(model)} == {None}


# -- selective experts and deferral ----------------------------------------------------------------------


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_defer_zero_is_bit_identical(family, registry, tmp_path):
    hf = tiny_model(family, seed=0)
    ids = prompt(hf.config)
    plain = logits(load(hf, rules_file(tmp_path, name="a.yaml"), registry), ids)
    k = hf.config.num_experts_per_tok
    off = logits(load(hf, rules_file(tmp_path, f"{{defer: 0, top_k: {k}}}", name="b.yaml"), registry), ids)
    assert torch.equal(plain, off)


def reference_expert_output(block, flat, index, weights):
    """Transformers' own experts module on the given choices."""
    return block.original.experts(flat, index, weights)


@pytest.mark.parametrize("family", ("deepseek_v2", "qwen2_moe", "mixtral"))
def test_deferral_moves_the_lowest_weight_experts_to_the_next_block(family):
    hf = tiny_model(family, seed=0)
    named = [(n, m) for n, m in hf.named_modules() if module_role(m) == "moe"]
    k = hf.config.num_experts_per_tok
    if len(named) < 2:
        named = named * 2  # one MoE layer: chain it to itself as two blocks
    (n1, m1), (n2, m2) = named[0], named[1]
    a, b = KMoE(m1, name=n1, defer=1).eval(), KMoE(m2, name=n2, defer=1).eval()
    chain = MoEChain([a, b])
    a._chain = b._chain = chain
    g = torch.Generator().manual_seed(4)
    x1, x2 = (torch.randn(1, 5, hf.config.hidden_size, generator=g) for _ in range(2))
    with torch.no_grad():
        out_a, out_b = a(x1), b(x2)
        f1 = x1.reshape(-1, x1.shape[-1])
        _, w1, i1 = m1.gate(f1)
        order = torch.argsort(w1, dim=-1, descending=True, stable=True)
        i1, w1 = i1.gather(-1, order), w1.gather(-1, order)
        now = reference_expert_output(a, f1, i1[:, : k - 1], w1[:, : k - 1])
        later = reference_expert_output(a, f1, i1[:, k - 1 :], w1[:, k - 1 :])
        shared1 = a.shared_output(x1, f1)
        expect_a = now.reshape(x1.shape) + (0 if shared1 is None else shared1.reshape(x1.shape))
        expect_b = m2(x2) + later.reshape(x2.shape)  # the last block runs all its experts
    torch.testing.assert_close(out_a, expect_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_b, expect_b, rtol=1e-5, atol=1e-6)
    assert chain.deferred is None


def test_selective_experts_run_the_highest_weight_ones(registry, tmp_path):
    hf = tiny_model("qwen3_moe", seed=0)
    block = hf.model.layers[1].mlp
    kmoe = KMoE(block, name="model.layers.1.mlp", top_k=1).eval()
    x = torch.randn(1, 6, hf.config.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        flat = x.reshape(-1, x.shape[-1])
        _, w, i = block.gate(flat)
        best = w.argmax(-1, keepdim=True)
        expected = block.experts(flat, i.gather(-1, best), w.gather(-1, best)).reshape(x.shape)
        torch.testing.assert_close(kmoe(x), expected, rtol=1e-5, atol=1e-6)


def test_defer_needs_a_chain_and_leaves_experts_to_run(registry, tmp_path):
    hf = tiny_model("qwen3_moe", seed=0)
    x = torch.randn(1, 3, hf.config.hidden_size)
    with pytest.raises(RuntimeError, match="link_moe_blocks"):
        KMoE(hf.model.layers[0].mlp, name="model.layers.0.mlp", defer=1).eval()(x)
    model = load(hf, rules_file(tmp_path, "{defer: 2}"), registry)
    assert all(b._chain is blocks(model)[0]._chain for b in blocks(model))
    with pytest.raises(ValueError, match="defer=2 leaves no expert"):
        logits(model, prompt(hf.config))


def test_whole_model_with_deferral_and_a_stale_deferral(registry, tmp_path):
    hf = tiny_model("deepseek_v2", seed=0)
    ids = prompt(hf.config)
    model = load(hf, rules_file(tmp_path, "{defer: 1}"), registry)
    first = logits(model, ids)
    chain = blocks(model)[0]._chain
    assert chain.deferred is None  # the last block never defers
    stale = blocks(model)[0]
    stale.experts.submit(torch.zeros(ids.numel(), hf.config.hidden_size), torch.zeros(ids.numel(), 1, dtype=torch.long),
                         torch.ones(ids.numel(), 1))
    chain.deferred = (blocks(model)[-1], stale.experts)  # left over from an interrupted forward
    assert torch.equal(logits(model, ids), first)


# -- CUDA --------------------------------------------------------------------------------------------------


def cuda_registry():
    registry = Registry()
    if "KExpertsGPU" not in registry.ops("experts"):
        pytest.skip("kt-cuda (KExpertsGPU) is not installed")
    return registry


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_gpu_hot_experts_and_streamed_prefill(family, tmp_path):
    """KExpertsGPU as the hot op and as the streamed-prefill op, everything else on the GPU, routed experts
    on the CPU: same logits as the model with all routed experts in KExpertsTorch on the CPU."""
    registry = cuda_registry()
    hf = tiny_model(family, seed=0)
    ids = prompt(hf.config)
    reference = logits(load(hf, rules_file(tmp_path, device="cuda", name="ref.yaml"), registry), ids)
    for kwargs in ("{hot_experts: [0, 2, 7]}", "{gpu_prefill_threshold: 4}", "{hot_experts: all, gpu_prefill_threshold: 8}"):
        model = load(hf, rules_file(tmp_path, kwargs, device="cuda", name="split.yaml"), registry)
        got = logits(model, ids)
        err = float((got - reference).norm() / reference.norm())
        assert err < 2e-2, (kwargs, err)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_gpu_streamed_copy_runs_on_the_side_stream(tmp_path):
    """The next block's copy is enqueued on the side stream before the current block's experts compute,
    and the compute stream waits for it through an event (no host synchronization)."""
    from ktcore.moe import copy_stream

    registry = cuda_registry()
    hf = tiny_model("deepseek_v2", seed=0)
    model = load(hf, rules_file(tmp_path, "{gpu_prefill_threshold: 4}", device="cuda"), registry)
    seen = []
    for b in blocks(model):
        original = b.start_copy

        def start(orig=original, block=b):
            seen.append((block.layer_index, torch.cuda.current_stream().cuda_stream))
            orig()
            data, event = block._inflight
            assert event is not None and data.is_cuda
        b.start_copy = start
    logits(model, prompt(hf.config))
    assert len(seen) == len(blocks(model))
    side = copy_stream(torch.device("cuda", torch.cuda.current_device())).cuda_stream
    assert side != torch.cuda.current_stream().cuda_stream
    assert all(b._inflight is None for b in blocks(model))


def greedy(model, ids, cuda_graph, n=8):
    from ktcore.generate import Generator, SamplingParams

    gen = Generator(model, None, max_context=48, cuda_graph=cuda_graph)
    return list(gen.generate_ids(ids, SamplingParams(max_new_tokens=n, ignore_eos=True))), gen


def test_generate_with_deferral_and_hot_experts_on_cpu(registry, tmp_path):
    """Prefill and decode through the Generator with deferral and hot experts: the decode tokens are those
    of the full forward of the same model on the growing sequence (no state leaks between steps)."""
    hf = tiny_model("deepseek_v2", seed=0)
    model = load(hf, rules_file(tmp_path, "{defer: 1, hot_experts: [1, 4], gpu_op: KExpertsTorch, gpu_device: cpu}"),
                 registry)
    ids = prompt(hf.config, length=6)[0].tolist()
    tokens, _ = greedy(model, ids, cuda_graph=False, n=4)
    seq = list(ids)
    for _ in range(4):
        seq.append(int(logits(model, torch.tensor([seq]))[0, -1].argmax()))
    assert tokens == seq[len(ids):]


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_gpu_graph_decode_with_hot_experts_and_deferral(tmp_path):
    """CUDA-graph decode (routed experts on the CPU through the stream-ordered path, hot ones in KExpertsGPU,
    deferral across blocks) gives the tokens eager decode gives."""
    registry = cuda_registry()
    hf = tiny_model("deepseek_v2", seed=0)
    ops = ["KExpertsTorch"] + (["KExpertsCPU"] if "KExpertsCPU" in registry.ops("experts") else [])
    ids = prompt(hf.config, length=6)[0].tolist()
    for op in ops:
        text = rules_file(tmp_path, "{defer: 1, hot_experts: [0, 3]}", device="cuda").read_text()
        path = tmp_path / f"{op}.yaml"
        path.write_text(text.replace("op: KExpertsTorch", f"op: {op}"))
        model = load(hf, path, registry)
        eager, _ = greedy(model, ids, cuda_graph=False)
        graphed, gen = greedy(model, ids, cuda_graph=None)
        if op == "KExpertsCPU":
            assert gen.graph_problem is None, gen.graph_problem
        assert graphed == eager, op
