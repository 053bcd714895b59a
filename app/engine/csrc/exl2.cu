// EXL2 host entry points: argument checks, grid choice and the exact dequantization kernel.
// The kernels and the layout they read are described in exl2_kernels.cuh.

#include "exl2_kernels.cuh"

namespace kestrel {

// Instantiated in exl2_gemv_m*.cu; `extern` keeps this unit from compiling the kernels again.
extern template void launch_gemv<1>(const GemvArgs&);
extern template void launch_gemv<2>(const GemvArgs&);
extern template void launch_gemv<3>(const GemvArgs&);
extern template void launch_gemv<4>(const GemvArgs&);
extern template void launch_gemv<5>(const GemvArgs&);
extern template void launch_gemv<6>(const GemvArgs&);
extern template void launch_gemv<7>(const GemvArgs&);
extern template void launch_gemv<8>(const GemvArgs&);
void launch_gemv_half2(const GemvArgs& a);  // exl2_gemv_half2.cu

template <int BITS>
__device__ __forceinline__ void dequant_tile(const int4 (&w)[8], const float (&scale)[4], half* __restrict__ out,
                                             int ldo, int rows) {
  constexpr int zero = 1 << (BITS - 1);
#pragma unroll
  for (int i = 0; i < TILE_ROWS; ++i) {
    if (i < rows) {
      __half2 lo, hi;
      lo.x = __float2half_rn((float)((int)code_at<BITS>(w, 0, i) - zero) * scale[0]);
      lo.y = __float2half_rn((float)((int)code_at<BITS>(w, 1, i) - zero) * scale[1]);
      hi.x = __float2half_rn((float)((int)code_at<BITS>(w, 2, i) - zero) * scale[2]);
      hi.y = __float2half_rn((float)((int)code_at<BITS>(w, 3, i) - zero) * scale[3]);
      __half2* p = reinterpret_cast<__half2*>(out + (size_t)i * ldo);
      p[0] = lo;
      p[1] = hi;
    }
  }
}

// Dequantize columns [n0, n0 + ncols) (n0 a multiple of 8) of every tile into out (K, ldo), rows in
// quantization order. Bit-exact with Exl2Tensors.dequantize: w = fp16((q - 2^(bits-1)) * scale).
__global__ void __launch_bounds__(GEMV_THREADS)
exl2_dequant_kernel(const int4* __restrict__ qweight, const uint32_t* __restrict__ qscale,
                    const float* __restrict__ step, const int2* __restrict__ tiles, half* __restrict__ out,
                    int ldo, int K, int Np, int n0, int ncols) {
  const int local4 = blockIdx.x * GEMV_THREADS + threadIdx.x;
  if (local4 * 4 >= ncols) return;
  const int col4 = (n0 >> 2) + local4;
  const int t = blockIdx.y;
  const int2 info = __ldg(tiles + t);
  int4 w[8];
  load_tile(w, qweight, Np >> 2, info, col4);
  float scale[4];
  tile_scales(scale, qscale, step, Np >> 3, info.y >> 8, col4);
  const int rows = min(TILE_ROWS, K - t * TILE_ROWS);
  half* o = out + (size_t)t * TILE_ROWS * ldo + local4 * 4;
  switch (info.y & 0xff) {
    case 8: dequant_tile<8>(w, scale, o, ldo, rows); break;
    case 6: dequant_tile<6>(w, scale, o, ldo, rows); break;
    case 5: dequant_tile<5>(w, scale, o, ldo, rows); break;
    case 4: dequant_tile<4>(w, scale, o, ldo, rows); break;
    case 3: dequant_tile<3>(w, scale, o, ldo, rows); break;
    case 2: dequant_tile<2>(w, scale, o, ldo, rows); break;
    default: break;
  }
}

static int sm_count(int device) {
  static int cached[64] = {0};
  if (device < 0 || device >= 64) return 132;
  if (cached[device] == 0) {
    int n = 0;
    cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device);
    cached[device] = n > 0 ? n : 132;
  }
  return cached[device];
}

// Blocks per SM the gemv aims for when it splits K (tunable from Python for benchmarks).
static int g_blocks_per_sm = 4;

void set_gemv_blocks_per_sm(int64_t n) { g_blocks_per_sm = (int)std::max<int64_t>(1, std::min<int64_t>(n, 64)); }

static void check_layout(const torch::Tensor& qweight, const torch::Tensor& qscale, const torch::Tensor& step,
                         const torch::Tensor& tiles) {
  TORCH_CHECK(qweight.is_cuda() && qweight.scalar_type() == torch::kInt32 && qweight.dim() == 2 &&
                  qweight.is_contiguous() && qweight.size(1) % 8 == 0,
              "qweight must be a contiguous CUDA int32 (rows, Np) tensor with Np a multiple of 8");
  TORCH_CHECK(qscale.is_cuda() && qscale.scalar_type() == torch::kInt32 && qscale.is_contiguous() &&
                  qscale.size(1) * 8 == qweight.size(1),
              "qscale must be a contiguous CUDA int32 (G, Np/8) tensor");
  TORCH_CHECK(step.is_cuda() && step.scalar_type() == torch::kFloat32 && step.size(0) == qscale.size(0),
              "step must be a CUDA float32 (G,) tensor");
  TORCH_CHECK(tiles.is_cuda() && tiles.scalar_type() == torch::kInt32 && tiles.dim() == 2 && tiles.size(1) == 2 &&
                  tiles.is_contiguous(),
              "tiles must be a contiguous CUDA int32 (T, 2) tensor");
}

// The tensors of one matrix in a launch.
struct PartTensors {
  torch::Tensor perm, qweight, qscale, step, tiles, bias, out;
};

// Argument checks and the launch geometry shared by the exact gemv (1..3 matrices sharing x) and the
// batch-1 half2 gemv (one matrix).
static GemvArgs gemv_args(const torch::Tensor& x, const std::vector<PartTensors>& parts, const torch::Tensor& acc_ws,
                          const torch::Tensor& counters, size_t smem_per_row) {
  TORCH_CHECK(x.is_cuda() && x.scalar_type() == torch::kHalf && x.dim() == 2 && x.stride(1) == 1,
              "x must be a CUDA fp16 (M, K) tensor with unit column stride");
  TORCH_CHECK(!parts.empty() && (int)parts.size() <= MAX_PARTS, "exl2_gemv takes 1..3 matrices");
  const int M = (int)x.size(0);
  const int K = (int)x.size(1);
  TORCH_CHECK(M >= 1 && M <= MAX_ROWS, "exl2_gemv takes 1..8 rows of x");
  TORCH_CHECK(acc_ws.is_cuda() && acc_ws.scalar_type() == torch::kInt64, "acc_ws must be a zeroed CUDA int64 workspace");
  TORCH_CHECK(counters.is_cuda() && counters.scalar_type() == torch::kInt32, "counters must be a zeroed CUDA int32 workspace");
  GemvArgs a{};
  a.x = reinterpret_cast<const half*>(x.data_ptr<at::Half>());
  a.x_stride = (int)x.stride(0);
  a.counters = reinterpret_cast<unsigned*>(counters.data_ptr<int>());
  a.K = K;
  a.parts.count = (int)parts.size();
  int64_t ws_used = 0;
  int col_blocks = 0;
  for (size_t i = 0; i < parts.size(); ++i) {
    const PartTensors& t = parts[i];
    check_layout(t.qweight, t.qscale, t.step, t.tiles);
    const int Np = (int)t.qweight.size(1);
    const int N = (int)t.out.size(1);
    const int num_tiles = (int)t.tiles.size(0);
    TORCH_CHECK(num_tiles * TILE_ROWS >= K && (num_tiles - 1) * TILE_ROWS < K, "tiles do not cover K");
    TORCH_CHECK(i == 0 || num_tiles == a.num_tiles, "matrices of one launch must share K");
    TORCH_CHECK(t.out.scalar_type() == torch::kHalf && t.out.size(0) == M && t.out.stride(1) == 1 && N <= Np,
                "out must be fp16 (M, N) with unit column stride");
    const bool has_perm = t.perm.numel() > 0;
    const bool has_bias = t.bias.numel() > 0;
    if (has_perm) TORCH_CHECK(t.perm.scalar_type() == torch::kInt32 && t.perm.numel() == K, "perm must be int32 (K,)");
    if (has_bias) TORCH_CHECK(t.bias.scalar_type() == torch::kHalf && t.bias.numel() >= N, "bias must be fp16 (N,)");
    GemvPart& p = a.parts.p[i];
    p.perm = has_perm ? t.perm.data_ptr<int>() : nullptr;
    p.qweight = reinterpret_cast<const int4*>(t.qweight.data_ptr<int>());
    p.qscale = reinterpret_cast<const uint32_t*>(t.qscale.data_ptr<int>());
    p.step = t.step.data_ptr<float>();
    p.tiles = reinterpret_cast<const int2*>(t.tiles.data_ptr<int>());
    p.bias = has_bias ? reinterpret_cast<const half*>(t.bias.data_ptr<at::Half>()) : nullptr;
    p.acc_ws = reinterpret_cast<unsigned long long*>(acc_ws.data_ptr<int64_t>()) + ws_used;
    p.out = reinterpret_cast<half*>(t.out.data_ptr<at::Half>());
    p.out_stride = (int)t.out.stride(0);
    p.N = N;
    p.Np = Np;
    p.block0 = col_blocks;
    a.num_tiles = num_tiles;
    ws_used += (int64_t)MAX_ROWS * Np;
    col_blocks += (Np / 4 + GEMV_THREADS - 1) / GEMV_THREADS;
  }
  TORCH_CHECK(acc_ws.numel() >= ws_used, "acc_ws must hold 8 * Np words for each matrix of the launch");
  TORCH_CHECK(counters.numel() >= col_blocks, "counters must hold one entry per column strip of the launch");

  // Enough blocks to keep every SM busy (g_blocks_per_sm each), but x chunks no longer than 1024 rows.
  const int sms = sm_count(x.get_device());
  // One row of x does too little arithmetic per weight byte to hide latency at 4 blocks per SM: twice
  // as many K chunks measured 10-20 % faster on the H100 for Llama-8B MLP shapes (docs/MEASUREMENTS.md).
  // Every row count splits K alike, so each row sums in the same order whatever M is: speculative
  // drafts checked as M rows get the logits of the one-row decode step bit for bit.
  const int per_sm = 2 * g_blocks_per_sm;
  const int target_chunks = std::max(1, (per_sm * sms + col_blocks - 1) / col_blocks);
  int tiles_per_chunk = std::max(1, (a.num_tiles + target_chunks - 1) / target_chunks);
  tiles_per_chunk = std::max(tiles_per_chunk, (a.num_tiles + 2047) / 2048);  // the fixed-point sum's bound
  tiles_per_chunk = std::min(tiles_per_chunk, MAX_TILES_PER_CHUNK);
  a.tiles_per_chunk = tiles_per_chunk;
  a.grid = dim3(col_blocks, (a.num_tiles + tiles_per_chunk - 1) / tiles_per_chunk);
  a.smem = (size_t)M * tiles_per_chunk * TILE_ROWS * smem_per_row;
  a.stream = c10::cuda::getCurrentCUDAStream();
  return a;
}

static void launch_rows(const GemvArgs& args, int rows) {
  switch (rows) {
    case 1: launch_gemv<1>(args); break;
    case 2: launch_gemv<2>(args); break;
    case 3: launch_gemv<3>(args); break;
    case 4: launch_gemv<4>(args); break;
    case 5: launch_gemv<5>(args); break;
    case 6: launch_gemv<6>(args); break;
    case 7: launch_gemv<7>(args); break;
    case 8: launch_gemv<8>(args); break;
    default: break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void exl2_gemv(torch::Tensor x, torch::Tensor perm, torch::Tensor qweight, torch::Tensor qscale,
               torch::Tensor step, torch::Tensor tiles, torch::Tensor bias, torch::Tensor acc_ws,
               torch::Tensor counters, torch::Tensor out) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const GemvArgs args = gemv_args(x, {PartTensors{perm, qweight, qscale, step, tiles, bias, out}}, acc_ws, counters,
                                  sizeof(float));
  launch_rows(args, (int)x.size(0));
}

// q, k and v (or gate and up): one launch for matrices that share x; each list holds one entry per matrix.
void exl2_gemv_many(torch::Tensor x, std::vector<torch::Tensor> perms, std::vector<torch::Tensor> qweights,
                    std::vector<torch::Tensor> qscales, std::vector<torch::Tensor> steps,
                    std::vector<torch::Tensor> tiles, std::vector<torch::Tensor> biases, torch::Tensor acc_ws,
                    torch::Tensor counters, std::vector<torch::Tensor> outs) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor");
  const size_t n = qweights.size();
  TORCH_CHECK(perms.size() == n && qscales.size() == n && steps.size() == n && tiles.size() == n &&
                  biases.size() == n && outs.size() == n,
              "exl2_gemv_many: one entry per matrix in every list");
  const c10::cuda::CUDAGuard guard(x.device());
  std::vector<PartTensors> parts;
  for (size_t i = 0; i < n; ++i)
    parts.push_back(PartTensors{perms[i], qweights[i], qscales[i], steps[i], tiles[i], biases[i], outs[i]});
  const GemvArgs args = gemv_args(x, parts, acc_ws, counters, sizeof(float));
  launch_rows(args, (int)x.size(0));
}

// One row of x, half2 arithmetic (exl2_gemv_half2.cu): not bit-exact, about fp16-accumulation accurate.
void exl2_gemv_half2(torch::Tensor x, torch::Tensor perm, torch::Tensor qweight, torch::Tensor qscale,
                     torch::Tensor step, torch::Tensor tiles, torch::Tensor bias, torch::Tensor acc_ws,
                     torch::Tensor counters, torch::Tensor out) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1, "exl2_gemv_half2 takes exactly one row of x");
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const GemvArgs args = gemv_args(x, {PartTensors{perm, qweight, qscale, step, tiles, bias, out}}, acc_ws, counters,
                                  sizeof(half));
  launch_gemv_half2(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void exl2_dequant(torch::Tensor qweight, torch::Tensor qscale, torch::Tensor step, torch::Tensor tiles,
                  int64_t K, int64_t n0, torch::Tensor out) {
  check_layout(qweight, qscale, step, tiles);
  const int Np = (int)qweight.size(1);
  const int num_tiles = (int)tiles.size(0);
  TORCH_CHECK(out.scalar_type() == torch::kHalf && out.dim() == 2 && out.is_contiguous() && out.size(0) == K &&
                  out.size(1) % 4 == 0,
              "out must be a contiguous fp16 (K, ncols) tensor with ncols a multiple of 4");
  TORCH_CHECK(n0 % 8 == 0 && n0 + out.size(1) <= Np, "column range must start at a multiple of 8 inside Np");
  TORCH_CHECK(num_tiles * TILE_ROWS >= K && (num_tiles - 1) * TILE_ROWS < K, "tiles do not cover K");
  const int ncols = (int)out.size(1);
  const c10::cuda::CUDAGuard guard(qweight.device());
  const dim3 grid((ncols / 4 + GEMV_THREADS - 1) / GEMV_THREADS, num_tiles);
  exl2_dequant_kernel<<<grid, GEMV_THREADS, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const int4*>(qweight.data_ptr<int>()), reinterpret_cast<const uint32_t*>(qscale.data_ptr<int>()),
      step.data_ptr<float>(), reinterpret_cast<const int2*>(tiles.data_ptr<int>()),
      reinterpret_cast<half*>(out.data_ptr<at::Half>()), ncols, (int)K, Np, (int)n0, ncols);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace kestrel
