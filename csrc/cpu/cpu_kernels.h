// Raw-pointer CPU kernels of cambrian's fused ops: parameter blocks and the per-ISA dispatch table.
//
// The kernels themselves (kernels_impl.h) are compiled three times, once per instruction set
// (isa_base.cpp, isa_avx2.cpp, isa_avx512.cpp, each with its own `#pragma GCC target`), and ops.cpp
// picks one table at load time.  This header is plain C++ (no torch, no inline code) so it can be
// included from every translation unit without dragging target-specific code across them.
#pragma once

#include <cstdint>

namespace cambrian::cpu {

// Storage dtypes, in the order of the KernelTable arrays.
enum DType : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3, kNumDTypes = 4 };

// Formulas of ATen's bilinear kernels (align_corners=False); see ops.cpp `aten_formula`.
enum InterpFormula : int {
  kChannelsLast = 0,  // upsample_linear_channels_last: 4 weight products, vector body + scalar tail
  kGeneric = 1,       // upsample_non_separable (NCHW): rows of column-interpolated values
};

// One tower of multi_tower_interpolate, forward.  Element strides; channel stride of `out` is 1.
struct InterpForward {
  const void* x;                 // (B, h*w, C) with strides (x_sb, x_st, x_sc); x_sc == 1 or x_st == 1
  int64_t x_sb, x_st, x_sc;
  void* out;                     // channel 0 of this tower inside the (B, H*W, sum C) output
  int64_t o_sb, o_st;
  int64_t B, h, w, C, H, W;
  int formula;                   // InterpFormula
  int block;                     // kChannelsLast: channels [0, C - C % block) use the vector formula
  int fused;                     // 1: multiply-adds fused as in ATen's AVX2/AVX512 builds
  int stream;                    // 1: non-temporal stores (output larger than the last-level cache)
  int accumulate;                // 1: out += result (rounded to the storage type first); no streaming
  int nthreads;
};

// One tower of multi_tower_interpolate, backward (gather form: every input cell written once).
struct InterpBackward {
  const void* g;                 // grad of the output at channel 0 of this tower, channel stride 1
  int64_t g_sb, g_st;
  void* gx;                      // (B, h*w, C) contiguous
  int64_t B, h, w, C, H, W;
  int fused;                     // source-index rule of the forward (same taps)
  int stream;                    // 1: non-temporal stores
  int nthreads;
};

// sva_window_attention forward / backward.  q, keys, values (and their grads) are contiguous.
struct WindowAttention {
  int64_t B, h, w, D, heads, head_dim, s, T;
  const int64_t* n;              // (T) tower grid sides
  const int64_t* r;              // (T) window sides, n[i] = s * r[i]
  const void* q;                 // (B, h, w, D)
  const void* const* k;          // T pointers to (B, n_i, n_i, D)
  const void* const* v;
  const int64_t* offsets;        // (B, 2) query-grid offsets (row0, col0) or nullptr
  const int64_t* rects;          // (T, B, 4) [row0, row1, col0, col1) or nullptr
  const uint8_t* masks;          // (B, mask_len) bool bytes or nullptr; tower i at column mask_off[i]
  int64_t mask_len;
  const int64_t* mask_off;
  double scale;
  void* out;                     // (B, h, w, D)
  void* lse;                     // (B, h, w, heads) float32 (float64 for float64 inputs)
  // backward only
  const void* gout;              // (B, h, w, D)
  void* gq;                      // (B, h, w, D)
  void* const* gk;               // T pointers to (B, n_i, n_i, D); windows no query reads are pre-zeroed
  void* const* gv;
  int stream;                    // 1: non-temporal stores for the key/value gradients
  int nthreads;
};

// window_pos_layer_norm: per token (b, y, x), out = (v - mean(v)) / sqrt(var(v) + eps) with
// v = x + pos[(y mod r) * r + (x mod r)] rounded to the storage type (LayerNorm without affine).
struct PosLayerNorm {
  const void* x;                 // (B, n, n, C) contiguous
  const void* pos;               // (r*r, C) contiguous, or nullptr (no position embedding)
  void* out;                     // (B, n, n, C) contiguous
  int64_t B, n, r, C;
  double eps;
  int nthreads;
};

struct KernelTable {
  const char* name;
  void (*interp_forward[kNumDTypes])(const InterpForward&);
  void (*interp_backward[kNumDTypes])(const InterpBackward&);
  void (*attn_forward[kNumDTypes])(const WindowAttention&);
  void (*attn_backward[kNumDTypes])(const WindowAttention&);
  void (*pos_layer_norm[kNumDTypes])(const PosLayerNorm&);
};

const KernelTable* table_base();
const KernelTable* table_avx2();
const KernelTable* table_avx512();

}  // namespace cambrian::cpu
