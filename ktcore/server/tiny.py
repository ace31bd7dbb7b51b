"""A tiny random chat model for server tests, the load test and ``kt serve tiny:<family>``.

The model is ``ktcore.testing.tiny_model(family)``; the tokenizer is built here offline: one token per
character (ASCII first, then enough further Unicode letters to cover the model's whole vocabulary, so every
id the random model samples decodes to text), ChatML special tokens and a ChatML chat template.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "<|im_end|>", "<|im_start|>", "<unk>"]  # ids 0..4: pad, bos, eos as in testing.py

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _characters(count: int) -> list[str]:
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    code = 0xC0  # Latin letters onwards: printable, one code point each
    while len(chars) < count:
        if chr(code).isprintable():
            chars.append(chr(code))
        code += 1
    return chars[:count]


def tiny_chat_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in _characters(vocab_size - len(SPECIALS)):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_chat_model(family: str = "llama", seed: int = 0):
    """``(model, tokenizer)``: ``ktcore.testing.tiny_model(family, seed)`` and a tokenizer for its vocabulary."""
    from ktcore.testing import tiny_model

    model = tiny_model(family, seed)
    return model, tiny_chat_tokenizer(model.config.vocab_size)


HARMONY_TOKENS = ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>", "<|constrain|>"]
HARMONY_TEMPLATE = (  # GPT-OSS's layout in brief: tools in a developer message, calls on the commentary channel
    "{% if tools %}<|start|>developer<|message|>namespace functions {\n"
    "{% for t in tools %}type {{ t.function.name }} = (_: {{ t.function.parameters | tojson }}) => any;{% endfor %}"
    "}<|end|>{% endif %}"
    "{% for m in messages %}{% if m.role == 'assistant' and m.tool_calls %}{% for c in m.tool_calls %}"
    "<|start|>assistant<|channel|>commentary to=functions.{{ c.function.name }} <|constrain|>json<|message|>"
    "{{ c.function.arguments | tojson }}<|call|>{% endfor %}"
    "{% elif m.role == 'tool' %}<|start|>functions.{{ m.name }} to=assistant<|channel|>commentary<|message|>"
    "{{ m.content }}<|end|>"
    "{% elif m.role == 'assistant' %}<|start|>assistant<|channel|>final<|message|>{{ m.content }}<|end|>"
    "{% else %}<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}")


def tiny_harmony_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """``tiny_chat_tokenizer`` with GPT-OSS's harmony special tokens and a harmony-style chat template."""
    tok = tiny_chat_tokenizer(vocab_size - len(HARMONY_TOKENS))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", *HARMONY_TOKENS]})
    tok.chat_template = HARMONY_TEMPLATE
    assert len(tok) == vocab_size
    return tok


def scripted_harmony_model(script: dict):
    """``(model, tokenizer)``: a tiny llama with ``tiny_harmony_tokenizer`` whose logits are overridden to spell
    ``script["reply"]`` (read at each step, so a test may change it between replies), from its start at every
    prefill; once spelled, its last token repeats. Each prompt is appended to ``script.setdefault("prompts",
    [])`` as the text its prefill saw (a prefix-cache hit shows only the new part)."""
    from ktcore.testing import tiny_model

    model = tiny_model("llama", 0)
    tokenizer = tiny_harmony_tokenizer(model.config.vocab_size)
    step = {"i": 0}

    def spell(module, args, kwargs, out):
        ids = tokenizer(script["reply"], add_special_tokens=False)["input_ids"]
        if kwargs["input_ids"].shape[1] > 1:  # a prefill starts a reply
            step["i"] = 0
            script.setdefault("prompts", []).append(tokenizer.decode(kwargs["input_ids"][0]))
        out.logits[:, -1] = -1e4
        out.logits[:, -1, ids[min(step["i"], len(ids) - 1)]] = 0
        step["i"] += 1
        return out

    model.register_forward_hook(spell, with_kwargs=True)
    return model, tokenizer
