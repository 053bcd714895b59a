// Instantiations of the EXL2 gemv for 2 row(s) of x; see exl2_kernels.cuh.

#include "exl2_kernels.cuh"

namespace kestrel {
KESTREL_INSTANTIATE_GEMV(2)
}  // namespace kestrel
