// Small fused kernels of the decode step: RMSNorm (+ residual add), SiLU-and-multiply, rotate-half
// RoPE from cos/sin tables, and single-token (decode) attention over the KV cache with GQA.
//
// Rounding mirrors the PyTorch reference in app/engine/backend.py and rope.py op for op (each fp16
// intermediate the reference materializes is rounded here too), so greedy decoding matches it.

#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <algorithm>

namespace kestrel {

template <typename T>
__device__ __forceinline__ float to_f(T v) { return static_cast<float>(v); }
template <typename T>
__device__ __forceinline__ T from_f(float v) { return static_cast<T>(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ float block_sum(float v) {
  __shared__ float part[32];
  __shared__ float total;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) part[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float s = lane < (int)(blockDim.x >> 5) ? part[lane] : 0.f;
    s = warp_sum(s);
    if (lane == 0) total = s;
  }
  __syncthreads();
  return total;
}

// One block per row. With `residual`, x is first replaced by fp16(x + residual) (in place).
template <typename T, typename W>
__global__ void rms_norm_kernel(T* __restrict__ x, const T* __restrict__ residual, const W* __restrict__ w,
                                T* __restrict__ y, int dim, float eps) {
  T* xr = x + (size_t)blockIdx.x * dim;
  const T* rr = residual ? residual + (size_t)blockIdx.x * dim : nullptr;
  T* yr = y + (size_t)blockIdx.x * dim;
  float ss = 0.f;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    float v = to_f(xr[i]);
    if (rr) {
      const T s = from_f<T>(v + to_f(rr[i]));
      xr[i] = s;
      v = to_f(s);
    }
    ss += v * v;
  }
  const float rstd = rsqrtf(block_sum(ss) / (float)dim + eps);
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    yr[i] = from_f<T>((to_f(xr[i]) * rstd) * to_f(w[i]));
  }
}

template <typename T>
__global__ void silu_mul_kernel(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ out,
                                int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const float g = to_f(gate[i]);
    const T s = from_f<T>(g / (1.f + expf(-g)));
    out[i] = from_f<T>(to_f(s) * to_f(up[i]));
  }
}

// x, out: (B, T, H, D) contiguous; cos, sin: (T, D) rows for positions start..start+T-1.
// out = x*cos + rotate_half(x)*sin with each product and the sum rounded like the reference.
template <typename T>
__global__ void rope_kernel(const T* __restrict__ x, const T* __restrict__ cos_t, const T* __restrict__ sin_t,
                            T* __restrict__ out, int t_len, int heads, int dim) {
  const int64_t vec = blockIdx.x;  // one (b, t, h) vector per block
  const int t = (int)((vec / heads) % t_len);
  const T* xv = x + vec * dim;
  T* ov = out + vec * dim;
  const int half = dim / 2;
  for (int d = threadIdx.x; d < dim; d += blockDim.x) {
    const float xd = to_f(xv[d]);
    const float rot = d < half ? -to_f(xv[d + half]) : to_f(xv[d - half]);
    const T a = from_f<T>(xd * to_f(cos_t[(size_t)t * dim + d]));
    const T b = from_f<T>(rot * to_f(sin_t[(size_t)t * dim + d]));
    ov[d] = from_f<T>(to_f(a) + to_f(b));
  }
}

// Decode attention, split over the key axis ("flash decoding"). Grid (H, B, splits), 4 warps per
// block; each warp walks every 4th key of the split with an online softmax, lane l holding
// dimensions l, l+32, ... of the query and output. Partials (max, sum, out[D]) go to `part`.
constexpr int ATTN_WARPS = 4;
constexpr int ATTN_MAX_DPL = 8;  // head_dim up to 256

template <typename T>
__global__ void attn_decode_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                   float* __restrict__ part, const int* __restrict__ lengths, int window,
                                   int H, int Hkv, int D, int S,
                                   int64_t q_sb, int64_t q_sh, int64_t k_sb, int64_t k_ss, int64_t k_sh,
                                   int64_t v_sb, int64_t v_ss, int64_t v_sh, float scale) {
  const int h = blockIdx.x, b = blockIdx.y, split = blockIdx.z;
  const int hk = h / (H / Hkv);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // Keys [begin, len) of this row: len comes from device memory when `lengths` is given (so a CUDA
  // graph can replay the step at any position); a sliding window keeps only the last `window`.
  const int len = lengths ? min(S, __ldg(lengths + b)) : S;
  const int begin = (window > 0 && len > window) ? len - window : 0;
  // Splits in use: at most one per 64 keys, as CudaBackend.decode_splits picks them for a cache of
  // exactly this length; the rest stay empty. So a graph launched for the whole cache sums the keys
  // in the very order of an eager call over the valid span, and both give the same logits.
  const int used = min((int)gridDim.z, max(1, (len - begin + 63) / 64));
  const int keys_per_split = (len - begin + used - 1) / used;
  const int s0 = begin + split * keys_per_split;
  const int s1 = min(len, s0 + keys_per_split);
  const T* qv = q + b * q_sb + h * q_sh;
  const T* kb = k + b * k_sb + hk * k_sh;
  const T* vb = v + b * v_sb + hk * v_sh;
  float qr[ATTN_MAX_DPL], o[ATTN_MAX_DPL];
#pragma unroll
  for (int j = 0; j < ATTN_MAX_DPL; ++j) {
    const int d = lane + 32 * j;
    qr[j] = d < D ? to_f(qv[d]) * scale : 0.f;
    o[j] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  for (int s = s0 + warp; s < s1; s += ATTN_WARPS) {
    const T* kr = kb + s * k_ss;
    float dot = 0.f;
#pragma unroll
    for (int j = 0; j < ATTN_MAX_DPL; ++j) {
      const int d = lane + 32 * j;
      if (d < D) dot = fmaf(qr[j], to_f(kr[d]), dot);
    }
    dot = warp_sum(dot);
    const float m_new = fmaxf(m, dot);
    const float corr = __expf(m - m_new);
    const float p = __expf(dot - m_new);
    l = l * corr + p;
    const T* vr = vb + s * v_ss;
#pragma unroll
    for (int j = 0; j < ATTN_MAX_DPL; ++j) {
      const int d = lane + 32 * j;
      if (d < D) o[j] = fmaf(p, to_f(vr[d]), o[j] * corr);
    }
    m = m_new;
  }
  // Combine the warps of this block.
  __shared__ float sm_m[ATTN_WARPS], sm_l[ATTN_WARPS];
  __shared__ float sm_o[ATTN_WARPS][32 * ATTN_MAX_DPL];
  if (lane == 0) {
    sm_m[warp] = m;
    sm_l[warp] = l;
  }
#pragma unroll
  for (int j = 0; j < ATTN_MAX_DPL; ++j) sm_o[warp][lane + 32 * j] = o[j];
  __syncthreads();
  float mm = -INFINITY;
#pragma unroll
  for (int w = 0; w < ATTN_WARPS; ++w) mm = fmaxf(mm, sm_m[w]);
  float* out = part + (((size_t)b * H + h) * gridDim.z + split) * (D + 2);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.f;
#pragma unroll
    for (int w = 0; w < ATTN_WARPS; ++w)
      if (sm_m[w] != -INFINITY) acc += sm_o[w][d] * __expf(sm_m[w] - mm);
    out[2 + d] = acc;
  }
  if (threadIdx.x == 0) {
    float ll = 0.f;
#pragma unroll
    for (int w = 0; w < ATTN_WARPS; ++w)
      if (sm_m[w] != -INFINITY) ll += sm_l[w] * __expf(sm_m[w] - mm);
    out[0] = mm;
    out[1] = ll;
  }
}

template <typename T>
__global__ void attn_combine_kernel(const float* __restrict__ part, T* __restrict__ out, int H, int D, int splits) {
  const int h = blockIdx.x, b = blockIdx.y;
  const float* p = part + ((size_t)b * H + h) * splits * (D + 2);
  float mm = -INFINITY;
  for (int s = 0; s < splits; ++s) mm = fmaxf(mm, p[s * (D + 2)]);
  float l = 0.f;
  for (int s = 0; s < splits; ++s) {
    const float ms = p[s * (D + 2)];
    if (ms != -INFINITY) l += p[s * (D + 2) + 1] * __expf(ms - mm);
  }
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.f;
    for (int s = 0; s < splits; ++s) {
      const float ms = p[s * (D + 2)];
      if (ms != -INFINITY) acc += p[s * (D + 2) + 2 + d] * __expf(ms - mm);
    }
    out[((size_t)b * H + h) * D + d] = from_f<T>(acc / l);
  }
}

static int norm_threads(int dim) {
  int t = 32;
  while (t < dim && t < 1024) t *= 2;
  return std::min(t, 1024);
}

#define KESTREL_DISPATCH_ACT(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, __VA_ARGS__)

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.is_cuda() && x.is_contiguous(), "rms_norm: x must be a contiguous CUDA tensor");
  TORCH_CHECK(weight.is_cuda() && weight.is_contiguous() && weight.numel() == x.size(-1),
              "rms_norm: weight must be a contiguous CUDA tensor of size x.shape[-1]");
  const bool has_res = residual.numel() > 0;
  if (has_res)
    TORCH_CHECK(residual.is_contiguous() && residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type(),
                "rms_norm: residual must match x");
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = torch::empty_like(x);
  const int dim = (int)x.size(-1);
  const int64_t rows = x.numel() / dim;
  if (rows == 0) return y;
  auto stream = c10::cuda::getCurrentCUDAStream();
  KESTREL_DISPATCH_ACT(x.scalar_type(), "rms_norm", [&] {
    using T = scalar_t;
    T* xp = x.data_ptr<T>();
    const T* rp = has_res ? residual.data_ptr<T>() : nullptr;
    T* yp = y.data_ptr<T>();
    const int threads = norm_threads(dim);
    KESTREL_DISPATCH_ACT(weight.scalar_type(), "rms_norm_w", [&] {
      rms_norm_kernel<T, scalar_t><<<(unsigned)rows, threads, 0, stream>>>(xp, rp, weight.data_ptr<scalar_t>(), yp,
                                                                           dim, (float)eps);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

torch::Tensor silu_mul(torch::Tensor gate, torch::Tensor up) {
  TORCH_CHECK(gate.is_cuda() && gate.is_contiguous() && up.is_contiguous() && gate.sizes() == up.sizes() &&
                  gate.scalar_type() == up.scalar_type(),
              "silu_mul: gate and up must be contiguous CUDA tensors of one shape and dtype");
  const c10::cuda::CUDAGuard guard(gate.device());
  auto out = torch::empty_like(gate);
  const int64_t n = gate.numel();
  if (n == 0) return out;
  const int threads = 256;
  const int blocks = (int)std::min<int64_t>((n + threads - 1) / threads, 65535);
  KESTREL_DISPATCH_ACT(gate.scalar_type(), "silu_mul", [&] {
    silu_mul_kernel<scalar_t><<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        gate.data_ptr<scalar_t>(), up.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

torch::Tensor rope(torch::Tensor x, torch::Tensor cos_t, torch::Tensor sin_t) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 4, "rope: x must be a CUDA (B, T, H, D) tensor");
  auto xc = x.contiguous();
  auto c = cos_t.contiguous();
  auto s = sin_t.contiguous();
  const int T_ = (int)x.size(1), H = (int)x.size(2), D = (int)x.size(3);
  TORCH_CHECK(D % 2 == 0 && c.size(0) == T_ && c.size(1) == D && s.sizes() == c.sizes() &&
                  c.scalar_type() == x.scalar_type() && s.scalar_type() == x.scalar_type(),
              "rope: cos/sin must be (T, D) tables of x's dtype");
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = torch::empty_like(xc);
  const int64_t vecs = xc.numel() / D;
  if (vecs == 0) return out;
  KESTREL_DISPATCH_ACT(x.scalar_type(), "rope", [&] {
    rope_kernel<scalar_t><<<(unsigned)vecs, std::min(D, 256), 0, c10::cuda::getCurrentCUDAStream()>>>(
        xc.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), T_, H, D);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// q: (B, 1, H, D); k, v: (B, S, Hkv, D) with unit stride over D. Returns (B, 1, H*D). With a
// non-empty `lengths` (int32, (B,)) row b attends to keys [0, lengths[b]) only (the rest of the cache
// is ignored), and window > 0 keeps the last `window` of those.
static torch::Tensor attention_impl(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor lengths,
                                    int64_t num_splits, int64_t window) {
  TORCH_CHECK(q.is_cuda() && q.dim() == 4 && q.size(1) == 1, "attention_decode: q must be CUDA (B, 1, H, D)");
  TORCH_CHECK(k.dim() == 4 && v.sizes() == k.sizes() && k.size(0) == q.size(0) && k.size(3) == q.size(3),
              "attention_decode: k, v must be (B, S, Hkv, D) matching q");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "attention_decode: head dim must be contiguous");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "attention_decode: dtypes differ");
  const int B = (int)q.size(0), H = (int)q.size(2), D = (int)q.size(3);
  const int S = (int)k.size(1), Hkv = (int)k.size(2);
  TORCH_CHECK(D <= 32 * ATTN_MAX_DPL && Hkv > 0 && H % Hkv == 0 && S > 0, "attention_decode: unsupported shape");
  const bool has_len = lengths.defined() && lengths.numel() > 0;
  if (has_len)
    TORCH_CHECK(lengths.is_cuda() && lengths.scalar_type() == torch::kInt32 && lengths.numel() == B,
                "attention_decode: lengths must be a CUDA int32 (B,) tensor");
  const c10::cuda::CUDAGuard guard(q.device());
  const int splits = (int)std::max<int64_t>(1, std::min<int64_t>(num_splits, S));
  auto part = torch::empty({B, H, splits, D + 2}, q.options().dtype(torch::kFloat32));
  auto out = torch::empty({B, 1, H * D}, q.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const float scale = 1.0f / sqrtf((float)D);
  KESTREL_DISPATCH_ACT(q.scalar_type(), "attention_decode", [&] {
    attn_decode_kernel<scalar_t><<<dim3(H, B, splits), 32 * ATTN_WARPS, 0, stream>>>(
        q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), part.data_ptr<float>(),
        has_len ? lengths.data_ptr<int>() : nullptr, (int)window, H, Hkv, D, S, q.stride(0), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), scale);
    attn_combine_kernel<scalar_t><<<dim3(H, B), std::min(D, 256), 0, stream>>>(part.data_ptr<float>(),
                                                                              out.data_ptr<scalar_t>(), H, D, splits);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

torch::Tensor attention_decode(torch::Tensor q, torch::Tensor k, torch::Tensor v, int64_t num_splits) {
  return attention_impl(q, k, v, torch::Tensor(), num_splits, 0);
}

torch::Tensor attention_decode_cached(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                      torch::Tensor lengths, int64_t num_splits, int64_t window) {
  TORCH_CHECK(lengths.defined() && lengths.numel() > 0, "attention_decode_cached: lengths are required");
  return attention_impl(q, k_cache, v_cache, lengths, num_splits, window);
}

// Decode step: RoPE on one token's q and k at position pos[b] (read on the device), and the cache
// write of k and v at that position. Grid (H + 2 * Hkv, B): q heads, then k heads, then v heads.
template <typename T>
__global__ void rope_cache_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                  const T* __restrict__ cos_t, const T* __restrict__ sin_t,
                                  const int* __restrict__ pos, T* __restrict__ q_out, T* __restrict__ kc,
                                  T* __restrict__ vc, int H, int Hkv, int D, int64_t kc_sb, int64_t kc_ss,
                                  int64_t kc_sh, int64_t vc_sb, int64_t vc_ss, int64_t vc_sh) {
  const int head = blockIdx.x, b = blockIdx.y;
  const int p = __ldg(pos + b);
  const T* src;
  T* dst;
  bool rotate = true;
  if (head < H) {
    src = q + ((size_t)b * H + head) * D;
    dst = q_out + ((size_t)b * H + head) * D;
  } else if (head < H + Hkv) {
    const int hk = head - H;
    src = k + ((size_t)b * Hkv + hk) * D;
    dst = kc + b * kc_sb + p * kc_ss + hk * kc_sh;
  } else {
    const int hk = head - H - Hkv;
    src = v + ((size_t)b * Hkv + hk) * D;
    dst = vc + b * vc_sb + p * vc_ss + hk * vc_sh;
    rotate = false;
  }
  const int half = D / 2;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    if (!rotate) {
      dst[d] = src[d];
      continue;
    }
    const float xd = to_f(src[d]);
    const float rot = d < half ? -to_f(src[d + half]) : to_f(src[d - half]);
    const T a = from_f<T>(xd * to_f(cos_t[(size_t)p * D + d]));
    const T bb = from_f<T>(rot * to_f(sin_t[(size_t)p * D + d]));
    dst[d] = from_f<T>(to_f(a) + to_f(bb));
  }
}

// q: (B, 1, H, D), k, v: (B, 1, Hkv, D) contiguous; tables (L, D) of q's dtype; pos int32 (B,);
// caches (B, S, Hkv, D) with unit stride over D. Returns the rotated q; writes the caches in place.
torch::Tensor rope_cache_decode(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor cos_t,
                                torch::Tensor sin_t, torch::Tensor pos, torch::Tensor k_cache, torch::Tensor v_cache) {
  TORCH_CHECK(q.is_cuda() && q.dim() == 4 && q.size(1) == 1 && q.is_contiguous(),
              "rope_cache_decode: q must be a contiguous CUDA (B, 1, H, D) tensor");
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && k.sizes() == v.sizes() && k.dim() == 4 && k.size(1) == 1 &&
                  k.size(0) == q.size(0) && k.size(3) == q.size(3),
              "rope_cache_decode: k, v must be contiguous (B, 1, Hkv, D)");
  const int B = (int)q.size(0), H = (int)q.size(2), D = (int)q.size(3), Hkv = (int)k.size(2);
  TORCH_CHECK(D % 2 == 0 && cos_t.is_contiguous() && sin_t.is_contiguous() && cos_t.size(1) == D &&
                  cos_t.sizes() == sin_t.sizes() && cos_t.scalar_type() == q.scalar_type() &&
                  sin_t.scalar_type() == q.scalar_type(),
              "rope_cache_decode: cos/sin must be contiguous (L, D) tables of q's dtype");
  TORCH_CHECK(pos.is_cuda() && pos.scalar_type() == torch::kInt32 && pos.numel() == B,
              "rope_cache_decode: pos must be a CUDA int32 (B,) tensor");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() && k_cache.size(0) == B &&
                  k_cache.size(2) == Hkv && k_cache.size(3) == D && k_cache.stride(3) == 1 && v_cache.stride(3) == 1 &&
                  k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "rope_cache_decode: caches must be (B, S, Hkv, D) of q's dtype with unit stride over D");
  const c10::cuda::CUDAGuard guard(q.device());
  auto q_out = torch::empty_like(q);
  KESTREL_DISPATCH_ACT(q.scalar_type(), "rope_cache_decode", [&] {
    rope_cache_kernel<scalar_t><<<dim3(H + 2 * Hkv, B), std::min(D, 256), 0, c10::cuda::getCurrentCUDAStream()>>>(
        q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), cos_t.data_ptr<scalar_t>(),
        sin_t.data_ptr<scalar_t>(), pos.data_ptr<int>(), q_out.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(),
        v_cache.data_ptr<scalar_t>(), H, Hkv, D, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return q_out;
}

}  // namespace kestrel
