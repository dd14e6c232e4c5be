"""The walk behind :func:`sparsify_fx.find_slice_groups`: from one producer (a Linear / Conv /
attention projection), follow the users of its output and track where its units are (which
dim counted from the right, how many elements of it one unit spans) through every op, to the
consumers that read them, or to the node that forbids narrowing them.

Each canonical op has a category (the tables below: one per function target or Tensor method
name), and :class:`_Walk` one rule (``_on_<category>``) per category. ``slice_groups.py`` runs
one walk per producer, joins the producers whose tensors meet, and builds the groups.

The module is ~700 lines because :class:`_Walk` is one state machine: its rules share the
tracked positions and the queue, and each sits next to the others of its kind. The op
categories themselves are data in ``sparsify_fx.graph.op_table``.
"""

from __future__ import annotations

import math
import operator
from collections import Counter, deque
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from sparsify_fx.analysis.shapes import tensor_meta
from sparsify_fx.analysis.slice_group_types import SliceConsumer
from sparsify_fx.graph import meta
from sparsify_fx.graph.form import OPS_CONTAINER, _arg, _param_name
from sparsify_fx.graph.op_table import (
    ADD_FUNCTIONS,
    ADD_METHODS,
    BATCH_NORM_MODULES,
    CONV_NDIM,
    ELEMENTWISE_MODULES,
    ELEMENTWISE_UNARY_FUNCTIONS,
    ELEMENTWISE_UNARY_METHODS,
    GROUP_NORM_FUNCTIONS,
    LAYER_NORM_FUNCTIONS,
    LAYER_NORM_MODULES,
    MUL_FUNCTIONS,
    MUL_METHODS,
    POOL_FUNCTIONS,
    POOL_MODULES,
    REDUCE_FUNCTIONS,
    REDUCE_METHODS,
    SAME_VALUE_METHODS,
    SOFTMAX_FUNCTIONS,
    SOFTMAX_METHODS,
)

__all__: list[str] = []  # internal to find_slice_groups


# how each canonical op treats the unit dim; one category per target (functions) or name
# (Tensor methods). The walk below has one rule per category; the sets are op_table's.
_FUNCTION_CATEGORY: dict[Any, str] = {
    **dict.fromkeys(ELEMENTWISE_UNARY_FUNCTIONS, "unary"),  # a window passes through
    **dict.fromkeys(POOL_FUNCTIONS, "pool"),
    **dict.fromkeys(ADD_FUNCTIONS, "add"),
    **dict.fromkeys(MUL_FUNCTIONS, "mul"),
    **dict.fromkeys(REDUCE_FUNCTIONS, "reduce"),
    **dict.fromkeys(SOFTMAX_FUNCTIONS, "softmax"),
    **dict.fromkeys(LAYER_NORM_FUNCTIONS, "layer_norm"),
    **dict.fromkeys(GROUP_NORM_FUNCTIONS, "group_norm"),
    torch.reshape: "reshape",
    torch.flatten: "flatten",
    torch.transpose: "transpose",
    torch.permute: "permute",
    torch.t: "t",
    torch.unsqueeze: "unsqueeze",
    torch.squeeze: "squeeze",
    torch.cat: "cat",
    torch.concat: "cat",
    torch.stack: "stack",
    torch.chunk: "chunk",
    torch.split: "chunk",
    operator.getitem: "getitem",
    F.scaled_dot_product_attention: "sdpa",
    torch.matmul: "matmul",
    torch.bmm: "matmul",
    torch.ops.aten._assert_tensor_metadata.default: "ignore",  # checks dtype / device only
    getattr: "getattr",  # x.shape / x.dtype
}
_METHOD_CATEGORY: dict[str, str] = {
    **dict.fromkeys(ELEMENTWISE_UNARY_METHODS | SAME_VALUE_METHODS, "unary"),
    "type_as": "dtype_only",  # the other tensor only gives a dtype
    **dict.fromkeys(ADD_METHODS, "add"),
    **dict.fromkeys(MUL_METHODS, "mul"),
    **dict.fromkeys(REDUCE_METHODS, "reduce"),
    **dict.fromkeys(SOFTMAX_METHODS, "softmax"),
    **dict.fromkeys(["view", "reshape"], "reshape"),
    "flatten": "flatten",
    "unflatten": "unflatten",
    "transpose": "transpose",
    "permute": "permute",
    "t": "t",
    "unsqueeze": "unsqueeze",
    "squeeze": "squeeze",
    "expand": "expand",
    "chunk": "chunk",
    "split": "chunk",
    "size": "size",
}


def _category(node: fx.Node) -> str | None:
    if node.op == "call_function":
        try:
            return _FUNCTION_CATEGORY.get(node.target)
        except TypeError:  # unhashable target
            return None
    if node.op == "call_method":
        return _METHOD_CATEGORY.get(str(node.target))
    return None


class _Forbid(Exception):
    def __init__(self, reason: str, node: fx.Node):
        super().__init__(f"{reason}: {node.format_node()}")
        self.reason, self.node = reason, node


class _Coarsen(Exception):
    """The walk needs fewer, larger units (a reshape splits the unit dim into blocks)."""

    def __init__(self, units: int):
        super().__init__(units)
        self.units = units


def _dense_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """'linear' / 'conv' when ``node`` is a canonical dense op with parameter weight."""
    if node.op != "call_function":
        return None
    if node.target is F.linear:
        kind = "linear"
    elif node.target in CONV_NDIM:
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
    return all(a is tracked for a in node.all_input_nodes)


_INT_ARITHMETIC = {operator.mul, operator.add, operator.sub, operator.floordiv}


def _paths_of(value: Any, target: fx.Node, path: tuple[int, ...] = ()) -> Any:
    """Every index path at which ``target`` appears inside nested args."""
    if value is target:
        yield path
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _paths_of(item, target, (*path, i))


def _single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _norm_dim(dim: Any, rank: int) -> int:
    if not isinstance(dim, int) or not -rank <= dim < max(rank, 1):
        raise ValueError(dim)
    return dim % rank if rank else 0


def _dims_arg(value: Any) -> list[Any] | None:
    if value is None:
        return None
    return list(value) if isinstance(value, (list, tuple)) else [value]


class _Graph:
    """What every walk reads: the graph, recorded shapes, call counts, node order."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.recorded = any(meta.SHAPE in n.meta for n in gm.graph.nodes)
        self.module_calls = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")
        self.weight_uses = Counter(
            str(_arg(n, 1, "weight").target) for n in gm.graph.nodes if _dense_kind(gm, n) is not None)

    def shape(self, node: Any) -> tuple[int, ...] | None:
        """A node's tensor shape (recorded, or from export / Dynamo metadata), else None."""
        if not isinstance(node, fx.Node):
            return None
        meta = tensor_meta(node)
        if meta is not None:
            return tuple(meta[0])
        for key in ("val", "example_value"):
            value = node.meta.get(key)
            if isinstance(value, torch.Tensor):
                try:
                    return tuple(int(s) for s in value.shape)
                except (TypeError, ValueError):  # symbolic sizes
                    return None
        if node.op == "get_attr":
            obj: Any = self.gm
            for part in str(node.target).split("."):
                obj = getattr(obj, part, None)
            return tuple(obj.shape) if isinstance(obj, torch.Tensor) else None
        return None

    def is_scalar(self, node: Any) -> bool:
        """True for values known not to be tensors (Python numbers, sizes read in the graph)."""
        if not isinstance(node, fx.Node):
            return True
        if self.shape(node) is not None or node.op == "get_attr":
            return False
        for key in ("val", "example_value"):
            if key in node.meta:
                return not isinstance(node.meta[key], torch.Tensor)
        # the recorder stores every tensor's shape: a node without one holds no tensor
        return self.recorded and node.op != "placeholder"

    def broadcasts(self, node: Any, dim: int) -> bool:
        """True when ``node`` is constant along the unit dim ``dim`` (counted from the right)."""
        if self.is_scalar(node):
            return True
        shape = self.shape(node)
        return shape is not None and (len(shape) < -dim or shape[dim] == 1)


def _reshape_map(in_shape: tuple[int, ...], pos: int, out_shape: tuple[int, ...]) -> tuple[int, int, bool]:
    """Where the unit dim ``pos`` of ``in_shape`` lands in ``out_shape``.

    Returns ``(out_pos, size, split_off_one)``: the output dim holding the units (it must be
    the first of the output dims its input dims become, and the unit dim the first of its
    input dims), that dim's size, and whether a size-1 dim was split off in front of it.
    Raises ValueError with the reason when the reshape mixes the unit dim with the dims
    before it.
    """
    if in_shape[pos] == 1:
        raise ValueError("the sliced dim has size 1")
    ins = [(i, s) for i, s in enumerate(in_shape) if s != 1]
    outs = [(j, s) for j, s in enumerate(out_shape) if s != 1]
    i = j = 0
    while i < len(ins):
        group_in, group_out = [ins[i]], []
        p_in, p_out = ins[i][1], 1
        i += 1
        while p_in != p_out:
            if p_out < p_in and j < len(outs):
                group_out.append(outs[j])
                p_out *= outs[j][1]
                j += 1
            elif p_in < p_out and i < len(ins):
                group_in.append(ins[i])
                p_in *= ins[i][1]
                i += 1
            else:
                raise ValueError("input and output shapes do not match")
        if any(k == pos for k, _ in group_in):
            if group_in[0][0] != pos:
                raise ValueError("reshape merges the sliced dim with the dims before it")
            out_pos = group_out[0][0]
            previous = group_out[0][0] - 1
            split_off_one = previous >= 0 and out_shape[previous] == 1 and len(out_shape) > len(in_shape)
            return out_pos, group_out[0][1], split_off_one
    raise ValueError("the sliced dim is not found in the reshape")


def _upstream_producers(gm: fx.GraphModule, node: fx.Node, limit: int = 256) -> list[fx.Node]:
    """The nearest dense ops above ``node`` (for messages naming what fed an input)."""
    found, seen, queue = [], {node}, deque([node])
    while queue and len(seen) < limit:
        n = queue.popleft()
        if _dense_kind(gm, n) is not None:
            found.append(n)
            continue
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                queue.append(a)
    return found


class _Walk:
    """Everything one producer's units reach, with the dim (from the right) they are at."""

    def __init__(self, graph: _Graph, producer: fx.Node, units: int | None):
        self.graph, self.gm, self.producer = graph, graph.gm, producer
        self.kind = _dense_kind(self.gm, producer)
        self.weight = str(_arg(producer, 1, "weight").target)
        bias = _arg(producer, 2, "bias")
        self.bias = str(bias.target) if bias is not None else None
        rows = self.gm.get_parameter(self.weight).shape[0]
        self.dims: dict[fx.Node, int] = {}
        self.tuples: set[fx.Node] = set()
        self.meets: dict[fx.Node, None] = {}
        self.consumers: dict[fx.Node, SliceConsumer] = {}
        self.norms: dict[fx.Node, None] = {}
        self.resizes: dict[tuple[fx.Node, tuple[int, ...]], None] = {}
        self.error: _Forbid | None = None
        self.size_reads: list[fx.Node] = []
        self.note = ""
        self.offsets: tuple[int, ...] = (0,)
        self.section_rows = rows
        self.starts = self._starts(rows)
        self.units = units if units is not None else self.section_rows

    def _starts(self, rows: int) -> list[tuple[fx.Node, int]]:
        node = self.producer
        if self.kind == "conv":
            shape = self.graph.shape(node)
            rank = len(shape) if shape else CONV_NDIM[node.target] + 2
            return [(node, 1 - rank)]
        # a fused projection split in equal sections along the units (q/k/v of an expanded
        # nn.MultiheadAttention, a fused gate/up): each section takes the same window
        first = _single_user(node)
        if first is not None and _category(first) == "chunk" and first.args and first.args[0] is node:
            n = _arg(first, 1, "chunks" if first.target in ("chunk", torch.chunk) else "split_size_or_sections")
            dim = _arg(first, 2, "dim", 0)
            sections = n if first.target in ("chunk", torch.chunk) else (rows // n if isinstance(n, int) and n else 0)
            items = sorted(first.users, key=lambda u: u.args[1] if u.target is operator.getitem else -1)
            last = (-1, self._rank(node) - 1) if self.graph.shape(node) is not None else (-1,)
            if (isinstance(sections, int) and sections > 1 and rows % sections == 0 and dim in last
                    and all(u.target is operator.getitem for u in items)
                    and [u.args[1] for u in items] == list(range(sections))):
                self.section_rows = rows // sections
                self.offsets = tuple(i * self.section_rows for i in range(sections))
                self.dims[first] = -1
                self.tuples.add(first)
                return [(u, -1) for u in items]
        return [(node, -1)]

    def _rank(self, node: fx.Node, default: int = -10) -> int:
        shape = self.graph.shape(node)
        return len(shape) if shape is not None else default

    def run(self) -> None:
        """Walk everything the units reach; ``self.error`` keeps the first refusal (by node order).

        The walk goes on past a refusal (not through the refused node), so where the units
        meet other producers' tensors is known in full, not only up to the first problem.
        """
        queue = deque(self.starts)
        for node, dim in self.starts:
            self.dims[node] = dim
        while queue:
            node, dim = queue.popleft()
            for user in node.users:
                try:
                    nxt = self._step(user, node, dim)
                    if nxt is None:
                        continue
                    if user in self.dims:
                        if self.dims[user] != nxt:
                            raise _Forbid("the units reach this node at two different dims", user)
                        continue
                except _Forbid as e:
                    self._refuse(e)
                    continue
                self.dims[user] = nxt
                queue.append((user, nxt))
        self._check_size_reads()

    def _refuse(self, error: _Forbid) -> None:
        if self.error is None or self.graph.order[error.node] < self.graph.order[self.error.node]:
            self.error = error

    def _check_size_reads(self) -> None:
        """A read of the unit dim's size (``b, kv, t, d = x.shape``) must only feed sizes that
        the rewrite replaces by -1 (``expand(b, kv, ...)``): then nothing uses it any more."""
        for read in self.size_reads:
            derived, queue = {read}, deque([read])
            while queue:
                for user in queue.popleft().users:
                    if user.op == "call_function" and user.target in _INT_ARITHMETIC and user not in derived:
                        derived.add(user)
                        queue.append(user)
            for value in derived:
                for user in value.users:
                    if user in derived:
                        continue
                    paths = list(_paths_of(user.args, value))
                    if user not in self.dims or not paths or any((user, p) not in self.resizes for p in paths):
                        self._refuse(_Forbid("reads the size of the sliced dim", read))

    @property
    def passthrough(self) -> list[fx.Node]:
        return [n for n in self.dims if n is not self.producer]

    # ------------------------------------------------------------ one step

    def _step(self, user: fx.Node, node: fx.Node, dim: int) -> int | None:
        """The unit dim in ``user``'s output, or None where the walk stops (a consumer)."""
        shape = self.graph.shape(node)
        rank = len(shape) if shape is not None else None
        pos = rank + dim if rank is not None else None
        if user.op == "output":
            raise _Forbid("the units reach a graph output", user)
        if user.op == "call_module":
            return self._module(user, dim, pos)
        if user.op not in ("call_function", "call_method"):
            raise _Forbid(f"{user.op} node is not known to preserve the window", user)
        kind = _dense_kind(self.gm, user)
        if kind is not None and _arg(user, 0, "input") is node and _arg(user, 1, "weight") is not node:
            return self._consumer(user, kind, dim, pos)
        category = _category(user)
        rule = getattr(self, f"_on_{category}", None) if category else None
        if rule is None:
            name = getattr(user.target, "__name__", str(user.target))
            if user.op == "call_method":
                raise _Forbid(f"method {name!r} is not known to preserve the window", user)
            raise _Forbid(f"{name} is not known to preserve the window", user)
        return rule(user, node, dim, pos, shape)

    def _need(self, value: Any, user: fx.Node, what: str) -> Any:
        if value is None:
            raise _Forbid(f"{what} needs recorded shapes (pass example_inputs)", user)
        return value

    def _consumer(self, user: fx.Node, kind: str, dim: int, pos: int | None) -> None:
        weight = str(_arg(user, 1, "weight").target)
        if kind == "linear" and dim != -1:
            raise _Forbid(f"Linear reads the last dim, the units are dim {pos if pos is not None else dim}", user)
        if kind == "conv":
            if pos != 1:
                raise _Forbid(f"Conv reads channels (dim 1), the units are dim {pos if pos is not None else dim}", user)
            if int(_arg(user, 6, "groups", 1)) != 1:
                raise _Forbid("grouped / depthwise conv consumer", user)
        features = self.gm.get_parameter(weight).shape[1]
        self.consumers[user] = SliceConsumer(user, weight, features // self.units)
        return None

    def _module(self, user: fx.Node, dim: int, pos: int | None) -> int:
        if str(user.target).startswith(OPS_CONTAINER):
            raise _Forbid("already rewritten by another pass", user)
        mod = self.gm.get_submodule(str(user.target))
        if len(user.all_input_nodes) > 1:
            raise _Forbid(f"{type(mod).__name__} module called with several tensors", user)
        if isinstance(mod, ELEMENTWISE_MODULES):
            return dim
        if type(mod) in BATCH_NORM_MODULES:
            if pos != 1:
                where = pos if pos is not None else "of unknown rank"
                raise _Forbid(f"BatchNorm normalizes dim 1, the units are dim {where}", user)
            if self.graph.module_calls[str(user.target)] > 1:
                raise _Forbid("BatchNorm module is called more than once", user)
            self.norms[user] = None
            return dim
        if isinstance(mod, POOL_MODULES):
            if pos != 1:
                raise _Forbid("pooling over the sliced dim", user)
            return dim
        if isinstance(mod, LAYER_NORM_MODULES):
            if -dim <= len(mod.normalized_shape):
                raise _Forbid(f"{type(mod).__name__} normalizes over the sliced units", user)
            return dim
        if isinstance(mod, nn.GroupNorm):
            raise _Forbid("GroupNorm normalizes over the sliced units", user)
        raise _Forbid(f"{type(mod).__name__} module is not known to preserve the window", user)

    # ------------------------------------------------------------ rules per category

    def _on_ignore(self, user, node, dim, pos, shape):
        return None

    def _on_unary(self, user, node, dim, pos, shape):
        if not _only_tensor_arg(user, node):
            name = getattr(user.target, "__name__", str(user.target))
            raise _Forbid(f"{name} with another tensor argument is not known to preserve the window", user)
        return dim

    def _on_dtype_only(self, user, node, dim, pos, shape):
        if user.args[0] is not node:
            raise _Forbid("the units only give a dtype here", user)
        return dim

    def _on_pool(self, user, node, dim, pos, shape):
        if pos != 1:
            raise _Forbid("pooling over the sliced dim", user)
        return dim

    def _on_add(self, user, node, dim, pos, shape):
        if not _only_tensor_arg(user, node):
            self.meets[user] = None  # decided once every producer's walk is known
        return dim

    _on_mul = _on_add

    def _on_size(self, user, node, dim, pos, shape):
        d = _arg(user, 1, "dim")
        if d is None and not user.kwargs:
            return self._on_getattr(user, node, dim, pos, shape)
        if shape is not None and _norm_dim(d, len(shape)) != pos:
            return None
        raise _Forbid("reads the size of the sliced dim", user)

    def _on_getattr(self, user, node, dim, pos, shape):
        # x.shape[-1] // 2 (rotate_half) reads another dim: fine; the unit dim's size is the
        # window's in training, so anything else reading it refuses the group
        attr = user.args[1] if user.target is getattr else "shape"
        if attr in ("dtype", "device", "ndim"):
            return None
        if attr != "shape":
            raise _Forbid(f"attribute {attr!r} is not known to preserve the window", user)
        reads = [u.args[1] if u.target is operator.getitem else None for u in user.users]
        if shape is None or not all(isinstance(i, int) for i in reads):
            raise _Forbid("reads the size of the sliced dim", user)
        self.size_reads += [u for u in user.users if _norm_dim(u.args[1], len(shape)) == pos]
        return None

    def _on_reduce(self, user, node, dim, pos, shape):
        dims = _dims_arg(_arg(user, 1, "dim"))
        keepdim = bool(_arg(user, 2, "keepdim", False))
        if dims is None or shape is None:
            raise _Forbid("reduction over all dims (or of unknown rank) includes the units", user)
        dims = [_norm_dim(d, len(shape)) for d in dims]
        if pos in dims:
            raise _Forbid("reduction over the sliced dim", user)
        return dim if keepdim else dim + sum(d > pos for d in dims)

    def _on_softmax(self, user, node, dim, pos, shape):
        d = _arg(user, 1, "dim")
        shape = self._need(shape, user, "softmax")
        if d is None or _norm_dim(d, len(shape)) == pos:
            raise _Forbid("softmax over the sliced dim", user)
        return dim

    def _on_layer_norm(self, user, node, dim, pos, shape):
        normalized = _dims_arg(_arg(user, 1, "normalized_shape")) or []
        if user.args[0] is not node or -dim <= len(normalized):
            raise _Forbid("normalization over the sliced units", user)
        return dim

    def _on_group_norm(self, user, node, dim, pos, shape):
        raise _Forbid("normalization over the sliced units", user)

    def _on_transpose(self, user, node, dim, pos, shape):
        rank = len(self._need(shape, user, "transpose"))
        a, b = (_norm_dim(d, rank) for d in (_arg(user, 1, "dim0"), _arg(user, 2, "dim1")))
        new = b if pos == a else a if pos == b else pos
        return new - rank

    def _on_permute(self, user, node, dim, pos, shape):
        rank = len(self._need(shape, user, "permute"))
        dims = user.args[1] if len(user.args) == 2 and isinstance(user.args[1], (list, tuple)) else user.args[1:]
        dims = [_norm_dim(d, rank) for d in _dims_arg(dims or user.kwargs.get("dims")) or []]
        return dims.index(pos) - rank

    def _on_t(self, user, node, dim, pos, shape):
        rank = len(self._need(shape, user, "t()"))
        return (rank - 1 - pos) - rank if rank == 2 else dim

    def _on_unsqueeze(self, user, node, dim, pos, shape):
        rank = len(self._need(shape, user, "unsqueeze"))
        d = _norm_dim(_arg(user, 1, "dim"), rank + 1)
        return dim if d <= pos else dim - 1

    def _on_squeeze(self, user, node, dim, pos, shape):
        shape = self._need(shape, user, "squeeze")
        dims = _dims_arg(_arg(user, 1, "dim"))
        if dims is None:
            raise _Forbid("squeeze() without dims could drop a narrowed unit dim", user)
        dims = [_norm_dim(d, len(shape)) for d in dims]
        if pos in dims:
            raise _Forbid("squeeze of the sliced dim", user)
        return dim + sum(d > pos and shape[d] == 1 for d in dims)

    def _on_expand(self, user, node, dim, pos, shape):
        sizes, path = self._sizes(user, 1)
        out = len(sizes)
        entry = sizes[out + dim]
        if entry != -1:
            self.resizes[(user, (*path, out + dim) if path else (1 + out + dim,))] = None
        return dim

    def _on_cat(self, user, node, dim, pos, shape):
        shape = self._need(shape, user, "concatenation")
        d = _norm_dim(_arg(user, 1, "dim", 0), len(shape))
        if d == pos:
            raise _Forbid("concatenation mixes the group with other tensors", user)
        self.meets[user] = None
        return dim

    def _on_stack(self, user, node, dim, pos, shape):
        raise _Forbid("concatenation mixes the group with other tensors", user)

    def _on_chunk(self, user, node, dim, pos, shape):
        shape = self._need(shape, user, "chunk / split")
        if user.args[0] is not node or _norm_dim(_arg(user, 2, "dim", 0), len(shape)) == pos:
            raise _Forbid("chunk / split along the sliced dim", user)
        self.tuples.add(user)
        return dim

    def _on_getitem(self, user, node, dim, pos, shape):
        if node in self.tuples:
            return dim
        shape = self._need(shape, user, "indexing")
        rank = len(shape)
        index = list(user.args[1]) if isinstance(user.args[1], tuple) else [user.args[1]]
        used = sum(i is not None and i is not Ellipsis for i in index)
        if Ellipsis in index:
            k = index.index(Ellipsis)
            index[k:k + 1] = [slice(None)] * (rank - used)
        else:
            index += [slice(None)] * (rank - used)
        in_dim = out_dim = 0
        new = None
        for item in index:
            if item is None:
                out_dim += 1
                continue
            if in_dim == pos:
                whole = (isinstance(item, slice) and item.start in (None, 0) and item.step in (None, 1)
                         and (item.stop is None or (isinstance(item.stop, int) and item.stop >= shape[pos])))
                if not whole:
                    raise _Forbid("indexing along the sliced dim", user)
                new = out_dim
            if isinstance(item, int) or (isinstance(item, fx.Node) and self.graph.is_scalar(item)):
                in_dim += 1
            elif isinstance(item, slice):
                in_dim += 1
                out_dim += 1
            else:
                raise _Forbid("advanced indexing of the units", user)
        return new - out_dim

    def _on_sdpa(self, user, node, dim, pos, shape):
        qkv = [_arg(user, i, name) for i, name in enumerate(("query", "key", "value"))]
        if node not in qkv:
            raise _Forbid("the units reach an attention mask", user)
        if dim != -3:
            raise _Forbid(f"the units reach scaled_dot_product_attention at dim {pos}, not its head dim", user)
        self.meets[user] = None
        return -3

    def _on_matmul(self, user, node, dim, pos, shape):
        if any(_param_name(self.gm, a) for a in user.all_input_nodes):
            raise _Forbid("matmul with a parameter (x @ W[in, out]) is not a sliceable consumer", user)
        ranks = [len(s) if (s := self.graph.shape(a)) is not None else 0 for a in user.args[:2]]
        if dim > -3 or min(ranks) < 2:
            raise _Forbid("matmul contracts or produces along the sliced dim", user)
        self.meets[user] = None
        return dim

    def _on_reshape(self, user, node, dim, pos, shape):
        return self._reshape(user, node, pos, shape)

    _on_flatten = _on_unflatten = _on_reshape

    def _reshape(self, user: fx.Node, node: fx.Node, pos: int | None, shape: tuple | None) -> int:
        in_shape, out_shape = shape, self.graph.shape(user)
        if in_shape is None or out_shape is None:
            raise _Forbid("flatten/reshape of the units needs recorded shapes (pass example_inputs)", user)
        try:
            out_pos, size, split_off_one = _reshape_map(in_shape, pos, out_shape)
        except ValueError as e:
            raise _Forbid(f"flatten/reshape mixes the sliced dim with others ({e})", user) from None
        if size % self.units:
            units = math.gcd(self.units, size)
            if units == 1:
                raise _Forbid(f"reshape splits the {self.units} units into blocks of {size}: no whole unit is left",
                              user)
            raise _Coarsen(units)
        if split_off_one and not self.note:
            self.note = (f"{user.name} reshapes the units to 1 x {size}: a single head or key/value "
                         "group has nothing to slice across")
        path = self._size_path(user, out_pos, len(out_shape), len(in_shape))
        if path is not None:
            self.resizes[(user, path)] = None
        return out_pos - len(out_shape)

    def _sizes(self, user: fx.Node, first: int) -> tuple[list[Any], tuple[int, ...]]:
        """Size arguments from ``args[first]``: a list (``path`` to it) or varargs (path ``()``)."""
        if user.kwargs:
            raise _Forbid("sizes given as keywords", user)
        if len(user.args) == first + 1 and isinstance(user.args[first], (list, tuple)):
            return list(user.args[first]), (first,)
        sizes = list(user.args[first:])
        if any(isinstance(s, fx.Node) and not self.graph.is_scalar(s) for s in sizes):
            raise _Forbid("reshape to a computed shape", user)
        return sizes, ()

    def _size_path(self, user: fx.Node, out_pos: int, out_rank: int, in_rank: int) -> tuple[int, ...] | None:
        """Where the size of output dim ``out_pos`` is spelled, None when it is inferred."""
        if _category(user) == "flatten":
            return None
        if user.target == "unflatten":
            start = _norm_dim(_arg(user, 1, "dim"), in_rank)
            sizes = list(_arg(user, 2, "sizes"))
            if not start <= out_pos < start + len(sizes):
                return None
            k = out_pos - start
            if sizes[k] == -1:
                return None
            if -1 in sizes:
                raise _Forbid("unflatten infers another size (-1) besides the sliced one", user)
            return (2, k)
        sizes, path = self._sizes(user, 1)
        if len(sizes) != out_rank:
            raise _Forbid("reshape sizes do not match the recorded shape", user)
        if isinstance(sizes[out_pos], int) and sizes[out_pos] == -1:
            return None
        if any(isinstance(s, int) and s == -1 for s in sizes):
            raise _Forbid("reshape infers another dim (-1) besides the sliced one", user)
        return (*path, out_pos) if path else (1 + out_pos,)
