// DropIT's selection kernels: the cut-off from a sample of |x|, the 1-bit-per-element bitmap of
// the elements kept, the kept values compacted in flat order and the dense tensor expanded back
// (entry points documented in cpu.py; bitmap layout: kernels/bitpack.py's pack_bits).
#include "cpu_kernels.h"

#include <cmath>
#include <limits>

namespace sparsify_fx {

namespace {
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

}  // namespace sparsify_fx
