"""Latent attention of DeepSeek's absorbed MLA on one CUDA GPU: kt-cuda's Triton kernels against ktcore's
torch op (``KAttentionMLA._latent_attention``) and against naive attention over expanded per-head keys and
values (what a cache of expanded K/V, as plain Transformers keeps it, costs through SDPA); then kt-cuda's
masked grouped-query kernel against SDPA.

    python bench/bench_mla.py                # DeepSeek-V3 heads (128), decode T=1k/4k/16k, prefill 512/2k
    python bench/bench_mla.py --heads 16     # DeepSeek-V2-Lite

Shapes: r (kv_lora_rank) 512, rope 64, nope 128, v 128, bf16, batch 1. Decode is one query against T cached
positions; prefill is S queries over S keys, causal (the mask ktcore's op builds for a first prefill is
given to both the torch op and Triton; ``triton-nomask`` lets the kernel's own causal bound do it alone).
Times are medians of ``triton.testing.do_bench`` (L2 flushed between calls): ``eager`` per call as
launched from Python, ``graph`` the same call captured in a CUDA graph (launch overhead removed, what a
captured decode step pays). Each variant is checked against an fp32 reference first. ``expanded`` is
KMLAAttention's ``prefill: expanded`` (expansion of the latents to per-head K/V included in its time).

Measured on one H200 (torch 2.11, Triton 3.6), H=128, bf16, microseconds; decode in a CUDA graph:

    decode T=1k / 4k / 16k     triton 18.5 / 44.0 / 68.6   torch op 48.0 / 116.1 / 452.3   expanded SDPA 48.4 / 141.1 / 513.3
    decode eager               triton 159 / 193 / 105      torch op 193 / 221 / 460        (Python launch overhead)
    prefill S=T=512 / 2k       triton 330 / 4155 (237 / 2809 without the causal mask tensor)
                               torch op 899 / 9179         expanded SDPA, is_causal, cache pre-expanded 47 / 332
    GQA 32/8 D128, masked      decode T=4k (graph): triton 18.8, SDPA enable_gqa 24.3, SDPA repeated heads 106.2
                               chunk S=512 after 2k: triton 279, SDPA enable_gqa 98, repeated 190

So decode is 2.6-6.6x the torch op; latent-space prefill is 2.2-2.7x the torch op but far behind SDPA
over expanded keys (absorbed prefill does ~3.4x the FLOPs per key); ``expanded`` was added after that run
and is not timed yet (``--sweep`` neither: it failed on a missing argument, fixed since).
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import ktcore  # noqa: F401,E402  (before torch: the OpenMP wait policy ktcore sets, see ktcore/__init__.py)
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "kt_cuda"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from triton.testing import do_bench  # noqa: E402

from kt_cuda.triton_mla import flash_attention, latent_attention  # noqa: E402
from kt_cuda.ops.attention import KMLAAttention  # noqa: E402
from ktcore.builtin.attention import KAttentionMLA  # noqa: E402

R, ROPE, NOPE, VDIM = 512, 64, 128, 128
DEVICE = "cuda"  # "cpu" (with TRITON_INTERPRET=1, small shapes) checks the script's logic without timing


def graph_of(fn):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def timings(fn, graph: bool) -> tuple[float | None, float | None]:
    if DEVICE != "cuda":
        fn()
        return None, None
    eager = do_bench(fn, warmup=10, rep=40)
    if not graph:
        return eager, None
    g = graph_of(fn)
    return eager, do_bench(g.replay, warmup=10, rep=40)


def fmt(ms: float | None) -> str:
    return "      -" if ms is None else f"{ms * 1000:7.1f}"


def rel_err(got, ref) -> float:
    return ((got.float() - ref).norm() / ref.norm()).item()


# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates that --sweep times for the MLA kernel
SWEEP = [(16, 32, 4, 2), (32, 32, 4, 2), (32, 32, 8, 2), (64, 32, 8, 2), (32, 64, 8, 2), (64, 64, 8, 1)]


def mla_case(heads: int, S: int, T: int, dtype: torch.dtype, sweep: bool = False) -> None:
    g = torch.Generator(device=DEVICE).manual_seed(0)
    dev = dict(device=DEVICE, dtype=dtype)
    scale = (NOPE + ROPE) ** -0.5
    q = torch.randn(1, heads, S, R, generator=g, **dev) / R**0.25
    qr = torch.randn(1, heads, S, ROPE, generator=g, **dev)
    latent = torch.randn(1, 1, T, R, generator=g, **dev) / R**0.25
    kr = torch.randn(1, 1, T, ROPE, generator=g, **dev)
    mask = None
    if S > 1:
        mask = (torch.arange(T, device=DEVICE)[None, :] <= torch.arange(S, device=DEVICE)[:, None] + (T - S))[None, None]
    core_self = types.SimpleNamespace(query_chunk=256, scaling=scale)

    # the naive layout: per-head keys [nope | rope] and values, expanded from the latent once (a cache of them)
    w_kv = torch.randn(heads, NOPE + VDIM, R, generator=g, **dev) / R**0.5
    kv = torch.einsum("btr,hdr->bhtd", latent[:, 0], w_kv)
    k_full = torch.cat([kv[..., :NOPE], kr.expand(1, heads, T, ROPE)], dim=-1).contiguous()
    v_full = kv[..., NOPE:].contiguous()
    q_full = torch.randn(1, heads, S, NOPE + ROPE, generator=g, **dev)

    ref = KAttentionMLA._latent_attention(core_self, q.float(), qr.float(), latent.float(), kr.float(), mask)
    variants = {
        "triton": lambda: latent_attention(q, qr, latent, kr, scale=scale, mask=mask),
        "torch-op": lambda: KAttentionMLA._latent_attention(core_self, q, qr, latent, kr, mask),
    }
    errors = {}
    if S > 1:
        variants["triton-nomask"] = lambda: latent_attention(q, qr, latent, kr, scale=scale)
        # KMLAAttention's prefill "expanded": from q_nope, expanding the latents (included in the time);
        # its reference is the absorbed product of the same q_nope, taken to v space
        q_nope = torch.randn(1, heads, S, NOPE, generator=g, **dev)
        exp_self = types.SimpleNamespace(dtype=dtype, w_k=w_kv[:, :NOPE], w_v=w_kv[:, NOPE:], scaling=scale, v_head_dim=VDIM)
        variants["expanded"] = lambda: KMLAAttention._attend_expanded(exp_self, q_nope, qr, latent, kr, mask)
        q_abs = torch.einsum("bhsn,hnr->bhsr", q_nope.float(), w_kv[:, :NOPE].float())
        ref_v = KAttentionMLA._latent_attention(core_self, q_abs, qr.float(), latent.float(), kr.float(), mask)
        ref_v = torch.einsum("bhsr,hvr->bshv", ref_v, w_kv[:, NOPE:].float()).reshape(1, S, heads * VDIM)
        errors["expanded"] = rel_err(variants["expanded"](), ref_v)
        assert errors["expanded"] < 2e-2, f"expanded: relative error {errors['expanded']:.3g}"
    for name in ("triton", "torch-op", "triton-nomask"):
        if name in variants:
            errors[name] = rel_err(variants[name](), ref)
            assert errors[name] < 2e-2, f"{name}: relative error {errors[name]:.3g}"
    variants["naive-expanded"] = lambda: F.scaled_dot_product_attention(q_full, k_full, v_full, is_causal=S > 1, scale=scale)
    kind = "decode " if S == 1 else "prefill"
    cache_mb = (latent.numel() + kr.numel()) * latent.element_size() / 2**20
    naive_mb = (k_full.numel() + v_full.numel()) * k_full.element_size() / 2**20
    print(f"\n{kind} H={heads} S={S} T={T}: latent cache {cache_mb:.1f} MiB, expanded K/V {naive_mb:.1f} MiB")
    print(f"  {'variant':16s} {'eager us':>9s} {'graph us':>9s}   rel err vs fp32")
    results = {}
    for name, fn in variants.items():
        eager, graphed = timings(fn, graph=S == 1)
        results[name] = graphed if graphed is not None else eager
        err = f"{errors[name]:.1e}" if name in errors else "-"
        print(f"  {name:16s} {fmt(eager)}   {fmt(graphed)}   {err}")
    if sweep:
        for config in SWEEP:
            fn = lambda: latent_attention(q, qr, latent, kr, scale=scale, mask=mask, config=config)  # noqa: E731
            try:
                err = rel_err(fn(), ref)
                eager, graphed = timings(fn, graph=S == 1)
                print(f"  config {config}: {fmt(eager)}   {fmt(graphed)}   {err:.1e}")
            except Exception as exc:  # a config the GPU cannot hold
                print(f"  config {config}: failed ({type(exc).__name__}: {str(exc)[:80]})")
    if DEVICE != "cuda":
        return
    base = results["torch-op"]
    print("  speed-up over the torch op: " + ", ".join(f"{n} {base / t:.2f}x" for n, t in results.items() if n != "torch-op"))


def gqa_case(S: int, T: int, dtype: torch.dtype, heads=32, kv_heads=8, dim=128) -> None:
    """Masked grouped-query attention (a chunk after cached keys, or a static cache's decode): Triton vs SDPA."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    dev = dict(device=DEVICE, dtype=dtype)
    q = torch.randn(1, heads, S, dim, generator=g, **dev)
    k = torch.randn(1, kv_heads, T, dim, generator=g, **dev)
    v = torch.randn(1, kv_heads, T, dim, generator=g, **dev)
    mask = (torch.arange(T, device=DEVICE)[None, :] <= torch.arange(S, device=DEVICE)[:, None] + (T - S))[None, None]
    scale = dim**-0.5
    group = heads // kv_heads
    variants = {
        "triton (mask)": lambda: flash_attention(q, k, v, scale=scale, mask=mask),
        "sdpa gqa (mask)": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True),
        "sdpa repeat (mask)": lambda: F.scaled_dot_product_attention(
            q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=mask, scale=scale),
    }
    if S == 1:
        variants["triton (no mask)"] = lambda: flash_attention(q, k, v, scale=scale)
        variants["sdpa gqa (no mask)"] = lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
    ref = variants["sdpa repeat (mask)"]().float()
    print(f"\nGQA {'decode ' if S == 1 else 'prefill'} H={heads}/{kv_heads} D={dim} S={S} T={T}")
    for name, fn in variants.items():
        err = rel_err(fn(), ref)
        eager, graphed = timings(fn, graph=S == 1)
        print(f"  {name:20s} {fmt(eager)}   {fmt(graphed)}   rel err {err:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=128)
    parser.add_argument("--decode", type=int, nargs="*", default=[1024, 4096, 16384])
    parser.add_argument("--prefill", type=int, nargs="*", default=[512, 2048])
    parser.add_argument("--gqa-decode", type=int, nargs="*", default=[4096], help="GQA decode lengths (none: skip)")
    parser.add_argument("--gqa-prefill", type=int, nargs=2, default=[512, 2560], metavar=("S", "T"),
                        help="GQA masked chunk: S queries after T - S cached keys")
    parser.add_argument("--no-gqa", action="store_true")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--sweep", action="store_true",
                        help="also time launch configs of the MLA kernel (T=4k decode, 2k prefill)")
    parser.add_argument("--device", default="cuda", help="cpu: check the variants in Triton's interpreter, no timing")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    print(f"{torch.cuda.get_device_name() if DEVICE == 'cuda' else DEVICE}, torch {torch.__version__}")
    dtype = getattr(torch, args.dtype)
    for T in args.decode:
        mla_case(args.heads, 1, T, dtype)
    for S in args.prefill:
        mla_case(args.heads, S, S, dtype)
    if not args.no_gqa:
        for T in args.gqa_decode:
            gqa_case(1, T, dtype)
        gqa_case(*args.gqa_prefill, dtype)
    if args.sweep:
        print("\n-- launch configs")
        mla_case(args.heads, 1, 4096, dtype, sweep=True)
        mla_case(args.heads, 2048, 2048, dtype, sweep=True)


if __name__ == "__main__":
    main()
