// ActivationMemory's kernels: ReLU / LeakyReLU with their 1-bit masks and backward, the saturating
// bf16 copies (plain, BatchNorm- and LayerNorm-normalised), BatchNorm's backward from that copy and
// the affine clamp a fused BatchNorm -> ReLU -> Conv rebuilds (entry points documented in cpu.py).
// fp32 only (the common case; other dtypes take the PyTorch path). Restrict-qualified
// pointers and branch-free bodies, so the compiler vectorises each inner loop.
#include "cpu_kernels.h"

namespace sparsify_fx {

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
// fp32 -> bf16 by activation_memory.ops._to_bf16's rules: finite values saturate at bf16's largest,
// inf / NaN become NaN, rounding is to nearest even
inline uint16_t saturated_bf16(float v) {
  const float big = 3.3895313892515355e38f;  // bf16's largest finite value
  const uint32_t u = bits_of(v);
  const bool finite = (u & 0x7F800000u) != 0x7F800000u;
  const uint32_t c32 = bits_of(std::min(std::max(v, -big), big));
  const uint32_t rounded = (c32 + 0x7FFFu + ((c32 >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(finite ? rounded : 0x7FC0u);
}

// (x - mean[k]) * scale[k] as bf16 by saturated_bf16 (activation_memory.ops._to_bf16's rules, bit for bit)
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

// activation_memory.ops._to_bf16 in one pass (the PyTorch path: a cast, then an abs and a max over the
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
// mean and save_invstd 1 (activation_memory.ops._bn_backward's PyTorch path), without the fp32
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

}  // namespace sparsify_fx
