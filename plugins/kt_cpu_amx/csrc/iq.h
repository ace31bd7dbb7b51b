// The i-quants (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ4_XS), MXFP4, IQ4_NL and TQ2_0 kept as
// their GGUF blocks: a PackedMatrix with iq set holds the raw blocks (256 weights each, MXFP4's and IQ4_NL's 32) in
// qs, row after row, and nothing else. The kernels (kernels_iq.h) expand one block at a time into int8 values and a
// float scale per 16 weights: weight j = scale[j / 16] * q[j], bit for bit gguf-py's float (iq_decode.h says why).
// The lattice grids, sign table and value tables are ktcore's (gguf-py's), handed over once by the Python side
// (set_iq_table).
#pragma once
#include <cstdint>
#include <string>

#include "common.h"

namespace kt {

enum IqType : int { IQ_NONE = 0, IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ4_XS, MXFP4, IQ4_NL, TQ2_0,
                    IQ_COUNT };

struct IqInfo { const char* name; int type_size, block; };  // block: weights per block (256 or 32)
extern const IqInfo kIqInfo[IQ_COUNT];  // by IqType; [0] unused

// IqType of a GGML type name, IQ_NONE for others.
int iq_type_for(const std::string& ggml_type);

// The lookup tables, as the decoders read them: lattice points as int8 bytes (IQ1_S's as 8 * point +- 1, so that
// point + delta with delta = +-1/8 is that integer over 8), sign masks as 0xFF bytes.
struct IqTables {
    uint64_t g2xxs[256], g2xs[512], g2s[1024];
    uint64_t g1s[4096];  // index | delta sign << 11: 8 * point + 1 (delta +1/8) or - 1 (delta -1/8)
    uint32_t g3xxs[256], g3s[512];
    uint64_t ksign_mask[128];  // ggml's ksigns_iq2xs entry i (7 sign bits + parity) as a byte mask
    uint64_t sign_mask[256];   // byte b's 8 bits as a byte mask
    int8_t k4nl[16];           // IQ4_NL / IQ4_XS values
    int8_t kmxfp4[16];         // MXFP4's e2m1 values, doubled (integers)
    bool ready[9] = {};        // per table name set (set_iq_table's order)
};
extern IqTables iq_tables;

// Install one table from the Python side: name one of IQ1_S, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S (lattice
// points as int8, n_points x point_len), ksigns (128 bytes), IQ4_NL or MXFP4 (16 int8 values).
void set_iq_table(const std::string& name, const int8_t* data, size_t count);
// Empty when every table type t reads is installed, else which is missing.
std::string iq_tables_missing(int type);

// One block of type t into q[block] and scale[block / 16] (portable build; the kernels compile their own copy).
void iq_decode_block(int type, const uint8_t* block, int8_t* q, float* scale);

// n rows of k weights (k a multiple of the block) of raw blocks: out keeps a copy of the bytes.
void pack_iq(PackedMatrix& out, int type, const uint8_t* raw, int n, int k);
// The matrix's weights as float [n, k].
void unpack_iq(const PackedMatrix& m, float* out);

}  // namespace kt
