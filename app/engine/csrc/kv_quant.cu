// Quantized KV cache (Q8/Q6/Q4) in the decode step: the read-back of one layer's cache into the fp16
// buffers attention reads, and the quantized write of the new token. Both read the token's position
// from device memory, so the decode step with a quantized cache is captured in a CUDA graph like the
// fp16 one. Layout, rotation, key centring, sink and recent copies: app/engine/kv_quant.py, whose
// update() is the reference these kernels are tested against (tests/test_cuda_kernels.py).
//
// One warp per group of 32 elements of one head: lane l holds element l of the group, the normalized
// 32-point Hadamard rotation is a butterfly over the lanes (__shfl_xor_sync), the group's absmax a
// warp max, and packing gathers neighbours' codes by shuffles.

#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace kestrel {
namespace {

constexpr int KVQ_GROUP = 32;
constexpr int KVQ_WARPS = 8;

// T and the fp16 of scales and key means are at::Half / at::BFloat16 (device-side float conversions).
using Half = at::Half;
template <typename T>
__device__ __forceinline__ float kvq_f(T v) { return static_cast<float>(v); }

// y_j = sum_i x_i (-1)^popcount(i & j) / sqrt(32): x @ hadamard() of kv_quant.py, lane i holding x_i.
__device__ __forceinline__ float hadamard32(float v, int lane) {
#pragma unroll
  for (int h = 1; h < KVQ_GROUP; h <<= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, v, h);
    v = (lane & h) ? other - v : v + other;
  }
  return v * 0.17677669529663687f;  // 1 / sqrt(32)
}

// Code of element `lane` of a group whose packed bytes start at `p` (kv_quant.unpack).
__device__ __forceinline__ int unpack_code(const uint8_t* __restrict__ p, int lane, int bits) {
  if (bits == 8) return p[lane];
  if (bits == 4) return (p[lane >> 1] >> ((lane & 1) * 4)) & 15;
  const uint8_t* t = p + 3 * (lane >> 2);  // bits == 6: four codes in three bytes
  switch (lane & 3) {
    case 0: return t[0] & 63;
    case 1: return (t[0] >> 6) | ((t[1] & 15) << 2);
    case 2: return (t[1] >> 4) | ((t[2] & 3) << 4);
    default: return t[2] >> 2;
  }
}

// rope(mean, p)[d] in fp32: mean * cos + rotate_half(mean) * sin (rope.apply_rope on float tables).
template <typename T>
__device__ __forceinline__ float key_offset(const Half* __restrict__ mean, const T* __restrict__ cos_t,
                                            const T* __restrict__ sin_t, int p, int d, int D) {
  const int half = D / 2;
  const float m = kvq_f(mean[d]);
  const float r = d < half ? -kvq_f(mean[d + half]) : kvq_f(mean[d - half]);
  return m * kvq_f(cos_t[(size_t)p * D + d]) + r * kvq_f(sin_t[(size_t)p * D + d]);
}

struct KvqArgs {
  const uint8_t* kq;
  const uint8_t* vq;
  const Half* ks;
  const Half* vs;
  int64_t q_sb, q_ss, q_sh;     // strides of the packed stores (bytes), (B, S, Hkv, NB)
  int64_t s_sb, s_ss, s_sh;     // strides of the scales, (B, S, Hkv, G)
  int64_t e_sb, e_ss, e_sh;     // strides of the sink copies, (B, E, Hkv, D)
  int64_t r_sb, r_ss, r_sh;     // strides of the recent rings, (B, R, Hkv, D)
  int64_t b_sb, b_ss, b_sh;     // strides of the read-back buffers, (B, S, Hkv, D)
  int Hkv, D, G, bits, E, R;
  bool rotate;
};

// Positions [0, pos[b]) of one layer into kb/vb: the first E from the sinks, the recent ones (from
// max(ring_lo, pos - R) on) from the rings, the rest dequantized. Grid (blocks, B), KVQ_WARPS warps
// per block, a grid-stride loop over (position, head, group) so the grid does not depend on pos.
template <typename T>
__global__ void kvq_read_kernel(KvqArgs a, const Half* __restrict__ key_mean, const T* __restrict__ cos_t,
                                const T* __restrict__ sin_t, const T* __restrict__ sink_k,
                                const T* __restrict__ sink_v, const T* __restrict__ ring_k,
                                const T* __restrict__ ring_v, const int* __restrict__ pos,
                                const int* __restrict__ ring_lo, T* __restrict__ kb, T* __restrict__ vb) {
  const int b = blockIdx.y;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int p_end = __ldg(pos + b);
  const int lo = max(max(min(p_end + 1, a.E), __ldg(ring_lo)), p_end - a.R);
  const int per_pos = a.Hkv * a.G;
  const int total = p_end * per_pos;
  const float half_levels = 0.5f * (float)((1 << a.bits) - 1);
  for (int item = blockIdx.x * KVQ_WARPS + warp; item < total; item += gridDim.x * KVQ_WARPS) {
    const int p = item / per_pos;
    const int hk = (item / a.G) % a.Hkv;
    const int g = item % a.G;
    const int d = g * KVQ_GROUP + lane;
    T* kdst = kb + b * a.b_sb + p * a.b_ss + hk * a.b_sh;
    T* vdst = vb + b * a.b_sb + p * a.b_ss + hk * a.b_sh;
    if (p < a.E || p >= lo) {  // exact fp16 copies (uniform over the warp)
      const bool sink = p < a.E;
      const T* ksrc = sink ? sink_k + b * a.e_sb + p * a.e_ss + hk * a.e_sh
                           : ring_k + b * a.r_sb + (p % a.R) * a.r_ss + hk * a.r_sh;
      const T* vsrc = sink ? sink_v + b * a.e_sb + p * a.e_ss + hk * a.e_sh
                           : ring_v + b * a.r_sb + (p % a.R) * a.r_ss + hk * a.r_sh;
      if (d < a.D) {
        kdst[d] = ksrc[d];
        vdst[d] = vsrc[d];
      }
      continue;
    }
    const int64_t qoff = b * a.q_sb + p * a.q_ss + hk * a.q_sh + (int64_t)g * KVQ_GROUP * a.bits / 8;
    const int64_t soff = b * a.s_sb + p * a.s_ss + hk * a.s_sh + g;
    float kx = ((float)unpack_code(a.kq + qoff, lane, a.bits) - half_levels) * kvq_f(a.ks[soff]);
    float vx = ((float)unpack_code(a.vq + qoff, lane, a.bits) - half_levels) * kvq_f(a.vs[soff]);
    if (a.rotate) {
      kx = hadamard32(kx, lane);
      vx = hadamard32(vx, lane);
    }
    if (d < a.D) {
      const Half* mean = key_mean + (int64_t)(b * a.Hkv + hk) * a.D;
      kdst[d] = static_cast<T>(kx + key_offset(mean, cos_t, sin_t, p, d, a.D));
      vdst[d] = static_cast<T>(vx);
    }
  }
}

// The token at pos[b] (already in kb/vb, written there by rope_cache_decode): quantized into the
// stores, copied to the sinks (pos < E) and to ring slot pos % R. Grid (Hkv * G, 2, B): keys, values.
template <typename T>
__global__ void kvq_write_kernel(KvqArgs a, uint8_t* __restrict__ kq, uint8_t* __restrict__ vq,
                                 Half* __restrict__ ks, Half* __restrict__ vs,
                                 const Half* __restrict__ key_mean, const T* __restrict__ cos_t,
                                 const T* __restrict__ sin_t, T* __restrict__ sink_k, T* __restrict__ sink_v,
                                 T* __restrict__ ring_k, T* __restrict__ ring_v, const int* __restrict__ pos,
                                 const T* __restrict__ kb, const T* __restrict__ vb) {
  const int hk = blockIdx.x / a.G, g = blockIdx.x % a.G;
  const bool is_key = blockIdx.y == 0;
  const int b = blockIdx.z;
  const int lane = threadIdx.x;
  const int p = __ldg(pos + b);
  const int d = g * KVQ_GROUP + lane;
  const T* src = (is_key ? kb : vb) + b * a.b_sb + p * a.b_ss + hk * a.b_sh;
  const T exact = d < a.D ? src[d] : static_cast<T>(0.f);
  float x = d < a.D ? kvq_f(exact) : 0.f;
  if (is_key && d < a.D) x -= key_offset(key_mean + (int64_t)(b * a.Hkv + hk) * a.D, cos_t, sin_t, p, d, a.D);
  if (a.rotate) x = hadamard32(x, lane);
  float amax = fabsf(x);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  const int top = (1 << a.bits) - 1;
  const float half_levels = 0.5f * (float)top;
  const Half scale_h = static_cast<Half>(fmaxf(amax / half_levels, 1e-8f));
  const float scale = kvq_f(scale_h);
  int code = (int)half_levels;  // an all-zero group (scale rounds to 0) stores its middle code
  if (scale > 0.f) code = (int)fminf(fmaxf(rintf(x / scale + half_levels), 0.f), (float)top);
  uint8_t* dst = (is_key ? kq : vq) + b * a.q_sb + p * a.q_ss + hk * a.q_sh + (int64_t)g * KVQ_GROUP * a.bits / 8;
  const int c1 = __shfl_down_sync(0xffffffffu, code, 1);
  const int c2 = __shfl_down_sync(0xffffffffu, code, 2);
  const int c3 = __shfl_down_sync(0xffffffffu, code, 3);
  if (a.bits == 8) {
    dst[lane] = (uint8_t)code;
  } else if (a.bits == 4) {
    if ((lane & 1) == 0) dst[lane >> 1] = (uint8_t)(code | (c1 << 4));
  } else if ((lane & 3) == 0) {  // bits == 6
    uint8_t* t = dst + 3 * (lane >> 2);
    t[0] = (uint8_t)((code | (c1 << 6)) & 255);
    t[1] = (uint8_t)(((c1 >> 2) | (c2 << 4)) & 255);
    t[2] = (uint8_t)(((c2 >> 4) | (c3 << 2)) & 255);
  }
  if (lane == 0) (is_key ? ks : vs)[b * a.s_sb + p * a.s_ss + hk * a.s_sh + g] = scale_h;
  if (d < a.D) {
    if (p < a.E) (is_key ? sink_k : sink_v)[b * a.e_sb + p * a.e_ss + hk * a.e_sh + d] = exact;
    (is_key ? ring_k : ring_v)[b * a.r_sb + (p % a.R) * a.r_ss + hk * a.r_sh + d] = exact;
  }
}

}  // namespace

// One decode step of one layer of a QuantKVCache (kv_quant.py): reads back positions [0, pos[b]) into
// kb/vb, then quantizes and stores the token at pos[b] that rope_cache_decode wrote into kb/vb.
// kq/vq uint8 (B, S, Hkv, NB), ks/vs fp16 (B, S, Hkv, G), key_mean fp16 (B, 1, Hkv, D), cos/sin (L, D)
// and sinks (B, E, Hkv, D), rings (B, R, Hkv, D), kb/vb (B, S, Hkv, D) of the model's dtype; pos int32
// (B,); ring_lo int32 (1,): the lowest position the rings still hold. `blocks`: read grid size.
void kv_quant_decode(torch::Tensor kq, torch::Tensor ks, torch::Tensor vq, torch::Tensor vs,
                     torch::Tensor key_mean, torch::Tensor cos_t, torch::Tensor sin_t, torch::Tensor sink_k,
                     torch::Tensor sink_v, torch::Tensor ring_k, torch::Tensor ring_v, torch::Tensor pos,
                     torch::Tensor ring_lo, torch::Tensor kb, torch::Tensor vb, int64_t bits, bool rotate,
                     int64_t blocks) {
  TORCH_CHECK(bits == 4 || bits == 6 || bits == 8, "kv_quant_decode: bits must be 4, 6 or 8");
  TORCH_CHECK(kq.is_cuda() && kq.scalar_type() == torch::kUInt8 && vq.sizes() == kq.sizes() && kq.dim() == 4,
              "kv_quant_decode: packed stores must be CUDA uint8 (B, S, Hkv, NB)");
  TORCH_CHECK(ks.scalar_type() == torch::kHalf && vs.sizes() == ks.sizes() && key_mean.scalar_type() == torch::kHalf,
              "kv_quant_decode: scales and key means must be fp16");
  const int B = (int)kb.size(0), Hkv = (int)kb.size(2), D = (int)kb.size(3), G = (int)ks.size(3);
  TORCH_CHECK(kb.sizes() == vb.sizes() && kb.stride(3) == 1 && vb.strides() == kb.strides() &&
                  kq.size(0) == B && kq.size(2) == Hkv && kq.size(3) * 8 == (int64_t)G * KVQ_GROUP * bits &&
                  G * KVQ_GROUP >= D && kq.stride(3) == 1 && vq.strides() == kq.strides() &&
                  ks.stride(3) == 1 && vs.strides() == ks.strides(),
              "kv_quant_decode: stores, scales and read-back buffers disagree in shape or layout");
  TORCH_CHECK(key_mean.is_contiguous() && key_mean.numel() == (int64_t)B * Hkv * D,
              "kv_quant_decode: key_mean must be contiguous (B, 1, Hkv, D)");
  TORCH_CHECK(cos_t.is_contiguous() && sin_t.is_contiguous() && cos_t.size(1) == D && cos_t.sizes() == sin_t.sizes() &&
                  cos_t.scalar_type() == kb.scalar_type() && sin_t.scalar_type() == kb.scalar_type(),
              "kv_quant_decode: cos/sin must be contiguous (L, D) tables of the cache's dtype");
  TORCH_CHECK(sink_k.sizes() == sink_v.sizes() && sink_k.strides() == sink_v.strides() && sink_k.stride(3) == 1 &&
                  ring_k.sizes() == ring_v.sizes() && ring_k.strides() == ring_v.strides() && ring_k.stride(3) == 1 &&
                  sink_k.scalar_type() == kb.scalar_type() && ring_k.scalar_type() == kb.scalar_type(),
              "kv_quant_decode: sink and ring copies must be (B, n, Hkv, D) of the cache's dtype");
  TORCH_CHECK(pos.is_cuda() && pos.scalar_type() == torch::kInt32 && pos.numel() == B &&
                  ring_lo.is_cuda() && ring_lo.scalar_type() == torch::kInt32 && ring_lo.numel() >= 1,
              "kv_quant_decode: pos (B,) and ring_lo (1,) must be CUDA int32");
  const c10::cuda::CUDAGuard guard(kb.device());
  KvqArgs a{kq.data_ptr<uint8_t>(), vq.data_ptr<uint8_t>(), ks.data_ptr<Half>(), vs.data_ptr<Half>(),
            kq.stride(0), kq.stride(1), kq.stride(2), ks.stride(0), ks.stride(1), ks.stride(2),
            sink_k.stride(0), sink_k.stride(1), sink_k.stride(2), ring_k.stride(0), ring_k.stride(1), ring_k.stride(2),
            kb.stride(0), kb.stride(1), kb.stride(2), Hkv, D, G, (int)bits, (int)sink_k.size(1), (int)ring_k.size(1),
            rotate};
  const Half* mean = key_mean.data_ptr<Half>();
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int grid = (int)std::max<int64_t>(1, blocks);
  AT_DISPATCH_REDUCED_FLOATING_TYPES(kb.scalar_type(), "kv_quant_decode", [&] {
    using T = scalar_t;
    const T *cs = cos_t.data_ptr<T>(), *sn = sin_t.data_ptr<T>();
    kvq_read_kernel<T><<<dim3(grid, B), KVQ_WARPS * 32, 0, stream>>>(
        a, mean, cs, sn, sink_k.data_ptr<T>(), sink_v.data_ptr<T>(), ring_k.data_ptr<T>(), ring_v.data_ptr<T>(),
        pos.data_ptr<int>(), ring_lo.data_ptr<int>(), kb.data_ptr<T>(), vb.data_ptr<T>());
    kvq_write_kernel<T><<<dim3(Hkv * G, 2, B), KVQ_GROUP, 0, stream>>>(
        a, kq.data_ptr<uint8_t>(), vq.data_ptr<uint8_t>(), ks.data_ptr<Half>(), vs.data_ptr<Half>(), mean, cs, sn,
        sink_k.data_ptr<T>(), sink_v.data_ptr<T>(), ring_k.data_ptr<T>(), ring_v.data_ptr<T>(), pos.data_ptr<int>(),
        kb.data_ptr<T>(), vb.data_ptr<T>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace kestrel
