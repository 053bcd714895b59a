// EXL2 quantized matrix-vector product (decode, 1..8 rows of x) and exact dequantization (prefill).
//
// Layout (prepared once by app/engine/cuda_backend.py from the on-disk EXL2 tensors):
//   qweight  int32 (Qrows + 8, Np): the on-disk q_weight, columns padded with zeros to Np (a multiple
//            of 8) and 8 zero rows appended so the last, partial tile can be read whole.
//   qscale   int32 (G, Np/8): the on-disk 4-bit scale codes (s - 1), eight per word, low nibble first.
//   step     fp32 (G,): fp16(q_scale_max / 256) held exactly in fp32.
//   tiles    int32 (T, 2): one entry per 32-row tile of the quantized matrix: {first q_weight row,
//            bits | group << 8}. Every group but the last has a multiple of 32 rows, so each tile
//            lies in one group and its 32 codes per column fill exactly `bits` words.
//   perm     int32 (K,): act order; quantized row k multiplies x[perm[k]] (empty when identity).
//
// The gemv: each thread owns 4 adjacent columns and reads a tile's `bits` words for them with one
// 16-byte load per word (a warp reads 512 contiguous bytes); the next tile is loaded while the current
// one is decoded. Per tile the 32 codes are dotted with x in fp32 and the group scale
// fp16(fp16(s*s) * step) is applied once. Blocks split K; partial sums go to a workspace with
// atomics and the last block of each column strip writes fp16 output (+ bias) and re-zeroes the
// workspace, so one launch does the whole product. The workspace holds 64-bit fixed point (units of
// 2^-34), not fp32: integer addition is associative, so the sum does not depend on the order the
// blocks arrive in, and a step gives the same logits on every run (graph or eager, one row or the
// drafts' check, same seed same tokens). 2^-34 is far below fp16's smallest step (2^-24). A partial
// sum is clamped to +-2^17, beyond fp16's range (the output is then inf, as it would be anyway), so
// even 2^11 K chunks cannot overflow 63 bits; NaN clamps too.

#pragma once
#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <algorithm>

namespace kestrel {

constexpr int GEMV_THREADS = 64;
constexpr int COLS_PER_THREAD = 4;
constexpr int TILE_ROWS = 32;
constexpr int MAX_ROWS = 8;
constexpr int MAX_TILES_PER_CHUNK = 32;

__device__ __forceinline__ uint32_t word_of(const int4& v, int c) {
  return c == 0 ? (uint32_t)v.x : c == 1 ? (uint32_t)v.y : c == 2 ? (uint32_t)v.z : (uint32_t)v.w;
}

// Code i (0..31) of column c from a tile's words; i and c are compile-time after unrolling.
template <int BITS>
__device__ __forceinline__ uint32_t code_at(const int4 (&w)[8], int c, int i) {
  const int bit = i * BITS;
  const int j = bit >> 5;
  const int sh = bit & 31;
  uint32_t v;
  if (sh + BITS <= 32) {
    v = word_of(w[j], c) >> sh;
  } else {
    v = __funnelshift_r(word_of(w[j], c), word_of(w[(j + 1) & 7], c), sh);
  }
  return v & ((1u << BITS) - 1u);
}

// (code - 2^(bits-1)) as an exact float: put the code in the mantissa of 2^23 and subtract.
template <int BITS>
__device__ __forceinline__ float centered(uint32_t code) {
  constexpr float offset = 8388608.0f + (float)(1 << (BITS - 1));
  return __uint_as_float(0x4B000000u | code) - offset;
}

__device__ __forceinline__ void load_tile(int4 (&w)[8], const int4* __restrict__ qweight, int np4,
                                          int2 info, int col4) {
  const int bits = info.y & 0xff;
  const int4* p = qweight + (size_t)info.x * np4 + col4;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    if (j < bits) w[j] = __ldg(p + (size_t)j * np4);
  }
}

// Scales of 4 adjacent columns: fp16(fp16(s*s) * step); s*s and step are fp16 values, so their
// fp32 product is exact and one rounding to fp16 equals the reference's fp16 multiply.
__device__ __forceinline__ void tile_scales(float (&scale)[4], const uint32_t* __restrict__ qscale,
                                            const float* __restrict__ step, int np8, int group, int col4) {
  const uint32_t sw = __ldg(qscale + (size_t)group * np8 + (col4 >> 1)) >> ((col4 & 1) * 16);
  const float st = __ldg(step + group);
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const int s = (int)((sw >> (4 * c)) & 15u) + 1;
    scale[c] = __half2float(__float2half_rn((float)(s * s) * st));
  }
}

constexpr float FIXED_ONE = 17179869184.0f;  // 2^34
constexpr float FIXED_LIMIT = 131072.0f;     // 2^17

__device__ __forceinline__ void add_fixed(unsigned long long* p, float v) {
  v = fminf(fmaxf(v, -FIXED_LIMIT), FIXED_LIMIT);
  atomicAdd(p, (unsigned long long)__float2ll_rn(v * FIXED_ONE));
}

// The column's sum, read back once by the last block, which leaves the word zeroed for the next launch.
__device__ __forceinline__ float take_fixed(unsigned long long* p) {
  const long long s = (long long)__ldcg(p);
  __stcg(p, 0ull);
  return (float)((double)s * (1.0 / (double)FIXED_ONE));
}

template <int BITS, int M>
__device__ __forceinline__ void tile_dot(const int4 (&w)[8], const float* __restrict__ xs, int xstride,
                                         const float (&scale)[4], float (&acc)[M][4]) {
  float part[M][4];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int c = 0; c < 4; ++c) part[m][c] = 0.f;
#pragma unroll
  for (int i = 0; i < TILE_ROWS; ++i) {
    float q[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) q[c] = centered<BITS>(code_at<BITS>(w, c, i));
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const float xv = xs[m * xstride + i];
#pragma unroll
      for (int c = 0; c < 4; ++c) part[m][c] = fmaf(xv, q[c], part[m][c]);
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[m][c] = fmaf(part[m][c], scale[c], acc[m][c]);
}

// One matrix of a launch. Several matrices that share x (q, k and v; gate and up) run as one launch,
// their column blocks side by side along grid.x: one graph node instead of three. Every launch over
// the same matrices splits K alike, whatever the number of rows.
constexpr int MAX_PARTS = 3;
struct GemvPart {
  const int* perm;  // act order (nullptr: identity)
  const int4* qweight;
  const uint32_t* qscale;
  const float* step;
  const int2* tiles;
  const half* bias;  // nullptr: none
  unsigned long long* acc_ws;  // this matrix's MAX_ROWS * Np words of the workspace
  half* out;
  int out_stride, N, Np;
  int block0;  // first column block of this matrix in grid.x
};
struct GemvParts {
  GemvPart p[MAX_PARTS];
  int count;
};

// A field of the block's matrix, picked without indexing the parameter struct dynamically (which
// would copy it to local memory).
#define KESTREL_PART(f) (pi == 0 ? parts.p[0].f : (pi == 1 ? parts.p[1].f : parts.p[2].f))

template <int M>
__global__ void __launch_bounds__(GEMV_THREADS)
exl2_gemv_kernel(const half* __restrict__ x, int x_stride, const GemvParts parts,
                 unsigned* __restrict__ counters, int K, int num_tiles, int tiles_per_chunk) {
  int pi = 0;
  if (parts.count > 1 && (int)blockIdx.x >= parts.p[1].block0) pi = 1;
  if (parts.count > 2 && (int)blockIdx.x >= parts.p[2].block0) pi = 2;
  const int* __restrict__ perm = KESTREL_PART(perm);
  const int4* __restrict__ qweight = KESTREL_PART(qweight);
  const uint32_t* __restrict__ qscale = KESTREL_PART(qscale);
  const float* __restrict__ step = KESTREL_PART(step);
  const int2* __restrict__ tiles = KESTREL_PART(tiles);
  const half* __restrict__ bias = KESTREL_PART(bias);
  unsigned long long* __restrict__ acc_ws = KESTREL_PART(acc_ws);
  half* __restrict__ out = KESTREL_PART(out);
  const int out_stride = KESTREL_PART(out_stride);
  const int N = KESTREL_PART(N);
  const int Np = KESTREL_PART(Np);
  const int block_x = (int)blockIdx.x - KESTREL_PART(block0);
  extern __shared__ float xs[];
  __shared__ bool is_last;
  const int chunk_rows = tiles_per_chunk * TILE_ROWS;
  const int t0 = blockIdx.y * tiles_per_chunk;
  const int t1 = min(t0 + tiles_per_chunk, num_tiles);
  const int r0 = t0 * TILE_ROWS;

  // x rows of this K chunk, in quantization order, as fp32; rows past K are zero.
  for (int idx = threadIdx.x; idx < M * chunk_rows; idx += blockDim.x) {
    const int m = idx / chunk_rows;
    const int k = r0 + (idx - m * chunk_rows);
    float v = 0.f;
    if (k < K) v = __half2float(x[(size_t)m * x_stride + (perm ? __ldg(perm + k) : k)]);
    xs[idx] = v;
  }
  __syncthreads();

  const int np4 = Np >> 2;
  const int np8 = Np >> 3;
  const int col4 = block_x * GEMV_THREADS + threadIdx.x;
  const bool active = col4 < np4;
  float acc[M][4];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[m][c] = 0.f;

  if (active && t0 < t1) {
    int4 cur[8], nxt[8];
    int2 info = __ldg(tiles + t0);
    load_tile(cur, qweight, np4, info, col4);
    for (int t = t0; t < t1; ++t) {
      int2 ninfo = info;
      if (t + 1 < t1) {
        ninfo = __ldg(tiles + t + 1);
        load_tile(nxt, qweight, np4, ninfo, col4);
      }
      float scale[4];
      tile_scales(scale, qscale, step, np8, info.y >> 8, col4);
      const float* xt = xs + (t - t0) * TILE_ROWS;
      switch (info.y & 0xff) {
        case 8: tile_dot<8, M>(cur, xt, chunk_rows, scale, acc); break;
        case 6: tile_dot<6, M>(cur, xt, chunk_rows, scale, acc); break;
        case 5: tile_dot<5, M>(cur, xt, chunk_rows, scale, acc); break;
        case 4: tile_dot<4, M>(cur, xt, chunk_rows, scale, acc); break;
        case 3: tile_dot<3, M>(cur, xt, chunk_rows, scale, acc); break;
        case 2: tile_dot<2, M>(cur, xt, chunk_rows, scale, acc); break;
        default: break;
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) cur[j] = nxt[j];
      info = ninfo;
    }
  }

  if (gridDim.y == 1) {  // one K chunk: write the result straight away
    if (active) {
#pragma unroll
      for (int m = 0; m < M; ++m)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int n = col4 * 4 + c;
          if (n < N) out[(size_t)m * out_stride + n] = __float2half_rn(acc[m][c] + (bias ? __half2float(bias[n]) : 0.f));
        }
    }
    return;
  }

  if (active) {
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int c = 0; c < 4; ++c) add_fixed(acc_ws + (size_t)m * Np + col4 * 4 + c, acc[m][c]);
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(counters + blockIdx.x, 1u) == gridDim.y - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  if (active) {
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int n = col4 * 4 + c;
        const float v = take_fixed(acc_ws + (size_t)m * Np + n);
        if (n < N) out[(size_t)m * out_stride + n] = __float2half_rn(v + (bias ? __half2float(bias[n]) : 0.f));
      }
  }
  if (threadIdx.x == 0) counters[blockIdx.x] = 0;
}

// Launch arguments shared by every row count; the kernel for M rows is instantiated in its own
// translation unit (exl2_gemv_m*.cu) so the heavily unrolled code compiles in parallel. The batch-1
// half2 gemv takes parts.p[0] (one matrix).
struct GemvArgs {
  const half* x;
  int x_stride;
  GemvParts parts;
  unsigned* counters;
  int K, num_tiles, tiles_per_chunk;
  dim3 grid;
  size_t smem;
  cudaStream_t stream;
};

template <int M>
void launch_gemv(const GemvArgs& a) {
  exl2_gemv_kernel<M><<<a.grid, GEMV_THREADS, a.smem, a.stream>>>(a.x, a.x_stride, a.parts, a.counters, a.K,
                                                                  a.num_tiles, a.tiles_per_chunk);
}

#define KESTREL_INSTANTIATE_GEMV(MM) template void launch_gemv<MM>(const GemvArgs&);

}  // namespace kestrel
