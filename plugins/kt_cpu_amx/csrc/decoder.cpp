#include "decoder.h"

#include <cmath>
#include <cstring>

namespace kt {

std::string DecoderLayer::check() const {
    for (const auto* m : {&q, &k, &v, &o, &gate, &up, &down})
        if (!*m) return "a matrix is missing";
    const int H = hidden(), I = inter();
    if (heads <= 0 || kv_heads <= 0 || heads % kv_heads || head_dim <= 0 || head_dim % 2)
        return "bad head counts or head size";
    if (q->n != heads * head_dim || k->n != kv_heads * head_dim || v->n != kv_heads * head_dim)
        return "q/k/v sizes do not match the heads";
    if (k->k != H || v->k != H || o->n != H || o->k != heads * head_dim || gate->k != H || up->k != H ||
        up->n != I || down->k != I || down->n != H)
        return "the matrices' shapes do not chain";
    if (H % 32 || I % 32 || o->k % 32) return "hidden, intermediate and heads x head size must be multiples of 32";
    if (int(attn_norm.size()) != H || int(mlp_norm.size()) != H) return "norm weights do not have the hidden size";
    if ((!q_norm.empty() && int(q_norm.size()) != head_dim) || (!k_norm.empty() && int(k_norm.size()) != head_dim))
        return "q/k norm weights do not have the head size";
    auto bias_ok = [](const std::vector<float>& b, int n) { return b.empty() || int(b.size()) == n; };
    if (!bias_ok(bq, q->n) || !bias_ok(bk, k->n) || !bias_ok(bv, v->n) || !bias_ok(bo, H) || !bias_ok(bgate, I) ||
        !bias_ok(bup, I) || !bias_ok(bdown, H))
        return "a bias does not have its matrix's output size";
    return "";
}

// Transformers' RMSNorm: w * (x * rsqrt(mean(x^2) + eps)).
static void rms_norm(const float* x, const float* w, int n, float eps, float* out) {
    float ss = 0.f;
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

static void add(float* y, const std::vector<float>& b) {
    for (size_t i = 0; i < b.size(); ++i) y[i] += b[i];
}

void Runtime::decoder_step(const std::vector<const DecoderLayer*>& layers, float* x, const float* cos,
                           const float* sin, int pos) {
    if (layers.empty()) return;
    linger_after(1);
    const int H = layers[0]->hidden(), T = pos + 1;
    size_t need = 0;
    int most_inter = 0, most_heads = 0, most_q = 0;
    for (const DecoderLayer* L : layers) {
        most_inter = std::max(most_inter, L->inter());
        most_heads = std::max(most_heads, L->heads);
        most_q = std::max(most_q, L->q->n);
    }
    // xn, q, k, v, att, y [hidden or q size], g, u [inter], scores [heads, T]
    const int wide = std::max(H, most_q);
    need = size_t(6) * wide + size_t(2) * most_inter + size_t(most_heads) * T;
    float* xn = dec_.get<float>(need);
    float *q = xn + wide, *kv_k = q + wide, *kv_v = kv_k + wide, *att = kv_v + wide, *y = att + wide;
    float *g = y + wide, *u = g + most_inter, *scores = u + most_inter;

    struct Task { const PackedMatrix* w; float* y; int n0, n1; };
    std::vector<Task> tasks;
    // y_i = xq @ W_i.T for the listed matrices, their row chunks in one parallel phase
    auto gemms = [&](std::initializer_list<std::pair<const PackedMatrix*, float*>> mats, const QAct& a) {
        tasks.clear();
        for (auto [w, out] : mats) {
            const int chunk = chunk_rows(w->n, threads());
            for (int n0 = 0; n0 < w->n; n0 += chunk) tasks.push_back({w, out, n0, std::min(w->n, n0 + chunk)});
        }
        pool_.parallel_for(int(tasks.size()), [&](int i, int) {
            const Task& t = tasks[i];
            gemm_(*t.w, t.n0, t.n1, a, 1, t.y, t.w->n);
        });
    };
    auto quantized = [&](const float* v, int k) {
        dec_act_.ensure(1, k);
        quant_(v, 0, 1, k, k, dec_act_);
        return dec_act_.view();
    };

    for (const DecoderLayer* Lp : layers) {
        const DecoderLayer& L = *Lp;
        const int D = L.head_dim, I = L.inter(), group = L.heads / L.kv_heads;
        if (pos >= L.capacity) throw std::out_of_range("kt_cpu_amx: decoder_step past the cache's capacity");

        // attention
        rms_norm(x, L.attn_norm.data(), H, L.eps, xn);
        gemms({{L.q.get(), q}, {L.k.get(), kv_k}, {L.v.get(), kv_v}}, quantized(xn, H));
        add(q, L.bq), add(kv_k, L.bk), add(kv_v, L.bv);
        for (int h = 0; h < L.heads; ++h) {
            float* qh = q + size_t(h) * D;
            if (!L.q_norm.empty()) rms_norm(qh, L.q_norm.data(), D, L.qk_eps, qh);
            rope_half(qh, cos, sin, D);
        }
        for (int h = 0; h < L.kv_heads; ++h) {
            float* kh = kv_k + size_t(h) * D;
            if (!L.k_norm.empty()) rms_norm(kh, L.k_norm.data(), D, L.qk_eps, kh);
            rope_half(kh, cos, sin, D);
            const size_t at = (size_t(h) * L.capacity + pos) * D;
            std::memcpy(L.k_cache + at, kh, sizeof(float) * D);
            std::memcpy(L.v_cache + at, kv_v + size_t(h) * D, sizeof(float) * D);
        }
        pool_.parallel_for(L.heads, [&](int h, int) {
            const size_t base = size_t(h / group) * L.capacity * D;
            attend_(q + size_t(h) * D, L.k_cache + base, L.v_cache + base, T, D, D, L.scaling, scores + size_t(h) * T,
                    att + size_t(h) * D);
        });
        gemms({{L.o.get(), y}}, quantized(att, L.heads * D));
        add(y, L.bo);
        for (int i = 0; i < H; ++i) x[i] += y[i];

        // gated MLP
        rms_norm(x, L.mlp_norm.data(), H, L.eps, xn);
        const QAct a = quantized(xn, H);
        tasks.clear();
        const int chunk = chunk_rows(I, threads());
        for (int n0 = 0; n0 < I; n0 += chunk) tasks.push_back({nullptr, nullptr, n0, std::min(I, n0 + chunk)});
        pool_.parallel_for(int(tasks.size()), [&](int i, int) {
            const int n0 = tasks[i].n0, n1 = tasks[i].n1;
            gemm_(*L.gate, n0, n1, a, 1, g, I);
            gemm_(*L.up, n0, n1, a, 1, u, I);
            for (int j = n0; j < n1; ++j) {
                const float gj = L.bgate.empty() ? g[j] : g[j] + L.bgate[j];
                const float uj = L.bup.empty() ? u[j] : u[j] + L.bup[j];
                g[j] = activate(L.act, gj) * uj;
            }
        });
        gemms({{L.down.get(), y}}, quantized(g, I));
        add(y, L.bdown);
        for (int i = 0; i < H; ++i) x[i] += y[i];
    }
}

}  // namespace kt
