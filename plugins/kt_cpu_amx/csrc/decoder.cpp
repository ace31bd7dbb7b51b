#include "decoder.h"

#include <cmath>
#include <cstring>
#include <numeric>
#include <stdexcept>

namespace kt {

std::string DecoderLayer::check() const {
    for (const auto* m : {&q, &k, &v, &o})
        if (!*m) return "an attention matrix is missing";
    if (!gate != !up || !gate != !down) return "the MLP needs gate, up and down";
    if (!gate && !experts) return "the layer has neither an MLP nor experts";
    const int H = hidden(), I = inter();
    if (kind == AttentionKind::Gqa) {
        if (heads <= 0 || kv_heads <= 0 || heads % kv_heads || head_dim <= 0 || head_dim % 2)
            return "bad head counts or head size";
        if (q->n != heads * head_dim || k->n != kv_heads * head_dim || v->n != kv_heads * head_dim)
            return "q/k/v sizes do not match the heads";
        if (k->k != H || v->k != H || o->k != heads * head_dim) return "the attention matrices' shapes do not chain";
        if ((!q_norm.empty() && int(q_norm.size()) != head_dim) || (!k_norm.empty() && int(k_norm.size()) != head_dim))
            return "q/k norm weights do not have the head size";
    } else {
        if (heads <= 0 || nope <= 0 || rope_dim <= 0 || rope_dim % 2 || v_dim <= 0 || rank <= 0)
            return "bad latent attention sizes";
        if (q->n != heads * (nope + rope_dim) || k->n != rank + rope_dim || k->k != H || v->n != heads * (nope + v_dim) ||
            v->k != rank || o->k != heads * v_dim)
            return "the latent attention matrices' shapes do not chain";
        if (wkt.empty() ? !axpy_rows_fits(*v) : int(wkt.size()) != heads)
            return "one absorbed key matrix per head is needed (kv_b's format cannot be read row by row)";
        for (const auto& w : wkt)
            if (!w || w->n != rank || w->k != nope) return "an absorbed key matrix is not [rank, nope]";
        if (int(kv_norm.size()) != rank) return "the latent norm does not have the rank's size";
        if (nope % 32 || rank % 32) return "nope and rank must be multiples of 32";
        if (!bq.empty() || !bk.empty() || !bv.empty()) return "latent attention projections with biases";
    }
    if (o->n != H || o->k % 32) return "o's output is not the hidden size, or its input no multiple of 32";
    if (gate && (gate->k != H || up->k != H || up->n != I || down->k != I || down->n != H))
        return "the MLP matrices' shapes do not chain";
    if (experts) {
        if (experts->hidden() != H || int(router.size()) != experts->experts() * H || top_k <= 0 ||
            top_k > experts->experts() || top_k > 64)
            return "the experts or router do not match the hidden size";
    }
    if (H % 32 || I % 32) return "hidden and intermediate sizes must be multiples of 32";
    if (int(attn_norm.size()) != H || int(mlp_norm.size()) != H) return "norm weights do not have the hidden size";
    auto bias_ok = [](const std::vector<float>& b, int n) { return b.empty() || int(b.size()) == n; };
    if (!bias_ok(bq, q->n) || !bias_ok(bk, k->n) || !bias_ok(bv, v->n) || !bias_ok(bo, H) || !bias_ok(bgate, I) ||
        !bias_ok(bup, I) || !bias_ok(bdown, H))
        return "a bias does not have its matrix's output size";
    return "";
}

// sum_i a[i] * b[i] over 16 independent partial sums: a single running sum is one dependent add per element
// (the compiler may not reorder float adds), which made the 64 x 2048 router of a DeepSeek-V2 layer cost about
// 0.15 ms of a decode step; partial sums vectorise.
static float dot(const float* a, const float* b, int n) {
    float acc[16] = {};
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; ++j) acc[j] += a[i + j] * b[i + j];
    float s = 0.f;
    for (; i < n; ++i) s += a[i] * b[i];
    for (int j = 0; j < 16; ++j) s += acc[j];
    return s;
}

// Transformers' RMSNorm: w * (x * rsqrt(mean(x^2) + eps)).
static void rms_norm(const float* x, const float* w, int n, float eps, float* out) {
    float ss = 0.f;  // one running sum, in order: the module path's norm gives the same float (tests compare closely;
    // dot's partial sums moved a DeepSeek-V2 latent cache 2.7e-4 from the module path's, past its 1e-4 bound)
    for (int i = 0; i < n; ++i) ss += x[i] * x[i];
    const float r = 1.f / std::sqrt(ss / float(n) + eps);
    for (int i = 0; i < n; ++i) out[i] = w[i] * (x[i] * r);
}

// Half-split rotary embedding in place: x * cos + rotate_half(x) * sin.
static void rope_half(float* x, const float* cos, const float* sin, int d) {
    const int h = d / 2;
    for (int i = 0; i < h; ++i) {
        const float a = x[i], b = x[i + h];
        x[i] = a * cos[i] - b * sin[i];
        x[i + h] = b * cos[i + h] + a * sin[i + h];
    }
}

// Rotary embedding as a complex product over adjacent pairs (DeepSeek-V2): cs holds (cos, sin) per pair.
static void rope_pairs(float* x, const float* cs, int d) {
    for (int i = 0; i < d / 2; ++i) {
        const float a = x[2 * i], b = x[2 * i + 1], c = cs[2 * i], s = cs[2 * i + 1];
        x[2 * i] = a * c - b * s;
        x[2 * i + 1] = a * s + b * c;
    }
}

// Row b's block table in blocks [B, width], or null (one contiguous sequence).
static const int32_t* row_table(const int32_t* blocks, int width, int b) {
    return blocks ? blocks + size_t(b) * width : nullptr;
}

static void add(float* y, const std::vector<float>& b) {
    for (size_t i = 0; i < b.size(); ++i) y[i] += b[i];
}

void Runtime::latent_attention(const DecoderLayer& L, int B, const float* q, const float* lat, size_t ldb,
                               size_t ldh, const int32_t* positions, const int32_t* blocks, int width, int block,
                               float* scores, size_t T, float* ctx) {
    const int R = L.rank, P = L.rope_dim, N = L.nope, QD = N + P, NH = L.heads;
    const size_t QN = L.q->n;
    constexpr int kCols = 32;  // latent columns per weighted-sum task
    struct Span { int b, t0, t1; };
    std::vector<Span> spans;  // positions per scores task: each row's split among the threads, at least 16 a task
    for (int b = 0; b < B; ++b) {
        const int n = positions[b] + 1, span = std::max(16, (n + threads() - 1) / threads());
        for (int t0 = 0; t0 < n; t0 += span) spans.push_back({b, t0, std::min(n, t0 + span)});
    }
    pool_.parallel_for(int(spans.size()), [&](int i, int) {
        const Span& s = spans[i];
        latent_scores_(lat + s.b * ldb, ldh, q + size_t(s.b) * QN + N, QD, NH, L.k_cache, R, R, L.v_cache, P, P,
                       row_table(blocks, width, s.b), block, s.t0, s.t1, L.scaling, scores + size_t(s.b) * NH * T,
                       T);
    });
    pool_.parallel_for(B * NH, [&](int i, int) { softmax_(scores + size_t(i) * T, positions[i / NH] + 1); });
    const int slices = R / kCols;
    pool_.parallel_for(B * slices, [&](int i, int) {
        const int b = i / slices, c0 = (i % slices) * kCols;
        latent_weighted_(scores + size_t(b) * NH * T, T, NH, L.k_cache, R, row_table(blocks, width, b), block,
                         positions[b] + 1, c0, c0 + kCols, ctx + b * ldb, ldh);
    });
}

void Runtime::gqa_attention(const DecoderLayer& L, int B, float* q, float* k, float* v, const float* cos,
                            const float* sin, const int32_t* pos, const int32_t* blocks, int width, int block,
                            float* scores, size_t ld_scores, float* att) {
    const int D = L.head_dim, group = L.heads / L.kv_heads, QN = L.q->n, KN = L.k->n;
    for (int b = 0; b < B; ++b) {
        float *kb = k + size_t(b) * KN, *vb = v + size_t(b) * KN;
        const float *cb = cos + size_t(b) * D, *sb = sin + size_t(b) * D;
        add(kb, L.bk), add(vb, L.bv);
        const size_t slot = table_slot(row_table(blocks, width, b), block, pos[b]);
        for (int h = 0; h < L.kv_heads; ++h) {
            float* kh = kb + size_t(h) * D;
            if (!L.k_norm.empty()) rms_norm(kh, L.k_norm.data(), D, L.qk_eps, kh);
            rope_half(kh, cb, sb, D);
            const size_t at = (size_t(h) * L.capacity + slot) * D;
            std::memcpy(L.k_cache + at, kh, sizeof(float) * D);
            std::memcpy(L.v_cache + at, vb + size_t(h) * D, sizeof(float) * D);
        }
    }
    // each query head's bias, norm and rotary in its own task (the keys' above: every query head of a group reads them)
    pool_.parallel_for(B * L.heads, [&](int i, int) {
        const int b = i / L.heads, h = i % L.heads;
        float* qh = q + size_t(b) * QN + size_t(h) * D;
        if (!L.bq.empty()) for (int j = 0; j < D; ++j) qh[j] += L.bq[size_t(h) * D + j];
        if (!L.q_norm.empty()) rms_norm(qh, L.q_norm.data(), D, L.qk_eps, qh);
        rope_half(qh, cos + size_t(b) * D, sin + size_t(b) * D, D);
        const size_t base = size_t(h / group) * L.capacity * D;
        attend_(qh, L.k_cache + base, L.v_cache + base,
                row_table(blocks, width, b), block, pos[b] + 1, D, D, L.scaling,
                scores + size_t(i) * ld_scores, att + size_t(b) * QN + size_t(h) * D);
    });
}

void Runtime::decoder_step(const std::vector<const DecoderLayer*>& layers, float* x, const float* cos,
                           const float* sin, int pos) {
    const int32_t p = pos;
    decoder_step_batch(layers, 1, x, cos, sin, &p, nullptr, 0, 0);
}

void Runtime::decoder_step_batch(const std::vector<const DecoderLayer*>& layers, int B, float* x, const float* cos,
                                 const float* sin, const int32_t* positions, const int32_t* blocks, int width,
                                 int block) {
    if (layers.empty() || B <= 0) return;
    if (blocks && (block <= 0 || width <= 0)) throw std::invalid_argument("kt_cpu_amx: a block table needs its widths");
    linger_after(B);
    const int H = layers[0]->hidden();
    int T = 0;  // the longest sequence's positions after this step
    for (int b = 0; b < B; ++b) {
        if (positions[b] < 0) throw std::out_of_range("kt_cpu_amx: decoder_step at a negative position");
        if (blocks && positions[b] >= width * block)
            throw std::out_of_range("kt_cpu_amx: decoder_step past a sequence's block table");
        T = std::max(T, positions[b] + 1);
        for (int i = 0; blocks && i <= positions[b] / block; ++i) {
            const int32_t id = blocks[size_t(b) * width + i];
            if (id < 0 || size_t(id + 1) * block > size_t(layers[0]->capacity))
                throw std::out_of_range("kt_cpu_amx: a block id outside the cache's pool");
        }
    }
    size_t wide = H;
    int most_inter = 0, most_heads = 0, most_route = 0;
    for (const DecoderLayer* L : layers) {
        most_inter = std::max(most_inter, L->inter());
        most_heads = std::max(most_heads, L->heads);
        if (L->experts) most_route = std::max(most_route, L->top_k + L->experts->experts());
        for (const auto& m : {L->q, L->k, L->v, L->o}) wide = std::max(wide, size_t(m->n));
        wide = std::max(wide, size_t(L->heads) * L->rank);
    }
    // per row: xn, q, k, v, att, y, lat [wide], g, u [inter], scores [heads, T], route [top_k + experts]
    const size_t row = 7 * wide + size_t(2) * most_inter + size_t(most_heads) * T + most_route;
    float* xn = dec_.get<float>(B * row + 64);
    float *q = xn + B * wide, *kv_k = q + B * wide, *kv_v = kv_k + B * wide, *att = kv_v + B * wide;
    float *y = att + B * wide, *lat = y + B * wide, *g = lat + B * wide, *u = g + size_t(B) * most_inter;
    float* scores = u + size_t(B) * most_inter;
    float* route = scores + size_t(B) * most_heads * T;  // per row: top-k weights, then probabilities

    // Activations of one linear: int8 rows, and for a batch of enough rows whose matrix the int8 tile kernel
    // takes, the same rows in its token blocks (weights unpacked once per 16 rows instead of read per 4 tokens).
    struct Act { QAct a; IAct i8; bool has_i8 = false; };
    auto quantized = [&](const float* v, int rows, int k, bool tiles) {
        Act act;
        dec_act_.ensure(rows, k);
        quant_(v, 0, rows, k, k, dec_act_);
        act.a = dec_act_.view();
        if (tiles && i8_gemm_ && rows >= i8_min_rows) {
            act.i8 = pack_i8(act.a, rows, dec_i8_);
            act.has_i8 = true;
        }
        return act;
    };
    // rows n0..n1 of w for `rows` tokens of act from token tok on, into y (row stride w->n)
    struct Task { const PackedMatrix* w; float* y; int n0, n1, tok, rows; };
    std::vector<Task> tasks;
    auto chunks = [&](const PackedMatrix* w, float* out, int tok, int rows) {
        const int chunk = chunk_rows(w->n, threads());
        for (int n0 = 0; n0 < w->n; n0 += chunk) tasks.push_back({w, out, n0, std::min(w->n, n0 + chunk), tok, rows});
    };
    auto gemm = [&](const PackedMatrix& w, int n0, int n1, const Act& act, int tok, int rows, float* out, int th) {
        if (act.has_i8 && tok == 0 && rows == act.i8.m && gemm_i8_fits(w)) {
            i8_gemm_(w, n0, n1, act.i8, out, w.n, amx_scratch_[th].get<uint8_t>(i8_scratch_bytes_(w.k)));
            return;
        }
        gemm_(w, n0, n1, rows_from(act.a, tok), rows, out, w.n);
    };
    auto run_tasks = [&](const Act& act) {
        pool_.parallel_for(int(tasks.size()), [&](int i, int th) {
            const Task& t = tasks[i];
            gemm(*t.w, t.n0, t.n1, act, t.tok, t.rows, t.y, th);
        });
        tasks.clear();
    };

    for (const DecoderLayer* Lp : layers) {
        const DecoderLayer& L = *Lp;
        if (!blocks && T > L.capacity) throw std::out_of_range("kt_cpu_amx: decoder_step past the cache's capacity");
        {
            Timed t(this, Phase::Small);
            for (int b = 0; b < B; ++b) rms_norm(x + size_t(b) * H, L.attn_norm.data(), H, L.eps, xn + size_t(b) * H);
        }
        chunks(L.q.get(), q, 0, B);
        chunks(L.k.get(), kv_k, 0, B);
        if (L.kind == AttentionKind::Gqa) {
            chunks(L.v.get(), kv_v, 0, B);
            { Timed t(this, Phase::Dense); run_tasks(quantized(xn, B, H, true)); }
            Timed t(this, Phase::Attention);
            gqa_attention(L, B, q, kv_k, kv_v, cos, sin, positions, blocks, width, block, scores, T, att);
        } else {
            const int R = L.rank, P = L.rope_dim, N = L.nope, V = L.v_dim, QD = N + P, NH = L.heads;
            const size_t QN = L.q->n, KN = L.k->n;
            { Timed t(this, Phase::Dense); run_tasks(quantized(xn, B, H, true)); }
            Timed t(this, Phase::Attention);
            // each row's latent (normalized) and rotary key, written at its position's slot
            for (int b = 0; b < B; ++b) {
                const size_t slot = table_slot(row_table(blocks, width, b), block, positions[b]);
                const float* kvb = kv_k + size_t(b) * KN;
                float* kpe = L.v_cache + slot * P;
                rms_norm(kvb, L.kv_norm.data(), R, L.kv_eps, L.k_cache + slot * R);
                std::memcpy(kpe, kvb + R, sizeof(float) * P);
                rope_pairs(kpe, cos + size_t(b) * P, P);
            }
            // row b, head h: its query at q + b * QN + h * QD (nope, then rotary part); its latent-space query in
            // lat and its attention-weighted latent in ctx (kv_v: the latent attention has no v projection)
            float* ctx = kv_v;
            auto attend_head = [&](int b, int h, const float* lq, float* out) {
                attend_latent_(lq, L.k_cache, R, R, q + size_t(b) * QN + size_t(h) * QD + N, L.v_cache, P, P,
                               row_table(blocks, width, b), block, positions[b] + 1, L.scaling,
                               scores + size_t(b * NH + h) * T, out);
            };
            const bool split = T >= latent_split_from;
            if (L.wkt.empty()) {
                // kv_b's rows read in float as they stream; one task per head does its rows of every sequence, so
                // a head's key and value rows are read once per step: rotary, q_nope to latent space (lat =
                // sum_n q_nope[n] * W_k[h][n]), attention, and back through its value rows, all in one phase
                // (three, with the attention split between them)
                auto to_latent = [&](int b, int h) {
                    float* qh = q + size_t(b) * QN + size_t(h) * QD;
                    rope_pairs(qh + N, cos + size_t(b) * P, P);
                    float* lq = lat + size_t(b * NH + h) * R;
                    std::fill(lq, lq + R, 0.f);
                    axpy_rows_(*L.v, h * (N + V), N, qh, lq);
                };
                auto from_latent = [&](int b, int h) {
                    const size_t i = size_t(b * NH + h);
                    dot_rows_(*L.v, h * (N + V) + N, V, ctx + i * R, att + i * V);
                };
                if (!split) {
                    pool_.parallel_for(NH, [&](int h, int) {
                        for (int b = 0; b < B; ++b) {
                            to_latent(b, h);
                            attend_head(b, h, lat + size_t(b * NH + h) * R, ctx + size_t(b * NH + h) * R);
                            from_latent(b, h);
                        }
                    });
                } else {
                    pool_.parallel_for(NH, [&](int h, int) { for (int b = 0; b < B; ++b) to_latent(b, h); });
                    latent_attention(L, B, q, lat, size_t(NH) * R, R, positions, blocks, width, block, scores, T, ctx);
                    pool_.parallel_for(NH, [&](int h, int) { for (int b = 0; b < B; ++b) from_latent(b, h); });
                }
            } else {
                // int8 products through W_k[h] transposed (wkt[h]) and kv_b's value rows: per head, its B rows
                // as consecutive tokens (head-major order, j = h * B + b)
                for (int b = 0; b < B; ++b)
                    for (int h = 0; h < NH; ++h) {
                        float* qh = q + size_t(b) * QN + size_t(h) * QD;
                        rope_pairs(qh + N, cos + size_t(b) * P, P);
                        std::memcpy(kv_v + size_t(h * B + b) * N, qh, sizeof(float) * N);
                    }
                for (int h = 0; h < NH; ++h) chunks(L.wkt[h].get(), lat + size_t(h) * B * R, h * B, B);
                run_tasks(quantized(kv_v, NH * B, N, false));  // copied out: ctx may take kv_v now
                if (split)
                    latent_attention(L, B, q, lat, R, size_t(B) * R, positions, blocks, width, block, scores, T, ctx);
                else
                    pool_.parallel_for(NH * B, [&](int j, int) {
                        attend_head(j % B, j / B, lat + size_t(j) * R, ctx + size_t(j) * R);
                    });
                const Act a = quantized(ctx, NH * B, R, false);
                for (int h = 0; h < NH; ++h) {
                    const int r0 = h * (N + V) + N, chunk = chunk_rows(V, threads());
                    for (int n0 = r0; n0 < r0 + V; n0 += chunk)
                        tasks.push_back({L.v.get(), y, n0, std::min(r0 + V, n0 + chunk), h * B, B});
                }
                run_tasks(a);
                for (int h = 0; h < NH; ++h)  // head h's tokens land in rows 0..B of its own columns
                    for (int b = 0; b < B; ++b)
                        std::memcpy(att + size_t(b * NH + h) * V, y + size_t(b) * L.v->n + size_t(h) * (N + V) + N,
                                    sizeof(float) * V);
            }
        }
        {
            Timed t(this, Phase::Dense);
            chunks(L.o.get(), y, 0, B);
            run_tasks(quantized(att, B, L.o->k, true));
        }
        Timed small(this, Phase::Small);
        for (int b = 0; b < B; ++b) {
            float *yb = y + size_t(b) * H, *xb = x + size_t(b) * H;
            add(yb, L.bo);
            for (int i = 0; i < H; ++i) xb[i] += yb[i];
            rms_norm(xb, L.mlp_norm.data(), H, L.eps, xn + size_t(b) * H);
        }

        // MLP: routed experts (DeepSeek-V2 greedy routing) and / or a gated MLP (the shared experts). The router's
        // rows and the MLP's gate/up chunks read the same xn: one parallel phase (a router phase of its own cost a
        // barrier for a product smaller than the MLP's chunks); the experts next, then the MLP's down, and the two
        // outputs added to x in that order.
        const int I = L.inter(), E = L.experts ? L.experts->experts() : 0, K = L.top_k;
        constexpr int kRouterRows = 4;  // router rows per task, for every row of the batch
        const int router_tasks = (E + kRouterRows - 1) / kRouterRows;
        auto prob_of = [&](int b) { return route + size_t(b) * most_route + K; };
        Act mlp_in;
        if (L.gate) {
            Timed t(this, Phase::Dense);
            mlp_in = quantized(xn, B, H, true);
            const int chunk = chunk_rows(I, threads());
            for (int n0 = 0; n0 < I; n0 += chunk) tasks.push_back({nullptr, nullptr, n0, std::min(I, n0 + chunk), 0, B});
        }
        {
            Timed t(this, L.gate ? Phase::Dense : Phase::Small);  // the router's share is small beside the MLP's
            const int mlp_tasks = int(tasks.size());
            pool_.parallel_for(mlp_tasks + router_tasks, [&](int i, int th) {
                if (i >= mlp_tasks) {
                    const int e0 = (i - mlp_tasks) * kRouterRows, e1 = std::min(E, e0 + kRouterRows);
                    for (int b = 0; b < B; ++b)
                        for (int e = e0; e < e1; ++e)
                            prob_of(b)[e] = dot(L.router.data() + size_t(e) * H, xn + size_t(b) * H, H);
                    return;
                }
                const int n0 = tasks[i].n0, n1 = tasks[i].n1;
                gemm(*L.gate, n0, n1, mlp_in, 0, B, g, th);
                gemm(*L.up, n0, n1, mlp_in, 0, B, u, th);
                for (int b = 0; b < B; ++b) {
                    float *gb = g + size_t(b) * I, *ub = u + size_t(b) * I;
                    if (!L.bgate.empty()) for (int j = n0; j < n1; ++j) gb[j] += L.bgate[j];
                    if (!L.bup.empty()) for (int j = n0; j < n1; ++j) ub[j] += L.bup[j];
                    act_mul_(int(L.act), gb + n0, ub + n0, n1 - n0);  // the vectorized exp, as the experts use
                }
            });
            tasks.clear();
        }
        float* ye = lat;  // the experts' output (lat is free after attention)
        Act down_in;
        if (L.gate) {  // the MLP's down: with experts, in their down projection's phase (its time then counts there)
            Timed t(this, Phase::Dense);
            chunks(L.down.get(), y, 0, B);
            down_in = quantized(g, B, I, true);
            if (!L.experts) run_tasks(down_in);
        }
        if (L.experts) {
            std::vector<int64_t> idx(size_t(B) * K);
            std::vector<float> weights(size_t(B) * K);
            std::vector<int> order(E);
            for (int b = 0; b < B; ++b) {
                float* prob = prob_of(b);
                float mx = -INFINITY;
                for (int e = 0; e < E; ++e) mx = std::max(mx, prob[e]);
                float sum = 0.f;
                for (int e = 0; e < E; ++e) sum += (prob[e] = std::exp(prob[e] - mx));
                for (int e = 0; e < E; ++e) prob[e] /= sum;
                std::iota(order.begin(), order.end(), 0);
                std::partial_sort(order.begin(), order.begin() + K, order.end(),
                                  [&](int a, int c) { return prob[a] > prob[c] || (prob[a] == prob[c] && a < c); });
                for (int s = 0; s < K; ++s) {
                    idx[size_t(b) * K + s] = order[s];
                    weights[size_t(b) * K + s] = prob[order[s]] * L.routed_scale;
                }
            }
            Timed t(this, Phase::Experts);
            const std::function<void(int, int)> down = [&](int i, int th) {
                const Task& d = tasks[i];
                gemm(*d.w, d.n0, d.n1, down_in, d.tok, d.rows, d.y, th);
            };
            moe(*L.experts, B, K, xn, idx.data(), weights.data(), ye, MoeExtra{int(tasks.size()), &down});
            tasks.clear();
            linger_after(B);
        }
        if (L.experts)
            for (size_t i = 0; i < size_t(B) * H; ++i) x[i] += ye[i];
        if (L.gate)
            for (int b = 0; b < B; ++b) {
                float *yb = y + size_t(b) * H, *xb = x + size_t(b) * H;
                add(yb, L.bdown);
                for (int i = 0; i < H; ++i) xb[i] += yb[i];
            }
    }
}

}  // namespace kt
