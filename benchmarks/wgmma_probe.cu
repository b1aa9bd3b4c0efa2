// A probe for the backward's wgmma plan (docs/design.md, "Next: the backward's products as
// wgmma"): pass C's C2 step at D = 64, C = 64, HB = 32 (X = z̄2 W2^T, Y = z̄2 S2^T, R = a2b hk1,
// each a split bf16 product, hi*hi + hi*lo + lo*hi, then an elementwise join), in a CTA of 8
// warps, one CTA per SM, with a barrier-separated write back of the result into z̄2's planes
// (each step depends on the last), as the kernel's block loop does. Seven ways:
//   0 mma.sync, padded row-major planes (the kernel today)
//   1 mma.sync, tiled planes (wgmma.cuh's no-swizzle layout, read by ldmatrix)
//   2 wgmma m64n16k16, A from registers (ldmatrix), B by descriptor, tiled planes
//   3 wgmma m64n16k16, A and B by descriptor, tiled planes
//   4 as 3 at m64n32k16: each warpgroup computes all 32 columns (twice the products), to see
//     how wgmma's rate grows with N
//   5 as 0 with each warp computing both n16 halves (twice the products), 4's baseline
//   6 no products: what the step costs without them (its error is meaningless)
// Every warp computes the same 16 x 16 tile of X, Y, R in every way (rows 16 (warp % 4), cols
// 16 (warp / 4)), so the elementwise code is shared. Prints each way's error against float64
// (one step, CTA 0) and its time per step over many steps and 132 CTAs.
//
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -Icsrc benchmarks/wgmma_probe.cu \
//        -o /tmp/wgmma_probe && /tmp/wgmma_probe
// Standalone (not part of the wheel); sm_90a only.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "common/wgmma.cuh"
#include "neural_memory/chunked_kernel.cuh"  // split2: the kernels' hi / lo split

using namespace titans;
using bf16 = __nv_bfloat16;
using chunked::split2;

#define CK(x)                                                                          \
  do {                                                                                 \
    cudaError_t e_ = (x);                                                              \
    if (e_ != cudaSuccess) {                                                           \
      std::printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e_));           \
      std::exit(1);                                                                    \
    }                                                                                  \
  } while (0)

constexpr int C = 64, D = 64, HB = 32, kThreads = 256;

// element offset of (r, c) in an R x cols plane: padded row-major (ld cols + 8) or tiled
template <bool kTiled>
__device__ __forceinline__ int off(int r, int c, int cols) {
  if constexpr (kTiled) return tiled_offset(r, c, cols);
  return r * (cols + 8) + c;
}
// a plane's room: the padded layout's, which holds the tiled one too
__host__ __device__ constexpr int plane_elems(int rows, int cols) { return rows * (cols + 8); }

struct Buf {  // hi plane, then lo plane
  bf16* p;
  int plane, cols;
  __device__ bf16* hi() const { return p; }
  __device__ bf16* lo() const { return p + plane; }
};

template <bool kTiled>
__device__ void put2(const Buf& b, int r, int c, float x, float y) {
  uint32_t h, l;
  split2(x, y, h, l);
  *reinterpret_cast<uint32_t*>(b.hi() + off<kTiled>(r, c, b.cols)) = h;
  *reinterpret_cast<uint32_t*>(b.lo() + off<kTiled>(r, c, b.cols)) = l;
}

// global hi / lo planes (row-major rows x cols) into a shared buffer
template <bool kTiled>
__device__ void load_buf(const Buf& b, const bf16* ghi, const bf16* glo, int rows) {
  for (int i = threadIdx.x; i < rows * b.cols; i += kThreads) {
    const int r = i / b.cols, c = i % b.cols;
    b.hi()[off<kTiled>(r, c, b.cols)] = ghi[i];
    b.lo()[off<kTiled>(r, c, b.cols)] = glo[i];
  }
}

// ---- mma.sync (ways 0, 1, 5) ----
template <bool kTiled>
__device__ __forceinline__ void ld_a(FragA<bf16>& a, const bf16* s, int cols, int m0, int k0,
                                     int lane) {
  ldmatrix_x4(a.r, s + off<kTiled>(m0 + (lane & 15), k0 + (lane >> 4) * 8, cols));
}
// B stored [n][k] (two n-tiles at n0, n0 + 8)
template <bool kTiled>
__device__ __forceinline__ void ld_b_nk(FragB<bf16> (&b)[2], const bf16* s, int cols, int k0,
                                        int n0, int lane) {
  uint32_t r[4];
  ldmatrix_x4(r, s + off<kTiled>(n0 + (lane & 7) + (lane >> 4) * 8, k0 + ((lane >> 3) & 1) * 8,
                                 cols));
  unpack_b2(b, r);
}
// B stored [k][n]
template <bool kTiled>
__device__ __forceinline__ void ld_b_kn(FragB<bf16> (&b)[2], const bf16* s, int cols, int k0,
                                        int n0, int lane) {
  uint32_t r[4];
  ldmatrix_x4_trans(r, s + off<kTiled>(k0 + (lane & 7) + ((lane >> 3) & 1) * 8,
                                       n0 + (lane >> 4) * 8, cols));
  unpack_b2(b, r);
}

// both planes of A's 16 x 16 fragment at (m0, k0)
template <bool kTiled>
__device__ __forceinline__ void ld_a2(FragA<bf16>& ah, FragA<bf16>& al, const Buf& A, int m0,
                                      int k0, int lane) {
  ld_a<kTiled>(ah, A.hi(), A.cols, m0, k0, lane);
  ld_a<kTiled>(al, A.lo(), A.cols, m0, k0, lane);
}

template <bool kTiled, bool kBKN>
__device__ __forceinline__ void mma_tile(float (&acc)[8], const Buf& A, int m0, const Buf& B,
                                         int n0, int lane) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    FragA<bf16> ah, al;
    ld_a2<kTiled>(ah, al, A, m0, kk * 16, lane);
    FragB<bf16> bh[2], bl[2];
    if constexpr (kBKN) {
      ld_b_kn<kTiled>(bh, B.hi(), B.cols, kk * 16, n0, lane);
      ld_b_kn<kTiled>(bl, B.lo(), B.cols, kk * 16, n0, lane);
    } else {
      ld_b_nk<kTiled>(bh, B.hi(), B.cols, kk * 16, n0, lane);
      ld_b_nk<kTiled>(bl, B.lo(), B.cols, kk * 16, n0, lane);
    }
    float(&a0)[4] = *reinterpret_cast<float(*)[4]>(&acc[0]);
    float(&a1)[4] = *reinterpret_cast<float(*)[4]>(&acc[4]);
    mma(a0, ah, bh[0]);
    mma(a1, ah, bh[1]);
    mma(a0, ah, bl[0]);
    mma(a1, ah, bl[1]);
    mma(a0, al, bh[0]);
    mma(a1, al, bh[1]);
  }
}

#ifdef TITANS_HAS_WGMMA
// ---- wgmma (ways 2, 3; way 4 below): this warpgroup's n16 slice at n0 ----
// B [n][k] (K-major): LBO 128 B (k halves), SBO cols / 8 * 128 B (8-row n groups)
__device__ __forceinline__ uint64_t desc_nk(const bf16* s, int cols, int k0, int n0) {
  return wgmma_desc(s + tiled_offset(n0, k0, cols), 128, cols / 8 * 128);
}
// B [k][n] (N-major): SBO 128 B (8-column n groups), LBO cols / 8 * 128 B (8-row k groups)
__device__ __forceinline__ uint64_t desc_kn(const bf16* s, int cols, int k0, int n0) {
  return wgmma_desc(s + tiled_offset(k0, n0, cols), cols / 8 * 128, 128);
}
template <int kTB>  // B stored [k][n] (kTB) or [n][k]
__device__ __forceinline__ uint64_t desc_b(const bf16* s, int cols, int k0, int n0) {
  return kTB ? desc_kn(s, cols, k0, n0) : desc_nk(s, cols, k0, n0);
}

template <int kTB>
__device__ __forceinline__ void wg_tile_rs(float (&acc)[8], const Buf& A, int m0, const Buf& B,
                                           int n0, int lane) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    FragA<bf16> ah, al;
    ld_a2<true>(ah, al, A, m0, kk * 16, lane);
    const uint64_t bh = desc_b<kTB>(B.hi(), B.cols, kk * 16, n0);
    const uint64_t bl = desc_b<kTB>(B.lo(), B.cols, kk * 16, n0);
    wgmma_fence();  // ah, al written by ldmatrix
    wgmma_m64n16_rs<kTB>(acc, ah, bh);
    wgmma_m64n16_rs<kTB>(acc, ah, bl);
    wgmma_m64n16_rs<kTB>(acc, al, bh);
  }
}

template <int kTB>
__device__ __forceinline__ void wg_tile_ss(float (&acc)[8], const Buf& A, const Buf& B, int n0) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const uint64_t ah = desc_nk(A.hi(), A.cols, kk * 16, 0);  // A [m][k]: K-major like B [n][k]
    const uint64_t al = desc_nk(A.lo(), A.cols, kk * 16, 0);
    const uint64_t bh = desc_b<kTB>(B.hi(), B.cols, kk * 16, n0);
    const uint64_t bl = desc_b<kTB>(B.lo(), B.cols, kk * 16, n0);
    wgmma_m64n16_ss<0, kTB>(acc, ah, bh);
    wgmma_m64n16_ss<0, kTB>(acc, ah, bl);
    wgmma_m64n16_ss<0, kTB>(acc, al, bh);
  }
}
// m64n32 (16 floats per thread), A and B by descriptor: way 4
template <int kTB>
__device__ __forceinline__ void wgmma_m64n32_ss(float (&d)[16], uint64_t a, uint64_t b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, "
      "1, 0, %18;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15])
      : "l"(a), "l"(b), "n"(kTB));
}
template <int kTB>
__device__ __forceinline__ void wg_tile_ss32(float (&acc)[16], const Buf& A, const Buf& B) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const uint64_t ah = desc_nk(A.hi(), A.cols, kk * 16, 0);
    const uint64_t al = desc_nk(A.lo(), A.cols, kk * 16, 0);
    const uint64_t bh = desc_b<kTB>(B.hi(), B.cols, kk * 16, 0);
    const uint64_t bl = desc_b<kTB>(B.lo(), B.cols, kk * 16, 0);
    wgmma_m64n32_ss<kTB>(acc, ah, bh);
    wgmma_m64n32_ss<kTB>(acc, ah, bl);
    wgmma_m64n32_ss<kTB>(acc, al, bh);
  }
}
#endif

struct Inputs {  // row-major hi / lo planes
  const bf16 *zb2h, *zb2l, *w2h, *w2l, *s2h, *s2l, *a2bh, *a2bl, *hk1h, *hk1l;
  const float *be, *ce;  // per-row scales (C)
};

template <int kWay>
__global__ void __launch_bounds__(kThreads, 1) probe(Inputs in, int steps, float* out) {
  constexpr bool kTiled = kWay != 0 && kWay != 5;
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* base = reinterpret_cast<bf16*>(smem);
  auto take = [&](int rows, int cols) {
    const Buf b{base, plane_elems(rows, cols), cols};
    base += 2 * plane_elems(rows, cols);
    return b;
  };
  const Buf zb2 = take(C, D), w2 = take(HB, D), s2 = take(HB, D), a2b = take(C, C),
            hk1 = take(C, HB);
  load_buf<kTiled>(zb2, in.zb2h, in.zb2l, C);
  load_buf<kTiled>(w2, in.w2h, in.w2l, HB);
  load_buf<kTiled>(s2, in.s2h, in.s2l, HB);
  load_buf<kTiled>(a2b, in.a2bh, in.a2bl, C);
  load_buf<kTiled>(hk1, in.hk1h, in.hk1l, C);
  if constexpr (kWay >= 2) fence_proxy_async_smem();
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int m0 = 16 * (warp % 4), n0 = 16 * (warp / 4);
  float last[8] = {};
  for (int it = 0; it < steps; ++it) {
    float X[8] = {}, Y[8] = {}, R[8] = {};
    if constexpr (kWay <= 1 || kWay == 5) {
      mma_tile<kTiled, false>(X, zb2, m0, w2, n0, lane);
      mma_tile<kTiled, false>(Y, zb2, m0, s2, n0, lane);
      mma_tile<kTiled, true>(R, a2b, m0, hk1, n0, lane);
      if constexpr (kWay == 5) {  // the other n16 half too (twice the work, as way 4)
        float X2[8] = {}, Y2[8] = {}, R2[8] = {};
        mma_tile<kTiled, false>(X2, zb2, m0, w2, n0 ^ 16, lane);
        mma_tile<kTiled, false>(Y2, zb2, m0, s2, n0 ^ 16, lane);
        mma_tile<kTiled, true>(R2, a2b, m0, hk1, n0 ^ 16, lane);
#pragma unroll
        for (int i = 0; i < 8; ++i) X[i] += 1e-30f * (X2[i] + Y2[i] + R2[i]);
      }
    } else if constexpr (kWay == 6) {  // no products: the step's barriers and stores alone
#pragma unroll
      for (int i = 0; i < 8; ++i)
        X[i] = __bfloat162float(zb2.hi()[off<true>(m0 + lane / 4, n0 + i, D)]);
    } else if constexpr (kWay == 4) {
#ifdef TITANS_HAS_WGMMA
      float X2[16], Y2[16], R2[16];
#pragma unroll
      for (int i = 0; i < 16; ++i) X2[i] = Y2[i] = R2[i] = 0.f;
      wgmma_pin(X2);
      wgmma_pin(Y2);
      wgmma_pin(R2);
      wgmma_fence();
      wg_tile_ss32<0>(X2, zb2, w2);
      wg_tile_ss32<0>(Y2, zb2, s2);
      wg_tile_ss32<1>(R2, a2b, hk1);
      wgmma_commit();
      wgmma_wait<0>();
      wgmma_pin(X2);
      wgmma_pin(Y2);
      wgmma_pin(R2);
      const int h = n0 / 16;  // this warp's n16 half of the n32 result
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        X[i] = h ? X2[8 + i] : X2[i];  // selects, not a run-time index (no local memory)
        Y[i] = h ? Y2[8 + i] : Y2[i];
        R[i] = h ? R2[8 + i] : R2[i];
      }
#endif
    } else {
#ifdef TITANS_HAS_WGMMA
      wgmma_pin(X);  // the zeros are written before the fence
      wgmma_pin(Y);
      wgmma_pin(R);
      wgmma_fence();
      if constexpr (kWay == 2) {
        wg_tile_rs<0>(X, zb2, m0, w2, n0, lane);
        wg_tile_rs<0>(Y, zb2, m0, s2, n0, lane);
        wg_tile_rs<1>(R, a2b, m0, hk1, n0, lane);
      } else {
        wg_tile_ss<0>(X, zb2, w2, n0);
        wg_tile_ss<0>(Y, zb2, s2, n0);
        wg_tile_ss<1>(R, a2b, hk1, n0);
      }
      wgmma_commit();
      wgmma_wait<0>();
      wgmma_pin(X);
      wgmma_pin(Y);
      wgmma_pin(R);
#endif
    }
    float v[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {  // d[4 t + e]: row m0 + lane / 4 + 8 (e / 2)
      const int row = m0 + lane / 4 + 8 * ((i & 3) >> 1);
      v[i] = in.be[row] * X[i] + in.ce[row] * Y[i] + R[i];
      last[i] = v[i];
    }
    __syncthreads();  // every warp has read z̄2
    const int c0 = 32 * (it & 1) + n0;
#pragma unroll
    for (int t = 0; t < 2; ++t)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = m0 + lane / 4 + 8 * h, col = c0 + 8 * t + 2 * (lane % 4);
        put2<kTiled>(zb2, row, col, fminf(fmaxf(0.05f * v[4 * t + 2 * h], -1.f), 1.f),
                     fminf(fmaxf(0.05f * v[4 * t + 2 * h + 1], -1.f), 1.f));
      }
    if constexpr (kWay >= 2 && kWay != 5) fence_proxy_async_smem();
    __syncthreads();
  }
  if (blockIdx.x == 0) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int t = i >> 2, e = i & 3;
      const int row = m0 + lane / 4 + 8 * (e >> 1), col = n0 + 8 * t + 2 * (lane % 4) + (e & 1);
      out[row * HB + col] = last[i];
    }
  }
}

// ---- host ----
static float bfr(float x) { return __bfloat162float(__float2bfloat16(x)); }
struct HostPlanes {
  std::vector<bf16> hi, lo;
  std::vector<double> hd, ld;  // the planes as doubles
};
static HostPlanes make(int n, unsigned& seed, float scale) {
  HostPlanes p;
  for (int i = 0; i < n; ++i) {
    seed = seed * 1664525u + 1013904223u;
    const float x = scale * ((seed >> 8) * (1.f / 16777216.f) * 2.f - 1.f);
    const float h = bfr(x), l = bfr(x - h);
    p.hi.push_back(__float2bfloat16(h));
    p.lo.push_back(__float2bfloat16(l));
    p.hd.push_back(h);
    p.ld.push_back(l);
  }
  return p;
}
template <typename T>
static T* up(const std::vector<T>& v) {
  T* d;
  CK(cudaMalloc(&d, v.size() * sizeof(T)));
  CK(cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

static int g_failed = 0;  // ways whose one step is off float64 by more than fp32 rounding

template <int kWay>
static void run(const Inputs& in, const std::vector<double>& ref, int sms, const char* name) {
  const int smem = 150 * 1024;  // one CTA per SM, as the kernel
  CK(cudaFuncSetAttribute(probe<kWay>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  float* out;
  CK(cudaMalloc(&out, C * HB * sizeof(float)));
  probe<kWay><<<1, kThreads, smem>>>(in, 1, out);
  CK(cudaGetLastError());
  CK(cudaDeviceSynchronize());
  std::vector<float> got(C * HB);
  CK(cudaMemcpy(got.data(), out, got.size() * sizeof(float), cudaMemcpyDeviceToHost));
  double num = 0, den = 0;
  for (int i = 0; i < C * HB; ++i) {
    num += (got[i] - ref[i]) * (got[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  const int steps = 4096;
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  probe<kWay><<<sms, kThreads, smem>>>(in, steps, out);  // warm-up
  CK(cudaEventRecord(a));
  const int reps = 5;
  for (int r = 0; r < reps; ++r) probe<kWay><<<sms, kThreads, smem>>>(in, steps, out);
  CK(cudaEventRecord(b));
  CK(cudaEventSynchronize(b));
  float ms;
  CK(cudaEventElapsedTime(&ms, a, b));
  const double err = std::sqrt(num / den);
  if (kWay != 6 && !(err < 1e-5)) ++g_failed;
  std::printf("%-40s rel err %.2e   %7.3f us per step (%d CTAs x %d steps)\n", name, err,
              ms * 1e3 / reps / steps, sms, steps);
  CK(cudaFree(out));
}

int main() {
  unsigned seed = 12345u;
  HostPlanes zb2 = make(C * D, seed, 1.f), w2 = make(HB * D, seed, 0.3f),
             s2 = make(HB * D, seed, 0.3f), a2b = make(C * C, seed, 0.5f),
             hk1 = make(C * HB, seed, 1.f);
  std::vector<float> be(C), ce(C);
  for (int i = 0; i < C; ++i) {
    be[i] = 0.5f + 0.01f * i;
    ce[i] = -0.25f + 0.005f * i;
  }
  // float64 reference of one step (the three split terms, as the kernel takes them)
  auto term = [](const HostPlanes& a, int ia, const HostPlanes& b, int ib) {
    return a.hd[ia] * b.hd[ib] + a.hd[ia] * b.ld[ib] + a.ld[ia] * b.hd[ib];
  };
  std::vector<double> ref(C * HB);
  for (int r = 0; r < C; ++r)
    for (int n = 0; n < HB; ++n) {
      double x = 0, y = 0, rr = 0;
      for (int k = 0; k < D; ++k) {
        x += term(zb2, r * D + k, w2, n * D + k);
        y += term(zb2, r * D + k, s2, n * D + k);
      }
      for (int k = 0; k < C; ++k) rr += term(a2b, r * C + k, hk1, k * HB + n);
      ref[r * HB + n] = double(be[r]) * x + double(ce[r]) * y + rr;
    }
  Inputs in{up(zb2.hi), up(zb2.lo), up(w2.hi),  up(w2.lo),  up(s2.hi), up(s2.lo),
            up(a2b.hi), up(a2b.lo), up(hk1.hi), up(hk1.lo), up(be),    up(ce)};
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("%s, %d SMs: pass C's C2 step (3 split products, 64 x 32 over k 64), 8 warps\n",
              prop.name, prop.multiProcessorCount);
  const int sms = prop.multiProcessorCount;
  run<0>(in, ref, sms, "0 mma.sync, padded planes (kernel today)");
  run<1>(in, ref, sms, "1 mma.sync, tiled planes");
  run<2>(in, ref, sms, "2 wgmma, A registers, B descriptors");
  run<3>(in, ref, sms, "3 wgmma, A and B descriptors");
  run<4>(in, ref, sms, "4 = 3 at m64n32: each warpgroup all 32 cols (2x work)");
  run<5>(in, ref, sms, "5 = 0 with both n16 halves per warp (2x work)");
  run<6>(in, ref, sms, "6 no products (barriers, join, stores)");
  if (g_failed) std::printf("FAILED: %d ways off float64\n", g_failed);
  return g_failed ? 1 : 0;
}
