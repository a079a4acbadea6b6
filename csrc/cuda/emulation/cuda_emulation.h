// Host emulation of the small CUDA subset used by csrc/cuda/cuda_kernels.cu, so tests can run those
// exact kernels on a CPU (no GPU on the development machines).  Not part of any build of the package.
//
// Model: a launch runs its blocks one after another; each warp is 32 std::threads that meet at a
// barrier for every warp collective (__shfl_xor_sync, __any_sync), so warp-synchronous code behaves as
// on a GPU.  Blocks are capped at kMaxBlocks: the kernels use grid-stride loops, which this also
// exercises.  Half / bfloat16 convert with round-to-nearest-even like the device intrinsics, and the
// explicitly rounded intrinsics (__fmul_rn, ...) are plain operations (compile with -ffp-contract=off).
//
// The fake cuda_runtime.h / cuda_fp16.h / ... next to this file forward here; put this directory first
// on the include path and define nothing else.
#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

using std::max;
using std::min;

// ---- 16-bit floats ----------------------------------------------------------------------------------
struct __half {
  _Float16 v;
};
inline float __half2float(__half h) { return static_cast<float>(h.v); }
inline __half __float2half_rn(float f) { return {static_cast<_Float16>(f)}; }

struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return {static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return {static_cast<uint16_t>(u >> 16)};
}

// ---- explicitly rounded arithmetic --------------------------------------------------------------
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }

// ---- warps ----------------------------------------------------------------------------------------
namespace cuda_emu {

constexpr unsigned kMaxBlocks = 3;

struct Warp {
  std::barrier<> sync{32};
  double slots[32];
};
inline thread_local Warp* tl_warp = nullptr;
inline thread_local unsigned tl_lane = 0;

// Every lane publishes a value, then reads; the second barrier keeps slots stable until all have read.
template <typename T, typename Read>
T exchange(T x, Read read) {
  Warp* w = tl_warp;
  w->slots[tl_lane] = static_cast<double>(x);  // exact for float, double, int and bool
  w->sync.arrive_and_wait();
  const T y = read(w->slots, tl_lane);
  w->sync.arrive_and_wait();
  return y;
}

template <typename Kernel>
struct Launch {
  Kernel kernel;
  dim3 grid, block;
  Launch(Kernel k, dim3 g, dim3 b) : kernel(k), grid(g), block(b) {}

  template <typename... Args>
  void operator()(const Args&... args) const {
    gridDim = dim3(std::min(grid.x, kMaxBlocks), grid.y, grid.z);
    blockDim = block;
    const unsigned threads = block.x * block.y * block.z;
    for (unsigned b = 0; b < gridDim.x; ++b) {
      for (unsigned warp = 0; warp * 32 < threads; ++warp) {  // no block-level sync in these kernels
        Warp w;
        std::vector<std::thread> lanes;
        for (unsigned lane = 0; lane < 32; ++lane) {
          lanes.emplace_back([&, b, warp, lane] {
            const unsigned t = warp * 32 + lane;
            tl_warp = &w;
            tl_lane = lane;
            threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            blockIdx = dim3(b, 0, 0);
            kernel(args...);
          });
        }
        for (auto& th : lanes) th.join();
      }
    }
  }
};

}  // namespace cuda_emu

template <typename T>
T __shfl_xor_sync(unsigned /*mask*/, T x, int offset) {
  return cuda_emu::exchange(x, [offset](const double* s, unsigned lane) { return static_cast<T>(s[lane ^ offset]); });
}

inline bool __any_sync(unsigned /*mask*/, bool pred) {
  return cuda_emu::exchange(pred, [](const double* s, unsigned) {
    bool any = false;
    for (int i = 0; i < 32; ++i) any = any || s[i] != 0.0;
    return any;
  });
}

#define CAMBRIAN_CUDA_LAUNCH(kernel, grid, block, stream) ::cuda_emu::Launch(kernel, grid, block)
