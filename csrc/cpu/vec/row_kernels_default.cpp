// Portable build of the row kernels (see row_kernels_impl.h).
#define CPU_CAPABILITY DEFAULT
#include "cpu/vec/row_kernels_impl.h"
