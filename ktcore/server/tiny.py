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
