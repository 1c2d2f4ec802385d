// Every row kernel of one capability: included once by each csrc/cpu/vec/row_kernels_<cap>.cpp, which
// first sets CPU_CAPABILITY (and the matching GCC target). at::vec's types live in an inline namespace
// named after the capability, so the copies never collide.
#include "cpu/vec/dense_rows_impl.h"
#include "cpu/vec/loss_rows_impl.h"
#include "cpu/vec/distill_rows_impl.h"  // after loss_rows_impl.h, whose helpers it uses

namespace fastadapt::cpu::CPU_CAPABILITY {

RowKernels make_row_kernels() {
  return RowKernels{loss_fns<float>(), loss_fns<double>(), dense_fns<float>(), dense_fns<double>(),
                    dense_fns<c10::BFloat16>(), distill_fns<float>(), distill_fns<double>()};
}

}  // namespace fastadapt::cpu::CPU_CAPABILITY
