"""The hybrid MoE path: ``KMoE`` (routed experts submitted asynchronously, shared experts overlapped),
``KExperts.submit``/``sync`` and the model-level ``transfer_map``.

Tolerances (logits of a 16-token prompt; ``scale = max |reference logit|``):
- a ``KMoE`` block with the block's own experts: bit-identical to the block's forward;
- the whole model with KMoE + ``KExpertsTorch`` (fp32): ``max |diff| <= 1e-5 * scale`` (the op sums the
  experts in another order than Transformers);
- KMoE + ``KExpertsCPU`` (kt-cpu-amx): bit-identical to the same op run synchronously without KMoE, and
  against Transformers within that plugin's stated tolerance (relative Frobenius error of the logits
  <= 2e-2, deepseek_v3 <= 1e-1: the op quantizes fp32 weights and activations to int8 online).
"""

from __future__ import annotations

import threading

import pytest
import torch

import ktcore
import ktcore.moe
from ktcore.inject import LoadError, build_meta_model, inject, load_model
from ktcore.modules import KExperts, KLinear, module_role
from ktcore.moe import KMoE, LayerDevices
from ktcore.registry import Registry
from ktcore.rules import RuleError, load_rules
from ktcore.testing import tiny_config, tiny_model
from ktcore.weights.state_dict import StateDictSource

MOE_FAMILIES = ("deepseek_v2", "deepseek_v3", "qwen2_moe", "qwen3_moe", "mixtral")
SHARED_FAMILIES = ("deepseek_v2", "qwen2_moe")  # shared_experts / gated shared_expert
TORCH_REL_TOL = 1e-5
CPU_OP_TOL = {"deepseek_v3": 1e-1}
CPU_OP_DEFAULT_TOL = 2e-2
NO_CUDA = "CUDA is not available"

HYBRID_RULES = r"""
- match:
    name: '^model\.layers\.\d+\.mlp\.experts$'
    class: experts
  replace:
    class: KExperts
    device: cpu
    kwargs: {{op: {experts_op}, prefill_device: cpu, generate_device: cpu{out}}}
  recursive: false
- match:
    name: '^model\.layers\.\d+\.mlp$'
    class: moe
  replace:
    class: KMoE
    device: {device}
{rest}"""

GPU_REST = r"""
- match: {name: '^model\.rotary_emb$', class: rope}
  replace: {class: KRoPE, device: cuda, kwargs: {op: KRoPETorch, prefill_device: cuda, generate_device: cuda}}
- match: {name: '^(lm_head|model\.layers\.\d+\..+)$', class: linear}
  replace: {class: KLinear, device: cuda, kwargs: {op: KLinearTorch, prefill_device: cuda, generate_device: cuda}}
- match: {name: '^model\.(embed_tokens|norm|layers\.\d+)$'}
  replace: {class: default, device: cuda}
"""


def hybrid_rules(tmp_path, experts_op="KExpertsTorch", device="cpu", extra="", name="hybrid.yaml"):
    out = ", out_device: cuda" if device == "cuda" else ""
    rest = GPU_REST if device == "cuda" else ""
    path = tmp_path / name
    path.write_text(HYBRID_RULES.format(experts_op=experts_op, out=out, device=device, rest=rest) + extra)
    return path


@pytest.fixture(scope="module")
def torch_registry():
    return Registry(entrypoints=False)


def prompt(config, length=16, seed=1):
    return torch.randint(3, config.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(ids.to(next(model.parameters()).device)).logits.float().cpu()


def moe_blocks(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, KMoE)}


# -- KMoE on one block -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_kmoe_block_is_bit_identical_to_the_block(family):
    hf = tiny_model(family, seed=0)
    name, block = next((n, m) for n, m in hf.named_modules() if module_role(m) == "moe")
    x = torch.randn(2, 5, hf.config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = block(x)
        got = KMoE(block, name=name)(x)
    assert got.shape == expected.shape
    assert torch.equal(got, expected)


def test_kmoe_refuses_a_dense_mlp_and_a_bad_overlap_option():
    hf = tiny_model("deepseek_v2", seed=0)
    dense = hf.model.layers[0].mlp
    assert module_role(dense) is None
    with pytest.raises(ValueError, match="no 'gate' and 'experts' children"):
        KMoE(dense, name="model.layers.0.mlp")
    with pytest.raises(ValueError, match="overlap must be true or false"):
        KMoE(hf.model.layers[1].mlp, overlap="yes")


# -- whole models: KMoE + KExpertsTorch, KMoE + KExpertsCPU ------------------------------------------------


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_kmoe_with_torch_experts_matches_transformers(family, torch_registry, tmp_path):
    hf = tiny_model(family, seed=0)
    model, report = load_model(StateDictSource(hf), hybrid_rules(tmp_path), registry=torch_registry, progress=False)
    blocks = moe_blocks(model)
    expected_blocks = [n for n, m in hf.named_modules() if module_role(m) == "moe"]
    assert sorted(blocks) == sorted(expected_blocks)
    assert all(isinstance(b.experts, KExperts) for b in blocks.values())
    rows = {r.module: r for r in report.rows}
    assert rows[expected_blocks[0]].wrapper == "KMoE" and rows[expected_blocks[0]].prefill_op == ""
    ids = prompt(hf.config)
    expected, got = logits(hf, ids), logits(model, ids)
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= TORCH_REL_TOL * scale


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_kmoe_with_cpu_experts_op(family, amx_registry, tmp_path):
    """KExpertsCPU submitted by KMoE gives exactly what the same op gives run synchronously (block's own
    forward calling the KExperts wrapper), and matches Transformers within the op's tolerance."""
    from kt_cpu_amx.ops import KExpertsCPU

    hf = tiny_model(family, seed=0)
    source = StateDictSource(hf)
    hybrid, _ = load_model(source, hybrid_rules(tmp_path, "KExpertsCPU"), registry=amx_registry, progress=False)
    sync_rules = tmp_path / "sync.yaml"  # the same experts rule, no KMoE: the block's forward calls KExperts
    sync_rules.write_text(hybrid_rules(tmp_path, "KExpertsCPU").read_text().split("- match:")[1].join(["- match:", ""]))
    synchronous, _ = load_model(source, sync_rules, registry=amx_registry, progress=False)
    assert moe_blocks(hybrid) and not moe_blocks(synchronous)
    assert all(isinstance(b.experts.generate_op, KExpertsCPU) for b in moe_blocks(hybrid).values())
    ids = prompt(hf.config)
    got, same_op, expected = logits(hybrid, ids), logits(synchronous, ids), logits(hf, ids)
    assert torch.equal(got, same_op)
    rel = float((got - expected).norm() / expected.norm())
    assert rel < CPU_OP_TOL.get(family, CPU_OP_DEFAULT_TOL), f"{family}: relative logits error {rel:.4f}"


# -- the asynchronous contract and the overlap ---------------------------------------------------------------


class RecordingAsyncExperts(ktcore.Op):
    """Experts op with the asynchronous API: ``submit`` starts a worker that waits (up to ``wait_s``) for
    the shared experts to run, then computes Transformers' experts; ``EVENTS`` records the call order."""

    name = "KExpertsRecordingAsync"
    role = "experts"
    devices = ("cpu",)
    EVENTS: list[str] = []
    SHARED_RAN = threading.Event()
    wait_s = 10.0

    def __init__(self, module, device="cpu", **kwargs):
        super().__init__(module, device, **kwargs)
        self.module = module
        self.worker = None

    def load(self, weights):
        gate = weights["gate_proj"].dequantize(torch.float32, "cpu")
        up = weights["up_proj"].dequantize(torch.float32, "cpu")
        self.gate_up = torch.cat([gate, up], dim=1)
        self.down = weights["down_proj"].dequantize(torch.float32, "cpu")

    def compute(self, hidden, index, weights):
        out = torch.zeros_like(hidden)
        for t in range(hidden.shape[0]):
            for k in range(index.shape[1]):
                e = int(index[t, k])
                g, u = (self.gate_up[e] @ hidden[t]).chunk(2)
                out[t] += weights[t, k] * (self.down[e] @ (self.module.act_fn(g) * u))
        return out

    def submit(self, hidden, index, weights):
        type(self).EVENTS.append("submit")

        def work():
            self.saw_shared = type(self).SHARED_RAN.wait(timeout=self.wait_s)
            self.result = self.compute(hidden, index, weights)

        self.worker = threading.Thread(target=work)
        self.worker.start()

    def sync(self):
        self.worker.join()
        type(self).EVENTS.append("sync" if self.saw_shared else "sync (shared experts had not run)")
        return self.result

    def forward(self, hidden, index, weights):
        self.submit(hidden, index, weights)
        return self.sync()


class RecordingPlugin:
    @ktcore.hookimpl
    def register_experts_ops(self, register):
        register(RecordingAsyncExperts)


def record_shared(model):
    def hook(module, args):
        RecordingAsyncExperts.EVENTS.append("shared")
        RecordingAsyncExperts.SHARED_RAN.set()

    for block in moe_blocks(model).values():
        shared = getattr(block, "shared_experts", None) or getattr(block, "shared_expert", None)
        shared.register_forward_pre_hook(hook)


@pytest.fixture
def recording_registry():
    RecordingAsyncExperts.EVENTS.clear()
    RecordingAsyncExperts.SHARED_RAN.clear()
    registry = Registry(entrypoints=False)
    registry.add_plugin(RecordingPlugin(), "recording")
    return registry


def run_recorded(model, ids, blocks=1):
    """One forward; the events of the first ``blocks`` MoE layers (the event is re-armed per layer)."""
    events = RecordingAsyncExperts.EVENTS
    with torch.no_grad():
        for block in list(moe_blocks(model).values())[:blocks]:
            block.register_forward_pre_hook(lambda m, a: RecordingAsyncExperts.SHARED_RAN.clear())
        out = logits(model, ids)
    return out, list(events)


@pytest.mark.parametrize("family", SHARED_FAMILIES)
def test_shared_experts_run_between_submit_and_sync(family, recording_registry, tmp_path):
    hf = tiny_model(family, seed=0)
    model, _ = load_model(StateDictSource(hf), hybrid_rules(tmp_path, "KExpertsRecordingAsync"),
                          registry=recording_registry, progress=False)
    record_shared(model)
    ids = prompt(hf.config, length=6)
    got, events = run_recorded(model, ids, blocks=len(moe_blocks(model)))
    assert events == ["submit", "shared", "sync"] * len(moe_blocks(model))
    expected = logits(hf, ids)
    assert (got - expected).abs().max() <= TORCH_REL_TOL * expected.abs().max()


def test_overlap_false_runs_the_experts_first(recording_registry, tmp_path, monkeypatch):
    monkeypatch.setattr(RecordingAsyncExperts, "wait_s", 0.05)
    hf = tiny_model("deepseek_v2", seed=0)
    rules = hybrid_rules(tmp_path, "KExpertsRecordingAsync")
    rules.write_text(rules.read_text().replace("    class: KMoE\n", "    class: KMoE\n    kwargs: {overlap: false}\n"))
    model, _ = load_model(StateDictSource(hf), rules, registry=recording_registry, progress=False)
    assert all(b.overlap is False for b in moe_blocks(model).values())
    record_shared(model)
    _, events = run_recorded(model, prompt(hf.config, length=4), blocks=2)
    assert events[:3] == ["submit", "sync (shared experts had not run)", "shared"]


def test_kexperts_submit_sync_without_async_op_and_misuse(torch_registry, tmp_path):
    hf = tiny_model("qwen3_moe", seed=0)
    model, _ = load_model(StateDictSource(hf), hybrid_rules(tmp_path), registry=torch_registry, progress=False)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, KExperts) and not ktcore.modules.is_async_experts_op(experts.generate_op)
    x = torch.randn(3, hf.config.hidden_size, generator=torch.Generator().manual_seed(0))
    index = torch.tensor([[0, 1], [2, 3], [1, 0]])
    weights = torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.9, 0.1]])
    experts.submit(x, index, weights)
    with pytest.raises(RuntimeError, match="previous submit was not synced"):
        experts.submit(x, index, weights)
    out = experts.sync()
    with torch.no_grad():
        assert torch.equal(out, experts(x, index, weights))
        torch.testing.assert_close(out, hf.model.layers[0].mlp.experts(x, index, weights), rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError, match="sync without submit"):
        experts.sync()


# -- rules ---------------------------------------------------------------------------------------------------


def test_rules_accept_kmoe_and_check_its_options(torch_registry, tmp_path):
    rules = load_rules(hybrid_rules(tmp_path), torch_registry)
    kmoe_rule = rules.rules[1]
    assert kmoe_rule.wrapper is KMoE and kmoe_rule.match_role == "moe" and kmoe_rule.op_names is None
    bad = hybrid_rules(tmp_path, name="bad.yaml")
    bad.write_text(bad.read_text().replace("    class: KMoE\n", "    class: KMoE\n    kwargs: {overlap: 3, op: KExpertsTorch}\n"))
    with pytest.raises(RuleError) as info:
        load_rules(bad, torch_registry)
    fields = {i.field for i in info.value.issues}
    assert fields == {"replace.kwargs.overlap", "replace.kwargs.op"}
    assert all(i.line == 15 for i in info.value.issues)


def test_moe_role_matches_only_sparse_blocks(torch_registry, tmp_path):
    model = build_meta_model(tiny_config("deepseek_v2"))
    inject(model, hybrid_rules(tmp_path), torch_registry, build_ops=False)
    assert not isinstance(model.model.layers[0].mlp, KMoE)  # dense first layer
    assert isinstance(model.model.layers[1].mlp, KMoE) and isinstance(model.model.layers[2].mlp, KMoE)


# -- transfer_map ----------------------------------------------------------------------------------------------


def test_transfer_map_rule_entry_parses_and_reports_problems(torch_registry, tmp_path):
    good = hybrid_rules(tmp_path, extra="- transfer_map: {1: cpu, 2: cpu}\n")
    assert load_rules(good, torch_registry).transfer_map == {1: torch.device("cpu"), 2: torch.device("cpu")}
    bad = hybrid_rules(tmp_path, extra="- transfer_map: {x: cpu, 1: nodevice}\n  match: {name: x}\n", name="bad.yaml")
    with pytest.raises(RuleError) as info:
        load_rules(bad, torch_registry)
    messages = [str(i) for i in info.value.issues]
    assert any("layer index 'x' is not an integer" in m for m in messages)
    assert any("'nodevice' is not a torch device" in m for m in messages)
    assert any("field 'match'" in m and "takes no other field" in m for m in messages)
    assert all(i.line in (16, 17) and i.rule == 3 for i in info.value.issues)


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="cuda:1 is present here")
def test_transfer_map_to_an_absent_device_is_an_error(torch_registry, tmp_path):
    rules = hybrid_rules(tmp_path, extra='- transfer_map: {1: "cuda:1"}\n')
    with pytest.raises(RuleError, match="device 'cuda:1' is not present"):
        load_rules(rules, torch_registry)
    hf = tiny_model("qwen3_moe", seed=0)
    with pytest.raises(LoadError, match="layer 1: device 'cuda:1' is not present"):
        load_model(StateDictSource(hf), hybrid_rules(tmp_path), registry=torch_registry, progress=False,
                   transfer_map={1: "cuda:1"})
    with pytest.raises(LoadError, match=r"names layer\(s\) \[5\], but Qwen3MoeForCausalLM has layers 0..1"):
        load_model(StateDictSource(hf), hybrid_rules(tmp_path), registry=torch_registry, progress=False,
                   transfer_map={5: "cpu"})


def test_transfer_map_moves_devices_of_later_layers_only(tmp_path):
    """On meta (no GPU needed): layers 2.. of the shipped DeepSeek-V2 gpu-cpu layout go to cuda:1, the CPU
    experts stay on the CPU and hand their output to cuda:1."""
    from ktcore.inject import RULE_FILES_DIR

    registry = Registry(entrypoints=False)
    rules = load_rules(RULE_FILES_DIR / "deepseek_v2-gpu-cpu.yaml", registry, check_devices=False)
    model = build_meta_model(tiny_config("deepseek_v2"))
    inject(model, rules, registry, build_ops=False, transfer_map={2: "cuda:1"})
    layers = model.model.layers
    cuda0, cuda1, cpu = torch.device("cuda"), torch.device("cuda:1"), torch.device("cpu")
    assert layers[1].self_attn.prefill_device == cuda0 and layers[1].mlp.experts.out_device == cuda0
    assert layers[2].self_attn.prefill_device == cuda1 and layers[2].self_attn.q_proj.generate_device == cuda1
    assert layers[2].mlp.experts.prefill_device == cpu and layers[2].mlp.experts.out_device == cuda1
    assert isinstance(layers[2].mlp.shared_experts.down_proj, KLinear)
    assert layers[2].mlp.shared_experts.down_proj.prefill_device == cuda1
    placements = model._ktcore_placements
    assert placements["model.layers.1"] == cuda0 and placements["model.layers.2"] == cuda1
    assert placements["model.layers.2.mlp"] == cuda1 and placements["model.layers.2.mlp.experts"] == cpu
    assert placements["model.norm"] == cuda0 and placements["lm_head"] == cuda0
    hooks = [name for name, _ in model._ktcore_transfer_hooks]
    assert hooks == ["model.layers.2", "model.norm"]


@pytest.mark.parametrize("family", ("deepseek_v2", "qwen2_moe"))
def test_transfer_map_on_cpu_hooks_each_moved_layer(family, torch_registry, tmp_path, monkeypatch):
    """``{1: "cpu"}`` on a CPU model: the same logits, and the pre-hooks move every call's tensors (counted
    through the move function) for each layer from 1 on and for the final norm."""
    moves = []
    real_move = ktcore.moe._move_tensors

    def counting_move(value, device):
        moves.append(device)
        return real_move(value, device)

    monkeypatch.setattr(ktcore.moe, "_move_tensors", counting_move)
    hf = tiny_model(family, seed=0)
    n = hf.config.num_hidden_layers
    model, _ = load_model(StateDictSource(hf), hybrid_rules(tmp_path), registry=torch_registry, progress=False,
                          transfer_map={1: "cpu"})
    hooks = dict(model._ktcore_transfer_hooks)
    assert list(hooks) == [f"model.layers.{i}" for i in range(1, n)] + ["model.norm"]
    ids = prompt(hf.config)
    got, expected = logits(model, ids), logits(hf, ids)
    assert (got - expected).abs().max() <= TORCH_REL_TOL * expected.abs().max()
    assert all(h.calls == 1 for h in hooks.values())
    assert moves == [torch.device("cpu")] * len(hooks)


def test_layer_devices_boundaries():
    model = build_meta_model(tiny_config("deepseek_v2"))
    layer_devices = LayerDevices(model, {1: "cuda:1", 2: "cuda:2"})
    assert layer_devices.prefix == "model.layers"
    assert [layer_devices.layer_device(i) for i in range(3)] == [None, torch.device("cuda:1"), torch.device("cuda:2")]
    assert layer_devices.target("model.layers.1.mlp.experts") == torch.device("cuda:1")
    assert layer_devices.target("model.layers.0.mlp") is None and layer_devices.target("model.norm") is None
    assert LayerDevices.remap(torch.device("cpu"), torch.device("cuda:1")) == torch.device("cpu")
    assert LayerDevices.remap(torch.device("cuda"), torch.device("cpu")) == torch.device("cpu")


# -- GPU ---------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_gpu_kmoe_with_cpu_experts_matches_transformers(family, tmp_path):
    """Attention, shared experts, norms and lm_head on the GPU, routed experts on the CPU (KExpertsTorch,
    and KExpertsCPU where kt-cpu-amx runs): same logits as plain Transformers on the CPU."""
    registry = Registry()
    hf = tiny_model(family, seed=0)
    ids = prompt(hf.config)
    expected = logits(hf, ids)
    ops = ["KExpertsTorch"] + (["KExpertsCPU"] if "KExpertsCPU" in registry.ops("experts") else [])
    for op in ops:
        rules = hybrid_rules(tmp_path, op, device="cuda", name=f"{op}.yaml")
        model, _ = load_model(StateDictSource(hf), rules, registry=registry, progress=False)
        assert model.model.embed_tokens.weight.device.type == "cuda"
        got = logits(model, ids)
        if op == "KExpertsTorch":
            assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
        else:
            assert float((got - expected).norm() / expected.norm()) < CPU_OP_TOL.get(family, CPU_OP_DEFAULT_TOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_gpu_shared_experts_overlap_cpu_experts(recording_registry, tmp_path):
    hf = tiny_model("deepseek_v2", seed=0)
    model, _ = load_model(StateDictSource(hf), hybrid_rules(tmp_path, "KExpertsRecordingAsync", device="cuda"),
                          registry=recording_registry, progress=False)
    record_shared(model)
    ids = prompt(hf.config, length=6)
    got, events = run_recorded(model, ids, blocks=2)
    assert events == ["submit", "shared", "sync"] * 2
    expected = logits(hf, ids)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices" if torch.cuda.is_available() else NO_CUDA)
@pytest.mark.parametrize("family", ("deepseek_v2", "qwen3_moe"))
def test_two_gpus_transfer_map_splits_layers(family):
    from ktcore.inject import RULE_FILES_DIR

    registry = Registry(entrypoints=False)
    hf = tiny_model(family, seed=0)
    n = hf.config.num_hidden_layers
    model, _ = load_model(StateDictSource(hf), RULE_FILES_DIR / f"{family}-gpu-cpu.yaml", registry=registry,
                          progress=False, transfer_map={n - 1: "cuda:1"})
    last = model.model.layers[n - 1]
    assert last.input_layernorm.weight.device == torch.device("cuda:1")
    assert last.self_attn.prefill_device == torch.device("cuda:1")
    assert model.model.layers[0].input_layernorm.weight.device == torch.device("cuda:0")
    assert model.lm_head.prefill_device.type == "cuda" and model.lm_head.prefill_device.index in (None, 0)
    ids = prompt(hf.config)
    expected, got = logits(hf, ids), logits(model, ids)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ours = model.generate(ids.cuda(), **gen).cpu()
        ref = hf.generate(ids, **gen)
    assert torch.equal(ours, ref)
