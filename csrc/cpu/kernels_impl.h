// Kernel bodies, included once per ISA translation unit inside its own namespace (see isa_*.cpp).
//
// Rules that keep the three copies apart (they are linked into one library):
//   * no std:: templates or inline library functions here (std::vector, std::min, std::fma, ...):
//     a COMDAT copy compiled for AVX-512 could be picked by the linker for the baseline build.
//     Builtins (__builtin_fmaf, __builtin_memcpy, ...) and plain libc calls are fine.
//   * everything is `static` or lives in the per-ISA namespace.
// The including file defines CAMBRIAN_ISA_AVX512 / CAMBRIAN_ISA_AVX2 (or neither) and has
// `#pragma GCC optimize("fp-contract=off")` in force, so a*b+c is never silently fused: fused
// multiply-adds are written out (madd<true>) exactly where ATen's kernels have them.
//
// Numerics: float32 accumulation for float32/float16/bfloat16 storage, float64 for float64.

#if defined(CAMBRIAN_ISA_AVX512) || defined(CAMBRIAN_ISA_AVX2)
#define CAMBRIAN_HAS_FMA 1
#endif

// Parallel loops use dynamic scheduling: on a shared machine a descheduled thread would otherwise
// hold up a static split (the kernels are memory-bound; chunk overhead is negligible).

// ------------------------------------------------------------------------------------------------
// small helpers
// ------------------------------------------------------------------------------------------------
struct f16_t { uint16_t bits; };
struct bf16_t { uint16_t bits; };

template <class T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <class T> using acc_t = typename AccOf<T>::type;

typedef uint32_t __attribute__((may_alias)) u32_alias;
typedef uint16_t __attribute__((may_alias)) u16_alias;

static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

template <class A>
struct Scratch {  // per-thread buffer (no std containers in this file, see above)
  A* p;
  // cache-line aligned: at malloc's 16-byte alignment most AVX-512 vectors read from a buffer straddle two
  // lines; measured ~5-10% of the ConvNeXt resize, whose output loop blends two such buffers
  explicit Scratch(int64_t n)
      : p(static_cast<A*>(aligned_alloc(64, (sizeof(A) * static_cast<size_t>(n > 0 ? n : 1) + 63) / 64 * 64))) {}
  ~Scratch() { free(p); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  A& operator[](int64_t i) { return p[i]; }
};

// a*b + c: fused (one rounding) or two roundings, as the ATen build being matched does it.
template <bool F> static inline float madd(float a, float b, float c) {
  if constexpr (F) return __builtin_fmaf(a, b, c); else return a * b + c;
}
template <bool F> static inline double madd(double a, double b, double c) {
  if constexpr (F) return __builtin_fma(a, b, c); else return a * b + c;
}
// a*b + c where the rounding does not matter: fused when the ISA has FMA (faster), else plain.
#if defined(CAMBRIAN_HAS_FMA)
static inline float fmac(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
static inline double fmac(double a, double b, double c) { return __builtin_fma(a, b, c); }
#else
static inline float fmac(float a, float b, float c) { return a * b + c; }
static inline double fmac(double a, double b, double c) { return a * b + c; }
#endif

static inline float bits_f32(uint32_t u) { float f; __builtin_memcpy(&f, &u, 4); return f; }
static inline uint32_t f32_bits(float f) { uint32_t u; __builtin_memcpy(&u, &f, 4); return u; }

// IEEE binary16 <-> binary32, exact / round-to-nearest-even (the classic branch-free bit recipes;
// same results as c10::Half and the F16C instructions).
static inline float f16_to_f32(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_f32((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_f32((two_w >> 17) | (126u << 23)) - 0.5f;
  return bits_f32(sign | (two_w < (1u << 27) ? f32_bits(denormalized) : f32_bits(normalized)));
}
static inline uint16_t f32_to_f16(float f) {
  float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = f32_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = bits_f32((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

// ---- rows of storage values <-> accumulation type ----
static inline void load_row(const f16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(CAMBRIAN_ISA_AVX512)
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
#elif defined(CAMBRIAN_ISA_AVX2)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < n; ++i) dst[i] = f16_to_f32(src[i].bits);
}
static inline void load_row(const bf16_t* src, float* dst, int64_t n) {
  const u16_alias* s = reinterpret_cast<const u16_alias*>(src);
  u32_alias* d = reinterpret_cast<u32_alias*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;  // exact
}
static inline void store_row(const float* src, f16_t* dst, int64_t n) {
  int64_t i = 0;
#if defined(CAMBRIAN_ISA_AVX512)
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(CAMBRIAN_ISA_AVX2)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; i < n; ++i) dst[i].bits = f32_to_f16(src[i]);
}
static inline void store_row(const float* src, bf16_t* dst, int64_t n) {
  // round to nearest even; NaN -> 0x7FC0 (c10::BFloat16's rule)
  const u32_alias* s = reinterpret_cast<const u32_alias*>(src);
  u16_alias* d = reinterpret_cast<u16_alias*>(dst);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = s[i];
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    d[i] = static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
  }
}
static inline void store_row(const float* src, float* dst, int64_t n) {
  if (src != dst) __builtin_memcpy(dst, src, sizeof(float) * static_cast<size_t>(n));
}
static inline void store_row(const double* src, double* dst, int64_t n) {
  if (src != dst) __builtin_memcpy(dst, src, sizeof(double) * static_cast<size_t>(n));
}

// dst += y with y first rounded to the storage type: what `dst.add_(resized)` computes when `resized` holds
// the kernel's stored values (float16 / bfloat16 adds are done in float32 and rounded once, as ATen's).
static inline void add_row(const float* y, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = dst[i] + y[i];
}
static inline void add_row(const double* y, double* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = dst[i] + y[i];
}
static inline void add_row(const float* y, f16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i].bits = f32_to_f16(f16_to_f32(dst[i].bits) + f16_to_f32(f32_to_f16(y[i])));
}
static inline uint16_t f32_to_bf16(float f) {  // round to nearest even; NaN -> 0x7FC0 (as store_row)
  const uint32_t u = f32_bits(f);
  return static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
static inline float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }
static inline void add_row(const float* y, bf16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i].bits = f32_to_bf16(bf16_to_f32(dst[i].bits) + bf16_to_f32(f32_to_bf16(y[i])));
}

// Rows written once and not read again soon (large resized outputs, key/value gradients): non-temporal
// stores skip the read-for-ownership of each destination line, a third of the traffic of the write.
// Only used when the caller says the output is larger than the last-level cache (`stream` flags).
static inline void stream_row(const float* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(CAMBRIAN_ISA_AVX512)
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 63u); ++i) dst[i] = src[i];
  for (; i + 16 <= n; i += 16) _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
#elif defined(CAMBRIAN_ISA_AVX2)
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 31u); ++i) dst[i] = src[i];
  for (; i + 8 <= n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
#endif
  for (; i < n; ++i) dst[i] = src[i];
}
static inline void stream_row(const double* src, double* dst, int64_t n) { store_row(src, dst, n); }
static inline void stream_row(const float* src, f16_t* dst, int64_t n) { store_row(src, dst, n); }
static inline void stream_row(const float* src, bf16_t* dst, int64_t n) { store_row(src, dst, n); }
// Streaming stores are weakly ordered: fence before the data is handed to anyone else.
static inline void stream_fence() {
#if defined(CAMBRIAN_ISA_AVX512) || defined(CAMBRIAN_ISA_AVX2)
  _mm_sfence();
#endif
}
template <class T, class A>
static inline void put_row(const A* src, T* dst, int64_t n, bool stream) {
  if (stream) stream_row(src, dst, n); else store_row(src, dst, n);
}

// Software prefetch of a whole row into L1 (short rows in many planes / pages defeat the hardware
// stream prefetchers).
static inline void prefetch_row(const void* row, int64_t bytes) {
  const char* c = static_cast<const char*>(row);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 3);
}

// Output pixels kPageAhead ahead of the one being written get a write prefetch of their first line.  In the
// (B, H*W, sum C) output one pixel's channels lie a whole row of channels (23 KB for cambrian-8b's 5760) from
// the previous pixel's, so every pixel is on a new 4 KB page; with the page-table lines evicted by the data
// streaming through, each pixel's stores waited for a page walk, and the output loops of the ConvNeXt resize
// wrote at 10-20 GB/s where one core streams ~40.  The prefetch starts the walk early, for one line read per
// pixel: measured ~25-30% off the whole ConvNeXt resize on one core.  The rows-first backward reads the
// gradient in the same layout and prefetches (for reading) the same distance ahead.
constexpr int64_t kPageAhead = 8;
static inline void prefetch_page(const void* p) { __builtin_prefetch(p, 1, 0); }

// A row as accumulation-type values: the row itself when no conversion is needed, else `buf`.
static inline const float* as_acc(const float* src, float*, int64_t) { return src; }
static inline const double* as_acc(const double* src, double*, int64_t) { return src; }
static inline const float* as_acc(const f16_t* src, float* buf, int64_t n) { load_row(src, buf, n); return buf; }
static inline const float* as_acc(const bf16_t* src, float* buf, int64_t n) { load_row(src, buf, n); return buf; }
// Where to compute an output row: in place when the storage is the accumulation type, else `buf`
// (then `store_row(buf, dst, n)` converts; for in-place rows store_row is a no-op).
static inline float* out_buf(float* dst, float*) { return dst; }
static inline double* out_buf(double* dst, double*) { return dst; }
static inline float* out_buf(f16_t*, float* buf) { return buf; }
static inline float* out_buf(bf16_t*, float* buf) { return buf; }

// exp for float32, vectorisable (no branches, no calls): Cephes' expf polynomial, ~1 ulp.
// Only ever called with x <= 0 here (logit - max, logit - logsumexp).
static inline float exp_acc(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  float n = x * 1.44269504088896341f;
  n = (n + 12582912.0f) - 12582912.0f;  // round to nearest integer (|n| < 2^22)
  float r = fmac(n, -0.693359375f, x);
  r = fmac(n, 2.12194440e-4f, r);
  float y = 1.9875691500e-4f;
  y = fmac(y, r, 1.3981999507e-3f);
  y = fmac(y, r, 8.3334519073e-3f);
  y = fmac(y, r, 4.1665795894e-2f);
  y = fmac(y, r, 1.6666665459e-1f);
  y = fmac(y, r, 5.0000001201e-1f);
  y = fmac(y, r * r, r) + 1.0f;
  const int32_t e = static_cast<int32_t>(n);
  return bits_f32(f32_bits(y) + (static_cast<uint32_t>(e) << 23));
}
static inline double exp_acc(double x) { return __builtin_exp(x); }
static inline float log_acc(float x) { return __builtin_logf(x); }
static inline double log_acc(double x) { return __builtin_log(x); }

// Dot products and axpy.  float32 gets explicit SIMD (GCC does not vectorise a float reduction without
// reassociation flags, and a scalar dot loop leaves too few cache misses in flight to stream K at memory
// bandwidth); float64 (tests / gradcheck only) stays scalar.
#if defined(CAMBRIAN_ISA_AVX512)
static inline float dot_f32(const float* __restrict a, const float* __restrict b, int64_t n) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
  }
  if (i + 16 <= n) { s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0); i += 16; }
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1u);
    s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), s1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}
static inline void axpy_f32(float alpha, const float* __restrict x, float* __restrict y, int64_t n) {
  const __m512 va = _mm512_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1u);
    _mm512_mask_storeu_ps(y + i, m, _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(m, x + i), _mm512_maskz_loadu_ps(m, y + i)));
  }
}
#elif defined(CAMBRIAN_ISA_AVX2)
static inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
static inline float dot_f32(const float* __restrict a, const float* __restrict b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  if (i + 8 <= n) { s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0); i += 8; }
  float tail = 0.0f;
  for (; i < n; ++i) tail = __builtin_fmaf(a[i], b[i], tail);
  return hsum256(_mm256_add_ps(s0, s1)) + tail;
}
static inline void axpy_f32(float alpha, const float* __restrict x, float* __restrict y, int64_t n) {
  const __m256 va = _mm256_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] = __builtin_fmaf(alpha, x[i], y[i]);
}
#else
static inline float dot_f32(const float* __restrict a, const float* __restrict b, int64_t n) {
  float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) part[l] += a[i + l] * b[i + l];
  float tail = 0.0f;
  for (; i < n; ++i) tail += a[i] * b[i];
  return ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7])) + tail;
}
static inline void axpy_f32(float alpha, const float* __restrict x, float* __restrict y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}
#endif

// y = sum over f < m of w[f] * x[f] (rows of n values, f in order, from zero): the same bits as zeroing y and
// applying axpy(w[f], x[f], y) for f = 0, 1, ..., but each output vector is accumulated in registers and stored
// once.  The interpolate backward's sums of 2-6 weighted rows were bound by the read-modify-write of y.
template <class A>
static inline void wsum_scalar(const A* const* x, const A* w, int64_t m, A* __restrict y, int64_t i, int64_t n) {
  for (; i < n; ++i) {
    A s = A(0);
    for (int64_t f = 0; f < m; ++f) s = fmac(w[f], x[f][i], s);
    y[i] = s;
  }
}
#if defined(CAMBRIAN_ISA_AVX512)
static inline void wsum(const float* const* x, const float* w, int64_t m, float* __restrict y, int64_t n) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    for (int64_t f = 0; f < m; ++f) {
      const __m512 vw = _mm512_set1_ps(w[f]);
      s0 = _mm512_fmadd_ps(vw, _mm512_loadu_ps(x[f] + i), s0);
      s1 = _mm512_fmadd_ps(vw, _mm512_loadu_ps(x[f] + i + 16), s1);
    }
    _mm512_storeu_ps(y + i, s0);
    _mm512_storeu_ps(y + i + 16, s1);
  }
  for (; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1u);
    __m512 s0 = _mm512_setzero_ps();
    for (int64_t f = 0; f < m; ++f) s0 = _mm512_fmadd_ps(_mm512_set1_ps(w[f]), _mm512_maskz_loadu_ps(k, x[f] + i), s0);
    _mm512_mask_storeu_ps(y + i, k, s0);
  }
}
#elif defined(CAMBRIAN_ISA_AVX2)
static inline void wsum(const float* const* x, const float* w, int64_t m, float* __restrict y, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    for (int64_t f = 0; f < m; ++f) {
      const __m256 vw = _mm256_set1_ps(w[f]);
      s0 = _mm256_fmadd_ps(vw, _mm256_loadu_ps(x[f] + i), s0);
      s1 = _mm256_fmadd_ps(vw, _mm256_loadu_ps(x[f] + i + 8), s1);
    }
    _mm256_storeu_ps(y + i, s0);
    _mm256_storeu_ps(y + i + 8, s1);
  }
  for (; i + 8 <= n; i += 8) {
    __m256 s0 = _mm256_setzero_ps();
    for (int64_t f = 0; f < m; ++f) s0 = _mm256_fmadd_ps(_mm256_set1_ps(w[f]), _mm256_loadu_ps(x[f] + i), s0);
    _mm256_storeu_ps(y + i, s0);
  }
  wsum_scalar(x, w, m, y, i, n);
}
#else
static inline void wsum(const float* const* x, const float* w, int64_t m, float* __restrict y, int64_t n) {
  wsum_scalar(x, w, m, y, 0, n);
}
#endif
static inline void wsum(const double* const* x, const double* w, int64_t m, double* __restrict y, int64_t n) {
  wsum_scalar(x, w, m, y, 0, n);
}

static inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) { return dot_f32(a, b, n); }
static inline double dot(const double* __restrict a, const double* __restrict b, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s = fmac(a[i], b[i], s);
  return s;
}
static inline void axpy(float alpha, const float* __restrict x, float* __restrict y, int64_t n) { axpy_f32(alpha, x, y, n); }
static inline void axpy(double alpha, const double* __restrict x, double* __restrict y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = fmac(alpha, x[i], y[i]);
}

// ------------------------------------------------------------------------------------------------
// bilinear taps, exactly ATen's (area_pixel_compute_source_index + guard_index_and_lambda)
// ------------------------------------------------------------------------------------------------
template <class A>
struct Taps {
  Scratch<int64_t> i0, i1;
  Scratch<A> l0, l1;
  template <bool F>
  static Taps make(int64_t n_in, int64_t n_out) {
    Taps t(n_out);
    if (n_in == n_out) {  // ATen: "scale_factor = 1, simply copy"
      for (int64_t d = 0; d < n_out; ++d) { t.i0[d] = t.i1[d] = d; t.l0[d] = A(1); t.l1[d] = A(0); }
      return t;
    }
    const A scale = static_cast<A>(n_in) / static_cast<A>(n_out);
    for (int64_t d = 0; d < n_out; ++d) {
      // scale * (d + 0.5) - 0.5; ATen's AVX builds contract this to one FMA
      A src = madd<F>(scale, static_cast<A>(d) + A(0.5), A(-0.5));
      if (src < A(0)) src = A(0);
      int64_t idx = static_cast<int64_t>(__builtin_floor(static_cast<double>(src)));
      if (idx > n_in - 1) idx = n_in - 1;
      A lam = src - static_cast<A>(idx);
      lam = lam < A(0) ? A(0) : (lam > A(1) ? A(1) : lam);
      t.i0[d] = idx;
      t.i1[d] = idx + (idx < n_in - 1 ? 1 : 0);
      t.l1[d] = lam;
      t.l0[d] = A(1) - lam;
    }
    return t;
  }
  explicit Taps(int64_t n) : i0(n), i1(n), l0(n), l1(n) {}
  Taps(Taps&& o) noexcept : i0(0), i1(0), l0(0), l1(0) { swap_all(o); }
 private:
  template <class X> static void swp(Scratch<X>& a, Scratch<X>& b) { X* t = a.p; a.p = b.p; b.p = t; }
  void swap_all(Taps& o) { swp(i0, o.i0); swp(i1, o.i1); swp(l0, o.l0); swp(l1, o.l1); }
};

// The transposed taps: for each input index, the (output index, weight) pairs that read it.
template <class A>
struct TapLists {
  Scratch<int64_t> start, out;
  Scratch<A> wt;
  TapLists(const Taps<A>& t, int64_t n_in, int64_t n_out) : start(n_in + 1), out(2 * n_out), wt(2 * n_out) {
    for (int64_t i = 0; i <= n_in; ++i) start[i] = 0;
    for (int64_t o = 0; o < n_out; ++o) {
      if (t.l0.p[o] != A(0)) ++start[t.i0.p[o] + 1];
      if (t.l1.p[o] != A(0)) ++start[t.i1.p[o] + 1];
    }
    for (int64_t i = 0; i < n_in; ++i) start[i + 1] += start[i];
    Scratch<int64_t> fill(n_in);
    for (int64_t i = 0; i < n_in; ++i) fill[i] = start[i];
    for (int64_t o = 0; o < n_out; ++o) {  // output order kept within each list
      if (t.l0.p[o] != A(0)) { const int64_t e = fill[t.i0.p[o]]++; out[e] = o; wt[e] = t.l0.p[o]; }
      if (t.l1.p[o] != A(0)) { const int64_t e = fill[t.i1.p[o]]++; out[e] = o; wt[e] = t.l1.p[o]; }
    }
  }
};

// ------------------------------------------------------------------------------------------------
// multi_tower_interpolate: forward
// ------------------------------------------------------------------------------------------------
// ATen upsample_linear_channels_last, AVX2/AVX512 build: the Vectorized body computes
// a*w00 + (b*w01 + (c*w10 + d*w11)) and GCC contracts it to fma(a,w00, fma(b,w01, fma(d,w11, c*w10)));
// the scalar tail computes ((a*w00 + b*w01) + c*w10) + d*w11 -> fma(d,w11, fma(c,w10, fma(a,w00, b*w01))).
template <class A, bool F>
static inline void cl_body(const A* __restrict a, const A* __restrict b, const A* __restrict c,
                           const A* __restrict d, A* __restrict y, int64_t n, A w00, A w01, A w10, A w11) {
  if constexpr (F) {
    for (int64_t j = 0; j < n; ++j) y[j] = madd<F>(a[j], w00, madd<F>(b[j], w01, madd<F>(d[j], w11, c[j] * w10)));
  } else {
    for (int64_t j = 0; j < n; ++j) y[j] = a[j] * w00 + (b[j] * w01 + (c[j] * w10 + d[j] * w11));
  }
}
template <class A, bool F>
static inline void cl_tail(const A* __restrict a, const A* __restrict b, const A* __restrict c,
                           const A* __restrict d, A* __restrict y, int64_t n, A w00, A w01, A w10, A w11) {
  for (int64_t j = 0; j < n; ++j) y[j] = madd<F>(d[j], w11, madd<F>(c[j], w10, madd<F>(a[j], w00, b[j] * w01)));
}
// ATen upsample_non_separable (NCHW): t0 = a*w0 + b*w1 on row r0, t1 on row r1, out = t0*h0 + t1*h1,
// contracted as fma(a,w0, b*w1) and fma(t0,h0, t1*h1).
template <class A, bool F>
static inline A generic_px(A a, A b, A c, A d, A w0, A w1, A h0, A h1) {
  const A t0 = madd<F>(a, w0, b * w1);
  const A t1 = madd<F>(c, w0, d * w1);
  return madd<F>(t0, h0, t1 * h1);
}

template <class A, bool F>
static inline void generic_body(const A* __restrict a, const A* __restrict b, const A* __restrict c,
                                const A* __restrict d, A* __restrict y, int64_t n, A w0, A w1, A h0, A h1) {
  for (int64_t j = 0; j < n; ++j) y[j] = generic_px<A, F>(a[j], b[j], c[j], d[j], w0, w1, h0, h1);
}

// Token-major source (channel stride 1): one parallel item per output row, channels innermost.
template <class T, bool F>
static void interp_forward_tokens(const InterpForward& p, const Taps<acc_t<T>>& rows, const Taps<acc_t<T>>& cols) {
  using A = acc_t<T>;
  constexpr int64_t CH = 512;  // channel chunk (conversion buffers stay in L1)
  const int64_t C = p.C, W = p.W, Cv = p.formula == kChannelsLast ? C - C % p.block : 0;
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
#pragma omp parallel num_threads(p.nthreads)
  {
    Scratch<A> buf(5 * CH);
#pragma omp for schedule(dynamic, 1)
    for (int64_t row = 0; row < p.B * p.H; ++row) {
      const int64_t b = row / p.H, oy = row % p.H;
      const T* xb = x + b * p.x_sb;
      const int64_t r0 = rows.i0.p[oy] * p.w, r1 = rows.i1.p[oy] * p.w;
      const A h0 = rows.l0.p[oy], h1 = rows.l1.p[oy];
      for (int64_t ox = 0; ox < W; ++ox) {
        const int64_t c0 = cols.i0.p[ox], c1 = cols.i1.p[ox];
        const A w0 = cols.l0.p[ox], w1 = cols.l1.p[ox];
        const T* p00 = xb + (r0 + c0) * p.x_st;
        const T* p01 = xb + (r0 + c1) * p.x_st;
        const T* p10 = xb + (r1 + c0) * p.x_st;
        const T* p11 = xb + (r1 + c1) * p.x_st;
        T* o = out + b * p.o_sb + (oy * W + ox) * p.o_st;
        if (ox + kPageAhead < W) prefetch_page(o + kPageAhead * p.o_st);
        for (int64_t c = 0; c < C; c += CH) {
          const int64_t n = imin(CH, C - c);
          const A* a = as_acc(p00 + c, buf.p, n);
          const A* bb = as_acc(p01 + c, buf.p + CH, n);
          const A* cc = as_acc(p10 + c, buf.p + 2 * CH, n);
          const A* d = as_acc(p11 + c, buf.p + 3 * CH, n);
          A* y = (p.stream || p.accumulate) ? buf.p + 4 * CH : out_buf(o + c, buf.p + 4 * CH);
          if (p.formula == kChannelsLast) {
            const A w00 = h0 * w0, w01 = h0 * w1, w10 = h1 * w0, w11 = h1 * w1;
            const int64_t nv = imax(0, imin(n, Cv - c));
            cl_body<A, F>(a, bb, cc, d, y, nv, w00, w01, w10, w11);
            cl_tail<A, F>(a + nv, bb + nv, cc + nv, d + nv, y + nv, n - nv, w00, w01, w10, w11);
          } else {
            generic_body<A, F>(a, bb, cc, d, y, n, w0, w1, h0, h1);
          }
          if (p.accumulate) add_row(y, o + c, n); else put_row(y, o + c, n, p.stream != 0);
        }
      }
    }
    stream_fence();
  }
}

// Transpose source rows of up to CT = 16 channels into channel-minor order: dst[x*16 + k] = rows[k][x]
// (x < w; missing channels k >= nrows are zeros).  In registers (16x16 / 8x8 blocks) for float32.
// `pf` (npf rows, may be null): rows the caller transposes next, prefetched a cache line per row and per
// 16 columns as this transpose advances -- spread over the work instead of a burst of prefetches that
// stalls on full miss queues (the rows are short runs in many planes: no hardware stream to follow).
static inline void prefetch_cols(const void* const* pf, int64_t npf, int64_t byte_off) {
  for (int64_t k = 0; k < npf; ++k) __builtin_prefetch(static_cast<const char*>(pf[k]) + byte_off, 0, 3);
}
constexpr int64_t CT = 16;
#if defined(CAMBRIAN_ISA_AVX512)
static inline void transpose_rows(const float* const* rows, int64_t nrows, int64_t w, const float* zeros, float* dst,
                                  const void* const* pf = nullptr, int64_t npf = 0) {
  const float* r[16];
  for (int64_t k = 0; k < 16; ++k) r[k] = k < nrows ? rows[k] : zeros;
  int64_t x = 0;
  for (; x + 16 <= w; x += 16) {
    prefetch_cols(pf, npf, x * 4);
    __m512 t[16], u[16];
    for (int i = 0; i < 8; ++i) {
      const __m512 a = _mm512_loadu_ps(r[2 * i] + x), b = _mm512_loadu_ps(r[2 * i + 1] + x);
      t[2 * i] = _mm512_unpacklo_ps(a, b);
      t[2 * i + 1] = _mm512_unpackhi_ps(a, b);
    }
    for (int i = 0; i < 4; ++i) {  // u[4i+j], 128-bit lane L: rows 4i..4i+3 of column 4L+j
      u[4 * i + 0] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0x44);
      u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0xEE);
      u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
      u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int j = 0; j < 4; ++j) {
      const __m512 v0 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x44), v1 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xEE);
      const __m512 w0 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x44), w1 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xEE);
      _mm512_storeu_ps(dst + (x + j) * 16, _mm512_shuffle_f32x4(v0, w0, 0x88));
      _mm512_storeu_ps(dst + (x + 4 + j) * 16, _mm512_shuffle_f32x4(v0, w0, 0xDD));
      _mm512_storeu_ps(dst + (x + 8 + j) * 16, _mm512_shuffle_f32x4(v1, w1, 0x88));
      _mm512_storeu_ps(dst + (x + 12 + j) * 16, _mm512_shuffle_f32x4(v1, w1, 0xDD));
    }
  }
  for (; x < w; ++x)
    for (int64_t k = 0; k < 16; ++k) dst[x * 16 + k] = r[k][x];
}
#elif defined(CAMBRIAN_ISA_AVX2)
static inline void transpose_rows(const float* const* rows, int64_t nrows, int64_t w, const float* zeros, float* dst,
                                  const void* const* pf = nullptr, int64_t npf = 0) {
  const float* r[16];
  for (int64_t k = 0; k < 16; ++k) r[k] = k < nrows ? rows[k] : zeros;
  int64_t x = 0;
  for (; x + 8 <= w; x += 8) {
    if (x % 16 == 0) prefetch_cols(pf, npf, x * 4);
    for (int half = 0; half < 2; ++half) {  // channels 8*half .. 8*half+7
      const float* const* rr = r + 8 * half;
      __m256 t[8], u[8];
      for (int i = 0; i < 4; ++i) {
        const __m256 a = _mm256_loadu_ps(rr[2 * i] + x), b = _mm256_loadu_ps(rr[2 * i + 1] + x);
        t[2 * i] = _mm256_unpacklo_ps(a, b);
        t[2 * i + 1] = _mm256_unpackhi_ps(a, b);
      }
      for (int i = 0; i < 2; ++i) {
        u[4 * i + 0] = _mm256_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0x44);
        u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0xEE);
        u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
      }
      for (int j = 0; j < 4; ++j) {
        _mm256_storeu_ps(dst + (x + j) * 16 + 8 * half, _mm256_permute2f128_ps(u[j], u[4 + j], 0x20));
        _mm256_storeu_ps(dst + (x + 4 + j) * 16 + 8 * half, _mm256_permute2f128_ps(u[j], u[4 + j], 0x31));
      }
    }
  }
  for (; x < w; ++x)
    for (int64_t k = 0; k < 16; ++k) dst[x * 16 + k] = r[k][x];
}
#else
static inline void transpose_rows(const float* const* rows, int64_t nrows, int64_t w, const float* zeros, float* dst,
                                  const void* const* pf = nullptr, int64_t npf = 0) {
  for (int64_t o = 0; o < w * 4; o += 64) prefetch_cols(pf, npf, o);
  for (int64_t k = 0; k < 16; ++k) {
    const float* src = k < nrows ? rows[k] : zeros;
    for (int64_t x = 0; x < w; ++x) dst[x * 16 + k] = src[x];
  }
}
#endif
static inline void transpose_rows(const double* const* rows, int64_t nrows, int64_t w, const double* zeros, double* dst,
                                  const void* const* pf = nullptr, int64_t npf = 0) {
  for (int64_t o = 0; o < w * 8; o += 64) prefetch_cols(pf, npf, o);
  for (int64_t k = 0; k < 16; ++k) {
    const double* src = k < nrows ? rows[k] : zeros;
    for (int64_t x = 0; x < w; ++x) dst[x * 16 + k] = src[x];
  }
}

// Channel-planar source (token stride 1, e.g. a (B, C, h, w) conv map seen as (B, h*w, C)).  Per item:
// one output row and a group of GC channels (tiles of CT = 16).  Each tile's two source rows are
// transposed to channel-minor order once, and kept while the following output rows read the same
// source rows (upsampling); then each output pixel is evaluated tile by tile (16 lanes, the formula of
// the token path) into a GC-channel run that is written out contiguously.  GC is chosen so the
// transposed rows of a group (2 * GC * w values) stay in L2.
template <class T, bool F>
static void interp_forward_planar(const InterpForward& p, const Taps<acc_t<T>>& rows, const Taps<acc_t<T>>& cols) {
  using A = acc_t<T>;
  const int64_t C = p.C, W = p.W, w = p.w;
  const int64_t GC = imax(CT, imin((C + CT - 1) / CT * CT, (65536 / w) / CT * CT));
  const int64_t ngroups = (C + GC - 1) / GC, G = GC / CT;
  const int64_t Cv = p.formula == kChannelsLast ? C - C % p.block : 0;
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
#pragma omp parallel num_threads(p.nthreads)
  {
    Scratch<A> conv(CT * w), zeros(w), pix(GC), trow(2 * GC * w);
    Scratch<int64_t> tag(2 * G);  // which (b, tile, source row) each transposed buffer holds
    for (int64_t j = 0; j < 2 * G; ++j) tag[j] = -1;
    for (int64_t j = 0; j < w; ++j) zeros[j] = A(0);
    Scratch<const A*> t0s(G), t1s(G);
    const A* src[CT];
#pragma omp for schedule(dynamic, 4)
    for (int64_t item = 0; item < p.B * ngroups * p.H; ++item) {
      const int64_t bg = item / p.H, oy = item % p.H;
      const int64_t b = bg / ngroups, g_lo = (bg % ngroups) * GC, gc = imin(GC, C - g_lo), nt = (gc + CT - 1) / CT;
      const int64_t r0 = rows.i0.p[oy], r1 = rows.i1.p[oy];
      const A h0 = rows.l0.p[oy], h1 = rows.l1.p[oy];
      for (int64_t t = 0; t < nt; ++t) {  // transposed source rows of every tile of the group
        if (t + 1 < nt) {  // the next tile's source rows are short runs in many planes: prefetch them
          for (int64_t k = 0; k < imin(CT, C - g_lo - (t + 1) * CT); ++k) {
            const T* plane = x + b * p.x_sb + (g_lo + (t + 1) * CT + k) * p.x_sc;
            prefetch_row(plane + r0 * w, w * static_cast<int64_t>(sizeof(T)));
            prefetch_row(plane + r1 * w, w * static_cast<int64_t>(sizeof(T)));
          }
        }
        const int64_t c_lo = g_lo + t * CT, ct = imin(CT, C - c_lo);
        int64_t* tg = tag.p + 2 * t;
        A* buf = trow.p + 2 * t * w * CT;
        const int64_t key = (b * C + c_lo) * p.h;  // identifies (b, tile); + source row
        auto fill = [&](int slot, int64_t r) {
          for (int64_t k = 0; k < ct; ++k)
            src[k] = as_acc(x + b * p.x_sb + (c_lo + k) * p.x_sc + r * w, conv.p + k * w, w);
          transpose_rows(src, ct, w, zeros.p, buf + slot * w * CT);
          tg[slot] = key + r;
        };
        int s0 = tg[0] == key + r0 ? 0 : (tg[1] == key + r0 ? 1 : -1);
        if (s0 < 0) fill(s0 = (tg[0] == key + r1 ? 1 : 0), r0);  // keep a buffer that already holds r1
        int s1 = tg[s0] == key + r1 ? s0 : (tg[1 - s0] == key + r1 ? 1 - s0 : -1);
        if (s1 < 0) fill(s1 = 1 - s0, r1);
        t0s[t] = buf + s0 * w * CT;
        t1s[t] = buf + s1 * w * CT;
      }
      for (int64_t ox = 0; ox < W; ++ox) {
        const int64_t c0 = cols.i0.p[ox] * CT, c1 = cols.i1.p[ox] * CT;
        const A w0 = cols.l0.p[ox], w1 = cols.l1.p[ox];
        const A w00 = h0 * w0, w01 = h0 * w1, w10 = h1 * w0, w11 = h1 * w1;
        for (int64_t t = 0; t < nt; ++t) {
          const A *a = t0s[t] + c0, *bb = t0s[t] + c1, *cc = t1s[t] + c0, *d = t1s[t] + c1;
          A* y = pix.p + t * CT;
          if (p.formula == kGeneric) {
            generic_body<A, F>(a, bb, cc, d, y, CT, w0, w1, h0, h1);
          } else {
            const int64_t nv = imax(0, imin(CT, Cv - (g_lo + t * CT)));
            cl_body<A, F>(a, bb, cc, d, y, nv, w00, w01, w10, w11);
            cl_tail<A, F>(a + nv, bb + nv, cc + nv, d + nv, y + nv, CT - nv, w00, w01, w10, w11);
          }
        }
        T* dst = out + b * p.o_sb + (oy * W + ox) * p.o_st + g_lo;
        if (ox + kPageAhead < W) prefetch_page(dst + kPageAhead * p.o_st);
        if (p.accumulate) add_row(pix.p, dst, gc); else put_row(pix.p, dst, gc, p.stream != 0);
      }
    }
    stream_fence();
  }
}

// y[j] = a[j]*s + b[j]*t for j < n, rounded as madd<F>(a, s, b*t): one step of ATen's separable
// (kGeneric) formula -- horizontally x[r][c0]*w0 + x[r][c1]*w1, vertically t0*h0 + t1*h1.
template <bool F>
static inline void lerp_row(const float* __restrict a, const float* __restrict b, float s, float t,
                            float* __restrict y, int64_t n) {
  int64_t j = 0;
#if defined(CAMBRIAN_ISA_AVX512)
  const __m512 vs = _mm512_set1_ps(s), vt = _mm512_set1_ps(t);
  for (; j + 16 <= n; j += 16) {
    const __m512 bt = _mm512_mul_ps(_mm512_loadu_ps(b + j), vt);
    _mm512_storeu_ps(y + j, F ? _mm512_fmadd_ps(_mm512_loadu_ps(a + j), vs, bt)
                              : _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(a + j), vs), bt));
  }
#elif defined(CAMBRIAN_ISA_AVX2)
  const __m256 vs = _mm256_set1_ps(s), vt = _mm256_set1_ps(t);
  for (; j + 8 <= n; j += 8) {
    const __m256 bt = _mm256_mul_ps(_mm256_loadu_ps(b + j), vt);
    _mm256_storeu_ps(y + j, F ? _mm256_fmadd_ps(_mm256_loadu_ps(a + j), vs, bt)
                              : _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(a + j), vs), bt));
  }
#endif
  for (; j < n; ++j) y[j] = madd<F>(a[j], s, b[j] * t);
}
template <bool F>
static inline void lerp_row(const double* __restrict a, const double* __restrict b, double s, double t,
                            double* __restrict y, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] = madd<F>(a[j], s, b[j] * t);
}

// lerp_row straight to memory with non-temporal stores (float32 output larger than the last-level cache):
// each vector goes from the registers to the write-combining buffers.  Blending into a scratch row and then
// streaming that row costs a store and a load more per vector, and the scratch stores compete with the
// streaming ones for the store queue; measured ~10-20% faster on the output loop of the enlarging ConvNeXt
// stages.  Same rounding as lerp_row (elementwise madd<F>(a, s, b * t) in the vector body and the ends).
template <bool F>
static inline void lerp_stream(const float* __restrict a, const float* __restrict b, float s, float t,
                               float* __restrict dst, int64_t n) {
  int64_t j = 0;
#if defined(CAMBRIAN_ISA_AVX512)
  for (; j < n && (reinterpret_cast<uintptr_t>(dst + j) & 63u); ++j) dst[j] = madd<F>(a[j], s, b[j] * t);
  const __m512 vs = _mm512_set1_ps(s), vt = _mm512_set1_ps(t);
  for (; j + 16 <= n; j += 16) {
    const __m512 bt = _mm512_mul_ps(_mm512_loadu_ps(b + j), vt);
    _mm512_stream_ps(dst + j, F ? _mm512_fmadd_ps(_mm512_loadu_ps(a + j), vs, bt)
                                : _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(a + j), vs), bt));
  }
#elif defined(CAMBRIAN_ISA_AVX2)
  for (; j < n && (reinterpret_cast<uintptr_t>(dst + j) & 31u); ++j) dst[j] = madd<F>(a[j], s, b[j] * t);
  const __m256 vs = _mm256_set1_ps(s), vt = _mm256_set1_ps(t);
  for (; j + 8 <= n; j += 8) {
    const __m256 bt = _mm256_mul_ps(_mm256_loadu_ps(b + j), vt);
    _mm256_stream_ps(dst + j, F ? _mm256_fmadd_ps(_mm256_loadu_ps(a + j), vs, bt)
                                : _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(a + j), vs), bt));
  }
#endif
  for (; j < n; ++j) dst[j] = madd<F>(a[j], s, b[j] * t);
}
// lerp_stream where it exists (float32 storage); false: the caller blends through its scratch row.
template <bool F, class T, class A>
static inline bool try_lerp_stream(const A*, const A*, A, A, T*, int64_t) { return false; }
template <bool F>
static inline bool try_lerp_stream(const float* a, const float* b, float s, float t, float* dst, int64_t n) {
  lerp_stream<F>(a, b, s, t, dst, n);
  return true;
}

// The column taps of one transposed tile (16 channels x w source columns, channel-minor) for all W output
// columns: dst[ox * stride + k] = trow[i0[ox]][k] * l0[ox] + trow[i1[ox]][k] * l1[ox] (lerp_row's rounding).
// A function of its own with restrict pointers: inlined into the fill loop, the compiler reloaded the taps
// and strides from the stack on every output column (the stores might alias them); measured ~12% off the
// fill of the enlarging ConvNeXt stages.
template <bool F, class A>
static inline void hlerp_tile(const A* __restrict trow, const int64_t* __restrict i0, const int64_t* __restrict i1,
                              const A* __restrict l0, const A* __restrict l1, A* __restrict dst, int64_t stride,
                              int64_t W) {
  for (int64_t ox = 0; ox < W; ++ox) lerp_row<F>(trow + i0[ox] * CT, trow + i1[ox] * CT, l0[ox], l1[ox], dst + ox * stride, CT);
}

// Channel-planar source with ATen's separable NCHW formula (kGeneric, every large target such as the
// ConvNeXt stages -> 96x96): out = t0*h0 + t1*h1 with t_r = x[r][c0]*w0 + x[r][c1]*w1 on source row r.
// t_r depends only on the source row and the output column, so per group of GC channels it is computed
// once per source row -- a "horizontal row" of W pixels x GC channels, token-major like the output, built
// tile by tile (CT planes' source rows transposed in L1, then the column taps) -- and kept in a two-slot
// cache while the following output rows read the same source row (each source row serves ~3 output rows
// when upsampling 32 -> 96).  An output row is then, per pixel, one contiguous blend of two horizontal
// rows into a GC-channel run of the output.  Compared with blending four transposed source taps per output
// value (interp_forward_planar) this halves the arithmetic per output, and the blend streams through two
// contiguous buffers (per-tile buffers a few KB apart would alias in the L1 sets).
template <class T, bool F>
static void interp_forward_planar_separable(const InterpForward& p, const Taps<acc_t<T>>& rows,
                                            const Taps<acc_t<T>>& cols) {
  using A = acc_t<T>;
  const int64_t C = p.C, W = p.W, w = p.w;
  // channel groups: the two horizontal rows of a group (2 x W x GC values) stay in L2
  const int64_t gmax = imax(CT, (32768 / W) / CT * CT), ngroups = (C + gmax - 1) / gmax;
  const int64_t GC = ((C + ngroups - 1) / ngroups + CT - 1) / CT * CT;
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
#pragma omp parallel num_threads(p.nthreads)
  {
    Scratch<A> conv(CT * w), zeros(w), trow(CT * w), tcol(CT), pix(GC), hrow(2 * W * GC);
    int64_t tag[2] = {-1, -1};  // which (b, group, source row) each horizontal-row slot holds
    for (int64_t j = 0; j < w; ++j) zeros[j] = A(0);
    const A* src[CT];
    const void* pf[CT];
#pragma omp for schedule(dynamic, 4)
    for (int64_t item = 0; item < p.B * ngroups * p.H; ++item) {
      const int64_t bg = item / p.H, oy = item % p.H;
      const int64_t b = bg / ngroups, g_lo = (bg % ngroups) * GC;
      if (g_lo >= C) continue;  // rounding GC up to whole tiles can leave the last group empty
      const int64_t gc = imin(GC, C - g_lo);
      const int64_t r0 = rows.i0.p[oy], r1 = rows.i1.p[oy];
      const A h0 = rows.l0.p[oy], h1 = rows.l1.p[oy];
      const T* xb = x + b * p.x_sb;
      const int64_t key = (b * C + g_lo) * p.h;  // identifies (b, group); + source row
      // Missing source rows go to slots not holding the other needed row.  Both rows are filled in one pass
      // over the tiles: r0 and r1 are usually adjacent rows of each plane, read as one contiguous run.
      int s0 = tag[0] == key + r0 ? 0 : (tag[1] == key + r0 ? 1 : -1);
      int s1 = tag[0] == key + r1 ? 0 : (tag[1] == key + r1 ? 1 : -1);
      int64_t fill_rows[2];
      int fill_slots[2], nfill = 0;
      if (s0 < 0) {
        s0 = s1 == 0 ? 1 : 0;
        fill_rows[nfill] = r0;
        fill_slots[nfill++] = s0;
      }
      if (s1 < 0) {
        if (r1 == r0) {
          s1 = s0;
        } else {
          s1 = 1 - s0;
          fill_rows[nfill] = r1;
          fill_slots[nfill++] = s1;
        }
      }
      for (int64_t c_lo = g_lo; nfill > 0 && c_lo < g_lo + gc; c_lo += CT) {
        const int64_t ct = imin(CT, g_lo + gc - c_lo);
        for (int f = 0; f < nfill; ++f) {
          // the next transposition's rows (this tile's other row, else the next tile's first) are prefetched
          // during this one
          const int64_t pc = f + 1 < nfill ? c_lo : c_lo + CT, pr = fill_rows[f + 1 < nfill ? f + 1 : 0];
          const int64_t npf = imax(0, imin(CT, g_lo + gc - pc));
          for (int64_t k = 0; k < npf; ++k) pf[k] = xb + (pc + k) * p.x_sc + pr * w;
          const int64_t r = fill_rows[f];
          for (int64_t k = 0; k < ct; ++k) src[k] = as_acc(xb + (c_lo + k) * p.x_sc + r * w, conv.p + k * w, w);
          transpose_rows(src, ct, w, zeros.p, trow.p, pf, npf);
          A* dst = hrow.p + fill_slots[f] * W * GC + (c_lo - g_lo);
          if (ct == CT) {
            hlerp_tile<F>(trow.p, cols.i0.p, cols.i1.p, cols.l0.p, cols.l1.p, dst, GC, W);
          } else {  // last partial tile: the padding lanes must not spill into the next pixel
            for (int64_t ox = 0; ox < W; ++ox) {
              lerp_row<F>(trow.p + cols.i0.p[ox] * CT, trow.p + cols.i1.p[ox] * CT, cols.l0.p[ox], cols.l1.p[ox], tcol.p, CT);
              for (int64_t k = 0; k < ct; ++k) dst[ox * GC + k] = tcol[k];
            }
          }
        }
      }
      for (int f = 0; f < nfill; ++f) tag[fill_slots[f]] = key + fill_rows[f];
      const A* hr0 = hrow.p + s0 * W * GC;
      const A* hr1 = hrow.p + s1 * W * GC;
      T* orow = out + b * p.o_sb + oy * W * p.o_st + g_lo;
      for (int64_t ox = 0; ox < W; ++ox) {
        T* dst = orow + ox * p.o_st;
        if (ox + kPageAhead < W) prefetch_page(dst + kPageAhead * p.o_st);
        if (p.stream && !p.accumulate && try_lerp_stream<F>(hr0 + ox * GC, hr1 + ox * GC, h0, h1, dst, gc)) continue;
        A* y = (p.stream || p.accumulate) ? pix.p : out_buf(dst, pix.p);
        lerp_row<F>(hr0 + ox * GC, hr1 + ox * GC, h0, h1, y, gc);
        if (p.accumulate) add_row(y, dst, gc); else put_row(y, dst, gc, p.stream != 0);
      }
    }
    stream_fence();
  }
}

template <class T, bool F>
static void interp_forward_impl(const InterpForward& p) {
  using A = acc_t<T>;
  const Taps<A> rows = Taps<A>::template make<F>(p.h, p.H);
  const Taps<A> cols = Taps<A>::template make<F>(p.w, p.W);
  if (p.x_sc == 1) interp_forward_tokens<T, F>(p, rows, cols);
  else if (p.formula == kGeneric) interp_forward_planar_separable<T, F>(p, rows, cols);
  else interp_forward_planar<T, F>(p, rows, cols);
}

template <class T>
static void interp_forward(const InterpForward& p) {
  if (p.fused) interp_forward_impl<T, true>(p); else interp_forward_impl<T, false>(p);
}

// ------------------------------------------------------------------------------------------------
// multi_tower_interpolate: backward (transposed taps, separable: columns then rows)
// ------------------------------------------------------------------------------------------------
template <class A>
static inline int64_t max_list(const TapLists<A>& t, int64_t n_in) {  // the longest tap list (at least 1)
  int64_t k = 1;
  for (int64_t i = 0; i < n_in; ++i) k = imax(k, t.start.p[i + 1] - t.start.p[i]);
  return k;
}

// Columns first (inputs no wider than the output), so every output row's gradient is read from memory once: cs(oy)[ix][:] = sum over output
// columns ox reading ix of wx * g[b, oy, ox, :] (the "column sums" of output row oy, w x n values), then
// gx[b, iy, ix, :] = sum over output rows oy reading input row iy of wy * cs(oy)[ix][:].  An output row is
// read by two input rows (its two taps), so its column sums stay in a small cache of K slots (K: the longest
// tap list of an input row) while consecutive input rows of one item use them.  (Rows first, as before,
// reads each output row twice, and with a gradient row of W x n values far larger than L2 the second read
// comes from L3 or memory.)  Items are blocks of consecutive input rows of one channel chunk.  The summation
// order of an input row is fixed (output order of the tap lists), so results do not depend on the threads.
constexpr int64_t kGradPrefetch = 2;
template <class T, bool F>
static void interp_backward_cols_first(const InterpBackward& p) {
  using A = acc_t<T>;
  const Taps<A> rows = Taps<A>::template make<F>(p.h, p.H);
  const Taps<A> cols = Taps<A>::template make<F>(p.w, p.W);
  const TapLists<A> rl(rows, p.h, p.H), cl(cols, p.w, p.W);
  const int64_t C = p.C, W = p.W, w = p.w, h = p.h;
  const int64_t K = max_list(rl, h), Kc = max_list(cl, w);
  // channel chunk: 2 MB of column sums.  More than L2 (1-2 MB per core), measured faster on the ConvNeXt
  // stages than chunks that fit it: a longer chunk is a longer contiguous run of each gradient pixel, and
  // those reads, not the cache traffic of the sums, bound this kernel
  const int64_t n_l2 = imax(16, (524288 / (K * w)) / 16 * 16);
  const int64_t nch = (C + n_l2 - 1) / n_l2, CC = ((C + nch - 1) / nch + 15) / 16 * 16;
  // blocks of input rows: a few items per thread (dynamic scheduling evens out a busy core); each block
  // boundary costs the column sums of the output rows shared with the neighbour block once more
  const int64_t want = 4 * static_cast<int64_t>(p.nthreads), per = p.B * nch;
  const int64_t nblk = imin(h, imax(1, (want + per - 1) / per)), RB = (h + nblk - 1) / nblk;
  const T* g = static_cast<const T*>(p.g);
  T* gx = static_cast<T*>(p.gx);
#pragma omp parallel num_threads(p.nthreads)
  {
    Scratch<A> cs(K * w * CC), gb(Kc * CC), acc(CC);
    Scratch<int64_t> tag(K);
    Scratch<const A*> use(K), xs(imax(K, Kc));
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < per * nblk; ++item) {
      const int64_t b = item / (nch * nblk), ch = (item / nblk) % nch, blk = item % nblk;
      const int64_t c_lo = ch * CC, n = imin(CC, C - c_lo);
      if (n <= 0) continue;
      for (int64_t k = 0; k < K; ++k) tag[k] = -1;
      for (int64_t iy = blk * RB; iy < imin(h, (blk + 1) * RB); ++iy) {
        const int64_t e0 = rl.start.p[iy], ne = rl.start.p[iy + 1] - e0;
        for (int64_t e = 0; e < ne; ++e) {  // the column sums of every output row reading iy
          const int64_t oy = rl.out.p[e0 + e];
          int64_t slot = -1;
          for (int64_t k = 0; k < K && slot < 0; ++k) slot = tag[k] == oy ? k : -1;
          if (slot < 0) {  // evict the lowest output row not in this list (rows only move forward)
            for (int64_t k = 0; k < K; ++k) {
              bool pinned = false;
              for (int64_t f = 0; f < ne && !pinned; ++f) pinned = tag[k] == rl.out.p[e0 + f];
              if (!pinned && (slot < 0 || tag[k] < tag[slot])) slot = k;
            }
            A* dst = cs.p + slot * w * CC;
            const T* grow = g + b * p.g_sb + oy * W * p.g_st + c_lo;
            int64_t pf_next = 0;  // output pixels below this one are prefetched
            for (int64_t ix = 0; ix < w; ++ix) {
              // each pixel's run is its own page for the large chunks here: no hardware stream to follow, so
              // runs are prefetched kGradPrefetch pixels ahead of the last one this input column reads
              const int64_t last = cl.start.p[ix + 1] > cl.start.p[ix] ? cl.out.p[cl.start.p[ix + 1] - 1] : 0;
              for (; pf_next < imin(W, last + 1 + kGradPrefetch); ++pf_next)
                prefetch_row(grow + pf_next * p.g_st, n * static_cast<int64_t>(sizeof(T)));
              const int64_t f0 = cl.start.p[ix], nf = cl.start.p[ix + 1] - f0;
              for (int64_t f = 0; f < nf; ++f) xs[f] = as_acc(grow + cl.out.p[f0 + f] * p.g_st, gb.p + f * CC, n);
              wsum(xs.p, cl.wt.p + f0, nf, dst + ix * CC, n);
            }
            tag[slot] = oy;
          }
          use[e] = cs.p + slot * w * CC;
        }
        for (int64_t ix = 0; ix < w; ++ix) {
          T* dst = gx + ((b * h + iy) * w + ix) * C + c_lo;
          A* y = p.stream ? acc.p : out_buf(dst, acc.p);
          for (int64_t e = 0; e < ne; ++e) xs[e] = use[e] + ix * CC;
          wsum(xs.p, rl.wt.p + e0, ne, y, n);
          put_row(y, dst, n, p.stream != 0);
        }
      }
    }
    stream_fence();
  }
}

// Rows first (the transposed taps of the rows, then of the columns), for inputs wider than the output
// (w > W, a downsampling forward): here the column sums of cols-first would be larger than the gradient row
// they come from (w x n against W x n), while the rows-first intermediate tmp (W x n) stays in L2, and an
// output row read by two consecutive input rows is still in L2 the second time (measured: cols-first was ~30%
// slower on the 256 -> 96 ConvNeXt stage, the same on 128 -> 96; with 32 -> 96 and 64 -> 96 cols-first is the
// faster order).  Prefetching whole gradient runs did not help here; a page-walk prefetch of each pixel's
// first line (kPageAhead) does, ~10-15%.  Items: (b, input row, chunk).
template <class T, bool F>
static void interp_backward_rows_first(const InterpBackward& p) {
  using A = acc_t<T>;
  const Taps<A> rows = Taps<A>::template make<F>(p.h, p.H);
  const Taps<A> cols = Taps<A>::template make<F>(p.w, p.W);
  const TapLists<A> rl(rows, p.h, p.H), cl(cols, p.w, p.W);
  // channel chunk: the row buffer tmp (W x CC) stays in L2
  const int64_t C = p.C, W = p.W, CC = imin(C, imax(256, (131072 / W) / 16 * 16)), nch = (C + CC - 1) / CC;
  const int64_t K = max_list(rl, p.h), Kc = max_list(cl, p.w);
  const T* g = static_cast<const T*>(p.g);
  T* gx = static_cast<T*>(p.gx);
#pragma omp parallel num_threads(p.nthreads)
  {
    Scratch<A> tmp(W * CC), gb(K * CC), acc(CC);
    Scratch<const A*> xs(imax(K, Kc));
#pragma omp for schedule(dynamic, 4)
    for (int64_t item = 0; item < p.B * p.h * nch; ++item) {
      const int64_t b = item / (p.h * nch), rem = item % (p.h * nch);
      const int64_t iy = rem / nch, c_lo = (rem % nch) * CC, n = imin(CC, C - c_lo);
      // tmp[ox][:] = sum over output rows oy reading input row iy of  wy * g[b, oy, ox, :]
      const int64_t e0 = rl.start.p[iy], ne = rl.start.p[iy + 1] - e0;
      const T* gb0 = g + b * p.g_sb + c_lo;
      for (int64_t ox = 0; ox < W; ++ox) {
        if (ox + kPageAhead < W)  // each gradient pixel is on its own page: start the walk early (see kPageAhead)
          for (int64_t e = 0; e < ne; ++e) __builtin_prefetch(gb0 + (rl.out.p[e0 + e] * W + ox + kPageAhead) * p.g_st, 0, 3);
        for (int64_t e = 0; e < ne; ++e)
          xs[e] = as_acc(gb0 + (rl.out.p[e0 + e] * W + ox) * p.g_st, gb.p + e * CC, n);
        wsum(xs.p, rl.wt.p + e0, ne, tmp.p + ox * n, n);
      }
      // gx[b, iy, ix, :] = sum over output columns ox reading ix of  wx * tmp[ox][:]
      for (int64_t ix = 0; ix < p.w; ++ix) {
        T* dst = gx + ((b * p.h + iy) * p.w + ix) * C + c_lo;
        A* y = p.stream ? acc.p : out_buf(dst, acc.p);
        const int64_t f0 = cl.start.p[ix], nf = cl.start.p[ix + 1] - f0;
        for (int64_t f = 0; f < nf; ++f) xs[f] = tmp.p + cl.out.p[f0 + f] * n;
        wsum(xs.p, cl.wt.p + f0, nf, y, n);
        put_row(y, dst, n, p.stream != 0);
      }
    }
    stream_fence();
  }
}

template <class T>
static void interp_backward(const InterpBackward& p) {
  if (p.w > p.W) {
    if (p.fused) interp_backward_rows_first<T, true>(p); else interp_backward_rows_first<T, false>(p);
    return;
  }
  if (p.fused) interp_backward_cols_first<T, true>(p); else interp_backward_cols_first<T, false>(p);
}

// ------------------------------------------------------------------------------------------------
// sva_window_attention
// ------------------------------------------------------------------------------------------------
// The keys of query (b, y, x): window (y + row0_b, x + col0_b) of every tower, key order dy*r + dx,
// towers in order.  Fills key/value row pointers, the row offset inside the tower's tensor (for the
// gradients), the tower index, and validity (rectangle or mask; an all-invalid tower window -> all valid).
template <class T>
static inline void gather_window(const WindowAttention& p, int64_t b, int64_t y, int64_t x, const T** kp,
                                 const T** vp, int64_t* row, int64_t* tower, uint8_t* ok) {
  const int64_t wy = y + (p.offsets ? p.offsets[2 * b] : 0);
  const int64_t wx = x + (p.offsets ? p.offsets[2 * b + 1] : 0);
  int64_t k = 0;
  for (int64_t i = 0; i < p.T; ++i) {
    const int64_t n = p.n[i], r = p.r[i];
    const int64_t base = b * n * n;
    const int64_t* rect = p.rects ? p.rects + (i * p.B + b) * 4 : nullptr;
    const uint8_t* mask = p.masks ? p.masks + b * p.mask_len + p.mask_off[i] : nullptr;
    const int64_t first = k;
    bool any = false;
    for (int64_t dy = 0; dy < r; ++dy) {
      const int64_t gy = wy * r + dy;
      for (int64_t dx = 0; dx < r; ++dx, ++k) {
        const int64_t gx = wx * r + dx, tok = gy * n + gx;
        row[k] = (base + tok) * p.D;
        tower[k] = i;
        kp[k] = static_cast<const T*>(p.k[i]) + row[k];
        vp[k] = static_cast<const T*>(p.v[i]) + row[k];
        bool valid = true;
        if (rect) valid = gy >= rect[0] && gy < rect[1] && gx >= rect[2] && gx < rect[3];
        else if (mask) valid = mask[tok] != 0;
        ok[k] = valid;
        any = any || valid;
      }
    }
    if (!any)
      for (int64_t j = first; j < k; ++j) ok[j] = 1;
  }
}

// gather_window's outputs for one query: its Kt key/value rows, their row offsets, towers and validity.
template <class T>
struct WindowRefs {
  Scratch<const T*> kp, vp;
  Scratch<int64_t> row, tower;
  Scratch<uint8_t> ok;
  explicit WindowRefs(int64_t Kt) : kp(Kt), vp(Kt), row(Kt), tower(Kt), ok(Kt) {}
  void gather(const WindowAttention& p, int64_t idx) {  // idx: flat query index over (B, h, w)
    gather_window<T>(p, idx / (p.h * p.w), (idx / p.w) % p.h, idx % p.w, kp.p, vp.p, row.p, tower.p, ok.p);
  }
};

// Attention: key/value rows are prefetched a couple of rows ahead of their use.  With D = 1024 every
// row is its own 4 KB page and hardware stream prefetchers do not cross pages, so without this each row
// starts cold and the kernel reaches only about half of the memory bandwidth.
constexpr int64_t kPrefetchRows = 2;

static inline int64_t num_keys(const WindowAttention& p) {
  int64_t kt = 0;
  for (int64_t i = 0; i < p.T; ++i) kt += p.r[i] * p.r[i];
  return kt;
}

// Forward: per query, logits of every key for all heads (each key row read once, all heads),
// softmax per head over all towers' keys, then the probability-weighted sum of value rows.
// Saves logsumexp per (query, head) for the backward.
template <class T>
static void attn_forward(const WindowAttention& p) {
  using A = acc_t<T>;
  const int64_t D = p.D, H = p.heads, d = p.head_dim, Kt = num_keys(p), nq = p.B * p.h * p.w;
  const A scale = static_cast<A>(p.scale);
#pragma omp parallel num_threads(p.nthreads)
  {
    Scratch<A> qs(D), kb(D), ob(D), lg(Kt * H), mx(H), inv(H);
    WindowRefs<T> cur(Kt), next(Kt);  // this query's windows; the next query's, only to prefetch its rows
    const int64_t rb = D * static_cast<int64_t>(sizeof(T)), PD = kPrefetchRows;
#pragma omp for schedule(dynamic, 8)
    for (int64_t idx = 0; idx < nq; ++idx) {
      cur.gather(p, idx);
      const bool has_next = idx + 1 < nq;
      if (has_next) next.gather(p, idx + 1);
      const A* qa = as_acc(static_cast<const T*>(p.q) + idx * D, kb.p, D);
      for (int64_t j = 0; j < D; ++j) qs[j] = qa[j] * scale;  // (q * scale) . k, as the reference

      for (int64_t hh = 0; hh < H; ++hh) mx[hh] = -__builtin_inf();
      for (int64_t k = 0; k < Kt; ++k) {
        {  // K rows, then the V rows
          const int64_t j = k + PD;
          if (j < Kt) { if (cur.ok[j]) prefetch_row(cur.kp[j], rb); } else if (j - Kt < Kt && cur.ok[j - Kt]) prefetch_row(cur.vp[j - Kt], rb);
        }
        if (!cur.ok[k]) continue;  // masked keys are never read
        const A* kr = as_acc(cur.kp[k], kb.p, D);
        A* l = lg.p + k * H;
        for (int64_t hh = 0; hh < H; ++hh) l[hh] = dot(qs.p + hh * d, kr + hh * d, d);
        for (int64_t hh = 0; hh < H; ++hh) mx[hh] = l[hh] > mx[hh] ? l[hh] : mx[hh];
      }
      for (int64_t hh = 0; hh < H; ++hh) inv[hh] = A(0);
      for (int64_t k = 0; k < Kt; ++k) {
        A* l = lg.p + k * H;
        if (!cur.ok[k]) { for (int64_t hh = 0; hh < H; ++hh) l[hh] = A(0); continue; }
        for (int64_t hh = 0; hh < H; ++hh) { l[hh] = exp_acc(l[hh] - mx[hh]); inv[hh] += l[hh]; }
      }
      A* lse = static_cast<A*>(p.lse) + idx * H;
      for (int64_t hh = 0; hh < H; ++hh) { lse[hh] = mx[hh] + log_acc(inv[hh]); inv[hh] = A(1) / inv[hh]; }

      T* o = static_cast<T*>(p.out) + idx * D;
      A* acc = out_buf(o, ob.p);
      for (int64_t j = 0; j < D; ++j) acc[j] = A(0);
      for (int64_t k = 0; k < Kt; ++k) {
        {  // V rows, then the next query's K rows
          const int64_t j = k + PD;
          if (j < Kt) { if (cur.ok[j]) prefetch_row(cur.vp[j], rb); } else if (has_next && j - Kt < Kt && next.ok[j - Kt]) prefetch_row(next.kp[j - Kt], rb);
        }
        if (!cur.ok[k]) continue;
        const A* vr = as_acc(cur.vp[k], kb.p, D);
        const A* l = lg.p + k * H;
        for (int64_t hh = 0; hh < H; ++hh) axpy(l[hh] * inv[hh], vr + hh * d, acc + hh * d, d);
      }
      store_row(acc, o, D);
    }
  }
}

// Backward (FlashAttention's, per query): P from the saved logsumexp, dP = dO.V, Delta = sum P*dP,
// dS = P*(dP - Delta); dq = scale * sum dS*K, dK = dS * (q*scale), dV = P * dO.  Every key row
// belongs to exactly one window and every window to at most one query, so the key/value gradient
// rows are written directly, without atomics or reductions.
template <class T>
static void attn_backward(const WindowAttention& p) {
  using A = acc_t<T>;
  const int64_t D = p.D, H = p.heads, d = p.head_dim, Kt = num_keys(p), nq = p.B * p.h * p.w;
  const A scale = static_cast<A>(p.scale);
#pragma omp parallel num_threads(p.nthreads)
  {
    Scratch<A> qs(D), gb(D), kb(D), vb(D), dq(D), st(D), P(Kt * H), dS(Kt * H), delta(H);
    WindowRefs<T> cur(Kt), next(Kt);  // this query's windows; the next query's, only to prefetch its rows
    const int64_t rb = D * static_cast<int64_t>(sizeof(T)), PD = kPrefetchRows;
#pragma omp for schedule(dynamic, 8)
    for (int64_t idx = 0; idx < nq; ++idx) {
      cur.gather(p, idx);
      const bool has_next = idx + 1 < nq;
      if (has_next) next.gather(p, idx + 1);
      const A* qa = as_acc(static_cast<const T*>(p.q) + idx * D, kb.p, D);
      for (int64_t j = 0; j < D; ++j) qs[j] = qa[j] * scale;
      const A* go = as_acc(static_cast<const T*>(p.gout) + idx * D, gb.p, D);
      const A* lse = static_cast<const A*>(p.lse) + idx * H;

      for (int64_t hh = 0; hh < H; ++hh) delta[hh] = A(0);
      for (int64_t k = 0; k < Kt; ++k) {
        if (k + PD < Kt && cur.ok[k + PD]) { prefetch_row(cur.kp[k + PD], rb); prefetch_row(cur.vp[k + PD], rb); }
        if (!cur.ok[k]) continue;
        const A* kr = as_acc(cur.kp[k], kb.p, D);
        const A* vr = as_acc(cur.vp[k], vb.p, D);
        A* pk = P.p + k * H;
        A* ds = dS.p + k * H;
        for (int64_t hh = 0; hh < H; ++hh) {
          pk[hh] = exp_acc(dot(qs.p + hh * d, kr + hh * d, d) - lse[hh]);
          ds[hh] = dot(go + hh * d, vr + hh * d, d);  // dP for now
          delta[hh] = fmac(pk[hh], ds[hh], delta[hh]);
        }
      }
      for (int64_t j = 0; j < D; ++j) dq[j] = A(0);
      for (int64_t k = 0; k < Kt; ++k) {
        {  // the next query's K/V rows (this query's K rows are still in cache from the first pass)
          const int64_t j = k + PD - Kt;
          if (has_next && j >= 0 && j < Kt && next.ok[j]) { prefetch_row(next.kp[j], rb); prefetch_row(next.vp[j], rb); }
        }
        T* gk = static_cast<T*>(p.gk[cur.tower[k]]) + cur.row[k];
        T* gv = static_cast<T*>(p.gv[cur.tower[k]]) + cur.row[k];
        const bool stream = p.stream != 0;
        A* yk = stream ? st.p : out_buf(gk, st.p);
        if (!cur.ok[k]) {  // masked key: zero gradient (its window is read by this query only)
          for (int64_t j = 0; j < D; ++j) yk[j] = A(0);
          put_row(yk, gk, D, stream);
          A* yv = stream ? st.p : out_buf(gv, st.p);
          for (int64_t j = 0; j < D; ++j) yv[j] = A(0);
          put_row(yv, gv, D, stream);
          continue;
        }
        const A* pk = P.p + k * H;
        A* ds = dS.p + k * H;
        for (int64_t hh = 0; hh < H; ++hh) ds[hh] = pk[hh] * (ds[hh] - delta[hh]);
        const A* kr = as_acc(cur.kp[k], kb.p, D);
        for (int64_t hh = 0; hh < H; ++hh) {
          axpy(ds[hh], kr + hh * d, dq.p + hh * d, d);
          const A* qh = qs.p + hh * d;
          A* yh = yk + hh * d;
          const A s_ = ds[hh];
          for (int64_t j = 0; j < d; ++j) yh[j] = s_ * qh[j];
        }
        put_row(yk, gk, D, stream);
        A* yv = stream ? st.p : out_buf(gv, st.p);
        for (int64_t hh = 0; hh < H; ++hh) {
          const A* gh = go + hh * d;
          A* yh = yv + hh * d;
          const A p_ = pk[hh];
          for (int64_t j = 0; j < d; ++j) yh[j] = p_ * gh[j];
        }
        put_row(yv, gv, D, stream);
      }
      T* gq = static_cast<T*>(p.gq) + idx * D;
      A* yq = out_buf(gq, st.p);
      for (int64_t j = 0; j < D; ++j) yq[j] = dq[j] * scale;
      store_row(yq, gq, D);
    }
    stream_fence();
  }
}

// ------------------------------------------------------------------------------------------------
// window_pos_layer_norm
// ------------------------------------------------------------------------------------------------
static inline float sum_sq_acc(const float* a, int64_t n) { return dot_f32(a, a, n); }
static inline double sum_sq_acc(const double* a, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * a[i];
  return s;
}
static inline float sum_acc(const float* a, const float* ones, int64_t n) { return dot_f32(a, ones, n); }
static inline double sum_acc(const double* a, const double*, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += a[i];
  return s;
}
static inline void round_trip(float* v, f16_t* tmp, int64_t n) { store_row(v, tmp, n); load_row(tmp, v, n); }
static inline void round_trip(float* v, bf16_t* tmp, int64_t n) { store_row(v, tmp, n); load_row(tmp, v, n); }
static inline void round_trip(float*, float*, int64_t) {}
static inline void round_trip(double*, double*, int64_t) {}

// One token per iteration: v = x + pos (in the accumulation type, rounded to T as the separate add would),
// two-pass mean / variance over v, out = (v - mean) * rstd.  The sums use the vectorised dot (several
// accumulators), so the results differ from ATen's LayerNorm by float32 rounding only.
template <class T>
static void pos_layer_norm(const PosLayerNorm& p) {
  using A = acc_t<T>;
  const int64_t C = p.C, n = p.n, r = p.r, tokens = p.B * n * n;
  const T* x = static_cast<const T*>(p.x);
  const T* pos = static_cast<const T*>(p.pos);
  T* out = static_cast<T*>(p.out);
#pragma omp parallel num_threads(p.nthreads)
  {
    Scratch<A> v(C), pb(C), ones(C), d(C);
    Scratch<T> tmp(C);
    for (int64_t c = 0; c < C; ++c) ones[c] = A(1);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tokens; ++t) {
      const A* xr = as_acc(x + t * C, d.p, C);
      if (pos != nullptr) {
        const int64_t y = (t / n) % n, xx = t % n;
        const A* pr = as_acc(pos + ((y % r) * r + xx % r) * C, pb.p, C);
        for (int64_t c = 0; c < C; ++c) v[c] = xr[c] + pr[c];
        round_trip(v.p, tmp.p, C);
      } else {
        for (int64_t c = 0; c < C; ++c) v[c] = xr[c];
      }
      const A mean = sum_acc(v.p, ones.p, C) / A(C);
      for (int64_t c = 0; c < C; ++c) d[c] = v[c] - mean;
      const A var = sum_sq_acc(d.p, C) / A(C);
      const A rstd = A(1) / static_cast<A>(__builtin_sqrt(static_cast<double>(var) + p.eps));
      A* o = out_buf(out + t * C, v.p);
      for (int64_t c = 0; c < C; ++c) o[c] = d[c] * rstd;
      store_row(o, out + t * C, C);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// table
// ------------------------------------------------------------------------------------------------
static const KernelTable kTable = {
    CAMBRIAN_ISA_NAME,
    {&interp_forward<float>, &interp_forward<double>, &interp_forward<f16_t>, &interp_forward<bf16_t>},
    {&interp_backward<float>, &interp_backward<double>, &interp_backward<f16_t>, &interp_backward<bf16_t>},
    {&attn_forward<float>, &attn_forward<double>, &attn_forward<f16_t>, &attn_forward<bf16_t>},
    {&attn_backward<float>, &attn_backward<double>, &attn_backward<f16_t>, &attn_backward<bf16_t>},
    {&pos_layer_norm<float>, &pos_layer_norm<double>, &pos_layer_norm<f16_t>, &pos_layer_norm<bf16_t>},
};
