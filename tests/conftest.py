"""Shared test helpers: test-local ops (counting calls), a registry holding only them, tiny models."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import ktcore
from ktcore.inject import to_torch
from ktcore.registry import Registry


def _plain(weights, name, device):
    return to_torch(weights[name], torch.float32, device)


class CountingLinear(ktcore.Op):
    """``x @ W.T + b`` in fp32; counts its calls on the class (each subclass has its own counter)."""

    name = "KLinearTest"
    role = "linear"
    devices = ("cpu",)
    calls = 0

    def load(self, weights):
        self.weight = _plain(weights, "weight", self.device)
        self.bias = _plain(weights, "bias", self.device) if "bias" in weights else None

    def forward(self, x):
        type(self).calls += 1
        return F.linear(x, self.weight, self.bias)


class CountingLinearB(CountingLinear):
    name = "KLinearTestB"
    calls = 0


class AnyDeviceLinear(CountingLinear):
    name = "KLinearTestAnyDevice"
    devices = ("cpu", "cuda")
    calls = 0


class CountingExperts(ktcore.Op):
    """Reference routed experts over split gate/up/down tensors, the activation taken from the module."""

    name = "KExpertsTest"
    role = "experts"
    devices = ("cpu", "cuda")
    calls = 0

    def __init__(self, module, device="cpu", **kwargs):
        super().__init__(module, device, **kwargs)
        self.act_fn = module.act_fn

    def load(self, weights):
        self.gate = _plain(weights, "gate_proj", self.device)
        self.up = _plain(weights, "up_proj", self.device)
        self.down = _plain(weights, "down_proj", self.device)

    def forward(self, hidden, top_k_index, top_k_weights):
        type(self).calls += 1
        out = torch.zeros_like(hidden)
        for k in range(top_k_index.shape[1]):
            for e in top_k_index[:, k].unique().tolist():
                rows = (top_k_index[:, k] == e).nonzero().flatten()
                x = hidden[rows]
                y = F.linear(self.act_fn(F.linear(x, self.gate[e])) * F.linear(x, self.up[e]), self.down[e])
                out.index_add_(0, rows, y * top_k_weights[rows, k, None].to(y.dtype))
        return out


class PassthroughAttention(ktcore.Op):
    """Runs the original attention module's own forward (its children are the final, loaded ones)."""

    name = "KAttentionTest"
    role = "attention"
    devices = ("cpu",)
    calls = 0

    def __init__(self, module, device="cpu", **kwargs):
        super().__init__(module, device, **kwargs)
        self.__dict__["module"] = module  # not a child: its tensors belong to the wrapper
        self.seen_kwargs: set[str] = set()

    def forward(self, *args, **kwargs):
        type(self).calls += 1
        self.seen_kwargs |= set(kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)


class TableRoPE(ktcore.Op):
    """Computes the rotary tables with a fresh copy of the module built from its config on this device."""

    name = "KRoPETest"
    role = "rope"
    devices = ("cpu",)
    calls = 0

    def __init__(self, module, device="cpu", **kwargs):
        super().__init__(module, device, **kwargs)
        with torch.device(self.device):
            self.inner = type(module)(module.config)

    def forward(self, x, position_ids):
        type(self).calls += 1
        return self.inner(x, position_ids)


class UnavailableLinear(CountingLinear):
    name = "KLinearNeverHere"

    @classmethod
    def available(cls, device=None):
        return "this op needs the imaginary FooBar instruction set"


class OpsPlugin:
    @ktcore.hookimpl
    def register_linear_ops(self, register):
        register(CountingLinear)
        register(CountingLinearB)
        register(UnavailableLinear)
        register(AnyDeviceLinear)

    @ktcore.hookimpl
    def register_experts_ops(self, register):
        register(CountingExperts)

    @ktcore.hookimpl
    def register_attention_ops(self, register):
        register(PassthroughAttention)

    @ktcore.hookimpl
    def register_rope_ops(self, register):
        register(TableRoPE)


TEST_OPS = (CountingLinear, CountingLinearB, AnyDeviceLinear, CountingExperts, PassthroughAttention, TableRoPE, UnavailableLinear)


@pytest.fixture(autouse=True)
def _reset_counters():
    for op in TEST_OPS:
        op.calls = 0
    yield


@pytest.fixture
def registry() -> Registry:
    """Only the test plugin: no built-in ops, no installed entry points."""
    return Registry(builtin=False, entrypoints=False, plugins={"testplugin": OpsPlugin()})


@pytest.fixture
def write_rules(tmp_path):
    """``write_rules(yaml_text, name="rules.yaml") -> path`` (text is dedented)."""

    def write(text: str, name: str = "rules.yaml"):
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip("\n"))
        return path

    return write


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    values = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_qwen3_moe_config(**overrides):
    from transformers import Qwen3MoeConfig

    values = dict(vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_experts=4,
                  num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, max_position_embeddings=64, decoder_sparse_step=1, mlp_only_layers=[],
                  norm_topk_prob=True, tie_word_embeddings=False)
    values.update(overrides)
    return Qwen3MoeConfig(**values)


def seeded_model(config, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # initializer_range 0.02 gives near-uniform logits; make layers matter
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, p.shape[-1] ** -0.5)
    return model


def amx_plugin_registry() -> Registry:
    """A registry of ktcore's built-ins and kt-cpu-amx (the test skips where the plugin is absent or cannot run)."""
    try:
        import kt_cpu_amx.plugin as amx_plugin
        from kt_cpu_amx.runtime import unavailable_reason
    except ImportError as exc:
        pytest.skip(f"kt-cpu-amx is not installed: {exc}")
    why = unavailable_reason()
    if why:
        pytest.skip(why)
    registry = Registry(entrypoints=False)
    registry.add_plugin(amx_plugin, "cpu_amx")
    return registry


@pytest.fixture(scope="module")
def amx_registry() -> Registry:
    return amx_plugin_registry()


# -- engine tests: greedy requests and their one-sequence reference


def greedy_params(n):
    from ktcore.generate import SamplingParams

    return SamplingParams(max_new_tokens=n, ignore_eos=True)


def random_prompts(vocab, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def solo_greedy(model, prompt, n):
    """Plain one-sequence decoding: the whole prompt in one call, then one token per call."""
    from ktcore.generate import forward_step, model_device, new_cache

    device = model_device(model)  # with an accelerator, the shipped rules put an injected model there
    cache, ids, out = new_cache(model, len(prompt) + n + 1), torch.tensor([prompt], device=device), []
    with torch.inference_mode():
        for _ in range(n):
            out.append(int(forward_step(model, ids, cache)[0, -1].argmax()))
            ids = torch.tensor([[out[-1]]], device=device)
    return out


def run_engine(engine, prompts, lengths):
    """Greedy requests of ``lengths`` new tokens added at once and stepped to the end: their sequences."""
    seqs = [engine.new_sequence(p, greedy_params(n), text=False) for p, n in zip(prompts, lengths)]
    for s in seqs:
        engine.add(s)
    while engine.has_work:
        engine.step()
    return seqs


@pytest.fixture(scope="session", autouse=True)
def _few_threads():
    torch.set_num_threads(min(2, torch.get_num_threads()))


# Test modules import the helpers above as `core_test_helpers`: `from conftest import ...` would be ambiguous
# (tests/server/ has its own conftest.py, and both are imported under the module name "conftest").
sys.modules["core_test_helpers"] = sys.modules[__name__]
