// The model's elementwise work between the matmuls, one pass over memory each (fp32, CPU): RMSNorm, SiLU-and-mul and
// rotary embeddings in place. In eager torch each is five to eight operators, every one a pass over the activations and
// a dispatch (about 5 us each, which at a few sequences a step is a fair share of the step). Compiled on first use by
// kvtier/kernels/loader.py beside the decode kernel.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>

using Vec = at::vec::Vectorized<float>;

// rows per task: split across threads only when there is enough work to pay for waking them
static inline int64_t grain(int64_t row_elems) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(row_elems, 1)); }

static void check_fp32(const torch::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, op, ": ", name, " must be a float32 CPU tensor");
  TORCH_CHECK(t.size(-1) == 1 || t.stride(-1) == 1, op, ": ", name, " must be contiguous in its last dimension");
}

// x [..., H] -> x * rsqrt(mean(x^2) + eps) * weight, as HF's fp32 RMSNorm; any leading shape, rows may be strided
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  check_fp32(x, "rms_norm", "x");
  check_fp32(weight, "rms_norm", "weight");
  const int64_t H = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == H, "rms_norm: weight must be [", H, "]");
  const torch::Tensor rows = x.reshape({-1, H});
  torch::Tensor out = torch::empty({rows.size(0), H}, x.options());
  const float* xp = rows.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t xs = rows.stride(0);
  at::parallel_for(0, rows.size(0), grain(H), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * xs;
      float* o = op + r * H;
      Vec acc(0.f);
      int64_t d = 0;
      for (; d + Vec::size() <= H; d += Vec::size()) {
        const Vec v = Vec::loadu(xr + d);
        acc = at::vec::fmadd(v, v, acc);
      }
      float ss = acc.reduce_add();
      for (int64_t e = d; e < H; ++e) ss += xr[e] * xr[e];
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(H) + static_cast<float>(eps));
      const Vec iv(inv);
      for (d = 0; d + Vec::size() <= H; d += Vec::size()) (Vec::loadu(xr + d) * iv * Vec::loadu(w + d)).store(o + d);
      for (; d < H; ++d) o[d] = xr[d] * inv * w[d];
    }
  });
  auto shape = x.sizes().vec();
  return out.view(shape);
}

// x [T, 2I] (gate then up, as the fused gate_up projection lays them out) -> silu(gate) * up [T, I]
torch::Tensor silu_and_mul(const torch::Tensor& x) {
  check_fp32(x, "silu_and_mul", "x");
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 2 == 0, "silu_and_mul: x must be [tokens, 2 * intermediate]");
  const int64_t T = x.size(0), I = x.size(1) / 2, xs = x.stride(0);
  torch::Tensor out = torch::empty({T, I}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, grain(2 * I), [&](int64_t begin, int64_t end) {
    const Vec one(1.f);
    for (int64_t t = begin; t < end; ++t) {
      const float* g = xp + t * xs;
      const float* u = g + I;
      float* o = op + t * I;
      int64_t d = 0;
      for (; d + Vec::size() <= I; d += Vec::size()) {
        const Vec gv = Vec::loadu(g + d);
        (gv / (one + gv.neg().exp()) * Vec::loadu(u + d)).store(o + d);
      }
      for (; d < I; ++d) o[d] = g[d] / (1.f + std::exp(-g[d])) * u[d];
    }
  });
  return out;
}

// rotate-half rotary embedding of one [heads, D] slab of a token in place: the first ``half`` dims pair with the next
// ``half`` (HF Llama's layout); dims past 2 * half stay as they are (partial rotary)
static inline void rotate_heads(float* x, int64_t heads, int64_t head_stride, int64_t half, const float* cos, const float* sin) {
  for (int64_t h = 0; h < heads; ++h) {
    float* a = x + h * head_stride;
    float* b = a + half;
    int64_t d = 0;
    for (; d + Vec::size() <= half; d += Vec::size()) {
      const Vec x1 = Vec::loadu(a + d), x2 = Vec::loadu(b + d);
      (x1 * Vec::loadu(cos + d) - x2 * Vec::loadu(sin + d)).store(a + d);
      (x2 * Vec::loadu(cos + half + d) + x1 * Vec::loadu(sin + half + d)).store(b + d);
    }
    for (; d < half; ++d) {
      const float x1 = a[d], x2 = b[d];
      a[d] = x1 * cos[d] - x2 * sin[d];
      b[d] = x2 * cos[half + d] + x1 * sin[half + d];
    }
  }
}

// q [T, H, D] and k [T, Hk, D] (views into the fused qkv projection's output are fine) rotated in place by the rows
// ``positions`` [T] of the tables cos/sin [P, R] (R = the rotary dims, the frequencies repeated twice)
void rotary_(torch::Tensor q, torch::Tensor k, const torch::Tensor& positions, const torch::Tensor& cos, const torch::Tensor& sin) {
  check_fp32(q, "rotary_", "q");
  check_fp32(k, "rotary_", "k");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.scalar_type() == at::kFloat && sin.sizes() == cos.sizes(),
              "rotary_: cos and sin must be contiguous float32 tables of one shape");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 1 && positions.size(0) == q.size(0) && k.size(0) == q.size(0),
              "rotary_: positions must be int64 [tokens]");
  const int64_t T = q.size(0), R = cos.size(1), half = R / 2, P = cos.size(0);
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && R % 2 == 0 && R <= q.size(2) && R <= k.size(2), "rotary_: bad shapes");
  const torch::Tensor pos = positions.contiguous();
  const int64_t* pp = pos.data_ptr<int64_t>();
  float* qp = q.data_ptr<float>();
  float* kp = k.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const int64_t qh = q.size(1), kh = k.size(1);
  at::parallel_for(0, T, grain((qh + kh) * R), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p = pp[t];
      TORCH_CHECK(p >= 0 && p < P, "rotary_: position ", p, " is outside the table of ", P);
      rotate_heads(qp + t * q.stride(0), qh, q.stride(1), half, cp + p * R, sp + p * R);
      rotate_heads(kp + t * k.stride(0), kh, k.stride(1), half, cp + p * R, sp + p * R);
    }
  });
}
