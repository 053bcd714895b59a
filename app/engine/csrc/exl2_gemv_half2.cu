// Batch-1 EXL2 gemv in half2 arithmetic (the decode fast path; exl2_kernels.cuh has the exact fp32 one).
//
// Same prepared layout, grid, K split and fp32 workspace as exl2_gemv_kernel<1>; only the per-tile
// arithmetic differs. Per 32-row tile and column, codes are decoded two per instruction into half2
// (exl2_half2_decode.cuh), multiplied with x pairs by HFMA2 into two half2 partial sums of 8 products
// per lane, converted to fp32, scaled by the group scale and accumulated across tiles in fp32.
//
// Overflow guard: each block finds max|x| over its K chunk and, when it is 32 or more, scales its
// copy of x by a power of two 2^-e so that max|x| < 32 (exact but for values falling to fp16
// subnormals, far below the ones that dominate the sum); 2^e is folded into the fp32 scale. Every
// half2 partial sum is then below 8 * 128 * 32 = 32768, inside fp16 range for every bit width.

#include "exl2_half2_decode.cuh"
#include "exl2_kernels.cuh"

namespace kestrel {

namespace {

// x position of tile-local half index pos for a tile of `bits` (the layout decode_pair reads).
__device__ __forceinline__ int x_row(int bits, int pos) {
  switch (bits) {
    case 8: return h2::row_of(8, pos);
    case 6: return h2::row_of(6, pos);
    case 5: return h2::row_of(5, pos);
    case 3: return h2::row_of(3, pos);
    case 2: return h2::row_of(2, pos);
    default: return h2::row_of(4, pos);
  }
}

template <int BITS>
__device__ __forceinline__ void tile_dot_h2(const int4 (&w)[8], const half2 (&xv)[16], const float (&scale)[4],
                                            float (&acc)[4]) {
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    uint32_t wc[BITS];
#pragma unroll
    for (int j = 0; j < BITS; ++j) wc[j] = word_of(w[j], c);
    const float dot = h2::column_dot<BITS>(wc, xv, std::make_integer_sequence<int, 16>{});
    acc[c] = fmaf(dot, scale[c], acc[c]);
  }
}

__global__ void __launch_bounds__(GEMV_THREADS)
exl2_gemv_half2_kernel(const half* __restrict__ x, const int* __restrict__ perm,
                       const int4* __restrict__ qweight, const uint32_t* __restrict__ qscale,
                       const float* __restrict__ step, const int2* __restrict__ tiles,
                       const half* __restrict__ bias, unsigned long long* __restrict__ acc_ws,
                       unsigned* __restrict__ counters, half* __restrict__ out,
                       int K, int N, int Np, int num_tiles, int tiles_per_chunk) {
  extern __shared__ int4 xs_raw[];  // tiles_per_chunk * 32 halves: per tile, 16 x pairs in decode order
  half* xs = reinterpret_cast<half*>(xs_raw);
  __shared__ float warp_max[GEMV_THREADS / 32];
  __shared__ bool is_last;
  const int chunk_rows = tiles_per_chunk * TILE_ROWS;
  const int t0 = blockIdx.y * tiles_per_chunk;
  const int t1 = min(t0 + tiles_per_chunk, num_tiles);
  const int r0 = t0 * TILE_ROWS;

  // x of this K chunk in quantization order, each tile's rows permuted into its pair order.
  float mx = 0.f;
  for (int idx = threadIdx.x; idx < chunk_rows; idx += blockDim.x) {
    const int tt = idx >> 5;
    const int t = t0 + tt;
    half v = __float2half_rn(0.f);
    if (t < t1) {
      const int k = r0 + tt * TILE_ROWS + x_row(__ldg(&tiles[t].y) & 0xff, idx & 31);
      if (k < K) v = x[perm ? __ldg(perm + k) : k];
    }
    xs[idx] = v;
    mx = fmaxf(mx, fabsf(__half2float(v)));
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = mx;
  __syncthreads();
#pragma unroll
  for (int i = 0; i < GEMV_THREADS / 32; ++i) mx = fmaxf(mx, warp_max[i]);
  // mx in [2^E, 2^(E+1)): scaling by 2^-(E-4) leaves it below 32. (NaN/inf: fmaxf drops NaN; inf keeps
  // its exponent 128 and is clamped, the result is inf/NaN either way.)
  const int e = min(max((int)((__float_as_uint(mx) >> 23) & 0xffu) - 127 - 4, 0), 15);
  if (e > 0) {
    const float down = __uint_as_float((uint32_t)(127 - e) << 23);
    for (int idx = threadIdx.x; idx < chunk_rows; idx += blockDim.x)  // the entries this thread wrote
      xs[idx] = __float2half_rn(__half2float(xs[idx]) * down);
  }
  __syncthreads();
  const float up = __uint_as_float((uint32_t)(127 + e) << 23);

  const int np4 = Np >> 2;
  const int np8 = Np >> 3;
  const int col4 = blockIdx.x * GEMV_THREADS + threadIdx.x;
  const bool active = col4 < np4;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};

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
#pragma unroll
      for (int c = 0; c < 4; ++c) scale[c] *= up;
      half2 xv[16];
      const int4* xp = xs_raw + (t - t0) * 4;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int4 v = xp[i];
        xv[4 * i + 0] = h2::as_half2((uint32_t)v.x);
        xv[4 * i + 1] = h2::as_half2((uint32_t)v.y);
        xv[4 * i + 2] = h2::as_half2((uint32_t)v.z);
        xv[4 * i + 3] = h2::as_half2((uint32_t)v.w);
      }
      switch (info.y & 0xff) {
        case 8: tile_dot_h2<8>(cur, xv, scale, acc); break;
        case 6: tile_dot_h2<6>(cur, xv, scale, acc); break;
        case 5: tile_dot_h2<5>(cur, xv, scale, acc); break;
        case 4: tile_dot_h2<4>(cur, xv, scale, acc); break;
        case 3: tile_dot_h2<3>(cur, xv, scale, acc); break;
        case 2: tile_dot_h2<2>(cur, xv, scale, acc); break;
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
      for (int c = 0; c < 4; ++c) {
        const int n = col4 * 4 + c;
        if (n < N) out[n] = __float2half_rn(acc[c] + (bias ? __half2float(bias[n]) : 0.f));
      }
    }
    return;
  }

  if (active) {
#pragma unroll
    for (int c = 0; c < 4; ++c) add_fixed(acc_ws + col4 * 4 + c, acc[c]);
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(counters + blockIdx.x, 1u) == gridDim.y - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  if (active) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int n = col4 * 4 + c;
      const float v = take_fixed(acc_ws + n);
      if (n < N) out[n] = __float2half_rn(v + (bias ? __half2float(bias[n]) : 0.f));
    }
  }
  if (threadIdx.x == 0) counters[blockIdx.x] = 0;
}

}  // namespace

// a.smem must hold tiles_per_chunk * 32 halves; x has one row.
void launch_gemv_half2(const GemvArgs& a) {
  const GemvPart& p = a.parts.p[0];
  exl2_gemv_half2_kernel<<<a.grid, GEMV_THREADS, a.smem, a.stream>>>(
      a.x, p.perm, p.qweight, p.qscale, p.step, p.tiles, p.bias, p.acc_ws, a.counters, p.out, a.K, p.N, p.Np,
      a.num_tiles, a.tiles_per_chunk);
}

}  // namespace kestrel
