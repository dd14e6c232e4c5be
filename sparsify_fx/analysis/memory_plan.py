"""Saved-tensor liveness: which tensors the backward keeps, who keeps them, and in what form.

A compression only frees memory when the compressed copy is the *only* holder of a tensor:
``Conv -> ReLU -> Conv`` with the second conv's input compressed still holds that tensor in
full, because ReLU's backward keeps its output. :func:`memory_plan` answers, per tensor of a
canonical graph: which nodes' backward keep it dense (``"kept by relu_3 backward"``), whether
the recipe freed it, and how many bytes stay held after the forward.

Views share storage (``reshape``, ``transpose``, ``getitem`` of a ``chunk``...), and so does
an in-place op's result (``out += identity``, ``relu(x, inplace=True)``): holders of a
view hold its base, so tensors are grouped by storage with a union-find before counting.
The graph of tensors and holders is a ``networkx.DiGraph`` (``plan.graph``).

Autograd saves nothing where no gradient flows: a tensor requires grad when an input that
requires grad or a trainable parameter feeds it (a model's inputs are data unless said
otherwise), and an op whose output does not require grad keeps nothing (a frozen backbone,
a ``torch.no_grad()`` region of an exported graph). Where it does, an op keeps only what
the gradients it owes need: ``F.linear`` keeps its input only for a trainable weight, ``a * b``
keeps ``a`` only when ``b`` requires grad; a convolution keeps its input whenever it runs
with grad. ``nn.Identity`` returns its input (the same storage), and a torch.nn module whose
class overrides ``forward`` (a BatchNorm that also applies its activation in place) is not
matched by its base class's rule: it is probed (``saved_probe``).

About 600 lines: the rule table (what each op's backward keeps), the storage and alias walk,
and the per-node gradient analysis all feed one liveness pass and are read together.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from sparsify_fx.analysis.saved_probe import probe
from sparsify_fx.analysis.shapes import tensor_bytes, tensor_meta
from sparsify_fx.graph import meta
from sparsify_fx.graph.form import OPS_CONTAINER, is_in_place
from sparsify_fx.graph.op_module import OpModule
from sparsify_fx.graph.op_table import VIEW_METHODS, is_view

__all__ = ["TensorLiveness", "MemoryPlan", "memory_plan", "compressed_bytes_of", "overwritten_in_place",
           "math_attention_bytes", "SAVES", "requires_grad"]

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
    F.dropout, F.pad, torch.mean, torch.sum,  # (dropout's mask: _side_bytes)
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
# (matched only when the module runs torch's own forward: see _torch_forward)
_MODULE_SAVES: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.modules.batchnorm._BatchNorm, _INPUT),
    (nn.LayerNorm, _INPUT),
    (nn.GroupNorm, _INPUT),
    (nn.modules.pooling._MaxPoolNd, _INPUT),
    (nn.modules.dropout._DropoutNd, "nothing"),  # (its mask: _side_bytes)
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


@dataclass
class TensorLiveness:
    """One tensor (a node's output) and who keeps it for backward."""

    node: str
    module: str
    bytes: int | None
    holders: list[str] = field(default_factory=list)  # nodes whose backward keeps it dense
    compressed_by: list[str] = field(default_factory=list)  # nodes keeping a compressed form
    storage: str = ""  # the node whose storage this tensor shares (itself when not a view)
    is_input: bool = False

    @property
    def held(self) -> bool:
        return bool(self.holders)

    @property
    def reason(self) -> str:
        if self.holders:
            return "kept by " + ", ".join(f"{h} backward" for h in self.holders)
        if self.compressed_by:
            return "freed: only compressed copies (" + ", ".join(self.compressed_by) + ")"
        return "not kept"


@dataclass
class MemoryPlan:
    """Per-tensor liveness of one graph and the bytes the backward holds after the forward.

    ``held_bytes`` counts each held storage once (plus ``side_bytes``: max-pool indices and
    normalisation statistics); ``compressed_bytes`` adds the compressed copies
    the rewritten ops save (from the rewrite records). ``unknown`` lists ops whose backward
    this analysis does not know (assumed to keep their tensor inputs).
    """

    tensors: list[TensorLiveness]
    held_bytes: int
    compressed_bytes: int
    unknown: list[str]
    graph: nx.DiGraph
    side_bytes: dict[str, int] = field(default_factory=dict)  # node -> indices / norm stats kept
    #: each held storage once, by its root node (a view's base; a base that is no tensor, such
    #: as a tuple of outputs, holds its largest member's bytes): what ``held_bytes`` sums
    storage_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return self.held_bytes + self.compressed_bytes

    def by_node(self) -> dict[str, TensorLiveness]:
        return {t.node: t for t in self.tensors}

    def still_dense(self) -> list[TensorLiveness]:
        """Tensors some backward keeps dense, largest first."""
        return sorted((t for t in self.tensors if t.held), key=lambda t: -(t.bytes or 0))


# modules whose output may be their input's storage (Identity returns its input itself)
_ALIAS_MODULES: tuple[type[nn.Module], ...] = (nn.Identity, nn.Flatten, nn.Unflatten)
# matmul-like ops whose backward keeps each operand only for the other's gradient
_KEEPS_THE_OTHER = {torch.matmul, torch.bmm, operator.mul, torch.mul, operator.imul}
# a / b: a's gradient needs b; b's gradient needs a and b
_DIVISIONS = {operator.truediv, operator.itruediv}
# grad-mode switches an exported graph records for ``with torch.no_grad()``
_SET_GRAD_ENABLED = {torch._C._set_grad_enabled}
# ops whose result never requires grad, whatever their inputs
_NO_GRAD_METHODS = {"detach", "size", "dim"}
# ops autocast runs at its lower precision (on CPU and CUDA): each keeps its operands cast to
# that dtype, an activation's cast a copy of its own per call (not the operand's storage), a
# trainable weight's one copy per step (autocast's weight cache), both held until backward
_AUTOCAST_LOW = {F.linear, F.conv1d, F.conv2d, F.conv3d, torch.matmul, torch.bmm, torch.addmm,
                 F.scaled_dot_product_attention}


def _autocast_copies(n: fx.Node, gm: fx.GraphModule, kept: list[fx.Node], grad: dict[str, bool],
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
                         if a.op == "get_attr" and _trainable(gm, a) and len(getattr(
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
        copies += weight_cast(w, str(w.target) if _trainable(gm, w) else f"{w.target}@{n.name}")
    return same, copies


def _torch_forward(mod: nn.Module) -> bool:
    """True when ``mod`` runs torch.nn's own forward: a subclass that overrides it (timm's
    ``BatchNormAct2d`` applies an activation after its batch norm) is another op."""
    return getattr(type(mod).forward, "__module__", "").startswith("torch.nn.")


def _aliases_input(n: fx.Node, gm: fx.GraphModule) -> bool:
    if n.op != "call_module" or str(n.target).startswith(OPS_CONTAINER + "."):
        return False
    mod = gm.get_submodule(str(n.target))
    return isinstance(mod, _ALIAS_MODULES) and _torch_forward(mod)


def _placeholder_grad(n: fx.Node, inputs_require_grad: bool | None) -> bool:
    shape = tensor_meta(n)
    if shape is not None and not (shape[1].is_floating_point or shape[1].is_complex):
        return False  # token ids, masks: never differentiable
    if inputs_require_grad is not None:
        return inputs_require_grad
    value = n.meta.get("example_value", n.meta.get("val"))
    # a Dynamo graph's placeholders carry their example (an activation after a graph break
    # requires grad); anything else is the model's own input: data
    return bool(getattr(value, "requires_grad", False))


def requires_grad(gm: fx.GraphModule, inputs_require_grad: bool | None = None) -> dict[str, bool]:
    """Which nodes' outputs require grad in a training forward (node name -> bool).

    Args:
        inputs_require_grad: whether the graph's floating-point inputs require grad; None
            reads a Dynamo graph's example values and otherwise takes them as data (False).
    """
    grad: dict[str, bool] = {}
    enabled = True

    def of(a: fx.Node) -> bool:
        return _trainable(gm, a) if a.op == "get_attr" else grad.get(a.name, False)

    for n in gm.graph.nodes:
        if n.op == "placeholder":
            grad[n.name] = _placeholder_grad(n, inputs_require_grad)
            continue
        if n.op == "call_function" and n.target in _SET_GRAD_ENABLED:
            enabled = bool(n.args[0]) if n.args else enabled
            grad[n.name] = False
            continue
        if n.op in ("get_attr", "output"):
            grad[n.name] = n.op == "get_attr" and _trainable(gm, n)
            continue
        shape = tensor_meta(n)
        if not enabled or (n.op == "call_method" and n.target in _NO_GRAD_METHODS) or (
                shape is not None and not (shape[1].is_floating_point or shape[1].is_complex)):
            grad[n.name] = False
            continue
        flows = any(of(a) for a in n.all_input_nodes)
        if not flows and n.op == "call_module":
            flows = any(p.requires_grad for p in gm.get_submodule(str(n.target)).parameters())
        grad[n.name] = flows
    return grad


def _root(parent: dict[str, str], name: str) -> str:
    while parent[name] != name:
        parent[name] = parent[parent[name]]
        name = parent[name]
    return name


def _is_activation(arg: Any) -> bool:
    return isinstance(arg, fx.Node) and arg.op not in ("get_attr",) and meta.SHAPE in arg.meta


def _trainable(gm: fx.GraphModule, attr: fx.Node) -> bool:
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


def _kept_by(node: fx.Node, gm: fx.GraphModule, grad: dict[str, bool]) -> tuple[list[fx.Node], bool, bool]:
    """(tensors this node's backward keeps dense, keeps-compressed?, known op?)"""
    acts = [a for a in node.all_input_nodes if _is_activation(a)]
    if not acts and meta.SHAPE not in node.meta:
        return [], False, True  # shape arithmetic and other non-tensor values keep nothing
    if not grad.get(node.name, True):
        return [], False, True  # no gradient flows through it: autograd records nothing

    def needs(a: Any) -> bool:  # does a gradient flow into this operand?
        if not isinstance(a, fx.Node):
            return False
        return _trainable(gm, a) if a.op == "get_attr" else grad.get(a.name, True)
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
            return [], False, True  # keeps its (N, 1, ...) mask: _side_bytes
        for klass, kind in _MODULE_SAVES if _torch_forward(mod) else ():
            if isinstance(mod, klass):
                if kind == "adaptive":
                    kind = "nothing" if _pools_to_one(node) else _INPUT
                return (acts[:1] if kind == _INPUT else [node] if kind == _OUTPUT else []), False, True
        return acts, False, False
    if node.op == "call_function":
        target = node.target
        if _clones_input(node):
            return [], False, True  # it keeps a clone of its input instead: _side_bytes
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


def _side_bytes(n: fx.Node, gm: fx.GraphModule, autocast: torch.dtype | None = None) -> int:
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
    if mod is not None and not isinstance(mod, OpModule) and not _torch_forward(mod):
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


def overwritten_in_place(node: fx.Node) -> bool:
    """True when an in-place op writes over ``node``'s value, directly or through a view of
    it (``out.transpose(1, 2).reshape(...)`` then ``+=``): an op that keeps its own output
    for backward cannot be installed there."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        for u in n.users:
            if u.args and u.args[0] is n and is_in_place(u):
                return True
            if is_view(u) and u not in seen:
                seen.add(u)
                todo.append(u)
    return False


def compressed_bytes_of(rewrites) -> dict[str, int]:
    """``memory_plan``'s ``compressed_bytes`` from rewrite records (``sfx.Rewrite``): the bytes
    each keeps, under its node's name and its op module's."""
    found: dict[str, int] = {}
    for r in rewrites:
        found[r.node] = r.saved_bytes_after or 0
        if r.replacement:
            found.setdefault(str(r.replacement), r.saved_bytes_after or 0)
    return found


def memory_plan(gm: fx.GraphModule, compressed_bytes: dict[str, int] | None = None, *,
                inputs_require_grad: bool | None = None, autocast: torch.dtype | None = None) -> MemoryPlan:
    """Liveness of every tensor of a canonical graph with recorded shapes.

    Args:
        gm: a canonical GraphModule (from ``sfx.capture`` / ``sfx.sparsify``) whose nodes carry
            ``meta["sfx_shape"]`` (recorded when example inputs were given).
        compressed_bytes: bytes each compressing op node keeps (node name, or its op module's
            target -> bytes); :func:`compressed_bytes_of` reads them from rewrite records.
        inputs_require_grad: whether the graph's floating-point inputs require grad (True for
            a graph of a submodule, whose inputs are activations); None takes a Dynamo graph's
            example values, and otherwise the inputs as data (False).
        autocast: the autocast dtype the training forward runs at (None: the graph's
            ``gm.meta[meta.AUTOCAST]``, set by ``MemoryBudget``; absent: no autocast). Under it,
            Linear / Conv / matmul / attention keep their operands cast to it (a copy of an fp32
            activation per call, one per trainable weight), counted as that node's side bytes.

    Example:
        >>> import torch, sparsify_fx as sfx
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> fast = sfx.sparsify(m, sfx.DropIT(keep=0.5, skip_first_last=False), (torch.randn(3, 4),))
        >>> [t.reason for t in memory_plan(fast).tensors if t.node == "relu"]
        ['kept by relu backward']
    """
    compressed_bytes = dict(compressed_bytes or {})
    nodes = [n for n in gm.graph.nodes if n.op not in ("output", "get_attr")]
    parent = {n.name: n.name for n in nodes}
    for n in nodes:
        # an in-place op's result is its first operand's storage, as a view's is its base's
        if (is_view(n) or is_in_place(n) or _aliases_input(n, gm)) and n.args and isinstance(n.args[0], fx.Node) \
                and n.args[0].name in parent:
            parent[_root(parent, n.name)] = _root(parent, n.args[0].name)
    info = {
        n.name: TensorLiveness(n.name, str(n.meta.get(meta.MODULE, "")), tensor_bytes(n),
                               is_input=n.op == "placeholder")
        for n in nodes
    }
    graph = nx.DiGraph()
    unknown: list[str] = []
    compressed_total = 0
    extra = 0
    side_bytes: dict[str, int] = {}
    grad = requires_grad(gm, inputs_require_grad)
    low = autocast if autocast is not None else getattr(gm, "meta", {}).get(meta.AUTOCAST)
    cast_weights: set[str] = set()
    for n in nodes:
        graph.add_node(n.name, module=info[n.name].module, bytes=info[n.name].bytes)
        kept, compresses, known = _kept_by(n, gm, grad)
        if not grad.get(n.name, True):
            continue  # no autograd node: no saved tensors, no statistics, no compressed copy
        if n.op == "call_function" and n.target is F.scaled_dot_product_attention \
                and _math_attention(n, gm, low) is not None:
            kept = []  # its own copies of the operands instead: math_attention_bytes
        if low is not None:
            kept, copies = _autocast_copies(n, gm, kept, grad, low, cast_weights)
            if copies:
                side_bytes[n.name] = side_bytes.get(n.name, 0) + copies
                extra += copies
        grads = tuple(grad.get(a.name, True) for a in n.all_input_nodes if a.op != "get_attr")
        if not known and (measured := probe(n, gm, grads)) is not None:
            # an op with no rule, run once on its recorded shapes (saved_probe)
            inputs = [a for a in n.all_input_nodes if a.op != "get_attr"]
            kept = [inputs[i] for i in measured.inputs] + ([n] if measured.output else [])
            known = True
            if measured.internal:
                side_bytes[n.name] = side_bytes.get(n.name, 0) + measured.internal
                extra += measured.internal
        if not known:
            unknown.append(n.format_node())
        for t in kept:
            if t.name in info:
                info[t.name].holders.append(n.name)
                graph.add_edge(t.name, n.name, form="dense")
        if compresses:
            for t in n.all_input_nodes:
                if t.name in info and _is_activation(t):
                    info[t.name].compressed_by.append(n.name)
                    graph.add_edge(t.name, n.name, form="compressed")
            origin = n.meta.get(meta.ORIGIN, n.name)
            # a fused op replaced its consumer (its origin is the Linear / Conv it now is): its
            # module's name is what its rewrite record names
            found = compressed_bytes.get(n.name, compressed_bytes.get(origin))
            if found is None and n.op == "call_module":
                found = compressed_bytes.get(str(n.target))
            compressed_total += found or 0
        if side := _side_bytes(n, gm, low):
            side_bytes[n.name] = side_bytes.get(n.name, 0) + side
            extra += side
    # a storage is held when any tensor sharing it is held; count each storage once
    held_storages: dict[str, int] = {}
    for t in info.values():
        t.storage = _root(parent, t.node)
    groups: dict[str, list[TensorLiveness]] = {}
    for t in info.values():
        groups.setdefault(t.storage, []).append(t)
    for root, members in groups.items():
        holders = sorted({h for m in members for h in m.holders})
        if holders:
            base = info[root]
            held_storages[root] = base.bytes or max((m.bytes or 0) for m in members)
            if not base.holders:
                base.holders = holders  # a view's holder holds the base
    return MemoryPlan(list(info.values()), sum(held_storages.values()) + extra, compressed_total,
                      unknown, graph, side_bytes, held_storages)
