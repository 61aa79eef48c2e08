// The Python module of kvtier's CPU kernels: one extension built from every source in this folder.
#include <torch/extension.h>

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor block_tables, torch::Tensor context_lens,
                           torch::Tensor key_starts, int64_t block_size, int64_t window, double scale, torch::Tensor top_n, bool per_kv_head,
                           bool renormalize, torch::Tensor value_sums);
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps);
torch::Tensor silu_and_mul(const torch::Tensor& x);
void rotary_(torch::Tensor q, torch::Tensor k, const torch::Tensor& positions, const torch::Tensor& cos, const torch::Tensor& sin);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "paged decode attention, all values or the Top-N (CPU, fp32)");
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dimension (CPU, fp32)");
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up over [tokens, 2 * intermediate] (CPU, fp32)");
  m.def("rotary_", &rotary_, "rotate-half rotary embedding of q and k in place (CPU, fp32)");
}
