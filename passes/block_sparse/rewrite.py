"""Structured activation pruning in block-sparse form (arXiv 2311.16883).

Linear / matmul-against-a-parameter / 1x1 convolutions keep a *block-sparse* copy of the
input they save for backward. Forward is exact. The saved input, seen as a 2-D matrix
``[rows, in_features]`` (leading dims flattened; channels-last for a 1x1 conv), is cut into
``b x b`` blocks, each block is scored by its L1 or L2 norm, and ``density`` of the blocks
are stored. By default (``selection="sample"``) block ``i`` is drawn with probability
``p_i = min(1, c * score_i)`` and stored scaled by ``1 / p_i``, which makes the weight
gradient an unbiased estimate (the strongest blocks saturate at ``p = 1`` and are always
kept); ``selection="topk"`` keeps the strongest blocks unscaled, the paper's rule, whose
gradient is biased towards the same blocks every step. Backward computes ``grad_weight``
from the kept blocks only
(per block column, one GEMM of its kept blocks side by side with their stacked rows of
``grad_out``; the dense input is never rebuilt);
``grad_input = grad_out @ W`` and ``grad_bias`` never read ``x`` and are exact. In eval mode
(or under ``no_grad``) the layer runs the plain dense op, bit-identical to the original.

Storage format (:class:`CompressedBlocks`), chosen so that no padding is ever stored:

* ``values (k, b, b)`` -- the kept *full* blocks in block-compressed-sparse-column (BSC)
  order, with ``col_ptr`` (int32, ``n_block_cols + 1``) and ``row_idx`` (int16 while the
  block grid has < 32768 block rows, else int32). This is ``torch.sparse_bsc``'s layout,
  kept as plain tensors so autograd's saved-tensor hooks see every byte.
* when ``rows % b != 0`` the bottom strip of partial blocks ``(k_b, rows % b, b)`` with their
  block-column indices; when ``in_features % b != 0`` the right strip ``(k_r, b, in % b)``
  with their block-row indices; and the ``(rows % b, in % b)`` corner, always kept.

Edge blocks are scored on their real elements only and compete among their own strip (each
strip keeps ``ceil(density * n)`` of its blocks), so a small partial block is never pitted
against full blocks whose norms sum over more elements. ``saved_bytes_after`` counts exactly
what is stored: values plus every index byte, and no padding exists to hide.

The op is a ``torch.library.custom_op`` with registered autograd and fake kernels, so it runs
in eager, FX, ``torch.export`` and ``torch.compile``. Compression is device-agnostic PyTorch.
The weight gradient of the full blocks runs a Triton kernel on CUDA when triton is installed
and ``b`` is 16/32/64/128 (:mod:`sparsify_fx.passes.block_sparse.triton_kernel`), and per-column GEMMs otherwise; each
rewrite's report says which (``details["kernel"]``) and why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from sparsify_fx.passes.block_sparse.blocks import (
    BlockGrid,
    CompressedBlocks,
    block_grid,
    block_sparse_weight_grad,
    compress_blocks,
    decompress_blocks,
)
from sparsify_fx.passes.block_sparse.triton_kernel import kernel_for
from sparsify_fx.passes.kernels.op_autograd import in_backward, owned, register_autograd

import sparsify_fx as sfx
from sparsify_fx import ConfigError, PassConfig, PassResult, Rewrite, autocast_region, check_range
from sparsify_fx.graph.op_table import CONV_FUNCTIONS

__all__ = [
    "BlockSparseActivations",
    "BlockGrid",
    "CompressedBlocks",
    "block_grid",
    "compress_blocks",
    "decompress_blocks",
    "block_sparse_weight_grad",
    "BlockSparseLinear",
    "BlockSparseConv1x1",
]

_NORMS = ("l1", "l2")
_SELECTIONS = ("sample", "topk")


@dataclass(frozen=True)
class BlockSparseActivations(PassConfig):
    """Keep only the strongest ``b x b`` blocks of each dense layer's saved input.

    Args:
        block_size: side ``b`` of the square blocks, 1..4096 (the paper uses 16..64).
        density: fraction of blocks kept, in (0, 1]; 1.0 keeps every block (exact gradients).
        norm: block score, ``"l1"`` (sum of ``|x|``) or ``"l2"`` (Frobenius norm).
        selection: how the kept blocks are chosen from their scores. ``"sample"`` (default):
            block ``i`` is kept with probability ``p_i = min(1, c * score_i)`` (``c`` set so
            that exactly the kept count is drawn, by systematic sampling) and stored scaled by
            ``1 / p_i``, so the weight gradient is unbiased; strong blocks are kept for sure,
            weak ones by chance. ``"topk"``: the paper's rule, the strongest blocks always win;
            the gradient is then biased towards the same blocks every step (low-norm inputs
            never contribute), which costs accuracy where block norms are alike (LayerNorm
            outputs): see docs/block_sparse.md.
        skip_first_last: leave the model's first and last dense layers dense (the first
            layer's input is the data, which the caller holds anyway; the head is small).

    Example:
        >>> import torch, sparsify_fx as sfx
        >>> m = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32),
        ...                         torch.nn.ReLU(), torch.nn.Linear(32, 2))
        >>> fast = sfx.sparsify(m, sfx.BlockSparseActivations(block_size=8, density=0.5),
        ...                     example_inputs=(torch.randn(16, 32),))
        >>> [r.module for r in sfx.explain(fast).rewrites]
        ['2']
    """

    block_size: int = 32
    density: float = 0.5
    norm: str = "l2"
    selection: str = "sample"
    skip_first_last: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int):
            raise ConfigError(f"{name}.block_size must be an int, got {self.block_size!r}")
        check_range(self, "block_size", self.block_size, 1, 4096)
        check_range(self, "density", self.density, 0.0, 1.0, low_open=True)
        if self.norm not in _NORMS:
            raise ConfigError(f"{name}.norm must be one of {list(_NORMS)}, got {self.norm!r}")
        if self.selection not in _SELECTIONS:
            raise ConfigError(f"{name}.selection must be one of {list(_SELECTIONS)}, got {self.selection!r}")
        if not isinstance(self.skip_first_last, bool):
            raise ConfigError(f"{name}.skip_first_last must be a bool, got {self.skip_first_last!r}")


# ---------------------------------------------------------------- block layout


def _rows_view(x: torch.Tensor, kind: str) -> torch.Tensor:
    # a 1x1 conv is a Linear over channels: put channels last, flatten batch and space
    if kind == "conv":
        return x.movedim(1, -1).reshape(-1, x.shape[1])
    return x.reshape(-1, x.shape[-1])


def _dense(x, weight, bias, kind: str, dilation: list[int]) -> torch.Tensor:
    if kind == "linear":
        return F.linear(x, weight, bias)
    if kind == "addmm":
        return torch.addmm(bias, x, weight)
    if kind == "matmul":
        return torch.matmul(x, weight)
    n = len(dilation)
    return torch.ops.aten.convolution(x, weight, bias, [1] * n, [0] * n, dilation, False, [0] * n, 1)


@torch.library.custom_op("sparsify_fx::block_sparse_dense", mutates_args=())
def _block_sparse_dense(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    block: int,
    density: float,
    norm: str,
    selection: str,
    kind: str,
    dilation: list[int],
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
]:
    out = owned(_dense(x, weight, bias, kind, dilation))
    return (out, *compress_blocks(_rows_view(x, kind), block, density, norm, selection))


def _in_features(x: torch.Tensor, kind: str) -> int:
    return x.shape[1] if kind == "conv" else x.shape[-1]


@_block_sparse_dense.register_fake
def _(x, weight, bias, block, density, norm, selection, kind, dilation):
    # the dense op's own meta: its layout (a channels-last input gives a channels-last output)
    out = owned(_dense(x, weight, bias, kind, dilation))
    cols = _in_features(x, kind)
    g = block_grid(x.numel() // cols, cols, block, density)
    b, idx = block, g.index_dtype
    return (
        out,
        x.new_empty(g.k_full, b, b),
        x.new_empty(g.n_c + 1, dtype=torch.int32),
        x.new_empty(g.k_full, dtype=idx),
        x.new_empty(g.k_bottom, g.rem_r, b),
        x.new_empty(g.k_bottom, dtype=idx),
        x.new_empty(g.k_right, b, g.rem_c),
        x.new_empty(g.k_right, dtype=idx),
        x.new_empty(g.rem_r, g.rem_c),
    )


def _setup(ctx, inputs, output) -> None:
    x, weight, bias, block, density, norm, selection, kind, dilation = inputs
    # only the compressed blocks (and the weight, a parameter) are kept for backward
    ctx.save_for_backward(*output[1:], weight)
    cols = _in_features(x, kind)
    ctx.rows, ctx.cols, ctx.block = x.numel() // cols, cols, block
    ctx.kind, ctx.dilation = kind, list(dilation)
    ctx.x_shape = list(x.shape)
    ctx.bias_shape = list(bias.shape) if bias is not None else None


def _backward(ctx, grad_out, *_grad_blocks):
    *parts, weight = ctx.saved_tensors
    parts = in_backward(grad_out, *parts)
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    kind = ctx.kind
    grad_x = grad_w = grad_b = None
    if kind == "conv":
        n = len(ctx.dilation)
        if need_x:
            # the input is only needed for its shape: an expanded 1-element tensor is enough
            # (what torch.nn.grad.conv2d_input does)
            shape_only = grad_out.new_empty(1).expand(ctx.x_shape)
            grad_x = torch.ops.aten.convolution_backward(
                grad_out.contiguous(), shape_only, weight, None, [1] * n, [0] * n, ctx.dilation,
                False, [0] * n, 1, [True, False, False],
            )[0]
        if need_b and ctx.bias_shape is not None:
            grad_b = grad_out.sum(dim=[0, *range(2, grad_out.dim())])
        if need_w:
            g2 = grad_out.movedim(1, -1).reshape(-1, grad_out.shape[1])
            grad_w = block_sparse_weight_grad(CompressedBlocks(*parts), g2, ctx.rows, ctx.cols, ctx.block,
                                              transposed=True).view(weight.shape)
    else:
        w = weight if kind == "linear" else weight.t()  # [out, in]
        if need_x:
            grad_x = grad_out @ w
        if need_b and ctx.bias_shape is not None:
            grad_b = grad_out.sum_to_size(ctx.bias_shape)
        if need_w:
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            grad_w = block_sparse_weight_grad(CompressedBlocks(*parts), g2, ctx.rows, ctx.cols, ctx.block,
                                              transposed=kind == "linear")
    return grad_x, grad_w, grad_b, None, None, None, None, None, None


block_sparse_dense = register_autograd(_block_sparse_dense, _backward, _setup)


# ---------------------------------------------------------------- op modules


class BlockSparseLinear(sfx.OpModule):
    """Parameter-free op module: ``forward(x, weight, bias)`` like the Linear/matmul it replaced.

    ``kind`` is the replaced spelling ("linear", "matmul" or "addmm"): eval mode and no-grad
    run exactly that op, so outputs are bit-identical to the original graph's.
    """

    #: the backward keeps only a compressed copy (read by sfx memory_plan)
    keeps_dense_inputs = False

    def __init__(self, block: int, density: float, norm: str, kind: str = "linear", selection: str = "topk"):
        super().__init__()
        self.block, self.density, self.norm, self.kind = block, density, norm, kind
        self.selection = selection

    def extra_repr(self) -> str:
        return (f"block={self.block}, density={self.density}, norm={self.norm}, "
                f"selection={self.selection}, kind={self.kind}")

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
        if self.training and torch.is_grad_enabled() and weight.requires_grad:
            with autocast_region(x.device.type) as cast:
                return block_sparse_dense(
                    cast(x), cast(weight), cast(bias), self.block, self.density, self.norm,
                    self.selection, self.kind, [],
                )[0]
        return _dense(x, weight, bias, self.kind, [])


class BlockSparseConv1x1(sfx.OpModule):
    """Parameter-free op module for a 1x1, stride-1, unpadded, ungrouped Conv1d/2d/3d."""

    #: the backward keeps only a compressed copy (read by sfx memory_plan)
    keeps_dense_inputs = False

    def __init__(self, block: int, density: float, norm: str, dilation: tuple[int, ...],
                 selection: str = "topk"):
        super().__init__()
        self.block, self.density, self.norm, self.selection = block, density, norm, selection
        self.dilation = list(dilation)
        self._functional = CONV_FUNCTIONS[len(self.dilation)]

    def extra_repr(self) -> str:
        return f"block={self.block}, density={self.density}, norm={self.norm}, selection={self.selection}"

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
        if self.training and torch.is_grad_enabled() and weight.requires_grad:
            with autocast_region(x.device.type) as cast:
                return block_sparse_dense(
                    cast(x), cast(weight), cast(bias), self.block, self.density, self.norm,
                    self.selection, "conv", self.dilation,
                )[0]
        return self._functional(x, weight, bias, 1, 0, self.dilation, 1)


# ---------------------------------------------------------------- the pass


def _conv_reason(op: sfx.DenseOp, weight: torch.Tensor) -> str | None:
    """None when a conv is a Linear over channels, else why it is not."""
    if any(k != 1 for k in weight.shape[2:]):
        return f"kernel {tuple(weight.shape[2:])} is not 1x1: blocks of an im2col input are not supported"
    if any(s != 1 for s in op.stride):
        return f"stride {op.stride} != 1: the saved input is not a per-pixel Linear input"
    padding = op.conv_padding_ints(weight.shape)
    if padding is None or any(p != 0 for p in padding):
        return f"padding {op.padding} != 0 changes the 1x1 conv's input grid"
    if op.groups != 1:
        return f"groups={op.groups}: a grouped conv is not one Linear over channels"
    return None


def _rewrite_one(gm, op: sfx.DenseOp, config: BlockSparseActivations, ctx) -> Rewrite:
    weight = gm.get_parameter(op.weight_name)
    if op.kind == "conv":
        module: nn.Module = BlockSparseConv1x1(config.block_size, config.density, config.norm, op.dilation,
                                                    config.selection)
        op_name = f"conv{op.conv_ndim}d(1x1)"
        in_features = weight.shape[1]
    else:
        kind = "addmm" if op.node.target is torch.addmm else op.kind
        module = BlockSparseLinear(config.block_size, config.density, config.norm, kind, config.selection)
        op_name = kind
        in_features = weight.shape[0] if op.weight_transposed else weight.shape[1]
    # read operands and shapes before replace_node: DenseOp reads them off the (erased) node
    x, w_node, b_node = op.input, op.weight, op.bias
    before = sfx.tensor_bytes(x)
    after = None
    kernel, why = kernel_for(weight.device, config.block_size, weight.dtype)
    details: dict = {"block_size": config.block_size, "density": config.density, "norm": config.norm,
                     "selection": config.selection,
                     "kernel": kernel, "kernel_reason": why}
    meta = sfx.tensor_meta(x)
    if meta is not None:
        shape, dtype = meta
        grid = block_grid(math.prod(shape) // in_features, in_features, config.block_size, config.density)
        after = grid.compressed_bytes(torch.empty((), dtype=dtype).element_size())
        details.update(kept_blocks=grid.kept_blocks, total_blocks=grid.total_blocks,
                       index_bytes=grid.index_bytes())
    target = sfx.install_module(gm, f"bsr_{op.module_name or op.node.name}", module)
    with gm.graph.inserting_before(op.node):
        new = gm.graph.call_module(target, (x, w_node, b_node))
    flops = sfx.dense_op_flops(op, weight.shape)
    sfx.replace_node(op.node, new)
    return Rewrite(
        ctx.pass_name, op.node.name, ctx.qualified(op.module_name), op_name, target,
        saved_bytes_before=before, saved_bytes_after=after,
        flops_before=flops, flops_after=flops, details=details,
    )


@sfx.register_pass(BlockSparseActivations, name="bsr")
def _block_sparse_pass(gm, config: BlockSparseActivations, ctx) -> PassResult:
    ops, unmatched = sfx.find_dense_ops(gm)
    result = PassResult(gm, modified=False)
    for node, why in unmatched:
        result.skips.append(ctx.skip(node, why))
    for op in ops:
        weight = gm.get_parameter(op.weight_name)
        reason = ctx.selection_reason(config, op, op.module_name, gm)
        if reason is None and config.skip_first_last and ctx.qualified(op.module_name) in ctx.first_last:
            reason = "first/last dense layer kept dense (skip_first_last=True)"
        if reason is None and not weight.requires_grad:
            reason = "weight does not require grad: no input is saved for it"
        if reason is None and op.kind == "conv":
            reason = _conv_reason(op, weight)
        if reason is not None:
            result.skips.append(ctx.skip(op, reason))
            continue
        try:
            result.rewrites.append(_rewrite_one(gm, op, config, ctx))
        except Exception as e:
            e.sfx_node = op.node  # the pass manager names this node in its PassError
            raise
        result.modified = True
    return result
