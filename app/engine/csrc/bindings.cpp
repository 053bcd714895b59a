// Python bindings of the Kestrel CUDA extension (module name set by the build: kestrel_cuda).

#include <torch/extension.h>

namespace kestrel {
void exl2_gemv(torch::Tensor x, torch::Tensor perm, torch::Tensor qweight, torch::Tensor qscale,
               torch::Tensor step, torch::Tensor tiles, torch::Tensor bias, torch::Tensor acc_ws,
               torch::Tensor counters, torch::Tensor out);
void exl2_gemv_many(torch::Tensor x, std::vector<torch::Tensor> perms, std::vector<torch::Tensor> qweights,
                    std::vector<torch::Tensor> qscales, std::vector<torch::Tensor> steps,
                    std::vector<torch::Tensor> tiles, std::vector<torch::Tensor> biases, torch::Tensor acc_ws,
                    torch::Tensor counters, std::vector<torch::Tensor> outs);
void exl2_gemv_half2(torch::Tensor x, torch::Tensor perm, torch::Tensor qweight, torch::Tensor qscale,
                     torch::Tensor step, torch::Tensor tiles, torch::Tensor bias, torch::Tensor acc_ws,
                     torch::Tensor counters, torch::Tensor out);
void exl2_dequant(torch::Tensor qweight, torch::Tensor qscale, torch::Tensor step, torch::Tensor tiles,
                  int64_t K, int64_t n0, torch::Tensor out);
void set_gemv_blocks_per_sm(int64_t n);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps);
torch::Tensor silu_mul(torch::Tensor gate, torch::Tensor up);
torch::Tensor rope(torch::Tensor x, torch::Tensor cos_t, torch::Tensor sin_t);
torch::Tensor attention_decode(torch::Tensor q, torch::Tensor k, torch::Tensor v, int64_t num_splits);
torch::Tensor attention_decode_cached(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                      torch::Tensor lengths, int64_t num_splits, int64_t window);
torch::Tensor rope_cache_decode(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor cos_t,
                                torch::Tensor sin_t, torch::Tensor pos, torch::Tensor k_cache, torch::Tensor v_cache);
void kv_quant_decode(torch::Tensor kq, torch::Tensor ks, torch::Tensor vq, torch::Tensor vs,
                     torch::Tensor key_mean, torch::Tensor cos_t, torch::Tensor sin_t, torch::Tensor sink_k,
                     torch::Tensor sink_v, torch::Tensor ring_k, torch::Tensor ring_v, torch::Tensor pos,
                     torch::Tensor ring_lo, torch::Tensor kb, torch::Tensor vb, int64_t bits, bool rotate,
                     int64_t blocks);
}  // namespace kestrel

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Kestrel CUDA kernels: EXL2 gemv/dequant, RMSNorm, SiLU*mul, RoPE, decode attention";
  m.def("exl2_gemv", &kestrel::exl2_gemv, "EXL2 matrix-vector product for 1..8 rows (writes out)");
  m.def("exl2_gemv_many", &kestrel::exl2_gemv_many,
        "EXL2 gemv of 2..3 matrices sharing x (q/k/v, gate/up) in one launch; lists hold one entry per matrix");
  m.def("exl2_gemv_half2", &kestrel::exl2_gemv_half2,
        "EXL2 matrix-vector product for one row in half2 arithmetic (fast decode path, not bit-exact)");
  m.def("exl2_dequant", &kestrel::exl2_dequant, "EXL2 columns [n0, n0+out.shape[1]) to fp16 (K, ncols), quant order");
  m.def("set_gemv_blocks_per_sm", &kestrel::set_gemv_blocks_per_sm, "gemv K-split target (blocks per SM)");
  m.def("rms_norm", &kestrel::rms_norm, "RMSNorm; with a non-empty residual, x += residual in place first");
  m.def("silu_mul", &kestrel::silu_mul, "silu(gate) * up");
  m.def("rope", &kestrel::rope, "rotate-half RoPE from (T, D) cos/sin tables");
  m.def("attention_decode", &kestrel::attention_decode, "one-token attention over the KV cache (GQA)");
  m.def("attention_decode_cached", &kestrel::attention_decode_cached,
        "one-token attention over the first lengths[b] keys of a static cache (CUDA-graph safe)");
  m.def("rope_cache_decode", &kestrel::rope_cache_decode,
        "RoPE of one token's q/k at device-side positions, and the k/v cache write");
  m.def("kv_quant_decode", &kestrel::kv_quant_decode,
        "quantized KV cache in the decode step: read-back of [0, pos) and the quantized write at pos");
}
