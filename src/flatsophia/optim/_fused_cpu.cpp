// Fused CPU steps of SophiaG, SophiaH and FlatSophia: every parameter of every group updated in
// one parallel region, one pass over memory per element (read p, g, m, h [, mask]; write p, m).
//
// The arithmetic is that of the compiled kernels in _kernels.py (_sophia_g_multi, _sophia_h_multi),
// evaluated in the parameters' dtype (float32 or float64), with the bias correction in float64 as
// there. Loaded by _fused.py with torch.utils.cpp_extension. Each entry point first checks every
// tensor (dtype, device, a dense layout shared by a parameter and its gradient and state) and
// returns the reason, changing nothing, if one does not fit; the kernels then index raw storage.
// Mutated tensors get their autograd version bumped, as an in-place torch op would.
#include <torch/extension.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace {

// Elements per work item: large enough to amortise the item, small enough to balance threads.
constexpr int64_t kChunk = 1 << 15;

// Software prefetch. The kernels walk their range in blocks of kBlock elements and, before each
// block, ask for the cache lines kAheadBytes further on in each stream: with four or five concurrent
// streams the hardware prefetchers alone leave the cores waiting on memory. On the benchmark's ViT
// (2-core AMD EPYC VM, 2 threads, same-process A/B, kernel alone / fused AdamW's whole step) this
// took FlatSophia's kernel from 0.725x to 0.643x, Sophia-H's from 0.619x to 0.586x and Sophia-G's
// from 0.622x to 0.581x (docs/performance.md, section 17).
constexpr int64_t kLine = 64;
constexpr int64_t kBlock = 64;  // one cache line of the int8 mask
constexpr int64_t kAheadBytes = 2048;

// Prefetch the lines of x[b, e) (kWrite: for writing). Forced inline, as is prefetch_ahead, and called
// from the kernels' loops without a lambda: GCC 12 at -O1 and above deleted every prefetch that
// reached the loop through a lambda or a helper it did not inline (checked with objdump).
template <int kWrite, typename T>
C10_ALWAYS_INLINE void prefetch(const T* x, int64_t b, int64_t e) {
#if defined(__GNUC__) || defined(__clang__)
  const char* q = reinterpret_cast<const char*>(x + b);
  const char* end = reinterpret_cast<const char*>(x + e);
  for (; q < end; q += kLine) __builtin_prefetch(q, kWrite, 3);
#endif
}

// Before the block [i, j) of a tensor of n elements: prefetch its four float streams (parameter and
// momentum for writing) and, with kMask, the int8 mask, kAheadBytes further on, up to n (a work
// item's successor is usually the same thread's next item). Nothing near the end of the tensor.
template <typename T, bool kMask>
C10_ALWAYS_INLINE void prefetch_ahead(const T* p, const T* g, const T* m, const T* h, const int8_t* mask,
                                      int64_t i, int64_t j, int64_t n) {
  constexpr int64_t kAhead = kAheadBytes / static_cast<int64_t>(sizeof(T));
  const int64_t pb = i + kAhead, pe = std::min(n, j + kAhead);
  if (pb >= pe) return;
  prefetch<1>(p, pb, pe);
  prefetch<0>(g, pb, pe);
  prefetch<1>(m, pb, pe);
  prefetch<0>(h, pb, pe);
  if constexpr (kMask) prefetch<0>(mask, pb, pe);
}

struct Item {
  int64_t tensor, begin, end;
};

// "" if the tensors fit the kernels, else why not (the caller falls back to another path).
std::string check(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                  const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& hessians,
                  const std::vector<at::Tensor>* masks, const std::vector<at::Tensor>& steps,
                  const std::vector<int64_t>& group_of, size_t n_groups) {
  const size_t n = params.size();
  if (n == 0) return "no parameters";
  if (grads.size() != n || exp_avgs.size() != n || hessians.size() != n || steps.size() != n ||
      group_of.size() != n || (masks && masks->size() != n))
    return "lists of different lengths";
  const auto dtype = params[0].scalar_type();
  if (dtype != at::kFloat && dtype != at::kDouble) return "parameters that are neither float32 nor float64";
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    if (group_of[i] < 0 || static_cast<size_t>(group_of[i]) >= n_groups) return "a bad group index";
    if (!p.device().is_cpu()) return "a parameter that is not on the CPU";
    if (p.scalar_type() != dtype) return "parameters of different dtypes";
    if (!p.is_non_overlapping_and_dense()) return "a parameter that is not dense";
    for (const at::Tensor* t : {&grads[i], &exp_avgs[i], &hessians[i]}) {
      if (!t->device().is_cpu() || t->scalar_type() != dtype || t->sizes() != p.sizes() ||
          t->strides() != p.strides())
        return "a gradient or state tensor whose dtype, device or layout differs from its parameter's";
    }
    if (masks) {
      const at::Tensor& k = (*masks)[i];
      if (!k.device().is_cpu() || k.scalar_type() != at::kChar || k.sizes() != p.sizes() ||
          k.strides() != p.strides())
        return "a mask that is not int8 with its parameter's layout on the CPU";
    }
    const at::Tensor& s = steps[i];
    if (!s.device().is_cpu() || s.scalar_type() != at::kFloat || s.numel() != 1)
      return "a step counter that is not a float32 CPU scalar";
  }
  return "";
}

// What an in-place torch op would do to the tensors the step wrote: bump their autograd versions.
void bump_mutated(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& exp_avgs,
                  const std::vector<at::Tensor>& steps) {
  for (const auto* ts : {&params, &exp_avgs, &steps})
    for (const auto& t : *ts) torch::autograd::impl::bump_version(t);
}

std::vector<Item> plan(const std::vector<at::Tensor>& params) {
  std::vector<Item> items;
  for (int64_t t = 0; t < static_cast<int64_t>(params.size()); ++t) {
    const int64_t n = params[t].numel();
    for (int64_t b = 0; b < n; b += kChunk) items.push_back({t, b, std::min(n, b + kChunk)});
  }
  return items;
}

// Per-group hyperparameters, one row per group, in the order the Python side packs them.
struct HGroup {
  double lr, wd, beta1, gamma, eps, clip;
  bool has_clip;
};

template <typename T, bool kClip, bool kMask>
void sophia_h_range(T* __restrict p, const T* __restrict g, T* __restrict m, const T* __restrict h,
                    const int8_t* __restrict mask, int64_t b, int64_t e, int64_t n, const HGroup& hg, double bc) {
  const T beta1 = static_cast<T>(hg.beta1), one_minus_beta1 = static_cast<T>(1.0 - hg.beta1);
  const T bias_correction = static_cast<T>(bc), gamma = static_cast<T>(hg.gamma), eps = static_cast<T>(hg.eps);
  const T clip = static_cast<T>(hg.clip), lr = static_cast<T>(hg.lr), wd = static_cast<T>(hg.wd);
  for (int64_t bb = b; bb < e; bb += kBlock) {
    const int64_t be = std::min(e, bb + kBlock);
    prefetch_ahead<T, kMask>(p, g, m, h, mask, bb, be, n);
#pragma omp simd
    for (int64_t i = bb; i < be; ++i) {
      const T mi = m[i] * beta1 + g[i] * one_minus_beta1;
      m[i] = mi;
      const T hi = h[i] * gamma;
      T u = (mi / bias_correction) / (hi < eps ? eps : hi);  // NaN in h propagates, as torch.clamp
      if constexpr (kClip) {
        u = u < -clip ? -clip : u;
        u = u > clip ? clip : u;
      }
      if constexpr (kMask) u = u / static_cast<T>(mask[i]);
      p[i] = p[i] - lr * (u + wd * p[i]);
    }
  }
}

template <typename T>
void sophia_h_impl(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                   const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& hessians,
                   const std::vector<at::Tensor>& masks, const std::vector<at::Tensor>& steps,
                   const std::vector<int64_t>& group_of, const std::vector<HGroup>& groups) {
  const int64_t n = static_cast<int64_t>(params.size());
  std::vector<double> bias_corrections(n);
  for (int64_t t = 0; t < n; ++t) {  // step counters: 0-d float32 CPU tensors, incremented here
    float* s = steps[t].data_ptr<float>();
    *s += 1.0f;
    bias_corrections[t] = 1.0 - std::pow(groups[group_of[t]].beta1, static_cast<double>(*s));
  }
  const bool has_mask = !masks.empty();
  const auto items = plan(params);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const Item& it = items[k];
      const int64_t t = it.tensor;
      const HGroup& hg = groups[group_of[t]];
      T* p = params[t].data_ptr<T>();
      const T* g = grads[t].data_ptr<T>();
      T* m = exp_avgs[t].data_ptr<T>();
      const T* h = hessians[t].data_ptr<T>();
      const int8_t* mk = has_mask ? masks[t].data_ptr<int8_t>() : nullptr;
      const double bc = bias_corrections[t];
      const int64_t n = params[t].numel();
      if (hg.has_clip) {
        if (has_mask) sophia_h_range<T, true, true>(p, g, m, h, mk, it.begin, it.end, n, hg, bc);
        else sophia_h_range<T, true, false>(p, g, m, h, mk, it.begin, it.end, n, hg, bc);
      } else {
        if (has_mask) sophia_h_range<T, false, true>(p, g, m, h, mk, it.begin, it.end, n, hg, bc);
        else sophia_h_range<T, false, false>(p, g, m, h, mk, it.begin, it.end, n, hg, bc);
      }
    }
  });
}

std::vector<HGroup> h_groups(const std::vector<std::vector<double>>& rows) {
  std::vector<HGroup> out;
  for (const auto& r : rows) {
    out.push_back({r[0], r[1], r[2], r[3], r[4], r[5], r[6] != 0.0});
  }
  return out;
}

// ``masks`` empty: no mask (Sophia-H). Returns "" after the step, or why nothing was done.
std::string sophia_h_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                          const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& hessians,
                          const std::vector<at::Tensor>& masks, const std::vector<at::Tensor>& steps,
                          const std::vector<int64_t>& group_of,
                          const std::vector<std::vector<double>>& group_rows) {
  for (const auto& r : group_rows)
    if (r.size() != 7) return "7 hyperparameters per group expected";
  std::string why = check(params, grads, exp_avgs, hessians, masks.empty() ? nullptr : &masks, steps,
                          group_of, group_rows.size());
  if (!why.empty()) return why;
  const auto groups = h_groups(group_rows);
  AT_DISPATCH_FLOATING_TYPES(params[0].scalar_type(), "sophia_h_step", [&] {
    sophia_h_impl<scalar_t>(params, grads, exp_avgs, hessians, masks, steps, group_of, groups);
  });
  bump_mutated(params, exp_avgs, steps);
  return "";
}

// ------------------------------------------------------------------------------------ SophiaG
struct GGroup {
  double lr, wd, beta1, scale, sign;  // sign: -1 for maximize
};

template <typename T>
void sophia_g_range(T* __restrict p, const T* __restrict g, T* __restrict m, const T* __restrict h,
                    int64_t b, int64_t e, int64_t n, const GGroup& gg, double eps) {
  const T decay = static_cast<T>(1.0 - gg.lr * gg.wd), beta1 = static_cast<T>(gg.beta1);
  const T one_minus_beta1 = static_cast<T>((1.0 - gg.beta1) * gg.sign);  // maximize: the gradient negated
  const T scale = static_cast<T>(gg.scale), lr = static_cast<T>(gg.lr), tiny = static_cast<T>(eps);
  const T zero = 0, one = 1;
  for (int64_t bb = b; bb < e; bb += kBlock) {
    const int64_t be = std::min(e, bb + kBlock);
    prefetch_ahead<T, false>(p, g, m, h, nullptr, bb, be, n);
#pragma omp simd
    for (int64_t i = bb; i < be; ++i) {
      const T pi = p[i] * decay;
      const T mi = m[i] * beta1 + g[i] * one_minus_beta1;
      m[i] = mi;
      const T hs = h[i] * scale;
      T r = mi / ((hs < zero ? zero : hs) + tiny);
      r = r < -one ? -one : r;
      r = r > one ? one : r;
      p[i] = pi - lr * r;
    }
  }
}

template <typename T>
void sophia_g_impl(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                   const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& hessians,
                   const std::vector<at::Tensor>& steps, const std::vector<int64_t>& group_of,
                   const std::vector<GGroup>& groups, double eps) {
  for (const auto& s : steps) *s.data_ptr<float>() += 1.0f;
  const auto items = plan(params);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const Item& it = items[k];
      const int64_t t = it.tensor;
      sophia_g_range<T>(params[t].data_ptr<T>(), grads[t].data_ptr<T>(), exp_avgs[t].data_ptr<T>(),
                        hessians[t].data_ptr<T>(), it.begin, it.end, params[t].numel(), groups[group_of[t]], eps);
    }
  });
}

// Returns "" after the step, or why nothing was done.
std::string sophia_g_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                          const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& hessians,
                          const std::vector<at::Tensor>& steps, const std::vector<int64_t>& group_of,
                          const std::vector<std::vector<double>>& group_rows, double eps) {
  std::vector<GGroup> groups;
  for (const auto& r : group_rows) {
    if (r.size() != 5) return "5 hyperparameters per group expected";
    groups.push_back({r[0], r[1], r[2], r[3], r[4]});
  }
  std::string why = check(params, grads, exp_avgs, hessians, nullptr, steps, group_of, groups.size());
  if (!why.empty()) return why;
  AT_DISPATCH_FLOATING_TYPES(params[0].scalar_type(), "sophia_g_step", [&] {
    sophia_g_impl<scalar_t>(params, grads, exp_avgs, hessians, steps, group_of, groups, eps);
  });
  bump_mutated(params, exp_avgs, steps);
  return "";
}

// How many threads at::parallel_for gives the kernels (a test: the extension must be built with
// OpenMP when torch is, or every step runs on one thread).
int64_t parallel_threads() {
  const int64_t n = at::get_num_threads();
  std::vector<int64_t> seen(n, 0);
  at::parallel_for(0, n, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) seen[k] = at::get_thread_num();
  });
  std::sort(seen.begin(), seen.end());
  return std::unique(seen.begin(), seen.end()) - seen.begin();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sophia_h_step", &sophia_h_step, "Fused Sophia-H / FlatSophia step over all parameters (CPU)");
  m.def("sophia_g_step", &sophia_g_step, "Fused Sophia-G step over all parameters (CPU)");
  m.def("parallel_threads", &parallel_threads, "Threads at::parallel_for runs the kernels on");
}
