// Portable build of the row kernels (see loss_rows_impl.h).
#define CPU_CAPABILITY DEFAULT
#include "cpu/vec/loss_rows_impl.h"
