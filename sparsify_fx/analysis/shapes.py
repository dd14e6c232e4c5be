"""Analyses that write into ``node.meta``: tensor shapes, FLOPs, activation bytes."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx

from sparsify_fx.graph import meta
from sparsify_fx.graph.form import DenseOp

__all__ = ["ShapeRecorder", "tensor_meta", "dense_op_flops", "tensor_bytes", "conv_output_spatial"]


class ShapeRecorder(fx.Interpreter):
    """Runs the graph once and stores ``node.meta["sfx_shape"] = (shape, dtype)``.

    Like ``torch.fx.passes.shape_prop.ShapeProp``, but tolerant of non-tensor values and
    of outputs that are tuples/dicts (only tensor outputs are recorded).
    """

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta[meta.SHAPE] = (tuple(result.shape), result.dtype)
        return result


def tensor_meta(node: Any) -> tuple[tuple[int, ...], torch.dtype] | None:
    """The recorded (shape, dtype) of a node's tensor output, or None if unknown."""
    if isinstance(node, fx.Node):
        return node.meta.get(meta.SHAPE)
    return None


def tensor_bytes(node: Any) -> int | None:
    meta = tensor_meta(node)
    if meta is None:
        return None
    shape, dtype = meta
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def dense_op_flops(op: DenseOp, weight_shape: torch.Size) -> int | None:
    """Forward FLOPs (2 per multiply-add) of a dense op, from the recorded output shape."""
    out = tensor_meta(op.node)
    if out is None:
        return None
    out_numel = math.prod(out[0])
    if op.kind == "conv":
        per_output = math.prod(weight_shape[1:])  # (C_in / groups) * k...
    elif op.kind == "linear":
        per_output = weight_shape[1]
    else:
        per_output = weight_shape[0]
    return 2 * out_numel * per_output


def conv_output_spatial(
    input_spatial, kernel_spatial, stride, padding, dilation
) -> list[int]:
    """Spatial output sizes of a convolution (used by custom ops' fake kernels)."""
    return [
        (size + 2 * p - d * (k - 1) - 1) // st + 1
        for size, k, st, p, d in zip(input_spatial, kernel_spatial, stride, padding, dilation)
    ]
