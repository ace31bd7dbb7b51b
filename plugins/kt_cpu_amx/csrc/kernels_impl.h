// Integer-dot GEMM on int8 activations, written once and compiled per ISA (kernels_avx2.cpp,
// kernels_avx512.cpp). With AVX512-VNNI (+VL) the u8 x s8 dot is one vpdpbusd; without, maddubs + madd
// (4-bit weights) or widening to int16 (8-bit weights, whose products would saturate maddubs).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "iq_decode.h"
#include "kernels.h"

namespace kt {
namespace KT_NS {

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define KT_VNNI 1
constexpr int kTileRows = 4, kTileToks = 4;
#else
#define KT_VNNI 0
constexpr int kTileRows = 4, kTileToks = 2;
#endif

// Decode reads each weight row once, in register tiles of R rows: the kernels prefetch the rows kPfRows ahead
// (the next tile) line by line as they go; the hardware prefetcher alone left a thread at about half of the read
// bandwidth on rows of 1-2 KiB.
constexpr int kPfRows = kTileRows;

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// Scales and mins are float or fp16 (PackedMatrix::half_scales).
static inline float scalar(const float* p, int i) { return p[i]; }
static inline float scalar(const uint16_t* p, int i) { return _cvtsh_ss(p[i]); }
static inline __m256 bcast(const float* p, int i) { return _mm256_broadcast_ss(p + i); }
static inline __m256 bcast(const uint16_t* p, int i) { return _mm256_set1_ps(_cvtsh_ss(p[i])); }
static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 load8(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// A K-quant's two-level scales (PackedMatrix::sub8_scales, sub16_scales): one row's integer sub-scales and its
// floats, one per P groups; element i stands for group g0 + i, so p + g still finds each group's float.
template <class Q, int P> struct SubScales {
    using Int = Q;
    const Q* q;
    const float* sup;
    int g0;
    SubScales operator+(int g) const { return {q, sup, g0 + g}; }
};
using Sub8 = SubScales<uint8_t, 8>;    // Q4_K
using Sub16 = SubScales<int8_t, 16>;   // Q5_K, Q6_K
template <class Q, int P> static inline float scalar(SubScales<Q, P> p, int i) {
    return two_level_scale(p.q, p.sup, P, p.g0 + i);
}
template <class Q, int P> static inline __m256 bcast(SubScales<Q, P> p, int i) { return _mm256_set1_ps(scalar(p, i)); }
// 8 groups from g0, a multiple of 8: under one float
template <class Q, int P> static inline __m256 load8(SubScales<Q, P> p) {
    __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p.q + p.g0));
    __m256i v;
    if constexpr (std::is_signed_v<Q>) v = _mm256_cvtepi8_epi32(b);
    else v = _mm256_cvtepu8_epi32(b);
    return _mm256_mul_ps(_mm256_cvtepi32_ps(v), _mm256_set1_ps(p.sup[p.g0 / P]));
}

// The row's scales / mins as the kernels read them: pointers to float or fp16, or SubScales.
template <class S> struct ScaleOf { using type = const S*; };
template <class Q, int P> struct ScaleOf<SubScales<Q, P>> { using type = SubScales<Q, P>; };
template <class S> constexpr bool kSub = std::is_same_v<S, Sub8> || std::is_same_v<S, Sub16>;
template <class S> static inline typename ScaleOf<S>::type row_scales(const PackedMatrix& W, int r) {
    if constexpr (kSub<S>) return S{W.row_s<typename S::Int>(r), W.row_sup_s(r), 0};
    else return W.row_s<S>(r);
}
template <class S> static inline typename ScaleOf<S>::type row_mins(const PackedMatrix& W, int r) {
    if constexpr (kSub<S>) return S{W.row_m<typename S::Int>(r), W.row_sup_m(r), 0};
    else return W.row_m<S>(r);
}

template <class A>
static inline float dotf(A a, const float* b, int n) {
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(load8(a + i), _mm256_loadu_ps(b + i), acc);
    float s = hsum(acc);
    for (; i < n; ++i) s += scalar(a, i) * b[i];
    return s;
}

// Row r's min term against the activations' block sums asum (one per group): sum_g min[g] * asum[g], or without
// stored mins -zero_point * sum_g scale[g] * asum[g] (the same float, zero_point being a power of two).
template <class S>
static inline float min_term(const PackedMatrix& W, int r, const float* asum, int G) {
    if (W.zero_point) return -float(W.zero_point) * dotf(row_scales<S>(W, r), asum, G);
    return dotf(row_mins<S>(W, r), asum, G);
}

// 32 unsigned 4-bit weights x 32 int8 activations -> 8 int32 partial sums.
static inline __m256i dot_u4(__m256i w, __m256i a) {
#if KT_VNNI
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, a);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), _mm256_set1_epi16(1));
#endif
}

static inline __m256i unpack_nibbles(const uint8_t* p) {
    __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    __m256i v = _mm256_set_m128i(_mm_srli_epi16(b, 4), b);
    return _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
}

// Two consecutive groups from one 32-byte load: the same vectors as unpack_nibbles(p), unpack_nibbles(p + 16).
static inline void unpack_nibbles2(const uint8_t* p, __m256i& w0, __m256i& w1) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    __m256i lo = _mm256_and_si256(b, m4), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), m4);
    w0 = _mm256_inserti128_si256(lo, _mm256_castsi256_si128(hi), 1);
    w1 = _mm256_permute2x128_si256(lo, hi, 0x31);
}

// ---------------------------------------------------------------------------------------------- 4-bit
template <int R, int T, class S>
static inline void tile_q4(const PackedMatrix& W, int n, const QAct& X, int m, float* Y, int ldy) {
    const int G = W.k / 32;
    __m256 acc[R][T];
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
    const uint8_t* wq[R];
    typename ScaleOf<S>::type ws[R];
    for (int r = 0; r < R; ++r) { wq[r] = W.row_q(n + r); ws[r] = row_scales<S>(W, n + r); }
    const int8_t* aq[T];
    const float* ad[T];
    for (int t = 0; t < T; ++t) {
        int p = X.phys(m + t);
        aq[t] = X.q + size_t(p) * X.k;
        ad[t] = X.d + size_t(p) * G;
    }
    // Per 8 groups, each group's scale times each token's block scale, 8 at a time, into a small array the
    // group loop broadcasts from: the same float products as scale * dx per group, without the per group and
    // row scale conversion (two-level: load, convert, multiply) and multiply.
    alignas(32) float sdx[R][T][8];
    const size_t pf = size_t(kPfRows) * W.row_bytes();
    int g = 0;
    for (; g + 8 <= G; g += 8) {
        for (int r = 0; r < R; ++r) {
            __m256 s = load8(ws[r] + g);
            for (int t = 0; t < T; ++t) _mm256_store_ps(sdx[r][t], _mm256_mul_ps(s, _mm256_loadu_ps(ad[t] + g)));
        }
        for (int j = 0; j < 8; j += 2) {  // two groups per 32 bytes of each row
            __m256i a0[T], a1[T];
            for (int t = 0; t < T; ++t) {
                a0[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(aq[t] + (g + j) * 32));
                a1[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(aq[t] + (g + j) * 32 + 32));
            }
            for (int r = 0; r < R; ++r) {
                if (!(j & 2)) _mm_prefetch(reinterpret_cast<const char*>(wq[r] + (g + j) * 16 + pf), _MM_HINT_T0);
                __m256i w0, w1;
                unpack_nibbles2(wq[r] + (g + j) * 16, w0, w1);
                for (int t = 0; t < T; ++t)
                    acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u4(w0, a0[t])),
                                                _mm256_broadcast_ss(&sdx[r][t][j]), acc[r][t]);
                for (int t = 0; t < T; ++t)
                    acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u4(w1, a1[t])),
                                                _mm256_broadcast_ss(&sdx[r][t][j + 1]), acc[r][t]);
            }
        }
    }
    for (; g < G; ++g) {  // k not a multiple of 256 (Q4_0, Q4_1)
        __m256i a[T];
        __m256 dx[T];
        for (int t = 0; t < T; ++t) {
            a[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(aq[t] + g * 32));
            dx[t] = _mm256_broadcast_ss(ad[t] + g);
        }
        for (int r = 0; r < R; ++r) {
            __m256i w = unpack_nibbles(wq[r] + g * 16);
            __m256 s = bcast(ws[r], g);
            for (int t = 0; t < T; ++t)
                acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u4(w, a[t])), _mm256_mul_ps(s, dx[t]), acc[r][t]);
        }
    }
    for (int t = 0; t < T; ++t) {
        const float* asum = X.s32 + size_t(X.phys(m + t)) * G;
        for (int r = 0; r < R; ++r)
            Y[size_t(m + t) * ldy + n + r] = hsum(acc[r][t]) + min_term<S>(W, n + r, asum, G);
    }
}

#if KT_VNNI && defined(__AVX512F__)
// One token's 4-bit rows on zmm (decode): 64 weight bytes = 4 groups per load, and two vpdpbusd against the
// activations permuted to the nibble order (low nibbles: elements 0-15 of each group, high: 16-31), so int32 lane
// 4i + j holds 8 products of group i; one float multiply-add per 4 groups. Scales (and the min term) per 16 groups
// in zmm. About 2.3x fewer instructions per weight byte than tile_q4 on ymm, which left decode compute-bound below
// the memory bandwidth (a 16-core Xeon: 0.60 ms against 0.71 for one MoE layer, before the prefetch). Needs
// k % 128 == 0 (whole loads of 4 groups).
static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
template <class Q, int P> static inline __m512 load16(SubScales<Q, P> p) {  // p.g0 a multiple of 16
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p.q + p.g0));
    __m512i v;
    if constexpr (std::is_signed_v<Q>) v = _mm512_cvtepi8_epi32(b);
    else v = _mm512_cvtepu8_epi32(b);
    const float* s = p.sup + p.g0 / P;
    const __m512 sup = P == 16 ? _mm512_set1_ps(s[0])
                               : _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_set1_ps(s[0])),
                                                                     _mm256_castps_pd(_mm256_set1_ps(s[1])), 1));
    return _mm512_mul_ps(_mm512_cvtepi32_ps(v), sup);
}
// Lanes l and l + 8 first, then hsum's order (a fixed order: the decode test emulates it float for float).
static inline float hsum16(__m512 v) {
    return hsum(_mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
}
// Groups g .. g + n (n < 16) of a row's scales, zero beyond.
template <class S> static inline __m512 load16_tail(S p, int g, int n) {
    alignas(64) float v[16] = {};
    for (int i = 0; i < n; ++i) v[i] = scalar(p, g + i);
    return _mm512_load_ps(v);
}

template <int R, class S>
static inline void tile_q4_zmm(const PackedMatrix& W, int n, const QAct& X, int m, float* Y, int ldy) {
    const int G = W.k / 32;
    __m512 acc[R], macc[R];
    const uint8_t* wq[R];
    typename ScaleOf<S>::type ws[R], wm[R];
    for (int r = 0; r < R; ++r) {
        acc[r] = macc[r] = _mm512_setzero_ps();
        wq[r] = W.row_q(n + r);
        ws[r] = row_scales<S>(W, n + r);
        if (!W.zero_point) wm[r] = row_mins<S>(W, n + r);
    }
    const int p = X.phys(m);
    const int8_t* aq = X.q + size_t(p) * X.k;
    const float* ad = X.d + size_t(p) * G;
    const float* as = X.s32 + size_t(p) * G;
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const __m512i lo_idx = _mm512_setr_epi64(0, 1, 4, 5, 8, 9, 12, 13), hi_idx = _mm512_setr_epi64(2, 3, 6, 7, 10, 11, 14, 15);
    const __m512i rep0 = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3), four = _mm512_set1_epi32(4);
    const __m512 neg_zp = _mm512_set1_ps(-float(W.zero_point));
    const size_t pf = size_t(kPfRows) * W.row_bytes();
    for (int g = 0; g < G; g += 16) {
        const int ng = std::min(16, G - g);
        const __mmask16 mask = __mmask16((1u << ng) - 1);
        const __m512 d = _mm512_maskz_loadu_ps(mask, ad + g), a = _mm512_maskz_loadu_ps(mask, as + g);
        __m512 sdx[R];
        for (int r = 0; r < R; ++r) {
            const __m512 s = ng == 16 ? load16(ws[r] + g) : load16_tail(ws[r], g, ng);
            const __m512 mn = W.zero_point ? _mm512_mul_ps(s, neg_zp) : ng == 16 ? load16(wm[r] + g) : load16_tail(wm[r], g, ng);
            sdx[r] = _mm512_mul_ps(s, d);
            macc[r] = _mm512_fmadd_ps(mn, a, macc[r]);
        }
        __m512i rep = rep0;
        for (int i = 0; i < ng; i += 4, rep = _mm512_add_epi32(rep, four)) {
            const __m512i x0 = _mm512_loadu_si512(aq + (g + i) * 32), x1 = _mm512_loadu_si512(aq + (g + i) * 32 + 64);
            const __m512i alo = _mm512_permutex2var_epi64(x0, lo_idx, x1), ahi = _mm512_permutex2var_epi64(x0, hi_idx, x1);
            for (int r = 0; r < R; ++r) {
                _mm_prefetch(reinterpret_cast<const char*>(wq[r] + (g + i) * 16 + pf), _MM_HINT_T0);
                const __m512i w = _mm512_loadu_si512(wq[r] + (g + i) * 16);
                const __m512i lo = _mm512_and_si512(w, m4), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), m4);
                const __m512i c = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, alo), hi, ahi);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c), _mm512_permutexvar_ps(rep, sdx[r]), acc[r]);
            }
        }
    }
    for (int r = 0; r < R; ++r) Y[size_t(m) * ldy + n + r] = hsum16(acc[r]) + hsum16(macc[r]);
}
#define KT_Q4_ZMM 1
#else
#define KT_Q4_ZMM 0
#endif

// ---------------------------------------------------------------------------------------------- 8-bit
// [s[0] x 4, s[1] x 4]: the scales of two groups of 16, one per half of the int32 lanes.
static inline __m256 pair_scales(const float* s) {
    __m128 v = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(s)));
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(v), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
}
static inline __m256 pair_scales(const uint16_t* s) {
    uint32_t bits;
    std::memcpy(&bits, s, 4);
    __m128 v = _mm_cvtph_ps(_mm_cvtsi32_si128(int(bits)));
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(v), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
}

template <class Q, int P> static inline __m256 pair_scales(SubScales<Q, P> s) {
    return _mm256_setr_m128(_mm_set1_ps(scalar(s, 0)), _mm_set1_ps(scalar(s, 1)));
}

// 32 unsigned 8-bit weights x 32 int8 activations, scaled by sdx (lanes 0-3: the scale of elements 0-15, lanes
// 4-7: of elements 16-31, times the activation block scale), accumulated into acc.
static inline __m256 dot_u8_scaled(__m256i w, __m256i a, __m256 sdx, __m256 acc) {
#if KT_VNNI
    __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, a);  // lanes 0-3: elements 0-15, 4-7: 16-31
#else
    // w = 16 * hi + lo with nibbles hi, lo: maddubs(nibble, a) cannot saturate (2 * 15 * 127 < 2^15), and
    // lanes 0-3 / 4-7 of the int32 sums hold elements 0-15 / 16-31, as with vpdpbusd
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256i lo = _mm256_maddubs_epi16(_mm256_and_si256(w, m4), a);
    __m256i hi = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w, 4), m4), a);
    __m256i p = _mm256_add_epi32(_mm256_madd_epi16(hi, _mm256_set1_epi16(16)), _mm256_madd_epi16(lo, _mm256_set1_epi16(1)));
#endif
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), sdx, acc);
}

// 8-bit groups of GS = 16 (two scales per block of 32) or 32 (one).
template <int R, int T, class S, int GS>
static inline void tile_q8(const PackedMatrix& W, int n, const QAct& X, int m, float* Y, int ldy) {
    const int G32 = W.k / 32;
    __m256 acc[R][T];
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
    const uint8_t* wq[R];
    typename ScaleOf<S>::type ws[R];
    for (int r = 0; r < R; ++r) { wq[r] = W.row_q(n + r); ws[r] = row_scales<S>(W, n + r); }
    const int8_t* aq[T];
    const float* ad[T];
    for (int t = 0; t < T; ++t) {
        int p = X.phys(m + t);
        aq[t] = X.q + size_t(p) * X.k;
        ad[t] = X.d + size_t(p) * G32;
    }
    const size_t pf = size_t(kPfRows) * W.row_bytes();
    // block g of 32 along k; sx(r, t): row r's scales of the block (pair_scales' lanes) times token t's dx
    auto block = [&](int g, auto sx) {
        __m256i a[T];
        for (int t = 0; t < T; ++t) a[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(aq[t] + g * 32));
        for (int r = 0; r < R; ++r) {
            if (!(g & 1)) _mm_prefetch(reinterpret_cast<const char*>(wq[r] + g * 32 + pf), _MM_HINT_T0);
            __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq[r] + g * 32));
            for (int t = 0; t < T; ++t) acc[r][t] = dot_u8_scaled(w, a[t], sx(r, t), acc[r][t]);
        }
    };
    // Per 8 blocks, the group scales (two-level ones expanded to float) times the blocks' dx, vectorized, into a
    // small array: the same float products as scale * dx per block and row, fewer ops (Sub16: the expansion
    // alone made Q6_K decode 1.06x faster than float scales on AVX2, 1.13x slower without).
    constexpr int PB = 32 / GS;  // groups per block
    alignas(32) float sdx[R][T][8 * PB];
    int g = 0;
    for (; g + 8 <= G32; g += 8) {
        for (int r = 0; r < R; ++r) {
            if constexpr (GS == 16) {  // group 2j and 2j + 1 under block j's dx
                __m256 s0 = load8(ws[r] + 2 * g), s1 = load8(ws[r] + 2 * g + 8);
                for (int t = 0; t < T; ++t) {
                    __m256 d = _mm256_loadu_ps(ad[t] + g);
                    __m256 d0 = _mm256_permutevar8x32_ps(d, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
                    __m256 d1 = _mm256_permutevar8x32_ps(d, _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7));
                    _mm256_store_ps(sdx[r][t], _mm256_mul_ps(s0, d0));
                    _mm256_store_ps(sdx[r][t] + 8, _mm256_mul_ps(s1, d1));
                }
            } else {
                __m256 s0 = load8(ws[r] + g);
                for (int t = 0; t < T; ++t) _mm256_store_ps(sdx[r][t], _mm256_mul_ps(s0, _mm256_loadu_ps(ad[t] + g)));
            }
        }
        for (int j = 0; j < 8; ++j)
            block(g + j, [&](int r, int t) {
                return GS == 32 ? _mm256_broadcast_ss(&sdx[r][t][j]) : pair_scales(&sdx[r][t][2 * j]);
            });
    }
    for (; g < G32; ++g) {  // k not a multiple of 256 (never with two-level scales)
        __m256 dx[T];
        for (int t = 0; t < T; ++t) dx[t] = _mm256_broadcast_ss(ad[t] + g);
        block(g, [&](int r, int t) {
            __m256 sv = GS == 32 ? bcast(ws[r], g) : pair_scales(ws[r] + 2 * g);
            return _mm256_mul_ps(sv, dx[t]);
        });
    }
    for (int t = 0; t < T; ++t) {
        const float* asum = (GS == 32 ? X.s32 : X.s16) + size_t(X.phys(m + t)) * (W.k / GS);
        for (int r = 0; r < R; ++r)
            Y[size_t(m + t) * ldy + n + r] = hsum(acc[r][t]) + min_term<S>(W, n + r, asum, W.k / GS);
    }
}

// One register tile of R rows x T tokens: 4-bit (GS = 0) or 8-bit groups of GS.
template <int R, int T, class S, int GS>
static inline void tile(const PackedMatrix& W, int n, const QAct& X, int m, float* Y, int ldy) {
    if constexpr (GS == 0) tile_q4<R, T, S>(W, n, X, m, Y, ldy);
    else tile_q8<R, T, S, GS>(W, n, X, m, Y, ldy);
}

// Rows [n, n + R) for all M tokens: tiles of kTileToks tokens, then the rest one token at a time.
template <int R, class S, int GS>
static void tokens_in_tiles(const PackedMatrix& W, int n, const QAct& X, int M, float* Y, int ldy) {
    int m = 0;
#if KT_Q4_ZMM
    if constexpr (GS == 0)  // one token at a time: its floats then never depend on the tile it is in
        if (W.k % 128 == 0) {
            for (; m < M; ++m) tile_q4_zmm<R, S>(W, n, X, m, Y, ldy);
            return;
        }
#endif
    for (; m + kTileToks <= M; m += kTileToks) tile<R, kTileToks, S, GS>(W, n, X, m, Y, ldy);
    for (; m < M; ++m) tile<R, 1, S, GS>(W, n, X, m, Y, ldy);
}

template <int R, class S>
static void rows_all_tokens(const PackedMatrix& W, int n, const QAct& X, int M, float* Y, int ldy) {
    if constexpr (std::is_same_v<S, Sub8>) tokens_in_tiles<R, S, 0>(W, n, X, M, Y, ldy);  // 4-bit only
    else if constexpr (std::is_same_v<S, Sub16>) tokens_in_tiles<R, S, 16>(W, n, X, M, Y, ldy);  // 8-bit groups of 16 only
    else if (W.bits == 4) tokens_in_tiles<R, S, 0>(W, n, X, M, Y, ldy);
    else if (W.group == 32) tokens_in_tiles<R, S, 32>(W, n, X, M, Y, ldy);
    else tokens_in_tiles<R, S, 16>(W, n, X, M, Y, ldy);
}

template <class S>
static void gemm_rows(const PackedMatrix& W, int n0, int n1, const QAct& X, int M, float* Y, int ldy) {
    int n = n0;
    for (; n + kTileRows <= n1; n += kTileRows) rows_all_tokens<kTileRows, S>(W, n, X, M, Y, ldy);
    for (; n < n1; ++n) rows_all_tokens<1, S>(W, n, X, M, Y, ldy);
}

#include "kernels_iq.h"

void gemm_q8(const PackedMatrix& W, int n0, int n1, const QAct& X, int M, float* Y, int ldy) {
    if (W.iq) gemm_iq(W, n0, n1, X, M, Y, ldy);
    else if (W.sub8_scales) gemm_rows<Sub8>(W, n0, n1, X, M, Y, ldy);
    else if (W.sub16_scales) gemm_rows<Sub16>(W, n0, n1, X, M, Y, ldy);
    else if (W.half_scales) gemm_rows<uint16_t>(W, n0, n1, X, M, Y, ldy);
    else gemm_rows<float>(W, n0, n1, X, M, Y, ldy);
}

// ---------------------------------------------------------------------------------------------- activations
void quantize_act(const float* x, int r0, int r1, int k, size_t ldx, const QActBuf& buf) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int r = r0; r < r1; ++r) {
        const float* xr = x + size_t(r) * ldx;
        int8_t* q = buf.q.as<int8_t>() + size_t(r) * k;
        float* d = buf.d.as<float>() + size_t(r) * (k / 32);
        float* s16 = buf.s16.as<float>() + size_t(r) * (k / 16);
        float* s32 = buf.s32.as<float>() + size_t(r) * (k / 32);
        for (int b = 0; b < k / 32; ++b) {
            __m256 v[4];
            __m256 mx = _mm256_setzero_ps();
            for (int i = 0; i < 4; ++i) {
                v[i] = _mm256_loadu_ps(xr + b * 32 + i * 8);
                mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[i]));
            }
            __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
            m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
            float amax = _mm_cvtss_f32(m4);
            float dd = amax / 127.f, id = amax > 0 ? 127.f / amax : 0.f;
            __m256 vid = _mm256_set1_ps(id);
            __m256i qi[4];
            for (int i = 0; i < 4; ++i) qi[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], vid));
            // int32 -> int8 with the lane order restored after the in-lane packs
            __m256i p16a = _mm256_packs_epi32(qi[0], qi[1]);
            __m256i p16b = _mm256_packs_epi32(qi[2], qi[3]);
            __m256i p8 = _mm256_packs_epi16(p16a, p16b);
            p8 = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * 32), p8);
            __m256i lo = _mm256_add_epi32(qi[0], qi[1]), hi = _mm256_add_epi32(qi[2], qi[3]);
            __m128i l4 = _mm_add_epi32(_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1));
            __m128i h4 = _mm_add_epi32(_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1));
            l4 = _mm_hadd_epi32(l4, h4);
            l4 = _mm_hadd_epi32(l4, l4);
            int sl = _mm_cvtsi128_si32(l4), sh = _mm_extract_epi32(l4, 1);
            d[b] = dd;
            s16[2 * b] = dd * float(sl);
            s16[2 * b + 1] = dd * float(sh);
            s32[b] = dd * float(sl + sh);
        }
    }
}

// ---------------------------------------------------------------------------------------------- activations
// e^x for 8 lanes: 2^n * p(r) with r = x - n ln 2 (ln 2 in two parts) and a degree-6 polynomial (Cephes' expf
// constants, about 1 ulp); x clamped to +-88.376 (no inf, e^-88 ~ 0 for the uses below).
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f)), _mm256_set1_ps(88.3762626647949f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

void act_mul(int act, float* g, const float* u, int n) {
    const __m256 one = _mm256_set1_ps(1.f), half = _mm256_set1_ps(0.5f), two = _mm256_set1_ps(2.f);
    int j = 0;
    for (; j + 8 <= n; j += 8) {
        const __m256 v = _mm256_loadu_ps(g + j);
        __m256 a;
        if (act == 0) {
            a = _mm256_div_ps(v, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), v))));
        } else {  // 0.5 v (1 + tanh(z)), tanh(z) = 1 - 2 / (e^2z + 1)
            const __m256 z = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f),
                                           _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), v),
                                                           _mm256_mul_ps(v, v), v));
            const __m256 t = _mm256_sub_ps(one, _mm256_div_ps(two, _mm256_add_ps(exp8(_mm256_mul_ps(two, z)), one)));
            a = _mm256_mul_ps(_mm256_mul_ps(half, v), _mm256_add_ps(one, t));
        }
        _mm256_storeu_ps(g + j, _mm256_mul_ps(a, _mm256_loadu_ps(u + j)));
    }
    for (; j < n; ++j) {
        const float v = g[j];
        const float a = act == 0 ? v / (1.f + std::exp(-v))
                                 : 0.5f * v * (1.f + std::tanh(0.7978845608028654f * (v + 0.044715f * v * v * v)));
        g[j] = a * u[j];
    }
}

// ---------------------------------------------------------------------------------------------- attention
static inline float dot_f32(const float* a, const float* b, int d) {
    const int d8 = d & ~7;
    __m256 acc = _mm256_setzero_ps();
    for (int i = 0; i < d8; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float s = hsum(acc);
    for (int i = d8; i < d; ++i) s += a[i] * b[i];
    return s;
}

// scores[0..T) -> softmax weights in place (max subtracted, then normalized as Transformers' softmax does)
static inline void softmax_inplace(float* scores, int T) {
    float mx = -INFINITY;
    for (int t = 0; t < T; ++t) mx = scores[t] > mx ? scores[t] : mx;
    float sum = 0.f;
    for (int t = 0; t < T; ++t) {
        float e = std::exp(scores[t] - mx);
        scores[t] = e;
        sum += e;
    }
    const float inv = 1.f / sum;
    for (int t = 0; t < T; ++t) scores[t] *= inv;
}

// out[i] += sum_t p[t] * V[t][i], in t order: one multiply-add per element and row, up to 64 columns' sums held in
// registers across the rows (through memory, each row's multiply-add would wait for the last one's store).
static inline void accumulate_rows(const float* p, const float* V, int T, int d, size_t ld, float* out) {
    const int d8 = d & ~7;
    for (int c = 0; c < d8; c += 64) {
        const int w = std::min(64, d8 - c) / 8;
        __m256 acc[8];
        for (int j = 0; j < w; ++j) acc[j] = _mm256_loadu_ps(out + c + 8 * j);
        for (int t = 0; t < T; ++t) {
            const float* v = V + size_t(t) * ld + c;
            const __m256 vp = _mm256_set1_ps(p[t]);
            for (int j = 0; j < w; ++j) acc[j] = _mm256_fmadd_ps(vp, _mm256_loadu_ps(v + 8 * j), acc[j]);
        }
        for (int j = 0; j < w; ++j) _mm256_storeu_ps(out + c + 8 * j, acc[j]);
    }
    for (int t = 0; t < T && d8 < d; ++t) {
        const float* v = V + size_t(t) * ld;
        for (int i = d8; i < d; ++i) out[i] += p[t] * v[i];
    }
}

// out[i] = dot_f32(q, K + i * ld, d) for i < n: four rows at a time, four independent chains of multiply-adds, each
// row's sum in dot_f32's order.
static inline void dot_f32_rows(const float* q, const float* K, int n, int d, size_t ld, float* out) {
    const int d8 = d & ~7;
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        const float *k0 = K + size_t(i) * ld, *k1 = k0 + ld, *k2 = k1 + ld, *k3 = k2 + ld;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int j = 0; j < d8; j += 8) {
            const __m256 x = _mm256_loadu_ps(q + j);
            a0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k0 + j), a0);
            a1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k1 + j), a1);
            a2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k2 + j), a2);
            a3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k3 + j), a3);
        }
        const __m256 acc[4] = {a0, a1, a2, a3};
        const float* rows[4] = {k0, k1, k2, k3};
        for (int r = 0; r < 4; ++r) {
            float s = hsum(acc[r]);
            for (int j = d8; j < d; ++j) s += q[j] * rows[r][j];
            out[i + r] = s;
        }
    }
    for (; i < n; ++i) out[i] = dot_f32(q, K + size_t(i) * ld, d);
}

static inline void weighted_rows(const float* p, const float* V, int T, int d, size_t ld, float* out) {
    for (int i = 0; i < d; ++i) out[i] = 0.f;
    accumulate_rows(p, V, T, d, ld, out);
}

void attend(const float* q, const float* K, const float* V, const int32_t* blocks, int block, int T, int d, size_t ld,
            float scale, float* scores, float* out) {
    if (!blocks) {
        dot_f32_rows(q, K, T, d, ld, scores);
        for (int t = 0; t < T; ++t) scores[t] *= scale;
        softmax_inplace(scores, T);
        weighted_rows(scores, V, T, d, ld, out);
        return;
    }
    // block by block, the same float operations in the same order as one run
    for (int t0 = 0, b = 0; t0 < T; t0 += block, ++b)
        dot_f32_rows(q, K + size_t(blocks[b]) * block * ld, std::min(block, T - t0), d, ld, scores + t0);
    for (int t = 0; t < T; ++t) scores[t] *= scale;
    softmax_inplace(scores, T);
    for (int i = 0; i < d; ++i) out[i] = 0.f;
    for (int t0 = 0, b = 0; t0 < T; t0 += block, ++b)
        accumulate_rows(scores + t0, V + size_t(blocks[b]) * block * ld, std::min(block, T - t0), d, ld, out);
}

void attend_latent(const float* q, const float* K, int d, size_t ld, const float* qr, const float* R, int dr,
                   size_t ldr, const int32_t* blocks, int block, int T, float scale, float* scores, float* out) {
    if (!blocks) block = T;  // one run; block by block otherwise, the same float operations in the same order
    auto row0 = [&](int b) { return blocks ? size_t(blocks[b]) * block : size_t(0); };
    for (int t0 = 0, b = 0; t0 < T; t0 += block, ++b) {
        const int n = std::min(block, T - t0);
        dot_f32_rows(q, K + row0(b) * ld, n, d, ld, scores + t0);
        float rope[64];  // the rotary keys' dot products, a piece of the block at a time
        for (int i0 = 0; i0 < n; i0 += 64) {
            const int m = std::min(64, n - i0);
            dot_f32_rows(qr, R + (row0(b) + i0) * ldr, m, dr, ldr, rope);
            for (int i = 0; i < m; ++i) scores[t0 + i0 + i] = (scores[t0 + i0 + i] + rope[i]) * scale;
        }
    }
    softmax_inplace(scores, T);
    for (int i = 0; i < d; ++i) out[i] = 0.f;
    for (int t0 = 0, b = 0; t0 < T; t0 += block, ++b)
        accumulate_rows(scores + t0, K + row0(b) * ld, std::min(block, T - t0), d, ld, out);
}

void softmax(float* scores, int T) { softmax_inplace(scores, T); }

// Latent attention of several heads of one sequence, split by positions (latent_scores) and by latent columns
// (latent_weighted) instead of by head: each latent row is read once per phase for all heads. Each float is the
// one attend_latent computes (the same dot products; the same multiply-adds per column in position order).

// dot_f32(q + h * ldq, k, d) for kHeads heads h at once: each head's sum in dot_f32's order, independent chains of
// multiply-adds instead of one (a single chain waits out each FMA's latency)
constexpr int kHeads = 8;
static inline void dot_f32_heads(const float* q, size_t ldq, const float* k, int d, float* out) {
    const int d8 = d & ~7;
    __m256 acc[kHeads];
    for (int h = 0; h < kHeads; ++h) acc[h] = _mm256_setzero_ps();
    for (int i = 0; i < d8; i += 8) {
        const __m256 v = _mm256_loadu_ps(k + i);
        for (int h = 0; h < kHeads; ++h) acc[h] = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * ldq + i), v, acc[h]);
    }
    for (int h = 0; h < kHeads; ++h) {
        float s = hsum(acc[h]);
        for (int i = d8; i < d; ++i) s += q[h * ldq + i] * k[i];
        out[h] = s;
    }
}

void latent_scores(const float* q, size_t ldq, const float* qr, size_t ldqr, int nh, const float* K, int d, size_t ld,
                   const float* R, int dr, size_t ldr, const int32_t* blocks, int block, int t0, int t1, float scale,
                   float* scores, size_t lds) {
    for (int t = t0; t < t1; ++t) {
        const size_t slot = table_slot(blocks, block, t);
        const float *k = K + slot * ld, *r = R + slot * ldr;
        int h = 0;
        for (; h + kHeads <= nh; h += kHeads) {
            float dk[kHeads], dq[kHeads];
            dot_f32_heads(q + size_t(h) * ldq, ldq, k, d, dk);
            dot_f32_heads(qr + size_t(h) * ldqr, ldqr, r, dr, dq);
            for (int j = 0; j < kHeads; ++j) scores[size_t(h + j) * lds + t] = (dk[j] + dq[j]) * scale;
        }
        for (; h < nh; ++h)
            scores[size_t(h) * lds + t] = (dot_f32(q + size_t(h) * ldq, k, d) + dot_f32(qr + size_t(h) * ldqr, r, dr)) * scale;
    }
}

// 32 columns (c, multiple of 8) of `heads` (1 or 2) heads' weighted sums over positions t0..t1, added to out: the
// accumulators stay in registers across the positions, one multiply-add per column and position in order
template <int heads>
static inline void weighted_cols(const float* p, size_t ldp, const float* K, size_t ld, const int32_t* blocks,
                                 int block, int t0, int t1, int c, float* out, size_t ldo) {
    __m256 acc[heads][4];
    for (int h = 0; h < heads; ++h)
        for (int j = 0; j < 4; ++j) acc[h][j] = _mm256_loadu_ps(out + h * ldo + c + 8 * j);
    for (int t = t0; t < t1; ++t) {
        const float* v = K + table_slot(blocks, block, t) * ld + c;
        const __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8), v2 = _mm256_loadu_ps(v + 16),
                     v3 = _mm256_loadu_ps(v + 24);
        for (int h = 0; h < heads; ++h) {
            const __m256 vp = _mm256_set1_ps(p[h * ldp + t]);
            acc[h][0] = _mm256_fmadd_ps(vp, v0, acc[h][0]);
            acc[h][1] = _mm256_fmadd_ps(vp, v1, acc[h][1]);
            acc[h][2] = _mm256_fmadd_ps(vp, v2, acc[h][2]);
            acc[h][3] = _mm256_fmadd_ps(vp, v3, acc[h][3]);
        }
    }
    for (int h = 0; h < heads; ++h)
        for (int j = 0; j < 4; ++j) _mm256_storeu_ps(out + h * ldo + c + 8 * j, acc[h][j]);
}

void latent_weighted(const float* p, size_t ldp, int nh, const float* K, size_t ld, const int32_t* blocks, int block,
                     int T, int c0, int c1, float* out, size_t ldo) {
    for (int h = 0; h < nh; ++h)
        for (int c = c0; c < c1; ++c) out[size_t(h) * ldo + c] = 0.f;
    constexpr int kTile = 256;  // positions whose 32-column slice (32 KiB) stays in L1 while every head takes it
    for (int t0 = 0; t0 < T; t0 += kTile) {
        const int t1 = std::min(T, t0 + kTile);
        for (int c = c0; c < c1; c += 32) {
            int h = 0;
            for (; h + 2 <= nh; h += 2)
                weighted_cols<2>(p + size_t(h) * ldp, ldp, K, ld, blocks, block, t0, t1, c, out + size_t(h) * ldo, ldo);
            for (; h < nh; ++h)
                weighted_cols<1>(p + size_t(h) * ldp, ldp, K, ld, blocks, block, t0, t1, c, out + size_t(h) * ldo, ldo);
        }
    }
}

template <class S>
static void axpy_rows_t(const PackedMatrix& W, int r0, int nrows, const float* coef, float* out) {
    const int G = W.k / 32;
    for (int i = 0; i < nrows; ++i) {
        const int r = r0 + i;
        const float c = coef[i];
        const uint8_t* q = W.row_q(r);
        const S* s = W.row_s<S>(r);
        const S* mins = W.zero_point ? nullptr : W.row_m<S>(r);
        for (int g = 0; g < G; ++g) {
            // c * (scale * u + min) with min = -zero_point * scale where no mins are stored
            const float sc = scalar(s, g) * c;
            const float off = (mins ? scalar(mins, g) : -float(W.zero_point) * scalar(s, g)) * c;
            const __m256 vs = _mm256_set1_ps(sc), vo = _mm256_set1_ps(off);
            for (int j = 0; j < 32; j += 8) {
                const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + g * 32 + j));
                const __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
                float* o = out + g * 32 + j;
                _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), _mm256_fmadd_ps(w, vs, vo)));
            }
        }
    }
}

template <class S>
static void dot_rows_t(const PackedMatrix& W, int r0, int nrows, const float* x, float* out) {
    const int G = W.k / 32;
    for (int i = 0; i < nrows; ++i) {
        const int r = r0 + i;
        const uint8_t* q = W.row_q(r);
        const S* s = W.row_s<S>(r);
        const S* mins = W.zero_point ? nullptr : W.row_m<S>(r);
        __m256 acc = _mm256_setzero_ps();
        for (int g = 0; g < G; ++g) {
            const float sc = scalar(s, g), off = mins ? scalar(mins, g) : -float(W.zero_point) * sc;
            const __m256 vs = _mm256_set1_ps(sc), vo = _mm256_set1_ps(off);
            for (int j = 0; j < 32; j += 8) {
                const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + g * 32 + j));
                const __m256 w = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)), vs, vo);
                acc = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + g * 32 + j), acc);
            }
        }
        out[i] = hsum(acc);
    }
}

void dot_rows(const PackedMatrix& W, int r0, int nrows, const float* x, float* out) {
    if (W.half_scales) dot_rows_t<uint16_t>(W, r0, nrows, x, out);
    else dot_rows_t<float>(W, r0, nrows, x, out);
}

void axpy_rows(const PackedMatrix& W, int r0, int nrows, const float* coef, float* out) {
    if (W.half_scales) axpy_rows_t<uint16_t>(W, r0, nrows, coef, out);
    else axpy_rows_t<float>(W, r0, nrows, coef, out);
}

}  // namespace KT_NS
}  // namespace kt
