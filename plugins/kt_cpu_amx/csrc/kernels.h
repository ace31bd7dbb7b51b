// Entry points of the ISA-specific kernels. Each ISA lives in its own translation unit compiled with its
// own -m flags; only call one after checking the CPU (cpu_features.h).
#pragma once
#include "common.h"

namespace kt {

// Y[m, ldy] (columns n0..n1) = X[m, k] @ W[n0:n1, :].T, activations quantized to int8.
using GemmQ8Fn = void (*)(const PackedMatrix& W, int n0, int n1, const QAct& X, int m, float* Y, int ldy);
// Quantize rows r0..r1 of x[*, k] (row stride ldx) into buf (same row index).
using QuantActFn = void (*)(const float* x, int r0, int r1, int k, size_t ldx, const QActBuf& buf);
// One query's attention over T cached positions: out[d] = sum_t softmax_t(scale * q . K[t]) * V[t][d], K and V
// rows of d floats at a stride of ld floats; position t at row t, or when blocks is set (a paged cache) at row
// blocks[t / block] * block + t % block (the same floats either way); scores: T floats of scratch.
using AttendFn = void (*)(const float* q, const float* K, const float* V, const int32_t* blocks, int block, int T,
                          int d, size_t ld, float scale, float* scores, float* out);
// Multi-head latent attention of one head over T positions: scores from two parts (q . K[t] over d floats and
// qr . R[t] over dr floats; rows at strides ld and ldr), values the K rows themselves: out[d]. Position t at row t,
// or when blocks is set at row blocks[t / block] * block + t % block of both K and R, as AttendFn.
// out[0..k) += sum_i coef[i] * W[r0 + i] (rows dequantized in float): 8-bit rows in groups of 32 (axpy_rows_fits).
using AxpyRowsFn = void (*)(const PackedMatrix& W, int r0, int nrows, const float* coef, float* out);
// out[i] = W[r0 + i] . x (rows dequantized in float), i < nrows; the same formats.
using DotRowsFn = void (*)(const PackedMatrix& W, int r0, int nrows, const float* x, float* out);
inline bool axpy_rows_fits(const PackedMatrix& W) {
    return W.bits == 8 && W.group == 32 && !W.sub8_scales && !W.sub16_scales;
}
// g[j] = act(g[j]) * u[j] for j < n; act 0: SiLU, 1: GELU (tanh form) (engine.h's Activation), vectorized exp.
using ActMulFn = void (*)(int act, float* g, const float* u, int n);
// scores[0..T) -> softmax weights in place, as attend and attend_latent take them.
using SoftmaxFn = void (*)(float* scores, int T);
// Scores of heads h < nh (queries q + h * ldq and qr + h * ldqr) against positions t0..t1 of one sequence's latents
// and rotary keys (slots as attend_latent's), into scores[h * lds + t]: attend_latent's floats, several heads a row.
using LatentScoresFn = void (*)(const float* q, size_t ldq, const float* qr, size_t ldqr, int nh, const float* K, int d,
                                size_t ld, const float* R, int dr, size_t ldr, const int32_t* blocks, int block, int t0,
                                int t1, float scale, float* scores, size_t lds);
// Columns c0..c1 (multiples of 32) of out[h * ldo + c] = sum_t p[h * ldp + t] * K_t[c], t < T in order, for h < nh:
// attend_latent's floats.
using LatentWeightedFn = void (*)(const float* p, size_t ldp, int nh, const float* K, size_t ld, const int32_t* blocks,
                                  int block, int T, int c0, int c1, float* out, size_t ldo);
using AttendLatentFn = void (*)(const float* q, const float* K, int d, size_t ld, const float* qr, const float* R,
                                int dr, size_t ldr, const int32_t* blocks, int block, int T, float scale, float* scores,
                                float* out);

// The int8 prefill kernels (amx::gemm_i8, avx512::gemm_i8) take W when gemm_i8_fits (4-bit or 8-bit, groups of 16 or
// 32, or an i-quant, rows in blocks of 16).
inline bool gemm_i8_fits(const PackedMatrix& W) {
    return W.n % 16 == 0 && W.k % 32 == 0 && (W.bits == 4 || W.bits == 8 || W.iq) && (W.group == 16 || W.group == 32) &&
           W.k / W.group <= 2048;  // kernels_amx.cpp: kMaxGroups
}
// What kernels_impl.h defines, once per ISA namespace (kernels_avx2.cpp, kernels_avx512.cpp).
#define KT_ISA_KERNELS                                                                                                \
    void act_mul(int act, float* g, const float* u, int n);                                                           \
    void gemm_q8(const PackedMatrix& W, int n0, int n1, const QAct& X, int m, float* Y, int ldy);                      \
    void quantize_act(const float* x, int r0, int r1, int k, size_t ldx, const QActBuf& buf);                         \
    void attend(const float* q, const float* K, const float* V, const int32_t* blocks, int block, int T, int d,       \
                size_t ld, float scale, float* scores, float* out);                                                   \
    void attend_latent(const float* q, const float* K, int d, size_t ld, const float* qr, const float* R, int dr,     \
                       size_t ldr, const int32_t* blocks, int block, int T, float scale, float* scores, float* out);  \
    void softmax(float* scores, int T);                                                                               \
    void latent_scores(const float* q, size_t ldq, const float* qr, size_t ldqr, int nh, const float* K, int d,       \
                       size_t ld, const float* R, int dr, size_t ldr, const int32_t* blocks, int block, int t0,       \
                       int t1, float scale, float* scores, size_t lds);                                               \
    void latent_weighted(const float* p, size_t ldp, int nh, const float* K, size_t ld, const int32_t* blocks,         \
                         int block, int T, int c0, int c1, float* out, size_t ldo);                                   \
    void axpy_rows(const PackedMatrix& W, int r0, int nrows, const float* coef, float* out);                          \
    void dot_rows(const PackedMatrix& W, int r0, int nrows, const float* x, float* out);
namespace avx2 {
KT_ISA_KERNELS
}
namespace avx512 {
KT_ISA_KERNELS
// As amx::pack_i8_block, amx::gemm_i8_scratch_bytes and amx::gemm_i8, with vpdpbusd instead of tiles (kernels_i8.h).
void pack_i8_block(const QAct& X, int m, int tb, const IAct& out);
size_t gemm_i8_scratch_bytes(int k);
void gemm_i8(const PackedMatrix& W, int n0, int n1, const IAct& X, float* Y, int ldy, uint8_t* scratch);
}
namespace amx {
// Per thread, before the first tile instruction; false when the kernel refuses AMX state.
bool request_permission();
// Convert m rows (gathered through rows when set) of x[*, k] to VNNI bf16 for token block tb0..tb1 (of 16).
void to_bf16_vnni(const float* x, size_t ldx, const int32_t* rows, int m, int k, int tb0, int tb1, uint16_t* out);
// Y[m, ldy] (columns n0..n1, both multiples of 32) = X @ W[n0:n1].T in bf16 tiles. scratch: 32 * k bf16.
void gemm_bf16(const PackedMatrix& W, int n0, int n1, const BAct& X, float* Y, int ldy, uint16_t* scratch);
// Token block tb of X's rows 0..m (rows gathered through X.rows) into X8's layout (IAct).
void pack_i8_block(const QAct& X, int m, int tb, const IAct& out);
// Bytes of scratch gemm_i8 needs per thread for k inputs.
size_t gemm_i8_scratch_bytes(int k);
// Y[m, ldy] (columns n0..n1, multiples of 16) = X @ W[n0:n1].T: int8 tiles (weights u8, activations s8), one tile
// product per weight group, scaled in float by the group's scale times the activation block's scale, plus the
// group's min times the block sum.
void gemm_i8(const PackedMatrix& W, int n0, int n1, const IAct& X, float* Y, int ldy, uint8_t* scratch);
}

}  // namespace kt
