// AMX-BF16 kernels for prefill (compiled with -mamx-tile -mamx-bf16 -mavx512f -mavx512bw -mavx512vl
// -mavx512bf16). The tiles compute Y.T = W @ X.T: the A tiles are weight rows dequantized to bf16 once per
// 32 output features (row-major, as the layout already is), the B tiles the activations in VNNI order,
// converted once per call. Each 32 x 32 output block uses tiles 0-3 (C), 4-5 (A) and 6-7 (B).
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "iq_decode.h"
#include "kernels.h"

namespace kt {
namespace amx {

#include "kernels_i8.h"

namespace {
struct alignas(64) TileConfig {
    uint8_t palette_id = 1;
    uint8_t start_row = 0;
    uint8_t reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

void load_config() {
    TileConfig cfg;
    for (int i = 0; i < 8; ++i) { cfg.colsb[i] = 64; cfg.rows[i] = 16; }
    _tile_loadconfig(&cfg);
}

// 16 values -> 16 bf16 (round to nearest even).
inline __m256i bf16x16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }

constexpr int kMaxGroups = 2048;  // k up to 32768 (8-bit groups of 16)

// Dequantize rows n0..n0+31 of W into out[32][k] bf16.
void dequant_rows(const PackedMatrix& W, int n0, uint16_t* out) {
    const int G = W.groups(), k = W.k;
    for (int r = 0; r < 32; ++r) {
        const uint8_t* q = W.row_q(n0 + r);
        alignas(64) float s[kMaxGroups], m[kMaxGroups];
        row_scales_float(W, n0 + r, s, m);
        uint16_t* o = out + size_t(r) * k;
        if (W.bits == 4) {
            for (int g = 0; g < G; ++g) {
                __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + g * 16));
                __m128i lo = _mm_and_si128(b, _mm_set1_epi8(0x0F));
                __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0F));
                __m512 vs = _mm512_set1_ps(s[g]), vm = _mm512_set1_ps(m[g]);
                __m512 fl = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), vs, vm);
                __m512 fh = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), vs, vm);
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + g * 32), bf16x16(fl));
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + g * 32 + 16), bf16x16(fh));
            }
        } else {
            const int per = W.group / 16;  // groups of 16 or 32: pieces of 16 per group
            for (int j = 0; j < k / 16; ++j) {
                __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j * 16));
                __m512 f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b)), _mm512_set1_ps(s[j / per]),
                                           _mm512_set1_ps(m[j / per]));
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + j * 16), bf16x16(f));
            }
        }
    }
}
}  // namespace

void to_bf16_vnni(const float* x, size_t ldx, const int32_t* rows, int m, int k, int tb0, int tb1, uint16_t* out) {
    uint32_t* o32 = reinterpret_cast<uint32_t*>(out);
    alignas(64) uint16_t tmp[16];
    for (int tb = tb0; tb < tb1; ++tb) {
        uint32_t* blk = o32 + size_t(tb) * (k / 2) * 16;
        for (int t = 0; t < 16; ++t) {
            int row = tb * 16 + t;
            if (row >= m) {
                for (int kk = 0; kk < k / 2; ++kk) blk[kk * 16 + t] = 0;
                continue;
            }
            const float* xr = x + size_t(rows ? rows[row] : row) * ldx;
            for (int c = 0; c < k; c += 16) {
                _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), bf16x16(_mm512_loadu_ps(xr + c)));
                const uint32_t* p = reinterpret_cast<const uint32_t*>(tmp);
                for (int j = 0; j < 8; ++j) blk[(c / 2 + j) * 16 + t] = p[j];
            }
        }
    }
}

// ------------------------------------------------------------------------------------------- AMX-INT8
namespace {
void load_config_i8(int gs) {
    TileConfig cfg;
    for (int i = 0; i < 4; ++i) { cfg.colsb[i] = 64; cfg.rows[i] = 16; }  // C: 16 weight rows x 16 tokens, int32
    for (int i = 4; i < 6; ++i) { cfg.colsb[i] = uint16_t(gs); cfg.rows[i] = 16; }  // A: 16 rows x one group, u8
    for (int i = 6; i < 8; ++i) { cfg.colsb[i] = 64; cfg.rows[i] = uint8_t(gs / 4); }  // B: the group, VNNI s8
    _tile_loadconfig(&cfg);
}

}  // namespace

// Groups g and g + 1 into C tiles C0 and C1 (A tiles 4, 5, B tiles 6, 7) by DOT (_tile_dpbusd: u8 weights, or
// _tile_dpbssd: s8), stored to c0 and c1. A macro: the tile intrinsics take the tile number as a literal.
#define KT_I8_PAIR(DOT, C0, C1, a, lda, bq, gs, g, c0, c1)            \
    do {                                                              \
        _tile_zero(C0);                                               \
        _tile_zero(C1);                                               \
        _tile_loadd(4, (a) + size_t(g) * (gs), (lda));                \
        _tile_loadd(6, (bq) + size_t(g) * (gs) * 16, 64);             \
        _tile_loadd(5, (a) + size_t((g) + 1) * (gs), (lda));          \
        _tile_loadd(7, (bq) + size_t((g) + 1) * (gs) * 16, 64);       \
        DOT(C0, 4, 6);                                                \
        DOT(C1, 5, 7);                                                \
        _tile_stored(C0, (c0), 64);                                   \
        _tile_stored(C1, (c1), 64);                                   \
    } while (0)

// Mins: weights u8 with mins (_tile_dpbusd, plus the min term), else s8 values q - zero point (_tile_dpbssd).
template <bool Mins>
static void gemm_i8_t(const PackedMatrix& W, int n0, int n1, const IAct& X, float* Y, int ldy, uint8_t* scratch) {
    const int k = W.k, gs = W.group, G = W.groups(), tblocks = (X.m + 15) / 16;
    load_config_i8(gs);
    uint8_t* a = scratch;
    const size_t lda = a_stride(k);
    float* s = reinterpret_cast<float*>(scratch + 16 * lda);
    float* m = s + size_t(16) * G;
    // per group of the weights: the activation block holding it (d per 32) and its sums (per gs)
    const float* asums = gs == 32 ? X.s32 : X.s16;
    const int B32 = k / 32, pairs = G / 2;
    const size_t block_bytes = 16 * W.row_bytes();
    alignas(64) int32_t c[4][16 * 16];
    for (int n = n0; n < n1; n += 16) {
        unpack_a(W, n, a, lda, s, m, !Mins);
        // the next 16 rows' weights, spread over the first token block's group pairs (read once per call: the
        // memory stream overlaps the tiles' work instead of stalling the next unpack)
        const char* next = n + 16 < n1 ? reinterpret_cast<const char*>(W.row_q(n + 16)) : nullptr;
        const size_t lines = block_bytes / 64, per_pair = pairs ? (lines + pairs - 1) / pairs : 0;
        for (int tb = 0; tb < tblocks; ++tb) {
            const int8_t* bq = X.q + size_t(tb) * 16 * k;
            const float* d = X.d + size_t(tb) * 16 * B32;
            const float* as = asums + size_t(tb) * 16 * G;
            __m512 acc[16];
            for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
            auto post = [&](int g, const int32_t* cg) {
                scale_group<Mins>(cg, s + g, m + g, G, _mm512_loadu_ps(d + size_t(gs == 32 ? g : g / 2) * 16),
                            _mm512_loadu_ps(as + size_t(g) * 16), acc);
            };
            // software pipeline: pair p + 1's tiles run while pair p is scaled (C tiles 0-1 and 2-3 alternate)
            if (pairs) {
                if constexpr (Mins) KT_I8_PAIR(_tile_dpbusd, 0, 1, a, lda, bq, gs, 0, c[0], c[1]);
                else KT_I8_PAIR(_tile_dpbssd, 0, 1, a, lda, bq, gs, 0, c[0], c[1]);
            }
            for (int p = 0; p < pairs; ++p) {
                if (p + 1 < pairs) {
                    if constexpr (Mins) {
                        if (p % 2 == 0) KT_I8_PAIR(_tile_dpbusd, 2, 3, a, lda, bq, gs, 2 * p + 2, c[2], c[3]);
                        else KT_I8_PAIR(_tile_dpbusd, 0, 1, a, lda, bq, gs, 2 * p + 2, c[0], c[1]);
                    } else {
                        if (p % 2 == 0) KT_I8_PAIR(_tile_dpbssd, 2, 3, a, lda, bq, gs, 2 * p + 2, c[2], c[3]);
                        else KT_I8_PAIR(_tile_dpbssd, 0, 1, a, lda, bq, gs, 2 * p + 2, c[0], c[1]);
                    }
                }
                if (next && tb == 0)
                    for (size_t l = p * per_pair; l < std::min(lines, (p + 1) * per_pair); ++l)
                        _mm_prefetch(next + l * 64, _MM_HINT_T0);
                const int cs = (p % 2) * 2;
                post(2 * p, c[cs]);
                post(2 * p + 1, c[cs + 1]);
            }
            if (G % 2) {
                const int g = G - 1;
                _tile_zero(0);
                _tile_loadd(4, a + size_t(g) * gs, lda);
                _tile_loadd(6, bq + size_t(g) * gs * 16, 64);
                if constexpr (Mins) _tile_dpbusd(0, 4, 6);
                else _tile_dpbssd(0, 4, 6);
                _tile_stored(0, c[0], 64);
                post(g, c[0]);
            }
            store_block(acc, 16, X.m, tb, n, Y, ldy);
        }
    }
    _tile_release();
}

void gemm_i8(const PackedMatrix& W, int n0, int n1, const IAct& X, float* Y, int ldy, uint8_t* scratch) {
    if (W.zero_point) gemm_i8_t<false>(W, n0, n1, X, Y, ldy, scratch);
    else gemm_i8_t<true>(W, n0, n1, X, Y, ldy, scratch);
}

void gemm_bf16(const PackedMatrix& W, int n0, int n1, const BAct& X, float* Y, int ldy, uint16_t* scratch) {
    load_config();
    const int k = X.k;
    const size_t wstride = size_t(k) * 2;
    alignas(64) float c[32 * 32];
    for (int n = n0; n < n1; n += 32) {
        dequant_rows(W, n, scratch);
        for (int m0 = 0; m0 < X.m_pad; m0 += 32) {
            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
            const uint16_t* b0 = X.v + size_t(m0 / 16) * (k / 2) * 32;
            const uint16_t* b1 = b0 + size_t(k / 2) * 32;
            for (int k0 = 0; k0 < k; k0 += 32) {
                _tile_loadd(4, scratch + k0, wstride);
                _tile_loadd(5, scratch + 16 * size_t(k) + k0, wstride);
                _tile_loadd(6, b0 + size_t(k0 / 2) * 32, 64);
                _tile_loadd(7, b1 + size_t(k0 / 2) * 32, 64);
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(1, 4, 7);
                _tile_dpbf16ps(2, 5, 6);
                _tile_dpbf16ps(3, 5, 7);
            }
            _tile_stored(0, c, 128);
            _tile_stored(1, c + 16, 128);
            _tile_stored(2, c + 16 * 32, 128);
            _tile_stored(3, c + 16 * 32 + 16, 128);
            int mt = X.m - m0 < 32 ? X.m - m0 : 32;
            for (int t = 0; t < mt; ++t) {
                float* y = Y + size_t(m0 + t) * ldy + n;
                for (int r = 0; r < 32; ++r) y[r] = c[r * 32 + t];
            }
        }
    }
    _tile_release();
}

}  // namespace amx
}  // namespace kt
