// AVX512-VNNI kernels (compiled with -mavx512f -mavx512bw -mavx512vl -mavx512vnni): vpdpbusd on ymm.
#define KT_NS avx512
#include "kernels_impl.h"
