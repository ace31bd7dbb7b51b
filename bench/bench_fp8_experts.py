"""Routed experts of a native FP8 checkpoint on the CPU: ``KExpertsFP8`` keep fp8 vs keep bf16 vs
``KExpertsTorch`` on bf16 weights, decode (1 token) and prefill (128 tokens) time of one MoE layer.

The layer has DeepSeek-V3's expert widths (hidden 7168, moe_intermediate 2048) and 8 active experts per
token, over ``--experts`` experts (default 16, so the layer fits a small machine: 0.7 GB in FP8); its weights
are random e4m3 bytes (no NaN code) with random 128x128 block scales. Each op's routing is the same seeded
draw; times are medians of ``--repeats`` calls after one warm-up. The bytes each op keeps per weight are
printed with its times.

    python bench/bench_fp8_experts.py --threads 2 [--experts 16] [--tokens 1,128] [--dtype bfloat16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import ktcore  # noqa: F401,E402  (before torch: the OpenMP wait policy ktcore sets, see ktcore/__init__.py)
import torch
from torch import nn

from ktcore.builtin.experts import KExpertsTorch
from ktcore.builtin.experts_fp8 import KExpertsFP8
from ktcore.weights import QuantizedTensor

H, I, TOP_K = 7168, 2048, 8


class ExpertsShape(nn.Module):
    """What an experts op reads from the Transformers module it replaces."""

    def __init__(self, experts: int):
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = experts, H, I
        self.act_fn = nn.SiLU()


def fp8_weights(experts: int, seed: int = 0) -> dict[str, QuantizedTensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (n, k) in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
        raw = torch.randint(0, 256, (experts, n, k), generator=g, dtype=torch.uint8)
        raw[(raw & 0x7F) == 0x7F] = 0x38
        scale = torch.rand(experts, n // 128, k // 128, generator=g) * 1e-3 + 1e-4
        out[name] = QuantizedTensor(name, "F8_E4M3", (experts, n, k), raw.reshape(-1), "bench", scale)
    return out


def time_op(op, tokens: int, experts: int, repeats: int) -> float:
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, H, generator=g).to(op.dtype)
    idx = torch.stack([torch.randperm(experts, generator=g)[:TOP_K] for _ in range(tokens)])
    w = torch.rand(tokens, TOP_K, generator=g).to(op.dtype)
    op(x, idx, w)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        op(x, idx, w)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--tokens", default="1,128")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype of every op")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    tokens = [int(t) for t in args.tokens.split(",")]
    module = ExpertsShape(args.experts)
    weights = fp8_weights(args.experts)
    n_weights = 3 * args.experts * H * I
    print(f"{args.experts} experts {H}x{I}, top-{TOP_K}, {args.threads} threads, compute {args.dtype}")
    rows = {}
    for label in ("keep fp8", "keep bf16", "bf16 torch"):
        if label == "bf16 torch":
            dense = {n: QuantizedTensor(n, "BF16", qt.shape, qt.dequantize(torch.bfloat16).reshape(-1).view(torch.uint8))
                     for n, qt in weights.items()}
            op = KExpertsTorch(module, "cpu", dtype=dtype)
            op.load(dense)
            del dense
            kept = sum(t.numel() * t.element_size() for t in (op.gate_up_proj, op.down_proj))
        else:
            op = KExpertsFP8(module, "cpu", dtype=dtype, keep=label.split()[1])
            op.load(weights)
            kept = op.kept_bytes()
        rows[label] = [time_op(op, t, args.experts, args.repeats) for t in tokens]
        cells = "  ".join(f"{t} tok {ms:9.1f} ms" for t, ms in zip(tokens, rows[label]))
        print(f"{label:11s} {kept / n_weights:7.4f} B/weight  {cells}", flush=True)
        del op
    base = rows["keep bf16"]
    for label in ("keep fp8", "bf16 torch"):
        print(f"{label} / keep bf16: " + "  ".join(f"{t} tok {a / b:5.2f}x" for t, a, b in zip(tokens, rows[label], base)))


if __name__ == "__main__":
    main()
