// AVX512-VNNI kernels (compiled with -mavx512f -mavx512bw -mavx512vl -mavx512vnni): vpdpbusd on ymm.
#define KT_NS avx512
#include "kernels_impl.h"

#include <cstring>
#include <type_traits>

namespace kt {
namespace avx512 {

#include "kernels_i8.h"

// The int8 prefill on AVX512-VNNI: the AMX kernel's data (unpacked u8 weight rows, IAct token blocks of 16) with
// vpdpbusd: per group, 8 weight rows x 16 tokens of int32 products in registers (each 4 weight bytes broadcast
// against 16 tokens' 4 activation bytes), then the same float scaling. Weights stay unsigned (vpdpbusd is u8 x s8):
// the zero point, where there is one, is the min term.
// Signed (the i-quants): the weights as their signed int8 values, no min term; vpdpbusd takes |w| and the
// activations with w's sign (a zero point's min term would cancel most of the product in float).
template <bool Signed>
static void gemm_i8_t(const PackedMatrix& W, int n0, int n1, const IAct& X, float* Y, int ldy, uint8_t* scratch) {
    constexpr int R = 8;
    const int k = W.k, gs = W.group, G = W.groups(), tblocks = (X.m + 15) / 16, quads = gs / 4;
    const size_t lda = a_stride(k);
    uint8_t* a = scratch;
    float* s = reinterpret_cast<float*>(scratch + 16 * lda);
    float* m = s + size_t(16) * G;
    const float* asums = gs == 32 ? X.s32 : X.s16;
    const int B32 = k / 32;
    for (int n = n0; n < n1; n += 16) {
        unpack_a(W, n, a, lda, s, m, Signed);
        for (int tb = 0; tb < tblocks; ++tb) {
            const int8_t* bq = X.q + size_t(tb) * 16 * k;
            const float* d = X.d + size_t(tb) * 16 * B32;
            const float* as = asums + size_t(tb) * 16 * G;
            __m512 acc[16];
            for (int h = 0; h < 16; h += R) {
                for (int r = 0; r < R; ++r) acc[h + r] = _mm512_setzero_ps();
                for (int g = 0; g < G; ++g) {
                    __m512i c[R];
                    for (int r = 0; r < R; ++r) c[r] = _mm512_setzero_si512();
                    for (int q = 0; q < quads; ++q) {
                        const __m512i x = _mm512_load_si512(bq + (size_t(g) * quads + q) * 64);
                        for (int r = 0; r < R; ++r) {
                            int32_t w4;
                            std::memcpy(&w4, a + (h + r) * lda + size_t(g) * gs + 4 * q, 4);
                            const __m512i wv = _mm512_set1_epi32(w4);
                            if constexpr (Signed) {
                                const __m512i sx = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(wv), _mm512_setzero_si512(), x);
                                c[r] = _mm512_dpbusd_epi32(c[r], _mm512_abs_epi8(wv), sx);
                            } else {
                                c[r] = _mm512_dpbusd_epi32(c[r], wv, x);
                            }
                        }
                    }
                    const __m512 dv = _mm512_loadu_ps(d + size_t(gs == 32 ? g : g / 2) * 16);
                    const __m512 av = _mm512_loadu_ps(as + size_t(g) * 16);
                    for (int r = 0; r < R; ++r)
                        scale_row<!Signed>(c[r], s[(h + r) * G + g], m[(h + r) * G + g], dv, av, acc[h + r]);
                }
            }
            store_block(acc, 16, X.m, tb, n, Y, ldy);
        }
    }
}

void gemm_i8(const PackedMatrix& W, int n0, int n1, const IAct& X, float* Y, int ldy, uint8_t* scratch) {
    if (W.iq) gemm_i8_t<true>(W, n0, n1, X, Y, ldy, scratch);
    else gemm_i8_t<false>(W, n0, n1, X, Y, ldy, scratch);
}

}  // namespace avx512
}  // namespace kt
