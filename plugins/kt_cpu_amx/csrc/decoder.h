// A whole pre-norm decoder layer (RMSNorm, grouped-query attention over a float32 KV cache, RMSNorm, gated
// MLP, two residual adds) for one decode step of one sequence, run as one job on the pool: a decode step of a
// small model on few cores otherwise spends more time in the Python of its ~10 module calls per layer than in
// the layer's kernels. The matrices are the same PackedMatrix objects the layer's KLinearCPU ops hold.
#pragma once
#include <memory>
#include <vector>

#include "common.h"
#include "engine.h"

namespace kt {

struct DecoderLayer {
    std::shared_ptr<PackedMatrix> q, k, v, o, gate, up, down;
    std::vector<float> bq, bk, bv, bo, bgate, bup, bdown;  // biases; empty: none
    std::vector<float> attn_norm, mlp_norm;                 // RMSNorm weights [hidden]
    std::vector<float> q_norm, k_norm;                      // per-head RMSNorm weights [head_dim]; empty: none
    float eps = 1e-6f, qk_eps = 1e-6f, scaling = 1.f;
    int heads = 0, kv_heads = 0, head_dim = 0;
    Activation act = Activation::Silu;
    // The layer's cache: keys and values [kv_heads, capacity, head_dim] float32 (batch 1), set before stepping.
    float* k_cache = nullptr;
    float* v_cache = nullptr;
    int capacity = 0;

    int hidden() const { return q->k; }
    int inter() const { return gate->n; }
    // Empty when the shapes agree, else what is wrong.
    std::string check() const;
};

}  // namespace kt
