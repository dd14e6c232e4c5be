// Fused CPU kernels of sparsify_fx (built by cpu.py with torch.utils.cpp_extension.load): the
// entry points cpu_module.cpp binds, and the chunking and bit layout both kernel files share.
#pragma once

// ATen's pieces the kernels use, not <ATen/ATen.h> or <torch/extension.h>: a shorter compile
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>
#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace sparsify_fx {

constexpr int64_t kChunk = 1 << 16;  // elements per task; a multiple of kBatch
constexpr int64_t kBatch = 512;       // elements flagged per inner loop
// (f0 + f1<<8 + ... + f7<<56) * kPackMagic puts flag k at bit 56 + k (kernels/bitpack.py's layout)
constexpr uint64_t kPackMagic = 0x0102040810204080ULL;

inline int64_t n_chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }

// ---------------------------------------------------------------- DropIT (cpu_dropit.cpp)
std::vector<at::Tensor> threshold_bits(const at::Tensor& x, double cutoff);
at::Tensor compact(const at::Tensor& x, const at::Tensor& bits, const at::Tensor& counts, int64_t capacity);
at::Tensor expand(const at::Tensor& values, const at::Tensor& bits, int64_t n);
double sample_cutoff(const at::Tensor& x, const at::Tensor& index, int64_t dropped);

// ---------------------------------------------------------------- ActivationMemory (cpu_activation.cpp)
std::vector<at::Tensor> relu_bits(const at::Tensor& x, double negative_slope);
at::Tensor relu_bits_(at::Tensor& x, double negative_slope);
at::Tensor masked_grad(const at::Tensor& grad, const at::Tensor& bits, double negative_slope);
at::Tensor normalize_bf16(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd);
at::Tensor to_bf16(const at::Tensor& x);
at::Tensor normalize_rows_bf16(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd, int64_t width);
at::Tensor affine_clamp(const at::Tensor& x, const at::Tensor& alpha, const at::Tensor& beta, double upper);
std::vector<at::Tensor> bn_backward_bf16(const at::Tensor& grad, const at::Tensor& xhat, const at::Tensor& weight,
                                         bool need_x);

}  // namespace sparsify_fx
