"""Fused CPU kernels for DropIT's selection and ActivationMemory's ReLU / BatchNorm (C++, built on
first use).

DropIT's saved input is stored as the kept values in flat order plus a 1-bit-per-element
bitmap. In PyTorch ops that takes ``abs``, ``nan_to_num``, ``gt``, ``count_nonzero``,
``x[mask]`` (``nonzero`` + gather) and the bit packing in forward, ``masked_scatter_`` in
backward: about 3.5 ns per element on 2 cores, 150 ms of a ResNet-50 step (8x112x112) whose
dense step takes 430 ms. Here the same result is two passes per direction:

* ``sample_cutoff(x, index, dropped)``: the cut-off, from the sample ``|x[index]|``
  (:func:`sparsify_fx.passes.dropit._sample_index`) by a radix select on the float bits, in one call;
* ``threshold_bits(x, cutoff)``: the bitmap of ``!(|x| <= cutoff)`` (NaN is kept, as the
  PyTorch path keeps it) and the number of kept elements in each chunk of 65536;
* ``compact(x, bits, counts, capacity)``: the kept values in flat order, zero padded;
* ``expand(values, bits, n)``: the dense tensor back, zeros where a bit is clear.

ActivationMemory's: ``to_bf16`` (the saturating bf16 copy of any tensor whose last dim is
contiguous, in one pass instead of a cast and a check of its result's largest magnitude),
``normalize_rows_bf16`` (LayerNorm's normalised input as that bf16 copy, one pass instead of
four), ``relu_bits`` (the activation and its 1-bit mask in one pass; ``relu_bits_`` over its
input, for the model's in-place ReLU),
``masked_grad`` (its backward straight from the bits), ``normalize_bf16`` (BatchNorm's
normalised input, saturated to bf16, in one pass instead of five) and ``bn_backward_bf16``
(BatchNorm's backward read straight from that bf16 copy: two passes instead of an fp32 upcast,
a mean and the dense backward's three); ``affine_clamp`` (the ReLU output a fused
BatchNorm -> ReLU -> Conv rebuilds from its fp32 input or bf16 ``x_hat``: one pass instead of
two to four).

Chunks run in parallel through ``at::parallel_for``; each chunk's write offset is the prefix
sum of the counts before it. The bitmap layout is :func:`sparsify_fx.passes.kernels.bitpack.pack_bits`'s, so either
side can be the PyTorch path.

The extension is compiled with ``torch.utils.cpp_extension.load_inline`` the first time it is
asked for (about a minute; then cached on disk under ``TORCH_EXTENSIONS_DIR``). Where that
fails (no C++ compiler) or ``SPARSIFY_FX_CPU_KERNELS=0`` is set, :func:`load` returns
``None`` and DropIT runs its PyTorch path: same results, slower.

On torch releases whose ``cpp_extension`` still locks builds with a lock file's existence (not
an OS-level lock, as 2.15 has), a build killed midway leaves ``lock`` in the build folder and
the next process waits on it: delete
``~/.cache/torch_extensions/*/sparsify_fx_cpu_kernels_*/lock``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import warnings

import torch

from sparsify_fx.passes.kernels import sync
from sparsify_fx.passes.kernels.cache import eager

__all__ = ["load", "unavailable_reason", "for_tensors", "for_strided", "DTYPES"]

#: value dtypes the kernels take
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>
#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {
constexpr int64_t kChunk = 1 << 16;  // elements per task; a multiple of kBatch
constexpr int64_t kBatch = 512;       // elements flagged per inner loop
// (f0 + f1<<8 + ... + f7<<56) * kPackMagic puts flag k at bit 56 + k (passes/bitpack.py)
constexpr uint64_t kPackMagic = 0x0102040810204080ULL;

int64_t n_chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }

// bits i..i+63 of the bitmap (i a multiple of 64); bytes past its end read as zero
inline uint64_t word_at(const uint8_t* b, int64_t nbytes, int64_t i) {
  uint64_t w = 0;
  const int64_t j = i >> 3;
  std::memcpy(&w, b + j, static_cast<size_t>(std::min<int64_t>(8, nbytes - j)));
  return w;
}

std::vector<int64_t> offsets_of(const at::Tensor& counts) {
  const int64_t* c = counts.const_data_ptr<int64_t>();
  std::vector<int64_t> off(counts.numel() + 1, 0);
  for (int64_t i = 0; i < counts.numel(); ++i) off[i + 1] = off[i] + c[i];
  return off;
}

// one full batch of threshold_bits through AVX2 (8 compares -> one bitmap byte by movemask);
// false where it does not apply (other dtypes, no AVX2), and the portable loop runs
template <typename T, typename U>
inline bool threshold_batch(const T*, U, uint8_t*, int64_t&) { return false; }
#ifdef __AVX2__
inline bool threshold_batch(const float* p, float cut, uint8_t* b, int64_t& count) {
  const __m256 cut8 = _mm256_set1_ps(cut);
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (int64_t k = 0; k < kBatch; k += 8) {
    const __m256 a = _mm256_and_ps(_mm256_loadu_ps(p + k), magnitude);
    // not (|x| <= cut), unordered true: NaN is kept
    const uint8_t byte = static_cast<uint8_t>(_mm256_movemask_ps(_mm256_cmp_ps(a, cut8, _CMP_NLE_UQ)));
    b[k >> 3] = byte;
    count += __builtin_popcount(byte);
  }
  return true;
}
#endif
}  // namespace

std::vector<at::Tensor> threshold_bits(const at::Tensor& x, double cutoff) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "threshold_bits: contiguous CPU tensor");
  const int64_t n = x.numel();
  auto bits = at::empty({(n + 7) / 8}, x.options().dtype(at::kByte));
  auto counts = at::empty({n_chunks(n)}, x.options().dtype(at::kLong));
  uint8_t* b = bits.data_ptr<uint8_t>();
  int64_t* c = counts.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "threshold_bits", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* p = x.const_data_ptr<scalar_t>();
    const opmath_t cut = static_cast<opmath_t>(cutoff);
    at::parallel_for(0, n_chunks(n), 1, [&](int64_t begin, int64_t end) {
      alignas(64) uint8_t keep[kBatch];
      for (int64_t ch = begin; ch < end; ++ch) {
        const int64_t lo = ch * kChunk, hi = std::min(n, lo + kChunk);
        int64_t count = 0;
        for (int64_t i = lo; i < hi; i += kBatch) {
          const int64_t m = std::min<int64_t>(kBatch, hi - i);
          if (m == kBatch && threshold_batch(p + i, cut, b + (i >> 3), count)) continue;
          // one flag byte per element (a loop the compiler vectorises), then 8 flags -> 1 byte
          for (int64_t k = 0; k < m; ++k) {
            keep[k] = !(std::abs(static_cast<opmath_t>(p[i + k])) <= cut);  // NaN: kept
          }
          for (int64_t k = m; k < kBatch; ++k) keep[k] = 0;
          for (int64_t w = 0; w < (m + 7) / 8; ++w) {
            uint64_t word;
            std::memcpy(&word, keep + 8 * w, 8);
            const uint8_t byte = static_cast<uint8_t>((word * kPackMagic) >> 56);
            b[(i >> 3) + w] = byte;
            count += __builtin_popcount(byte);
          }
        }
        c[ch] = count;
      }
    });
  });
  return {bits, counts};
}

at::Tensor compact(const at::Tensor& x, const at::Tensor& bits, const at::Tensor& counts, int64_t capacity) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "compact: contiguous CPU tensor");
  const int64_t n = x.numel();
  TORCH_CHECK(bits.numel() == (n + 7) / 8 && counts.numel() == n_chunks(n), "compact: bitmap or counts do not match x");
  const std::vector<int64_t> off = offsets_of(counts);
  TORCH_CHECK(off.back() <= capacity, "compact: ", off.back(), " kept elements exceed the capacity ", capacity);
  auto values = at::empty({capacity}, x.options());
  const uint8_t* b = bits.const_data_ptr<uint8_t>();
  const int64_t nbytes = bits.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "compact", [&] {
    const scalar_t* p = x.const_data_ptr<scalar_t>();
    scalar_t* v = values.data_ptr<scalar_t>();
    at::parallel_for(0, n_chunks(n), 1, [&](int64_t begin, int64_t end) {
      for (int64_t ch = begin; ch < end; ++ch) {
        const int64_t lo = ch * kChunk, hi = std::min(n, lo + kChunk);
        int64_t o = off[ch];
        // a word of 64 flags at a time: one unpredictable loop exit per 64 elements, not per 8
        for (int64_t i = lo; i < hi; i += 64) {
          uint64_t w = word_at(b, nbytes, i);
          while (w) {
            v[o++] = p[i + __builtin_ctzll(w)];
            w &= w - 1;
          }
        }
      }
    });
    std::fill(v + off.back(), v + capacity, scalar_t(0));
  });
  return values;
}

at::Tensor expand(const at::Tensor& values, const at::Tensor& bits, int64_t n) {
  TORCH_CHECK(values.device().is_cpu() && values.is_contiguous() && bits.is_contiguous(), "expand: contiguous CPU tensors");
  TORCH_CHECK(bits.numel() == (n + 7) / 8, "expand: bitmap of ", bits.numel(), " bytes for ", n, " elements");
  const uint8_t* b = bits.const_data_ptr<uint8_t>();
  const int64_t nbytes = bits.numel();
  auto counts = at::empty({n_chunks(n)}, bits.options().dtype(at::kLong));
  int64_t* c = counts.data_ptr<int64_t>();
  at::parallel_for(0, n_chunks(n), 1, [&](int64_t begin, int64_t end) {
    for (int64_t ch = begin; ch < end; ++ch) {
      const int64_t lo = ch * kChunk, hi = std::min(n, lo + kChunk);
      int64_t count = 0;
      for (int64_t i = lo; i < hi; i += 64) count += __builtin_popcountll(word_at(b, nbytes, i));
      c[ch] = count;
    }
  });
  const std::vector<int64_t> off = offsets_of(counts);
  TORCH_CHECK(off.back() <= values.numel(), "expand: the bitmap sets ", off.back(), " elements, values holds ", values.numel());
  auto out = at::empty({n}, values.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values.scalar_type(), "expand", [&] {
    const scalar_t* v = values.const_data_ptr<scalar_t>();
    scalar_t* q = out.data_ptr<scalar_t>();
    at::parallel_for(0, n_chunks(n), 1, [&](int64_t begin, int64_t end) {
      for (int64_t ch = begin; ch < end; ++ch) {
        const int64_t lo = ch * kChunk, hi = std::min(n, lo + kChunk);
        int64_t o = off[ch];
        // the chunk is zeroed while it is in cache (all-zero bits are 0.0 in every floating
        // dtype), then only the kept elements are written, a word at a time
        std::memset(q + lo, 0, static_cast<size_t>(hi - lo) * sizeof(scalar_t));
        for (int64_t i = lo; i < hi; i += 64) {
          uint64_t w = word_at(b, nbytes, i);
          while (w) {
            q[i + __builtin_ctzll(w)] = v[o++];
            w &= w - 1;
          }
        }
      }
    });
  });
  return out;
}

namespace {
// The k-th smallest (0-based) of non-negative floats (+inf allowed; no NaN): their bit patterns
// order as the values do, so a radix select on 11 + 11 + 10 bits finds it exactly, each round
// over the shrinking set of candidates left in the chosen bin (a few times faster than
// std::nth_element on 16384 samples).
float select_nonnegative(const std::vector<float>& values, int64_t k) {
  std::vector<uint32_t> cur(values.size()), next;
  std::memcpy(cur.data(), values.data(), values.size() * sizeof(float));
  int shift = 32;
  for (const int width : {11, 11, 10}) {
    shift -= width;
    const uint32_t mask = (1u << width) - 1;
    std::vector<int64_t> hist(static_cast<size_t>(mask) + 1, 0);
    for (const uint32_t u : cur) ++hist[(u >> shift) & mask];
    uint32_t bin = 0;
    while (k >= hist[bin]) k -= hist[bin++];
    next.clear();
    for (const uint32_t u : cur) {
      if (((u >> shift) & mask) == bin) next.push_back(u);
    }
    cur.swap(next);
  }
  float out;  // every candidate left has the same 32 bits
  std::memcpy(&out, cur.data(), sizeof(float));
  return out;
}

double select_nonnegative(std::vector<double>& values, int64_t k) {  // fp64 inputs: rare
  std::nth_element(values.begin(), values.begin() + k, values.end());
  return values[k];
}
}  // namespace

// The cut-off DropIT keeps above, estimated on the sample x[index] of |x| (index:
// dropit._sample_index's, cached there): the `dropped`-th smallest sample (1-based; NaN ranks
// as inf), at most the dtype's largest finite value. dropit._cutoff's result on the same
// sample, without the gathered copy, abs, nan_to_num and kthvalue as separate ops.
double sample_cutoff(const at::Tensor& x, const at::Tensor& index, int64_t dropped) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "sample_cutoff: contiguous CPU tensor");
  TORCH_CHECK(index.is_contiguous() && index.scalar_type() == at::kLong, "sample_cutoff: contiguous int64 index");
  const int64_t m = index.numel(), n = x.numel();
  TORCH_CHECK(dropped >= 1 && dropped <= m, "sample_cutoff: dropped ", dropped, " of ", m, " samples");
  const int64_t* at = index.const_data_ptr<int64_t>();
  double cut = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "sample_cutoff", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* p = x.const_data_ptr<scalar_t>();
    std::vector<opmath_t> sample(static_cast<size_t>(m));
    for (int64_t i = 0; i < m; ++i) {
      TORCH_CHECK(at[i] >= 0 && at[i] < n, "sample_cutoff: index ", at[i], " out of ", n);
      const opmath_t v = std::abs(static_cast<opmath_t>(p[at[i]]));
      sample[i] = std::isnan(v) ? std::numeric_limits<opmath_t>::infinity() : v;
    }
    const opmath_t kth = select_nonnegative(sample, dropped - 1);
    const opmath_t largest = static_cast<opmath_t>(std::numeric_limits<scalar_t>::max());
    cut = static_cast<double>(std::min(kth, largest));
  });
  return cut;
}

// ---------------------------------------------------------------- ActivationMemory
// fp32 only (the common case; other dtypes take the PyTorch path). Restrict-qualified
// pointers and branch-free bodies, so the compiler vectorises each inner loop.

namespace {
inline uint32_t bits_of(float v) { uint32_t u; std::memcpy(&u, &v, 4); return u; }
inline float float_of(uint32_t u) { float v; std::memcpy(&v, &u, 4); return v; }

// byte -> its 8 bits as 32-bit lane masks (all ones where set), bit k in lane k
struct LaneMasks {
  uint32_t set[256][8];
  LaneMasks() {
    for (int byte = 0; byte < 256; ++byte)
      for (int k = 0; k < 8; ++k) set[byte][k] = ((byte >> k) & 1) ? 0xFFFFFFFFu : 0u;
  }
};
const LaneMasks kLaneMasks;

void check_fp32(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == at::kFloat, what, ": contiguous fp32 CPU tensor");
}
}  // namespace

// ReLU (slope 0): out = relu(x), bit = out <= 0 (where threshold_backward blocks the gradient;
// NaN passes). LeakyReLU: out = leaky_relu(x), bit = x > 0 (where its slope is 1).
namespace {
// out may be x itself (relu_bits_): each element is read before its own slot is written
at::Tensor relu_bits_into(const at::Tensor& x, at::Tensor& out, double negative_slope) {
  const int64_t n = x.numel();
  auto bits = at::empty({(n + 7) / 8}, x.options().dtype(at::kByte));
  uint8_t* __restrict__ b = bits.data_ptr<uint8_t>();
  const float* p = x.const_data_ptr<float>();
  float* q = out.data_ptr<float>();
  const float slope = static_cast<float>(negative_slope);
  const bool relu = negative_slope == 0.0;
  at::parallel_for(0, n_chunks(n), 1, [&](int64_t begin, int64_t end) {
    alignas(64) uint8_t flag[kBatch];
    for (int64_t ch = begin; ch < end; ++ch) {
      const int64_t lo = ch * kChunk, hi = std::min(n, lo + kChunk);
      for (int64_t i = lo; i < hi; i += kBatch) {
        const int64_t m = std::min<int64_t>(kBatch, hi - i);
        const float* pi = p + i;
        float* qi = q + i;
        // selects as bit masks: the compiler keeps ternaries on floats as branches (NaN)
#ifdef __AVX2__
        if (relu && m == kBatch) {  // 8 compares -> one bitmap byte (movemask), no flag bytes
          const __m256 zero = _mm256_setzero_ps();
          for (int64_t k = 0; k < kBatch; k += 8) {
            const __m256 v = _mm256_loadu_ps(pi + k);
            _mm256_storeu_ps(qi + k, _mm256_andnot_ps(_mm256_cmp_ps(v, zero, _CMP_LT_OQ), v));
            b[(i + k) >> 3] = static_cast<uint8_t>(_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_LE_OQ)));
          }
          continue;
        }
#endif
        if (relu) {
          for (int64_t k = 0; k < m; ++k) {
            const float v = pi[k];
            const uint32_t negative = 0u - static_cast<uint32_t>(v < 0.0f);
            qi[k] = float_of(bits_of(v) & ~negative);  // 0 below zero; NaN stays NaN
            flag[k] = v <= 0.0f;                       // relu(v) <= 0
          }
        } else {
          const uint32_t one = bits_of(1.0f), low = bits_of(slope);
          for (int64_t k = 0; k < m; ++k) {
            const float v = pi[k];
            const uint32_t positive = 0u - static_cast<uint32_t>(v > 0.0f);
            qi[k] = v * float_of((one & positive) | (low & ~positive));
            flag[k] = v > 0.0f;
          }
        }
        for (int64_t k = m; k < kBatch; ++k) flag[k] = 0;
        for (int64_t w = 0; w < (m + 7) / 8; ++w) {
          uint64_t word;
          std::memcpy(&word, flag + 8 * w, 8);
          b[(i >> 3) + w] = static_cast<uint8_t>((word * kPackMagic) >> 56);
        }
      }
    }
  });
  return bits;
}
}  // namespace

std::vector<at::Tensor> relu_bits(const at::Tensor& x, double negative_slope) {
  check_fp32(x, "relu_bits");
  auto out = at::empty_like(x);
  auto bits = relu_bits_into(x, out, negative_slope);
  return {out, bits};
}

// the same, writing the activation over x (an in-place ReLU of the model); returns the bits
at::Tensor relu_bits_(at::Tensor& x, double negative_slope) {
  check_fp32(x, "relu_bits_");
  return relu_bits_into(x, x, negative_slope);
}

// grad where the bit is clear and 0 where set (ReLU: exact zeros, NaN gradients included, as
// threshold_backward gives), or grad * (bit ? 1 : slope) (LeakyReLU, slope != 0)
at::Tensor masked_grad(const at::Tensor& grad, const at::Tensor& bits, double negative_slope) {
  check_fp32(grad, "masked_grad");
  TORCH_CHECK(bits.is_contiguous() && bits.scalar_type() == at::kByte, "masked_grad: contiguous uint8 bitmap");
  const int64_t n = grad.numel();
  TORCH_CHECK(bits.numel() == (n + 7) / 8, "masked_grad: bitmap of ", bits.numel(), " bytes for ", n, " elements");
  auto out = at::empty_like(grad);
  const uint8_t* __restrict__ b = bits.const_data_ptr<uint8_t>();
  const float* __restrict__ g = grad.const_data_ptr<float>();
  float* __restrict__ q = out.data_ptr<float>();
  const bool relu = negative_slope == 0.0;
  const float slope = static_cast<float>(negative_slope);
  at::parallel_for(0, n_chunks(n), 1, [&](int64_t begin, int64_t end) {
    alignas(64) uint32_t keep[kBatch];
    for (int64_t ch = begin; ch < end; ++ch) {
      const int64_t lo = ch * kChunk, hi = std::min(n, lo + kChunk);
      for (int64_t i = lo; i < hi; i += kBatch) {
        const int64_t m = std::min<int64_t>(kBatch, hi - i);
        const uint8_t* __restrict__ bi = b + (i >> 3);
        const float* __restrict__ gi = g + i;
        float* __restrict__ qi = q + i;
#ifdef __AVX2__
        if (relu && m == kBatch) {  // each byte broadcast and tested against lane k's bit
          const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
          for (int64_t k = 0; k < kBatch; k += 8) {
            const __m256i set = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(bi[k >> 3]), lane_bit), lane_bit);
            _mm256_storeu_ps(qi + k, _mm256_andnot_ps(_mm256_castsi256_ps(set), _mm256_loadu_ps(gi + k)));
          }
          continue;
        }
#endif
        // each bitmap byte -> 8 lane masks from a table, then one vectorised select pass
        for (int64_t j = 0; j < (m + 7) / 8; ++j) std::memcpy(keep + 8 * j, kLaneMasks.set[bi[j]], 32);
        if (relu) {
          // the gradient passes where the bit is clear: an AND gives it or +0.0, never NaN
          for (int64_t k = 0; k < m; ++k) qi[k] = float_of(bits_of(gi[k]) & ~keep[k]);
        } else {
          const uint32_t one = bits_of(1.0f), low = bits_of(slope);
          for (int64_t k = 0; k < m; ++k) qi[k] = gi[k] * float_of((one & keep[k]) | (low & ~keep[k]));
        }
      }
    }
  });
  return out;
}

namespace {
// fp32 -> bf16 by actmem_ops._to_bf16's rules: finite values saturate at bf16's largest,
// inf / NaN become NaN, rounding is to nearest even
inline uint16_t saturated_bf16(float v) {
  const float big = 3.3895313892515355e38f;  // bf16's largest finite value
  const uint32_t u = bits_of(v);
  const bool finite = (u & 0x7F800000u) != 0x7F800000u;
  const uint32_t c32 = bits_of(std::min(std::max(v, -big), big));
  const uint32_t rounded = (c32 + 0x7FFFu + ((c32 >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(finite ? rounded : 0x7FC0u);
}

// (x - mean[k]) * scale[k] as bf16 by saturated_bf16 (actmem_ops._to_bf16's rules, bit for bit)
// over a contiguous fp32 x of `planes` runs of `inner` elements, run p reading statistic
// k = p % period: BatchNorm's [N, C, ...] planes (period C) and LayerNorm's rows (period rows)
at::Tensor normalize_planes_bf16(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
                                 int64_t planes, int64_t inner, int64_t period) {
  auto m = mean.contiguous(), s = scale.contiguous();
  auto out = at::empty(x.sizes(), x.options().dtype(at::kBFloat16));
  const float* p = x.const_data_ptr<float>();
  const float* mp = m.const_data_ptr<float>();
  const float* sp = s.const_data_ptr<float>();
  uint16_t* q = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const int64_t grain = std::max<int64_t>(1, kChunk / std::max<int64_t>(inner, 1));
  at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t k = plane % period;
      const float mu = mp[k], is = sp[k];
      const float* __restrict__ xp = p + plane * inner;
      uint16_t* __restrict__ qp = q + plane * inner;
      for (int64_t i = 0; i < inner; ++i) qp[i] = saturated_bf16((xp[i] - mu) * is);
    }
  });
  return out;
}
}  // namespace
// BatchNorm's normalised input (x - mean[c]) * invstd[c] of an fp32 [N, C, ...] tensor, stored
// as bf16 in one pass by saturated_bf16
at::Tensor normalize_bf16(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd) {
  check_fp32(x, "normalize_bf16");
  TORCH_CHECK(x.dim() >= 2, "normalize_bf16: [N, C, ...]");
  TORCH_CHECK(mean.scalar_type() == at::kFloat && invstd.scalar_type() == at::kFloat, "normalize_bf16: fp32 statistics");
  const int64_t batch = x.size(0), channels = x.size(1);
  const int64_t inner = channels ? x.numel() / (batch * channels) : 0;
  return normalize_planes_bf16(x, mean, invstd, batch * channels, inner, std::max<int64_t>(channels, 1));
}

// actmem_ops._to_bf16 in one pass (the PyTorch path: a cast, then an abs and a max over the
// result to find values the cast turned to inf). Any layout whose last dim has stride 1
// (attention's q, k, v are strided views of one projection): the result has the layout
// x.to(torch.bfloat16) gives, and the rows (all dims but the last) run in parallel.
at::Tensor to_bf16(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() >= 1 && x.stride(-1) == 1,
              "to_bf16: an fp32 CPU tensor with a unit last stride");
  auto out = at::empty_like(x, x.options().dtype(at::kBFloat16));
  const int64_t dims = x.dim(), width = x.size(-1);
  const int64_t rows = width ? x.numel() / width : 0;
  if (rows == 0) return out;
  TORCH_CHECK(out.stride(-1) == 1, "to_bf16: unexpected output layout");
  const float* p = x.const_data_ptr<float>();
  uint16_t* q = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const auto sizes = x.sizes().vec();
  const auto xs = x.strides().vec(), os = out.strides().vec();
  const int64_t grain = std::max<int64_t>(1, kChunk / std::max<int64_t>(width, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    // the first row's index over the leading dims, then stepped like an odometer
    std::vector<int64_t> index(std::max<int64_t>(dims - 1, 1), 0);
    int64_t rest = begin, xo = 0, oo = 0;
    for (int64_t d = dims - 2; d >= 0; --d) {
      index[d] = rest % sizes[d];
      rest /= sizes[d];
      xo += index[d] * xs[d];
      oo += index[d] * os[d];
    }
    for (int64_t row = begin; row < end; ++row) {
      const float* __restrict__ xp = p + xo;
      uint16_t* __restrict__ qp = q + oo;
      for (int64_t i = 0; i < width; ++i) qp[i] = saturated_bf16(xp[i]);
      for (int64_t d = dims - 2; d >= 0; --d) {
        xo += xs[d];
        oo += os[d];
        if (++index[d] < sizes[d]) break;
        xo -= sizes[d] * xs[d];
        oo -= sizes[d] * os[d];
        index[d] = 0;
      }
    }
  });
  return out;
}
// LayerNorm's normalised input (x - mean[row]) * rstd[row] as bf16 in one pass (the PyTorch
// path: a subtraction, a multiplication, the cast and its check), by to_bf16's rules; x is a
// contiguous [rows, width] (any leading dims), mean / rstd one fp32 value per row
at::Tensor normalize_rows_bf16(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd, int64_t width) {
  check_fp32(x, "normalize_rows_bf16");
  TORCH_CHECK(width > 0 && x.numel() % width == 0, "normalize_rows_bf16: rows of width elements");
  const int64_t rows = x.numel() / width;
  TORCH_CHECK(mean.scalar_type() == at::kFloat && rstd.scalar_type() == at::kFloat && mean.numel() == rows
              && rstd.numel() == rows, "normalize_rows_bf16: one fp32 mean and rstd per row");
  return normalize_planes_bf16(x, mean, rstd, rows, width, std::max<int64_t>(rows, 1));
}
// The activation a fused BatchNorm -> ReLU -> Conv rebuilds in backward, in one pass:
// min(max(x * alpha[c] + beta[c], 0), upper) over an [N, C, ...] fp32 input x (the BatchNorm's
// input, alpha / beta its folded statistics) or bf16 one (its stored x_hat, alpha / beta its
// weight and bias), as fp32 (the PyTorch path: an upcast, a multiply, an add and a clamp). NaN
// stays NaN (max / min return their first operand when a comparison is false).
at::Tensor affine_clamp(const at::Tensor& x, const at::Tensor& alpha, const at::Tensor& beta, double upper) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() >= 2, "affine_clamp: a contiguous [N, C, ...] CPU tensor");
  const bool half = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(half || x.scalar_type() == at::kFloat, "affine_clamp: fp32 or bf16 input");
  TORCH_CHECK(alpha.scalar_type() == at::kFloat && beta.scalar_type() == at::kFloat, "affine_clamp: fp32 alpha / beta");
  const int64_t batch = x.size(0), channels = x.size(1);
  const int64_t inner = channels ? x.numel() / (batch * channels) : 0;
  auto a = alpha.contiguous(), b = beta.contiguous();
  auto out = at::empty(x.sizes(), x.options().dtype(at::kFloat));
  const float* ap = a.const_data_ptr<float>();
  const float* bp = b.const_data_ptr<float>();
  float* o = out.data_ptr<float>();
  const float hi = static_cast<float>(upper);
  const int64_t grain = std::max<int64_t>(1, kChunk / std::max<int64_t>(inner, 1));
  at::parallel_for(0, batch * channels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t c = plane % channels;
      const float ac = ap[c], bc = bp[c];
      float* __restrict__ op = o + plane * inner;
      if (half) {
        const uint16_t* __restrict__ xp = reinterpret_cast<const uint16_t*>(x.const_data_ptr<at::BFloat16>()) + plane * inner;
        for (int64_t i = 0; i < inner; ++i) {
          const float v = float_of(static_cast<uint32_t>(xp[i]) << 16) * ac + bc;
          op[i] = std::min(std::max(v, 0.0f), hi);
        }
      } else {
        const float* __restrict__ xp = x.const_data_ptr<float>() + plane * inner;
        for (int64_t i = 0; i < inner; ++i) {
          const float v = xp[i] * ac + bc;
          op[i] = std::min(std::max(v, 0.0f), hi);
        }
      }
    }
  });
  return out;
}

// BatchNorm's backward straight from its bf16 normalised input x_hat (fp32 [N, C, ...] gradient):
// native_batch_norm_backward's training formula with input x_hat, save_mean = x_hat's channel
// mean and save_invstd 1 (actmem_ops._bn_backward's PyTorch path), without the fp32
// copy of x_hat: one pass for the channel sums, one for grad_x. Sums are fp32 within blocks of
// 256 (16 lanes), fp64 across them, so the result agrees with the PyTorch path to fp32 rounding, not bits.
std::vector<at::Tensor> bn_backward_bf16(const at::Tensor& grad, const at::Tensor& xhat, const at::Tensor& weight, bool need_x) {
  check_fp32(grad, "bn_backward_bf16");
  check_fp32(weight, "bn_backward_bf16 weight");
  TORCH_CHECK(grad.dim() >= 2, "bn_backward_bf16: [N, C, ...]");
  TORCH_CHECK(xhat.is_contiguous() && xhat.scalar_type() == at::kBFloat16 && xhat.sizes() == grad.sizes(),
              "bn_backward_bf16: x_hat must be a contiguous bf16 tensor of the gradient's shape");
  const int64_t batch = grad.size(0), channels = grad.size(1);
  TORCH_CHECK(weight.numel() == channels, "bn_backward_bf16: ", weight.numel(), " weights for ", channels, " channels");
  const int64_t inner = channels ? grad.numel() / (batch * channels) : 0;
  const double count = static_cast<double>(batch * inner);
  auto grad_w = at::empty({channels}, grad.options());
  auto grad_b = at::empty({channels}, grad.options());
  std::vector<float> centre(channels), scale(channels), shift(channels);
  const float* g = grad.const_data_ptr<float>();
  const uint16_t* xq = reinterpret_cast<const uint16_t*>(xhat.const_data_ptr<at::BFloat16>());
  const float* w = weight.const_data_ptr<float>();
  float* gw = grad_w.data_ptr<float>();
  float* gb = grad_b.data_ptr<float>();
  constexpr int64_t kBlock = 256, kLanes = 16;
  at::parallel_for(0, channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double sg = 0, sgx = 0, sx = 0;
      for (int64_t n = 0; n < batch; ++n) {
        const float* __restrict__ gp = g + (n * channels + c) * inner;
        const uint16_t* __restrict__ xp = xq + (n * channels + c) * inner;
        for (int64_t i = 0; i < inner; i += kBlock) {
          const int64_t m = std::min(kBlock, inner - i);
          // kLanes independent sums: a loop the compiler vectorises without reassociating
          float bg[kLanes] = {}, bgx[kLanes] = {}, bx[kLanes] = {};
          int64_t k = 0;
          for (; k + kLanes <= m; k += kLanes) {
            for (int64_t j = 0; j < kLanes; ++j) {
              const float x = float_of(static_cast<uint32_t>(xp[i + k + j]) << 16);
              const float gv = gp[i + k + j];
              bg[j] += gv;
              bgx[j] += gv * x;
              bx[j] += x;
            }
          }
          for (; k < m; ++k) {
            const float x = float_of(static_cast<uint32_t>(xp[i + k]) << 16);
            bg[0] += gp[i + k];
            bgx[0] += gp[i + k] * x;
            bx[0] += x;
          }
          for (int64_t j = 0; j < kLanes; ++j) { sg += bg[j]; sgx += bgx[j]; sx += bx[j]; }
        }
      }
      const double mu = count > 0 ? sx / count : 0.0;
      const double dot = sgx - mu * sg;  // sum(g * (x_hat - mu))
      gw[c] = static_cast<float>(dot);
      gb[c] = static_cast<float>(sg);
      centre[c] = static_cast<float>(mu);
      scale[c] = static_cast<float>(count > 0 ? dot / count : 0.0);
      shift[c] = static_cast<float>(count > 0 ? sg / count : 0.0);
    }
  });
  at::Tensor grad_x;
  if (need_x) {
    grad_x = at::empty_like(grad);
    float* out = grad_x.data_ptr<float>();
    const int64_t grain = std::max<int64_t>(1, kChunk / std::max<int64_t>(inner, 1));
    at::parallel_for(0, batch * channels, grain, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t c = plane % channels;
        const float mu = centre[c], k = scale[c], mg = shift[c], wc = w[c];
        const float* __restrict__ gp = g + plane * inner;
        const uint16_t* __restrict__ xp = xq + plane * inner;
        float* __restrict__ op = out + plane * inner;
        for (int64_t i = 0; i < inner; ++i) {
          const float x = float_of(static_cast<uint32_t>(xp[i]) << 16);
          op[i] = (gp[i] - mg - (x - mu) * k) * wc;
        }
      }
    });
  }
  return {grad_x, grad_w, grad_b};
}

"""

_FUNCTIONS = ["sample_cutoff", "threshold_bits", "compact", "expand", "relu_bits", "relu_bits_", "masked_grad", "normalize_bf16", "bn_backward_bf16",
              "affine_clamp", "to_bf16", "normalize_rows_bf16"]


def _ninja_on_path() -> None:
    """cpp_extension runs ``ninja`` from PATH; the pip package's binary may not be on it."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])


def _cpu_tag() -> str:
    """A short hash of this CPU's model and feature flags (Linux; else the machine name)."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            text += "".join(line for line in f if line.startswith(("flags", "model name")))
    except OSError:
        pass
    return hashlib.sha1(text.encode()).hexdigest()[:10]
_reason: str | None = None


@functools.cache
def load():
    """The compiled kernels module, or ``None`` (then :func:`unavailable_reason` says why)."""
    global _reason
    _reason = None
    if os.environ.get("SPARSIFY_FX_CPU_KERNELS", "1") in ("0", "false", "off"):
        _reason = "disabled by SPARSIFY_FX_CPU_KERNELS=0"
        return None
    try:
        _ninja_on_path()
        # importing cpp_extension logs "No CUDA runtime is found" on CPU-only hosts
        logger = logging.getLogger("torch.utils.cpp_extension")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            from torch.utils.cpp_extension import load_inline
        finally:
            logger.setLevel(level)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # built where it runs, so -march=native is safe; the build is named after this
            # CPU's features, so a cache shared with another kind of machine never loads it
            return load_inline(
                name=f"sparsify_fx_cpu_kernels_{_cpu_tag()}", cpp_sources=[_SOURCE], functions=_FUNCTIONS,
                extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False,
            )
    except Exception as e:  # no compiler, headers or ninja: the PyTorch path runs instead
        _reason = f"the C++ kernels did not build ({type(e).__name__}: {str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''})"
        return None


def unavailable_reason() -> str | None:
    """Why :func:`load` returned ``None`` (after it was called), else ``None``."""
    return _reason


def for_tensors(*tensors: torch.Tensor, bits: torch.Tensor | None = None):
    """The kernels, where they apply to all of ``tensors`` and the bitmap ``bits``: eager
    (never traced or fake) contiguous CPU tensors, ``tensors`` of a dtype in :data:`DTYPES` and
    ``bits`` ``uint8``, on a device where a value read back is free
    (:func:`sparsify_fx.passes.kernels.sync.sync_free`: the kernels read counts back). Else ``None``, and the caller
    runs its PyTorch path, which computes the same bits."""
    if bits is not None and (bits.dtype != torch.uint8 or not _usable(bits)):
        return None
    for t in tensors:
        if t.dtype not in DTYPES or not _usable(t):
            return None
    return load()


def for_strided(t: torch.Tensor):
    """The kernels for ``to_bf16`` on ``t``: as :func:`for_tensors`, but any layout whose last
    dim has stride 1 (a view of a larger tensor), fp32 only; else ``None``."""
    if t.dtype != torch.float32 or t.dim() == 0 or t.stride(-1) != 1 or not _usable(t, contiguous=False):
        return None
    return load()


def _usable(t: torch.Tensor, contiguous: bool = True) -> bool:
    return (t.device.type == "cpu" and not sync.sync_free(t.device) and (t.is_contiguous() or not contiguous)
            and eager(t))
