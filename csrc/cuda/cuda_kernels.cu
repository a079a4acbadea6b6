// CUDA kernels of cambrian's fused ops (see cuda_kernels.cuh).  No torch headers: compiles alone.
//
// multi_tower_interpolate: one thread per output element (b, oy, ox, c), channel fastest, so a warp
//   reads and writes contiguous channel runs of the token-major grids.  The taps are ATen's
//   `area_pixel_compute_source_index` (align_corners=False) computed with explicitly rounded
//   operations (__fmul_rn & co. are never contracted into FMAs), so they match the reference exactly.
//   Backward: one thread per input element, gathering the output cells whose taps touch it
//   (deterministic, no atomics).
// sva_window_attention: one warp per (query, head); each lane holds head_dim/32 channels, dot products
//   are warp-shuffle sums, the softmax runs online over the keys of the query's window in every tower.
//   Windows do not overlap, so in the backward each key is owned by exactly one (query, head) warp,
//   which writes its dK/dV directly.  The backward makes two passes over the window: the first sums
//   the softmax correction delta = sum_j p_j (dO.v_j) (autograd's formula; the forward output is not
//   needed), the second writes dK, dV and accumulates dQ.
#include "cuda_kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

// kernel<<<grid, block, 0, stream>>>(args): a macro only so the host emulation used by the tests
// (emulation/cuda_emulation.h) can run the same launches on a CPU.
#ifndef CAMBRIAN_CUDA_LAUNCH
#define CAMBRIAN_CUDA_LAUNCH(kernel, grid, block, stream) kernel<<<(grid), (block), 0, (stream)>>>
#endif

namespace cambrian::cuda {
namespace {

constexpr int kThreads = 256;                 // elementwise kernels
constexpr int kWarpsPerBlock = 4;             // attention kernels: blockDim = (32, kWarpsPerBlock)
constexpr int kPerLane = kMaxHeadDim / 32;
constexpr int64_t kMaxBlocks = 65535;         // grid-stride loops cover the rest

// ---------------------------------------------------------------------------------------------------
// scalar helpers
// ---------------------------------------------------------------------------------------------------
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ void store(float* p, float x) { *p = x; }
__device__ __forceinline__ void store(double* p, double x) { *p = x; }
__device__ __forceinline__ void store(__half* p, float x) { *p = __float2half_rn(x); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }

// Explicitly rounded arithmetic: nvcc never fuses these into FMAs.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t x) {
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline unsigned grid_for(int64_t work, int64_t per_block) {
  const int64_t blocks = cdiv(work, per_block);
  return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

// ---------------------------------------------------------------------------------------------------
// bilinear taps (align_corners=False)
// ---------------------------------------------------------------------------------------------------
template <typename acc_t>
struct Taps {
  int64_t i0, i1;
  acc_t l0, l1;
};

// src = max((dst + 0.5) * scale - 0.5, 0); i0 = floor(src) (src >= 0: truncation); i1 = min(i0 + 1, n - 1);
// l1 = src - i0; l0 = 1 - l1.  scale = n_in / n_out rounded to acc_t, as ATen computes it.
template <typename acc_t>
__device__ __forceinline__ Taps<acc_t> source_taps(int64_t dst, acc_t scale, int64_t n_in) {
  acc_t src = sub_rn(mul_rn(add_rn(static_cast<acc_t>(dst), acc_t(0.5)), scale), acc_t(0.5));
  src = src > acc_t(0) ? src : acc_t(0);
  int64_t i0 = static_cast<int64_t>(src);
  i0 = i0 < n_in - 1 ? i0 : n_in - 1;
  const int64_t i1 = i0 + 1 < n_in - 1 ? i0 + 1 : n_in - 1;
  acc_t l1 = sub_rn(src, static_cast<acc_t>(i0));
  l1 = l1 < acc_t(0) ? acc_t(0) : (l1 > acc_t(1) ? acc_t(1) : l1);
  return {i0, i1, sub_rn(acc_t(1), l1), l1};
}

// Weight of input index i in output index dst (0 when dst is not one of its taps or out of range).
template <typename acc_t>
__device__ __forceinline__ acc_t tap_weight(int64_t i, int64_t n_in, int64_t dst, int64_t n_out, acc_t scale) {
  if (dst >= n_out) return acc_t(0);
  const Taps<acc_t> t = source_taps(dst, scale, n_in);
  return (t.i0 == i ? t.l0 : acc_t(0)) + (t.i1 == i ? t.l1 : acc_t(0));
}

// First output index that can have a non-zero tap on input index i, minus one for rounding: outputs
// touching i have src >= i - 1, i.e. dst >= (i - 0.5) * n_out / n_in - 0.5.  With the span below this
// box covers every such output (checked exhaustively for n_in < 70, n_out < 130 in float32).
template <typename acc_t>
__device__ __forceinline__ int64_t first_candidate(int64_t i, acc_t inv_scale) {
  acc_t t = sub_rn(mul_rn(sub_rn(static_cast<acc_t>(i), acc_t(0.5)), inv_scale), acc_t(0.5));
  t = t > acc_t(0) ? t : acc_t(0);
  const int64_t start = static_cast<int64_t>(t) - 1;
  return start > 0 ? start : 0;
}

// Number of candidates: outputs with a non-zero tap on one input index span < 2 * n_out / n_in + 1.
inline int64_t candidate_span(int64_t n_in, int64_t n_out) {
  const int64_t span = cdiv(2 * n_out, n_in) + 3;
  return span < n_out ? span : n_out;
}

// ---------------------------------------------------------------------------------------------------
// multi_tower_interpolate
// ---------------------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
__global__ void interp_forward_kernel(const InterpForwardParams p, const acc_t scale_h, const acc_t scale_w) {
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  scalar_t* out = static_cast<scalar_t*>(p.out);
  const bool copy = p.h == p.H && p.w == p.W;  // already at the target size: copied unchanged
  const int64_t total = p.B * p.H * p.W * p.C;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = idx % p.C;
    const int64_t pix = idx / p.C;                 // b * H * W + oy * W + ox
    const int64_t b = pix / (p.H * p.W);
    const int64_t oyx = pix % (p.H * p.W);
    scalar_t* dst = out + b * p.o_sb + oyx * p.o_st + c;
    const scalar_t* xb = x + b * p.x_sb + c * p.x_sc;
    if (copy) {
      *dst = xb[oyx * p.x_st];
      continue;
    }
    const Taps<acc_t> ty = source_taps(oyx / p.W, scale_h, p.h);
    const Taps<acc_t> tx = source_taps(oyx % p.W, scale_w, p.w);
    const acc_t v00 = to_acc(xb[(ty.i0 * p.w + tx.i0) * p.x_st]);
    const acc_t v01 = to_acc(xb[(ty.i0 * p.w + tx.i1) * p.x_st]);
    const acc_t v10 = to_acc(xb[(ty.i1 * p.w + tx.i0) * p.x_st]);
    const acc_t v11 = to_acc(xb[(ty.i1 * p.w + tx.i1) * p.x_st]);
    // columns first, then rows, each product rounded: the reference's float32 sums
    const acc_t top = add_rn(mul_rn(v00, tx.l0), mul_rn(v01, tx.l1));
    const acc_t bot = add_rn(mul_rn(v10, tx.l0), mul_rn(v11, tx.l1));
    store(dst, add_rn(mul_rn(top, ty.l0), mul_rn(bot, ty.l1)));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void interp_backward_kernel(const InterpBackwardParams p, const acc_t scale_h, const acc_t scale_w,
                                       const acc_t inv_h, const acc_t inv_w, const int64_t span_h,
                                       const int64_t span_w) {
  const scalar_t* g = static_cast<const scalar_t*>(p.g);
  scalar_t* gx = static_cast<scalar_t*>(p.gx);
  const bool copy = p.h == p.H && p.w == p.W;
  const int64_t total = p.B * p.h * p.w * p.C;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = idx % p.C;
    const int64_t pix = idx / p.C;                 // b * h * w + iy * w + ix
    const int64_t b = pix / (p.h * p.w);
    const int64_t iyx = pix % (p.h * p.w);
    const scalar_t* gb = g + b * p.g_sb + c;
    if (copy) {
      gx[idx] = gb[iyx * p.g_st];
      continue;
    }
    const int64_t iy = iyx / p.w, ix = iyx % p.w;
    const int64_t oy0 = first_candidate(iy, inv_h), ox0 = first_candidate(ix, inv_w);
    acc_t acc = 0;
    // outer loop over columns, inner over rows: the order of the reference's backward (rows pass first)
    for (int64_t ox = ox0; ox < ox0 + span_w; ++ox) {
      const acc_t wx = tap_weight(ix, p.w, ox, p.W, scale_w);
      if (wx == acc_t(0)) continue;
      acc_t inner = 0;
      for (int64_t oy = oy0; oy < oy0 + span_h; ++oy) {
        const acc_t wy = tap_weight(iy, p.h, oy, p.H, scale_h);
        if (wy != acc_t(0)) inner += wy * to_acc(gb[(oy * p.W + ox) * p.g_st]);
      }
      acc += inner * wx;
    }
    store(gx + idx, acc);
  }
}

// ---------------------------------------------------------------------------------------------------
// sva_window_attention
// ---------------------------------------------------------------------------------------------------
struct Query {
  int64_t index, head, b, wy, wx;  // flat query id, head, image, window cell (row, col)
};

__device__ __forceinline__ Query locate(const WindowAttentionParams& p, int64_t pair) {
  Query q;
  q.index = pair / p.heads;
  q.head = pair % p.heads;
  q.b = q.index / (p.h * p.w);
  q.wy = (q.index / p.w) % p.h;
  q.wx = q.index % p.w;
  if (p.offsets != nullptr) {  // query sub-rectangle: (y, x) sits at cell (y + row0_b, x + col0_b)
    q.wy += p.offsets[q.b * 2];
    q.wx += p.offsets[q.b * 2 + 1];
  }
  return q;
}

// Does tower t's window (wy, wx) hold a valid key?  Warp-uniform.  False -> the whole window counts as valid.
__device__ __forceinline__ bool window_any_valid(const WindowAttentionParams& p, int t, const Query& q, int lane) {
  const int64_t r = p.r[t];
  if (p.rects != nullptr) {  // rows [wy*r, wy*r+r) meet [row0, row1) and the columns likewise
    const int64_t* rc = p.rects + (t * p.B + q.b) * 4;
    const bool rows = max(q.wy * r, rc[0]) < min(q.wy * r + r, rc[1]);
    const bool cols = max(q.wx * r, rc[2]) < min(q.wx * r + r, rc[3]);
    return rows && cols;
  }
  if (p.masks[t] != nullptr) {
    const int64_t n = p.s * r;
    bool found = false;
    for (int64_t kk = lane; kk < r * r; kk += 32)
      found |= p.masks[t][q.b * p.mask_sb + (q.wy * r + kk / r) * n + q.wx * r + kk % r] != 0;
    return __any_sync(0xffffffffu, found);
  }
  return true;
}

__device__ __forceinline__ bool key_valid(const WindowAttentionParams& p, int t, int64_t b, int64_t gy, int64_t gx,
                                          bool any_valid) {
  if (!any_valid) return true;  // a window with no valid key is made all valid
  if (p.rects != nullptr) {
    const int64_t* rc = p.rects + (t * p.B + b) * 4;
    return gy >= rc[0] && gy < rc[1] && gx >= rc[2] && gx < rc[3];
  }
  if (p.masks[t] != nullptr) {
    const int64_t n = p.s * p.r[t];
    return p.masks[t][b * p.mask_sb + gy * n + gx] != 0;
  }
  return true;
}

template <typename scalar_t>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
window_attention_forward_kernel(const WindowAttentionParams p) {
  using acc_t = typename Acc<scalar_t>::type;
  const int lane = threadIdx.x;
  const int64_t n_pairs = p.B * p.h * p.w * p.heads;
  const acc_t scale = static_cast<acc_t>(p.scale);
  for (int64_t pair = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + threadIdx.y; pair < n_pairs;
       pair += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    const Query q = locate(p, pair);
    const int64_t chan0 = q.head * p.head_dim;
    const scalar_t* qrow = static_cast<const scalar_t*>(p.q) + q.index * p.D + chan0;
    acc_t qs[kPerLane], acc[kPerLane];
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int64_t e = lane + 32 * j;
      qs[j] = e < p.head_dim ? to_acc(qrow[e]) * scale : acc_t(0);
      acc[j] = 0;
    }
    acc_t m = -INFINITY, l = 0;  // running max and sum of the online softmax
    for (int t = 0; t < p.T; ++t) {
      const int64_t r = p.r[t], n = p.s * r;
      const scalar_t* keys = static_cast<const scalar_t*>(p.k[t]);
      const scalar_t* values = static_cast<const scalar_t*>(p.v[t]);
      const bool any_valid = window_any_valid(p, t, q, lane);
      for (int64_t kk = 0; kk < r * r; ++kk) {  // key order dy * r + dx
        const int64_t gy = q.wy * r + kk / r, gx = q.wx * r + kk % r;
        if (!key_valid(p, t, q.b, gy, gx, any_valid)) continue;  // warp-uniform
        const int64_t row = ((q.b * n + gy) * n + gx) * p.D + chan0;
        acc_t part = 0;
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) {
          const int64_t e = lane + 32 * j;
          if (e < p.head_dim) part += qs[j] * to_acc(keys[row + e]);
        }
        const acc_t score = warp_sum(part);
        const acc_t m_new = score > m ? score : m;  // finite: this key is valid
        const acc_t alpha = exp_acc(m - m_new);     // exp(-inf) = 0 on the first valid key
        const acc_t prob = exp_acc(score - m_new);
        l = l * alpha + prob;
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) {
          const int64_t e = lane + 32 * j;
          if (e < p.head_dim) acc[j] = acc[j] * alpha + prob * to_acc(values[row + e]);
        }
        m = m_new;
      }
    }
    scalar_t* orow = static_cast<scalar_t*>(p.out) + q.index * p.D + chan0;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int64_t e = lane + 32 * j;
      if (e < p.head_dim) store(orow + e, acc[j] / l);
    }
    if (lane == 0) static_cast<acc_t*>(p.lse)[pair] = m + log_acc(l);
  }
}

// One key of the backward: its logit-probability p and dO.v (both warp-uniform).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void key_terms(const scalar_t* keys, const scalar_t* values, int64_t row, int64_t head_dim,
                                          int lane, const acc_t (&qs)[kPerLane], const acc_t (&dout)[kPerLane],
                                          acc_t lse, acc_t (&kreg)[kPerLane], acc_t& prob, acc_t& dp) {
  acc_t qk = 0, dv = 0;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int64_t e = lane + 32 * j;
    kreg[j] = e < head_dim ? to_acc(keys[row + e]) : acc_t(0);
    qk += qs[j] * kreg[j];
    if (e < head_dim) dv += dout[j] * to_acc(values[row + e]);
  }
  prob = exp_acc(warp_sum(qk) - lse);
  dp = warp_sum(dv);
}

template <typename scalar_t>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
window_attention_backward_kernel(const WindowAttentionParams p) {
  using acc_t = typename Acc<scalar_t>::type;
  const int lane = threadIdx.x;
  const int64_t n_pairs = p.B * p.h * p.w * p.heads;
  const acc_t scale = static_cast<acc_t>(p.scale);
  for (int64_t pair = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + threadIdx.y; pair < n_pairs;
       pair += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    const Query q = locate(p, pair);
    const int64_t base = q.index * p.D + q.head * p.head_dim;
    const scalar_t* qrow = static_cast<const scalar_t*>(p.q) + base;
    const scalar_t* dorow = static_cast<const scalar_t*>(p.gout) + base;
    acc_t qs[kPerLane], dout[kPerLane], dq[kPerLane], kreg[kPerLane];
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int64_t e = lane + 32 * j;
      qs[j] = e < p.head_dim ? to_acc(qrow[e]) * scale : acc_t(0);
      dout[j] = e < p.head_dim ? to_acc(dorow[e]) : acc_t(0);
      dq[j] = 0;
    }
    const acc_t lse = static_cast<const acc_t*>(p.lse)[pair];
    acc_t prob, dp;

    // pass 1: delta = sum_j p_j dp_j over the valid keys of every tower
    acc_t delta = 0;
    for (int t = 0; t < p.T; ++t) {
      const int64_t r = p.r[t], n = p.s * r;
      const bool any_valid = window_any_valid(p, t, q, lane);
      for (int64_t kk = 0; kk < r * r; ++kk) {
        const int64_t gy = q.wy * r + kk / r, gx = q.wx * r + kk % r;
        if (!key_valid(p, t, q.b, gy, gx, any_valid)) continue;
        const int64_t row = ((q.b * n + gy) * n + gx) * p.D + q.head * p.head_dim;
        key_terms(static_cast<const scalar_t*>(p.k[t]), static_cast<const scalar_t*>(p.v[t]), row, p.head_dim, lane,
                  qs, dout, lse, kreg, prob, dp);
        delta += prob * dp;
      }
    }

    // pass 2: dS_j = p_j (dp_j - delta); dK_j = dS_j * scale * q; dV_j = p_j dO; dQ = scale * sum_j dS_j k_j
    for (int t = 0; t < p.T; ++t) {
      const int64_t r = p.r[t], n = p.s * r;
      scalar_t* gk = static_cast<scalar_t*>(p.gk[t]);
      scalar_t* gv = static_cast<scalar_t*>(p.gv[t]);
      const bool any_valid = window_any_valid(p, t, q, lane);
      for (int64_t kk = 0; kk < r * r; ++kk) {
        const int64_t gy = q.wy * r + kk / r, gx = q.wx * r + kk % r;
        const int64_t row = ((q.b * n + gy) * n + gx) * p.D + q.head * p.head_dim;
        prob = 0;
        dp = 0;
        if (key_valid(p, t, q.b, gy, gx, any_valid)) {
          key_terms(static_cast<const scalar_t*>(p.k[t]), static_cast<const scalar_t*>(p.v[t]), row, p.head_dim,
                    lane, qs, dout, lse, kreg, prob, dp);
        }
        const acc_t ds = prob * (dp - delta);  // 0 for a masked key, whose gradients are written as zeros
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) {
          const int64_t e = lane + 32 * j;
          if (e < p.head_dim) {
            if (prob != acc_t(0)) dq[j] += ds * kreg[j];
            store(gk + row + e, ds * qs[j]);
            store(gv + row + e, prob * dout[j]);
          }
        }
      }
    }
    scalar_t* dqrow = static_cast<scalar_t*>(p.gq) + base;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int64_t e = lane + 32 * j;
      if (e < p.head_dim) store(dqrow + e, dq[j] * scale);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// launch helpers
// ---------------------------------------------------------------------------------------------------
template <typename acc_t>
acc_t ratio(int64_t a, int64_t b) {  // a / b rounded to acc_t (ATen's area_pixel_compute_scale)
  return static_cast<acc_t>(a) / static_cast<acc_t>(b);
}

template <typename scalar_t>
cudaError_t launch_interp_forward(const InterpForwardParams& p, cudaStream_t stream) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t total = p.B * p.H * p.W * p.C;
  if (total == 0) return cudaSuccess;
  const auto kernel = interp_forward_kernel<scalar_t, acc_t>;
  CAMBRIAN_CUDA_LAUNCH(kernel, grid_for(total, kThreads), kThreads, stream)(
      p, ratio<acc_t>(p.h, p.H), ratio<acc_t>(p.w, p.W));
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_interp_backward(const InterpBackwardParams& p, cudaStream_t stream) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t total = p.B * p.h * p.w * p.C;
  if (total == 0) return cudaSuccess;
  const auto kernel = interp_backward_kernel<scalar_t, acc_t>;
  CAMBRIAN_CUDA_LAUNCH(kernel, grid_for(total, kThreads), kThreads, stream)(
      p, ratio<acc_t>(p.h, p.H), ratio<acc_t>(p.w, p.W), ratio<acc_t>(p.H, p.h), ratio<acc_t>(p.W, p.w),
      candidate_span(p.h, p.H), candidate_span(p.w, p.W));
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_attention(const WindowAttentionParams& p, bool backward, cudaStream_t stream) {
  if (p.T < 1 || p.T > kMaxTowers || p.head_dim > kMaxHeadDim) return cudaErrorInvalidValue;
  const int64_t pairs = p.B * p.h * p.w * p.heads;
  if (pairs == 0) return cudaSuccess;
  const dim3 block(32, kWarpsPerBlock);
  const unsigned grid = grid_for(pairs, kWarpsPerBlock);
  const auto kernel = backward ? window_attention_backward_kernel<scalar_t> : window_attention_forward_kernel<scalar_t>;
  CAMBRIAN_CUDA_LAUNCH(kernel, grid, block, stream)(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t interp_forward(const InterpForwardParams& p, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case kF32: return launch_interp_forward<float>(p, stream);
    case kF64: return launch_interp_forward<double>(p, stream);
    case kF16: return launch_interp_forward<__half>(p, stream);
    case kBF16: return launch_interp_forward<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t interp_backward(const InterpBackwardParams& p, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case kF32: return launch_interp_backward<float>(p, stream);
    case kF64: return launch_interp_backward<double>(p, stream);
    case kF16: return launch_interp_backward<__half>(p, stream);
    case kBF16: return launch_interp_backward<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t window_attention_forward(const WindowAttentionParams& p, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case kF32: return launch_attention<float>(p, false, stream);
    case kF64: return launch_attention<double>(p, false, stream);
    case kF16: return launch_attention<__half>(p, false, stream);
    case kBF16: return launch_attention<__nv_bfloat16>(p, false, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t window_attention_backward(const WindowAttentionParams& p, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case kF32: return launch_attention<float>(p, true, stream);
    case kF64: return launch_attention<double>(p, true, stream);
    case kF16: return launch_attention<__half>(p, true, stream);
    case kBF16: return launch_attention<__nv_bfloat16>(p, true, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cambrian::cuda
