"""Max pooling whose backward keeps only its indices, in the narrowest integer type.

``max_pool2d`` in training keeps its input *and* the int64 index of each output's maximum.
The backward (``max_pool2d_with_indices_backward``) reads the input only for its shape: it
scatters the gradient to the indices. So this op keeps the indices alone, as int16 where
the pooled plane has at most 32767 elements (int32 otherwise), and passes backward an
uninitialised tensor of the input's shape. The gradient is the dense one bit for bit; the
forward is the dense kernel.

What it frees: in ResNet's stem (``conv -> BN -> ReLU -> max-pool``) the pooled ReLU output
stays held by the max-pool after the ReLU keeps a 1-bit mask, and so do its int64 indices:
at 8x3x112x112 that is 6.1 MiB + 3.1 MiB of the stem's 16.5, against 0.77 MiB of int16
indices here. In VGG-style ``conv -> ReLU -> max-pool`` the same holds for every stage.
It is what ``ActivationMemory(maxpool="indices")`` installs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sparsify_fx.passes.activation_memory.modules import _recording
from sparsify_fx.passes.kernels.op_autograd import in_backward, owned, register_autograd

from sparsify_fx import OpModule

__all__ = ["ActMemMaxPool2d", "index_dtype"]


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(a) for a in v]


def index_dtype(plane: int) -> torch.dtype:
    """The narrowest signed integer type holding flat indices into a plane of ``plane`` elements."""
    return torch.int16 if plane <= 2**15 else torch.int32


@torch.library.custom_op("sparsify_fx::actmem_max_pool2d", mutates_args=())
def _actmem_max_pool2d(
    x: torch.Tensor, kernel_size: list[int], stride: list[int], padding: list[int], dilation: list[int],
    ceil_mode: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    out, indices = torch.ops.aten.max_pool2d_with_indices(x, kernel_size, stride, padding, dilation, ceil_mode)
    return owned(out), indices.to(index_dtype(x.shape[-1] * x.shape[-2]))


@_actmem_max_pool2d.register_fake
def _(x, kernel_size, stride, padding, dilation, ceil_mode):
    out, indices = torch.ops.aten.max_pool2d_with_indices(x, kernel_size, stride, padding, dilation, ceil_mode)
    return out, indices.to(index_dtype(x.shape[-1] * x.shape[-2]))


def _setup(ctx, inputs, output) -> None:
    x, kernel_size, stride, padding, dilation, ceil_mode = inputs
    ctx.save_for_backward(output[1])
    ctx.shape, ctx.dtype, ctx.args = list(x.shape), x.dtype, (kernel_size, stride, padding, dilation, ceil_mode)
    ctx.channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _backward(ctx, grad_out, _grad_indices):
    (indices,) = ctx.saved_tensors
    (indices,) = in_backward(grad_out, indices)
    # the kernel reads its ``self`` argument for the shape and memory layout only
    layout = torch.channels_last if ctx.channels_last else torch.contiguous_format
    shape_only = torch.empty(ctx.shape, dtype=ctx.dtype, device=grad_out.device, memory_format=layout)
    grad_x = torch.ops.aten.max_pool2d_with_indices_backward(
        grad_out, shape_only, *ctx.args, indices.to(torch.int64))
    return grad_x, None, None, None, None, None


actmem_max_pool2d = register_autograd(_actmem_max_pool2d, _backward, _setup)


class ActMemMaxPool2d(OpModule):
    """Parameter-free ``max_pool2d`` keeping only narrow indices for backward; eval, ``no_grad``
    and non-float inputs run ``F.max_pool2d``."""

    #: the backward keeps only a compressed copy (read by sfx memory_plan)
    keeps_dense_inputs = False
    storage = "indices"

    def __init__(self, kernel_size, stride, padding, dilation, ceil_mode: bool):
        super().__init__()
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride if stride is not None else kernel_size)
        self.padding, self.dilation, self.ceil_mode = _pair(padding), _pair(dilation), bool(ceil_mode)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, ceil_mode={self.ceil_mode}, keeps narrow indices")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and _recording(x) and x.is_floating_point() and x.dim() in (3, 4):
            return actmem_max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation,
                                     self.ceil_mode)[0]
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)
