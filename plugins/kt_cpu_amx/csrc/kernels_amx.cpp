// AMX-BF16 kernels for prefill (compiled with -mamx-tile -mamx-bf16 -mavx512f -mavx512bw -mavx512vl
// -mavx512bf16). The tiles compute Y.T = W @ X.T: the A tiles are weight rows dequantized to bf16 once per
// 32 output features (row-major, as the layout already is), the B tiles the activations in VNNI order,
// converted once per call. Each 32 x 32 output block uses tiles 0-3 (C), 4-5 (A) and 6-7 (B).
#include <immintrin.h>

#include <cstring>

#include "kernels.h"

namespace kt {
namespace amx {

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

// Two-level scales to float: out[g] = sup[g / per] * sub[g] (PackedMatrix::sub8_scales, sub16_scales).
template <class Q> void expand_sub(const Q* sub, const float* sup, int per, int G, float* out) {
    for (int g = 0; g < G; ++g) out[g] = two_level_scale(sub, sup, per, g);
}

// Dequantize rows n0..n0+31 of W into out[32][k] bf16.
void dequant_rows(const PackedMatrix& W, int n0, uint16_t* out) {
    const int G = W.groups(), k = W.k;
    for (int r = 0; r < 32; ++r) {
        const uint8_t* q = W.row_q(n0 + r);
        // the group scales and mins of this row as float (converted once per row unless stored so)
        alignas(64) float sbuf[kMaxGroups], mbuf[kMaxGroups];
        const bool has_mins = W.zero_point == 0;
        const float *s = sbuf, *m = mbuf;
        if (W.sub8_scales) {
            expand_sub(W.row_s<uint8_t>(n0 + r), W.row_sup_s(n0 + r), 8, G, sbuf);
            expand_sub(W.row_m<uint8_t>(n0 + r), W.row_sup_m(n0 + r), 8, G, mbuf);
        } else if (W.sub16_scales) {
            expand_sub(W.row_s<int8_t>(n0 + r), W.row_sup_s(n0 + r), 16, G, sbuf);
            if (has_mins) expand_sub(W.row_m<int8_t>(n0 + r), W.row_sup_m(n0 + r), 16, G, mbuf);
        } else if (W.half_scales) {
            const uint16_t* sh = W.row_s<uint16_t>(n0 + r);
            for (int g = 0; g < G; ++g) sbuf[g] = _cvtsh_ss(sh[g]);
            if (has_mins) {
                const uint16_t* mh = W.row_m<uint16_t>(n0 + r);
                for (int g = 0; g < G; ++g) mbuf[g] = _cvtsh_ss(mh[g]);
            }
        } else {
            s = W.row_s<float>(n0 + r);
            if (has_mins) m = W.row_m<float>(n0 + r);
        }
        if (!has_mins)  // min = -zero_point * scale, the product the packer checked
            for (int g = 0; g < G; ++g) mbuf[g] = -float(W.zero_point) * s[g];
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
