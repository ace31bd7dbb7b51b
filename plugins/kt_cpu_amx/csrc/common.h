// Shared types of the kt_cpu_amx kernels. Compiled into every translation unit, so it must not use any
// ISA beyond the x86-64 baseline.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

// Small accessors used by the ISA translation units are forced inline: an out-of-line copy compiled with
// AVX512 flags could otherwise be the one the linker keeps for every caller.
#define KT_INLINE inline __attribute__((always_inline))

namespace kt {

enum class Isa : int { Avx2 = 1, Avx512 = 2, Amx = 3 };

struct Slab;  // pack.cpp: weight buffers below 4 MiB share 2 MiB pages

// Ask for n bytes from p to be brought into the caches, line by line (prefetch hints: they never fault, so a span
// past the end of a buffer is harmless).
KT_INLINE void prefetch_bytes(const void* p, size_t n) {
    for (size_t j = 0; j < n; j += 64) __builtin_prefetch(static_cast<const char*>(p) + j);
}

// Owned, 64-byte aligned memory; weights (weights = true) on 2 MiB pages where the kernel allows, interleaved over
// NUMA nodes when built with libnuma and the machine has more than one node.
struct Buffer {
    void* ptr = nullptr;
    size_t bytes = 0;
    bool numa = false;
    Slab* slab = nullptr;
    Buffer() = default;
    explicit Buffer(size_t n, bool weights = false);
    ~Buffer();
    Buffer(const Buffer&) = delete;
    Buffer& operator=(const Buffer&) = delete;
    Buffer(Buffer&& o) noexcept { *this = std::move(o); }
    Buffer& operator=(Buffer&& o) noexcept;
    template <class T> KT_INLINE T* as() const { return static_cast<T*>(ptr); }
};

// A weight matrix [n, k] (n output features, k inputs) in the kernels' layout: rows of groups along k, each
// weight w = scale[g] * q + min[g] with an unsigned integer q.
//   bits 4: groups of 32; 16 bytes per group, byte j holds element j (low nibble) and j + 16 (high nibble).
//   bits 8: groups of 16, or 32 where GGUF has one scale and min per 32 (Q5_0, Q5_1, Q8_0); one byte per element.
// scales and mins are [n, k / group], float, or fp16 (half_scales) when every one of them is exactly an fp16
// (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 always are): fewer bytes to stream in decode, same values.
// zero_point > 0: no mins are stored, every min is -zero_point * scale (Q4_0: 8, Q5_0: 16, Q6_K: 32, Q8_0 and
// 8-bit online quantization: 128); the kernels take the min term as -zero_point * sum_g(scale[g] * asum[g]).
// K-quants keep their own two levels instead, integer sub-scales times one float per super-block, exact in float:
//   sub8_scales (Q4_K): uint8 sub-scales and sub-mins [n, k / group] times one float per 8 groups (sup_scales,
//     sup_mins [n, k / group / 8]): scale = sup_s * sc, min = sup_m * m; 4.75 bits per weight, not 6.
//   sub16_scales (Q5_K, Q6_K): int8 sub-scales (and sub-mins) [n, k / group] times one float per 16 groups
//     (sup_scales (, sup_mins) [n, k / group / 16]): Q6_K (zero point 32) 1.078 bytes per weight, Q5_K 1.156,
//     not 1.5.
// iq > 0 (an IqType, iq.h): the i-quants' (MXFP4's, IQ4_NL's, TQ2_0's) GGUF blocks as they are, iq_block_bytes per
//   iq_block weights, in qs alone (bits 0, no scales or mins): the kernels decode a row's blocks into int8 values v and a float
//   scale per 16 (kernels_iq.h; the int8 prefill kernels as groups of 16 of q = v + 128, zero point 128).
struct PackedMatrix {
    int n = 0, k = 0, bits = 0, group = 0, zero_point = 0, iq = 0, iq_block = 0, iq_block_bytes = 0;
    bool half_scales = false, sub8_scales = false, sub16_scales = false;
    Buffer qs, scales, mins, sup_scales, sup_mins;
    KT_INLINE size_t row_bytes() const {
        return iq ? size_t(k / iq_block) * iq_block_bytes : bits == 4 ? size_t(k) / 2 : size_t(k);
    }
    KT_INLINE int groups() const { return k / group; }
    KT_INLINE int sup_groups() const { return sub16_scales ? 16 : 8; }  // groups per sup_scales float
    KT_INLINE const uint8_t* row_q(int r) const { return qs.as<uint8_t>() + size_t(r) * row_bytes(); }
    template <class S> KT_INLINE const S* row_s(int r) const { return scales.as<S>() + size_t(r) * groups(); }
    template <class S> KT_INLINE const S* row_m(int r) const { return mins.as<S>() + size_t(r) * groups(); }
    KT_INLINE const float* row_sup_s(int r) const {
        return sup_scales.as<float>() + size_t(r) * (groups() / sup_groups());
    }
    KT_INLINE const float* row_sup_m(int r) const {
        return sup_mins.as<float>() + size_t(r) * (groups() / sup_groups());
    }
    float scale_at(int r, int g) const;  // slow accessors (packing, tests)
    float min_at(int r, int g) const;
    size_t nbytes() const { return qs.bytes + scales.bytes + mins.bytes + sup_scales.bytes + sup_mins.bytes; }
};

// Activations quantized to int8 in blocks of 32 along k (like llama.cpp's Q8 activations):
// x ~= d[b] * q, plus the block sums (already times d) per 16 and per 32 for the weights' min term.
// Row r of the logical matrix is physical row rows[r] when rows is set (tokens gathered by expert).
struct QAct {
    int k = 0;
    const int8_t* q = nullptr;
    const float* d = nullptr;    // [rows, k / 32]
    const float* s16 = nullptr;  // [rows, k / 16]
    const float* s32 = nullptr;  // [rows, k / 32]
    const int32_t* rows = nullptr;
    KT_INLINE int phys(int r) const { return rows ? rows[r] : r; }
};

// X's logical rows from r0 on.
KT_INLINE QAct rows_from(QAct X, int r0) {
    if (X.rows) {
        X.rows += r0;
        return X;
    }
    X.q += size_t(r0) * X.k;
    X.d += size_t(r0) * (X.k / 32);
    X.s16 += size_t(r0) * (X.k / 16);
    X.s32 += size_t(r0) * (X.k / 32);
    return X;
}

// Storage for QAct of m rows.
struct QActBuf {
    Buffer q, d, s16, s32;
    int k = 0, m = 0;
    void ensure(int m_, int k_);
    QAct view(const int32_t* rows = nullptr) const;
};

// Activations in bf16 for the AMX path, in VNNI blocks of 16 tokens: v[(tb * k/2 + kk) * 32 + t * 2 + j] =
// x[tb * 16 + t][2 * kk + j]; m_pad is a multiple of 32, padded with zeros.
struct BAct {
    int k = 0, m = 0, m_pad = 0;
    const uint16_t* v = nullptr;
};

// int8 activations for the AMX-INT8 path, in blocks of 16 tokens: q in VNNI order, q[(tb * k/4 + kk) * 64 + t * 4
// + j] = the QAct value of token tb * 16 + t at element 4 * kk + j; d, s16, s32 (QAct's, per block of 32 / 16 / 32)
// transposed per token block, d[(tb * k/32 + b) * 16 + t]. Padding tokens are zero everywhere.
struct IAct {
    int k = 0, m = 0;
    int8_t* q = nullptr;
    float *d = nullptr, *s16 = nullptr, *s32 = nullptr;
    // The view of token blocks tb0.. (the storage of one expert's rows inside a shared buffer).
    IAct blocks_from(int tb0, int m_) const {
        IAct o = *this;
        o.m = m_;
        o.q += size_t(tb0) * 16 * k;
        o.d += size_t(tb0) * 16 * (k / 32);
        o.s16 += size_t(tb0) * 16 * (k / 16);
        o.s32 += size_t(tb0) * 16 * (k / 32);
        return o;
    }
};

// Group g's scale (or min) under two-level K-quant scales (PackedMatrix::sub8_scales, sub16_scales): the
// integer sub-scale times the float of its `per` groups. Packing, the slow accessors and every kernel use this
// one float product (the kernels' vectorized forms compute the same product lane by lane).
template <class Q> KT_INLINE float two_level_scale(const Q* sub, const float* sup, int per, int g) {
    return sup[g / per] * float(sub[g]);
}

// The cache slot of position t of a sequence: t itself in a contiguous cache (table null), else through its block
// table of `block`-slot blocks.
KT_INLINE size_t table_slot(const int32_t* table, int block, int t) {
    return table ? size_t(table[t / block]) * block + size_t(t % block) : size_t(t);
}

uint32_t fp16_to_fp32_bits(uint16_t h);
float fp16_to_fp32(uint16_t h);
// h = f exactly, or false when f is no fp16.
bool fp32_to_fp16_exact(float f, uint16_t& h);

}  // namespace kt
