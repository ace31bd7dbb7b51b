// One block (an i-quant's super-block of 256 weights; MXFP4's or IQ4_NL's 32; TQ2_0's 256) into int8 values
// q[block] and float scales s[block / 16] (one per 16 weights): weight j = s[j / 16] * q[j]. Each s is the float gguf-py computes for the sub-block (same operations, same
// order), and q the lattice point times its sign, so the product is gguf-py's weight bit for bit: a sign flips
// exactly; IQ1's point + delta (delta = +-1/8) is (8 * point +- 1) / 8 with the 1/8 moved into s, which is
// exact (a power of two), so s * q rounds the same real number once, as gguf-py's dl * (point + delta) does.
// MXFP4: q the doubled e2m1 value (ggml's kvalues_mxfp4, integers up to 12) and s ggml_e8m0_to_fp32_half(e) =
// 2^(e - 128) (e < 2: the subnormals 2^-128, 2^-127), gguf-py's very d and table: d * q is its product.
// Static functions, SSE2 (the x86-64 baseline; pshufb where the unit is built with SSSE3): every translation unit that includes this compiles its own
// copy with its own -m flags. Block layouts: ggml-common.h's block_iq*.
#pragma once
#include <emmintrin.h>
#ifdef __SSSE3__
#include <tmmintrin.h>
#endif
#ifdef __F16C__
#include <immintrin.h>
#endif

#include <cstring>

#include "iq.h"

namespace kt {
namespace iqdec {

static inline float half_at(const uint8_t* p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
#ifdef __F16C__
    return _cvtsh_ss(h);  // exact, as the portable conversion (a call per block: IQ4_NL's are 32 weights)
#else
    return fp16_to_fp32(h);
#endif
}
template <class U> static inline U word_at(const uint8_t* p) {
    U v;
    std::memcpy(&v, p, sizeof(U));
    return v;
}
// 8 int8 lattice values with the bytes of mask (0xFF: negative) negated: (v ^ m) - m per byte.
static inline void put_signed(int8_t* out, uint64_t v, uint64_t mask) {
    const __m128i x = _mm_cvtsi64_si128(int64_t(v)), m = _mm_cvtsi64_si128(int64_t(mask));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm_sub_epi8(_mm_xor_si128(x, m), m));
}
// 8 IQ1 values, 8 * point +- 1: the table's entry for the index and the delta's sign (minus: bit 11).
static inline void put_iq1(int8_t* out, int idx_and_sign) {
    std::memcpy(out, &iq_tables.g1s[idx_and_sign], 8);
}

// block_iq2_xxs: d, then per 32 weights two uint32: 4 lattice indices | 4 x 7 sign bits + a 4-bit scale
static inline void iq2_xxs(const uint8_t* b, int8_t* q, float* s) {
    const IqTables& T = iq_tables;
    const float d = half_at(b);
    for (int ib = 0; ib < 8; ++ib) {
        const uint8_t* p = b + 2 + 8 * ib;
        const uint32_t a = word_at<uint32_t>(p + 4);
        s[2 * ib] = s[2 * ib + 1] = d * (0.5f + float(a >> 28)) * 0.25f;
        for (int l = 0; l < 4; ++l) put_signed(q + 32 * ib + 8 * l, T.g2xxs[p[l]], T.ksign_mask[(a >> (7 * l)) & 127]);
    }
}

// block_iq2_xs: d, qs[32] uint16 (9-bit lattice index | 7-bit sign index), scales[8] (a nibble per 16 weights)
static inline void iq2_xs(const uint8_t* b, int8_t* q, float* s) {
    const IqTables& T = iq_tables;
    const float d = half_at(b);
    for (int ib = 0; ib < 8; ++ib) {
        const uint8_t sc = b[66 + ib];
        s[2 * ib] = d * (0.5f + float(sc & 15)) * 0.25f;
        s[2 * ib + 1] = d * (0.5f + float(sc >> 4)) * 0.25f;
        for (int l = 0; l < 4; ++l) {
            const uint16_t w = word_at<uint16_t>(b + 2 + 2 * (4 * ib + l));
            put_signed(q + 32 * ib + 8 * l, T.g2xs[w & 511], T.ksign_mask[w >> 9]);
        }
    }
}

// block_iq2_s: d, qs[32] (index low bytes), signs[32], qh[8] (2 high index bits each), scales[8]
static inline void iq2_s(const uint8_t* b, int8_t* q, float* s) {
    const IqTables& T = iq_tables;
    const float d = half_at(b);
    for (int ib = 0; ib < 8; ++ib) {
        const uint8_t sc = b[74 + ib], qh = b[66 + ib];
        s[2 * ib] = d * (0.5f + float(sc & 15)) * 0.25f;
        s[2 * ib + 1] = d * (0.5f + float(sc >> 4)) * 0.25f;
        for (int l = 0; l < 4; ++l) {
            const int idx = b[2 + 4 * ib + l] | (((qh >> (2 * l)) & 3) << 8);
            put_signed(q + 32 * ib + 8 * l, T.g2s[idx], T.sign_mask[b[34 + 4 * ib + l]]);
        }
    }
}

// block_iq3_xxs: d, qs[64] (lattice indices, 4 weights each), then per 32 weights a uint32 (4 x 7 sign bits +
// a 4-bit scale)
static inline void iq3_xxs(const uint8_t* b, int8_t* q, float* s) {
    const IqTables& T = iq_tables;
    const float d = half_at(b);
    for (int ib = 0; ib < 8; ++ib) {
        const uint32_t a = word_at<uint32_t>(b + 66 + 4 * ib);
        s[2 * ib] = s[2 * ib + 1] = d * (0.5f + float(a >> 28)) * 0.5f;
        const uint8_t* qs = b + 2 + 8 * ib;
        for (int l = 0; l < 4; ++l) {
            const uint64_t v = T.g3xxs[qs[2 * l]] | uint64_t(T.g3xxs[qs[2 * l + 1]]) << 32;
            put_signed(q + 32 * ib + 8 * l, v, T.ksign_mask[(a >> (7 * l)) & 127]);
        }
    }
}

// block_iq3_s: d, qs[64] (index low bytes), qh[8] (9th index bits), signs[32], scales[4] (a nibble per 32)
static inline void iq3_s(const uint8_t* b, int8_t* q, float* s) {
    const IqTables& T = iq_tables;
    const float d = half_at(b);
    for (int ib = 0; ib < 8; ++ib) {
        const int nib = (b[106 + ib / 2] >> (4 * (ib & 1))) & 15;
        s[2 * ib] = s[2 * ib + 1] = d * float(1 + 2 * nib);
        const uint8_t* qs = b + 2 + 8 * ib;
        const int qh = b[66 + ib];
        for (int l = 0; l < 4; ++l) {
            const int i0 = qs[2 * l] | (((qh >> (2 * l)) & 1) << 8), i1 = qs[2 * l + 1] | (((qh >> (2 * l + 1)) & 1) << 8);
            const uint64_t v = T.g3s[i0] | uint64_t(T.g3s[i1]) << 32;
            put_signed(q + 32 * ib + 8 * l, v, T.sign_mask[b[74 + 4 * ib + l]]);
        }
    }
}

// block_iq1_s: d, qs[32] (index low bytes), qh[8] uint16 (4 x 3 high index bits, 3-bit scale, delta sign)
static inline void iq1_s(const uint8_t* b, int8_t* q, float* s) {
    const float d = half_at(b);
    for (int ib = 0; ib < 8; ++ib) {
        const uint16_t h = word_at<uint16_t>(b + 34 + 2 * ib);
        s[2 * ib] = s[2 * ib + 1] = d * float(2 * ((h >> 12) & 7) + 1) * 0.125f;
        const int minus = (h & 0x8000) >> 4;  // bit 11
        for (int l = 0; l < 4; ++l) put_iq1(q + 32 * ib + 8 * l, b[2 + 4 * ib + l] | (((h >> (3 * l)) & 7) << 8) | minus);
    }
}

// block_iq1_m: qs[32], qh[16] (a nibble per 8 weights: 3 high index bits + delta sign), scales[4] uint16 (4 x 3-bit
// scales each, one per 16 weights; their top nibbles hold the block's fp16 scale)
static inline void iq1_m(const uint8_t* b, int8_t* q, float* s) {
    uint16_t sw[4];
    for (int i = 0; i < 4; ++i) sw[i] = word_at<uint16_t>(b + 48 + 2 * i);
    const uint16_t dbits = uint16_t((sw[0] >> 12) | ((sw[1] >> 8) & 0xF0) | ((sw[2] >> 4) & 0xF00) | (sw[3] & 0xF000));
    const float d = fp16_to_fp32(dbits);
    for (int w = 0; w < 4; ++w)
        for (int f = 0; f < 4; ++f) s[4 * w + f] = d * float(2 * ((sw[w] >> (3 * f)) & 7) + 1) * 0.125f;
    for (int j = 0; j < 16; ++j) {  // a qh byte per 16 weights: its nibbles' bit 3, the delta's sign, land on bit 11
        const int h = b[32 + j];
        put_iq1(q + 16 * j, b[2 * j] | ((h & 15) << 8));
        put_iq1(q + 16 * j + 8, b[2 * j + 1] | ((h >> 4) << 8));
    }
}

// 16 bytes of nibble indices into 32 values of a 16-entry table: the low nibbles first, then the high ones (the
// layout of block_iq4_nl, block_iq4_xs's 32-weight groups and block_mxfp4).
static inline void nibbles_lut(const uint8_t* qs, const int8_t* lut16, int8_t* q) {
#ifdef __SSSE3__
    const __m128i lut = _mm_loadu_si128(reinterpret_cast<const __m128i*>(lut16)), m4 = _mm_set1_epi8(15);
    const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm_shuffle_epi8(lut, _mm_and_si128(x, m4)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(x, 4), m4)));
#else
    for (int j = 0; j < 16; ++j) {
        q[j] = lut16[qs[j] & 15];
        q[16 + j] = lut16[qs[j] >> 4];
    }
#endif
}

// block_iq4_xs: d, scales_h uint16 (2 high bits per 32), scales_l[4] (low nibbles), qs[128] (IQ4_NL indices:
// 16 bytes per 32 weights, low nibbles first)
static inline void iq4_xs(const uint8_t* b, int8_t* q, float* s) {
    const float d = half_at(b);
    const uint16_t sh = word_at<uint16_t>(b + 2);
    for (int ib = 0; ib < 8; ++ib) {
        const int ls = ((b[4 + ib / 2] >> (4 * (ib & 1))) & 15) | (((sh >> (2 * ib)) & 3) << 4);
        s[2 * ib] = s[2 * ib + 1] = d * float(ls - 32);
        nibbles_lut(b + 8 + 16 * ib, iq_tables.k4nl, q + 32 * ib);
    }
}

// block_iq4_nl (32 weights): d, qs[16]
static inline void iq4_nl(const uint8_t* b, int8_t* q, float* s) {
    s[0] = s[1] = half_at(b);
    nibbles_lut(b + 2, iq_tables.k4nl, q);
}

// block_mxfp4 (32 weights): e (e8m0), qs[16] (e2m1 indices)
static inline void mxfp4(const uint8_t* b, int8_t* q, float* s) {
    const uint32_t e = b[0];
    const uint32_t bits = e < 2 ? uint32_t(0x00200000) << e : (e - 1) << 23;  // ggml_e8m0_to_fp32_half
    std::memcpy(&s[0], &bits, 4);
    s[1] = s[0];
    nibbles_lut(b + 1, iq_tables.kmxfp4, q);
}

// block_tq2_0: qs[64] (2-bit codes c, weight c - 1: byte j of half h holds weights 128 h + 32 l + j in bits 2l),
// then d
static inline void tq2_0(const uint8_t* b, int8_t* q, float* s) {
    const float d = half_at(b + 64);
    for (int g = 0; g < 16; ++g) s[g] = d;
    const __m128i m3 = _mm_set1_epi8(3), one = _mm_set1_epi8(1);
    for (int h = 0; h < 2; ++h)
        for (int half = 0; half < 2; ++half) {
            __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 32 * h + 16 * half));
            for (int l = 0; l < 4; ++l, x = _mm_srli_epi16(x, 2))  // a byte's bits 2l..2l+1 stay within it
                _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 128 * h + 32 * l + 16 * half),
                                 _mm_sub_epi8(_mm_and_si128(x, m3), one));
        }
}

static inline void decode(int type, const uint8_t* b, int8_t* q, float* s) {
    switch (type) {
        case IQ1_S: return iq1_s(b, q, s);
        case IQ1_M: return iq1_m(b, q, s);
        case IQ2_XXS: return iq2_xxs(b, q, s);
        case IQ2_XS: return iq2_xs(b, q, s);
        case IQ2_S: return iq2_s(b, q, s);
        case IQ3_XXS: return iq3_xxs(b, q, s);
        case IQ3_S: return iq3_s(b, q, s);
        case IQ4_XS: return iq4_xs(b, q, s);
        case MXFP4: return mxfp4(b, q, s);
        case IQ4_NL: return iq4_nl(b, q, s);
        case TQ2_0: return tq2_0(b, q, s);
        default: break;
    }
}

// nb consecutive blocks (a row's run): the type's decoder in one loop (a dispatch per block costs as much as
// MXFP4's 32-weight decode itself).
template <int Bytes, int B, void (*F)(const uint8_t*, int8_t*, float*)>
static inline void run(const uint8_t* b, int nb, int8_t* q, float* s) {
    for (int i = 0; i < nb; ++i) F(b + size_t(i) * Bytes, q + size_t(i) * B, s + size_t(i) * (B / 16));
}
static inline void decode_blocks(int type, const uint8_t* b, int nb, int8_t* q, float* s) {
    switch (type) {
        case IQ1_S: return run<50, 256, iq1_s>(b, nb, q, s);
        case IQ1_M: return run<56, 256, iq1_m>(b, nb, q, s);
        case IQ2_XXS: return run<66, 256, iq2_xxs>(b, nb, q, s);
        case IQ2_XS: return run<74, 256, iq2_xs>(b, nb, q, s);
        case IQ2_S: return run<82, 256, iq2_s>(b, nb, q, s);
        case IQ3_XXS: return run<98, 256, iq3_xxs>(b, nb, q, s);
        case IQ3_S: return run<110, 256, iq3_s>(b, nb, q, s);
        case IQ4_XS: return run<136, 256, iq4_xs>(b, nb, q, s);
        case MXFP4: return run<17, 32, mxfp4>(b, nb, q, s);
        case IQ4_NL: return run<18, 32, iq4_nl>(b, nb, q, s);
        case TQ2_0: return run<66, 256, tq2_0>(b, nb, q, s);
        default: break;
    }
}

}  // namespace iqdec
}  // namespace kt
