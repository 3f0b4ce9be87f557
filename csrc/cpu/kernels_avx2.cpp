// Row kernels compiled for AVX2 + FMA (x86-64-v3), chosen at run time when the CPU has them.
// Every header is included before the target pragma, so only the functions of row_kernels.h (in
// their own namespace) are compiled for AVX2; nothing shared with other files is.
#include "kernels.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define ATOM_FAST_ISA isa_avx2
#define ATOM_FAST_POW8 1  // row_kernels.h: the AVX2 intrinsics of the float32 general power
#include "row_kernels.h"
#pragma GCC pop_options

namespace atom_fast {
namespace cpu {
namespace isa_avx2 {
RowKernels<float> row_kernels_float(int s, int c) { return make_table<float>(s, c, PowerSequence{}); }
RowKernels<double> row_kernels_double(int s, int c) { return make_table<double>(s, c, PowerSequence{}); }
}  // namespace isa_avx2
}  // namespace cpu
}  // namespace atom_fast
#else
// Not x86-64 with GCC/Clang: the AVX2 table is the baseline one.
namespace atom_fast {
namespace cpu {
namespace isa_avx2 {
RowKernels<float> row_kernels_float(int s, int c) { return isa_default::row_kernels_float(s, c); }
RowKernels<double> row_kernels_double(int s, int c) { return isa_default::row_kernels_double(s, c); }
}  // namespace isa_avx2
}  // namespace cpu
}  // namespace atom_fast
#endif
