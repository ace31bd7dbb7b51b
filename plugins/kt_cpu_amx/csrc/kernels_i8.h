// The int8 prefill pieces shared by the AMX-INT8 tiles (kernels_amx.cpp) and the AVX512-VNNI kernel
// (kernels_avx512.cpp): weight rows unpacked to bytes with float scales, activations in IAct blocks, the float
// scaling of each group's integer products. Included inside each translation unit's ISA namespace (after
// <immintrin.h>, <cstring> and <type_traits>), so each gets its own copy compiled with its own -m flags.

// Two-level scales to float: out[g] = sup[g / per] * sub[g] (PackedMatrix::sub8_scales, sub16_scales), 16 at a time
// (the same float products as two_level_scale).
template <class Q> inline void expand_sub(const Q* sub, const float* sup, int per, int G, float* out) {
    int g = 0;
    for (; g + 16 <= G; g += 16) {
        __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(sub + g));
        __m512i v;
        if constexpr (std::is_signed_v<Q>) v = _mm512_cvtepi8_epi32(b);
        else v = _mm512_cvtepu8_epi32(b);
        __m512 sv = per == 16 ? _mm512_set1_ps(sup[g / 16])
                              : _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(sup[g / 8]), _mm512_set1_ps(sup[g / 8 + 1]));
        _mm512_storeu_ps(out + g, _mm512_mul_ps(_mm512_cvtepi32_ps(v), sv));
    }
    for (; g < G; ++g) out[g] = two_level_scale(sub, sup, per, g);
}

static inline void half_to_float(const uint16_t* h, int G, float* out) {
    int g = 0;
    for (; g + 16 <= G; g += 16)
        _mm512_storeu_ps(out + g, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + g))));
    for (; g < G; ++g) out[g] = _cvtsh_ss(h[g]);
}

// Row r's G group scales and mins as float into s and m (without stored mins: -zero_point * scale, the product
// the packer checked).
static inline void row_scales_float(const PackedMatrix& W, int r, float* s, float* m) {
    const int G = W.groups();
    const bool has_mins = W.zero_point == 0;
    if (W.sub8_scales) {
        expand_sub(W.row_s<uint8_t>(r), W.row_sup_s(r), 8, G, s);
        expand_sub(W.row_m<uint8_t>(r), W.row_sup_m(r), 8, G, m);
    } else if (W.sub16_scales) {
        expand_sub(W.row_s<int8_t>(r), W.row_sup_s(r), 16, G, s);
        if (has_mins) expand_sub(W.row_m<int8_t>(r), W.row_sup_m(r), 16, G, m);
    } else if (W.half_scales) {
        half_to_float(W.row_s<uint16_t>(r), G, s);
        if (has_mins) half_to_float(W.row_m<uint16_t>(r), G, m);
    } else {
        std::memcpy(s, W.row_s<float>(r), sizeof(float) * G);
        if (has_mins) std::memcpy(m, W.row_m<float>(r), sizeof(float) * G);
    }
    if (!has_mins) {
        const float zp = -float(W.zero_point);
        for (int g = 0; g < G; ++g) m[g] = zp * s[g];
    }
}

void pack_i8_block(const QAct& X, int m, int tb, const IAct& out) {
    const int k = X.k, B32 = k / 32, B16 = k / 16;
    uint32_t* q = reinterpret_cast<uint32_t*>(out.q) + size_t(tb) * 16 * (k / 4);
    float* d = out.d + size_t(tb) * 16 * B32;
    float* s16 = out.s16 + size_t(tb) * 16 * B16;
    float* s32 = out.s32 + size_t(tb) * 16 * B32;
    for (int t = 0; t < 16; ++t) {
        const int row = tb * 16 + t;
        if (row >= m) {
            for (int kk = 0; kk < k / 4; ++kk) q[kk * 16 + t] = 0;
            for (int b = 0; b < B32; ++b) d[b * 16 + t] = s32[b * 16 + t] = 0.f;
            for (int b = 0; b < B16; ++b) s16[b * 16 + t] = 0.f;
            continue;
        }
        const int p = X.phys(row);
        const uint32_t* xq = reinterpret_cast<const uint32_t*>(X.q + size_t(p) * k);
        for (int kk = 0; kk < k / 4; ++kk) q[kk * 16 + t] = xq[kk];
        for (int b = 0; b < B32; ++b) {
            d[b * 16 + t] = X.d[size_t(p) * B32 + b];
            s32[b * 16 + t] = X.s32[size_t(p) * B32 + b];
        }
        for (int b = 0; b < B16; ++b) s16[b * 16 + t] = X.s16[size_t(p) * B16 + b];
    }
}

// Row stride of the unpacked A rows: k bytes plus a line, so that 16 rows of a power-of-two k do not share an L1 set.
static inline size_t a_stride(int k) { return size_t(k) + 64; }

size_t gemm_i8_scratch_bytes(int k) {
    // 16 unpacked rows, then their scales and mins as float [16][groups] (groups of 16 at most)
    return 16 * a_stride(k) + 2 * sizeof(float) * 16 * (k / 16) + 64;
}

// Rows n..n+15 of W unpacked to one byte per weight, row r at a + r * lda (the A tiles read group g at a + g * gs
// with stride lda), and their scales and mins, s[16][G], m[16][G]. minus_zp: with a zero point z the bytes are
// q - z (int8: every such format keeps q in [0, 2z), z <= 128), else q. The i-quants' decoded int8 values v are
// q = v + 128 under zero point 128 (their super-blocks decoded here, as the integer-dot kernels do).
static inline void unpack_a(const PackedMatrix& W, int n, uint8_t* a, size_t lda, float* s, float* m, bool minus_zp) {
    const int G = W.groups(), k = W.k;
    const char z = minus_zp ? char(W.zero_point) : 0;
    const __m512i m4 = _mm512_set1_epi8(0x0F), zp = _mm512_set1_epi8(z);
    // 4 groups of 16 packed bytes (byte j: element j low, j + 16 high) -> [g0 lo, g0 hi, g1 lo, g1 hi], [g2.., g3..]
    const __m512i first = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), second = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
    // the next block's rows are prefetched as these are read (decode-sized calls stream the weights once; the rows
    // of a block are contiguous, 16 rows ahead is the next block, when the matrix has one)
    const size_t ahead = n + 32 <= W.n ? 16 * W.row_bytes() : 0;
    for (int r = 0; r < 16; ++r) {
        const uint8_t* q = W.row_q(n + r);
        uint8_t* o = a + r * lda;
        if (ahead && !W.iq) prefetch_bytes(q + ahead, W.row_bytes());
        if (W.iq) {  // signed int8 values, zero point 128: q + 128 - z
            float* sr = s + size_t(r) * G;
            iqdec::decode_blocks(W.iq, q, k / W.iq_block, reinterpret_cast<int8_t*>(o), sr);
            if (!minus_zp)
                for (int j = 0; j < k; j += 64)
                    _mm512_storeu_si512(o + j, _mm512_xor_si512(_mm512_loadu_si512(o + j), _mm512_set1_epi8(char(0x80))));
            for (int g = 0; g < G; ++g) m[size_t(r) * G + g] = -128.f * sr[g];
            continue;
        }
        if (W.bits == 4) {
            int g = 0;
            for (; g + 4 <= G; g += 4) {
                const __m512i b = _mm512_loadu_si512(q + g * 16);
                const __m512i lo = _mm512_sub_epi8(_mm512_and_si512(b, m4), zp);
                const __m512i hi = _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(b, 4), m4), zp);
                _mm512_storeu_si512(o + g * 32, _mm512_permutex2var_epi64(lo, first, hi));
                _mm512_storeu_si512(o + g * 32 + 64, _mm512_permutex2var_epi64(lo, second, hi));
            }
            for (; g < G; ++g) {
                const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + g * 16));
                const __m128i m4x = _mm_set1_epi8(0x0F), zpx = _mm_set1_epi8(z);
                _mm_storeu_si128(reinterpret_cast<__m128i*>(o + g * 32), _mm_sub_epi8(_mm_and_si128(b, m4x), zpx));
                _mm_storeu_si128(reinterpret_cast<__m128i*>(o + g * 32 + 16),
                                 _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(b, 4), m4x), zpx));
            }
        } else {
            int j = 0;
            for (; j + 64 <= k; j += 64) _mm512_storeu_si512(o + j, _mm512_sub_epi8(_mm512_loadu_si512(q + j), zp));
            for (; j < k; j += 16)  // k is a multiple of 32
                _mm_storeu_si128(reinterpret_cast<__m128i*>(o + j),
                                 _mm_sub_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j)),
                                              _mm512_castsi512_si128(zp)));
        }
        row_scales_float(W, n + r, s + size_t(r) * G, m + size_t(r) * G);
    }
}

// acc (16 tokens of one weight row) += s * (C * d) (+ m * asum with mins) for one group's int32 products C.
template <bool Mins>
KT_INLINE void scale_row(__m512i c, float s, float m, __m512 d, __m512 asum, __m512& acc) {
    acc = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(c), d), _mm512_set1_ps(s), acc);
    if constexpr (Mins) acc = _mm512_fmadd_ps(asum, _mm512_set1_ps(m), acc);
}

// Rows 0..15 of one group's products c (int32 [16 rows][16 tokens]); s, m: the group's column of the rows' scales
// and mins (stride G).
template <bool Mins>
KT_INLINE void scale_group(const int32_t* c, const float* s, const float* m, int G, __m512 d, __m512 asum,
                           __m512* acc) {
    for (int r = 0; r < 16; ++r) scale_row<Mins>(_mm512_load_si512(c + r * 16), s[r * G], m[r * G], d, asum, acc[r]);
}

// acc[r] (rows r of a 16-row block, 16 tokens each) into Y's rows tb * 16 + t (t < m - tb * 16), columns n + r.
KT_INLINE void store_block(const __m512* acc, int rows, int m, int tb, int n, float* Y, int ldy) {
    alignas(64) float y[16 * 16];
    for (int r = 0; r < rows; ++r) _mm512_store_ps(y + r * 16, acc[r]);
    const int mt = m - tb * 16 < 16 ? m - tb * 16 : 16;
    for (int t = 0; t < mt; ++t) {
        float* yo = Y + size_t(tb * 16 + t) * ldy + n;
        for (int r = 0; r < rows; ++r) yo[r] = y[r * 16 + t];
    }
}
