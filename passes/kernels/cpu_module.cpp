// The Python module of the fused CPU kernels. wrap_pybind_function turns a C++ exception
// (TORCH_CHECK) into the matching Python one, as the kernels' callers expect.
#include <torch/extension.h>

#include "cpu_kernels.h"

#define SFX_DEF(name) m.def(#name, torch::wrap_pybind_function(sparsify_fx::name), #name)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  SFX_DEF(sample_cutoff);
  SFX_DEF(threshold_bits);
  SFX_DEF(compact);
  SFX_DEF(expand);
  SFX_DEF(relu_bits);
  SFX_DEF(relu_bits_);
  SFX_DEF(masked_grad);
  SFX_DEF(normalize_bf16);
  SFX_DEF(bn_backward_bf16);
  SFX_DEF(affine_clamp);
  SFX_DEF(to_bf16);
  SFX_DEF(normalize_rows_bf16);
}
