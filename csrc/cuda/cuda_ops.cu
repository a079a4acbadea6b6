// torch bindings of the CUDA kernels: CUDA implementations of the `cambrian::` ops.
//
// The op schemas are declared once, in csrc/cpu/ops.cpp (TORCH_LIBRARY(cambrian, m)); autograd and
// fake (meta) implementations are registered from Python (kernels/cpp.py) and hold for every device.
// This file only adds the CUDA kernels: TORCH_LIBRARY_IMPL(cambrian, CUDA, m).  setup.py compiles it
// into `cambrian.kernels._C` only when torch has CUDA, so the CPU build never sees it.
//
// Same conventions as the CPU implementations: src_sizes flattened [h0, w0, h1, w1, ...];
// valid_rects (towers, B, 4) int64 [row0, row1, col0, col1); masks (B, sum n_i^2) bool with the tower
// grids flattened and concatenated; lse (B, h, w, heads) float32 (float64 for float64 inputs).
// Headers are kept to what is used (no ATen/ATen.h) to keep the nvcc compile short.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "cuda_kernels.cuh"

namespace cambrian::cuda {
namespace {

DType dtype_of(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: TORCH_CHECK(false, op, " (cuda): unsupported dtype ", t, " (float32, float64, float16, bfloat16)");
  }
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, " (cuda): kernel launch failed: ", cudaGetErrorString(err));
}

// ------------------------------------------------------------------------------------------------
// multi_tower_interpolate
// ------------------------------------------------------------------------------------------------
at::Tensor multi_tower_interpolate_cuda(at::TensorList features, at::IntArrayRef src_sizes, at::IntArrayRef dst_size) {
  const char* op = "multi_tower_interpolate";
  TORCH_CHECK(!features.empty(), op, ": no feature grids");
  TORCH_CHECK(src_sizes.size() == 2 * features.size(), op, ": src_sizes must hold (h, w) per grid, got ",
              src_sizes.size(), " values for ", features.size(), " grids");
  TORCH_CHECK(dst_size.size() == 2 && dst_size[0] > 0 && dst_size[1] > 0, op, ": bad dst_size ", dst_size);
  const int64_t H = dst_size[0], W = dst_size[1], B = features[0].size(0);
  int64_t c_total = 0;
  for (size_t i = 0; i < features.size(); ++i) {
    const at::Tensor& x = features[i];
    const int64_t h = src_sizes[2 * i], w = src_sizes[2 * i + 1];
    TORCH_CHECK(x.is_cuda() && x.device() == features[0].device(), op, " (cuda): grid ", i, " is on ", x.device(),
                ", expected ", features[0].device());
    TORCH_CHECK(x.dim() == 3 && x.size(0) == B && h > 0 && w > 0 && x.size(1) == h * w, op, ": grid ", i,
                " has shape ", x.sizes(), ", expected (", B, ", ", h, "*", w, ", C)");
    dtype_of(x.scalar_type(), op);
    c_total += x.size(2);
  }
  const c10::cuda::CUDAGuard guard(features[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor out = at::empty({B, H * W, c_total}, features[0].options());
  int64_t c_off = 0;
  for (size_t i = 0; i < features.size(); ++i) {
    const at::Tensor& x = features[i];
    const int64_t C = x.size(2);
    at::Tensor dst = out.narrow(2, c_off, C);
    c_off += C;
    if (C == 0 || B == 0) continue;
    // Mixed dtypes: round to the grid's own dtype first, then to the output's (as the reference does).
    at::Tensor target = x.scalar_type() == out.scalar_type() ? dst : at::empty({B, H * W, C}, x.options());
    InterpForwardParams p{};
    p.x = x.data_ptr();  // any strides: e.g. the transposed view of a (B, C, h, w) map is read in place
    p.x_sb = x.stride(0);
    p.x_st = x.stride(1);
    p.x_sc = x.stride(2);
    p.out = target.data_ptr();
    p.o_sb = target.stride(0);
    p.o_st = target.stride(1);
    p.B = B; p.h = src_sizes[2 * i]; p.w = src_sizes[2 * i + 1]; p.C = C; p.H = H; p.W = W;
    check_launch(interp_forward(p, dtype_of(x.scalar_type(), op), stream), op);
    if (!target.is_same(dst)) dst.copy_(target);
  }
  return out;
}

std::vector<at::Tensor> multi_tower_interpolate_backward_cuda(const at::Tensor& grad_out, at::IntArrayRef src_sizes,
                                                              at::IntArrayRef dst_size, at::IntArrayRef channels) {
  const char* op = "multi_tower_interpolate_backward";
  TORCH_CHECK(src_sizes.size() == 2 * channels.size() && dst_size.size() == 2, op, ": inconsistent sizes");
  TORCH_CHECK(grad_out.is_cuda(), op, " (cuda): grad_out is on ", grad_out.device());
  const int64_t H = dst_size[0], W = dst_size[1];
  int64_t c_total = 0;
  for (int64_t c : channels) c_total += c;
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(1) == H * W && grad_out.size(2) == c_total, op, ": grad_out has shape ",
              grad_out.sizes(), ", expected (B, ", H * W, ", ", c_total, ")");
  const DType dt = dtype_of(grad_out.scalar_type(), op);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor g = grad_out.stride(2) == 1 ? grad_out : grad_out.contiguous();
  const int64_t B = g.size(0);
  std::vector<at::Tensor> grads;
  int64_t c_off = 0;
  for (size_t i = 0; i < channels.size(); ++i) {
    const int64_t h = src_sizes[2 * i], w = src_sizes[2 * i + 1], C = channels[i];
    const at::Tensor gs = g.narrow(2, c_off, C);
    c_off += C;
    at::Tensor gx = at::empty({B, h * w, C}, g.options());
    if (gx.numel() > 0) {
      InterpBackwardParams p{};
      p.g = gs.data_ptr();
      p.g_sb = gs.stride(0);
      p.g_st = gs.stride(1);
      p.gx = gx.data_ptr();
      p.B = B; p.h = h; p.w = w; p.C = C; p.H = H; p.W = W;
      check_launch(interp_backward(p, dt, stream), op);
    }
    grads.push_back(gx);
  }
  return grads;
}

// ------------------------------------------------------------------------------------------------
// sva_window_attention
// ------------------------------------------------------------------------------------------------
// Checked, contiguous device inputs and the parameter block pointing into them.
struct Prepared {
  at::Tensor q, offsets, rects, masks;
  std::vector<at::Tensor> k, v;
  WindowAttentionParams p{};
  DType dt = kF32;
};

Prepared prepare(const char* op, const at::Tensor& q, at::TensorList keys, at::TensorList values, int64_t num_heads,
                 int64_t grid_side, const std::optional<at::Tensor>& query_offsets,
                 const std::optional<at::Tensor>& valid_rects, const std::optional<at::Tensor>& masks, double scale) {
  Prepared pr;
  TORCH_CHECK(q.dim() == 4 && q.is_cuda(), op, " (cuda): q must be a CUDA (B, h, w, D) tensor, got ", q.sizes(), " on ",
              q.device());
  pr.dt = dtype_of(q.scalar_type(), op);
  const int64_t B = q.size(0), h = q.size(1), w = q.size(2), D = q.size(3), s = grid_side;
  TORCH_CHECK(num_heads > 0 && D % num_heads == 0, op, ": width ", D, " not divisible by num_heads=", num_heads);
  TORCH_CHECK(D / num_heads <= kMaxHeadDim, op, " (cuda): head_dim ", D / num_heads, " > ", kMaxHeadDim);
  TORCH_CHECK(s > 0, op, ": grid_side must be positive");
  TORCH_CHECK(!keys.empty() && keys.size() == values.size(), op, ": need as many value grids as key grids (>0)");
  const int64_t T = static_cast<int64_t>(keys.size());
  TORCH_CHECK(T <= kMaxTowers, op, " (cuda): at most ", kMaxTowers, " towers, got ", T);
  pr.q = q.contiguous();
  int64_t mask_len = 0;
  int64_t mask_off[kMaxTowers];
  for (int64_t i = 0; i < T; ++i) {
    const at::Tensor& k = keys[i];
    const at::Tensor& v = values[i];
    TORCH_CHECK(k.dim() == 4 && k.size(0) == B && k.size(1) == k.size(2) && k.size(3) == D && v.sizes() == k.sizes(), op,
                ": keys[", i, "] ", k.sizes(), " / values[", i, "] ", v.sizes(), " must be (", B, ", n, n, ", D, ")");
    TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
                ": keys/values must have q's dtype ", q.scalar_type());
    TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), op, " (cuda): keys/values must be on ", q.device());
    TORCH_CHECK(k.size(1) % s == 0, op, ": tower ", i, " grid side ", k.size(1), " not divisible by ", s);
    pr.k.push_back(k.contiguous());
    pr.v.push_back(v.contiguous());
    pr.p.r[i] = k.size(1) / s;
    pr.p.k[i] = pr.k.back().data_ptr();
    pr.p.v[i] = pr.v.back().data_ptr();
    mask_off[i] = mask_len;
    mask_len += k.size(1) * k.size(1);
  }
  TORCH_CHECK(!(valid_rects.has_value() && masks.has_value()), op, ": give valid_rects or masks, not both");
  if (query_offsets.has_value()) {
    // Values are not re-checked here (that would need a device->host copy): cambrian.kernels validates them.
    pr.offsets = query_offsets->to(q.device(), at::kLong).contiguous();
    TORCH_CHECK(pr.offsets.dim() == 2 && pr.offsets.size(0) == B && pr.offsets.size(1) == 2, op,
                ": query_offsets must be (", B, ", 2)");
  } else {
    TORCH_CHECK(h == s && w == s, op, ": q grid ", h, "x", w, " differs from the ", s, "x", s,
                " window grid and no query_offsets were given");
  }
  if (valid_rects.has_value()) {
    pr.rects = valid_rects->to(q.device(), at::kLong).contiguous();
    TORCH_CHECK(pr.rects.dim() == 3 && pr.rects.size(0) == T && pr.rects.size(1) == B && pr.rects.size(2) == 4, op,
                ": valid_rects must be (", T, ", ", B, ", 4), got ", pr.rects.sizes());
  }
  if (masks.has_value()) {
    pr.masks = masks->to(q.device(), at::kBool).contiguous();
    TORCH_CHECK(pr.masks.dim() == 2 && pr.masks.size(0) == B && pr.masks.size(1) == mask_len, op, ": masks must be (",
                B, ", ", mask_len, ") bool, got ", pr.masks.sizes());
  }
  WindowAttentionParams& p = pr.p;
  p.B = B; p.h = h; p.w = w; p.D = D; p.heads = num_heads; p.head_dim = D / num_heads; p.s = s;
  p.T = static_cast<int>(T);
  p.q = pr.q.data_ptr();
  p.offsets = pr.offsets.defined() ? pr.offsets.data_ptr<int64_t>() : nullptr;
  p.rects = pr.rects.defined() ? pr.rects.data_ptr<int64_t>() : nullptr;
  const uint8_t* mask_base = pr.masks.defined() ? static_cast<const uint8_t*>(pr.masks.data_ptr()) : nullptr;
  for (int64_t i = 0; i < T; ++i) p.masks[i] = mask_base != nullptr ? mask_base + mask_off[i] : nullptr;
  p.mask_sb = mask_len;
  p.scale = scale;
  return pr;
}

at::ScalarType lse_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor> sva_window_attention_cuda(
    const at::Tensor& q, at::TensorList keys, at::TensorList values, int64_t num_heads, int64_t grid_side,
    const std::optional<at::Tensor>& query_offsets, const std::optional<at::Tensor>& valid_rects,
    const std::optional<at::Tensor>& masks, double scale) {
  const char* op = "sva_window_attention";
  const c10::cuda::CUDAGuard guard(q.device());
  Prepared pr = prepare(op, q, keys, values, num_heads, grid_side, query_offsets, valid_rects, masks, scale);
  at::Tensor out = at::empty_like(pr.q);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2), num_heads}, q.options().dtype(lse_dtype(q.scalar_type())));
  if (out.numel() > 0) {
    pr.p.out = out.data_ptr();
    pr.p.lse = lse.data_ptr();
    check_launch(window_attention_forward(pr.p, pr.dt, c10::cuda::getCurrentCUDAStream()), op);
  }
  return {out, lse};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> sva_window_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, at::TensorList keys, at::TensorList values, const at::Tensor& lse,
    int64_t num_heads, int64_t grid_side, const std::optional<at::Tensor>& query_offsets,
    const std::optional<at::Tensor>& valid_rects, const std::optional<at::Tensor>& masks, double scale) {
  const char* op = "sva_window_attention_backward";
  const c10::cuda::CUDAGuard guard(q.device());
  Prepared pr = prepare(op, q, keys, values, num_heads, grid_side, query_offsets, valid_rects, masks, scale);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && grad_out.device() == q.device(), op, ": grad_out ", grad_out.sizes(),
              " on ", grad_out.device(), " does not match q ", q.sizes(), " on ", q.device());
  TORCH_CHECK(lse.dim() == 4 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2) &&
                  lse.size(3) == num_heads && lse.device() == q.device(),
              op, ": lse has shape ", lse.sizes(), " on ", lse.device());
  const at::Tensor go = grad_out.to(q.scalar_type()).contiguous();
  const at::Tensor ls = lse.to(lse_dtype(q.scalar_type())).contiguous();
  at::Tensor gq = at::empty_like(pr.q);
  // Every window is read by at most one query; with a sub-rectangle of queries some are read by none.
  const bool covered = q.size(1) == grid_side && q.size(2) == grid_side;
  std::vector<at::Tensor> gk, gv;
  for (size_t i = 0; i < pr.k.size(); ++i) {
    gk.push_back(covered ? at::empty_like(pr.k[i]) : at::zeros_like(pr.k[i]));
    gv.push_back(covered ? at::empty_like(pr.v[i]) : at::zeros_like(pr.v[i]));
    pr.p.gk[i] = gk.back().data_ptr();
    pr.p.gv[i] = gv.back().data_ptr();
  }
  if (gq.numel() > 0) {
    pr.p.gout = go.data_ptr();
    pr.p.lse = const_cast<void*>(ls.data_ptr());
    pr.p.gq = gq.data_ptr();
    check_launch(window_attention_backward(pr.p, pr.dt, c10::cuda::getCurrentCUDAStream()), op);
  }
  return {gq, gk, gv};
}

}  // namespace
}  // namespace cambrian::cuda

TORCH_LIBRARY_IMPL(cambrian, CUDA, m) {
  m.impl("multi_tower_interpolate", &cambrian::cuda::multi_tower_interpolate_cuda);
  m.impl("multi_tower_interpolate_backward", &cambrian::cuda::multi_tower_interpolate_backward_cuda);
  m.impl("sva_window_attention", &cambrian::cuda::sva_window_attention_cuda);
  m.impl("sva_window_attention_backward", &cambrian::cuda::sva_window_attention_backward_cuda);
}
