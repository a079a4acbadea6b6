// CUDA kernels of cambrian's fused ops: parameter blocks and launchers (no torch in here).
//
// Kept free of torch headers so this file and cuda_kernels.cu compile in seconds; the thin binding
// (cuda_ops.cu) turns torch tensors into these parameter blocks and registers the CUDA impls of the
// `cambrian::` ops.  Element strides throughout; every launcher takes the stream to run on.
//
// Numbers: float32 accumulation for float/half/bfloat16 storage, float64 for double, results
// rounded once to the storage type -- the contract of cambrian.kernels.reference.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace cambrian::cuda {

// Storage dtypes (same order as the CPU backend's table).
enum DType : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

constexpr int kMaxTowers = 8;       // towers per attention call (the released models use 4)
constexpr int kMaxHeadDim = 256;    // head_dim limit: 8 elements per lane of a 32-lane warp

// One grid of multi_tower_interpolate, forward: (B, h*w, C) -> channels [0, C) of a (B, H*W, .) slice.
struct InterpForwardParams {
  const void* x;             // strides (x_sb, x_st, x_sc)
  int64_t x_sb, x_st, x_sc;
  void* out;                 // channel 0 of this grid inside the output; channel stride 1
  int64_t o_sb, o_st;
  int64_t B, h, w, C, H, W;
};

// One grid, backward (gather: every input element sums the output cells whose taps touch it).
struct InterpBackwardParams {
  const void* g;             // gradient of the output at channel 0 of this grid; channel stride 1
  int64_t g_sb, g_st;
  void* gx;                  // (B, h*w, C) contiguous
  int64_t B, h, w, C, H, W;
};

// sva_window_attention.  q / out / gout / gq are contiguous (B, h, w, D), D = heads * head_dim;
// k[t], v[t], gk[t], gv[t] contiguous (B, n_t, n_t, D) with n_t = s * r[t].
struct WindowAttentionParams {
  int64_t B, h, w, D, heads, head_dim, s;
  int T;
  int64_t r[kMaxTowers];
  const void* q;
  const void* k[kMaxTowers];
  const void* v[kMaxTowers];
  const int64_t* offsets;    // (B, 2) (row0, col0) of the query grid inside the s x s window grid, or null
  const int64_t* rects;      // (T, B, 4) valid [row0, row1, col0, col1) per tower and image, or null
  const uint8_t* masks[kMaxTowers];  // tower t's (n_t, n_t) bool bytes of image 0, or null (rects or nothing);
  int64_t mask_sb;                   // image stride of the masks (all towers share one (B, sum n_t^2) tensor)
  double scale;
  void* out;                 // forward output
  void* lse;                 // (B*h*w, heads) log-sum-exp of the scaled logits: float (double for kF64)
  // backward
  const void* gout;
  void* gq;
  void* gk[kMaxTowers];      // keys no query reads must be zeroed by the caller
  void* gv[kMaxTowers];
};

// Launchers: return the launch's cudaError_t (cudaSuccess when there was nothing to do).
cudaError_t interp_forward(const InterpForwardParams& p, DType dtype, cudaStream_t stream);
cudaError_t interp_backward(const InterpBackwardParams& p, DType dtype, cudaStream_t stream);
cudaError_t window_attention_forward(const WindowAttentionParams& p, DType dtype, cudaStream_t stream);
cudaError_t window_attention_backward(const WindowAttentionParams& p, DType dtype, cudaStream_t stream);

}  // namespace cambrian::cuda
