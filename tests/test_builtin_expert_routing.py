"""``route_by_expert`` and ``split_experts``: the shared per-expert plumbing of the experts ops."""

import pytest
import torch

from ktcore.builtin.experts import gated_experts_dims, route_by_expert, split_experts
from ktcore.testing import gguf_reference, quantized_sample


def test_route_by_expert_matches_a_scan_of_every_choice():
    gen = torch.Generator().manual_seed(0)
    index = torch.randint(-1, 6, (9, 3), generator=gen)  # -1 and 5 fall outside [0, 5): skipped
    weights = torch.rand(9, 3, generator=gen)
    got = list(route_by_expert(index, weights, num_experts=5))
    expected = []
    for e in range(5):
        token, slot = torch.where(index == e)
        if token.numel():
            expected.append((e, token, weights[token, slot]))
    assert [g[0] for g in got] == [e[0] for e in expected]
    for (_, tokens, w), (_, want_tokens, want_w) in zip(got, expected):
        assert torch.equal(tokens, want_tokens) and torch.equal(w, want_w)


def test_split_experts_slices_whole_blocks_and_names_missing_projections():
    gate, up = quantized_sample("Q4_0", (3, 4, 64), seed=1, name="gate"), quantized_sample("Q8_0", (3, 4, 64), seed=2, name="up")
    experts = split_experts("KExpertsX", {"gate_proj": gate, "up_proj": up}, ("gate_proj", "up_proj"))
    assert len(experts) == 3 and experts[1]["up_proj"].name == "up[1]" and experts[1]["up_proj"].shape == (4, 64)
    torch.testing.assert_close(gguf_reference(experts[2]["gate_proj"]), gguf_reference(gate)[2], rtol=0, atol=0)
    with pytest.raises(KeyError, match="KExpertsX: load\\(\\) needs gate_proj, down_proj; missing down_proj"):
        split_experts("KExpertsX", {"gate_proj": gate}, ("gate_proj", "down_proj"))
    with pytest.raises(ValueError, match="disagree on the number of experts"):
        split_experts("KExpertsX", {"gate_proj": gate, "up_proj": quantized_sample("Q8_0", (2, 4, 64))}, ("gate_proj", "up_proj"))


def test_gated_experts_dims_rejects_other_layouts():
    module = torch.nn.Module()
    module.num_experts, module.hidden_dim, module.intermediate_dim = 4, 8, 16
    assert gated_experts_dims("KExpertsX", module) == (4, 8, 16)
    module.has_bias = True
    with pytest.raises(ValueError, match="KExpertsX: Module has has_bias=True"):
        gated_experts_dims("KExpertsX", module)
