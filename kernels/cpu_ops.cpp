// leapserve's two opaque ops of a compiled CPU model, in C++ so that a step runs no Python between its kernels.
//
// leapserve_cpu::packed_linear   y = x @ W.T + b through W's oneDNN-packed copy (kernels/packed_linear.py)
// leapserve_cpu::paged_attention one layer's K/V write and attention, executing the step's plan
//                                (kernels/reference.py plans it once per step; this file runs what `attend` runs)
//
// Both find what is not a graph tensor in state set from Python: the packed copies by their plain weight's address,
// and the step (caches, slots, plan) on a stack pushed around each forward (cpu_ops.py).

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <optional>
#include <unordered_map>
#include <vector>

namespace {

std::unordered_map<int64_t, at::Tensor> packed;  // plain weight's data_ptr -> its oneDNN-packed copy

struct SeqPlan {  // one sequence's queries q[start:end] over its keys (reference.SeqPlan)
  int64_t start, end;
  int64_t key_start, key_len;       // flat cache slots key_start.. when `keys` is empty (consecutive blocks)
  std::optional<at::Tensor> keys;   // [L] int64 flat slots otherwise
  std::optional<at::Tensor> mask;   // bool [n, L]
  bool causal;
};

struct Step {
  std::vector<at::Tensor> k, v;  // per layer [num_blocks, block_size, Hkv, D]
  at::Tensor slot_mapping;       // [T] int64
  bool batched = false;          // reference.BatchedPlan: one padded SDPA call
  at::Tensor slots, mask, rows;  // [B * max_keys], bool [B, 1, max_q, max_keys], [T]
  int64_t max_q = 1;
  std::vector<SeqPlan> seqs;
};

std::vector<Step> steps;  // the steps being run, innermost last (a drafter's forward inside a target's)

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  auto it = packed.find(reinterpret_cast<int64_t>(weight.data_ptr()));
  TORCH_CHECK(it != packed.end(), "leapserve_cpu::packed_linear: this weight has no packed copy");
  torch::jit::Stack stack{x,
                          it->second,
                          bias,
                          std::string("none"),
                          c10::List<std::optional<at::Scalar>>(),
                          std::optional<std::string>(std::string())};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// Flat slots [start, start + len) of a contiguous [num_blocks, block_size, H, D] cache as a [1, H, len, D] view.
at::Tensor heads_view(const at::Tensor& cache, int64_t start, int64_t len) {
  int64_t heads = cache.size(2), dim = cache.size(3);
  return cache.as_strided({1, heads, len, dim}, {0, dim, heads * dim, 1}, cache.storage_offset() + start * heads * dim);
}

at::Tensor compute(const at::Tensor& x) { return x.scalar_type() == at::kFloat ? x : x.to(at::kFloat); }

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t layer,
                           double scale) {
  TORCH_CHECK(!steps.empty(), "leapserve attention ran outside a forward_context (run the model through the engine)");
  const Step& s = steps.back();
  TORCH_CHECK(layer >= 0 && layer < static_cast<int64_t>(s.k.size()), "leapserve_cpu::paged_attention: no layer ",
              layer, " in this step's cache");
  const at::Tensor& k_cache = s.k[layer];
  const at::Tensor& v_cache = s.v[layer];
  const int64_t kv_heads = k_cache.size(2), dim = k_cache.size(3), q_heads = q.size(1);
  auto flat_k = k_cache.view({-1, kv_heads, dim});  // the caches are contiguous (checked when pushed)
  auto flat_v = v_cache.view({-1, kv_heads, dim});
  flat_k.index_copy_(0, s.slot_mapping, k);
  flat_v.index_copy_(0, s.slot_mapping, v);

  if (s.batched) {  // [B, H, max_q, max_keys], padded queries and keys masked
    const int64_t num_seqs = s.mask.size(0);
    at::Tensor queries =
        s.max_q == 1 ? q.unsqueeze(1) : q.new_zeros({num_seqs * s.max_q, q_heads, dim}).index_copy_(0, s.rows, q);
    queries = queries.view({num_seqs, s.max_q, q_heads, dim}).transpose(1, 2);
    auto keys = flat_k.index_select(0, s.slots).view({num_seqs, -1, kv_heads, dim}).transpose(1, 2);
    auto values = flat_v.index_select(0, s.slots).view({num_seqs, -1, kv_heads, dim}).transpose(1, 2);
    auto o = at::scaled_dot_product_attention(compute(queries), compute(keys), compute(values), s.mask, 0.0, false,
                                              scale, true);
    o = o.transpose(1, 2).reshape({num_seqs * s.max_q, q_heads, dim});
    return (s.max_q == 1 ? o : o.index_select(0, s.rows)).to(q.scalar_type());
  }
  at::Tensor out;
  if (s.seqs.size() != 1) out = at::empty_like(q);
  for (const SeqPlan& p : s.seqs) {
    at::Tensor keys, values;
    if (p.keys.has_value()) {
      keys = flat_k.index_select(0, *p.keys).unsqueeze(0).transpose(1, 2);
      values = flat_v.index_select(0, *p.keys).unsqueeze(0).transpose(1, 2);
    } else {
      keys = heads_view(k_cache, p.key_start, p.key_len);
      values = heads_view(v_cache, p.key_start, p.key_len);
    }
    auto queries = q.slice(0, p.start, p.end).transpose(0, 1).unsqueeze(0);
    auto o = at::scaled_dot_product_attention(compute(queries), compute(keys), compute(values), p.mask, 0.0,
                                              p.causal, scale, true)[0]
                 .transpose(0, 1);
    if (s.seqs.size() == 1) return o.to(q.scalar_type());
    out.slice(0, p.start, p.end).copy_(o);
  }
  return out;
}

void register_packed(int64_t key, const at::Tensor& packed_weight) { packed[key] = packed_weight; }

void release_packed(int64_t key) { packed.erase(key); }

void push_step(std::vector<at::Tensor> k, std::vector<at::Tensor> v, const at::Tensor& slot_mapping,
               const std::optional<at::Tensor>& slots, const std::optional<at::Tensor>& mask,
               const std::optional<at::Tensor>& rows, int64_t max_q, const std::vector<int64_t>& starts,
               const std::vector<int64_t>& ends, const std::vector<int64_t>& key_starts,
               const std::vector<int64_t>& key_lens, const std::vector<std::optional<at::Tensor>>& keys,
               const std::vector<std::optional<at::Tensor>>& masks, const std::vector<bool>& causal) {
  for (size_t i = 0; i < k.size(); ++i)
    TORCH_CHECK(k[i].is_contiguous() && v[i].is_contiguous(), "leapserve_cpu: the KV cache must be contiguous");
  Step s;
  s.k = std::move(k);
  s.v = std::move(v);
  s.slot_mapping = slot_mapping;
  if (slots.has_value()) {
    s.batched = true;
    s.slots = *slots;
    s.mask = *mask;
    s.rows = *rows;
    s.max_q = max_q;
  }
  for (size_t i = 0; i < starts.size(); ++i)
    s.seqs.push_back({starts[i], ends[i], key_starts[i], key_lens[i], keys[i], masks[i], causal[i]});
  steps.push_back(std::move(s));
}

void pop_step() {
  TORCH_CHECK(!steps.empty(), "leapserve_cpu: no step to pop");
  steps.pop_back();
}

}  // namespace

TORCH_LIBRARY(leapserve_cpu, m) {
  m.def("packed_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("paged_attention(Tensor q, Tensor k, Tensor v, int layer, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(leapserve_cpu, CPU, m) {
  m.impl("packed_linear", packed_linear);
  m.impl("paged_attention", paged_attention);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("register_packed", &register_packed);
  m.def("release_packed", &release_packed);
  m.def("push_step", &push_step);
  m.def("pop_step", &pop_step);
}
