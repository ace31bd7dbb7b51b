// The runtime (pool, chosen ISA, workspaces) and the two operations: quantized linear and fused MoE experts.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "common.h"
#include "kernels.h"
#include "pool.h"

namespace kt {

// A grow-only Buffer.
struct Scratch {
    Buffer buf;
    template <class T> T* get(size_t count) {
        if (buf.bytes < count * sizeof(T)) buf = Buffer(count * sizeof(T));
        return buf.as<T>();
    }
};

enum class Activation : int { Silu = 0, GeluTanh = 1 };

struct MoeLayer {
    std::vector<std::shared_ptr<PackedMatrix>> gate, up, down;  // per expert: [I, H], [I, H], [H, I]
    Activation act = Activation::Silu;
    int experts() const { return int(gate.size()); }
    int hidden() const { return gate[0]->k; }
    int inter() const { return gate[0]->n; }
};

class Runtime {
public:
    Runtime(int nthreads, const std::string& isa, bool pin);
    std::string isa_name() const;
    int threads() const { return pool_.size(); }
    // Fewest rows (tokens) for which the AMX path is used instead of the integer-dot path.
    int amx_min_rows = 16;
    // Calls of at most decode_rows rows (tokens) leave the workers spinning decode_spin_us (KT_CPU_DECODE_SPIN_US,
    // default 1000) for the next call, the gap of a decode step's Python code; larger ones the pool's spin_us.
    int decode_rows = 8;
    int decode_spin_us = 1000;

    void linear(const PackedMatrix& W, int M, const float* x, float* y);
    // y[i] = x @ W[i].T for matrices with the same input size: the input quantized once and the row chunks
    // of all of them in one parallel phase (a decode step's q/k/v or gate/up: one dispatch instead of 3/2).
    void linear_multi(const std::vector<const PackedMatrix*>& W, int M, const float* x, const std::vector<float*>& y);
    void moe(const MoeLayer& L, int T, int K, const float* x, const int64_t* idx, const float* w, float* out);

    Pool& pool() { return pool_; }

private:
    void linger_after(int rows) { pool_.set_linger(rows <= decode_rows ? decode_spin_us : -1); }
    bool use_amx(const PackedMatrix& W, int rows) const;
    // x's M rows of K floats quantized into act_ (int8 per group) by the pool: the view the GEMMs read.
    QAct quantize_rows(const float* x, int M, int K);
    uint16_t* amx_scratch(int thread, int k);

    Pool pool_;
    Isa isa_;
    GemmQ8Fn gemm_;
    QuantActFn quant_;
    QActBuf act_, act2_;
    Scratch bf_x_, bf_h_, gbuf_, ubuf_, ybuf_;
    std::vector<Scratch> amx_scratch_;
};

}  // namespace kt
