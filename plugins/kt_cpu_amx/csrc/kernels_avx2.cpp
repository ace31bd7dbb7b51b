// AVX2 + FMA kernels (compiled with -mavx2 -mfma -mf16c).
#define KT_NS avx2
#include "kernels_impl.h"
