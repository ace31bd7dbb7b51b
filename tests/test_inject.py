"""Injection and loading: logits equal plain Transformers, rule semantics, wrapper op selection."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from core_test_helpers import (
    CountingExperts,
    CountingLinear,
    CountingLinearB,
    PassthroughAttention,
    TableRoPE,
    seeded_model,
    tiny_llama_config,
    tiny_qwen3_moe_config,
)
from ktcore.inject import build_meta_model, inject, load_model, select_rule_file
from ktcore.modules import KAttention, KExperts, KLinear, KRoPE
from ktcore.rules import RuleError, load_rules
from ktcore.weights.source import MissingTensorError
from ktcore.weights.state_dict import StateDictSource

IDS = torch.tensor([[3, 17, 42, 5, 88, 1, 64]])

MLP_LINEAR_RULE = r"""
- match:
    name: "^model\\.layers\\.\\d+\\.mlp\\.(gate|up|down)_proj$"
    class: linear
  replace:
    class: KLinear
    kwargs:
      generate_op: KLinearTest
      prefill_op: KLinearTest
"""


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def test_build_meta_model_has_only_meta_tensors():
    model = build_meta_model(tiny_llama_config())
    assert type(model).__name__ == "LlamaForCausalLM"
    assert all(p.is_meta for p in model.parameters())
    assert next(model.parameters()).dtype == torch.float32


def test_llama_with_test_linear_op_matches_transformers(registry, write_rules):
    hf = seeded_model(tiny_llama_config())
    model, report = load_model(StateDictSource(hf), write_rules(MLP_LINEAR_RULE), registry=registry, progress=False)
    assert len(report) == 6  # 2 layers x gate/up/down
    assert isinstance(model.model.layers[1].mlp.down_proj, KLinear)
    torch.testing.assert_close(logits(model), logits(hf), rtol=0, atol=1e-5)
    assert CountingLinear.calls == 6  # one prefill pass through 6 wrapped linears
    assert not model.training
    assert not any(t.is_meta for t in model.state_dict().values())
    assert model.model.rotary_emb.inv_freq.device.type == "cpu"  # non-persistent buffer recomputed


def test_report_table_names_module_rule_line_wrapper_ops(registry, write_rules):
    path = write_rules(MLP_LINEAR_RULE)
    model = build_meta_model(tiny_llama_config())
    report = inject(model, path, registry)
    row = report.rows[0]
    assert (row.module, row.rule, row.wrapper, row.prefill_op, row.generate_op, row.device) == (
        "model.layers.0.mlp.gate_proj", f"{path}:1", "KLinear", "KLinearTest", "KLinearTest", "cpu")
    table = report.table()
    assert "model.layers.1.mlp.down_proj" in table and f"{path}:1" in table and "generate op" in table


def test_tied_embeddings_from_source_without_lm_head(registry, write_rules):
    hf = seeded_model(tiny_llama_config(tie_word_embeddings=True))
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    rules = MLP_LINEAR_RULE + r"""
- match: {name: "^lm_head$"}
  replace: {class: KLinear, kwargs: {op: KLinearTestB}}
"""
    model, _ = load_model(StateDictSource(state, hf.config), write_rules(rules), registry=registry, progress=False)
    torch.testing.assert_close(logits(model), logits(hf), rtol=0, atol=1e-5)
    assert CountingLinearB.calls == 1  # lm_head ran through the op, fed with embed_tokens.weight


def test_missing_parameter_names_tensor_and_source(registry, write_rules):
    hf = seeded_model(tiny_llama_config())
    state = {k: v for k, v in hf.state_dict().items() if k != "model.layers.1.input_layernorm.weight"}
    source = StateDictSource(state, hf.config, path="/models/tiny.gguf")
    with pytest.raises(MissingTensorError) as err:
        load_model(source, write_rules(MLP_LINEAR_RULE), registry=registry, progress=False)
    assert "model.layers.1.input_layernorm.weight" in str(err.value) and "/models/tiny.gguf" in str(err.value)


def test_missing_wrapper_tensor_names_tensor(registry, write_rules):
    hf = seeded_model(tiny_llama_config())
    state = {k: v for k, v in hf.state_dict().items() if k != "model.layers.0.mlp.up_proj.weight"}
    with pytest.raises(MissingTensorError, match=r"model\.layers\.0\.mlp\.up_proj\.weight"):
        load_model(StateDictSource(state, hf.config), write_rules(MLP_LINEAR_RULE), registry=registry, progress=False)


def test_first_matching_rule_wins(registry, write_rules):
    path = write_rules(r"""
- match: {name: "mlp\\.down_proj$"}
  replace: {class: KLinear, kwargs: {op: KLinearTestB}}
- match: {class: linear, name: "mlp"}
  replace: {class: KLinear, kwargs: {op: KLinearTest}}
""")
    model = build_meta_model(tiny_llama_config())
    report = inject(model, path, registry)
    by_module = {r.module: r for r in report.rows}
    assert by_module["model.layers.0.mlp.down_proj"].prefill_op == "KLinearTestB"
    assert by_module["model.layers.0.mlp.down_proj"].rule == f"{path}:1"
    assert by_module["model.layers.0.mlp.up_proj"].prefill_op == "KLinearTest"
    assert by_module["model.layers.0.mlp.up_proj"].rule == f"{path}:3"


def test_recursive_false_stops_rules_inside(registry, write_rules):
    path = write_rules(r"""
- match: {name: "^model\\.layers\\.0\\.mlp$"}
  replace: {class: default}
  recursive: false
- match: {class: linear, name: "mlp"}
  replace: {class: KLinear, kwargs: {op: KLinearTest}}
""")
    model = build_meta_model(tiny_llama_config())
    inject(model, path, registry)
    assert type(model.model.layers[0].mlp.gate_proj) is nn.Linear
    assert isinstance(model.model.layers[1].mlp.gate_proj, KLinear)


def test_rule_that_matches_nothing_is_an_error_unless_optional(registry, write_rules):
    text = r"""
- match: {class: linear, name: "mlp"}
  replace: {class: KLinear, kwargs: {op: KLinearTest}}
- match: {name: "^model\\.no_such_module$"}
  replace: {class: KLinear, kwargs: {op: KLinearTest}}
"""
    path = write_rules(text)
    with pytest.raises(RuleError) as err:
        inject(build_meta_model(tiny_llama_config()), path, registry)
    message = str(err.value)
    assert f"{path}:3" in message and "rule 2" in message and "matched no module" in message
    inject(build_meta_model(tiny_llama_config()), write_rules(text + "  optional: true\n", "opt.yaml"), registry)


def test_wrapper_role_must_fit_the_module(registry, write_rules):
    path = write_rules(r"""
- match: {name: "^model\\.norm$"}
  replace: {class: KLinear, kwargs: {op: KLinearTest}}
""")
    with pytest.raises(RuleError) as err:
        inject(build_meta_model(tiny_llama_config()), path, registry)
    assert f"{path}:1" in str(err.value) and "model.norm" in str(err.value) and "LlamaRMSNorm" in str(err.value)


def test_unknown_op_kwargs_fail_at_inject_with_rule_location(registry, write_rules):
    path = write_rules("""
- match: {class: linear}
  replace: {class: KLinear, kwargs: {op: KLinearTest, op_kwargs: {tile: 4}}}
""")
    with pytest.raises(RuleError) as err:
        inject(build_meta_model(tiny_llama_config()), path, registry)
    assert f"{path}:1" in str(err.value) and "tile" in str(err.value) and "op_kwargs" in str(err.value)


def test_wrapper_picks_generate_op_for_one_token_and_prefill_op_otherwise():
    linear = nn.Linear(8, 4)
    wrapper = KLinear(linear, prefill_op=CountingLinear, generate_op=CountingLinearB)
    wrapper.load_weights({k: _qt(k, getattr(linear, k)) for k in wrapper.weight_names()})
    assert wrapper.weight_names() == ["weight", "bias"]
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(wrapper(x), linear(x))
    assert (CountingLinear.calls, CountingLinearB.calls) == (1, 0)
    wrapper(x[:, :1])
    assert (CountingLinear.calls, CountingLinearB.calls) == (1, 1)

    wide = KLinear(linear, prefill_op=CountingLinear, generate_op=CountingLinearB, prefill_threshold=4)
    wide.load_weights({k: _qt(k, getattr(linear, k)) for k in wide.weight_names()})
    wide(x[:, :4])
    wide(x)
    assert (CountingLinear.calls, CountingLinearB.calls) == (2, 2)


def test_same_op_class_and_device_share_one_instance():
    linear = nn.Linear(8, 4, bias=False)
    shared = KLinear(linear, prefill_op=CountingLinear, generate_op=CountingLinear)
    assert shared.prefill_op is shared.generate_op and len(shared.ops()) == 1
    assert shared.weight_names() == ["weight"]
    split = KLinear(linear, prefill_op=CountingLinear, generate_op=CountingLinearB)
    assert split.prefill_op is not split.generate_op and len(split.ops()) == 2


def _qt(name, tensor):
    from ktcore.weights.state_dict import as_quantized

    return as_quantized(name, tensor)


def test_state_dict_source_splits_fused_experts():
    hf = seeded_model(tiny_qwen3_moe_config())
    source = StateDictSource(hf)
    fused = hf.model.layers[0].mlp.experts.gate_up_proj
    half = fused.shape[1] // 2
    names = set(source.names())
    assert "model.layers.0.mlp.experts.gate_proj" in names and "model.layers.0.mlp.experts.up_proj" in names
    gate = source.get("model.layers.0.mlp.experts.gate_proj")
    up = source.get("model.layers.0.mlp.experts.up_proj")
    assert gate.ggml_type == "F32" and gate.shape == (4, half, 64)
    from ktcore.inject import to_torch

    torch.testing.assert_close(to_torch(gate, torch.float32, "cpu"), fused[:, :half].detach(), rtol=0, atol=0)
    torch.testing.assert_close(to_torch(up, torch.float32, "cpu"), fused[:, half:].detach(), rtol=0, atol=0)
    with pytest.raises(MissingTensorError, match="model.layers.0.mlp.experts.nope"):
        source.get("model.layers.0.mlp.experts.nope")


def test_moe_experts_attention_rope_wrappers_match_transformers(registry, write_rules):
    hf = seeded_model(tiny_qwen3_moe_config())
    path = write_rules(r"""
- match: {name: "^model\\.rotary_emb$", class: rope}
  replace: {class: KRoPE, kwargs: {op: KRoPETest}}
- match: {name: "\\.self_attn$", class: attention}
  replace: {class: KAttention, kwargs: {op: KAttentionTest}}
- match: {name: "\\.self_attn\\.q_proj$"}
  replace: {class: ktcore.modules.KLinear, kwargs: {prefill_op: KLinearTest, generate_op: KLinearTestB}}
- match: {name: "\\.mlp\\.experts$", class: experts}
  replace: {class: KExperts, device: cpu, kwargs: {generate_op: KExpertsTest, generate_device: cpu, out_device: cpu}}
""")
    model, report = load_model(StateDictSource(hf), path, registry=registry, progress=False)
    assert isinstance(model.model.rotary_emb, KRoPE)
    assert isinstance(model.model.layers[0].self_attn, KAttention)
    assert isinstance(model.model.layers[0].self_attn.q_proj, KLinear)  # a rule applied inside a wrapper
    assert isinstance(model.model.layers[1].mlp.experts, KExperts)
    torch.testing.assert_close(logits(model), logits(hf), rtol=1e-4, atol=1e-4)
    assert CountingExperts.calls == 2 and PassthroughAttention.calls == 2 and TableRoPE.calls == 1
    assert CountingLinear.calls == 2 and CountingLinearB.calls == 0
    attention_op = model.model.layers[0].self_attn.prefill_op
    assert {"position_embeddings", "attention_mask"} <= attention_op.seen_kwargs

    # one decode step through the cache: one token per sequence goes to the generate op
    with torch.no_grad():
        out = model(IDS, use_cache=True)
        step = model(torch.tensor([[7]]), past_key_values=out.past_key_values, use_cache=True).logits
        ref = hf(torch.cat([IDS, torch.tensor([[7]])], dim=1)).logits[:, -1:]
    torch.testing.assert_close(step, ref, rtol=1e-4, atol=1e-4)
    assert CountingLinearB.calls == 2


def test_select_rule_file_prefers_plugin_dir_and_skips_unusable(tmp_path, registry, write_rules):
    import ktcore

    plugin_dir = tmp_path / "plugin_rules"
    plugin_dir.mkdir()
    (plugin_dir / "llama-cpu.yaml").write_text(MLP_LINEAR_RULE)

    class RuleDirs:
        @ktcore.hookimpl
        def register_rule_dirs(self, register):
            register(plugin_dir)

    registry.add_plugin(RuleDirs(), "ruledirs")
    assert select_rule_file("llama", registry) == plugin_dir / "llama-cpu.yaml"
    hf = seeded_model(tiny_llama_config())
    model, report = load_model(StateDictSource(hf), None, registry=registry, progress=False)
    assert report.rule_files == [str(plugin_dir / "llama-cpu.yaml")]
    torch.testing.assert_close(logits(model), logits(hf), rtol=0, atol=1e-5)

    (plugin_dir / "llama-cpu.yaml").write_text(MLP_LINEAR_RULE.replace("KLinearTest", "KLinearMarlin"))
    with pytest.raises(ValueError) as err:
        select_rule_file("llama", registry)
    assert "llama-cpu.yaml" in str(err.value) and "KLinearMarlin" in str(err.value)


def test_progress_bar_over_tensors_can_be_disabled(registry, write_rules, capsys):
    hf = seeded_model(tiny_llama_config())
    path = write_rules(MLP_LINEAR_RULE)
    load_model(StateDictSource(hf), path, registry=registry, progress=False)
    assert "loading" not in capsys.readouterr().err
    model, _ = load_model(StateDictSource(hf), path, registry=registry, progress=True)
    err = capsys.readouterr().err
    total = len(hf.state_dict())
    assert "loading" in err and f"/{total}" in err  # one step per tensor
    assert model.ktcore_loaded_bytes == sum(t.numel() * t.element_size() for t in hf.state_dict().values())


def test_buffer_nobody_can_compute_is_an_error(registry, write_rules):
    hf = seeded_model(tiny_llama_config())
    model = build_meta_model(hf.config)
    inject(model, write_rules(MLP_LINEAR_RULE), registry)
    with torch.device("meta"):
        model.model.norm.register_buffer("mystery", torch.zeros(3), persistent=False)
    from ktcore.inject import LoadError, load_weights

    with pytest.raises(LoadError, match=r"buffer 'model\.norm\.mystery' \(LlamaRMSNorm\)"):
        load_weights(model, StateDictSource(hf), progress=False)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
def test_ops_on_cuda_get_inputs_moved_and_return_to_out_device(registry, write_rules):
    from core_test_helpers import AnyDeviceLinear

    hf = seeded_model(tiny_qwen3_moe_config())
    path = write_rules(r"""
- match: {name: "\\.mlp\\.experts$", class: experts}
  replace:
    class: KExperts
    kwargs: {op: KExpertsTest, prefill_device: cuda, generate_device: cuda, out_device: cpu}
- match: {name: "\\.self_attn\\.q_proj$"}
  replace:
    class: KLinear
    kwargs: {prefill_op: KLinearTestAnyDevice, prefill_device: cuda, generate_op: KLinearTestAnyDevice,
             generate_device: cpu, out_device: cpu}
""")
    model, report = load_model(StateDictSource(hf), path, registry=registry, progress=False)
    experts = model.model.layers[0].mlp.experts
    assert experts.prefill_op is experts.generate_op and experts.prefill_op.gate.device.type == "cuda"
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.prefill_op is not q_proj.generate_op  # same class, two devices: two instances
    assert q_proj.prefill_op.weight.device.type == "cuda" and q_proj.generate_op.weight.device.type == "cpu"
    assert {r.device for r in report.rows} == {"cuda", "cuda / cpu"}
    torch.testing.assert_close(logits(model), logits(hf), rtol=1e-4, atol=1e-4)
    assert CountingExperts.calls == 2 and AnyDeviceLinear.calls == 2
    with torch.no_grad():
        out = model(IDS, use_cache=True)
        step = model(torch.tensor([[7]]), past_key_values=out.past_key_values, use_cache=True).logits
        ref = hf(torch.cat([IDS, torch.tensor([[7]])], dim=1)).logits[:, -1:]
    assert step.device.type == "cpu"
    torch.testing.assert_close(step, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["model.layers.0.mlp.up_proj.weight", "model.layers.1.input_layernorm.weight"])
def test_tensor_of_the_wrong_shape_names_tensor_source_and_shapes(registry, write_rules, name):
    from ktcore.inject import LoadError

    hf = seeded_model(tiny_llama_config())
    state = dict(hf.state_dict())
    state[name] = state[name][:-1]
    source = StateDictSource(state, hf.config, path="/models/odd.gguf")
    with pytest.raises(LoadError) as err:
        load_model(source, write_rules(MLP_LINEAR_RULE), registry=registry, progress=False)
    expected = tuple(hf.state_dict()[name].shape)
    got = (expected[0] - 1,) + expected[1:]
    assert f"'{name}' in /models/odd.gguf has shape {got}" in str(err.value) and str(expected) in str(err.value)


def test_experts_expected_shapes_come_from_the_fused_module():
    meta = build_meta_model(tiny_qwen3_moe_config())
    experts = KExperts(meta.model.layers[0].mlp.experts, prefill_op=CountingExperts, build=False)
    assert experts.expected_shapes() == {"gate_proj": (4, 32, 64), "up_proj": (4, 32, 64), "down_proj": (4, 64, 32)}


def test_load_model_from_a_gguf_path_opens_it_through_the_weights_package(registry, write_rules, tmp_path):
    gguf_writer = pytest.importorskip("ktcore.weights.gguf_writer", reason="the GGUF writer is not in this tree yet")
    hf = seeded_model(tiny_llama_config(hidden_size=256, intermediate_size=256, head_dim=64, vocab_size=128))
    path = gguf_writer.write_gguf(hf, tmp_path / "tiny.gguf", "F32")
    model, report = load_model(str(path), write_rules(MLP_LINEAR_RULE), registry=registry, progress=False)
    assert len(report) == 6 and CountingLinear.calls == 0
    torch.testing.assert_close(logits(model), logits(hf), rtol=1e-5, atol=1e-5)
    assert CountingLinear.calls == 6


def test_loading_copies_tensors_and_lets_the_source_release_them(registry, write_rules):
    hf = seeded_model(tiny_llama_config(tie_word_embeddings=True))
    state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}

    class ReleasingSource(StateDictSource):
        released: list[str] = []

        def release(self, name):
            self.released.append(name)

    source = ReleasingSource(state, hf.config)
    model, _ = load_model(source, write_rules(MLP_LINEAR_RULE), registry=registry, progress=False)
    assert sorted(set(source.released)) == sorted(state)  # every tensor read was released once copied
    norm = model.model.norm.weight
    assert norm.data_ptr() != hf.model.norm.weight.data_ptr()  # a copy, not a view on the source's memory
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied stays tied
