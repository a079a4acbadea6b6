// The CPU kernels compiled for: AVX-512 (F/BW/VL/DQ) + FMA + F16C.  See kernels_impl.h for the rules.
// Headers first (outside any target pragma), then the pragmas, then the kernels in their own namespace.
#include <cstdint>
#include <cstdlib>

#include "cpu_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#pragma GCC optimize("fp-contract=off")
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#define CAMBRIAN_ISA_AVX512 1
#define CAMBRIAN_ISA_NAME "avx512"

namespace cambrian::cpu::isa_avx512 {
#include "kernels_impl.h"
}  // namespace cambrian::cpu::isa_avx512

#pragma GCC reset_options

namespace cambrian::cpu {
const KernelTable* table_avx512() { return &isa_avx512::kTable; }
}  // namespace cambrian::cpu

#else  // not x86: this variant is the baseline build

namespace cambrian::cpu {
const KernelTable* table_avx512() { return table_base(); }
}  // namespace cambrian::cpu

#endif
