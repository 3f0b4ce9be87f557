// Row kernels for the baseline x86-64 (SSE2) instruction set, or any other architecture.
#include "kernels.h"

#define ATOM_FAST_ISA isa_default
#include "row_kernels.h"

namespace atom_fast {
namespace cpu {
namespace isa_default {
RowKernels<float> row_kernels_float(int s, int c) { return make_table<float>(s, c, PowerSequence{}); }
RowKernels<double> row_kernels_double(int s, int c) { return make_table<double>(s, c, PowerSequence{}); }
}  // namespace isa_default
}  // namespace cpu
}  // namespace atom_fast
