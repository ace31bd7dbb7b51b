// The integer-dot GEMM on i-quant weights (PackedMatrix::iq): included inside each ISA's namespace by
// kernels_impl.h (which has included <vector> and iq_decode.h). Per tile of R rows, their blocks (i-quant super-blocks, MXFP4, ...) are
// decoded once into a per-thread buffer (R * k int8 values and R * k / 16 float scales: L1/L2-sized, never the
// matrix), then every token tile of the call takes its dots from it: int8 weights x int8 activations, one int32
// sum per 16 weights, scaled in float by the weights' sub-block scale times the activations' block scale.

// 32 int8 weights x 32 int8 activations -> 8 int32 sums, lanes 0-3: weights 0-15, lanes 4-7: 16-31. The weights'
// signs move onto the activations (|w| <= 127, |a| <= 127: maddubs' pairs cannot saturate).
static inline __m256i dot_i8(__m256i w, __m256i a) {
    const __m256i aw = _mm256_abs_epi8(w), sa = _mm256_sign_epi8(a, w);
#if KT_VNNI
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), aw, sa);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sa), _mm256_set1_epi16(1));
#endif
}

// R decoded rows of W from row n: q [R][k], s [R][k / 16].
static inline void iq_decode_rows(const PackedMatrix& W, int n, int R, int8_t* q, float* s) {
    for (int r = 0; r < R; ++r)
        iqdec::decode_blocks(W.iq, W.row_q(n + r), W.k / W.iq_block, q + size_t(r) * W.k, s + size_t(r) * (W.k / 16));
}

template <int R, int T>
static inline void tile_iq(const int8_t* q, const float* s, int k, int n, const QAct& X, int m, float* Y, int ldy) {
    const int G = k / 32;
    __m256 acc[R][T];
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
    const int8_t* aq[T];
    const float* ad[T];
    for (int t = 0; t < T; ++t) {
        const int p = X.phys(m + t);
        aq[t] = X.q + size_t(p) * X.k;
        ad[t] = X.d + size_t(p) * G;
    }
    for (int g = 0; g < G; ++g) {
        __m256i a[T];
        __m256 dx[T];
        for (int t = 0; t < T; ++t) {
            a[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(aq[t] + g * 32));
            dx[t] = _mm256_broadcast_ss(ad[t] + g);
        }
        for (int r = 0; r < R; ++r) {
            const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + size_t(r) * k + g * 32));
            const __m256 sv = pair_scales(s + size_t(r) * (k / 16) + 2 * g);
            for (int t = 0; t < T; ++t)
                acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_i8(w, a[t])), _mm256_mul_ps(sv, dx[t]), acc[r][t]);
        }
    }
    for (int t = 0; t < T; ++t)
        for (int r = 0; r < R; ++r) Y[size_t(m + t) * ldy + n + r] = hsum(acc[r][t]);
}

template <int R>
static inline void iq_rows(const PackedMatrix& W, int n, const QAct& X, int M, float* Y, int ldy) {
    thread_local std::vector<int8_t> qbuf;
    thread_local std::vector<float> sbuf;
    const int k = W.k;
    if (qbuf.size() < size_t(R) * k) qbuf.resize(size_t(R) * k);
    if (sbuf.size() < size_t(R) * (k / 16)) sbuf.resize(size_t(R) * (k / 16));
    prefetch_bytes(W.row_q(n) + size_t(R) * W.row_bytes(), size_t(R) * W.row_bytes());  // the next tile's rows
    iq_decode_rows(W, n, R, qbuf.data(), sbuf.data());
    int m = 0;
    for (; m + kTileToks <= M; m += kTileToks) tile_iq<R, kTileToks>(qbuf.data(), sbuf.data(), k, n, X, m, Y, ldy);
    for (; m < M; ++m) tile_iq<R, 1>(qbuf.data(), sbuf.data(), k, n, X, m, Y, ldy);
}

static void gemm_iq(const PackedMatrix& W, int n0, int n1, const QAct& X, int M, float* Y, int ldy) {
    int n = n0;
    for (; n + kTileRows <= n1; n += kTileRows) iq_rows<kTileRows>(W, n, X, M, Y, ldy);
    for (; n < n1; ++n) iq_rows<1>(W, n, X, M, Y, ldy);
}
