// Instantiations of the EXL2 gemv for 1 row(s) of x; see exl2_kernels.cuh.

#include "exl2_kernels.cuh"

namespace kestrel {
KESTREL_INSTANTIATE_GEMV(1)
}  // namespace kestrel
