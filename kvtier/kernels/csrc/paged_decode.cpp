// Paged decode attention on the CPU: one query per sequence reads its keys and values where they lie in the paged
// cache, through its block table, without gathering them into a new tensor. One work item per (sequence, KV head):
// the query heads that share the KV head score each key as it is read (fp32, vectorised over the head dimension),
// then the softmax, then the weighted sum of the values: all of them, or only the Top-N most probable (KCache). Compiled
// on first use by kvtier/kernels/loader.py.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

using Vec = at::vec::Vectorized<float>;

// scores[g] = q_g . key for the ``group`` query heads sharing a KV head, the key read once for all of them
static inline void group_dots(const float* q, const float* key, int64_t group, int64_t D, float* scores) {
  constexpr int64_t kMaxGroup = 16;
  if (group > kMaxGroup) {
    for (int64_t g = 0; g < group; ++g) group_dots(q + g * D, key, 1, D, scores + g);
    return;
  }
  Vec acc[kMaxGroup];
  for (int64_t g = 0; g < group; ++g) acc[g] = Vec(0.f);
  int64_t d = 0;
  for (; d + Vec::size() <= D; d += Vec::size()) {
    const Vec k = Vec::loadu(key + d);
    for (int64_t g = 0; g < group; ++g) acc[g] = at::vec::fmadd(Vec::loadu(q + g * D + d), k, acc[g]);
  }
  for (int64_t g = 0; g < group; ++g) {
    float s = acc[g].reduce_add();
    for (int64_t e = d; e < D; ++e) s += q[g * D + e] * key[e];
    scores[g] = s;
  }
}

// rows fetched a block ahead of use (the best of 2, 4, 8, 16 and 32 on a 2-core Xeon): a block's rows are contiguous, but
// the next block can be anywhere in the pool
constexpr int64_t kPrefetch = 16;

static inline void prefetch_row(const float* row, int64_t D) {
  for (int64_t d = 0; d < D; d += 64 / sizeof(float)) __builtin_prefetch(row + d, 0, 3);
}

// p = softmax(s) in place over n scores
static inline void softmax(float* s, int64_t n) {
  const float m = *std::max_element(s, s + n);
  const Vec mv(m);
  Vec total(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec e = (Vec::loadu(s + i) - mv).exp_u20();
    e.store(s + i);
    total = total + e;
  }
  float sum = total.reduce_add();
  for (; i < n; ++i) sum += (s[i] = std::exp(s[i] - m));
  const Vec inv(1.f / sum);
  for (i = 0; i + Vec::size() <= n; i += Vec::size()) (Vec::loadu(s + i) * inv).store(s + i);
  for (; i < n; ++i) s[i] *= 1.f / sum;
}

static inline void axpy(float p, const float* x, float* y, int64_t n) {  // y += p * x
  const Vec pv(p);
  int64_t d = 0;
  for (; d + Vec::size() <= n; d += Vec::size()) at::vec::fmadd(pv, Vec::loadu(x + d), Vec::loadu(y + d)).store(y + d);
  for (; d < n; ++d) y[d] += p * x[d];
}

// The ``count`` keys of highest ``score`` among n, ascending (ascending positions read V in order). One pass with a
// min-heap of the best so far: most keys lose to the heap's smallest at one comparison.
static void top_keys(const float* score, int64_t n, int64_t count, std::vector<int64_t>& keys, std::vector<std::pair<float, int64_t>>& heap) {
  const auto worse = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) { return a.first > b.first; };
  heap.clear();
  for (int64_t i = 0; i < n; ++i) {
    if (static_cast<int64_t>(heap.size()) < count) {
      heap.emplace_back(score[i], i);
      std::push_heap(heap.begin(), heap.end(), worse);
    } else if (score[i] > heap.front().first) {
      std::pop_heap(heap.begin(), heap.end(), worse);
      heap.back() = {score[i], i};
      std::push_heap(heap.begin(), heap.end(), worse);
    }
  }
  keys.resize(count);
  for (int64_t j = 0; j < count; ++j) keys[j] = heap[j].second;
  std::sort(keys.begin(), keys.end());
}

// out[g] += sum over ``keys`` of p[g][i] v_i (divided by the sum of those p where ``renormalize``), for the ``heads``
// query heads whose probabilities are rows of ``probs`` (n apart); the V rows read once for all of them
template <typename Row>
static void weighted_sum(const float* probs, int64_t n, int64_t heads, const std::vector<int64_t>& keys, bool renormalize, Row row,
                         float* out, int64_t D) {
  float inv[16];
  for (int64_t g = 0; g < heads; ++g) {
    float total = 0.f;
    if (renormalize)
      for (int64_t i : keys) total += probs[g * n + i];
    inv[g] = renormalize && total > 0.f ? 1.f / total : 1.f;
  }
  const int64_t m = static_cast<int64_t>(keys.size());
  for (int64_t j = 0; j < m; ++j) {
    if (j + kPrefetch < m) prefetch_row(row(keys[j + kPrefetch]), D);
    const float* value = row(keys[j]);
    for (int64_t g = 0; g < heads; ++g) axpy(probs[g * n + keys[j]] * inv[g], value, out + g * D, D);
  }
}

static inline float sum_of(const float* x, int64_t n) {
  Vec acc(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) acc = acc + Vec::loadu(x + i);
  float s = acc.reduce_add();
  for (; i < n; ++i) s += x[i];
  return s;
}

// out[g] += the mass of the keys not in ``keys``, block by block, times the block's mean value: its sum (``sum_row(j)``
// for the row's j-th table block) over its tokens; for the ``heads`` query heads of ``probs``. A block's mass is its
// probabilities' sum less those read (a block read whole is left with rounding at most, skipped unless positive).
template <typename SumRow>
static void add_residual(const float* probs, int64_t n, int64_t heads, const std::vector<int64_t>& keys, int64_t block_size, SumRow sum_row,
                         float* out, int64_t D, std::vector<float>& mass) {
  const int64_t blocks = (n + block_size - 1) / block_size;
  mass.resize(blocks);
  for (int64_t g = 0; g < heads; ++g) {
    const float* p = probs + g * n;
    for (int64_t j = 0; j < blocks; ++j) mass[j] = sum_of(p + j * block_size, std::min(block_size, n - j * block_size));
    for (int64_t i : keys) mass[i / block_size] -= p[i];
    for (int64_t j = 0; j < blocks; ++j)
      if (mass[j] > 0.f) axpy(mass[j] / static_cast<float>(std::min(block_size, n - j * block_size)), sum_row(j), out + g * D, D);
  }
}

// q [B, H, D]; k_cache, v_cache [Hkv, slots, D]; block_tables [B, W] (int64, padded); context_lens [B]: keys each row
// sees counted from position 0; key_starts [B]: the position of each table's first key (0 unless a sliding window cut
// the table's front); window: the sliding window, or 0 for none. Returns [B, H, D].
// top_n [B] (int64; empty for all keys): KCache's read, every key scored and only the top_n[b] most probable V rows read,
// per query head, or per KV head by the group's highest probability (``per_kv_head``), their probabilities renormalised
// over the rows read or not. value_sums [Hkv, blocks, D] (empty for none): the mass of the rows not read goes to each
// block's mean value (KCache's residual).
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor block_tables,
                           torch::Tensor context_lens, torch::Tensor key_starts, int64_t block_size, int64_t window, double scale,
                           torch::Tensor top_n, bool per_kv_head, bool renormalize, torch::Tensor value_sums) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat,
              "paged_decode: fp32 only");
  q = q.contiguous();
  block_tables = block_tables.contiguous();
  context_lens = context_lens.contiguous();
  key_starts = key_starts.contiguous();
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "paged_decode: the cache must be contiguous");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k_cache.size(0), slots = k_cache.size(1);
  const int64_t W = block_tables.size(1), group = H / Hkv;
  const bool selects = top_n.numel() > 0;
  TORCH_CHECK(!selects || (top_n.scalar_type() == at::kLong && top_n.numel() == B && window == 0 && group <= 16),
              "paged_decode: top_n must be int64 [batch], without a sliding window, at most 16 query heads per KV head");
  top_n = top_n.contiguous();
  const int64_t* topn = selects ? top_n.data_ptr<int64_t>() : nullptr;
  const bool residual = value_sums.numel() > 0;
  TORCH_CHECK(!residual || (selects && !renormalize && value_sums.scalar_type() == at::kFloat && value_sums.is_contiguous()
                            && value_sums.size(0) == Hkv && value_sums.size(2) == D && value_sums.size(1) * block_size == slots),
              "paged_decode: value_sums must be fp32 [Hkv, blocks, D] beside a Top-N read, not renormalised");
  const float* sp = residual ? value_sums.data_ptr<float>() : nullptr;
  auto out = torch::zeros_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* ctx = context_lens.data_ptr<int64_t>();
  const int64_t* first = key_starts.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  // the visible keys of each row: [lo, lo + count) in positions, its table read from index lo - start
  std::vector<int64_t> lo(B), count(B), cost(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    lo[b] = window > 0 ? std::max(first[b], ctx[b] - window) : first[b];
    count[b] = std::max<int64_t>(0, std::min(ctx[b], first[b] + W * block_size) - lo[b]);
    cost[b + 1] = cost[b] + count[b] + 1;
  }
  // rows come sorted by length, so equal item counts would leave one thread the long rows: split by keys read instead
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B * Hkv));
  at::parallel_for(0, parts, 1, [&](int64_t part_begin, int64_t part_end) {
    std::vector<float> scores, dots, qs(group * D), best, mass;
    std::vector<int64_t> keys;
    std::vector<std::pair<float, int64_t>> heap;
    for (int64_t part = part_begin; part < part_end; ++part) {
      const int64_t total = cost[B] * Hkv;
      for (int64_t item = 0; item < B * Hkv; ++item) {
        const int64_t b = item / Hkv, h = item % Hkv;
        const int64_t mid = cost[b] * Hkv + (cost[b + 1] - cost[b]) * h + (cost[b + 1] - cost[b]) / 2;  // the item's middle
        if (mid * parts / total != part) continue;
        const int64_t n = count[b];
        if (n == 0) continue;
        scores.resize(group * n);
        dots.resize(group * n);
        const float* head_k = kp + h * slots * D;
        const float* head_v = vp + h * slots * D;
        const float* qh = qp + (b * H + h * group) * D;
        const int64_t* table = tables + b * W;
        const int64_t skip = lo[b] - first[b];  // table index of the first visible key
        auto row = [&](const float* cache, int64_t i) { const int64_t t = skip + i; return cache + (table[t / block_size] * block_size + t % block_size) * D; };
        for (int64_t e = 0; e < group * D; ++e) qs[e] = qh[e] * fscale;  // the scale folded into the queries
        for (int64_t i = 0; i < n; ++i) {  // scores laid out [key][head] while reading K, then transposed
          if (i + kPrefetch < n) prefetch_row(row(head_k, i + kPrefetch), D);
          group_dots(qs.data(), row(head_k, i), group, D, dots.data() + i * group);
        }
        for (int64_t g = 0; g < group; ++g) {
          float* sg = scores.data() + g * n;
          for (int64_t i = 0; i < n; ++i) sg[i] = dots[i * group + g];
          softmax(sg, n);
        }
        float* oh = op + (b * H + h * group) * D;
        auto value_row = [&](int64_t i) { return row(head_v, i); };
        auto sum_row = [&](int64_t j) { return sp + (h * (slots / block_size) + table[j]) * D; };  // no window: the table starts at key 0
        const int64_t kept = selects ? std::max<int64_t>(1, std::min(n, topn[b])) : n;
        if (kept == n) {
          for (int64_t i = 0; i < n; ++i) {
            if (i + kPrefetch < n) prefetch_row(value_row(i + kPrefetch), D);
            const float* value = value_row(i);
            for (int64_t g = 0; g < group; ++g) axpy(scores[g * n + i], value, oh + g * D, D);
          }
        } else if (per_kv_head) {  // one set of rows for the group, by its highest probability per key
          best.assign(scores.begin(), scores.begin() + n);
          for (int64_t g = 1; g < group; ++g)
            for (int64_t i = 0; i < n; ++i) best[i] = std::max(best[i], scores[g * n + i]);
          top_keys(best.data(), n, kept, keys, heap);
          weighted_sum(scores.data(), n, group, keys, renormalize, value_row, oh, D);
          if (residual) add_residual(scores.data(), n, group, keys, block_size, sum_row, oh, D, mass);
        } else {
          for (int64_t g = 0; g < group; ++g) {
            top_keys(scores.data() + g * n, n, kept, keys, heap);
            weighted_sum(scores.data() + g * n, n, 1, keys, renormalize, value_row, oh + g * D, D);
            if (residual) add_residual(scores.data() + g * n, n, 1, keys, block_size, sum_row, oh + g * D, D, mass);
          }
        }
      }
    }
  });
  return out;
}
