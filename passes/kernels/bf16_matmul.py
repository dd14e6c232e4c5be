"""The weight gradient of a dense layer whose input is kept as bf16, computed on bf16 operands.

An op that keeps a Linear / Conv input as bf16 (``ActivationMemory(dense="bf16")``, the
``"recompute-bf16"`` fusions) already holds one operand of the weight gradient
``grad_out^T @ x`` rounded to bf16. Upcasting it and running the product in fp32 costs a
pass over ``x`` and an fp32 matmul. Where the device has bf16 matrix units (a CPU with
AVX512-BF16 or AMX through oneDNN, a GPU of compute capability 8.0 or later), rounding
``grad_out`` to bf16 too and running the product there, with fp32 accumulation, is what
mixed-precision training does for every weight gradient, and it is 2-4x faster: on a 2-core
Sapphire Rapids, ``grad_out^T @ x`` at GPT-2-style shapes (1024 x 384 x 1536) took 4.0 ms in
fp32 and 1.1 ms with the casts.

``weight_grad`` (an ``ActivationMemory`` / ``MemoryBudget`` setting) picks:

* ``"auto"`` (default): bf16 operands where the device has bf16 matrix units, else the input's
  precision. Where a device lacks them, bf16 matmuls are emulated and slower than fp32.
* ``"bf16"``: bf16 operands on every device (same numbers everywhere; slow where emulated).
* ``"input"``: the stored input upcast to the input's dtype and the product in that precision
  (the weight gradient autograd would compute from the rounded input).

Only the weight gradient changes. The forward, the input gradient and the bias gradient are
computed as before. Error: each operand is rounded once (``|v - bf16(v)| <= 2^-8 |v|``) and,
on a CPU, so is the product (oneDNN returns bf16 for bf16 operands; the sums run in fp32), so
element-wise, to first order, ``|dgrad_weight| <= 3 * 2^-8 * sum|grad_out| |x|`` over the summed
dimension, against ``2^-8 * sum|grad_out| |x|`` when only ``x`` is rounded. Mixed-precision
training (autocast) computes every weight gradient this way.
"""

from __future__ import annotations

import functools

import torch
from sparsify_fx.passes.kernels.cache import eager

import sparsify_fx as sfx

__all__ = ["WEIGHT_GRAD", "check_weight_grad", "native_bf16_matmul", "bf16_weight_grad",
           "linear_weight_grad", "conv_weight_grad", "kernel_details"]

WEIGHT_GRAD = ("auto", "bf16", "input")


def kernel_details(weight: object) -> dict[str, list[int]]:
    """``{"kernel": [kh, kw]}`` for a Conv weight node of recorded shape, else ``{}``: a rewrite's
    detail the budget planner reads (a 1x1 Conv's bf16 weight gradient gains less)."""
    meta = sfx.tensor_meta(weight)
    return {"kernel": list(meta[0][2:])} if meta is not None and len(meta[0]) > 2 else {}


def check_weight_grad(owner: str, value: object) -> None:
    if value not in WEIGHT_GRAD:
        raise ValueError(f"{owner}: weight_grad must be one of {list(WEIGHT_GRAD)}, got {value!r}")


@functools.cache
def _native(device_type: str, index: int | None) -> bool:
    if device_type == "cuda":
        return torch.cuda.get_device_capability(index) >= (8, 0)
    if device_type == "cpu":
        if not torch.backends.mkldnn.is_available():
            return False
        # private helpers: absent on some builds, which then count as emulating bf16
        probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return False


@torch.compiler.assume_constant_result  # Dynamo takes the answer, not the CPU probes
def native_bf16_matmul(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matmuls / convolutions on bf16 matrix units."""
    return _native(device.type, device.index)


def bf16_weight_grad(mode: str, x: torch.Tensor) -> bool:
    """Whether an op kept ``x`` (a float tensor wider than bf16) computes its weight gradient
    on bf16 operands under ``mode``."""
    if mode == "input" or not x.is_floating_point() or x.element_size() <= 2:
        return False
    return mode == "bf16" or native_bf16_matmul(x.device)


def linear_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, transposed: bool, dtype: torch.dtype) -> torch.Tensor:
    """``grad_out^T @ x`` (``x^T @ grad_out`` for a ``[in, out]`` weight) over all leading
    dimensions, on bf16 operands, returned in ``dtype``."""
    g2 = grad_out.reshape(-1, grad_out.shape[-1]).to(torch.bfloat16)
    x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    return (x2.t() @ g2 if transposed else g2.t() @ x2).to(dtype)


#: convolution shapes whose bf16 weight gradient came back non-finite on finite operands:
#: they take the fp32 path from then on. oneDNN on a CPU returns inf / nan for some Conv3d
#: shapes (kernel (3, 1, 1), padding (1, 0, 0), two frames), reproducible with plain aten.
_BROKEN_SHAPES: set[tuple] = set()
#: shapes whose bf16 result was checked once and found finite
_CHECKED_SHAPES: set[tuple] = set()


def conv_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, conv: tuple) -> torch.Tensor:
    """A convolution's weight gradient on bf16 operands, returned in ``weight``'s dtype;
    ``conv`` is ``(stride, padding, dilation, groups)``.

    A 3-D convolution on the CPU always computes it from ``x`` upcast to ``weight``'s dtype:
    oneDNN's bf16 Conv3d weight gradient returns non-finite values for some shapes (kernel
    (3, 1, 1), padding (1, 0, 0), two frames), and not on every call, so no one-time check can
    guard it. Elsewhere the first eager call per shape on the CPU checks the result is finite
    where the operands are; where it is not (a backend bug), that shape takes the same upcast
    path from then on. Traced calls (fake tensors under torch.compile) and accelerators are not
    checked: the check reads a value back to the host."""
    stride, padding, dilation, groups = conv
    if x.device.type == "cpu" and len(stride) == 3:
        return _conv_weight_grad_in(grad_out, x, weight, conv, weight.dtype)
    key = (x.device.type, tuple(x.shape), tuple(weight.shape), tuple(stride), tuple(padding), tuple(dilation),
           groups)
    # under torch.compile's dynamic shapes the sizes are symbolic (unhashable): no shape has a
    # verdict to look up
    if any(isinstance(d, torch.SymInt) for d in (*x.shape, *weight.shape)):
        return _conv_weight_grad_in(grad_out, x, weight, conv, torch.bfloat16)
    if key in _BROKEN_SHAPES:
        return _conv_weight_grad_in(grad_out, x, weight, conv, weight.dtype)
    out = _conv_weight_grad_in(grad_out, x, weight, conv, torch.bfloat16)
    if key not in _CHECKED_SHAPES and x.device.type == "cpu" and eager(x):
        _CHECKED_SHAPES.add(key)
        if (not bool(torch.isfinite(out).all()) and bool(torch.isfinite(grad_out).all())
                and bool(torch.isfinite(x).all())):
            _BROKEN_SHAPES.add(key)
            return _conv_weight_grad_in(grad_out, x, weight, conv, weight.dtype)
    return out


def _conv_weight_grad_in(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, conv: tuple,
                         dtype: torch.dtype) -> torch.Tensor:
    stride, padding, dilation, groups = conv
    return torch.ops.aten.convolution_backward(
        grad_out.to(dtype).contiguous(), x.to(dtype), weight.detach().to(dtype), None,
        stride, padding, dilation, False, [0] * len(stride), groups, [False, True, False],
    )[1].to(weight.dtype)
