#include "cpu_features.h"

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "kernels.h"

namespace kt {

// Linux grants AMX tile data state only on request (per process); compiled without AMX flags on purpose.
bool amx::request_permission() {
    constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

static CpuFeatures detect() {
    CpuFeatures f;
    __builtin_cpu_init();
    f.avx2 = __builtin_cpu_supports("avx2");
    f.fma = __builtin_cpu_supports("fma");
    f.avx512f = __builtin_cpu_supports("avx512f");
    f.avx512bw = __builtin_cpu_supports("avx512bw");
    f.avx512vl = __builtin_cpu_supports("avx512vl");
    f.avx512vnni = __builtin_cpu_supports("avx512vnni");
    unsigned a, b, c, d;
    if (__get_cpuid(1, &a, &b, &c, &d)) f.f16c = (c >> 29) & 1;
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
        f.amx_bf16 = (d >> 22) & 1;
        f.amx_tile = (d >> 24) & 1;
        f.amx_int8 = (d >> 25) & 1;
    }
    if (__get_cpuid_count(7, 1, &a, &b, &c, &d)) f.avx512bf16 = (a >> 5) & 1;
    // AVX512 state must also be enabled by the OS (XCR0 bits 5-7); __builtin_cpu_supports checks that.
    if (!f.avx512f) f.avx512bf16 = f.amx_tile = f.amx_bf16 = f.amx_int8 = false;
    if (f.amx_tile && f.amx_bf16) f.amx_permitted = amx::request_permission();
    return f;
}

const CpuFeatures& cpu_features() {
    static const CpuFeatures f = detect();
    return f;
}

std::string isa_unavailable_reason(const std::string& isa) {
    const CpuFeatures& f = cpu_features();
    if (isa == "avx2") {
        if (!f.avx2 || !f.fma || !f.f16c) return "this CPU has no AVX2+FMA+F16C";
        return "";
    }
    if (isa == "avx512") {
        if (!(f.avx512f && f.avx512bw && f.avx512vl)) return "this CPU has no AVX512 F/BW/VL";
        if (!f.avx512vnni) return "this CPU has no AVX512-VNNI";
        return "";
    }
    if (isa == "amx") {
        if (!f.amx_tile || !f.amx_bf16) return "this CPU has no AMX-BF16 tiles";
        if (!f.amx_int8) return "this CPU has AMX-BF16 but no AMX-INT8 tiles";
        if (!f.avx512bf16) return "this CPU has AMX but no AVX512-BF16";
        if (!f.amx_permitted) return "the kernel refused AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM)";
        std::string r = isa_unavailable_reason("avx512");
        return r.empty() ? "" : "AMX path needs AVX512 for decode too: " + r;
    }
    return "unknown ISA '" + isa + "' (expected avx2, avx512 or amx)";
}

}  // namespace kt
