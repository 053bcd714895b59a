// Instantiations of the EXL2 gemv for 7, 8 row(s) of x; see exl2_kernels.cuh.

#include "exl2_kernels.cuh"

namespace kestrel {
KESTREL_INSTANTIATE_GEMV(7)
KESTREL_INSTANTIATE_GEMV(8)
}  // namespace kestrel
