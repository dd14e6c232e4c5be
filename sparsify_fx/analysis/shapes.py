"""Analyses that write into ``node.meta``: tensor shapes, FLOPs, activation bytes."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx

from sparsify_fx.graph import meta
from sparsify_fx.graph.form import DenseOp

__all__ = ["ShapeRecorder", "record_shapes_fake", "tensor_meta", "dense_op_flops", "tensor_bytes", "conv_output_spatial"]


class ShapeRecorder(fx.Interpreter):
    """Runs the graph once and stores ``node.meta["sfx_shape"] = (shape, dtype)``.

    Like ``torch.fx.passes.shape_prop.ShapeProp``, but tolerant of non-tensor values and
    of outputs that are tuples/dicts (only tensor outputs are recorded).
    """

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta[meta.SHAPE] = (tuple(result.shape), result.dtype)
        elif n.op == "placeholder" and isinstance(result, (int, float)):
            n.meta[meta.VALUE] = result
        return result


def record_shapes_fake(gm: fx.GraphModule, example_inputs: list) -> bool:
    """Record shapes by running ``gm`` on fake copies of ``example_inputs`` (a Dynamo graph's:
    real tensors, and SymInts for dynamic sizes, taken at their current value).

    Fake tensors leave no trace: a Dynamo graph bakes in training mode, and running it for
    real would update BatchNorm's running statistics and draw dropout masks. Returns whether
    the graph ran; where an op has no fake kernel nothing is recorded and the passes that need
    shapes say so.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    def concrete(v: Any) -> Any:
        if isinstance(v, torch.SymInt):
            return int(v.node.hint) if v.node.hint is not None else v
        return v

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        with mode, torch.no_grad():
            inputs = [mode.from_tensor(v) if isinstance(v, torch.Tensor) else concrete(v) for v in example_inputs]
            ShapeRecorder(gm).run(*inputs)
    except Exception:  # noqa: BLE001 - an op without a fake kernel: no shapes, said by the passes
        for n in gm.graph.nodes:
            n.meta.pop(meta.SHAPE, None)
            n.meta.pop(meta.VALUE, None)
        return False
    return True


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
