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
