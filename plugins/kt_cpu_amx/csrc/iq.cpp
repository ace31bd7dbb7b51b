#include "iq.h"

#include <cstring>
#include <stdexcept>

#include "iq_decode.h"

namespace kt {

const IqInfo kIqInfo[IQ_COUNT] = {
    {"", 0, 0},           {"IQ1_S", 50, 256},   {"IQ1_M", 56, 256},  {"IQ2_XXS", 66, 256}, {"IQ2_XS", 74, 256},
    {"IQ2_S", 82, 256},   {"IQ3_XXS", 98, 256}, {"IQ3_S", 110, 256}, {"IQ4_XS", 136, 256}, {"MXFP4", 17, 32},
    {"IQ4_NL", 18, 32},   {"TQ2_0", 66, 256},
};

IqTables iq_tables;

// set_iq_table's names, in IqTables::ready order, with the lattice's point count and length (0: not a lattice)
struct TableSpec { const char* name; int points, len; };
static constexpr int kNumTables = 9;
static const TableSpec kTables[kNumTables] = {
    {"IQ1_S", 2048, 8}, {"IQ2_XXS", 256, 8}, {"IQ2_XS", 512, 8}, {"IQ2_S", 1024, 8}, {"IQ3_XXS", 256, 4},
    {"IQ3_S", 512, 4},  {"ksigns", 128, 1},  {"IQ4_NL", 16, 1},  {"MXFP4", 16, 1},
};

static uint64_t byte_mask(int bits) {
    uint64_t m = 0;
    for (int i = 0; i < 8; ++i)
        if (bits >> i & 1) m |= uint64_t(0xFF) << (8 * i);
    return m;
}

void set_iq_table(const std::string& name, const int8_t* data, size_t count) {
    int t = 0;
    while (t < kNumTables && name != kTables[t].name) ++t;
    if (t == kNumTables) throw std::invalid_argument("kt_cpu_amx: unknown i-quant table '" + name + "'");
    const TableSpec& spec = kTables[t];
    if (count != size_t(spec.points) * spec.len)
        throw std::invalid_argument("kt_cpu_amx: i-quant table " + name + " has " + std::to_string(count) +
                                    " values, expected " + std::to_string(spec.points * spec.len));
    IqTables& T = iq_tables;
    auto points8 = [&](uint64_t* out, int scale, int add) {
        for (int p = 0; p < spec.points; ++p) {
            uint64_t v = 0;
            for (int j = 0; j < 8; ++j) v |= uint64_t(uint8_t(int8_t(data[p * 8 + j] * scale + add))) << (8 * j);
            out[p] = v;
        }
    };
    auto points4 = [&](uint32_t* out) {
        for (int p = 0; p < spec.points; ++p) {
            uint32_t v = 0;
            for (int j = 0; j < 4; ++j) v |= uint32_t(uint8_t(data[p * 4 + j])) << (8 * j);
            out[p] = v;
        }
    };
    switch (t) {
        case 0: points8(T.g1s, 8, 1); points8(T.g1s + 2048, 8, -1); break;
        case 1: points8(T.g2xxs, 1, 0); break;
        case 2: points8(T.g2xs, 1, 0); break;
        case 3: points8(T.g2s, 1, 0); break;
        case 4: points4(T.g3xxs); break;
        case 5: points4(T.g3s); break;
        case 6: for (int i = 0; i < 128; ++i) T.ksign_mask[i] = byte_mask(uint8_t(data[i])); break;
        case 7: std::memcpy(T.k4nl, data, 16); break;
        case 8: std::memcpy(T.kmxfp4, data, 16); break;
    }
    for (int b = 0; b < 256; ++b) T.sign_mask[b] = byte_mask(b);
    T.ready[t] = true;
}

std::string iq_tables_missing(int type) {
    auto need = [&](int t) { return iq_tables.ready[t] ? std::string() : std::string(kTables[t].name); };
    switch (type) {
        case IQ1_S: case IQ1_M: return need(0);
        case IQ2_XXS: return need(1) + need(6);
        case IQ2_XS: return need(2) + need(6);
        case IQ2_S: return need(3);
        case IQ3_XXS: return need(4) + need(6);
        case IQ3_S: return need(5);
        case IQ4_XS: case IQ4_NL: return need(7);
        case MXFP4: return need(8);
        case TQ2_0: return "";
        default: return "(not an i-quant)";
    }
}

int iq_type_for(const std::string& ggml_type) {
    for (int t = 1; t < IQ_COUNT; ++t)
        if (ggml_type == kIqInfo[t].name) return t;
    return IQ_NONE;
}

static void check_ready(int type) {
    if (type <= IQ_NONE || type >= IQ_COUNT) throw std::invalid_argument("kt_cpu_amx: not an i-quant type id");
    const std::string missing = iq_tables_missing(type);
    if (!missing.empty())
        throw std::runtime_error(std::string("kt_cpu_amx: ") + kIqInfo[type].name + " needs the lookup table " + missing +
                                 " (set_iq_table; kt_cpu_amx.runtime.kernels() installs them)");
}

void iq_decode_block(int type, const uint8_t* block, int8_t* q, float* scale) {
    check_ready(type);
    iqdec::decode(type, block, q, scale);
}

void pack_iq(PackedMatrix& out, int type, const uint8_t* raw, int n, int k) {
    check_ready(type);
    const int block = kIqInfo[type].block;
    if (k % block || k % 32)
        throw std::invalid_argument("kt_cpu_amx: row length " + std::to_string(k) + " is not a multiple of " +
                                    kIqInfo[type].name + "'s block of " + std::to_string(block));
    out = PackedMatrix();
    // group 16 and zero point 128: how the int8 prefill kernels see the decoded values (kernels_i8.h's unpack_a)
    out.n = n; out.k = k; out.bits = 0; out.group = 16; out.zero_point = 128;
    out.iq = type;
    out.iq_block_bytes = kIqInfo[type].type_size;
    out.iq_block = block;
    out.qs = Buffer(size_t(n) * out.row_bytes(), true);
    std::memcpy(out.qs.ptr, raw, out.qs.bytes);
}

void unpack_iq(const PackedMatrix& m, float* out) {
    int8_t q[256];
    float s[16];
    const int B = m.iq_block;
    for (int r = 0; r < m.n; ++r)
        for (int b = 0; b < m.k / B; ++b) {
            iq_decode_block(m.iq, m.row_q(r) + size_t(b) * m.iq_block_bytes, q, s);
            float* y = out + size_t(r) * m.k + size_t(b) * B;
            for (int j = 0; j < B; ++j) y[j] = s[j / 16] * float(q[j]);
        }
}

}  // namespace kt
