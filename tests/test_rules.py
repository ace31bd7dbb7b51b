"""Rule files: schema, KTransformers spellings, and errors that name file, line, rule and field."""

from __future__ import annotations

import pytest
import torch

from ktcore.modules import KExperts, KLinear
from ktcore.rules import RuleError, load_rules


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def only_issue(err) -> "RuleIssue":  # noqa: F821
    assert len(err.value.issues) == 1, str(err.value)
    return err.value.issues[0]


def test_valid_file_with_ktransformers_spellings(registry, write_rules):
    path = write_rules(r"""
# a comment line
- match:
    name: "^model\\.layers\\.\\d+\\.mlp\\.experts$"
    class: experts
  replace:
    class: ktcore.modules.KExperts
    device: cpu
    kwargs:
      prefill_op: KExpertsTest
      prefill_device: cpu
      generate_op: KExpertsTest
      generate_device: cpu
      out_device: cpu
      prefill_threshold: 8
  recursive: false
- match: {class: torch.nn.Linear}
  replace: {class: KLinear, kwargs: {generate_op: KLinearTestB, prefill_op: KLinearTest}}
  optional: true
- match: {name: "^model\\.embed_tokens$"}
  replace:
    class: default
    kwargs: {generate_device: cpu, prefill_device: cpu}
""")
    rules = load_rules(path, registry)
    assert [r.line for r in rules] == [2, 16, 19]
    experts, linear, embed = rules.rules
    assert experts.wrapper is KExperts and experts.match_role == "experts" and experts.recursive is False
    assert experts.options["prefill_threshold"] == 8 and experts.options["out_device"] == torch.device("cpu")
    assert experts.device == torch.device("cpu")
    assert linear.wrapper is KLinear and linear.match_type is torch.nn.Linear and linear.optional
    assert linear.op_names == ("KLinearTest", "KLinearTestB")
    assert embed.wrapper is None and embed.device == torch.device("cpu")
    assert rules.op_names() == {"KExpertsTest", "KLinearTest", "KLinearTestB"}


def test_unknown_kwarg_names_file_line_field_and_suggests(registry, write_rules):
    path = write_rules("""
- match: {class: linear}
  replace:
    class: KLinear
    kwargs:
      op: KLinearTest
      generate_devise: cpu
""")
    with pytest.raises(RuleError) as err:
        load_rules(path, registry)
    issue = only_issue(err)
    assert (issue.file, issue.line, issue.rule, issue.field) == (str(path), 6, 1, "replace.kwargs.generate_devise")
    message = str(err.value)
    assert message.startswith(f"{path}:6: rule 1, field 'replace.kwargs.generate_devise'")
    assert "did you mean 'generate_device'" in message


def test_unknown_op_name_carries_registry_text_and_pip_hint(registry, write_rules):
    path = write_rules("""
- match: {class: linear}
  replace: {class: KLinear, kwargs: {op: KLinearTest}}
- match: {class: experts}
  replace:
    class: KExperts
    kwargs:
      generate_op: KExpertsCPU
""")
    with pytest.raises(RuleError) as err:
        load_rules(path, registry)
    issue = only_issue(err)
    assert (issue.line, issue.rule, issue.field) == (7, 2, "replace.kwargs.generate_op")
    message = str(err.value)
    assert "unknown experts op 'KExpertsCPU'" in message
    assert "Known experts ops: KExpertsTest" in message
    assert "pip install kt-cpu-amx" in message


def test_misspelled_op_gets_closest_match(registry, write_rules):
    path = write_rules("""
- match: {class: linear}
  replace: {class: KLinear, kwargs: {prefill_op: KLinearTets}}
""")
    with pytest.raises(RuleError) as err:
        load_rules(path, registry)
    assert "Did you mean 'KLinearTest' (plugin 'testplugin')" in str(err.value)
    assert only_issue(err).field == "replace.kwargs.prefill_op"


def test_device_not_present_is_named(registry, write_rules, no_cuda):
    path = write_rules("""
- match: {class: linear}
  replace:
    class: KLinear
    kwargs: {op: KLinearTest, prefill_device: cuda}
""")
    with pytest.raises(RuleError) as err:
        load_rules(path, registry)
    issue = err.value.issues[0]
    assert (issue.line, issue.field) == (4, "replace.kwargs.prefill_device")
    assert "device 'cuda' is not present" in str(err.value) and "torch.cuda.is_available() is False" in str(err.value)
    # KLinearTest is also a CPU-only op: said too, even when only checking names (for another machine)
    assert "runs on cpu, not on 'cuda'" in str(err.value)
    with pytest.raises(RuleError, match="runs on cpu, not on 'cuda'"):
        load_rules(path, registry, check_devices=False)


def test_op_that_cannot_run_here_says_why(registry, write_rules):
    path = write_rules("""
- match: {class: linear}
  replace: {class: KLinear, kwargs: {op: KLinearNeverHere}}
""")
    with pytest.raises(RuleError) as err:
        load_rules(path, registry)
    assert "KLinearNeverHere" in str(err.value) and "FooBar instruction set" in str(err.value)


def test_bad_regex_names_field_and_line(registry, write_rules):
    path = write_rules("""
- match:
    class: linear
    name: "model\\\\.layers\\\\.(\\\\d+"
  replace: {class: KLinear, kwargs: {op: KLinearTest}}
""")
    with pytest.raises(RuleError) as err:
        load_rules(path, registry)
    issue = only_issue(err)
    assert (issue.line, issue.field) == (3, "match.name") and "bad regex" in issue.message


def test_every_problem_of_a_file_is_reported_at_once(registry, write_rules):
    path = write_rules("""
- match: {class: linear}
  replace: {class: KLinear, kwargs: {op: KLinearTest}}
  recursiv: false
- match: {class: not.a.module.Class}
  replace: {class: KLiner, kwargs: {op: KLinearTest}}
- match: {name: x}
  replace: {class: KLinear, kwargs: {prefill_threshold: 0}}
- match: {class: experts}
  replace: {class: KLinear, kwargs: {op: KLinearTest}}
- match: {name: y}
  replace: {class: KLinear}
  optional: "yes"
""")
    with pytest.raises(RuleError) as err:
        load_rules(path, registry)
    found = {(i.rule, i.line, i.field) for i in err.value.issues}
    assert (1, 3, "recursiv") in found
    assert (2, 4, "match.class") in found
    assert (2, 5, "replace.class") in found
    assert (3, 7, "replace.kwargs") in found  # no op given (line of kwargs)
    assert (4, 9, "replace.class") in found  # KLinear under match.class experts
    assert (5, 11, "replace.kwargs") in found
    assert (5, 12, "optional") in found
    message = str(err.value)
    assert "did you mean 'recursive'" in message and "did you mean 'KLinear'" in message


def test_yaml_syntax_error_has_line(registry, write_rules):
    path = write_rules("""
- match: {class: linear}
  replace: {class: KLinear, kwargs: {op: KLinearTest}
- match: {class: experts}
""")
    with pytest.raises(RuleError) as err:
        load_rules(path, registry)
    issue = only_issue(err)
    assert issue.field == "yaml" and issue.line in (2, 3, 4) and str(path) in str(err.value)


def test_file_must_be_a_list_and_rules_need_match_and_replace(registry, write_rules):
    with pytest.raises(RuleError, match="a YAML list of rules"):
        load_rules(write_rules("match: {class: linear}\n", "a.yaml"), registry)
    with pytest.raises(RuleError) as err:
        load_rules(write_rules("- recursive: true\n", "b.yaml"), registry)
    assert {i.field for i in err.value.issues} == {"match", "replace"}
    with pytest.raises(RuleError, match="cannot read rule file"):
        load_rules("/nonexistent/rules.yaml", registry)


def test_default_class_takes_only_placement(registry, write_rules):
    path = write_rules("""
- match: {name: "^lm_head$"}
  replace: {class: default, kwargs: {generate_op: KLinearTest}}
""")
    with pytest.raises(RuleError) as err:
        load_rules(path, registry)
    issue = only_issue(err)
    assert issue.field == "replace.kwargs.generate_op" and 'class "default"' in issue.message


def test_op_of_the_wrong_role(registry, write_rules):
    path = write_rules("""
- match: {class: linear}
  replace: {class: KLinear, kwargs: {op: KExpertsTest}}
""")
    with pytest.raises(RuleError) as err:
        load_rules(path, registry)
    assert "'KExpertsTest' is a experts op" in str(err.value)


def test_duplicate_key_is_reported(registry, write_rules):
    path = write_rules("""
- match: {class: linear}
  replace:
    class: KLinear
    kwargs: {op: KLinearTest, op: KLinearTestB}
""")
    with pytest.raises(RuleError) as err:
        load_rules(path, registry)
    assert only_issue(err).field == "replace.kwargs.op" and "twice" in str(err.value)


def test_device_type_torch_does_not_know_names_the_backend(registry, write_rules):
    try:
        torch.device("npu")
        pytest.skip("this torch knows the npu device type (torch-npu is installed)")
    except RuntimeError:
        pass
    path = write_rules("""
- match: {class: linear}
  replace: {class: KLinear, device: npu, kwargs: {op: KLinearTest}}
""")
    with pytest.raises(RuleError) as err:
        load_rules(path, registry)
    issue = err.value.issues[0]
    assert (issue.line, issue.field) == (2, "replace.device")
    assert "device 'npu'" in issue.message and "kt-ascend" in issue.message and "torch-npu" in issue.message


# -- backends, layering, the 'gpu' device, GGML types ------------------------------------------------------


def backends_registry():
    """ktcore's own plugin plus a test backend of KLinearCPU that is never preferred (preference -200)."""
    import ktcore
    from ktcore.registry import Registry
    from core_test_helpers import CountingLinear

    class Slow(CountingLinear):
        name = "KLinearCPU"
        preference = -200

    class Plugin:
        @ktcore.hookimpl
        def register_linear_ops(self, register):
            register(Slow)

    return Registry(entrypoints=False, plugins={"slowpoke": Plugin()}), Slow


def test_rule_resolves_its_op_per_device_and_may_pin_a_backend(write_rules):
    registry, slow = backends_registry()
    path = write_rules("""
- match: {name: "mlp", class: linear}
  replace: {class: KLinear, kwargs: {op: KLinearCPU, backend: slowpoke}}
- match: {class: linear}
  replace: {class: KLinear, kwargs: {op: KLinearCPU, generate_backend: torch}}
""")
    pinned, free = load_rules(path, registry).rules
    assert pinned.options["prefill_op"] is slow and pinned.options["generate_op"] is slow
    assert free.options["prefill_op"].__name__ == "KLinearTorch" == free.options["generate_op"].__name__
    assert pinned.resolutions["generate"].explain() == "KLinearCPU -> slowpoke on cpu"
    assert free.resolutions["prefill"].explain() == (  # the hint: this registry lacks kt-cpu-amx
        "KLinearCPU -> torch (KLinearTorch) on cpu; slowpoke: preference -200 < -100; pip install kt-cpu-amx adds "
        "a backend of KLinearCPU (C++ CPU kernels on GGUF blocks, AMX / AVX-512 / AVX2)")
    with pytest.raises(RuleError) as err:
        load_rules(write_rules("""
- match: {class: linear}
  replace: {class: KLinear, kwargs: {op: KLinearCPU, backend: nosuch}}
""", name="bad.yaml"), registry)
    issue = only_issue(err)
    assert issue.field == "replace.kwargs.op" and "has no backend 'nosuch'; its backends here: torch, slowpoke" in issue.message


def test_gpu_device_needs_an_accelerator_or_a_named_type(write_rules, registry, monkeypatch):
    import ktcore.rules

    monkeypatch.setattr(ktcore.rules, "accelerator_present", lambda: False)
    path = write_rules("""
- match: {class: linear}
  replace: {class: KLinear, device: gpu, kwargs: {op: KLinearTestAnyDevice}}
""")
    with pytest.raises(RuleError, match="device 'gpu' is not present: torch has no accelerator on this machine"):
        load_rules(path, registry)
    (rule,) = load_rules(path, registry, check_devices=False, gpu="cuda").rules
    assert rule.device == torch.device("cuda") and rule.options["generate_device"] == torch.device("cuda")


def test_a_one_rule_file_extends_the_shipped_default(write_rules):
    from ktcore.inject import RULE_FILES_DIR, build_meta_model, inject
    from ktcore.registry import Registry
    from ktcore.rule_selection import layered
    from ktcore.testing import tiny_config

    registry = Registry(entrypoints=False)
    path = write_rules("""
- extends: default
- match: {name: "^lm_head$"}
  replace: {class: KLinear, kwargs: {op: KLinearTorch, op_kwargs: {dtype: float64}}}
""")
    rules = layered(path, "llama", registry, layout="cpu")
    shipped = str(RULE_FILES_DIR / "llama-cpu.yaml")
    assert rules.files == [str(path), shipped]
    assert all(r.optional and r.layer == "default" for r in rules if r.file == shipped)
    model = build_meta_model(tiny_config("llama"))
    rows = {row.module: row for row in inject(model, rules, registry, build_ops=False).rows}
    assert rows["lm_head"].rule == f"{path}:2" and rows["lm_head"].generate_op == "KLinearTorch"
    q = rows["model.layers.0.self_attn.q_proj"]
    assert q.rule.startswith(shipped + ":") and (q.generate_op, q.generate_backend) == ("KLinearCPU", "torch")
    assert (q.role, q.module_class) == ("linear", "Linear")
    assert rows["model.layers.0.self_attn"].module_class == "LlamaAttention"
    # without `- extends: default` a file stands alone (the rest stays Transformers modules)
    alone = write_rules(path.read_text().replace("- extends: default\n", ""), name="alone.yaml")
    assert layered(alone, "llama", registry).files == [str(alone)]
    # a shipped file listed after a user's is its default: no "matched no module" for what the user took
    both = layered([alone, shipped], "llama", registry)
    assert len(inject(build_meta_model(tiny_config("llama")), both, registry, build_ops=False).rows) == len(rows)


def test_an_op_that_cannot_take_a_tensor_type_is_rejected_before_loading(tmp_path, write_rules):
    import ktcore
    from core_test_helpers import CountingLinear
    from ktcore.inject import build_meta_model, inject, weight_type_problems
    from ktcore.registry import Registry
    from ktcore.testing import tiny_model
    from ktcore.weights import open_source
    from ktcore.weights.gguf_writer import write_gguf

    class Q8Only(CountingLinear):
        name = "KLinearQ8Only"
        ggml_types = frozenset({"Q8_0"})
        dequantizes_others = False

    class Plugin:
        @ktcore.hookimpl
        def register_linear_ops(self, register):
            register(Q8Only)

    registry = Registry(entrypoints=False, plugins={"q8": Plugin()})
    hf = tiny_model("llama")
    source = open_source(write_gguf(hf, tmp_path / "llama.gguf", qtypes="Q4_K"))
    path = write_rules("""
- match: {name: "^lm_head$"}
  replace: {class: KLinear, kwargs: {op: KLinearTorch}}
- match: {name: "mlp\\\\.down_proj$"}
  replace: {class: KLinear, kwargs: {op: KLinearQ8Only}}
""")
    model = build_meta_model(hf.config)
    report = inject(model, load_rules(path, registry), registry, build_ops=False)
    issues = weight_type_problems(model, source, report)
    assert {i.field for i in issues} == {"replace.kwargs.prefill_op", "replace.kwargs.generate_op"}
    assert {(i.file, i.line) for i in issues} == {(str(path), 3)}
    layer_ones = [i for i in issues if "model.layers.1.mlp.down_proj.weight" in i.message]
    assert layer_ones and "op 'KLinearQ8Only' (q8) takes Q8_0 as stored and refuses other types, not Q4_K" in layer_ones[0].message
    assert Q8Only.ggml_type_problem("Q8_0") is None
    assert "no dequantizer for Q8_K; nearest supported type: Q8_0" in CountingLinear.ggml_type_problem("Q8_K")


def test_rules_check_json_rows_carry_role_class_backend_and_explanation(monkeypatch, write_rules, capsys):
    import json

    import ktcore.registry
    from ktcore.cli import main
    from ktcore.registry import Registry

    monkeypatch.setattr(ktcore.registry, "_REGISTRY", Registry(entrypoints=False))
    path = write_rules("""
- extends: default
- match: {name: "^lm_head$"}
  replace: {class: KLinear, kwargs: {op: KLinearTorch}}
""")
    assert main(["rules", "check", str(path), "--model", "llama", "--layout", "cpu", "--json"]) == 0
    rows = {row["module"]: row for row in json.loads(capsys.readouterr().out)}
    head, attn = rows["lm_head"], rows["model.layers.0.self_attn"]
    assert (head["role"], head["class"], head["rule"]) == ("linear", "Linear", f"{path}:2")
    assert (attn["role"], attn["class"], attn["generate_op"], attn["generate_backend"]) == (
        "attention", "LlamaAttention", "KAttentionSDPA", "torch")
    assert attn["rule"].endswith("llama-cpu.yaml:" + attn["rule"].rsplit(":", 1)[1])
    assert rows["model.layers.0.mlp.up_proj"]["explain"][0].startswith("KLinearCPU -> torch (KLinearTorch) on cpu")
    assert main(["rules", "check", str(path), "--model", "llama", "--layout", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "backends chosen" in out and "KLinearCPU -> torch (KLinearTorch) on cpu" in out
