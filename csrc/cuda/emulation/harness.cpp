// C entry points over the launchers of ../cuda_kernels.cu, compiled for the host with the emulation
// in cuda_emulation.h (tests/test_cuda_compile.py builds this with g++ and calls it through ctypes).
// Each function fills the parameter block exactly as ../cuda_ops.cu does from tensors.
#include "cuda_emulation.h"

#include "../cuda_kernels.cu"

using namespace cambrian::cuda;

extern "C" {

int emu_interp_forward(const void* x, int64_t x_sb, int64_t x_st, int64_t x_sc, void* out, int64_t o_sb, int64_t o_st,
                       const int64_t* dims /* B, h, w, C, H, W */, int dtype) {
  InterpForwardParams p{};
  p.x = x;
  p.x_sb = x_sb;
  p.x_st = x_st;
  p.x_sc = x_sc;
  p.out = out;
  p.o_sb = o_sb;
  p.o_st = o_st;
  p.B = dims[0]; p.h = dims[1]; p.w = dims[2]; p.C = dims[3]; p.H = dims[4]; p.W = dims[5];
  return interp_forward(p, static_cast<DType>(dtype), nullptr);
}

int emu_interp_backward(const void* g, int64_t g_sb, int64_t g_st, void* gx, const int64_t* dims /* B, h, w, C, H, W */,
                        int dtype) {
  InterpBackwardParams p{};
  p.g = g;
  p.g_sb = g_sb;
  p.g_st = g_st;
  p.gx = gx;
  p.B = dims[0]; p.h = dims[1]; p.w = dims[2]; p.C = dims[3]; p.H = dims[4]; p.W = dims[5];
  return interp_backward(p, static_cast<DType>(dtype), nullptr);
}

int emu_window_attention(int backward, int dtype, const int64_t* dims /* B, h, w, D, heads, s, T */, const int64_t* r,
                         const void* q, const void* const* k, const void* const* v, const int64_t* offsets, const int64_t* rects,
                         const uint8_t* masks, int64_t mask_sb, const int64_t* mask_off, double scale, void* out,
                         void* lse, const void* gout, void* gq, void* const* gk, void* const* gv) {
  WindowAttentionParams p{};
  p.B = dims[0]; p.h = dims[1]; p.w = dims[2]; p.D = dims[3]; p.heads = dims[4]; p.s = dims[5];
  p.T = static_cast<int>(dims[6]);
  p.head_dim = p.D / p.heads;
  if (p.T > kMaxTowers) return cudaErrorInvalidValue;
  for (int t = 0; t < p.T; ++t) {
    p.r[t] = r[t];
    p.k[t] = k[t];
    p.v[t] = v[t];
    p.masks[t] = masks != nullptr ? masks + mask_off[t] : nullptr;
    if (backward) {
      p.gk[t] = gk[t];
      p.gv[t] = gv[t];
    }
  }
  p.q = q;
  p.offsets = offsets;
  p.rects = rects;
  p.mask_sb = mask_sb;
  p.scale = scale;
  p.lse = lse;
  p.out = out;
  p.gout = gout;
  p.gq = gq;
  return backward ? window_attention_backward(p, static_cast<DType>(dtype), nullptr)
                  : window_attention_forward(p, static_cast<DType>(dtype), nullptr);
}

}  // extern "C"
