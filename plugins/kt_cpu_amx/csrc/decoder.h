// A whole pre-norm decoder layer (RMSNorm, grouped-query attention over a float32 KV cache, RMSNorm, gated
// MLP, two residual adds) for one decode step of one or B sequences, run as one job on the pool: a decode step of a
// small model on few cores otherwise spends more time in the Python of its ~10 module calls per layer than in
// the layer's kernels. The matrices are the same PackedMatrix objects the layer's KLinearCPU ops hold.
#pragma once
#include <memory>
#include <vector>

#include "common.h"
#include "engine.h"

namespace kt {

// Attention kinds: grouped-query (Llama, Qwen, ...) or DeepSeek's multi-head latent attention without q LoRA,
// absorbed: the cache holds the normalized latent (k_cache, [capacity, rank]) and the shared rotary key (v_cache,
// [capacity, rope_dim]); each head's query is taken to latent space through kv_b's key rows (float, the packed
// rows dequantized as they stream: axpy_rows) where their format allows, else by wkt[h] ([rank, nope], W_k[h]
// transposed and quantized at load), and its attention-weighted latent back by kv_b's value rows (v_dim per head;
// float as they stream too, else int8 activations).
enum class AttentionKind : int { Gqa = 0, Mla = 1 };

struct DecoderLayer {
    AttentionKind kind = AttentionKind::Gqa;
    // GQA: q, k, v, o. MLA: q (q_proj), k (kv_a_proj_with_mqa), v (kv_b_proj), o.
    // MLP: gate, up, down (for an MoE layer: its shared experts, or none).
    std::shared_ptr<PackedMatrix> q, k, v, o, gate, up, down;
    std::vector<float> bq, bk, bv, bo, bgate, bup, bdown;  // biases; empty: none
    // MLA
    std::vector<std::shared_ptr<PackedMatrix>> wkt;  // per head [rank, nope]; empty: kv_b's rows (axpy_rows_fits)
    std::vector<float> kv_norm;                        // RMSNorm of the latent [rank]
    float kv_eps = 1e-6f;
    int nope = 0, rope_dim = 0, v_dim = 0, rank = 0;
    // MoE (DeepSeek-V2 greedy routing): router [experts, hidden] float32, softmax, top_k, times routed_scale
    std::shared_ptr<MoeLayer> experts;
    std::vector<float> router;
    int top_k = 0;
    float routed_scale = 1.f;
    std::vector<float> attn_norm, mlp_norm;                 // RMSNorm weights [hidden]
    std::vector<float> q_norm, k_norm;                      // per-head RMSNorm weights [head_dim]; empty: none
    float eps = 1e-6f, qk_eps = 1e-6f, scaling = 1.f;
    int heads = 0, kv_heads = 0, head_dim = 0;
    Activation act = Activation::Silu;
    // The layer's cache, float32, set before stepping: GQA keys and values [kv_heads, capacity, head_dim]; MLA
    // latents [capacity, rank] and rotary keys [capacity, rope_dim]; slots of one sequence from 0, or of a block
    // pool that decoder_step_batch's block tables index.
    float* k_cache = nullptr;
    float* v_cache = nullptr;
    int capacity = 0;

    int hidden() const { return q->k; }
    int inter() const { return gate ? gate->n : 0; }
    // Empty when the shapes agree, else what is wrong.
    std::string check() const;
};

}  // namespace kt
