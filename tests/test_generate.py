"""ktcore.generate: KV cache, chunked prefill, sampling, stop handling, streaming text and scoring.

References: Transformers' own ``model.generate`` and full-sequence forward passes on tiny random models.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from ktcore.generate import (
    ContextOverflowError,
    Generator,
    Sampler,
    SamplingParams,
    TextStream,
    forward_step,
    new_cache,
)
from ktcore.testing import FAMILIES, tiny_model

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------ helpers


def byte_tokenizer():
    """A byte-level BPE tokenizer without merges: every UTF-8 byte is one token, so any character
    outside ASCII spans several tokens (ids 3..258; 0-2 are <pad> <s> </s>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {c: i + 3 for i, c in enumerate(alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    return tok


class ScriptedLM(nn.Module):
    """A stand-in LM that, after ``len(prompt) + i`` positions, puts all its mass on ``script[i]``; it
    writes dummy keys/values into the cache so positions advance exactly as with a real model."""

    def __init__(self, prompt_len: int, script: list[int], vocab: int = 300):
        super().__init__()
        self.config = LlamaConfig(num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                                  hidden_size=4, head_dim=4, vocab_size=vocab, eos_token_id=2)
        self.embed = nn.Embedding(vocab, 4)
        self.prompt_len, self.script, self.vocab = prompt_len, script, vocab

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, cache=None, use_cache=True, logits_to_keep=0):
        start = cache.get_seq_length()
        n = input_ids.shape[1]
        cache.update(torch.zeros(1, 1, n, 4), torch.zeros(1, 1, n, 4), 0)
        rows = []
        for pos in range(start, start + n):
            row = torch.full((self.vocab,), -10.0)
            step = pos + 1 - self.prompt_len
            if 0 <= step < len(self.script):
                row[self.script[step]] = 10.0
            rows.append(row)
        logits = torch.stack(rows)[None]
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return type("Out", (), {"logits": logits})()


def scripted_generator(text: str, prompt: str = "hi", **kwargs):
    tok = byte_tokenizer()
    prompt_ids = tok(prompt)["input_ids"]
    script = tok(text, add_special_tokens=False)["input_ids"]
    return Generator(ScriptedLM(len(prompt_ids), script), tok, **kwargs), script


def hf_greedy(model, prompt_ids, n):
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, top_k=None, top_p=None)
    return out[0, len(prompt_ids):].tolist()


PROMPT = [1, 17, 300, 42, 99, 5, 260, 77, 12, 450, 31, 8, 64]  # 13 tokens: longer than gemma3's window of 8


# ------------------------------------------------------------------------------------------ text stream


def test_text_stream_holds_partial_utf8_and_reassembles():
    tok = byte_tokenizer()
    text = "naïve café → 東京 🙂 done"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text)  # multi-byte characters span several tokens
    stream = TextStream(tok)
    deltas = [stream.push(i) for i in ids]
    deltas.append(stream.flush())
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    # the 4 bytes of the emoji come out as one delta, after its last byte
    emoji_bytes = len("🙂".encode())
    first = tok("naïve café → 東京 ", add_special_tokens=False)["input_ids"]
    assert deltas[len(first): len(first) + emoji_bytes] == [""] * (emoji_bytes - 1) + ["🙂"]


def test_generate_streams_exact_text_and_stops_at_eos():
    gen, script = scripted_generator("Grüße, 世界!")
    eos = gen.tokenizer.eos_token_id
    gen.model.script = script + [eos, 65, 66]  # after EOS nothing more may come out
    deltas = list(gen.generate("hi", SamplingParams(max_new_tokens=50)))
    assert "".join(d.text for d in deltas) == "Grüße, 世界!"
    final = deltas[-1]
    assert final.finish_reason == "stop"
    assert final.timing.generated_tokens == len(script) + 1
    assert [t for d in deltas for t in d.token_ids] == script + [eos]
    assert all(d.finish_reason is None for d in deltas[:-1])


@pytest.mark.parametrize("stop", ["</answer>", "\n\n", "界"])
def test_stop_strings_cut_output_and_never_leak(stop):
    body = "x = 1 </ans and 世 more"
    gen, _ = scripted_generator(body + stop + " trailing garbage")
    deltas = list(gen.generate("hi", SamplingParams(max_new_tokens=200, stop=[stop, "unused-stop"])))
    text = "".join(d.text for d in deltas)
    assert text == body  # the body holds no stop string, so all of it comes out, and nothing after
    assert deltas[-1].finish_reason == "stop"
    # a prefix of the stop string that turned out not to be one is emitted, not swallowed
    assert "</ans" in text


def test_held_back_prefix_released_on_length_and_eos():
    gen, script = scripted_generator("abc</ans")
    deltas = list(gen.generate("hi", SamplingParams(max_new_tokens=len(script), stop=["</answer>"])))
    assert "".join(d.text for d in deltas) == "abc</ans"
    assert deltas[-1].finish_reason == "length"
    gen.model.script = script + [gen.tokenizer.eos_token_id]
    deltas = list(gen.generate("hi", SamplingParams(max_new_tokens=100, stop=["</answer>"])))
    assert "".join(d.text for d in deltas) == "abc</ans"
    assert deltas[-1].finish_reason == "stop"


def test_max_new_tokens_and_stop_token_ids():
    gen, script = scripted_generator("abcdefgh")
    deltas = list(gen.generate("hi", SamplingParams(max_new_tokens=3)))
    assert "".join(d.text for d in deltas) == "abc" and deltas[-1].finish_reason == "length"
    stop_at = gen.tokenizer.convert_tokens_to_ids("e")
    deltas = list(gen.generate("hi", SamplingParams(max_new_tokens=30, stop_token_ids=[stop_at])))
    assert "".join(d.text for d in deltas) == "abcd" and deltas[-1].finish_reason == "stop"


def test_prompt_longer_than_context_is_refused():
    gen, _ = scripted_generator("abc", prompt="x" * 40, max_context=16)
    with pytest.raises(ContextOverflowError, match="max-context"):
        list(gen.generate("x" * 40, SamplingParams(max_new_tokens=2)))
    # the reply is cut when the cache is full
    gen, _ = scripted_generator("abcdefghijklmnop", prompt="xy", max_context=8)
    deltas = list(gen.generate("xy", SamplingParams(max_new_tokens=100)))
    assert deltas[-1].finish_reason == "length"
    assert deltas[-1].timing.prompt_tokens + deltas[-1].timing.generated_tokens == 8


# ------------------------------------------------------------------------------------------ sampling


def test_sampler_greedy_topk_topp_and_seed():
    torch.manual_seed(0)
    logits = torch.randn(500) * 3
    best = int(logits.argmax())
    assert Sampler(SamplingParams())(logits) == best
    assert Sampler(SamplingParams(temperature=1.5, top_k=1, seed=3))(logits) == best
    assert Sampler(SamplingParams(temperature=1.5, top_p=1e-6, seed=3))(logits) == best
    s1 = Sampler(SamplingParams(temperature=1.0, seed=7))
    s2 = Sampler(SamplingParams(temperature=1.0, seed=7))
    a = [s1(logits) for _ in range(50)]
    assert a == [s2(logits) for _ in range(50)]
    assert len(set(a)) > 5  # really sampling at temperature 1 over a flat-ish distribution
    # top-k restricts the support to the k best
    top5 = set(torch.topk(logits, 5).indices.tolist())
    s = Sampler(SamplingParams(temperature=5.0, top_k=5, seed=1))
    assert {s(logits) for _ in range(200)} <= top5
    # top-p keeps the smallest head whose mass reaches p
    logits = torch.randn(500)  # flatter: the head reaching p = 0.5 holds many tokens
    probs = logits.softmax(-1)
    order = probs.argsort(descending=True)
    head = int((probs[order].cumsum(0) < 0.5).sum()) + 1
    allowed = set(order[:head].tolist())
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.5, seed=2))
    got = {s(logits) for _ in range(300)}
    assert got <= allowed and len(got) > 1


def test_greedy_pick_is_torch_argmax_on_ties_nan_and_strided_rows():
    """Greedy picks through numpy (no OpenMP region); the index must be torch's: the first maximum, a NaN wins."""
    rows = [torch.tensor([1.0, 3.0, 3.0, 2.0]), torch.tensor([1.0, float("nan"), 5.0, float("nan")]),
            torch.tensor([-float("inf"), -1.0]), torch.randn(7, 50)[:, 9], torch.randn(49152)]
    for row in rows:
        assert Sampler(SamplingParams())(row) == int(row.argmax())
    context = torch.tensor([2, 3])  # with a repetition penalty the penalized row is the one picked from
    assert Sampler(SamplingParams(repetition_penalty=10.0))(torch.tensor([1.0, 0.0, 4.0, 3.0]), context) == 0


def test_repetition_penalty_matches_transformers_processor():
    torch.manual_seed(1)
    logits = torch.randn(64)
    context = torch.tensor([3, 5, 5, 9, 40])
    ours = Sampler(SamplingParams(repetition_penalty=1.7))
    expected = RepetitionPenaltyLogitsProcessor(1.7)(context[None], logits[None].clone())[0]
    assert ours(logits, context) == int(expected.argmax())
    # strong enough to move the argmax off a seen token
    logits[5] = 10.0
    assert Sampler(SamplingParams())(logits, context) == 5
    assert Sampler(SamplingParams(repetition_penalty=100.0))(logits, context) != 5


def test_invalid_sampling_params():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=0)


# ------------------------------------------------------------------------------------------ real models


@pytest.mark.parametrize("family", ["llama", "gemma3", "deepseek_v2"])
def test_greedy_matches_transformers_generate(family):
    model = tiny_model(family, seed=3)
    gen = Generator(model, None, max_context=64, prefill_chunk=5)  # 13-token prompt: 3 prefill chunks
    ours = list(gen.generate_ids(PROMPT, SamplingParams(max_new_tokens=32)))
    assert ours == hf_greedy(model, PROMPT, 32)
    assert len(ours) == 32 or ours[-1] in gen.eos_token_ids


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_cached_steps_match_full_forward(family):
    """Chunked prefill + one-token steps through the preallocated cache give the logits of one forward
    pass over the whole sequence (gemma3's sliding layers have a window of 8 < 13 + 6 tokens)."""
    model = tiny_model(family, seed=5)
    seq = PROMPT + [7, 300, 11, 400, 2, 99]
    with torch.inference_mode():
        full = model(torch.tensor([seq])).logits[0].float()
    cache = new_cache(model, 32)
    parts = [forward_step(model, torch.tensor([PROMPT[:6]]), cache, 0),
             forward_step(model, torch.tensor([PROMPT[6:]]), cache, 0)]
    parts += [forward_step(model, torch.tensor([[t]]), cache, 0) for t in seq[len(PROMPT):]]
    stepped = torch.cat([p[0] for p in parts])
    torch.testing.assert_close(stepped, full, atol=1e-4, rtol=1e-4)
    assert cache.get_seq_length() == len(seq)


def test_score_is_teacher_forced_log_softmax():
    model = tiny_model("qwen3", seed=2)
    gen = Generator(model, None, max_context=32, prefill_chunk=4)
    with torch.inference_mode():
        expected = model(torch.tensor([PROMPT])).logits[0].float().log_softmax(-1)
    got = gen.score(PROMPT)
    assert got.shape == (len(PROMPT), model.config.vocab_size)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # the generator is reusable after scoring
    assert list(gen.generate_ids(PROMPT, SamplingParams(max_new_tokens=4))) == hf_greedy(model, PROMPT, 4)


def test_seeded_sampling_reproducible_on_model():
    model = tiny_model("llama", seed=4)
    gen = Generator(model, None, max_context=64)
    params = SamplingParams(max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.95, seed=1234, ignore_eos=True)
    a = list(gen.generate_ids(PROMPT, params))
    b = list(gen.generate_ids(PROMPT, params))
    c = list(gen.generate_ids(PROMPT, SamplingParams(**{**params.__dict__, "seed": 99})))
    assert a == b and len(a) == 12
    assert a != c


def test_repetition_penalty_matches_transformers_generate():
    model = tiny_model("llama", seed=6)
    gen = Generator(model, None, max_context=64)
    ours = list(gen.generate_ids(PROMPT, SamplingParams(max_new_tokens=16, repetition_penalty=1.5, ignore_eos=True)))
    ref = model.generate(torch.tensor([PROMPT]), max_new_tokens=16, do_sample=False, top_k=None, top_p=None,
                         repetition_penalty=1.5, min_new_tokens=0)
    ref = ref[0, len(PROMPT):].tolist()
    assert ours[: len(ref)] == ref


# ------------------------------------------------------------------------------------------ injected models


def _injected(family, seed):
    from ktcore.inject import RULE_FILES_DIR, load_model
    from ktcore.testing import MODEL_TYPES
    from ktcore.weights.state_dict import StateDictSource

    ref = tiny_model(family, seed=seed)
    from ktcore.registry import Registry

    rules = RULE_FILES_DIR / f"{MODEL_TYPES[family]}-cpu.yaml"
    # the core's torch ops, whatever is installed (kt-cpu-amx would back KLinearCPU/KExpertsCPU)
    model, report = load_model(StateDictSource(ref), rules=rules, progress=False, registry=Registry(entrypoints=False))
    assert len(report.rows) > 0
    return ref, model


@pytest.mark.parametrize("family", FAMILIES)
def test_injected_model_greedy_matches_transformers(family):
    """An injected tiny model of every family decodes the same 32 greedy tokens through the Generator as
    plain Transformers' generate() on the original model; and Transformers' generate() still works on
    the injected model."""
    ref, model = _injected(family, seed=11)
    expected = hf_greedy(ref, PROMPT, 32)
    ours = list(Generator(model, None, max_context=64, prefill_chunk=8).generate_ids(PROMPT, SamplingParams(max_new_tokens=32)))
    assert ours == expected
    assert hf_greedy(model, PROMPT, 32) == expected


def test_wrapper_call_plan_follows_attribute_changes():
    """KModule plans its calls once (ops, threshold, out_device) for speed; setting one of those attributes
    after calls were made is still honoured."""
    from ktcore.builtin.linear import KLinearTorch
    from ktcore.modules import KLinear
    from ktcore.weights.state_dict import as_quantized

    def weights():
        return {"weight": as_quantized("weight", torch.randn(8, 16), "test")}

    wrapper = KLinear(nn.Linear(16, 8, bias=False, device="meta"), prefill_op=KLinearTorch, name="lin")
    wrapper.load_weights(weights())
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(wrapper(x), wrapper.prefill_op(x))
        wrapper.out_device = torch.device("meta")  # a device that cannot hold data: the move must happen
        assert wrapper(x).device.type == "meta"
        wrapper.out_device = None
        other = KLinearTorch(nn.Linear(16, 8, bias=False, device="meta"), "cpu")
        other.load(weights())
        wrapper.generate_op = other
        assert torch.equal(wrapper(x[:1]), other(x[:1]))  # one token: the new generate op
        assert torch.equal(wrapper(x), wrapper.prefill_op(x))  # three: still the prefill op
        wrapper.prefill_threshold = 3
        assert torch.equal(wrapper(x), other(x))
