// torch bindings of the CPU kernels: the `cambrian::` op schemas, their CPU implementations, and a
// small Python module (`cambrian.kernels._C`) to inspect / pick the instruction-set variant and read the
// time spent inside the kernels (kernel_time_ns).
//
// Ops (fake/meta implementations and most autograd formulas are registered from Python, kernels/cpp.py;
// multi_tower_interpolate's autograd is here, InterpolateFunction):
//   multi_tower_interpolate(Tensor[] features, int[] src_sizes, int[] dst_size) -> Tensor
//   multi_tower_interpolate_backward(Tensor grad_out, int[] src_sizes, int[] dst_size, int[] channels) -> Tensor[]
//   multi_tower_interpolate_accumulate_(Tensor(a!) out, Tensor[] features, int[] src_sizes, int[] dst_size) -> ()
//   window_pos_layer_norm(Tensor grid, Tensor? pos, int window_side, float eps) -> Tensor, and its in-place form
//   window_pos_layer_norm_out_(Tensor(a!) out, Tensor grid, Tensor? pos, int window_side, float eps) -> ()
//   sva_window_attention(Tensor q, Tensor[] keys, Tensor[] values, int num_heads, int grid_side,
//                        Tensor? query_offsets, Tensor? valid_rects, Tensor? masks, float scale) -> (Tensor, Tensor)
//   sva_window_attention_backward(Tensor grad_out, Tensor q, Tensor[] keys, Tensor[] values, Tensor lse,
//                        int num_heads, int grid_side, Tensor? query_offsets, Tensor? valid_rects,
//                        Tensor? masks, float scale) -> (Tensor, Tensor[], Tensor[])
// src_sizes is flattened [h0, w0, h1, w1, ...]; valid_rects is (towers, B, 4) int64 [row0, row1, col0, col1);
// masks is (B, sum n_i^2) bool, tower grids flattened and concatenated in order.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/Version.h>

#include <sys/mman.h>

#include <atomic>
#include <chrono>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>

#include "cpu_kernels.h"

namespace cambrian::cpu {
namespace {

// ------------------------------------------------------------------------------------------------
// instruction-set variant
// ------------------------------------------------------------------------------------------------
bool cpu_has(const std::string& isa) {
  if (isa == "base") return true;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (isa == "avx2") return avx2;
  if (isa == "avx512")
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#endif
  return false;
}

const KernelTable* table_named(const std::string& isa) {
  if (isa == "avx512") return table_avx512();
  if (isa == "avx2") return table_avx2();
  return table_base();
}

const KernelTable*& active_table() {
  static const KernelTable* table = [] {
    // CAMBRIAN_CPU_ISA=base|avx2|avx512 caps the variant (e.g. to compare them); default: the best one.
    const char* env = std::getenv("CAMBRIAN_CPU_ISA");
    if (env != nullptr && *env != '\0') {
      TORCH_CHECK(cpu_has(env), "CAMBRIAN_CPU_ISA=", env, " is not supported on this CPU (use base, avx2 or avx512)");
      return table_named(env);
    }
    for (const char* isa : {"avx512", "avx2"})
      if (cpu_has(isa)) return table_named(isa);
    return table_base();
  }();
  return table;
}

// Wall time spent inside the kernel bodies (all ops, all calls), for benchmarks: separates what the kernels
// cost from the fixed cost of reaching them (Python, the dispatcher, autograd).  Two clock reads per call.
std::atomic<int64_t>& kernel_ns() {
  static std::atomic<int64_t> ns{0};
  return ns;
}
template <class P>
void run_kernel(void (*fn)(const P&), const P& p) {
  const auto t0 = std::chrono::steady_clock::now();
  fn(p);
  const auto dt = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0);
  kernel_ns().fetch_add(static_cast<int64_t>(dt.count()), std::memory_order_relaxed);
}

// Outputs larger than this are written with non-temporal stores (they cannot stay in the last-level
// cache for their consumer anyway; streaming skips the read-for-ownership of every line).
constexpr int64_t kStreamBytes = 16 << 20;

// Threads for a kernel moving `bytes`: small calls run on the calling thread (a parallel region costs
// microseconds, and far more when the cores are shared and a worker is descheduled).
constexpr int64_t kParallelBytes = 1 << 20;
int threads_for(int64_t bytes) { return bytes < kParallelBytes ? 1 : at::get_num_threads(); }

// Large outputs may ask for transparent huge pages on the (still untouched) interior of the allocation.
// First-touch page faults dominate these memory-bound kernels: a 212 MB output costs ~100 ms of CPU in
// 4 KB faults against ~10 ms for the kernel, ~35 ms with 2 MB pages.  But where the kernel compacts memory
// synchronously for madvised regions (THP defrag "madvise", "always", "defer+madvise") a fault can stall
// once huge pages run short -- measured up to ~4x slower than 4 KB faults when other large allocations
// fragment memory between calls.  So by default huge pages are requested only when that cannot happen
// (defrag "defer" or "never"); CAMBRIAN_CPU_HUGEPAGES=1 / =0 forces them on / off.  The memory stays a
// normal torch allocation; madvise is best effort.
constexpr int64_t kHugePageBytes = 32 << 20;
bool hugepages_enabled() {
  static const bool enabled = [] {
    const char* env = std::getenv("CAMBRIAN_CPU_HUGEPAGES");
    if (env != nullptr && *env != '\0') return std::string(env) != "0";
    std::FILE* f = std::fopen("/sys/kernel/mm/transparent_hugepage/defrag", "r");
    if (f == nullptr) return false;
    char buf[128] = {0};
    const size_t n = std::fread(buf, 1, sizeof(buf) - 1, f);
    std::fclose(f);
    const std::string mode(buf, n);  // e.g. "always defer defer+madvise [madvise] never"
    return mode.find("[defer]") != std::string::npos || mode.find("[never]") != std::string::npos;
  }();
  return enabled;
}

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  if (static_cast<int64_t>(t.nbytes()) >= kHugePageBytes && hugepages_enabled()) {
    constexpr uintptr_t kHuge = uintptr_t(2) << 20;
    const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1), hi = (begin + t.nbytes()) & ~(kHuge - 1);
    if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
  }
  return t;
}

int dtype_index(at::ScalarType t, const char* what) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: TORCH_CHECK(false, what, ": unsupported dtype ", t, " (float32, float64, float16, bfloat16)");
  }
}

// ------------------------------------------------------------------------------------------------
// multi_tower_interpolate
// ------------------------------------------------------------------------------------------------
// How this torch build's upsample_bilinear2d rounds.  Its kernels are registered with REGISTER_DISPATCH,
// so an AVX512 CPU runs the AVX2 build (AVX512 kernels are opt-in per op): compiled with -mavx2 -mfma, GCC
// contracts a*b+c into FMAs, and the channels-last kernel walks channels in 32-byte Vectorized blocks
// (8 floats) plus a scalar tail.  The DEFAULT build has no FMA (no contraction), same 32-byte blocks.
struct AtenMath {
  int fused;
  int vec_bytes;
};
AtenMath aten_math() {
  static const AtenMath m = [] {
    const std::string cap = at::get_cpu_capability();
    if (cap == "AVX512" || cap == "AVX2") return AtenMath{1, 32};
    return AtenMath{0, 32};
  }();
  return m;
}

// Which ATen kernel F.interpolate(x.reshape(B,h,w,C).permute(0,3,1,2).float(), (H, W), "bilinear") runs
// (upsample_bilinear2d_kernel_impl_float / _use_channels_last_kernel_2d): its formula is what we reproduce.
int aten_formula(const at::Tensor& x, int64_t h, int64_t w, int64_t H, int64_t W) {
  const int64_t C = x.size(2);
  const at::Tensor v = x.view({x.size(0), h, w, C}).permute({0, 3, 1, 2});
  bool channels_last;
  if (x.scalar_type() == at::kFloat) {
    channels_last = v.is_contiguous(at::MemoryFormat::ChannelsLast);
  } else {  // .float() keeps dense strides (preserve_format); ask a meta tensor rather than re-deriving the rule
    channels_last = at::empty_like(v, v.options().dtype(at::kFloat).device(at::kMeta))
                        .is_contiguous(at::MemoryFormat::ChannelsLast);
  }
  if ((channels_last && C > 3) || H + W <= 128 || (at::get_num_threads() == 1 && C == 3)) return kChannelsLast;
  return kGeneric;
}

// Shape checks shared by the functional and accumulating forms; returns the total channel count.
int64_t check_interp_args(at::TensorList features, at::IntArrayRef src_sizes, at::IntArrayRef dst_size) {
  TORCH_CHECK(!features.empty(), "multi_tower_interpolate: no feature grids");
  TORCH_CHECK(src_sizes.size() == 2 * features.size(), "multi_tower_interpolate: src_sizes must hold (h, w) per grid, got ",
              src_sizes.size(), " values for ", features.size(), " grids");
  TORCH_CHECK(dst_size.size() == 2 && dst_size[0] > 0 && dst_size[1] > 0, "multi_tower_interpolate: bad dst_size ", dst_size);
  const int64_t B = features[0].size(0);
  int64_t c_total = 0;
  for (size_t i = 0; i < features.size(); ++i) {
    const at::Tensor& x = features[i];
    const int64_t h = src_sizes[2 * i], w = src_sizes[2 * i + 1];
    TORCH_CHECK(x.device().is_cpu(), "multi_tower_interpolate (cpu): grid ", i, " is on ", x.device());
    TORCH_CHECK(x.dim() == 3 && x.size(0) == B && h > 0 && w > 0 && x.size(1) == h * w, "multi_tower_interpolate: grid ", i,
                " has shape ", x.sizes(), ", expected (", B, ", ", h, "*", w, ", C)");
    dtype_index(x.scalar_type(), "multi_tower_interpolate");
    c_total += x.size(2);
  }
  return c_total;
}

// Resizes every grid into its channel block of `out` (B, H*W, sum C), channel stride 1; accumulate: out += resized.
void interpolate_into(const at::Tensor& out, at::TensorList features, at::IntArrayRef src_sizes, at::IntArrayRef dst_size,
                      bool accumulate) {
  const int64_t H = dst_size[0], W = dst_size[1], B = features[0].size(0);
  const AtenMath math = aten_math();
  const KernelTable* table = active_table();
  int64_t c_off = 0;
  for (size_t i = 0; i < features.size(); ++i) {
    const at::Tensor& x = features[i];
    const int64_t h = src_sizes[2 * i], w = src_sizes[2 * i + 1], C = x.size(2);
    at::Tensor dst = out.narrow(2, c_off, C);
    c_off += C;
    if (C == 0 || B == 0) continue;
    if (h == H && w == W) {  // already on the target grid: copied (added) unchanged
      if (accumulate) dst.add_(x); else dst.copy_(x);
      continue;
    }
    // Mixed dtypes: round to the grid's own dtype first, then to the output's (as the reference does).
    at::Tensor target = x.scalar_type() == out.scalar_type() ? dst : at::empty({B, H * W, C}, x.options());
    at::Tensor src = x;
    int64_t sc = C == 1 ? 1 : src.stride(2), st = h * w == 1 ? 1 : src.stride(1);
    if (sc != 1 && st != 1) {
      src = src.contiguous();
      sc = 1;
      st = C;
    }
    InterpForward p{};
    p.x = src.data_ptr();
    p.x_sb = src.stride(0);
    p.x_st = st;
    p.x_sc = sc;
    p.out = target.data_ptr();
    p.o_sb = target.stride(0);
    p.o_st = target.stride(1);
    p.B = B; p.h = h; p.w = w; p.C = C; p.H = H; p.W = W;
    p.formula = aten_formula(x, h, w, H, W);
    p.block = math.vec_bytes / (x.scalar_type() == at::kDouble ? 8 : 4);
    p.fused = math.fused;
    p.accumulate = accumulate && target.is_same(dst);
    p.stream = !p.accumulate && out.nbytes() > kStreamBytes;
    p.nthreads = threads_for(static_cast<int64_t>(x.nbytes() + (p.accumulate ? 2 : 1) * target.nbytes()));
    run_kernel(table->interp_forward[dtype_index(x.scalar_type(), "multi_tower_interpolate")], p);
    if (!target.is_same(dst)) {
      if (accumulate) dst.add_(target); else dst.copy_(target);
    }
  }
}

at::Tensor multi_tower_interpolate_cpu(at::TensorList features, at::IntArrayRef src_sizes, at::IntArrayRef dst_size) {
  const int64_t c_total = check_interp_args(features, src_sizes, dst_size);
  at::Tensor out = empty_output({features[0].size(0), dst_size[0] * dst_size[1], c_total}, features[0].options());
  interpolate_into(out, features, src_sizes, dst_size, false);
  return out;
}

// out (B, H*W, sum C_i) += multi_tower_interpolate(features): the resize is added into an existing buffer
// instead of written to a new one (no (B, H*W, C) temporary, no separate add pass).
void multi_tower_interpolate_accumulate_cpu(const at::Tensor& out, at::TensorList features, at::IntArrayRef src_sizes,
                                            at::IntArrayRef dst_size) {
  const int64_t c_total = check_interp_args(features, src_sizes, dst_size);
  TORCH_CHECK(out.device().is_cpu(), "multi_tower_interpolate_accumulate_: out is on ", out.device());
  TORCH_CHECK(out.dim() == 3 && out.size(0) == features[0].size(0) && out.size(1) == dst_size[0] * dst_size[1] &&
              out.size(2) == c_total, "multi_tower_interpolate_accumulate_: out has shape ", out.sizes(), ", expected (",
              features[0].size(0), ", ", dst_size[0] * dst_size[1], ", ", c_total, ")");
  TORCH_CHECK(out.numel() == 0 || out.stride(2) == 1 || c_total == 1,
              "multi_tower_interpolate_accumulate_: out must have channel stride 1, got strides ", out.strides());
  for (const at::Tensor& x : features)
    TORCH_CHECK(x.scalar_type() == out.scalar_type(), "multi_tower_interpolate_accumulate_: grid dtype ",
                x.scalar_type(), " differs from out's ", out.scalar_type());
  interpolate_into(out, features, src_sizes, dst_size, true);
}

std::vector<at::Tensor> multi_tower_interpolate_backward_cpu(const at::Tensor& grad_out, at::IntArrayRef src_sizes,
                                                             at::IntArrayRef dst_size, at::IntArrayRef channels) {
  TORCH_CHECK(src_sizes.size() == 2 * channels.size() && dst_size.size() == 2,
              "multi_tower_interpolate_backward: inconsistent sizes");
  const int64_t H = dst_size[0], W = dst_size[1];
  int64_t c_total = 0;
  for (int64_t c : channels) c_total += c;
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(1) == H * W && grad_out.size(2) == c_total,
              "multi_tower_interpolate_backward: grad_out has shape ", grad_out.sizes(), ", expected (B, ", H * W, ", ", c_total, ")");
  const int dt = dtype_index(grad_out.scalar_type(), "multi_tower_interpolate_backward");
  const at::Tensor g = grad_out.stride(2) == 1 ? grad_out : grad_out.contiguous();
  const int64_t B = g.size(0);
  const AtenMath math = aten_math();
  std::vector<at::Tensor> grads;
  int64_t c_off = 0;
  for (size_t i = 0; i < channels.size(); ++i) {
    const int64_t h = src_sizes[2 * i], w = src_sizes[2 * i + 1], C = channels[i];
    const at::Tensor gs = g.narrow(2, c_off, C);
    c_off += C;
    if (h == H && w == W) {
      grads.push_back(gs.clone(at::MemoryFormat::Contiguous));
      continue;
    }
    at::Tensor gx = empty_output({B, h * w, C}, g.options());
    if (gx.numel() > 0) {
      InterpBackward p{};
      p.g = gs.data_ptr();
      p.g_sb = gs.stride(0);
      p.g_st = gs.stride(1);
      p.gx = gx.data_ptr();
      p.B = B; p.h = h; p.w = w; p.C = C; p.H = H; p.W = W;
      p.fused = math.fused;
      p.stream = gx.nbytes() > kStreamBytes;
      p.nthreads = threads_for(static_cast<int64_t>(2 * gx.nbytes()));
      run_kernel(active_table()->interp_backward[dt], p);
    }
    grads.push_back(gx);
  }
  return grads;
}

// ------------------------------------------------------------------------------------------------
// sva_window_attention
// ------------------------------------------------------------------------------------------------
// Checked, contiguous inputs plus the raw parameter block pointing into them.
struct Prepared {
  at::Tensor q, offsets, rects, masks;
  std::vector<at::Tensor> k, v;
  std::vector<int64_t> n, r, mask_off;
  std::vector<const void*> kp, vp;
  WindowAttention p{};
  int dt = 0;
};

Prepared prepare(const at::Tensor& q, at::TensorList keys, at::TensorList values, int64_t num_heads, int64_t grid_side,
                 const std::optional<at::Tensor>& query_offsets, const std::optional<at::Tensor>& valid_rects,
                 const std::optional<at::Tensor>& masks, double scale) {
  Prepared pr;
  TORCH_CHECK(q.dim() == 4 && q.device().is_cpu(), "sva_window_attention (cpu): q must be a CPU (B, h, w, D) tensor, got ",
              q.sizes(), " on ", q.device());
  pr.dt = dtype_index(q.scalar_type(), "sva_window_attention");
  const int64_t B = q.size(0), h = q.size(1), w = q.size(2), D = q.size(3), s = grid_side;
  TORCH_CHECK(num_heads > 0 && D % num_heads == 0, "sva_window_attention: width ", D, " not divisible by num_heads=", num_heads);
  TORCH_CHECK(s > 0, "sva_window_attention: grid_side must be positive");
  TORCH_CHECK(!keys.empty() && keys.size() == values.size(), "sva_window_attention: need as many value grids as key grids (>0)");
  const int64_t T = static_cast<int64_t>(keys.size());
  pr.q = q.contiguous();
  int64_t mask_len = 0;
  for (int64_t i = 0; i < T; ++i) {
    const at::Tensor& k = keys[i];
    const at::Tensor& v = values[i];
    TORCH_CHECK(k.dim() == 4 && k.size(0) == B && k.size(1) == k.size(2) && k.size(3) == D && v.sizes() == k.sizes(),
                "sva_window_attention: keys[", i, "] ", k.sizes(), " / values[", i, "] ", v.sizes(), " must be (", B, ", n, n, ", D, ")");
    TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                "sva_window_attention: keys/values must have q's dtype ", q.scalar_type());
    TORCH_CHECK(k.device().is_cpu() && v.device().is_cpu(), "sva_window_attention (cpu): tensors must be on the CPU");
    TORCH_CHECK(k.size(1) % s == 0, "sva_window_attention: tower ", i, " grid side ", k.size(1), " not divisible by ", s);
    pr.k.push_back(k.contiguous());
    pr.v.push_back(v.contiguous());
    pr.n.push_back(k.size(1));
    pr.r.push_back(k.size(1) / s);
    pr.mask_off.push_back(mask_len);
    mask_len += k.size(1) * k.size(1);
  }
  TORCH_CHECK(!(valid_rects.has_value() && masks.has_value()), "sva_window_attention: give valid_rects or masks, not both");
  if (query_offsets.has_value()) {
    pr.offsets = query_offsets->to(at::kCPU, at::kLong).contiguous();
    TORCH_CHECK(pr.offsets.dim() == 2 && pr.offsets.size(0) == B && pr.offsets.size(1) == 2,
                "sva_window_attention: query_offsets must be (", B, ", 2)");
    const int64_t* o = pr.offsets.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(o[2 * b] >= 0 && o[2 * b + 1] >= 0 && o[2 * b] + h <= s && o[2 * b + 1] + w <= s, "sva_window_attention: a ",
                  h, "x", w, " query grid at offset (", o[2 * b], ", ", o[2 * b + 1], ") does not fit the ", s, "x", s, " window grid");
  } else {
    TORCH_CHECK(h == s && w == s, "sva_window_attention: q grid ", h, "x", w, " differs from the ", s, "x", s,
                " window grid and no query_offsets were given");
  }
  if (valid_rects.has_value()) {
    pr.rects = valid_rects->to(at::kCPU, at::kLong).contiguous();
    TORCH_CHECK(pr.rects.dim() == 3 && pr.rects.size(0) == T && pr.rects.size(1) == B && pr.rects.size(2) == 4,
                "sva_window_attention: valid_rects must be (", T, ", ", B, ", 4), got ", pr.rects.sizes());
  }
  if (masks.has_value()) {
    pr.masks = masks->to(at::kCPU, at::kBool).contiguous();
    TORCH_CHECK(pr.masks.dim() == 2 && pr.masks.size(0) == B && pr.masks.size(1) == mask_len,
                "sva_window_attention: masks must be (", B, ", ", mask_len, ") bool, got ", pr.masks.sizes());
  }
  for (int64_t i = 0; i < T; ++i) {
    pr.kp.push_back(pr.k[i].data_ptr());
    pr.vp.push_back(pr.v[i].data_ptr());
  }
  WindowAttention& p = pr.p;
  p.B = B; p.h = h; p.w = w; p.D = D; p.heads = num_heads; p.head_dim = D / num_heads; p.s = s; p.T = T;
  p.n = pr.n.data();
  p.r = pr.r.data();
  p.q = pr.q.data_ptr();
  p.k = pr.kp.data();
  p.v = pr.vp.data();
  p.offsets = pr.offsets.defined() ? pr.offsets.data_ptr<int64_t>() : nullptr;
  p.rects = pr.rects.defined() ? pr.rects.data_ptr<int64_t>() : nullptr;
  p.masks = pr.masks.defined() ? reinterpret_cast<const uint8_t*>(pr.masks.data_ptr<bool>()) : nullptr;
  p.mask_len = mask_len;
  p.mask_off = pr.mask_off.data();
  p.scale = scale;
  int64_t bytes = 2 * static_cast<int64_t>(pr.q.nbytes());
  for (int64_t i = 0; i < T; ++i) bytes += static_cast<int64_t>(pr.k[i].nbytes() + pr.v[i].nbytes());
  p.nthreads = threads_for(bytes);
  return pr;
}

at::ScalarType lse_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor> sva_window_attention_cpu(
    const at::Tensor& q, at::TensorList keys, at::TensorList values, int64_t num_heads, int64_t grid_side,
    const std::optional<at::Tensor>& query_offsets, const std::optional<at::Tensor>& valid_rects,
    const std::optional<at::Tensor>& masks, double scale) {
  Prepared pr = prepare(q, keys, values, num_heads, grid_side, query_offsets, valid_rects, masks, scale);
  at::Tensor out = at::empty_like(pr.q);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2), num_heads}, q.options().dtype(lse_dtype(q.scalar_type())));
  if (out.numel() > 0) {
    pr.p.out = out.data_ptr();
    pr.p.lse = lse.data_ptr();
    run_kernel(active_table()->attn_forward[pr.dt], pr.p);
  }
  return {out, lse};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> sva_window_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, at::TensorList keys, at::TensorList values, const at::Tensor& lse,
    int64_t num_heads, int64_t grid_side, const std::optional<at::Tensor>& query_offsets,
    const std::optional<at::Tensor>& valid_rects, const std::optional<at::Tensor>& masks, double scale) {
  Prepared pr = prepare(q, keys, values, num_heads, grid_side, query_offsets, valid_rects, masks, scale);
  TORCH_CHECK(grad_out.sizes() == q.sizes(), "sva_window_attention_backward: grad_out ", grad_out.sizes(), " != q ", q.sizes());
  TORCH_CHECK(lse.dim() == 4 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2) &&
                  lse.size(3) == num_heads,
              "sva_window_attention_backward: lse has shape ", lse.sizes());
  const at::Tensor go = grad_out.to(q.scalar_type()).contiguous();
  const at::Tensor ls = lse.to(lse_dtype(q.scalar_type())).contiguous();
  at::Tensor gq = at::empty_like(pr.q);
  // Every window is read by at most one query; with a sub-rectangle of queries some are read by none.
  const bool covered = q.size(1) == grid_side && q.size(2) == grid_side;
  std::vector<at::Tensor> gk, gv;
  std::vector<void*> gkp, gvp;
  for (size_t i = 0; i < pr.k.size(); ++i) {
    gk.push_back(empty_output(pr.k[i].sizes(), pr.k[i].options()));
    gv.push_back(empty_output(pr.v[i].sizes(), pr.v[i].options()));
    if (!covered) {
      gk.back().zero_();
      gv.back().zero_();
    }
    gkp.push_back(gk.back().data_ptr());
    gvp.push_back(gv.back().data_ptr());
  }
  int64_t grad_bytes = 0;
  for (size_t i = 0; i < gk.size(); ++i) grad_bytes += gk[i].nbytes() + gv[i].nbytes();
  if (gq.numel() > 0) {
    pr.p.stream = grad_bytes > kStreamBytes;
    pr.p.gout = go.data_ptr();
    pr.p.lse = const_cast<void*>(ls.data_ptr());
    pr.p.gq = gq.data_ptr();
    pr.p.gk = gkp.data();
    pr.p.gv = gvp.data();
    run_kernel(active_table()->attn_backward[pr.dt], pr.p);
  }
  return {gq, gk, gv};
}

// ------------------------------------------------------------------------------------------------
// window_pos_layer_norm
// ------------------------------------------------------------------------------------------------
void check_pos_layer_norm(const at::Tensor& out, const at::Tensor& grid, const std::optional<at::Tensor>& pos,
                          int64_t window_side) {
  TORCH_CHECK(grid.device().is_cpu() && grid.dim() == 4 && grid.size(1) == grid.size(2),
              "window_pos_layer_norm: grid must be a (B, n, n, C) CPU tensor, got ", grid.sizes());
  const int64_t n = grid.size(1), C = grid.size(3);
  TORCH_CHECK(window_side > 0 && n % window_side == 0, "window_pos_layer_norm: window side ", window_side,
              " does not divide the grid side ", n);
  dtype_index(grid.scalar_type(), "window_pos_layer_norm");
  if (pos.has_value()) {
    TORCH_CHECK(pos->device().is_cpu() && pos->scalar_type() == grid.scalar_type() && pos->dim() == 2 &&
                pos->size(0) == window_side * window_side && pos->size(1) == C,
                "window_pos_layer_norm: pos must be (", window_side * window_side, ", ", C, ") of the grid's dtype, got ",
                pos->scalar_type(), " ", pos->sizes());
  }
  TORCH_CHECK(out.device().is_cpu() && out.sizes() == grid.sizes() && out.scalar_type() == grid.scalar_type() &&
              out.is_contiguous(), "window_pos_layer_norm: out must be a contiguous tensor like the grid, got ",
              out.scalar_type(), " ", out.sizes());
}

void run_pos_layer_norm(const at::Tensor& out, const at::Tensor& grid, const std::optional<at::Tensor>& pos,
                        int64_t window_side, double eps) {
  if (out.numel() == 0) return;
  const at::Tensor x = grid.contiguous();
  at::Tensor pc;
  if (pos.has_value()) pc = pos->contiguous();
  PosLayerNorm p{};
  p.x = x.data_ptr();
  p.pos = pc.defined() ? pc.data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.B = x.size(0); p.n = x.size(1); p.r = window_side; p.C = x.size(3);
  p.eps = eps;
  p.nthreads = threads_for(static_cast<int64_t>(2 * out.nbytes()));
  run_kernel(active_table()->pos_layer_norm[dtype_index(x.scalar_type(), "window_pos_layer_norm")], p);
}

at::Tensor window_pos_layer_norm_cpu(const at::Tensor& grid, const std::optional<at::Tensor>& pos, int64_t window_side,
                                     double eps) {
  at::Tensor out = empty_output(grid.sizes(), grid.options().memory_format(at::MemoryFormat::Contiguous));
  check_pos_layer_norm(out, grid, pos, window_side);
  run_pos_layer_norm(out, grid, pos, window_side, eps);
  return out;
}

void window_pos_layer_norm_out_cpu(const at::Tensor& out, const at::Tensor& grid, const std::optional<at::Tensor>& pos,
                                   int64_t window_side, double eps) {
  check_pos_layer_norm(out, grid, pos, window_side);
  TORCH_CHECK(!out.is_same(grid) && (out.numel() == 0 || out.data_ptr() != grid.data_ptr()),
              "window_pos_layer_norm_out_: out must not be the grid");
  run_pos_layer_norm(out, grid, pos, window_side, eps);
}

}  // namespace
}  // namespace cambrian::cpu

namespace cambrian::cpu {
namespace {

// Autograd of multi_tower_interpolate in C++ (at the Autograd dispatch key) rather than through
// torch.library.register_autograd: a Python autograd kernel runs on every call, grad or not, and with the
// interpreter's code and objects out of cache (a large op in between) that costs ~0.1-0.3 ms per call,
// more than the whole SigLIP resize moves.  Same formula: the backward op per grid, cast to the grid's dtype.
// The forward op with the autograd key masked off (the CPU kernel, or whatever sits below autograd).
at::Tensor interpolate_below_autograd(at::TensorList features, at::IntArrayRef src_sizes, at::IntArrayRef dst_size) {
  at::AutoDispatchBelowADInplaceOrView guard;
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("cambrian::multi_tower_interpolate", "")
                             .typed<at::Tensor(at::TensorList, at::IntArrayRef, at::IntArrayRef)>();
  return op.call(features, src_sizes, dst_size);
}

class InterpolateFunction : public torch::autograd::Function<InterpolateFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, at::TensorList features, at::IntArrayRef src_sizes,
                            at::IntArrayRef dst_size) {
    std::vector<int64_t> channels, dtypes;
    for (const at::Tensor& f : features) {
      channels.push_back(f.size(-1));
      dtypes.push_back(static_cast<int64_t>(f.scalar_type()));
    }
    ctx->saved_data["src_sizes"] = src_sizes.vec();
    ctx->saved_data["dst_size"] = dst_size.vec();
    ctx->saved_data["channels"] = channels;
    ctx->saved_data["dtypes"] = dtypes;
    return interpolate_below_autograd(features, src_sizes, dst_size);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("cambrian::multi_tower_interpolate_backward", "")
                               .typed<std::vector<at::Tensor>(const at::Tensor&, at::IntArrayRef, at::IntArrayRef,
                                                              at::IntArrayRef)>();
    const std::vector<int64_t> src = ctx->saved_data["src_sizes"].toIntVector();
    const std::vector<int64_t> dst = ctx->saved_data["dst_size"].toIntVector();
    const std::vector<int64_t> channels = ctx->saved_data["channels"].toIntVector();
    const std::vector<int64_t> dtypes = ctx->saved_data["dtypes"].toIntVector();
    std::vector<at::Tensor> grads = op.call(grad_outputs[0], src, dst, channels);
    torch::autograd::variable_list out;
    for (size_t i = 0; i < grads.size(); ++i) {
      const auto dt = static_cast<at::ScalarType>(dtypes[i]);
      out.push_back(grads[i].scalar_type() == dt ? grads[i] : grads[i].to(dt));
    }
    out.emplace_back();  // src_sizes
    out.emplace_back();  // dst_size
    return out;
  }
};

// Whether a call must record an autograd node: grad mode on and some input requiring a gradient.  Without
// one the autograd kernels call the op below autograd directly, skipping the node and its saved state (a
// cold call pays for every allocation).
bool needs_grad(std::initializer_list<at::TensorList> inputs) {
  if (!at::GradMode::is_enabled()) return false;
  for (at::TensorList list : inputs)
    for (const at::Tensor& t : list)
      if (t.requires_grad()) return true;
  return false;
}

at::Tensor multi_tower_interpolate_autograd(at::TensorList features, at::IntArrayRef src_sizes, at::IntArrayRef dst_size) {
  if (needs_grad({features})) return InterpolateFunction::apply(features, src_sizes, dst_size);
  return interpolate_below_autograd(features, src_sizes, dst_size);
}

// sva_window_attention's autograd, in C++ for the same reason.  Saved: q, lse, the key/value grids and the
// validity inputs; the backward op recomputes the attention weights from lse (flash-attention style).
using AttnSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, at::TensorList, at::TensorList, int64_t, int64_t,
                                                   const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                                   const std::optional<at::Tensor>&, double);
std::tuple<at::Tensor, at::Tensor> attention_below_autograd(
    const at::Tensor& q, at::TensorList keys, at::TensorList values, int64_t num_heads, int64_t grid_side,
    const std::optional<at::Tensor>& query_offsets, const std::optional<at::Tensor>& valid_rects,
    const std::optional<at::Tensor>& masks, double scale) {
  at::AutoDispatchBelowADInplaceOrView guard;
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("cambrian::sva_window_attention", "").typed<AttnSig>();
  return op.call(q, keys, values, num_heads, grid_side, query_offsets, valid_rects, masks, scale);
}

class AttentionFunction : public torch::autograd::Function<AttentionFunction> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const at::Tensor& q, at::TensorList keys, at::TensorList values,
      int64_t num_heads, int64_t grid_side, const std::optional<at::Tensor>& query_offsets,
      const std::optional<at::Tensor>& valid_rects, const std::optional<at::Tensor>& masks, double scale) {
    auto [out, lse] = attention_below_autograd(q, keys, values, num_heads, grid_side, query_offsets, valid_rects, masks,
                                               scale);
    ctx->mark_non_differentiable({lse});
    std::vector<at::Tensor> saved = {q, lse, query_offsets.value_or(at::Tensor()), valid_rects.value_or(at::Tensor()),
                                     masks.value_or(at::Tensor())};
    saved.insert(saved.end(), keys.begin(), keys.end());
    saved.insert(saved.end(), values.begin(), values.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["towers"] = static_cast<int64_t>(keys.size());
    ctx->saved_data["num_heads"] = num_heads;
    ctx->saved_data["grid_side"] = grid_side;
    ctx->saved_data["scale"] = scale;
    return {out, lse};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    using BackwardSig = std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>(
        const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList, const at::Tensor&, int64_t, int64_t,
        const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double);
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("cambrian::sva_window_attention_backward", "")
                               .typed<BackwardSig>();
    const std::vector<at::Tensor> saved = ctx->get_saved_variables();
    const int64_t t = ctx->saved_data["towers"].toInt();
    auto opt = [](const at::Tensor& x) { return x.defined() ? std::optional<at::Tensor>(x) : std::nullopt; };
    const std::vector<at::Tensor> keys(saved.begin() + 5, saved.begin() + 5 + t);
    const std::vector<at::Tensor> values(saved.begin() + 5 + t, saved.end());
    auto [gq, gk, gv] = op.call(grad_outputs[0], saved[0], keys, values, saved[1], ctx->saved_data["num_heads"].toInt(),
                                ctx->saved_data["grid_side"].toInt(), opt(saved[2]), opt(saved[3]), opt(saved[4]),
                                ctx->saved_data["scale"].toDouble());
    torch::autograd::variable_list grads = {gq};
    grads.insert(grads.end(), gk.begin(), gk.end());
    grads.insert(grads.end(), gv.begin(), gv.end());
    grads.resize(grads.size() + 6);  // num_heads, grid_side, query_offsets, valid_rects, masks, scale
    return grads;
  }
};

std::tuple<at::Tensor, at::Tensor> sva_window_attention_autograd(
    const at::Tensor& q, at::TensorList keys, at::TensorList values, int64_t num_heads, int64_t grid_side,
    const std::optional<at::Tensor>& query_offsets, const std::optional<at::Tensor>& valid_rects,
    const std::optional<at::Tensor>& masks, double scale) {
  if (!needs_grad({q, keys, values}))
    return attention_below_autograd(q, keys, values, num_heads, grid_side, query_offsets, valid_rects, masks, scale);
  torch::autograd::variable_list r =
      AttentionFunction::apply(q, keys, values, num_heads, grid_side, query_offsets, valid_rects, masks, scale);
  return {r[0], r[1]};
}
}  // namespace
}  // namespace cambrian::cpu

TORCH_LIBRARY(cambrian, m) {
  const std::vector<at::Tag> tags = {at::Tag::pt2_compliant_tag};
  m.def("multi_tower_interpolate(Tensor[] features, int[] src_sizes, int[] dst_size) -> Tensor", tags);
  m.def("multi_tower_interpolate_backward(Tensor grad_out, int[] src_sizes, int[] dst_size, int[] channels) -> Tensor[]", tags);
  m.def("multi_tower_interpolate_accumulate_(Tensor(a!) out, Tensor[] features, int[] src_sizes, int[] dst_size) -> ()",
        tags);
  m.def("window_pos_layer_norm(Tensor grid, Tensor? pos, int window_side, float eps) -> Tensor", tags);
  m.def("window_pos_layer_norm_out_(Tensor(a!) out, Tensor grid, Tensor? pos, int window_side, float eps) -> ()", tags);
  m.def("sva_window_attention(Tensor q, Tensor[] keys, Tensor[] values, int num_heads, int grid_side, "
        "Tensor? query_offsets, Tensor? valid_rects, Tensor? masks, float scale) -> (Tensor, Tensor)", tags);
  m.def("sva_window_attention_backward(Tensor grad_out, Tensor q, Tensor[] keys, Tensor[] values, Tensor lse, "
        "int num_heads, int grid_side, Tensor? query_offsets, Tensor? valid_rects, Tensor? masks, float scale) "
        "-> (Tensor, Tensor[], Tensor[])", tags);
}

TORCH_LIBRARY_IMPL(cambrian, CPU, m) {
  m.impl("multi_tower_interpolate", &cambrian::cpu::multi_tower_interpolate_cpu);
  m.impl("multi_tower_interpolate_backward", &cambrian::cpu::multi_tower_interpolate_backward_cpu);
  m.impl("multi_tower_interpolate_accumulate_", &cambrian::cpu::multi_tower_interpolate_accumulate_cpu);
  m.impl("window_pos_layer_norm", &cambrian::cpu::window_pos_layer_norm_cpu);
  m.impl("window_pos_layer_norm_out_", &cambrian::cpu::window_pos_layer_norm_out_cpu);
  m.impl("sva_window_attention", &cambrian::cpu::sva_window_attention_cpu);
  m.impl("sva_window_attention_backward", &cambrian::cpu::sva_window_attention_backward_cpu);
}

TORCH_LIBRARY_IMPL(cambrian, Autograd, m) {
  m.impl("multi_tower_interpolate", &cambrian::cpu::multi_tower_interpolate_autograd);
  m.impl("sva_window_attention", &cambrian::cpu::sva_window_attention_autograd);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "cambrian CPU kernels: registers the torch.ops.cambrian ops (CPU) on import";
  m.def("isa", [] { return std::string(cambrian::cpu::active_table()->name); },
        "instruction-set variant the kernels run with: 'avx512', 'avx2' or 'base'");
  m.def("cpu_supports", [](const std::string& isa) { return cambrian::cpu::cpu_has(isa); },
        "whether this CPU can run the given variant");
  m.def("hugepages", [] { return cambrian::cpu::hugepages_enabled(); },
        "whether outputs of >= 32 MB ask for transparent huge pages (see CAMBRIAN_CPU_HUGEPAGES)");
  m.def("kernel_time_ns", [] { return cambrian::cpu::kernel_ns().load(); },
        "nanoseconds spent inside the kernel bodies since load (all ops and threads' calls; for benchmarks)");
  m.def("set_isa", [](const std::string& isa) {
          TORCH_CHECK(cambrian::cpu::cpu_has(isa), "ISA variant ", isa, " is not supported on this CPU");
          const std::string previous = cambrian::cpu::active_table()->name;
          cambrian::cpu::active_table() = cambrian::cpu::table_named(isa);
          return previous;
        },
        "switch the variant (for tests / benchmarks); returns the previous one");
}
