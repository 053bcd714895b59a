// Instantiations of the EXL2 gemv for 3, 4 row(s) of x; see exl2_kernels.cuh.

#include "exl2_kernels.cuh"

namespace kestrel {
KESTREL_INSTANTIATE_GEMV(3)
KESTREL_INSTANTIATE_GEMV(4)
}  // namespace kestrel
