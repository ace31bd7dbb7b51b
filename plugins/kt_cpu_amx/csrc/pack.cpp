#include "pack.h"

#include "iq.h"
#include "pool.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string_view>
#include <vector>

#include <sys/mman.h>

#ifdef KT_HAVE_NUMA
#include <numa.h>
#endif

namespace kt {

// ---------------------------------------------------------------------------------------------- memory

// Weight buffers live on 2 MiB pages (MADV_HUGEPAGE; with the kernel's THP "madvise" defrag it compacts memory to
// find them): decode streams every routed expert's matrices once per token, and on 4 KiB pages the page walks
// held a 16-core Xeon at a third of its read bandwidth once another process had fragmented memory. Buffers of
// at least 4 MiB get their own pages; smaller ones (an expert's matrices are 1-2 MiB, their scales a few KiB)
// are cut from shared slabs of 64 MiB, in allocation order, so a layer's experts also sit together. A slab is
// freed when its last buffer is.
struct Slab {
    char* base;
    size_t size, used = 0;
    int live = 0;
};

namespace {
constexpr size_t kHuge = size_t(2) << 20, kSlabBytes = size_t(64) << 20;
std::mutex slab_mu;
Slab* open_slab = nullptr;  // where the next small weight buffer is cut from

void* huge_pages(size_t n) {
    void* p = std::aligned_alloc(kHuge, n);
    if (p) madvise(p, n, MADV_HUGEPAGE);
    return p;
}

void* slab_alloc(size_t n, Slab*& from) {
    n = (n + 63) / 64 * 64;
    std::lock_guard<std::mutex> lock(slab_mu);
    if (!open_slab || open_slab->used + n > open_slab->size) {
        if (open_slab && open_slab->live == 0) {
            std::free(open_slab->base);
            delete open_slab;
        }
        open_slab = nullptr;
        void* base = huge_pages(kSlabBytes);
        if (!base) return nullptr;
        open_slab = new Slab{static_cast<char*>(base), kSlabBytes};
    }
    from = open_slab;
    ++from->live;
    void* p = from->base + from->used;
    from->used += n;
    return p;
}

void slab_free(Slab* from) {
    std::lock_guard<std::mutex> lock(slab_mu);
    if (--from->live) return;
    if (from == open_slab) {  // empty: reuse it from the start
        from->used = 0;
        return;
    }
    std::free(from->base);
    delete from;
}
}  // namespace

Buffer::Buffer(size_t n, bool weights) : bytes(n) {
    if (n == 0) return;
#ifdef KT_HAVE_NUMA
    if (weights && numa_available() >= 0 && numa_num_configured_nodes() > 1) {
        ptr = numa_alloc_interleaved(n);
        numa = ptr != nullptr;
    }
#endif
    if (!ptr && weights) ptr = n >= (size_t(4) << 20) ? huge_pages((n + kHuge - 1) / kHuge * kHuge) : slab_alloc(n, slab);
    if (!ptr) ptr = std::aligned_alloc(64, (n + 63) / 64 * 64);
    if (!ptr) throw std::bad_alloc();
}

Buffer::~Buffer() {
    if (!ptr) return;
#ifdef KT_HAVE_NUMA
    if (numa) { numa_free(ptr, bytes); return; }
#endif
    if (slab) { slab_free(slab); return; }
    std::free(ptr);
}

Buffer& Buffer::operator=(Buffer&& o) noexcept {
    if (this != &o) {
        this->~Buffer();
        ptr = o.ptr; bytes = o.bytes; numa = o.numa; slab = o.slab;
        o.ptr = nullptr; o.bytes = 0; o.slab = nullptr;
    }
    return *this;
}

void QActBuf::ensure(int m_, int k_) {
    size_t need_q = size_t(m_) * k_;
    if (need_q > q.bytes) {  // d, s16 and s32 follow q's capacity, whatever k
        size_t cap = std::max(need_q, q.bytes);
        q = Buffer(cap);
        d = Buffer(cap / 32 * sizeof(float) + 64);
        s16 = Buffer(cap / 16 * sizeof(float) + 64);
        s32 = Buffer(cap / 32 * sizeof(float) + 64);
    }
    k = k_;
    m = m_;
}

QAct QActBuf::view(const int32_t* rows) const {
    QAct a;
    a.k = k; a.q = q.as<int8_t>(); a.d = d.as<float>(); a.s16 = s16.as<float>(); a.s32 = s32.as<float>();
    a.rows = rows;
    return a;
}

// ---------------------------------------------------------------------------------------------- halves

uint32_t fp16_to_fp32_bits(uint16_t h) {
    uint32_t sign = uint32_t(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    if (exp == 0x1f) return sign | 0x7f800000u | (man << 13);
    if (exp == 0) {
        if (man == 0) return sign;
        int e = -1;  // normalize the subnormal
        do { man <<= 1; ++e; } while (!(man & 0x400));
        return sign | uint32_t(127 - 15 - e) << 23 | ((man & 0x3ff) << 13);
    }
    return sign | (exp + 112) << 23 | (man << 13);
}

float fp16_to_fp32(uint16_t h) {
    uint32_t b = fp16_to_fp32_bits(h);
    float f;
    std::memcpy(&f, &b, 4);
    return f;
}

bool fp32_to_fp16_exact(float f, uint16_t& h) {
    uint32_t b;
    std::memcpy(&b, &f, 4);
    uint16_t sign = uint16_t((b >> 16) & 0x8000);
    int exp = int((b >> 23) & 0xff);
    uint32_t man = b & 0x7fffff;
    if (exp == 0 && man == 0) { h = sign; return true; }
    if (exp == 0 || exp == 0xff) return false;  // fp32 subnormals, inf, nan
    int e = exp - 127;
    if (e > 15 || e < -24) return false;
    if (e >= -14) {
        if (man & 0x1fff) return false;
        h = uint16_t(sign | ((e + 15) << 10) | (man >> 13));
        return true;
    }
    int shift = -(e + 1);  // fp16 subnormal: value = m * 2^-24
    uint32_t full = 0x800000u | man;
    if (full & ((1u << shift) - 1)) return false;
    h = uint16_t(sign | (full >> shift));
    return true;
}

float PackedMatrix::scale_at(int r, int g) const {
    if (iq) throw std::invalid_argument("kt_cpu_amx: an i-quant matrix has no group scales (unpack it)");
    if (sub8_scales) return two_level_scale(row_s<uint8_t>(r), row_sup_s(r), 8, g);
    if (sub16_scales) return two_level_scale(row_s<int8_t>(r), row_sup_s(r), 16, g);
    return half_scales ? fp16_to_fp32(row_s<uint16_t>(r)[g]) : row_s<float>(r)[g];
}

float PackedMatrix::min_at(int r, int g) const {
    if (iq) throw std::invalid_argument("kt_cpu_amx: an i-quant matrix has no group mins (unpack it)");
    if (zero_point) return -float(zero_point) * scale_at(r, g);
    if (sub8_scales) return two_level_scale(row_m<uint8_t>(r), row_sup_m(r), 8, g);
    if (sub16_scales) return two_level_scale(row_m<int8_t>(r), row_sup_m(r), 16, g);
    return half_scales ? fp16_to_fp32(row_m<uint16_t>(r)[g]) : row_m<float>(r)[g];
}

// 8-bit groups of 16 whose pairs share their scale and min (Q5_0, Q5_1, Q8_0: one per GGUF block of 32) become
// groups of 32: half the scales and mins to stream.
static void maybe_pair_groups(PackedMatrix& m) {
    if (m.bits != 8 || m.group != 16 || m.groups() % 2) return;
    const size_t pairs = size_t(m.n) * m.groups() / 2;
    const uint32_t* sb = m.scales.as<uint32_t>();  // bits: -0 and +0 stay apart
    const uint32_t* mb = m.mins.as<uint32_t>();
    for (size_t i = 0; i < pairs; ++i)
        if (sb[2 * i] != sb[2 * i + 1] || mb[2 * i] != mb[2 * i + 1]) return;
    Buffer s(pairs * sizeof(float), true), mn(pairs * sizeof(float), true);
    for (size_t i = 0; i < pairs; ++i) {
        s.as<uint32_t>()[i] = sb[2 * i];
        mn.as<uint32_t>()[i] = mb[2 * i];
    }
    m.scales = std::move(s);
    m.mins = std::move(mn);
    m.group = 32;
}

// Drop the mins when every one is -zp * scale for one zero point zp (the type's, e.g. 128 for Q8_0). zp is a
// power of two, so the kernels' -zp * sum_g(scale * asum) is the stored mins' sum_g(min * asum) bit for bit.
static void maybe_zero_point(PackedMatrix& m) {
    size_t count = size_t(m.n) * m.groups();
    const float* sf = m.scales.as<float>();
    const float* mf = m.mins.as<float>();
    float zp = 0.f;
    for (size_t i = 0; i < count && zp == 0.f; ++i)
        if (sf[i] != 0.f) zp = -mf[i] / sf[i];
    if (!(zp >= 1.f && zp <= 128.f) || zp != float(int(zp)) || (int(zp) & (int(zp) - 1))) return;
    for (size_t i = 0; i < count; ++i)
        if (mf[i] != -zp * sf[i]) return;
    m.mins = Buffer();
    m.zero_point = int(zp);
}

// Store scales and mins (if any) as fp16 when that loses nothing.
static void maybe_halve(PackedMatrix& m) {
    size_t count = size_t(m.n) * m.groups();
    const bool has_mins = m.zero_point == 0;
    Buffer s(count * 2, true), mn(has_mins ? count * 2 : 0, true);
    const float* sf = m.scales.as<float>();
    const float* mf = m.mins.as<float>();
    for (size_t i = 0; i < count; ++i)
        if (!fp32_to_fp16_exact(sf[i], s.as<uint16_t>()[i]) ||
            (has_mins && !fp32_to_fp16_exact(mf[i], mn.as<uint16_t>()[i])))
            return;
    m.scales = std::move(s);
    m.mins = std::move(mn);
    m.half_scales = true;
}

static inline float rd_half(const uint8_t* p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return fp16_to_fp32(h);
}

// fn(r0, r1) over slices of rows [0, n) of about kSlice elements, spread over `pool` (a runtime's: its workers claim
// slices until none is left, and one the scheduler holds back on a busy machine does not hold up the call, as
// threads started per matrix did). Rows are packed independently, so the bytes do not depend on the split. No
// pool, or a matrix of one slice: the calling thread alone.
template <class F>
static void parallel_rows(int n, size_t row_elems, Pool* pool, const F& fn) {
    constexpr size_t kSlice = size_t(1) << 16;
    const int rows = int(std::max<size_t>(1, kSlice / std::max<size_t>(row_elems, 1)));
    const int slices = (n + rows - 1) / rows;
    if (!pool || pool->size() <= 1 || slices < 2) return fn(0, n);
    std::mutex mu;
    std::exception_ptr error;
    pool->run([&] {
        pool->parallel_for(slices, [&](int s, int) {
            try {
                fn(s * rows, std::min(n, (s + 1) * rows));
            } catch (...) {  // a worker must not throw: the first error is rethrown on the caller's thread
                std::lock_guard<std::mutex> lock(mu);
                if (!error) error = std::current_exception();
            }
        });
    });
    if (error) std::rethrow_exception(error);
}

// ---------------------------------------------------------------------------------------------- GGUF

// One decoded group: unsigned values and the affine map w = scale * q + min.
struct Group { uint8_t q[32]; float scale, min; };

// The 6-bit scales and mins of the 8 sub-blocks of a Q4_K / Q5_K super-block from its 12 packed bytes s
// (llama.cpp's get_scale_min_k4): the one reader for decoding and for both sub-scale packers.
static void scales_mins_k4(const uint8_t* s, uint8_t sc[8], uint8_t m[8]) {
    for (int j = 0; j < 8; ++j) {
        if (j < 4) {
            sc[j] = s[j] & 63;
            m[j] = s[j + 4] & 63;
        } else {
            sc[j] = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
            m[j] = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        }
    }
}

struct TypeInfo { const char* name; int block, type_size, bits, group; };
static const TypeInfo kTypes[] = {
    {"Q4_0", 32, 18, 4, 32},  {"Q4_1", 32, 20, 4, 32},  {"Q4_K", 256, 144, 4, 32},
    {"Q5_0", 32, 22, 8, 16},  {"Q5_1", 32, 24, 8, 16},  {"Q5_K", 256, 176, 8, 16},
    {"Q6_K", 256, 210, 8, 16}, {"Q8_0", 32, 34, 8, 16},
};

static const TypeInfo* find_type(const std::string& t) {
    for (const auto& ti : kTypes)
        if (t == ti.name) return &ti;
    return nullptr;
}

int exact_bits_for(const std::string& t) {
    const TypeInfo* ti = find_type(t);
    return ti ? ti->bits : 0;
}

// Decode one GGUF block into groups of `ti.group` elements. Returns the number of groups.
static int decode_block(const TypeInfo& ti, const uint8_t* b, Group* g) {
    const std::string_view name = ti.name;  // called per block: no string built (Gemma 3's head: 5M blocks)
    if (name == "Q4_0") {
        float d = rd_half(b);
        for (int j = 0; j < 16; ++j) { g[0].q[j] = b[2 + j] & 0xF; g[0].q[j + 16] = b[2 + j] >> 4; }
        g[0].scale = d; g[0].min = -8.f * d;
        return 1;
    }
    if (name == "Q4_1") {
        float d = rd_half(b), m = rd_half(b + 2);
        for (int j = 0; j < 16; ++j) { g[0].q[j] = b[4 + j] & 0xF; g[0].q[j + 16] = b[4 + j] >> 4; }
        g[0].scale = d; g[0].min = m;
        return 1;
    }
    if (name == "Q8_0") {
        float d = rd_half(b);
        for (int h = 0; h < 2; ++h) {
            for (int j = 0; j < 16; ++j) g[h].q[j] = uint8_t(int(int8_t(b[2 + h * 16 + j])) + 128);
            g[h].scale = d; g[h].min = -128.f * d;
        }
        return 2;
    }
    if (name == "Q5_0" || name == "Q5_1") {
        bool q51 = name == "Q5_1";
        float d = rd_half(b), m = q51 ? rd_half(b + 2) : -16.f * d;
        const uint8_t* qhp = b + (q51 ? 4 : 2);
        uint32_t qh;
        std::memcpy(&qh, qhp, 4);
        const uint8_t* qs = qhp + 4;
        uint8_t v[32];
        for (int j = 0; j < 16; ++j) {
            v[j] = (qs[j] & 0xF) | (((qh >> j) & 1) << 4);
            v[j + 16] = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
        }
        for (int h = 0; h < 2; ++h) {
            std::memcpy(g[h].q, v + 16 * h, 16);
            g[h].scale = d; g[h].min = m;
        }
        return 2;
    }
    if (name == "Q4_K" || name == "Q5_K") {
        bool q5 = name == "Q5_K";
        float d = rd_half(b), dmin = rd_half(b + 2);
        const uint8_t* sc = b + 4;
        const uint8_t* qh = b + 16;
        const uint8_t* qs = b + (q5 ? 48 : 16);
        uint8_t sc6[8], m6[8];
        scales_mins_k4(sc, sc6, m6);
        int ng = 0;
        for (int j = 0; j < 4; ++j) {          // 64 elements: sub-blocks 2j (low nibbles), 2j+1 (high)
            for (int half = 0; half < 2; ++half) {
                const int sub = 2 * j + half, s = sc6[sub], m = m6[sub];
                uint8_t v[32];
                for (int l = 0; l < 32; ++l) {
                    uint8_t x = half ? qs[32 * j + l] >> 4 : qs[32 * j + l] & 0xF;
                    if (q5 && (qh[l] >> sub & 1)) x += 16;
                    v[l] = x;
                }
                float scale = d * float(s), mn = -(dmin * float(m));
                if (!q5) {
                    std::memcpy(g[ng].q, v, 32);
                    g[ng].scale = scale; g[ng].min = mn; ++ng;
                } else {
                    for (int h = 0; h < 2; ++h) {
                        std::memcpy(g[ng].q, v + 16 * h, 16);
                        g[ng].scale = scale; g[ng].min = mn; ++ng;
                    }
                }
            }
        }
        return ng;
    }
    if (name == "Q6_K") {
        const uint8_t* ql = b;
        const uint8_t* qh = b + 128;
        const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
        float d = rd_half(b + 208);
        uint8_t v[256];
        for (int n = 0; n < 2; ++n) {          // two halves of 128 elements
            const uint8_t* l8 = ql + 64 * n;
            const uint8_t* h8 = qh + 32 * n;
            uint8_t* y = v + 128 * n;
            for (int l = 0; l < 32; ++l) {
                y[l] = (l8[l] & 0xF) | ((h8[l] & 3) << 4);
                y[l + 32] = (l8[l + 32] & 0xF) | (((h8[l] >> 2) & 3) << 4);
                y[l + 64] = (l8[l] >> 4) | (((h8[l] >> 4) & 3) << 4);
                y[l + 96] = (l8[l + 32] >> 4) | (((h8[l] >> 6) & 3) << 4);
            }
        }
        for (int i = 0; i < 16; ++i) {         // one scale per 16 elements
            std::memcpy(g[i].q, v + 16 * i, 16);
            float s = d * float(sc[i]);
            g[i].scale = s; g[i].min = -32.f * s;
        }
        return 16;
    }
    throw std::invalid_argument("kt_cpu_amx: no repacking for GGML type " + std::string(name));
}

static void alloc_matrix(PackedMatrix& out, int n, int k, int bits) {
    int group = bits == 4 ? 32 : 16;
    if (k % group) throw std::invalid_argument("kt_cpu_amx: row length " + std::to_string(k) +
                                               " is not a multiple of " + std::to_string(group));
    out.n = n; out.k = k; out.bits = bits; out.group = group; out.zero_point = 0;
    out.half_scales = false; out.sub8_scales = false; out.sub16_scales = false;
    out.qs = Buffer(size_t(n) * out.row_bytes(), true);
    out.scales = Buffer(size_t(n) * (k / group) * sizeof(float), true);
    out.mins = Buffer(size_t(n) * (k / group) * sizeof(float), true);
}

static void store_group(PackedMatrix& out, int r, int gi, const Group& g) {
    float* s = out.scales.as<float>() + size_t(r) * out.groups() + gi;
    float* m = out.mins.as<float>() + size_t(r) * out.groups() + gi;
    *s = g.scale; *m = g.min;
    uint8_t* q = out.qs.as<uint8_t>() + size_t(r) * out.row_bytes();
    if (out.bits == 4) {
        q += size_t(gi) * 16;
        for (int j = 0; j < 16; ++j) q[j] = uint8_t(g.q[j] | (g.q[j + 16] << 4));
    } else {
        std::memcpy(q + size_t(gi) * 16, g.q, 16);
    }
}

// Q4_K with its sub-scales kept: the nibbles as decode_block lays them out, sc / m as uint8 and, per super-block,
// d and -dmin as floats (the decoded scale d * sc and min -(dmin * m) are the same float products).
static void pack_q4k_sub8(PackedMatrix& out, const TypeInfo& ti, const uint8_t* raw, int n, int k, Pool* pool) {
    alloc_matrix(out, n, k, 4);
    const int G = out.groups(), nb = k / ti.block;
    out.scales = Buffer(size_t(n) * G, true);
    out.mins = Buffer(size_t(n) * G, true);
    out.sup_scales = Buffer(size_t(n) * nb * sizeof(float), true);
    out.sup_mins = Buffer(size_t(n) * nb * sizeof(float), true);
    out.sub8_scales = true;
    parallel_rows(n, size_t(k), pool, [&](int r0, int r1) {
        Group g[16];
        for (int r = r0; r < r1; ++r) {
            const uint8_t* row = raw + size_t(r) * nb * ti.type_size;
            uint8_t* sc = out.scales.as<uint8_t>() + size_t(r) * G;
            uint8_t* mn = out.mins.as<uint8_t>() + size_t(r) * G;
            float* ss = out.sup_scales.as<float>() + size_t(r) * nb;
            float* sm = out.sup_mins.as<float>() + size_t(r) * nb;
            uint8_t* q = out.qs.as<uint8_t>() + size_t(r) * out.row_bytes();
            for (int b = 0; b < nb; ++b) {
                const uint8_t* blk = row + size_t(b) * ti.type_size;
                decode_block(ti, blk, g);
                ss[b] = rd_half(blk);
                sm[b] = -rd_half(blk + 2);
                scales_mins_k4(blk + 4, sc + 8 * b, mn + 8 * b);
                for (int j = 0; j < 8; ++j) {
                    uint8_t* qg = q + size_t(8 * b + j) * 16;
                    for (int l = 0; l < 16; ++l) qg[l] = uint8_t(g[j].q[l] | (g[j].q[l + 16] << 4));
                }
            }
        }
    });
}

// Q5_K and Q6_K with their sub-scales kept: the quants as decode_block lays them out (groups of 16), the
// sub-scales (Q5_K: 6-bit sc and m, one per two groups; Q6_K: int8 sc) as int8 and, per super-block, d (and
// Q5_K's -dmin) as floats: the decoded scale d * sc (and min -(dmin * m)) are the same float products. Q6_K's
// min is -32 * scale: zero point 32, no mins.
static void pack_k8_sub16(PackedMatrix& out, const TypeInfo& ti, const uint8_t* raw, int n, int k, Pool* pool) {
    const bool q6 = std::string(ti.name) == "Q6_K";
    alloc_matrix(out, n, k, 8);
    const int G = out.groups(), nb = k / ti.block;
    out.scales = Buffer(size_t(n) * G, true);
    out.mins = Buffer(q6 ? 0 : size_t(n) * G, true);
    out.sup_scales = Buffer(size_t(n) * nb * sizeof(float), true);
    out.sup_mins = Buffer(q6 ? 0 : size_t(n) * nb * sizeof(float), true);
    out.sub16_scales = true;
    out.zero_point = q6 ? 32 : 0;
    parallel_rows(n, size_t(k), pool, [&](int r0, int r1) {
        Group g[16];
        for (int r = r0; r < r1; ++r) {
            const uint8_t* row = raw + size_t(r) * nb * ti.type_size;
            int8_t* sc = out.scales.as<int8_t>() + size_t(r) * G;
            int8_t* mn = q6 ? nullptr : out.mins.as<int8_t>() + size_t(r) * G;
            float* ss = out.sup_scales.as<float>() + size_t(r) * nb;
            float* sm = q6 ? nullptr : out.sup_mins.as<float>() + size_t(r) * nb;
            uint8_t* q = out.qs.as<uint8_t>() + size_t(r) * out.row_bytes();
            for (int b = 0; b < nb; ++b) {
                const uint8_t* blk = row + size_t(b) * ti.type_size;
                decode_block(ti, blk, g);
                if (q6) {
                    ss[b] = rd_half(blk + 208);
                    std::memcpy(sc + 16 * b, blk + 192, 16);
                } else {
                    ss[b] = rd_half(blk);
                    sm[b] = -rd_half(blk + 2);
                    uint8_t s6[8], m6[8];
                    scales_mins_k4(blk + 4, s6, m6);
                    for (int j = 0; j < 8; ++j) {  // one 6-bit pair per two groups of 16
                        sc[16 * b + 2 * j] = sc[16 * b + 2 * j + 1] = int8_t(s6[j]);
                        mn[16 * b + 2 * j] = mn[16 * b + 2 * j + 1] = int8_t(m6[j]);
                    }
                }
                for (int j = 0; j < 16; ++j) std::memcpy(q + size_t(16 * b + j) * 16, g[j].q, 16);
            }
        }
    });
}

void pack_gguf(PackedMatrix& out, const std::string& type, const uint8_t* raw, int n, int k, Pool* pool) {
    if (const int iq = iq_type_for(type)) return pack_iq(out, iq, raw, n, k);
    const TypeInfo* ti = find_type(type);
    if (!ti) throw std::invalid_argument("kt_cpu_amx: GGML type " + type + " has no exact repacking");
    if (k % ti->block)
        throw std::invalid_argument("kt_cpu_amx: row length " + std::to_string(k) + " is not a multiple of " +
                                    type + "'s block of " + std::to_string(ti->block));
    if (type == "Q4_K") return pack_q4k_sub8(out, *ti, raw, n, k, pool);
    if (type == "Q5_K" || type == "Q6_K") return pack_k8_sub16(out, *ti, raw, n, k, pool);
    alloc_matrix(out, n, k, ti->bits);
    const int nb = k / ti->block;
    parallel_rows(n, size_t(k), pool, [&](int r0, int r1) {
        Group g[16];
        for (int r = r0; r < r1; ++r) {
            const uint8_t* row = raw + size_t(r) * nb * ti->type_size;
            int gi = 0;
            for (int b = 0; b < nb; ++b) {
                int ng = decode_block(*ti, row + size_t(b) * ti->type_size, g);
                for (int i = 0; i < ng; ++i) store_group(out, r, gi++, g[i]);
            }
        }
    });
    maybe_pair_groups(out);
    maybe_zero_point(out);
    maybe_halve(out);
}

void pack_float(PackedMatrix& out, const float* w, int n, int k, int bits, Pool* pool) {
    if (bits != 4 && bits != 8) throw std::invalid_argument("kt_cpu_amx: online quantization takes 4 or 8 bits");
    alloc_matrix(out, n, k, bits);
    const int gs = out.group;
    parallel_rows(n, size_t(k), pool, [&](int r0, int r1) {
        Group g;
        for (int r = r0; r < r1; ++r) {
            const float* x = w + size_t(r) * k;
            for (int gi = 0; gi < k / gs; ++gi) {
                const float* v = x + gi * gs;
                if (bits == 8) {            // symmetric int8, stored with +128
                    float amax = 0.f;
                    for (int j = 0; j < gs; ++j) amax = std::max(amax, std::fabs(v[j]));
                    float d = amax / 127.f, id = d > 0 ? 1.f / d : 0.f;
                    for (int j = 0; j < gs; ++j) g.q[j] = uint8_t(int(std::nearbyint(v[j] * id)) + 128);
                    g.scale = d; g.min = -128.f * d;
                } else {                    // asymmetric int4
                    float lo = v[0], hi = v[0];
                    for (int j = 1; j < gs; ++j) { lo = std::min(lo, v[j]); hi = std::max(hi, v[j]); }
                    float d = (hi - lo) / 15.f, id = d > 0 ? 1.f / d : 0.f;
                    for (int j = 0; j < gs; ++j)
                        g.q[j] = uint8_t(std::clamp(int(std::nearbyint((v[j] - lo) * id)), 0, 15));
                    g.scale = d; g.min = lo;
                }
                store_group(out, r, gi, g);
            }
        }
    });
    maybe_zero_point(out);
}

void unpack_to_float(const PackedMatrix& m, float* out) {
    if (m.iq) return unpack_iq(m, out);
    for (int r = 0; r < m.n; ++r) {
        const uint8_t* q = m.row_q(r);
        float* y = out + size_t(r) * m.k;
        for (int gi = 0; gi < m.groups(); ++gi) {
            float s = m.scale_at(r, gi), mn = m.min_at(r, gi);
            for (int j = 0; j < m.group; ++j) {
                int v = m.bits == 4 ? (j < 16 ? q[gi * 16 + j] & 0xF : q[gi * 16 + j - 16] >> 4)
                                    : q[gi * m.group + j];
                y[gi * m.group + j] = s * float(v) + mn;
            }
        }
    }
}

}  // namespace kt
