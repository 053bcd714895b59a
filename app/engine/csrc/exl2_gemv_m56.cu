// Instantiations of the EXL2 gemv for 5, 6 row(s) of x; see exl2_kernels.cuh.

#include "exl2_kernels.cuh"

namespace kestrel {
KESTREL_INSTANTIATE_GEMV(5)
KESTREL_INSTANTIATE_GEMV(6)
}  // namespace kestrel
