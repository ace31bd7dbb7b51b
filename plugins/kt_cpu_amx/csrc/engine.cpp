#include "engine.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <stdexcept>

#include "cpu_features.h"

namespace kt {

static Isa parse_isa(const std::string& s) {
    if (s == "avx2") return Isa::Avx2;
    if (s == "avx512") return Isa::Avx512;
    if (s == "amx") return Isa::Amx;
    throw std::invalid_argument("kt_cpu_amx: unknown ISA '" + s + "' (expected avx2, avx512 or amx)");
}

Runtime::Runtime(int nthreads, const std::string& isa, bool pin) : pool_(nthreads, pin), isa_(parse_isa(isa)) {
    std::string why = isa_unavailable_reason(isa);
    if (!why.empty()) throw std::runtime_error("kt_cpu_amx: cannot use " + isa + ": " + why);
    if (isa_ == Isa::Avx2) { gemm_ = avx2::gemm_q8; quant_ = avx2::quantize_act; attend_ = avx2::attend; act_mul_ = avx2::act_mul; attend_latent_ = avx2::attend_latent; softmax_ = avx2::softmax; latent_scores_ = avx2::latent_scores; latent_weighted_ = avx2::latent_weighted; axpy_rows_ = avx2::axpy_rows; dot_rows_ = avx2::dot_rows; }
    else { gemm_ = avx512::gemm_q8; quant_ = avx512::quantize_act; attend_ = avx512::attend; act_mul_ = avx512::act_mul; i8_gemm_ = avx512::gemm_i8; i8_pack_ = avx512::pack_i8_block; i8_scratch_bytes_ = avx512::gemm_i8_scratch_bytes; attend_latent_ = avx512::attend_latent; softmax_ = avx512::softmax; latent_scores_ = avx512::latent_scores; latent_weighted_ = avx512::latent_weighted; axpy_rows_ = avx512::axpy_rows; dot_rows_ = avx512::dot_rows; }
    if (isa_ == Isa::Amx) { i8_gemm_ = amx::gemm_i8; i8_pack_ = amx::pack_i8_block; i8_scratch_bytes_ = amx::gemm_i8_scratch_bytes; }
    amx_scratch_.resize(pool_.size());
    if (const char* env = std::getenv("KT_CPU_DECODE_SPIN_US")) decode_spin_us = std::atoi(env);
}

static uint64_t now_ns() {
    return uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(
                        std::chrono::steady_clock::now().time_since_epoch()).count());
}

void Runtime::charge_open() {
    const uint64_t t = now_ns(), w = pool_.wait_ns();
    if (open_phase_ >= 0) {
        const uint64_t spent = t - open_t0_, waited = w - open_w0_;
        prof_ns_[open_phase_] += spent > waited ? spent - waited : 0;
    }
    open_t0_ = t;
    open_w0_ = w;
}

Runtime::Timed::Timed(Runtime* rt, Phase p) : rt_(rt), parent_(rt->open_phase_) {
    rt_->charge_open();
    rt_->open_phase_ = int(p);
}

Runtime::Timed::~Timed() {
    rt_->charge_open();
    rt_->open_phase_ = parent_;
}

std::vector<double> Runtime::profile() const {
    std::vector<double> out;
    for (uint64_t ns : prof_ns_) out.push_back(double(ns) * 1e-9);
    out.push_back(double(pool_.wait_ns() - wait0_) * 1e-9);
    return out;
}

void Runtime::reset_profile() {
    for (uint64_t& ns : prof_ns_) ns = 0;
    wait0_ = pool_.wait_ns();
}

std::string Runtime::isa_name() const {
    return isa_ == Isa::Avx2 ? "avx2" : isa_ == Isa::Avx512 ? "avx512" : "amx";
}

bool Runtime::use_amx(const PackedMatrix& W, int rows, int min_rows) const {
    return isa_ == Isa::Amx && rows >= min_rows && !W.iq && W.n % 32 == 0 && W.k % 32 == 0 && W.groups() <= 2048;
}

uint16_t* Runtime::amx_scratch(int thread, int k) { return amx_scratch_[thread].get<uint16_t>(size_t(32) * k); }


QAct Runtime::quantize_rows(const float* x, int M, int K) {
    act_.ensure(M, K);
    const int rows_per = std::max(1, M / (4 * threads()));
    pool_.parallel_for((M + rows_per - 1) / rows_per, [&](int t, int) {
        quant_(x, t * rows_per, std::min(M, (t + 1) * rows_per), K, K, act_);
    });
    return act_.view();
}

void Runtime::linear(const PackedMatrix& W, int M, const float* x, float* y, bool exact) {
    linger_after(M);
    const int N = W.n, K = W.k;
    const int chunk = chunk_rows(N, threads());
    const int nchunks = (N + chunk - 1) / chunk;
    if (use_amx(W, M, amx_min_rows)) {
        BAct b;
        b.k = K; b.m = M; b.m_pad = round_up(M, 32);
        uint16_t* v = bf_x_.get<uint16_t>(size_t(b.m_pad) * K);
        b.v = v;
        pool_.parallel_for(b.m_pad / 16, [&](int tb, int) { amx::to_bf16_vnni(x, K, nullptr, M, K, tb, tb + 1, v); });
        pool_.parallel_for(nchunks, [&](int c, int th) {
            int n0 = c * chunk, n1 = std::min(N, n0 + chunk);
            amx::gemm_bf16(W, n0, n1, b, y, N, amx_scratch(th, K));
        });
        return;
    }
    if (!act_residual || (M <= decode_rows && !exact)) {
        QAct a = quantize_rows(x, M, K);
        const bool tiles = M <= decode_rows && int8_tiles(W, M);
        IAct t;
        if (tiles) t = pack_i8(a, M, lin_i8_);
        pool_.parallel_for(nchunks, [&](int c, int th) {
            int n0 = c * chunk, n1 = std::min(N, n0 + chunk);
            if (tiles) i8_gemm_(W, n0, n1, t, y, N, amx_scratch_[th].get<uint8_t>(i8_scratch_bytes_(K)));
            else gemm_(W, n0, n1, a, M, y, N);
        });
        return;
    }
    QAct a = quantize_with_residual(x, M, K);
    float* y2 = res_y_.get<float>(size_t(2) * M * N);
    const bool tiles = M <= decode_rows && int8_tiles(W, 2 * M);
    IAct t;
    if (tiles) t = pack_i8(a, 2 * M, lin_i8_);
    pool_.parallel_for(nchunks, [&](int c, int th) {
        int n0 = c * chunk, n1 = std::min(N, n0 + chunk);
        if (tiles) i8_gemm_(W, n0, n1, t, y2, N, amx_scratch_[th].get<uint8_t>(i8_scratch_bytes_(K)));
        else gemm_(W, n0, n1, a, 2 * M, y2, N);
        fold_pairs(y2, M, N, n0, n1, y, N);
    });
}

bool Runtime::int8_tiles(const PackedMatrix& W, int rows) const {
    return i8_gemm_ && rows >= i8_min_rows && gemm_i8_fits(W);
}

IAct Runtime::pack_i8(const QAct& a, int rows, QActBuf& buf) {
    const int nb = (rows + 15) / 16;
    buf.ensure(nb * 16, a.k);
    IAct t;
    t.k = a.k;
    t.m = rows;
    t.q = buf.q.as<int8_t>(); t.d = buf.d.as<float>(); t.s16 = buf.s16.as<float>(); t.s32 = buf.s32.as<float>();
    pool_.parallel_for(nb, [&](int tb, int) { i8_pack_(a, rows, tb, t); });
    return t;
}

// Row 2i: x_i quantized to int8 (d, q); row 2i + 1: its rounding residual x_i - d q (at most d / 2 per element)
// quantized again. The GEMM takes both rows of a token in one register tile, so the weights are read once.
// One pass per token: row 2i is quantized where the GEMM reads it, and its residual taken from that same row.
QAct Runtime::quantize_with_residual(const float* x, int M, int K) {
    float* xr = res_x_.get<float>(size_t(2) * M * K);
    act_.ensure(2 * M, K);
    const QAct a = act_.view();
    const int G = K / 32;
    pool_.parallel_for(M, [&](int i, int) {
        const float* xi = x + size_t(i) * K;
        float* out = xr + size_t(2 * i) * K;
        std::copy(xi, xi + K, out);
        quant_(xr, 2 * i, 2 * i + 1, K, K, act_);
        const int8_t* qi = a.q + size_t(2 * i) * K;
        const float* di = a.d + size_t(2 * i) * G;
        for (int j = 0; j < K; ++j) out[K + j] = xi[j] - di[j / 32] * float(qi[j]);
        quant_(xr, 2 * i + 1, 2 * i + 2, K, K, act_);
    });
    return a;
}

void Runtime::fold_pairs(const float* y2, int M, int N, int n0, int n1, float* y, int ldy) {
    for (int m = 0; m < M; ++m) {
        const float* a = y2 + size_t(2 * m) * N;
        const float* b = a + N;
        for (int n = n0; n < n1; ++n) y[size_t(m) * ldy + n] = a[n] + b[n];
    }
}

void Runtime::linear_multi(const std::vector<const PackedMatrix*>& W, int M, const float* x,
                           const std::vector<float*>& y) {
    if (W.empty()) return;
    linger_after(M);
    const int K = W[0]->k;
    bool amx_any = false;
    for (const PackedMatrix* w : W) amx_any = amx_any || use_amx(*w, M, amx_min_rows);
    if (amx_any || W.size() == 1) {  // prefill-sized: the matrices' own phases are long enough
        for (size_t i = 0; i < W.size(); ++i) linear(*W[i], M, x, y[i]);
        return;
    }
    QAct a = quantize_rows(x, M, K);
    struct Task { int m, n0, n1; bool tiles; };
    std::vector<Task> tasks;
    bool any_tiles = false;
    for (size_t i = 0; i < W.size(); ++i) {
        const int N = W[i]->n, chunk = chunk_rows(N, threads());
        const bool tiles = M <= decode_rows && int8_tiles(*W[i], M);  // as linear() would
        any_tiles = any_tiles || tiles;
        for (int n0 = 0; n0 < N; n0 += chunk) tasks.push_back({int(i), n0, std::min(N, n0 + chunk), tiles});
    }
    IAct ta;
    if (any_tiles) ta = pack_i8(a, M, lin_i8_);
    pool_.parallel_for(int(tasks.size()), [&](int i, int th) {
        const Task& t = tasks[i];
        if (t.tiles) i8_gemm_(*W[t.m], t.n0, t.n1, ta, y[t.m], W[t.m]->n, amx_scratch_[th].get<uint8_t>(i8_scratch_bytes_(K)));
        else gemm_(*W[t.m], t.n0, t.n1, a, M, y[t.m], W[t.m]->n);
    });
}



// A decode step's few rows (the experts' 6 x 1408 of a DeepSeek-V2-Lite token: about 2 us) on the calling thread:
// a parallel phase for them cost more in its barrier than the work.
constexpr size_t kSerialQuantFloats = 32768;

void Runtime::quantize_each(const float* x, int rows, int k, const QActBuf& buf) {
    if (size_t(rows) * k <= kSerialQuantFloats) quant_(x, 0, rows, k, k, buf);
    else pool_.parallel_for(rows, [&](int i, int) { quant_(x, i, i + 1, k, k, buf); });
}

void Runtime::moe(const MoeLayer& L, int T, int K, const float* x, const int64_t* idx, const float* w, float* out,
                  MoeExtra extra) {
    linger_after(T);
    const int E = L.experts(), H = L.hidden(), I = L.inter(), TK = T * K;
    // Group the (token, slot) pairs by expert: rows of expert e are [off[e], off[e+1]) in expert order.
    std::vector<int> off(E + 1, 0), pos(TK);
    std::vector<int32_t> tok(TK);
    // An index outside [0, E) (Transformers' marker of an expert held elsewhere) contributes nothing.
    auto valid = [&](int i) { return idx[i] >= 0 && idx[i] < E; };
    for (int i = 0; i < TK; ++i)
        if (valid(i)) ++off[idx[i] + 1];
    for (int e = 0; e < E; ++e) off[e + 1] += off[e];
    {
        std::vector<int> fill(off.begin(), off.end() - 1);
        for (int i = 0; i < TK; ++i) {
            if (!valid(i)) { pos[i] = -1; continue; }
            int p = fill[idx[i]]++;
            pos[i] = p;
            tok[p] = i / K;
        }
    }
    // Experts with at least amx_min_expert_rows rows run on the int8 prefill kernel (AMX-INT8 tiles, or vpdpbusd on
    // AVX512; their rows packed per 16 tokens, IAct), the others on the integer-dot kernels; both read the same int8
    // activations.
    std::vector<int> active;
    std::vector<char> i8(E, 0);
    for (int e = 0; e < E; ++e) {
        int ne = off[e + 1] - off[e];
        if (!ne) continue;
        active.push_back(e);
        i8[e] = i8_gemm_ && ne >= amx_min_expert_rows && gemm_i8_fits(*L.gate[e]) &&
                 gemm_i8_fits(*L.up[e]) && gemm_i8_fits(*L.down[e]);
    }
    // token blocks of the AMX experts: expert e's start at block bstart[e]
    std::vector<int> bstart(E + 1, 0);
    for (int e = 0; e < E; ++e) bstart[e + 1] = bstart[e] + (i8[e] ? (off[e + 1] - off[e] + 15) / 16 : 0);
    const int nblocks = bstart[E];
    std::vector<int> block_expert(nblocks);
    for (int e = 0; e < E; ++e)
        for (int b = bstart[e]; b < bstart[e + 1]; ++b) block_expert[b] = e;
    // IAct storage of nblocks * 16 rows of k inputs in buf, and expert e's view of it
    auto iact_of = [&](QActBuf& buf, int k) {
        IAct v;
        v.k = k;
        v.q = buf.q.as<int8_t>(); v.d = buf.d.as<float>(); v.s16 = buf.s16.as<float>(); v.s32 = buf.s32.as<float>();
        return v;
    };
    auto expert_i8 = [&](const IAct& all, int e) { return all.blocks_from(bstart[e], off[e + 1] - off[e]); };
    // The AMX experts' token blocks from quantized rows X (row r of expert e at X's logical row off[e] + r).
    auto pack_blocks = [&](const QAct& X, const IAct& all) {
        pool_.parallel_for(nblocks, [&](int b, int) {
            const int e = block_expert[b];
            i8_pack_(rows_from(X, off[e]), off[e + 1] - off[e], b - bstart[e], expert_i8(all, e));
        });
    };
    auto i8_scratch = [&](int th, int k) { return amx_scratch_[th].get<uint8_t>(i8_scratch_bytes_(k)); };

    // Phase 0: int8 activations per token, then the AMX experts' blocks gathered from them.
    act_.ensure(T, H);
    quantize_each(x, T, H, act_);
    QAct xa = act_.view(tok.data());
    IAct xi;
    if (nblocks) {
        bi_x_.ensure(nblocks * 16, H);
        xi = iact_of(bi_x_, H);
        pack_blocks(xa, xi);
    }

    // Phase 1: gate and up per (expert, row chunk), then the activation into gbuf.
    float* G = gbuf_.get<float>(size_t(TK) * I);
    float* U = ubuf_.get<float>(size_t(TK) * I);
    struct Task { int e, n0, n1; };
    std::vector<Task> tasks;
    auto make_tasks = [&](int n) {
        tasks.clear();
        int chunk = 32;
        for (int e : active)
            for (int n0 = 0; n0 < n; n0 += chunk) tasks.push_back({e, n0, std::min(n, n0 + chunk)});
    };
    make_tasks(I);
    pool_.parallel_for(int(tasks.size()), [&](int i, int th) {
        const Task& t = tasks[i];
        const int ne = off[t.e + 1] - off[t.e];
        float* g = G + size_t(off[t.e]) * I;
        float* u = U + size_t(off[t.e]) * I;
        if (i8[t.e]) {
            IAct b = expert_i8(xi, t.e);
            i8_gemm_(*L.gate[t.e], t.n0, t.n1, b, g, I, i8_scratch(th, H));
            i8_gemm_(*L.up[t.e], t.n0, t.n1, b, u, I, i8_scratch(th, H));
        } else {
            QAct a = xa;
            a.rows = tok.data() + off[t.e];
            gemm_(*L.gate[t.e], t.n0, t.n1, a, ne, g, I);
            gemm_(*L.up[t.e], t.n0, t.n1, a, ne, u, I);
        }
        for (int r = 0; r < ne; ++r) act_mul_(int(L.act), g + size_t(r) * I + t.n0, u + size_t(r) * I + t.n0, t.n1 - t.n0);
    });

    // Phase 2: the intermediate as int8 rows, then the AMX experts' blocks.
    act2_.ensure(TK, I);
    const int NR = off[E];  // rows routed to a valid expert
    quantize_each(G, NR, I, act2_);
    QAct ha = act2_.view();
    IAct hi;
    if (nblocks) {
        bi_h_.ensure(nblocks * 16, I);
        hi = iact_of(bi_h_, I);
        pack_blocks(ha, hi);
    }

    // Phase 3: down per (expert, row chunk) into ybuf; the extra tasks first (guided claims: the small expert
    // chunks last, to even out the threads' ends).
    float* Y = ybuf_.get<float>(size_t(TK) * H);
    make_tasks(H);
    pool_.parallel_for(extra.tasks + int(tasks.size()), [&](int i, int th) {
        if (i < extra.tasks) {
            (*extra.fn)(i, th);
            return;
        }
        const Task& t = tasks[i - extra.tasks];
        const int ne = off[t.e + 1] - off[t.e];
        float* y = Y + size_t(off[t.e]) * H;
        if (i8[t.e]) {
            i8_gemm_(*L.down[t.e], t.n0, t.n1, expert_i8(hi, t.e), y, H, i8_scratch(th, I));
        } else {
            gemm_(*L.down[t.e], t.n0, t.n1, rows_from(ha, off[t.e]), ne, y, H);
        }
    });

    // Phase 4: weighted sum over the top-k, in slot order.
    pool_.parallel_for(T, [&](int t, int) {
        float* o = out + size_t(t) * H;
        std::fill(o, o + H, 0.f);
        for (int s = 0; s < K; ++s) {
            if (pos[t * K + s] < 0) continue;
            const float* ys = Y + size_t(pos[t * K + s]) * H;
            const float ws = w[t * K + s];
            for (int j = 0; j < H; ++j) o[j] += ws * ys[j];
        }
    });
}

}  // namespace kt
