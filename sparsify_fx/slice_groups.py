"""Slice groups: which units of a canonical graph can be narrowed together, and what follows.

A *slice group* is a set of units (output features of a Linear, output channels of a Conv,
or whole attention heads) such that keeping only a contiguous window of them is a
consistent sub-network: the producer's weight rows and bias, every per-channel op on the way
(BatchNorm's affine parameters and running statistics), and the consumer's weight columns
all take the same window, and no other tensor ever sees the units' dimension.

Starting from each producer, :func:`find_slice_groups` follows the users of its output
through window-preserving ops (elementwise activations, BatchNorm over the unit dim,
Dropout, pooling, arithmetic with Python scalars) until every path ends in a consumer (a
Linear's input features or a Conv's input channels). Anything else on the way forbids the
group, with the reason and the node (``node.format_node()``): a residual add or a product
with another tensor (both sides would need the same window), a concatenation, a
flatten/reshape (it mixes the unit dim with others), a LayerNorm over the units, a graph
output.

Attention heads form groups of their own: for ``F.linear(x, in_proj) -> chunk(3) ->
unflatten heads -> transpose -> SDPA -> transpose -> flatten -> F.linear(out_proj)`` (the
expanded ``nn.MultiheadAttention``), a window of whole heads takes the matching q, k and v
rows of ``in_proj`` and the matching columns of ``out_proj``.

Example:
    >>> import torch, sparsify_fx as sfx
    >>> m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> gm = sfx.capture(m, example_inputs=(torch.randn(2, 8),)).graph_module
    >>> analysis = sfx.find_slice_groups(gm)
    >>> [(g.kind, g.units, [c.weight for c in g.consumers]) for g in analysis.groups]
    [('channels', 16, ['2.weight'])]
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .graph import OPS_CONTAINER, _arg, _param_name, find_dense_ops, module_name_of

__all__ = [
    "SliceProducer",
    "SliceConsumer",
    "SliceGroup",
    "ForbiddenSliceGroup",
    "SliceGroupAnalysis",
    "find_slice_groups",
]


@dataclass
class SliceProducer:
    """A dense op whose output units are sliced.

    Attributes:
        node: the ``F.linear`` / ``F.convNd`` node.
        weight / bias: qualified parameter names (bias None when absent).
        offsets: where each section of units starts in the weight's output dim, in rows:
            ``(0,)`` for a plain layer, ``(0, E, 2E)`` for a fused q/k/v projection (the
            same window is taken in each section).
    """

    node: fx.Node
    weight: str
    bias: str | None
    offsets: tuple[int, ...] = (0,)


@dataclass
class SliceConsumer:
    """A dense op whose input features / channels take the group's window."""

    node: fx.Node
    weight: str


@dataclass
class SliceGroup:
    """Units that can be sliced together.

    Attributes:
        kind: ``"channels"`` (features / channels, one row each) or ``"heads"``.
        units: how many units (features, channels or heads).
        unit_size: rows per unit in the producer's weight (1, or the head dim).
        module: qualified name of the producer's module (relative to the graph).
        producers / consumers: the dense ops that are sliced on their output / input side.
        norms: BatchNorm ``call_module`` nodes on the way (parameters and running stats
            are sliced with the units).
        passthrough: the window-preserving nodes in between (activations, dropout, ...).
        head_reshapes: nodes that split the heads out with a literal head count
            (``unflatten(-1, (H, d))``): a rewrite must let that count follow the window.
    """

    kind: str
    units: int
    unit_size: int
    module: str
    producers: list[SliceProducer]
    consumers: list[SliceConsumer]
    norms: list[fx.Node] = field(default_factory=list)
    passthrough: list[fx.Node] = field(default_factory=list)
    head_reshapes: list[fx.Node] = field(default_factory=list)


@dataclass
class ForbiddenSliceGroup:
    """A producer whose units cannot be sliced, and why (naming the node responsible)."""

    producer: fx.Node
    module: str
    reason: str


@dataclass
class SliceGroupAnalysis:
    """Result of :func:`find_slice_groups`: the groups, in graph order, and the refusals."""

    groups: list[SliceGroup] = field(default_factory=list)
    forbidden: list[ForbiddenSliceGroup] = field(default_factory=list)


_CONV_FUNCS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}

# elementwise, parameter-free: the unit dim passes through unchanged
_ELEMENTWISE_FUNCS = {
    F.relu, F.gelu, F.silu, torch.sigmoid, torch.tanh, F.leaky_relu, F.hardswish,
    F.hardsigmoid, F.relu6, F.hardtanh, F.elu, F.selu, F.celu, F.mish, F.softplus,
    torch.relu, torch.nn.functional.dropout, torch.clamp, torch.abs,
}
_ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh", "clamp", "abs", "contiguous", "float", "to"}
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.Hardswish, nn.Hardsigmoid,
    nn.ReLU6, nn.Hardtanh, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
_POOL_FUNCS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
}
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_SCALAR_FUNCS = {
    operator.mul, operator.add, operator.sub, operator.truediv, torch.mul, torch.add,
    torch.sub, torch.div, operator.iadd, operator.imul,
}
_SCALAR_METHODS = {"mul", "add", "sub", "div", "mul_", "add_", "sub_", "div_"}
_REDUCE_METHODS = {"mean", "sum", "amax"}


def _rank(node: fx.Node) -> int | None:
    meta = node.meta.get("sfx_shape")
    return len(meta[0]) if meta else None


def _dense_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """'linear' / 'conv' when ``node`` is a canonical dense op with parameter weight."""
    if node.op != "call_function":
        return None
    if node.target is F.linear:
        kind = "linear"
    elif node.target in _CONV_FUNCS:
        kind = "conv"
    else:
        return None
    if _param_name(gm, _arg(node, 1, "weight")) is None:
        return None
    bias = _arg(node, 2, "bias")
    if bias is not None and _param_name(gm, bias) is None:
        return None
    return kind


def _only_tensor_arg(node: fx.Node, tracked: fx.Node) -> bool:
    """True when ``tracked`` is the only fx.Node among the node's arguments."""
    others = [a for a in node.all_input_nodes if a is not tracked]
    return not others


def _normalize(dim: int, rank: int | None) -> int:
    return dim % rank if rank is not None and dim < 0 else dim


class _Forbid(Exception):
    def __init__(self, reason: str, node: fx.Node):
        super().__init__(f"{reason}: {node.format_node()}")


class _Walk:
    """One breadth-first walk from a producer's output, collecting the group's members."""

    def __init__(self, gm: fx.GraphModule, module_calls: Counter):
        self.gm = gm
        self.module_calls = module_calls
        self.consumers: list[SliceConsumer] = []
        self.norms: list[fx.Node] = []
        self.passthrough: list[fx.Node] = []

    def run(self, start: fx.Node, dim: int) -> None:
        queue = [(start, dim)]
        seen = {start}
        while queue:
            node, dim = queue.pop(0)
            for user in node.users:
                nxt = self._step(user, node, _normalize(dim, _rank(node)))
                if nxt is not None and user not in seen:
                    seen.add(user)
                    queue.append((user, nxt))

    def _step(self, user: fx.Node, node: fx.Node, dim: int) -> int | None:
        """The unit dim in ``user``'s output when it passes the window on, None at a consumer."""
        gm = self.gm
        rank = _rank(node)
        last = dim == -1 or (rank is not None and dim == rank - 1)
        if user.op == "output":
            raise _Forbid("the units reach a graph output", user)
        if user.op == "call_module":
            if str(user.target).startswith(OPS_CONTAINER):
                raise _Forbid("already rewritten by another pass", user)
            mod = gm.get_submodule(str(user.target))
            if isinstance(mod, _ELEMENTWISE_MODULES):
                self.passthrough.append(user)
                return dim
            if isinstance(mod, _BATCHNORMS) and type(mod) in _BATCHNORMS:
                if dim != 1:
                    raise _Forbid(f"BatchNorm normalizes dim 1, the units are dim {dim}", user)
                if self.module_calls[str(user.target)] > 1:
                    raise _Forbid("BatchNorm module is called more than once", user)
                self.norms.append(user)
                return dim
            if isinstance(mod, _POOL_MODULES):
                if dim != 1:
                    raise _Forbid("pooling over the sliced dim", user)
                self.passthrough.append(user)
                return dim
            if isinstance(mod, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)):
                raise _Forbid(f"{type(mod).__name__} normalizes over the sliced units", user)
            raise _Forbid(f"{type(mod).__name__} module is not known to preserve the window", user)
        if user.op == "call_function":
            target = user.target
            kind = _dense_kind(gm, user)
            if kind is not None and _arg(user, 0, "input") is node and _arg(user, 1, "weight") is not node:
                if kind == "linear" and not last:
                    raise _Forbid(f"Linear reads the last dim, the units are dim {dim}", user)
                if kind == "conv":
                    if dim != 1:
                        raise _Forbid(f"Conv reads channels (dim 1), the units are dim {dim}", user)
                    if int(_arg(user, 6, "groups", 1)) != 1:
                        raise _Forbid("grouped / depthwise conv consumer", user)
                self.consumers.append(SliceConsumer(user, str(_arg(user, 1, "weight").target)))
                return None
            if target in _ELEMENTWISE_FUNCS and _only_tensor_arg(user, node):
                self.passthrough.append(user)
                return dim
            if target in _POOL_FUNCS:
                if dim != 1:
                    raise _Forbid("pooling over the sliced dim", user)
                self.passthrough.append(user)
                return dim
            if target in _SCALAR_FUNCS:
                if _only_tensor_arg(user, node):
                    self.passthrough.append(user)
                    return dim
                what = "residual add" if target in (operator.add, torch.add, operator.iadd) else "binary op"
                raise _Forbid(f"{what} with another tensor (both sides would need the same window)", user)
            if target in (torch.cat, torch.concat, torch.stack):
                raise _Forbid("concatenation mixes the group with other tensors", user)
            if target in (torch.flatten, torch.reshape):
                raise _Forbid("flatten/reshape mixes the sliced dim with others", user)
            if target in (F.layer_norm, F.group_norm, F.rms_norm):
                raise _Forbid("normalization over the sliced units", user)
            name = getattr(target, "__name__", str(target))
            raise _Forbid(f"{name} is not known to preserve the window", user)
        if user.op == "call_method":
            method = str(user.target)
            if method in _ELEMENTWISE_METHODS and _only_tensor_arg(user, node):
                self.passthrough.append(user)
                return dim
            if method in _SCALAR_METHODS:
                if _only_tensor_arg(user, node):
                    self.passthrough.append(user)
                    return dim
                raise _Forbid("binary op with another tensor (both sides would need the same window)", user)
            if method in _REDUCE_METHODS and _only_tensor_arg(user, node):
                return self._reduce(user, dim, rank)
            if method in ("flatten", "view", "reshape", "unflatten", "permute", "transpose"):
                raise _Forbid(f"{method} moves or mixes the sliced dim", user)
            raise _Forbid(f"method {method!r} is not known to preserve the window", user)
        raise _Forbid(f"{user.op} node is not known to preserve the window", user)

    def _reduce(self, user: fx.Node, dim: int, rank: int | None) -> int:
        # x.mean((2, 3)) after a conv: the channel dim survives, only its position may change
        dims = _arg(user, 1, "dim")
        keepdim = bool(_arg(user, 2, "keepdim", False))
        if dims is None or rank is None:
            raise _Forbid("reduction over all dims (or of unknown rank) includes the units", user)
        dims = [d % rank for d in ((dims,) if isinstance(dims, int) else dims)]
        if dim in dims:
            raise _Forbid("reduction over the sliced dim", user)
        self.passthrough.append(user)
        return dim if keepdim else dim - sum(d < dim for d in dims)


def _single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _is_method(node: fx.Node | None, name: str) -> bool:
    return node is not None and node.op == "call_method" and node.target == name


def _head_split(node: fx.Node | None, embed: int) -> tuple[int, int] | None:
    """``(H, d)`` when ``node`` splits the last dim into heads with literal sizes, else None.

    ``unflatten(-1, (H, d))`` (expanded MultiheadAttention) or ``view/reshape(B, N, H, d)``
    (separate q/k/v projections, HF style).
    """
    if node is None or node.op != "call_method":
        return None
    if node.target == "unflatten" and len(node.args) == 3 and node.args[1] in (-1, 2):
        sizes = tuple(node.args[2])
    elif node.target in ("view", "reshape") and len(node.args) == 5:
        sizes = tuple(node.args[3:])
    else:
        return None
    if len(sizes) != 2 or not all(isinstance(v, int) for v in sizes) or sizes[1] <= 0:
        return None
    if sizes[0] == -1 and embed % sizes[1] == 0:  # view(B, N, -1, d): newer HF spelling
        sizes = (embed // sizes[1], sizes[1])
    return sizes if sizes[0] * sizes[1] == embed else None


def _is_transpose_12(node: fx.Node | None) -> bool:
    return _is_method(node, "transpose") and tuple(node.args[1:]) in ((1, 2), (2, 1))


def _heads_to_sdpa(branch: fx.Node, embed: int) -> tuple[fx.Node, fx.Node, tuple[int, int]]:
    """From one q/k/v tensor to its attention call: ``(split, sdpa, (H, d))`` or _Forbid."""
    split = _single_user(branch)
    sizes = _head_split(split, embed)
    if sizes is None:
        raise _Forbid("heads are not split by unflatten(-1, (H, d)) / view(B, N, H, d) with literal sizes",
                      split or branch)
    trans = _single_user(split)
    if not _is_transpose_12(trans):
        raise _Forbid("heads are not moved by transpose(1, 2)", trans or split)
    sdpa = _single_user(trans)
    if sdpa is None or sdpa.target is not F.scaled_dot_product_attention or trans not in sdpa.args[:3]:
        raise _Forbid("q/k/v do not meet in scaled_dot_product_attention", sdpa or trans)
    return split, sdpa, sizes


def _merge_heads(gm: fx.GraphModule, sdpa: fx.Node, embed: int) -> tuple[list[fx.Node], list[fx.Node], fx.Node]:
    """SDPA -> transpose(1, 2) -> [contiguous] -> flatten(2) | reshape(B, N, E) -> out Linear."""
    if len(sdpa.args) > 3 or sdpa.kwargs.get("attn_mask") is not None:
        raise _Forbid("attention mask may carry a head dim", sdpa)
    back = _single_user(sdpa)
    if not _is_transpose_12(back):
        raise _Forbid("attention output is not transpose(1, 2)", back or sdpa)
    merge, passthrough, reshapes = _single_user(back), [sdpa, back], []
    if _is_method(merge, "contiguous"):
        passthrough.append(merge)
        merge = _single_user(merge)
    if _is_method(merge, "flatten") and merge.args[1:] in ((2,), (-2,)) and not merge.kwargs:
        passthrough.append(merge)
    elif (merge is not None and merge.op == "call_method" and merge.target in ("view", "reshape")
          and len(merge.args) == 4 and _merges_heads(back, merge, embed)):
        reshapes.append(merge)
    else:
        raise _Forbid("heads are not merged by flatten(2) or reshape(B, N, E)", merge or back)
    out = _single_user(merge)
    if out is None or _dense_kind(gm, out) != "linear" or _arg(out, 0, "input") is not merge:
        raise _Forbid("merged heads do not feed an out-projection Linear", out or merge)
    return passthrough, reshapes, out


def _merges_heads(heads: fx.Node, merge: fx.Node, embed: int) -> bool:
    """True when ``reshape(B, N, E)`` of ``[B, N, H, d]`` keeps B, N and merges the heads."""
    last = merge.args[3]
    if isinstance(last, int) and last not in (embed, -1):
        return False
    before, after = heads.meta.get("sfx_shape"), merge.meta.get("sfx_shape")
    if before is None or after is None:
        # without recorded shapes, only a literal E or -1 proves the last dim is the heads
        return isinstance(last, int)
    return tuple(after[0]) == (*before[0][:2], embed)


def _producer(gm: fx.GraphModule, node: fx.Node, offsets: tuple[int, ...]) -> SliceProducer:
    bias = _arg(node, 2, "bias")
    weight = str(_arg(node, 1, "weight").target)
    return SliceProducer(node, weight, str(bias.target) if bias is not None else None, offsets)


def _match_heads(gm: fx.GraphModule, producer: fx.Node) -> SliceGroup:
    """The head group a q/k/v projection belongs to, or _Forbid saying where the pattern broke.

    Fused (expanded ``nn.MultiheadAttention``): ``linear -> chunk(3, -1) -> [0], [1], [2]``,
    each split into heads. Separate (HF style): three Linears, each split into heads, meeting
    in one SDPA call as its q, k and v.
    """
    out_rows = gm.get_parameter(str(_arg(producer, 1, "weight").target)).shape[0]
    first = _single_user(producer)
    passthrough: list[fx.Node] = []
    if _is_method(first, "chunk"):
        if tuple(first.args[1:]) not in ((3, -1), (3, 2)):
            raise _Forbid("q/k/v projection output is not chunk(3, -1)", first)
        embed = out_rows // 3
        items = sorted(first.users, key=lambda n: n.args[1] if n.target is operator.getitem else -1)
        if [n.args[1] for n in items if n.target is operator.getitem] != [0, 1, 2]:
            raise _Forbid("q/k/v chunk is not consumed as [0], [1], [2]", first)
        branches = items
        producers = [_producer(gm, producer, (0, embed, 2 * embed))]
        passthrough += [first, *items]
    else:
        embed = out_rows
        _, sdpa, _ = _heads_to_sdpa(producer, embed)
        branches, producers = [], []
        for arg in sdpa.args[:3]:
            # walk back: transpose <- head split <- q/k/v Linear
            split = arg.args[0] if isinstance(arg, fx.Node) and _is_transpose_12(arg) else None
            linear = split.args[0] if isinstance(split, fx.Node) and split.args else None
            if not isinstance(linear, fx.Node) or _dense_kind(gm, linear) != "linear":
                raise _Forbid("an attention input is not a Linear split into heads", arg if isinstance(arg, fx.Node) else sdpa)
            if gm.get_parameter(str(_arg(linear, 1, "weight").target)).shape[0] != embed:
                raise _Forbid("q, k and v projections differ in width", linear)
            branches.append(linear)
            producers.append(_producer(gm, linear, (0,)))
    sdpa = None
    heads = None
    reshapes: list[fx.Node] = []
    for i, branch in enumerate(branches):
        split, attn, sizes = _heads_to_sdpa(branch, embed)
        if attn.args[i] is not _single_user(split):
            raise _Forbid("q, k and v reach the attention call in the wrong order", attn)
        if (sdpa is not None and attn is not sdpa) or (heads is not None and sizes != heads):
            raise _Forbid("q, k and v go to different attention calls or head splits", attn)
        sdpa, heads = attn, sizes
        reshapes.append(split)
        passthrough += [split, _single_user(split)]
    assert sdpa is not None and heads is not None
    merged, merge_reshapes, out = _merge_heads(gm, sdpa, embed)
    return SliceGroup(
        kind="heads",
        units=heads[0],
        unit_size=heads[1],
        module=module_name_of(producer) or producers[0].weight.rpartition(".")[0],
        producers=producers,
        consumers=[SliceConsumer(out, str(_arg(out, 1, "weight").target))],
        passthrough=passthrough + merged,
        head_reshapes=reshapes + merge_reshapes,
    )


def find_slice_groups(gm: fx.GraphModule) -> SliceGroupAnalysis:
    """Every sliceable group of units in a canonical graph, and every producer that is not.

    Args:
        gm: a canonical ``GraphModule`` (as made by :func:`sparsify_fx.capture`). Recorded
            shapes (``node.meta["sfx_shape"]``) let BatchNorm1d / pooling / reductions after
            a Linear be checked; without them such paths are refused.

    Returns:
        A :class:`SliceGroupAnalysis`: one :class:`SliceGroup` per producer whose units can
        be sliced, one :class:`ForbiddenSliceGroup` (with the reason and the node) per
        Linear / Conv that cannot.
    """
    analysis = SliceGroupAnalysis()
    module_calls = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")
    weight_uses = Counter(
        str(_arg(n, 1, "weight").target) for n in gm.graph.nodes if _dense_kind(gm, n) is not None)
    claimed: set[fx.Node] = set()  # k/v projections already grouped with their q projection
    for op in find_dense_ops(gm)[0]:
        if op.kind == "matmul":  # otherwise this layer would be missing from the report
            analysis.forbidden.append(ForbiddenSliceGroup(
                op.node, op.module_name,
                "weight in the transposed x @ W[in, out] layout (GPT-2 Conv1D / addmm): SliceOut slices "
                "F.linear and convolutions only"))
    for node in gm.graph.nodes:
        kind = _dense_kind(gm, node)
        if kind is None or node in claimed:
            continue
        weight = str(_arg(node, 1, "weight").target)
        module = module_name_of(node) or weight.rpartition(".")[0]
        try:
            if weight_uses[weight] > 1:
                raise _Forbid(f"weight {weight} is shared by {weight_uses[weight]} ops", node)
            if kind == "conv" and int(_arg(node, 6, "groups", 1)) != 1:
                raise _Forbid("grouped / depthwise conv producer", node)
            first = _single_user(node)
            rows = gm.get_parameter(weight).shape[0]
            if kind == "linear" and (_is_method(first, "chunk") or _head_split(first, rows) is not None):
                group = _match_heads(gm, node)
                claimed.update(p.node for p in group.producers)
            else:
                walk = _Walk(gm, module_calls)
                walk.run(node, -1 if kind == "linear" else 1)
                bias = _arg(node, 2, "bias")
                group = SliceGroup(
                    kind="channels",
                    units=gm.get_parameter(weight).shape[0],
                    unit_size=1,
                    module=module,
                    producers=[SliceProducer(node, weight, str(bias.target) if bias is not None else None)],
                    consumers=walk.consumers,
                    norms=walk.norms,
                    passthrough=walk.passthrough,
                )
            for member in [*group.producers, *group.consumers]:
                if weight_uses[member.weight] > 1:
                    raise _Forbid(f"weight {member.weight} is shared", member.node)
            if not group.consumers:
                raise _Forbid("the units reach no consumer", node)
        except _Forbid as e:
            analysis.forbidden.append(ForbiddenSliceGroup(node, module, str(e)))
            continue
        analysis.groups.append(group)
    return analysis
