"""``KExpertsLlama4``: Llama 4's routed experts behind the experts ops every other family uses.

Transformers' ``Llama4TextMoe`` calls its experts as ``experts(routed_in)`` with ``routed_in[E * T, H]``: row
``e * T + t`` is token ``t`` scaled by its routing score for expert ``e`` (sigmoid of the router logit; zero
where ``e`` was not chosen), and expects each row through its expert back (``[E * T, H]``; the block sums
over experts). This wrapper takes that call, hands the experts op only the chosen rows (expert ``e`` for its
block of rows, index -1 for the zero rows, routing weight 1: the score is already in the input) and returns
what Transformers' module returns, so ``KExpertsTorch`` or a CPU kernel op computes Llama 4 unchanged.
"""

from __future__ import annotations

import torch

from ..modules import KExperts
from ..weights.state_dict import as_quantized


class KExpertsLlama4(KExperts):
    def __init__(self, original, **kwargs):
        # the names experts ops read from Transformers' fused experts modules
        original.hidden_dim = original.hidden_size
        original.intermediate_dim = original.expert_dim
        super().__init__(original, **kwargs)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        e, h, i = self.original.num_experts, self.original.hidden_size, self.original.expert_dim
        return {"gate_proj": (e, i, h), "up_proj": (e, i, h), "down_proj": (e, i, h)}  # down: Transformers' [E, I, H]

    def load_weights(self, weights) -> None:
        down = weights["down_proj"]  # the ops take [E, H, I]
        down = as_quantized(down.name, down.dequantize(torch.float32).transpose(1, 2), down.source)
        super().load_weights({**weights, "down_proj": down})

    def forward(self, routed_in: torch.Tensor) -> torch.Tensor:
        experts = self.original.num_experts
        tokens = routed_in.shape[0] // experts
        index = torch.arange(experts, device=routed_in.device).repeat_interleave(tokens)
        index = torch.where(routed_in.abs().amax(dim=-1) > 0, index, -1)[:, None]
        weights = torch.ones(index.shape, dtype=routed_in.dtype, device=routed_in.device)
        return self._run(tokens, routed_in, routed_in, index, weights)
