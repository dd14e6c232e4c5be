"""What each op's backward keeps: the rule table and the per-node rules the memory plan reads.

:func:`kept_by` says which of a node's tensors its backward keeps dense (and whether it keeps a
compressed copy instead); :func:`autocast_copies` what autocast's casts add (a cast of each fp32
operand per call, one cast per trainable weight per step); :func:`side_bytes_of` what a backward
keeps beside the activations (pooling indices, normalisation statistics, dropout masks, the
CPU math attention's scores). The liveness pass over a whole graph, with its storage and alias
walk, is :mod:`sparsify_fx.analysis.memory_plan`.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from sparsify_fx.analysis.shapes import tensor_bytes, tensor_meta
from sparsify_fx.graph import meta
from sparsify_fx.graph.form import OPS_CONTAINER, is_in_place
from sparsify_fx.graph.op_module import OpModule
from sparsify_fx.graph.op_table import VIEW_METHODS

__all__ = ["SAVES", "kept_by", "autocast_copies", "side_bytes_of", "math_attention_bytes", "runs_math_attention",
           "is_activation", "is_trainable", "runs_torch_forward"]

_INPUT, _OUTPUT, _OPERANDS = "input", "output", "operands"

# what each canonical op's backward keeps. before -> kept: one rule per line.
SAVES: dict[Any, str] = {
    F.linear: _INPUT,  # linear(x, w) keeps x (w is a parameter)
    F.conv1d: _INPUT,  # convNd(x, w) keeps x
    F.conv2d: _INPUT,
    F.conv3d: _INPUT,
    torch.matmul: _OPERANDS,  # a @ b keeps both (a parameter operand is not counted)
    torch.addmm: _OPERANDS,
    torch.bmm: _OPERANDS,
    operator.mul: _OPERANDS,  # a * b keeps both when both are tensors
    torch.mul: _OPERANDS,
    operator.truediv: _OPERANDS,
    operator.imul: _OPERANDS,  # out *= s / out /= s (augmented assignment, traced in place)
    operator.itruediv: _OPERANDS,
    F.relu: _OUTPUT,  # relu keeps its output
    torch.sigmoid: _OUTPUT,  # sigmoid / tanh / softmax keep their output
    torch.tanh: _OUTPUT,
    F.softmax: _OUTPUT,
    F.gelu: _INPUT,  # gelu / silu / hardswish / leaky_relu keep their input
    F.silu: _INPUT,
    F.hardswish: _INPUT,
    F.leaky_relu: _INPUT,
    F.hardtanh: _INPUT,  # hardtanh / relu6 / hardsigmoid / mish keep their input
    F.relu6: _INPUT,
    F.hardsigmoid: _INPUT,
    F.mish: _INPUT,
    F.layer_norm: _INPUT,
    F.group_norm: _INPUT,
    F.max_pool2d: _INPUT,  # max pooling keeps its input (and indices)
    F.avg_pool1d: _INPUT,  # average pooling keeps its input too (AvgPool2DBackward0's self)
    F.avg_pool2d: _INPUT,
    F.avg_pool3d: _INPUT,
    F.scaled_dot_product_attention: _OPERANDS,  # q, k, v (and its output, see below)
}
# ops whose backward keeps nothing of the activations (shapes only)
_KEEPS_NOTHING = {
    operator.add, torch.add, operator.sub, torch.sub, operator.neg, torch.cat, torch.flatten,
    operator.iadd, operator.isub,
    F.dropout, F.pad, torch.mean, torch.sum,  # (dropout's mask: side_bytes_of)
    operator.getitem, torch.stack, torch.transpose, torch.permute, F.unfold, F.fold,
    # Python builtins a trace records: reading .shape / .dtype, packing results into a tuple
    # or list create no autograd node (ViT-B/16 has 28 of them; as unknown ops they were
    # charged 17 of its 57 MB under the compress recipe)
    getattr, tuple, list, len,
}
# adaptive average pooling keeps its input, unless it pools to one element (then ATen takes
# a mean, which keeps nothing): ResNet's head keeps nothing, a 7 x 7 pool keeps its input
_ADAPTIVE_AVG_POOLS = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d}
# in place, these save a clone of their input (their backward reads the input, which the op
# overwrites): a storage of its own beside the input's, now the output's
_CLONE_INPUT_IN_PLACE = {F.silu, F.hardswish, F.hardtanh, F.relu6, F.hardsigmoid, F.mish}
_KEEPS_NOTHING_METHODS = VIEW_METHODS | {"mean", "sum", "size", "dim", "contiguous", "add", "sub",
                                          "add_", "neg", "float", "to", "type_as"}
# torch.nn modules kept as calls, and what their backward keeps
# (matched only when the module runs torch's own forward: see runs_torch_forward)
_MODULE_SAVES: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.modules.batchnorm._BatchNorm, _INPUT),
    (nn.LayerNorm, _INPUT),
    (nn.GroupNorm, _INPUT),
    (nn.modules.pooling._MaxPoolNd, _INPUT),
    (nn.modules.dropout._DropoutNd, "nothing"),  # (its mask: side_bytes_of)
    (nn.modules.pooling._AdaptiveAvgPoolNd, "adaptive"),
    (nn.modules.pooling._AvgPoolNd, _INPUT),
    (nn.Sigmoid, _OUTPUT),
    (nn.Tanh, _OUTPUT),
    (nn.Softmax, _OUTPUT),
    (nn.Hardswish, _INPUT),
    (nn.Hardsigmoid, _INPUT),
    (nn.Hardtanh, _INPUT),  # and ReLU6
    (nn.Mish, _INPUT),
    (nn.LeakyReLU, _INPUT),
    (nn.Identity, "nothing"),
    (nn.Flatten, "nothing"),
    (nn.Unfold, "nothing"),
    (nn.Fold, "nothing"),
)



# matmul-like ops whose backward keeps each operand only for the other's gradient
_KEEPS_THE_OTHER = {torch.matmul, torch.bmm, operator.mul, torch.mul, operator.imul}
# a / b: a's gradient needs b; b's gradient needs a and b
_DIVISIONS = {operator.truediv, operator.itruediv}
# ops autocast runs at its lower precision (on CPU and CUDA): each keeps its operands cast to
# that dtype, an activation's cast a copy of its own per call (not the operand's storage), a
# trainable weight's one copy per step (autocast's weight cache), both held until backward
_AUTOCAST_LOW = {F.linear, F.conv1d, F.conv2d, F.conv3d, torch.matmul, torch.bmm, torch.addmm,
                 F.scaled_dot_product_attention}


def autocast_copies(n: fx.Node, gm: fx.GraphModule, kept: list[fx.Node], grad: dict[str, bool],
                     dtype: torch.dtype, weights: set[str]) -> tuple[list[fx.Node], int]:
    """(the tensors ``n`` keeps as they are, bytes of the casts it keeps instead) under autocast."""
    itemsize = torch.empty((), dtype=dtype).element_size()

    def weight_cast(w: Any, key: str) -> int:
        value = operator.attrgetter(str(w.target))(gm) if isinstance(w, fx.Node) and w.op == "get_attr" else None
        if not isinstance(value, torch.Tensor) or value.dtype != torch.float32 or key in weights:
            return 0
        weights.add(key)
        return value.numel() * itemsize

    if n.op == "call_module" and str(n.target).startswith(OPS_CONTAINER + "."):
        # a rewritten Linear / Conv (a fused or compressing op module) still keeps its weight's
        # cast; a recomputed segment, or an op module that re-casts in backward, keeps none
        from sparsify_fx.analysis.segments import (
            RecomputedSegment,  # (segments is the heavier module)
        )
        mod = gm.get_submodule(str(n.target))
        if isinstance(mod, OpModule) and mod.casts_operands:
            cast = [t for t in kept if t is not n and (m := tensor_meta(t)) is not None and m[1] == torch.float32]
            return [t for t in kept if t not in cast], sum(math.prod(tensor_meta(t)[0]) * itemsize for t in cast)
        if not isinstance(mod, OpModule) or isinstance(mod, RecomputedSegment) or mod.recasts_weight:
            return kept, 0
        return kept, sum(weight_cast(a, str(a.target)) for a in n.all_input_nodes
                         if a.op == "get_attr" and is_trainable(gm, a) and len(getattr(
                             operator.attrgetter(str(a.target))(gm), "shape", ())) >= 2)
    if n.op != "call_function" or n.target not in _AUTOCAST_LOW:
        return kept, 0
    same, copies = [], 0
    for t in kept:
        shape = tensor_meta(t)
        if t is not n and shape is not None and shape[1] == torch.float32:
            copies += math.prod(shape[0]) * itemsize
        else:
            same.append(t)
    # the weight of a Linear / Conv / GPT-2's Conv1D (addmm(bias, x, w)) / x @ w, kept for the
    # input's gradient (a convolution keeps it always)
    if n.target is torch.addmm:
        x, w = (list(n.args[1:3]) + [None, None])[:2]
    else:
        w = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight", n.kwargs.get("other"))
        x = n.args[0] if n.args else n.kwargs.get("input")
    conv = n.target in (F.conv1d, F.conv2d, F.conv3d)
    if n.target is not F.scaled_dot_product_attention and isinstance(w, fx.Node) and w.op == "get_attr" \
            and (conv or (isinstance(x, fx.Node) and grad.get(x.name, False))):
        # (a frozen weight is not in autocast's cache: cast, and kept, per call)
        copies += weight_cast(w, str(w.target) if is_trainable(gm, w) else f"{w.target}@{n.name}")
    return same, copies


def runs_torch_forward(mod: nn.Module) -> bool:
    """True when ``mod`` runs torch.nn's own forward: a subclass that overrides it (timm's
    ``BatchNormAct2d`` applies an activation after its batch norm) is another op."""
    return getattr(type(mod).forward, "__module__", "").startswith("torch.nn.")


def is_activation(arg: Any) -> bool:
    return isinstance(arg, fx.Node) and arg.op not in ("get_attr",) and meta.SHAPE in arg.meta


def is_trainable(gm: fx.GraphModule, attr: fx.Node) -> bool:
    try:
        return gm.get_parameter(str(attr.target)).requires_grad
    except AttributeError:  # a buffer or constant: no gradient, so the product keeps nothing for it
        return False


def _pools_to_one(node: fx.Node) -> bool:
    meta = tensor_meta(node)
    return meta is not None and len(meta[0]) >= 3 and all(d == 1 for d in meta[0][2:])


def _clones_input(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _CLONE_INPUT_IN_PLACE and is_in_place(node)


def _is_stochastic_depth(target: object) -> bool:
    # torchvision.ops' stochastic depth (EfficientNet, ConvNeXt, Swin) keeps an (N, 1, ...)
    # mask, not its input; matched by name so that planning needs no torchvision import
    return getattr(target, "__module__", "").startswith("torchvision.ops") and \
        getattr(target, "__name__", "") in ("StochasticDepth", "stochastic_depth")


def kept_by(node: fx.Node, gm: fx.GraphModule, grad: dict[str, bool]) -> tuple[list[fx.Node], bool, bool]:
    """(tensors this node's backward keeps dense, keeps-compressed?, known op?)"""
    acts = [a for a in node.all_input_nodes if is_activation(a)]
    if not acts and meta.SHAPE not in node.meta:
        return [], False, True  # shape arithmetic and other non-tensor values keep nothing
    if not grad.get(node.name, True):
        return [], False, True  # no gradient flows through it: autograd records nothing

    def needs(a: Any) -> bool:  # does a gradient flow into this operand?
        if not isinstance(a, fx.Node):
            return False
        return is_trainable(gm, a) if a.op == "get_attr" else grad.get(a.name, True)
    if node.op == "call_module":
        if str(node.target).startswith(OPS_CONTAINER + "."):
            mod = gm.get_submodule(str(node.target))
            # (a module that does not declare the OpModule contract keeps its inputs, as eager)
            if not isinstance(mod, OpModule) or mod.keeps_dense_inputs:
                return acts, False, True
            # (an attention op that keeps its output for the flash backward holds that dense)
            return ([node] if mod.keeps_output else []), True, True
        mod = gm.get_submodule(str(node.target))
        if _is_stochastic_depth(type(mod)):
            return [], False, True  # keeps its (N, 1, ...) mask: side_bytes_of
        for klass, kind in _MODULE_SAVES if runs_torch_forward(mod) else ():
            if isinstance(mod, klass):
                if kind == "adaptive":
                    kind = "nothing" if _pools_to_one(node) else _INPUT
                return (acts[:1] if kind == _INPUT else [node] if kind == _OUTPUT else []), False, True
        return acts, False, False
    if node.op == "call_function":
        target = node.target
        if _clones_input(node):
            return [], False, True  # it keeps a clone of its input instead: side_bytes_of
        kind = SAVES.get(target)
        if target in _ADAPTIVE_AVG_POOLS:
            if _pools_to_one(node):
                return [], False, True
            kind = _INPUT
        if _is_stochastic_depth(target):
            return [], False, True
        if target is F.linear:
            # linear keeps its input only for its weight's gradient (a frozen weight: nothing),
            # and a weight that is an activation only for the input's
            x = node.args[0] if node.args else node.kwargs.get("input")
            w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            return [t for t, other in ((x, w), (w, x)) if t in acts and needs(other)], False, True
        if kind == _INPUT:
            return acts[:1], False, True  # (a convolution keeps it even for a frozen weight)
        if kind == _OUTPUT:
            return [node], False, True
        if kind == _OPERANDS:
            if target is torch.addmm:  # addmm(bias, a, b): as a @ b
                a, b = (list(node.args[1:3]) + [None, None])[:2]
                return [t for t, other in ((a, b), (b, a)) if t in acts and needs(other)], False, True
            if target in _KEEPS_THE_OTHER or target in _DIVISIONS:
                a, b = (list(node.args[:2]) + [None, None])[:2]
                # each operand is kept for the other's gradient; a divisor for its own too
                kept = [a] if a in acts and needs(b) else []
                if b in acts and (needs(a) or (target in _DIVISIONS and needs(b))):
                    kept.append(b)
                return kept, False, True  # (scaling by a constant keeps nothing)
            kept = list(acts)
            if target is F.scaled_dot_product_attention:
                kept.append(node)
            return kept, False, True
        if target in _KEEPS_NOTHING:
            return [], False, True
        return acts, False, False
    if node.op == "call_method":
        if node.target in _KEEPS_NOTHING_METHODS:
            return [], False, True
        if node.target in ("relu", "sigmoid", "tanh", "softmax"):
            return [node], False, True
        return acts, False, False
    return [], False, True


def side_bytes_of(n: fx.Node, gm: fx.GraphModule, autocast: torch.dtype | None = None) -> int:
    """Bytes a backward keeps beside the activations: max-pool indices, normalisation stats.

    Small next to the activations at training sizes, but a plan that recomputes a block frees
    them too, so budget decisions on small inputs would be off without them.
    """
    meta = tensor_meta(n)
    if meta is None:
        return 0
    size = meta[0]
    numel = math.prod(size)
    mod = gm.get_submodule(str(n.target)) if n.op == "call_module" else None
    if mod is not None and not isinstance(mod, OpModule) and not runs_torch_forward(mod):
        return 0  # a module of its own forward is probed: its statistics are in the probe's bytes
    first = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
    if isinstance(mod, OpModule):
        # an op module's statistics (a compressed BatchNorm's invstd, a LayerNorm's rstd)
        x = tensor_meta(first)
        return mod.stat_bytes(x[0], x[1]) if x is not None else 0
    if _clones_input(n):
        return tensor_bytes(first) or 0
    dropout = _dropout_p(n, mod)
    if dropout:
        # the mask it multiplies by: the input's dtype on a CPU, 1-byte bool with CUDA's kernel;
        # a channel dropout's is one value per (sample, channel), in the input's dtype anywhere
        itemsize = torch.empty((), dtype=meta[1]).element_size()
        if isinstance(mod, (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.FeatureAlphaDropout)):
            return math.prod(size[:2]) * itemsize
        on_cuda = any(p.is_cuda for p in gm.parameters())
        return numel * (1 if on_cuda else itemsize)
    if n.op == "call_function" and n.target is F.scaled_dot_product_attention:
        return math_attention_bytes(n, gm, autocast)
    if isinstance(mod, nn.modules.pooling._MaxPoolNd):
        return numel * 8  # int64 indices of the output's shape
    if isinstance(mod, nn.modules.batchnorm._BatchNorm) and (mod.training or not mod.track_running_stats):
        return 2 * mod.num_features * 4  # fp32 save_mean and save_invstd
    normalized = None
    if isinstance(mod, nn.LayerNorm):
        normalized = math.prod(mod.normalized_shape)
    elif n.op == "call_function" and n.target is F.layer_norm and len(n.args) > 1:
        normalized = math.prod(n.args[1]) if isinstance(n.args[1], (list, tuple)) else None
    if normalized:
        return 2 * (numel // normalized) * 4  # fp32 mean and rstd per normalised row
    groups = mod.num_groups if isinstance(mod, nn.GroupNorm) else None
    if groups is None and n.op == "call_function" and n.target is F.group_norm and len(n.args) > 1:
        groups = n.args[1] if isinstance(n.args[1], int) else None
    if groups and size:
        return 2 * size[0] * groups * 4
    return 0


def _math_attention(n: fx.Node, gm: fx.GraphModule, autocast: torch.dtype | None):
    """``(q, k, v metas, the dtype the operands run at)`` for attention with dropout in
    training on a CPU (the math path), else None."""
    p = n.kwargs.get("dropout_p", n.args[4] if len(n.args) > 4 else 0.0)
    if not isinstance(p, (int, float)) or not 0 < p < 1 or any(t.is_cuda for t in gm.parameters()):
        return None
    q, k, v = (tensor_meta(a) if isinstance(a, fx.Node) else None for a in (list(n.args) + [None] * 3)[:3])
    if q is None or k is None or v is None or len(q[0]) < 2:
        return None
    # (under autocast fp32 operands are cast first)
    return (q, k, v), autocast if autocast is not None and q[1] == torch.float32 else q[1]


def runs_math_attention(n: fx.Node, gm: fx.GraphModule, autocast: torch.dtype | None = None) -> bool:
    """Whether ``n`` is attention the CPU math path runs in training (dropout): it then keeps
    its own copies of its operands, not the operands (:func:`math_attention_bytes`)."""
    return _math_attention(n, gm, autocast) is not None


def math_attention_bytes(n: fx.Node, gm: fx.GraphModule, autocast: torch.dtype | None = None) -> int:
    """Bytes attention with dropout keeps in training on a CPU, in place of its operands: no
    fused kernel takes dropout there, so the math path runs and keeps three
    ``[*batch, Lq, Lk]`` tensors for backward (the probabilities, the dropout mask and the
    dropped probabilities) and its own copies of q, k and v (q and k scaled, v reshaped for
    the batched matmul), in fp32 for 2-byte operands (bf16 / fp16, or fp32 ones under
    autocast: it computes in fp32 there). The plan counts the operands themselves as kept by
    nobody. CUDA's fused kernels keep an RNG state instead: 0. Hugging Face's BERT and GPT-2
    pass ``dropout_p=0.1`` in training. ``autocast``: the dtype the forward runs at under
    autocast, if any."""
    found = _math_attention(n, gm, autocast)
    if found is None:
        return 0
    (q, k, v), dtype = found
    wide = max(4, torch.empty((), dtype=dtype).element_size())
    return 3 * wide * math.prod(q[0][:-1]) * k[0][-2] + sum(wide * math.prod(t[0]) for t in (q, k, v))


def _dropout_p(n: fx.Node, mod: nn.Module | None) -> float:
    """A dropout's probability when it drops in training (0 when it keeps nothing)."""
    if isinstance(mod, nn.modules.dropout._DropoutNd):
        return float(mod.p) if 0 < mod.p < 1 else 0.0
    if n.op == "call_function" and n.target is F.dropout:
        p = n.args[1] if len(n.args) > 1 else n.kwargs.get("p", 0.5)
        training = n.args[2] if len(n.args) > 2 else n.kwargs.get("training", True)
        return float(p) if isinstance(p, (int, float)) and 0 < p < 1 and training is True else 0.0
    return 0.0
