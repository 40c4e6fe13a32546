// Native CPU kernels for the sparse Matryoshka BatchTopK step, called from JAX through XLA's FFI.
//
// Why native: on XLA:CPU the exact BatchTopK selection is bound by TopK (a per-row partial sort)
// and the sparse decode and gradients by scatter-adds that XLA emits as scalar loops. These
// handlers do the same maths with vectorised row loops on XLA's own intra-op thread pool:
//
//   jaxsae_select      relu(z + c) for the encoder matmul z, never stored: the exact (B*k)-th
//                      largest value tau of the whole batch (an estimate from a sample of rows,
//                      one pass collecting every entry above it, then a selection among those;
//                      a two-level radix select when the estimate misses), and the entries
//                      > tau plus the ties == tau that fit the capacity, as CSR by token.
//   jaxsae_aux_select  per token, the top k_aux positive pre-activations among dead latents
//                      (AuxK), ties broken towards lower latent ids, as CSR.
//   jaxsae_l2_grads    token pass: every Matryoshka prefix reconstruction from a token's entries,
//                      the squared errors, the upstream R_g = sum_{i>=g} coef_i (target - x_hat_i)
//                      and each entry's gradient dv = <R_group(f), W_dec[f]>; latent pass (the
//                      entries counting-sorted by latent): dW_dec[f] = sum v R_g[b],
//                      dW_enc[:, f] = sum dv xc[b] (written in the [d, F] layout), db_enc[f].
//                      The target may be per prefix, [G, B, d] (on a shard of the latents).
//   jaxsae_decode_groups  each token's decode split by group, [G, B, d] (a latent shard's part).
//
// Every reduction runs in a fixed order (per token or per latent, by one thread), so results do
// not depend on thread timing: training resumes bit-identically. jaxsae/kernels/cpu_build.py
// compiles this file and registers the handlers, jaxsae/kernels/cpu.py wraps them; the tests
// compare them against the dense references (jaxsae/model.py, jaxsae/selection.py).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

// The handlers' buffer types, for arguments and (as Out<...>) results. Arrays have any rank (the
// handlers check their shapes); scalars have rank 0, which the FFI checks when it decodes them.
using F32Array = ffi::Buffer<ffi::F32>;
using S32Array = ffi::Buffer<ffi::S32>;
using F32Scalar = ffi::BufferR0<ffi::F32>;
using S32Scalar = ffi::BufferR0<ffi::S32>;
using BoolScalar = ffi::BufferR0<ffi::PRED>;
template <typename T>
using Out = ffi::Result<T>;

// Every handler runs its loops on XLA's intra-op pool, its first parameter.
inline auto BindOnPool() { return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>(); }

inline int32_t SaturateToInt32(int64_t x) {
  return static_cast<int32_t>(std::min<int64_t>(x, std::numeric_limits<int32_t>::max()));
}

// ------------------------------------------------------------------------------------------------
// Parallel loops on XLA's intra-op pool. The calling thread takes chunks too, so the loop finishes
// even if no pool thread ever runs; helpers that start late find nothing left and return.
// ------------------------------------------------------------------------------------------------

struct LoopState {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

template <typename Fn>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t grain, const Fn& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t chunks = (n + grain - 1) / grain;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks - 1);
  if (helpers <= 0) {
    fn(0, n);
    return;
  }
  auto state = std::make_shared<LoopState>();
  const Fn* body = &fn;
  auto work = [state, body, n, grain, chunks]() {
    for (int64_t c; (c = state->next.fetch_add(1)) < chunks;) {
      (*body)(c * grain, std::min(n, (c + 1) * grain));
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work(); });
  work();
  while (state->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

inline float Dot(const float* __restrict a, const float* __restrict b, int64_t d) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < d; ++i) s += a[i] * b[i];
  return s;
}

inline void Axpy(float a, const float* __restrict x, float* __restrict y, int64_t d) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) y[i] += a * x[i];
}

// Matryoshka group of latent f: the number of group ends <= f (ends ascend, the last is F).
inline int GroupOf(int32_t f, const int64_t* ends, int G) {
  int g = 0;
  while (g < G - 1 && f >= ends[g]) ++g;
  return g;
}

ffi::Error CheckEnds(ffi::Span<const int64_t> ends, int64_t F) {
  if (ends.size() == 0 || ends.back() != F)
    return ffi::Error::InvalidArgument("group_ends must be non-empty and end at F=" +
                                       std::to_string(F));
  // Equal ends (empty groups) occur on a shard of the latents that a group does not reach.
  if (ends[0] < 0) return ffi::Error::InvalidArgument("group_ends must be >= 0");
  for (size_t i = 1; i < ends.size(); ++i)
    if (ends[i] < ends[i - 1])
      return ffi::Error::InvalidArgument("group_ends must not decrease");
  return ffi::Error::Success();
}

// ------------------------------------------------------------------------------------------------
// Candidate collection: every entry of relu(z + c) that is > 0 and >= t, per row, into per-block
// buffers (row order, latents ascending within a row).
// ------------------------------------------------------------------------------------------------

constexpr int64_t kRowsPerBlock = 16;

struct Candidates {
  std::vector<std::vector<int32_t>> lat;   // per block of rows
  std::vector<std::vector<float>> val;
  std::vector<int32_t> row_count;          // [B]
  int64_t total = 0;
  bool overflow = false;                   // stopped early: more than `limit` candidates
};

// Appends (latent, value) for every f of row zr with relu(zr[f] + c[f]) >= te (te > 0), in order.
inline void CollectRow(const float* __restrict zr, const float* __restrict c, int64_t F, float te,
                       std::vector<int32_t>& lat, std::vector<float>& val, size_t& n) {
  int64_t f0 = 0;
#if defined(__AVX512F__)
  const __m512 vt = _mm512_set1_ps(te);
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; f0 + 16 <= F; f0 += 16) {
    const __m512 p = _mm512_add_ps(_mm512_loadu_ps(zr + f0), _mm512_loadu_ps(c + f0));
    const __mmask16 m = _mm512_cmp_ps_mask(p, vt, _CMP_GE_OQ);   // false for NaN
    if (!m) continue;
    if (n + 16 > lat.size()) {
      lat.resize(2 * lat.size() + 64);
      val.resize(lat.size());
    }
    _mm512_mask_compressstoreu_ps(val.data() + n, m, p);
    _mm512_mask_compressstoreu_epi32(
        lat.data() + n, m, _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int32_t>(f0))));
    n += __builtin_popcount(m);
  }
#endif
  for (; f0 < F; ++f0) {
    const float p = zr[f0] + c[f0];
    if (p >= te) {
      if (n + 1 > lat.size()) {
        lat.resize(2 * lat.size() + 64);
        val.resize(lat.size());
      }
      lat[n] = static_cast<int32_t>(f0);
      val[n] = p;
      ++n;
    }
  }
}

void Collect(ffi::ThreadPool& pool, const float* z, const float* c, int64_t B, int64_t F,
             float t, int64_t limit, Candidates& out) {
  const int64_t blocks = (B + kRowsPerBlock - 1) / kRowsPerBlock;
  out.lat.assign(blocks, {});
  out.val.assign(blocks, {});
  out.row_count.assign(B, 0);
  // p > 0 and p >= t in one comparison: the smallest positive float bounds t from below.
  const float te = std::max(t, std::numeric_limits<float>::denorm_min());
  std::atomic<int64_t> total{0};
  std::atomic<bool> overflow{false};
  ParallelFor(pool, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      if (overflow.load(std::memory_order_relaxed)) return;
      auto& lat = out.lat[blk];
      auto& val = out.val[blk];
      size_t n = 0;
      const int64_t r1 = std::min(B, (blk + 1) * kRowsPerBlock);
      for (int64_t r = blk * kRowsPerBlock; r < r1; ++r) {
        const size_t before = n;
        CollectRow(z + r * F, c, F, te, lat, val, n);
        out.row_count[r] = static_cast<int32_t>(n - before);
      }
      lat.resize(n);
      val.resize(n);
      if (total.fetch_add(static_cast<int64_t>(n)) + static_cast<int64_t>(n) > limit)
        overflow.store(true);
    }
  });
  out.total = total.load();
  out.overflow = overflow.load();
}

void Flush(std::vector<int32_t>& h, std::vector<int64_t>& hist, std::mutex& mu) {
  const size_t bins = hist.size();
  std::lock_guard<std::mutex> lock(mu);
  for (size_t copy = 0; copy < h.size(); copy += bins)
    for (size_t i = 0; i < bins; ++i) hist[i] += h[copy + i];
  std::fill(h.begin(), h.end(), 0);
}

// Non-negative floats order like their bit patterns: a histogram of the top 16 bits (2^15 bins,
// the sign being 0) of relu(z + c) over every `stride`-th row.
std::vector<int64_t> Histogram16(ffi::ThreadPool& pool, const float* z, const float* c, int64_t B,
                                 int64_t F, int64_t stride) {
  constexpr int kBins = 1 << 15;
  std::vector<int64_t> hist(kBins, 0);
  std::mutex mu;
  const int64_t rows = (B + stride - 1) / stride;
  const int64_t chunk = std::max<int64_t>(1, (rows + 1) / std::max<int64_t>(1, pool.num_threads()));
  ParallelFor(pool, rows, chunk, [&](int64_t i0, int64_t i1) {
    // Four interleaved copies: neighbouring values often share a bin, and one copy would
    // serialise on that bin's read-modify-write.
    std::vector<int32_t> h(4 * kBins, 0);
    for (int64_t i = i0; i < i1; ++i) {
      const float* zr = z + i * stride * F;
      for (int64_t f = 0; f < F; ++f) {
        // Branch-free (the sign is a coin flip): non-positive and NaN values land in bin 0,
        // which holds no positive value above 2^-126 and so never sets a threshold.
        const float p = zr[f] + c[f];
        uint32_t bits;
        std::memcpy(&bits, &p, 4);
        const uint32_t bin = p > 0.f ? std::min<uint32_t>(bits >> 16, kBins - 1) : 0u;
        ++h[(f & 3) * kBins + bin];
      }
      if ((i - i0) % 4096 == 4095) Flush(h, hist, mu);   // int32 copies never overflow
    }
    Flush(h, hist, mu);
  });
  return hist;
}

// The lower edge of the highest bin at which the histogram's count from the top reaches `rank`:
// every value >= it is collected, and at least `rank` of them exist. 0 if fewer exist.
float BinLowerBound(const std::vector<int64_t>& hist, int64_t rank) {
  int64_t above = 0;
  for (int bin = static_cast<int>(hist.size()) - 1; bin >= 1; --bin) {
    above += hist[bin];
    if (above >= rank) {
      const uint32_t bits = static_cast<uint32_t>(bin) << 16;
      float t;
      std::memcpy(&t, &bits, 4);
      return t;
    }
  }
  return 0.f;
}

// The exact budget-th largest value of relu(z + c) (0 if fewer are positive): the bin of the top
// 16 bits that holds it, then a histogram of the low 16 bits of that bin's values.
float ExactKth(ffi::ThreadPool& pool, const float* z, const float* c, int64_t B, int64_t F,
               int64_t budget) {
  const std::vector<int64_t> high = Histogram16(pool, z, c, B, F, 1);
  int64_t above = 0;
  int bin = static_cast<int>(high.size()) - 1;
  for (; bin >= 1; --bin) {
    if (above + high[bin] >= budget) break;
    above += high[bin];
  }
  if (bin < 1) return 0.f;
  std::vector<int64_t> low(1 << 16, 0);
  std::mutex mu;
  ParallelFor(pool, B, std::max<int64_t>(1, B / 8), [&](int64_t r0, int64_t r1) {
    std::vector<int64_t> h(1 << 16, 0);
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t f = 0; f < F; ++f) {
        const float p = z[r * F + f] + c[f];
        uint32_t bits;
        std::memcpy(&bits, &p, 4);
        if (p > 0.f && (bits >> 16) == static_cast<uint32_t>(bin)) ++h[bits & 0xFFFF];
      }
    std::lock_guard<std::mutex> lock(mu);
    for (size_t i = 0; i < h.size(); ++i) low[i] += h[i];
  });
  for (int l = (1 << 16) - 1; l >= 0; --l) {
    above += low[l];
    if (above >= budget) {
      const uint32_t bits = (static_cast<uint32_t>(bin) << 16) | static_cast<uint32_t>(l);
      float t;
      std::memcpy(&t, &bits, 4);
      return t;
    }
  }
  return 0.f;  // unreachable: the bin holds the budget-th value
}

// How many ties (== tau) each block of rows may keep: the capacity left after every entry
// > tau, handed out to blocks in row order. Deterministic, whatever the thread timing.
std::vector<int64_t> TieAllowance(const std::vector<int64_t>& gt, const std::vector<int64_t>& eq,
                                  int64_t cap) {
  int64_t left = cap;
  for (int64_t n : gt) left -= n;
  std::vector<int64_t> allow(eq.size(), 0);
  for (size_t blk = 0; blk < eq.size(); ++blk) {
    allow[blk] = std::max<int64_t>(0, std::min(eq[blk], left));
    left -= allow[blk];
  }
  return allow;
}

// Re-collects, from the whole batch, every entry > tau and each block's allowance of ties;
// returns the ties left out.
int64_t CollectAtTau(ffi::ThreadPool& pool, const float* z, const float* c, int64_t B, int64_t F,
                     float tau, int64_t cap, Candidates& out) {
  const int64_t blocks = (B + kRowsPerBlock - 1) / kRowsPerBlock;
  std::vector<int64_t> gt(blocks, 0), eq(blocks, 0);
  ParallelFor(pool, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk)
      for (int64_t r = blk * kRowsPerBlock; r < std::min(B, (blk + 1) * kRowsPerBlock); ++r)
        for (int64_t f = 0; f < F; ++f) {
          const float p = z[r * F + f] + c[f];
          gt[blk] += p > tau && p > 0.f;
          eq[blk] += p == tau && p > 0.f;
        }
  });
  const std::vector<int64_t> allow = TieAllowance(gt, eq, cap);
  out.lat.assign(blocks, {});
  out.val.assign(blocks, {});
  out.row_count.assign(B, 0);
  ParallelFor(pool, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      int64_t ties = allow[blk];
      for (int64_t r = blk * kRowsPerBlock; r < std::min(B, (blk + 1) * kRowsPerBlock); ++r)
        for (int64_t f = 0; f < F; ++f) {
          const float p = z[r * F + f] + c[f];
          if (!(p > 0.f) || p < tau || (p == tau && ties-- <= 0)) continue;
          out.lat[blk].push_back(static_cast<int32_t>(f));
          out.val[blk].push_back(p);
          ++out.row_count[r];
        }
    }
  });
  out.total = 0;
  for (auto& v : out.val) out.total += static_cast<int64_t>(v.size());
  out.overflow = false;
  int64_t dropped = 0;
  for (int64_t blk = 0; blk < blocks; ++blk) dropped += eq[blk] - allow[blk];
  return dropped;
}

// Writes the candidates > tau, and the ties == tau within the allowance, as CSR (row order,
// latents ascending); the slots past the count get latent 0, value 0. Returns the ties dropped.
int64_t Finalize(ffi::ThreadPool& pool, const Candidates& cand, int64_t B, float tau, int64_t cap,
                 int32_t* rp, int32_t* lp, float* vp) {
  const int64_t blocks = static_cast<int64_t>(cand.val.size());
  std::vector<int64_t> gt(blocks, 0), eq(blocks, 0);
  for (int64_t blk = 0; blk < blocks; ++blk)
    for (float v : cand.val[blk]) {
      gt[blk] += v > tau;
      eq[blk] += v == tau;
    }
  const std::vector<int64_t> allow = TieAllowance(gt, eq, cap);
  std::vector<int64_t> kept(B, 0);
  for (int64_t blk = 0; blk < blocks; ++blk) {   // per row: > tau, and ties while allowed
    const auto& v = cand.val[blk];
    size_t e = 0;
    int64_t ties = allow[blk];
    for (int64_t r = blk * kRowsPerBlock; r < std::min(B, (blk + 1) * kRowsPerBlock); ++r)
      for (int32_t i = 0; i < cand.row_count[r]; ++i, ++e)
        kept[r] += v[e] > tau || (v[e] == tau && ties-- > 0);
  }
  rp[0] = 0;
  for (int64_t r = 0; r < B; ++r) rp[r + 1] = static_cast<int32_t>(rp[r] + kept[r]);
  ParallelFor(pool, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const auto& cl = cand.lat[blk];
      const auto& cv = cand.val[blk];
      int64_t out = rp[std::min(B, blk * kRowsPerBlock)];
      int64_t ties = allow[blk];
      for (size_t e = 0; e < cv.size(); ++e)
        if (cv[e] > tau || (cv[e] == tau && ties-- > 0)) {
          lp[out] = cl[e];
          vp[out] = cv[e];
          ++out;
        }
    }
  });
  std::fill(lp + rp[B], lp + cap, 0);
  std::fill(vp + rp[B], vp + cap, 0.f);
  int64_t dropped = 0;
  for (int64_t blk = 0; blk < blocks; ++blk) dropped += eq[blk] - allow[blk];
  return dropped;
}

// Besides the CSR entries and tau, three diagnostics (saturated to int32): ties_dropped, the
// entries == tau left out for want of capacity; path, 0 when the sampled estimate sufficed, 1 or
// 2 when it was loosened, 3 for the radix select; collected, the candidates the exact selection
// chose among.
ffi::Error SelectImpl(ffi::ThreadPool pool, F32Array z, F32Array c, Out<S32Array> row_ptr,
                      Out<S32Array> lat, Out<F32Array> val, Out<F32Scalar> tau_out,
                      Out<S32Scalar> ties_dropped, Out<S32Scalar> path_out,
                      Out<S32Scalar> collected, int64_t budget) {
  const auto dims = z.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("z must be [B, F]");
  const int64_t B = dims[0], F = dims[1];
  if (c.element_count() != static_cast<size_t>(F))
    return ffi::Error::InvalidArgument("c must be [F]");
  const int64_t cap = lat->element_count();
  if (budget < 1 || cap < budget)
    return ffi::Error::InvalidArgument("select needs 1 <= budget <= capacity, got budget " +
                                       std::to_string(budget) + ", capacity " +
                                       std::to_string(cap));
  const float* zp = z.typed_data();
  const float* cp = c.typed_data();

  // 1. Estimate: from a histogram of every stride-th row, the value whose rank matches the
  //    budget's, loosened by a quarter and a few entries (and up to one bin, 2^-7 relative).
  const int64_t stride = std::max<int64_t>(1, B / 32);
  const int64_t sampled_rows = (B + stride - 1) / stride;
  const std::vector<int64_t> sample = Histogram16(pool, zp, cp, B, F, stride);
  const int64_t limit = std::max<int64_t>(4 * budget, cap) + 1024;

  // 2. Collect everything >= t. Too few collected (the sample's rows ran above the batch):
  //    loosen the estimate and collect again; too many, or still too few: the exact bound from
  //    a histogram of the whole batch. path counts the extra collections.
  Candidates cand;
  int32_t path = 0;
  float t = 0.f;
  for (const double loosen : {1.25, 2.5, 8.0}) {
    const int64_t rank = static_cast<int64_t>(
        std::ceil(loosen * static_cast<double>(budget) * sampled_rows / B)) + 16;
    t = BinLowerBound(sample, rank);
    Collect(pool, zp, cp, B, F, t, limit, cand);
    if (cand.overflow || t == 0.f || cand.total >= budget) break;
    ++path;
  }
  // 3. The exact threshold tau: the budget-th largest candidate when the collection is complete
  //    and holds at least budget entries; else (only pathological batches: the estimates missed
  //    twice, or ties fill a histogram bin) a two-level radix select over the whole batch,
  //    and the entries > tau plus each block's share of the ties re-collected.
  float tau = 0.f;
  int64_t dropped = 0;
  if (!cand.overflow && (t == 0.f || cand.total >= budget)) {
    if (cand.total >= budget) {
      std::vector<float> all;
      all.reserve(cand.total);
      for (auto& v : cand.val) all.insert(all.end(), v.begin(), v.end());
      std::nth_element(all.begin(), all.begin() + (budget - 1), all.end(),
                       std::greater<float>());
      tau = all[budget - 1];
    }   // else fewer than budget entries are positive: tau = 0 keeps them all
  } else {
    path = 3;
    tau = ExactKth(pool, zp, cp, B, F, budget);
    dropped = CollectAtTau(pool, zp, cp, B, F, tau, cap, cand);
  }

  // 4. Keep every entry > tau and, up to the capacity, the ties == tau (earliest rows first).
  dropped += Finalize(pool, cand, B, tau, cap, row_ptr->typed_data(), lat->typed_data(),
                      val->typed_data());
  *tau_out->typed_data() = tau;
  *ties_dropped->typed_data() = SaturateToInt32(dropped);
  *path_out->typed_data() = path;
  *collected->typed_data() = SaturateToInt32(cand.total);
  return ffi::Error::Success();
}

// ------------------------------------------------------------------------------------------------
// AuxK selection: per token, the k_aux largest positive pre-activations among dead latents (all of
// them when a token has fewer; ties at the k_aux-th value are kept up to k_aux in all, the lowest
// latent ids first).
// ------------------------------------------------------------------------------------------------

ffi::Error AuxSelectImpl(ffi::ThreadPool pool, F32Array z, F32Array c, S32Array dead,
                         Out<S32Array> row_ptr, Out<S32Array> lat, Out<F32Array> val,
                         int64_t k_aux) {
  const auto dims = z.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("z must be [B, F]");
  const int64_t B = dims[0], F = dims[1];
  if (c.element_count() != static_cast<size_t>(F) ||
      dead.element_count() != static_cast<size_t>(F))
    return ffi::Error::InvalidArgument("c and dead must be [F]");
  const int64_t cap = lat->element_count();
  const float* zp = z.typed_data();
  const float* cp = c.typed_data();
  std::vector<int32_t> ids;
  for (int64_t f = 0; f < F; ++f)
    if (dead.typed_data()[f]) ids.push_back(static_cast<int32_t>(f));

  const int64_t blocks = (B + kRowsPerBlock - 1) / kRowsPerBlock;
  std::vector<std::vector<int32_t>> blat(blocks);
  std::vector<std::vector<float>> bval(blocks);
  std::vector<int64_t> kept(B, 0);
  ParallelFor(pool, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> vals, scratch;
    std::vector<int32_t> lats;
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r1 = std::min(B, (blk + 1) * kRowsPerBlock);
      for (int64_t r = blk * kRowsPerBlock; r < r1; ++r) {
        const float* zr = zp + r * F;
        vals.clear();
        lats.clear();
        for (int32_t f : ids) {
          const float p = zr[f] + cp[f];
          if (p > 0.f) {
            vals.push_back(p);
            lats.push_back(f);
          }
        }
        float kth = 0.f;
        int64_t ties = 0;   // entries == kth kept: the lowest latent ids, up to k_aux in all
        if (static_cast<int64_t>(vals.size()) > k_aux) {
          scratch.assign(vals.begin(), vals.end());
          std::nth_element(scratch.begin(), scratch.begin() + (k_aux - 1), scratch.end(),
                           std::greater<float>());
          kth = scratch[k_aux - 1];
          ties = k_aux;
          for (float v : vals) ties -= v > kth;
        }
        int64_t n = 0;
        for (size_t i = 0; i < vals.size(); ++i)
          if (vals[i] > kth || (vals[i] == kth && ties-- > 0)) {
            blat[blk].push_back(lats[i]);
            bval[blk].push_back(vals[i]);
            ++n;
          }
        kept[r] = n;
      }
    }
  });
  int32_t* rp = row_ptr->typed_data();
  int64_t count = 0;
  rp[0] = 0;
  for (int64_t r = 0; r < B; ++r) {
    count += kept[r];
    rp[r + 1] = static_cast<int32_t>(std::min(count, cap));
  }
  // No token keeps more than k_aux, so the capacity B * k_aux always suffices; a smaller one
  // (a caller's mistake) yields no entries rather than a write past the end.
  const bool ok = count <= cap;
  int32_t* lp = lat->typed_data();
  float* vp = val->typed_data();
  if (ok) {
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t out = rp[blk * kRowsPerBlock];
      std::copy(blat[blk].begin(), blat[blk].end(), lp + out);
      std::copy(bval[blk].begin(), bval[blk].end(), vp + out);
    }
  } else {
    std::fill(rp, rp + B + 1, 0);
  }
  const int64_t filled = ok ? count : 0;
  std::fill(lp + filled, lp + cap, 0);
  std::fill(vp + filled, vp + cap, 0.f);
  return ffi::Error::Success();
}

// ------------------------------------------------------------------------------------------------
// Scratch memory reused across calls: fresh allocations of this size come from mmap, and touching
// new pages costs more than the arithmetic here (page faults, several microseconds per 4 KiB).
// ------------------------------------------------------------------------------------------------

class ScratchPool {
 public:
  struct Lease {
    ScratchPool* pool;
    std::vector<char> mem;
    ~Lease() { pool->Release(std::move(mem)); }
    // Offsets from a 64-byte aligned base (rows then suit streaming stores).
    template <typename T>
    T* As(size_t offset = 0) {
      const uintptr_t base = (reinterpret_cast<uintptr_t>(mem.data()) + 63) & ~uintptr_t{63};
      return reinterpret_cast<T*>(base + offset);
    }
  };

  std::unique_ptr<Lease> Acquire(size_t bytes) {
    bytes += 64;   // room to align the base
    std::vector<char> mem;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto best = free_.end();
      for (auto it = free_.begin(); it != free_.end(); ++it)
        if (it->size() >= bytes && (best == free_.end() || it->size() < best->size())) best = it;
      if (best == free_.end() && !free_.empty()) best = free_.begin();  // grow one instead
      if (best != free_.end()) {
        mem = std::move(*best);
        free_.erase(best);
      }
    }
    if (mem.size() < bytes) mem.resize(bytes);
    return std::unique_ptr<Lease>(new Lease{this, std::move(mem)});
  }

 private:
  void Release(std::vector<char> mem) {
    std::lock_guard<std::mutex> lock(mu_);
    if (free_.size() < 8) free_.push_back(std::move(mem));
  }
  std::mutex mu_;
  std::vector<std::vector<char>> free_;
};

ScratchPool& Scratch() {
  static ScratchPool* pool = new ScratchPool();  // never destroyed: calls may outlive statics
  return *pool;
}

ffi::Error CheckEntries(const int32_t* rp, const int32_t* lp, int64_t B, int64_t F, int64_t cap) {
  if (rp[0] != 0 || rp[B] > cap)
    return ffi::Error::InvalidArgument("row_ptr must start at 0 and end within the capacity");
  for (int64_t b = 0; b < B; ++b)
    if (rp[b + 1] < rp[b]) return ffi::Error::InvalidArgument("row_ptr must not decrease");
  for (int64_t e = 0; e < rp[B]; ++e)
    if (lp[e] < 0 || lp[e] >= F)
      return ffi::Error::InvalidArgument("latent id " + std::to_string(lp[e]) + " at entry " +
                                         std::to_string(e) + " is outside [0, " +
                                         std::to_string(F) + ")");
  return ffi::Error::Success();
}

// ------------------------------------------------------------------------------------------------
// Sparse Matryoshka loss and gradients in one call, in two passes (TokenPass, LatentPass).
//
// Token pass (parallel over tokens): the G prefix reconstructions of target[b] from its entries,
// err_g = target - x_hat_g, sq[b, g] = ||err_g||^2, the upstream R_g = sum_{i>=g} coef_i err_i
// (scratch) and per entry dv = <R_group(f)[b], W_dec[f]>, the loss's gradient w.r.t. the value.
// Latent pass (entries counting-sorted by latent, tiles of 16 latents): dW_dec[f] = sum v R_g[b],
// dW_enc[:, f] = sum dv xc[b] (written straight into the [d, F] layout) and db_enc[f] = sum dv.
// ------------------------------------------------------------------------------------------------

constexpr int64_t kLatentTile = 16;

// dst[0:n] = src[0:n], bypassing the cache when dst is 64-byte aligned (written once, read later).
inline void StoreRow(float* dst, const float* src, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  if (reinterpret_cast<uintptr_t>(dst) % 64 == 0)
    for (; i + 16 <= n; i += 16) _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
#endif
  for (; i < n; ++i) dst[i] = src[i];
}

// out[i * ld + j] = tile[j * d + i] for j < nf (<= 16), i < d: a tile of 16 latents' dW_enc
// rows into the [d, F] layout, one gathered line of 16 floats per output row.
inline void TransposeTile(const float* tile, int64_t nf, int64_t d, float* out, int64_t ld) {
  int64_t i = 0;
#if defined(__AVX512F__)
  if (nf == 16 && d <= (int64_t{1} << 26)) {
    const __m512i rows = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(static_cast<int32_t>(d)));
    const bool aligned = reinterpret_cast<uintptr_t>(out) % 64 == 0 && ld % 16 == 0;
    for (; i < d; ++i) {
      const __m512 line = _mm512_i32gather_ps(rows, tile + i, 4);
      if (aligned) {
        _mm512_stream_ps(out + i * ld, line);
      } else {
        _mm512_storeu_ps(out + i * ld, line);
      }
    }
  }
#endif
  for (; i < d; ++i)
    for (int64_t j = 0; j < nf; ++j) out[i * ld + j] = tile[j * d + i];
}

// The selected entries and the shapes both passes read.
struct SparseCodes {
  int64_t B, d, F;       // tokens, model width, latents
  int64_t n;             // entries in use: row_ptr[B]
  int G;                 // Matryoshka groups
  const int64_t* ends;   // [G] group ends, ascending, the last F
  const int32_t* rp;     // [B + 1] row_ptr: token b owns entries rp[b]:rp[b + 1]
  const int32_t* lp;     // [n] latent of each entry
  const float* vp;       // [n] value of each entry
  const float* W;        // [F, d] W_dec
};

// Token pass: per token, writes res[b] = err_{G-1}, sq[b, g] = ||err_g||^2, R[g, b] = R_g (the
// [G, B, d] scratch the latent pass reads back) and dv[e] for each of its entries. A token's W_dec
// rows are read twice (decode, then dv): the second time from L2. Its R rows are built in an L1
// buffer and streamed out.
//
// With per_prefix the target is [G, B, d], one per prefix (on a shard of the latents: x minus the
// other shards' decodes of the groups <= g), and err_g = target_g - sum of this call's groups <= g.
void TokenPass(ffi::ThreadPool& pool, const SparseCodes& s, const float* T, bool per_prefix,
               const float* co, float* res, float* sqp, float* R, float* dvp) {
  const int64_t B = s.B, d = s.d;
  const int G = s.G;
  const int64_t* en = s.ends;
  const int32_t* rp = s.rp;
  const int32_t* lp = s.lp;
  const float* vp = s.vp;
  const float* W = s.W;
  ParallelFor(pool, B, 8, [&](int64_t t0, int64_t t1) {
    const size_t gd = static_cast<size_t>(G) * d;
    std::vector<float> parts(gd), errs(gd), up(gd), acc(per_prefix ? d : 0);
    for (int64_t b = t0; b < t1; ++b) {
      std::fill(parts.begin(), parts.end(), 0.f);
      for (int64_t e = rp[b]; e < rp[b + 1]; ++e) {
        if (e + 1 < rp[b + 1]) {   // the next entry's row is random: fetch it now
          const float* w1 = W + static_cast<int64_t>(lp[e + 1]) * d;
          for (int64_t q = 0; q < d; q += 16) __builtin_prefetch(w1 + q);
        }
        Axpy(vp[e], W + static_cast<int64_t>(lp[e]) * d,
             parts.data() + GroupOf(lp[e], en, G) * d, d);
      }
      if (per_prefix) {   // err_g = target_g - sum of the groups <= g
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int g = 0; g < G; ++g) {
          const float* tg = T + (g * B + b) * d;
          float* eg = errs.data() + g * d;
          const float* pg = parts.data() + g * d;
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) {
            acc[i] += pg[i];
            eg[i] = tg[i] - acc[i];
          }
          sqp[b * G + g] = Dot(eg, eg, d);
        }
      } else {
        const float* tb = T + b * d;
        for (int g = 0; g < G; ++g) {   // err_g = target - sum of the groups <= g
          const float* prev = g ? errs.data() + (g - 1) * d : tb;
          float* eg = errs.data() + g * d;
          const float* pg = parts.data() + g * d;
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) eg[i] = prev[i] - pg[i];
          sqp[b * G + g] = Dot(eg, eg, d);
        }
      }
      StoreRow(res + b * d, errs.data() + (G - 1) * d, d);
      for (int g = G - 1; g >= 0; --g) {   // R_g = coef_g err_g + R_{g+1}
        float* ug = up.data() + g * d;
        const float* eg = errs.data() + g * d;
        const float cg = co[g];
        if (g + 1 < G) {
          const float* next = up.data() + (g + 1) * d;
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) ug[i] = cg * eg[i] + next[i];
        } else {
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) ug[i] = cg * eg[i];
        }
      }
      for (int64_t e = rp[b]; e < rp[b + 1]; ++e)
        dvp[e] = Dot(up.data() + GroupOf(lp[e], en, G) * d,
                     W + static_cast<int64_t>(lp[e]) * d, d);
      for (int g = 0; g < G; ++g) StoreRow(R + (g * B + b) * d, up.data() + g * d, d);
    }
  });
#if defined(__AVX512F__)
  _mm_sfence();   // the streamed rows are visible to the latent pass's threads
#endif
}

// Latent pass: the entries counting-sorted by latent (stable: token order within a latent, so
// each sum has a fixed order), then per tile of 16 latents dW_dec[f] = sum v R_group(f)[b],
// dW_enc[:, f] = sum dv xc[b] (into the [d, F] layout) and db_enc[f] = sum dv. tok [n], order [n]
// and start [F + 1] are scratch.
void LatentPass(ffi::ThreadPool& pool, const SparseCodes& s, const float* X, const float* R,
                const float* dvp, int32_t* tok, int32_t* order, int32_t* start, float* dWd,
                float* dWe, float* dbe) {
  const int64_t B = s.B, d = s.d, F = s.F, n = s.n;
  const int G = s.G;
  const int64_t* en = s.ends;
  const int32_t* rp = s.rp;
  const int32_t* lp = s.lp;
  const float* vp = s.vp;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t e = rp[b]; e < rp[b + 1]; ++e) tok[e] = static_cast<int32_t>(b);
  std::fill(start, start + F + 1, 0);
  for (int64_t e = 0; e < n; ++e) ++start[lp[e] + 1];
  for (int64_t f = 0; f < F; ++f) start[f + 1] += start[f];
  {
    std::vector<int32_t> fill(start, start + F);
    for (int64_t e = 0; e < n; ++e) order[fill[lp[e]]++] = static_cast<int32_t>(e);
  }
  const int64_t tiles = (F + kLatentTile - 1) / kLatentTile;
  ParallelFor(pool, tiles, 4, [&](int64_t s0, int64_t s1) {
    // The tile's 16 dW_dec rows and dW_enc columns accumulate in L1/L2 buffers and are written
    // once, with streaming stores where aligned (no read-for-ownership of the outputs).
    std::vector<float> dec(static_cast<size_t>(kLatentTile) * d), enc(dec.size());
    for (int64_t tile = s0; tile < s1; ++tile) {
      const int64_t f0 = tile * kLatentTile, f1 = std::min(F, f0 + kLatentTile);
      std::fill(dec.begin(), dec.end(), 0.f);
      std::fill(enc.begin(), enc.end(), 0.f);
      for (int64_t f = f0; f < f1; ++f) {
        float* wrow = dec.data() + (f - f0) * d;
        float* erow = enc.data() + (f - f0) * d;
        const float* Rg = R + GroupOf(static_cast<int32_t>(f), en, G) * B * d;
        float db = 0.f;
        for (int32_t i = start[f]; i < start[f + 1]; ++i) {
          const int32_t e = order[i];
          const int64_t b = tok[e];
          if (i + 1 < start[f1]) {   // the next entry's rows are random: fetch them now
            const int32_t e1 = order[i + 1];
            const float* r1 = R + (GroupOf(lp[e1], en, G) * B + tok[e1]) * d;
            const float* x1 = X + tok[e1] * d;
            for (int64_t q = 0; q < d; q += 16) {
              __builtin_prefetch(r1 + q);
              __builtin_prefetch(x1 + q);
            }
          }
          Axpy(vp[e], Rg + b * d, wrow, d);
          Axpy(dvp[e], X + b * d, erow, d);
          db += dvp[e];
        }
        dbe[f] = db;
        StoreRow(dWd + f * d, wrow, d);
      }
      TransposeTile(enc.data(), f1 - f0, d, dWe + f0, F);
    }
  });
#if defined(__AVX512F__)
  _mm_sfence();   // the streaming stores are visible before XLA reads the gradients
#endif
}

ffi::Error L2GradsImpl(ffi::ThreadPool pool, F32Array target, F32Array xc, F32Array w_dec,
                       S32Array row_ptr, S32Array lat, F32Array val, F32Array coef,
                       Out<F32Array> resid, Out<F32Array> sq, Out<F32Array> up0,
                       Out<F32Array> dw_dec, Out<F32Array> dw_enc, Out<F32Array> db_enc,
                       ffi::Span<const int64_t> ends) {
  const auto dims = target.dimensions();
  const bool per_prefix = dims.size() == 3;
  if (dims.size() != 2 && !per_prefix)
    return ffi::Error::InvalidArgument("target must be [B, d] or [G, B, d]");
  const int64_t B = dims[dims.size() - 2], d = dims[dims.size() - 1];
  const int64_t F = w_dec.dimensions()[0];
  const int G = static_cast<int>(ends.size());
  if (per_prefix && dims[0] != G)
    return ffi::Error::InvalidArgument("a per-prefix target must be [G, B, d] with G=" +
                                       std::to_string(G));
  const int64_t cap = lat.element_count();
  if (auto err = CheckEnds(ends, F); err.failure()) return err;
  if (w_dec.dimensions()[1] != d || xc.element_count() != static_cast<size_t>(B * d))
    return ffi::Error::InvalidArgument("W_dec must be [F, d] and xc [B, d]");
  if (coef.element_count() != static_cast<size_t>(G))
    return ffi::Error::InvalidArgument("coef must be [G]");
  const int32_t* rp = row_ptr.typed_data();
  const int32_t* lp = lat.typed_data();
  if (auto err = CheckEntries(rp, lp, B, F, cap); err.failure()) return err;
  const int64_t n = rp[B];
  const SparseCodes codes{B, d, F, n, G, ends.begin(), rp, lp, val.typed_data(),
                          w_dec.typed_data()};

  // Scratch: R [G, B, d], dv [n], tok [n], order [n], start [F + 1].
  const size_t r_bytes = sizeof(float) * G * B * d;
  const size_t n_bytes = sizeof(float) * std::max<int64_t>(n, 1);
  auto lease = Scratch().Acquire(r_bytes + 3 * n_bytes + sizeof(int32_t) * (F + 1));
  float* R = lease->As<float>();
  float* dvp = lease->As<float>(r_bytes);
  int32_t* tok = lease->As<int32_t>(r_bytes + n_bytes);
  int32_t* order = lease->As<int32_t>(r_bytes + 2 * n_bytes);
  int32_t* start = lease->As<int32_t>(r_bytes + 3 * n_bytes);

  TokenPass(pool, codes, target.typed_data(), per_prefix, coef.typed_data(), resid->typed_data(),
            sq->typed_data(), R, dvp);

  // b_dec's share through the decodes: sum over tokens of R_0 (fixed order: deterministic).
  float* u0 = up0->typed_data();
  std::fill(u0, u0 + d, 0.f);
  for (int64_t b = 0; b < B; ++b) Axpy(1.f, R + b * d, u0, d);

  LatentPass(pool, codes, xc.typed_data(), R, dvp, tok, order, start, dw_dec->typed_data(),
             dw_enc->typed_data(), db_enc->typed_data());
  return ffi::Error::Success();
}

// Each token's decode split by Matryoshka group: parts[g, b] = sum of v * W_dec[f] over token b's
// entries in group g. On a shard of the latents these partial decodes are what crosses devices
// (summed over the shards) before the loss and gradients (L2Grads with per-prefix targets).
ffi::Error DecodeGroupsImpl(ffi::ThreadPool pool, F32Array w_dec, S32Array row_ptr, S32Array lat,
                            F32Array val, Out<F32Array> parts, ffi::Span<const int64_t> ends) {
  const int64_t F = w_dec.dimensions()[0], d = w_dec.dimensions()[1];
  const int64_t B = row_ptr.element_count() - 1;
  const int G = static_cast<int>(ends.size());
  if (auto err = CheckEnds(ends, F); err.failure()) return err;
  if (parts->element_count() != static_cast<size_t>(G * B * d))
    return ffi::Error::InvalidArgument("parts must be [G, B, d]");
  const int32_t* rp = row_ptr.typed_data();
  const int32_t* lp = lat.typed_data();
  if (auto err = CheckEntries(rp, lp, B, F, lat.element_count()); err.failure()) return err;
  const float* vp = val.typed_data();
  const float* W = w_dec.typed_data();
  float* P = parts->typed_data();
  const int64_t* en = ends.begin();
  ParallelFor(pool, B, 8, [&](int64_t t0, int64_t t1) {
    for (int64_t b = t0; b < t1; ++b) {
      for (int g = 0; g < G; ++g) std::fill(P + (g * B + b) * d, P + (g * B + b + 1) * d, 0.f);
      for (int64_t e = rp[b]; e < rp[b + 1]; ++e) {
        if (e + 1 < rp[b + 1]) {
          const float* w1 = W + static_cast<int64_t>(lp[e + 1]) * d;
          for (int64_t q = 0; q < d; q += 16) __builtin_prefetch(w1 + q);
        }
        Axpy(vp[e], W + static_cast<int64_t>(lp[e]) * d, P + (GroupOf(lp[e], en, G) * B + b) * d,
             d);
      }
    }
  });
  return ffi::Error::Success();
}

// ------------------------------------------------------------------------------------------------
// The optimizer step for the two [F, d] / [d, F] weight matrices, in place (outputs alias inputs):
// XLA:CPU runs optax's clip + Adam + decoder renormalisation as several passes that each stream
// the weights, gradients and moments; here it is one pass per matrix, plus one for the decoder's
// gradient projection. Same maths and order of operations as optax (tests compare).
// ------------------------------------------------------------------------------------------------

// Each decoder row's gradient minus its component along the row (unit = W / (|W| + 1e-6)), and
// the squared norm of the result per row (for the global gradient norm).
ffi::Error ProjectRowsImpl(ffi::ThreadPool pool, F32Array w, F32Array g, Out<F32Array> g_out,
                           Out<F32Array> sumsq) {
  if (w.dimensions().size() != 2 || g.element_count() != w.element_count())
    return ffi::Error::InvalidArgument("W and its gradient must both be [F, d]");
  const int64_t F = w.dimensions()[0], d = w.dimensions()[1];
  const float* W = w.typed_data();
  const float* G = g.typed_data();
  float* out = g_out->typed_data();
  float* sq = sumsq->typed_data();
  ParallelFor(pool, F, 64, [&](int64_t f0, int64_t f1) {
    for (int64_t f = f0; f < f1; ++f) {
      const float* wr = W + f * d;
      const float* gr = G + f * d;
      float* o = out + f * d;
      const float nrm = std::sqrt(Dot(wr, wr, d)) + 1e-6f;
      float along = 0.f;
#pragma omp simd reduction(+ : along)
      for (int64_t i = 0; i < d; ++i) along += gr[i] * (wr[i] / nrm);
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) o[i] = gr[i] - along * (wr[i] / nrm);
      sq[f] = Dot(o, o, d);
    }
  });
  return ffi::Error::Success();
}

// One step's scalars, in float32 as the update's arithmetic uses them.
struct AdamScalars {
  float lr, b1, b2;
  float c1, c2;           // 1 - b1, 1 - b2
  float eps;
  float bc1, bc2;         // the bias corrections 1 - b1^t, 1 - b2^t
  float norm, max_norm;   // the global gradient norm, and the bound it is clipped to
  bool clip;              // !(norm < max_norm)
};

// One contiguous range of the Adam update (in place when the outputs alias the inputs). h by
// value: its fields stay in registers through the loop.
inline void AdamRange(const float* p, const float* g, const float* m, const float* v, float* po,
                      float* mo, float* vo, int64_t n, const AdamScalars h) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i];
    const float gc = h.clip ? (gi / h.norm) * h.max_norm : gi;
    const float mi = h.c1 * gc + h.b1 * m[i];
    const float vi = h.c2 * (gc * gc) + h.b2 * v[i];
    mo[i] = mi;
    vo[i] = vi;
    po[i] = p[i] + (-h.lr) * ((mi / h.bc1) / (std::sqrt(vi / h.bc2) + h.eps));
  }
}

// optax's order: g <- g if norm < max_norm else (g / norm) * max_norm; m <- (1 - b1) g + b1 m;
// v <- (1 - b2) g^2 + b2 v; p <- p + (-lr) * ((m / bc1) / (sqrt(v / bc2) + eps)). With
// unit_rows, p is [F, d] and each updated row is divided by (|row| + float epsilon). apply false
// leaves everything as it was (a non-finite step).
//
// b1, b2, eps and max_norm are the step config's Python floats, passed as f64 attributes so that
// 1 - b is computed in double, as optax's Python arithmetic does, before rounding to float32.
// lr, bc1, bc2, grad_norm and apply change from step to step (traced): rank-0 buffers.
ffi::Error AdamImpl(ffi::ThreadPool pool, F32Array p, F32Array g, F32Array m, F32Array v,
                    F32Scalar lr, F32Scalar bc1, F32Scalar bc2, F32Scalar grad_norm,
                    BoolScalar apply, Out<F32Array> p_out, Out<F32Array> m_out,
                    Out<F32Array> v_out, double b1, double b2, double eps, double max_norm,
                    int64_t unit_rows) {
  const size_t n = p.element_count();
  if (g.element_count() != n || m.element_count() != n || v.element_count() != n)
    return ffi::Error::InvalidArgument("adam needs p, g, m and v of one size");
  AdamScalars h;
  h.lr = *lr.typed_data();
  h.b1 = static_cast<float>(b1);
  h.b2 = static_cast<float>(b2);
  h.c1 = static_cast<float>(1.0 - b1);
  h.c2 = static_cast<float>(1.0 - b2);
  h.eps = static_cast<float>(eps);
  h.bc1 = *bc1.typed_data();
  h.bc2 = *bc2.typed_data();
  h.norm = *grad_norm.typed_data();
  h.max_norm = static_cast<float>(max_norm);
  h.clip = !(h.norm < h.max_norm);
  const int64_t d = unit_rows ? p.dimensions().back() : 1024;
  const int64_t rows = static_cast<int64_t>(n) / d;   // unit_rows: rows; else chunks of 1024
  const float* P = p.typed_data();
  const float* Gp = g.typed_data();
  const float* M = m.typed_data();
  const float* V = v.typed_data();
  float* Po = p_out->typed_data();
  float* Mo = m_out->typed_data();
  float* Vo = v_out->typed_data();
  if (!*apply.typed_data()) {   // not applied: outputs are the inputs (aliased, or copied if not)
    if (Po != P) std::memcpy(Po, P, n * sizeof(float));
    if (Mo != M) std::memcpy(Mo, M, n * sizeof(float));
    if (Vo != V) std::memcpy(Vo, V, n * sizeof(float));
    return ffi::Error::Success();
  }
  ParallelFor(pool, rows + (static_cast<int64_t>(n) % d != 0), 32, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i0 = r * d, i1 = std::min<int64_t>(static_cast<int64_t>(n), i0 + d);
      AdamRange(P + i0, Gp + i0, M + i0, V + i0, Po + i0, Mo + i0, Vo + i0, i1 - i0, h);
      if (unit_rows) {
        float* row = Po + i0;
        const float nrm = std::sqrt(Dot(row, row, d)) + std::numeric_limits<float>::epsilon();
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) row[i] = row[i] / nrm;
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

// The bindings: arguments, results and attributes in the order of the implementations'
// parameters. Attributes are decoded by name.

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsaeSelect, SelectImpl,
                              BindOnPool()
                                  .Arg<F32Array>()    // z [B, F]
                                  .Arg<F32Array>()    // c [F]
                                  .Ret<S32Array>()    // row_ptr [B + 1]
                                  .Ret<S32Array>()    // lat [cap]
                                  .Ret<F32Array>()    // val [cap]
                                  .Ret<F32Scalar>()   // tau
                                  .Ret<S32Scalar>()   // ties_dropped
                                  .Ret<S32Scalar>()   // path
                                  .Ret<S32Scalar>()   // collected
                                  .Attr<int64_t>("budget"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsaeAuxSelect, AuxSelectImpl,
                              BindOnPool()
                                  .Arg<F32Array>()   // z [B, F]
                                  .Arg<F32Array>()   // c [F]
                                  .Arg<S32Array>()   // dead [F]
                                  .Ret<S32Array>()   // row_ptr [B + 1]
                                  .Ret<S32Array>()   // lat [B * k_aux]
                                  .Ret<F32Array>()   // val [B * k_aux]
                                  .Attr<int64_t>("k_aux"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsaeL2Grads, L2GradsImpl,
                              BindOnPool()
                                  .Arg<F32Array>()   // target [B, d] or [G, B, d]
                                  .Arg<F32Array>()   // xc = x - b_dec [B, d]
                                  .Arg<F32Array>()   // W_dec [F, d]
                                  .Arg<S32Array>()   // row_ptr [B + 1]
                                  .Arg<S32Array>()   // lat [cap]
                                  .Arg<F32Array>()   // val [cap]
                                  .Arg<F32Array>()   // coef [G]
                                  .Ret<F32Array>()   // resid [B, d]
                                  .Ret<F32Array>()   // sq [B, G]
                                  .Ret<F32Array>()   // sum_b R_0[b] [d]
                                  .Ret<F32Array>()   // dW_dec [F, d]
                                  .Ret<F32Array>()   // dW_enc [d, F]
                                  .Ret<F32Array>()   // db_enc [F]
                                  .Attr<ffi::Span<const int64_t>>("group_ends"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsaeDecodeGroups, DecodeGroupsImpl,
                              BindOnPool()
                                  .Arg<F32Array>()   // W_dec [F, d]
                                  .Arg<S32Array>()   // row_ptr [B + 1]
                                  .Arg<S32Array>()   // lat [cap]
                                  .Arg<F32Array>()   // val [cap]
                                  .Ret<F32Array>()   // parts [G, B, d]
                                  .Attr<ffi::Span<const int64_t>>("group_ends"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsaeProjectRows, ProjectRowsImpl,
                              BindOnPool()
                                  .Arg<F32Array>()    // W_dec [F, d]
                                  .Arg<F32Array>()    // its gradient [F, d]
                                  .Ret<F32Array>()    // projected gradient (aliased)
                                  .Ret<F32Array>());  // per-row squared norm [F]

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsaeAdam, AdamImpl,
                              BindOnPool()
                                  .Arg<F32Array>()     // param
                                  .Arg<F32Array>()     // gradient
                                  .Arg<F32Array>()     // first moment
                                  .Arg<F32Array>()     // second moment
                                  .Arg<F32Scalar>()    // lr
                                  .Arg<F32Scalar>()    // bc1 = 1 - b1^t
                                  .Arg<F32Scalar>()    // bc2 = 1 - b2^t
                                  .Arg<F32Scalar>()    // grad_norm
                                  .Arg<BoolScalar>()   // apply
                                  .Ret<F32Array>()     // param (aliased)
                                  .Ret<F32Array>()     // first moment (aliased)
                                  .Ret<F32Array>()     // second moment (aliased)
                                  .Attr<double>("b1")
                                  .Attr<double>("b2")
                                  .Attr<double>("eps")
                                  .Attr<double>("max_norm")
                                  .Attr<int64_t>("unit_rows"));
