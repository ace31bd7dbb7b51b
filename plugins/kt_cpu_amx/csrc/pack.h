// Repacking GGUF blocks and float weights into PackedMatrix.
#pragma once
#include <string>

#include "common.h"

namespace kt {

class Pool;

// GGML types that map onto the layout without losing information, and the bits they map to (0: unknown).
int exact_bits_for(const std::string& ggml_type);

// Repack `n` rows of `k` elements of raw GGUF blocks of `ggml_type` (one of the exact types, or an i-quant: iq.h,
// kept as its blocks). With a pool (a runtime's), its threads share the rows (the bytes do not depend on it).
void pack_gguf(PackedMatrix& out, const std::string& ggml_type, const uint8_t* raw, int n, int k, Pool* pool = nullptr);

// Quantize float weights [n, k] to bits 8 (symmetric groups of 16) or 4 (asymmetric groups of 32), rows over
// the pool's threads if given.
void pack_float(PackedMatrix& out, const float* w, int n, int k, int bits, Pool* pool = nullptr);

// Expand to float [n, k] (tests, and the AMX path's reference).
void unpack_to_float(const PackedMatrix& m, float* out);

}  // namespace kt
