// The CPU kernels compiled for the baseline target (x86-64: SSE2; ATen-exact fused multiply-adds then go
// through libm's fmaf, correct but slow).  Any CPU can run it.  See kernels_impl.h for the rules.
#include <cstdint>
#include <cstdlib>

#include "cpu_kernels.h"

#pragma GCC optimize("fp-contract=off")
#define CAMBRIAN_ISA_NAME "base"

namespace cambrian::cpu::isa_base {
#include "kernels_impl.h"
}  // namespace cambrian::cpu::isa_base

#pragma GCC reset_options

namespace cambrian::cpu {
const KernelTable* table_base() { return &isa_base::kTable; }
}  // namespace cambrian::cpu
