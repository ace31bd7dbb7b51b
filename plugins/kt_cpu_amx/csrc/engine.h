// The runtime (pool, chosen ISA, workspaces) and the two operations: quantized linear and fused MoE experts.
#pragma once
#include <algorithm>
#include <cmath>
#include <functional>
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

inline float silu(float v) { return v / (1.f + std::exp(-v)); }
inline float gelu_tanh(float v) {
    return 0.5f * v * (1.f + std::tanh(0.7978845608028654f * (v + 0.044715f * v * v * v)));
}
inline float activate(Activation act, float v) { return act == Activation::Silu ? silu(v) : gelu_tanh(v); }

inline int round_up(int v, int m) { return (v + m - 1) / m * m; }
// Row chunks of a matrix with n rows: multiples of 32 (the AMX block), about 4 per thread or smaller.
inline int chunk_rows(int n, int threads) {
    int c = round_up(std::max(1, n / (4 * threads)), 32);
    return std::max(32, std::min(c, 256));
}

struct DecoderLayer;  // decoder.h

// Where a blocking call's time goes, summed on the calling thread (Runtime::profile): dense linears (GEMMs and
// activation quantization), routed experts, attention (rotary, cache writes, scores), small ops (norms, residual
// adds, routing); the pool's barrier waits are counted apart (Pool::wait_ns) and left out of these.
enum class Phase : int { Dense = 0, Experts = 1, Attention = 2, Small = 3 };
constexpr int kPhases = 4;

struct MoeLayer {
    std::vector<std::shared_ptr<PackedMatrix>> gate, up, down;  // per expert: [I, H], [I, H], [H, I]
    Activation act = Activation::Silu;
    int experts() const { return int(gate.size()); }
    int hidden() const { return gate[0]->k; }
    int inter() const { return gate[0]->n; }
};

// Runtime::moe's extra tasks: fn(task, thread) for task < tasks.
struct MoeExtra {
    int tasks = 0;
    const std::function<void(int, int)>* fn = nullptr;
};

class Runtime {
public:
    Runtime(int nthreads, const std::string& isa, bool pin);
    std::string isa_name() const;
    int threads() const { return pool_.size(); }
    // Fewest rows (tokens) for which the AMX path is used instead of the integer-dot path.
    int amx_min_rows = 16;
    // The same for one expert's rows inside moe() (AMX-INT8 tiles of 16 tokens): 4, measured on a DeepSeek-V2-Lite-
    // shaped Q4_K layer at 1 thread (CPU time): 16- and 128-token calls as fast as with 8 or 12 (128: 115 ms, 154
    // with 12), a 1-token call 6.3 ms against 10.5 with 1 (decode keeps the integer-dot kernels).
    int amx_min_expert_rows = 4;
    // Calls of at most decode_rows rows (tokens) leave the workers spinning decode_spin_us (KT_CPU_DECODE_SPIN_US,
    // default 1000) for the next call, the gap of a decode step's Python code; larger ones the pool's spin_us.
    int decode_rows = 8;
    int decode_spin_us = 1000;
    // linear() on the integer-dot path (no AMX) for prefill-sized calls (more than decode_rows rows), and for any
    // call that says exact (the output head: its logits pick each token), also quantizes the activations' int8
    // rounding residual and adds its product, in the same GEMM call (the weights read once): about 16-bit
    // activations (AMX computes prefill in bf16) for twice the integer work. int8 alone (llama.cpp's Q8
    // activations) adds noise of about 1 % per product, which turns near ties (the README's first token).
    // Decode-sized calls (linear_multi, the fused decoder) and the experts stay int8.
    bool act_residual = true;

    void linear(const PackedMatrix& W, int M, const float* x, float* y, bool exact = false);
    // y[i] = x @ W[i].T for matrices with the same input size: the input quantized once and the row chunks
    // of all of them in one parallel phase (a decode step's q/k/v or gate/up: one dispatch instead of 3/2).
    void linear_multi(const std::vector<const PackedMatrix*>& W, int M, const float* x, const std::vector<float*>& y);
    // extra: tasks of other work that is ready and independent of the experts, run in the parallel phase of their
    // down projection (the fused decoder's shared experts' down: one barrier fewer per layer).
    void moe(const MoeLayer& L, int T, int K, const float* x, const int64_t* idx, const float* w, float* out,
             MoeExtra extra = MoeExtra());
    // One decode step of one sequence through the layers (decoder.cpp): x[hidden] is the residual stream, updated
    // in place; cos/sin [head_dim] the rotary tables at position pos, where each layer writes its keys and values.
    void decoder_step(const std::vector<const DecoderLayer*>& layers, float* x, const float* cos, const float* sin,
                      int pos);
    // The same for B sequences together (B = 1 is decoder_step): x[B, hidden], cos/sin [B, head_dim], positions[B];
    // the linears as B-row GEMMs (weights read once per step), attention per sequence. blocks: null (one sequence
    // at slots 0.. of the layers' cache pointers) or a block table [B, width] of pool blocks of `block` slots:
    // row b's position p at slot blocks[b][p / block] * block + p % block (latent attention's latents and rotary
    // keys too; its rotary tables cos = sin: rope_dim floats per row, (cos, sin) pairs).
    void decoder_step_batch(const std::vector<const DecoderLayer*>& layers, int B, float* x, const float* cos,
                            const float* sin, const int32_t* positions, const int32_t* blocks, int width, int block);
    // Int8-activation GEMMs of decode-sized calls (linear() of at most decode_rows tokens, its exact path's 2M rows
    // included, and the fused decoder's linears) of at least this many rows run on the int8 tile kernel (AMX-INT8, or AVX512-VNNI over the
    // same token blocks) where the matrix fits it (gemm_i8_fits): the weights unpacked once per 16 rows instead of
    // read per 4. Fewer rows run on the integer-dot kernels. Both take the same int8 activations and differ only
    // in float summation order.
    int i8_min_rows = 4;
    // The fused decoder's latent attention over at least this many positions runs split by positions and by latent
    // columns, several heads at once in each task (each latent read once per phase, independent multiply-add
    // chains), instead of one task per head, which saves two barriers per layer: the same floats either way. On
    // 2 threads the split path measured ahead from 64 positions (1.6x decode at 4,000 on a 4-layer DeepSeek-V2-Lite
    // shape); where it starts to pay on many threads was not measured.
    int latent_split_from = 256;

    Pool& pool() { return pool_; }

    // Seconds per Phase, then the barrier waits, since construction or reset_profile().
    std::vector<double> profile() const;
    void reset_profile();
    // Adds the time from its construction to its destruction, less the barrier waits meanwhile and the time of
    // Timed scopes nested in it, to a Phase (on the thread making the blocking call).
    class Timed {
    public:
        Timed(Runtime* rt, Phase p);
        ~Timed();
    private:
        Runtime* rt_;
        int parent_;
    };

private:
    void linger_after(int rows) { pool_.set_linger(rows <= decode_rows ? decode_spin_us : -1); }
    bool use_amx(const PackedMatrix& W, int rows, int min_rows) const;
    // x's M rows of K floats quantized into act_ (int8 per group) by the pool: the view the GEMMs read.
    QAct quantize_rows(const float* x, int M, int K);
    bool int8_tiles(const PackedMatrix& W, int rows) const;
    // rows of a into buf as the tile kernel's token blocks, by the pool
    IAct pack_i8(const QAct& a, int rows, QActBuf& buf);
    // 2M rows: x_i and its int8 rounding residual, interleaved (act_residual); fold_pairs sums their products.
    QAct quantize_with_residual(const float* x, int M, int K);
    static void fold_pairs(const float* y2, int M, int N, int n0, int n1, float* y, int ldy);
    uint16_t* amx_scratch(int thread, int k);
    // rows of x[rows, k] into buf (ensured), by the pool unless they are few
    void quantize_each(const float* x, int rows, int k, const QActBuf& buf);

    Pool pool_;
    Isa isa_;
    GemmQ8Fn gemm_;
    QuantActFn quant_;
    QActBuf act_, act2_;
    QActBuf bi_x_, bi_h_;  // moe(): the AMX experts' int8 token blocks (IAct) of its input and intermediate
    Scratch bf_x_, gbuf_, ubuf_, ybuf_;
    Scratch res_x_, res_y_;  // act_residual's rows and products
    uint64_t prof_ns_[kPhases] = {};
    uint64_t wait0_ = 0;  // pool wait_ns at the last reset
    int open_phase_ = -1;                  // the innermost Timed scope's phase
    uint64_t open_t0_ = 0, open_w0_ = 0;   // since when it counts: clock and pool wait_ns
    void charge_open();
    Scratch dec_;  // decoder_step's vectors
    QActBuf dec_act_, dec_i8_, lin_i8_;
    // decoder_step_batch's grouped-query attention (decoder.cpp)
    void gqa_attention(const DecoderLayer& L, int B, float* q, float* k, float* v, const float* cos, const float* sin,
                       const int32_t* pos, const int32_t* blocks, int width, int block, float* scores,
                       size_t ld_scores, float* att);
    // decoder_step_batch's latent attention split by positions and columns (latent_split_from): row b, head h's
    // latent query at lat + b * ldb + h * ldh, its weighted latent to ctx at the same offset; scores [B, heads, T]
    void latent_attention(const DecoderLayer& L, int B, const float* q, const float* lat, size_t ldb, size_t ldh,
                          const int32_t* positions, const int32_t* blocks, int width, int block, float* scores,
                          size_t T, float* ctx);
    AttendFn attend_;
    ActMulFn act_mul_;
    // moe()'s int8 prefill kernel for experts with enough rows (AMX tiles or AVX512-VNNI; none on AVX2)
    decltype(&amx::gemm_i8) i8_gemm_ = nullptr;
    decltype(&amx::pack_i8_block) i8_pack_ = nullptr;
    decltype(&amx::gemm_i8_scratch_bytes) i8_scratch_bytes_ = nullptr;
    AttendLatentFn attend_latent_;
    SoftmaxFn softmax_;
    LatentScoresFn latent_scores_;
    LatentWeightedFn latent_weighted_;
    AxpyRowsFn axpy_rows_;
    DotRowsFn dot_rows_;
    std::vector<Scratch> amx_scratch_;
};

}  // namespace kt
