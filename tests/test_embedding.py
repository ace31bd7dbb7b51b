"""Token embeddings kept as GGUF blocks (ktcore/embedding.py): the rows a lookup dequantizes are those of the
whole-matrix dequantizer, the model's own embedding class still does what it adds, and a loaded model computes
the same logits as with the embedding dequantized at load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ktcore.inject
from ktcore.embedding import QuantizedEmbedding, keep_quantized
from ktcore.inject import load_model
from ktcore.testing import tiny_model
from ktcore.weights import open_source
from ktcore.weights.gguf_writer import encode, write_gguf
from ktcore.weights.tensor import QuantizedTensor

IDS = torch.tensor([[3, 0, 511, 17, 17, 200], [5, 9, 1, 2, 300, 44]])


def _blocks(values: torch.Tensor, qtype: str) -> QuantizedTensor:
    raw = encode(values.numpy().astype(np.float32), qtype)
    return QuantizedTensor("token_embd.weight", qtype, tuple(values.shape), torch.from_numpy(raw.reshape(-1).view(np.uint8)))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_K", "Q5_0", "Q6_K"])
def test_lookup_is_the_dequantized_rows(qtype):
    values = torch.randn(512, 256, generator=torch.Generator().manual_seed(1))
    qt = _blocks(values, qtype)
    module = nn.Embedding(512, 256)
    keep_quantized(module, qt, torch.float32)
    assert type(module) is QuantizedEmbedding and "weight" not in module._parameters
    assert torch.equal(module(IDS), F.embedding(IDS, qt.dequantize(torch.float32)))
    assert module.weight.shape == (512, 256) and torch.isnan(module.weight[0, 0])
    assert module.weight.untyped_storage().nbytes() == 4  # a placeholder, not a matrix
    with pytest.raises(IndexError):
        module(torch.tensor([512]))


def test_model_embedding_class_keeps_its_scale_and_moves_dtype():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    values = torch.randn(300, 64, generator=torch.Generator().manual_seed(2))
    qt = _blocks(values, "Q8_0")
    module = Gemma3TextScaledWordEmbedding(300, 64, padding_idx=0, embed_scale=8.0)
    keep_quantized(module, qt, torch.float32)
    assert isinstance(module, Gemma3TextScaledWordEmbedding) and isinstance(module, QuantizedEmbedding)
    ids = IDS.clamp(max=299)
    assert torch.equal(module(ids), F.embedding(ids, qt.dequantize(torch.float32)) * 8.0)
    module.to(torch.bfloat16)
    assert module.weight.dtype == torch.bfloat16 and module.blocks.dtype == torch.uint8
    out = module(ids)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, (F.embedding(ids, qt.dequantize(torch.float32)).to(torch.bfloat16) * 8.0))


@pytest.fixture(scope="module")
def gemma_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("emb") / "gemma3.gguf"
    write_gguf(tiny_model("gemma3", seed=4), path, qtypes={"token_embd": "Q8_0", "default": "Q4_K"})
    return path


def _logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(IDS.clamp(max=model.config.vocab_size - 1)).logits


def test_loaded_model_keeps_blocks_with_the_same_logits(gemma_gguf, monkeypatch):
    model, _ = load_model(open_source(gemma_gguf), progress=False)
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, QuantizedEmbedding) and embedding.ggml_type == "Q8_0"
    assert not any("embed_tokens" in n for n, _ in model.named_parameters())
    monkeypatch.setattr(ktcore.inject, "can_keep_quantized", lambda *a: False)
    dense, _ = load_model(open_source(gemma_gguf), progress=False)
    assert not isinstance(dense.get_input_embeddings(), QuantizedEmbedding)
    assert torch.equal(_logits(model), _logits(dense))


def test_embedding_tied_to_a_plain_head_stays_dense(gemma_gguf, write_rules):
    # lm_head kept as Transformers' nn.Linear shares the embedding's matrix: that one must be dense
    rules = write_rules("""
        - match: {name: "^lm_head$"}
          replace: {class: default}
        - extends: default
    """)
    model, _ = load_model(open_source(gemma_gguf), rules=[str(rules)], progress=False)
    embedding = model.get_input_embeddings()
    assert not isinstance(embedding, QuantizedEmbedding)
    assert model.lm_head.weight is embedding.weight
