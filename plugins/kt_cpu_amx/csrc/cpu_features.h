#pragma once
#include <string>

namespace kt {

struct CpuFeatures {
    bool avx2 = false, fma = false, f16c = false;
    bool avx512f = false, avx512bw = false, avx512vl = false, avx512vnni = false, avx512bf16 = false;
    bool amx_tile = false, amx_int8 = false, amx_bf16 = false;
    bool amx_permitted = false;  // the kernel granted AMX tile state (arch_prctl)
};

const CpuFeatures& cpu_features();
// Why `isa` ("avx2", "avx512", "amx") cannot run here, or "" when it can.
std::string isa_unavailable_reason(const std::string& isa);

}  // namespace kt
