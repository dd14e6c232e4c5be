"""The canonical graph form every pass works on, and the helpers passes use to read it.

Whatever captured a model (``symbolic_trace`` with module calls, ``torch.export`` with aten
ops, Dynamo with torch functions), ``canonicalize`` (``sparsify_fx/frontend/canonical.py``) brings the
graph to one form:

* **stateless layers are functions**: ``nn.Linear`` / ``nn.ConvNd`` / activation modules and
  every spelling of the same op (``torch._C._nn.linear``, ``aten.linear.default``,
  ``x @ w``, ``x.relu()``) become one canonical ``call_function`` target
  (``F.linear``, ``F.conv2d``, ``torch.matmul``, ``F.relu``...), with parameters as
  ``get_attr`` nodes under their original qualified names;
* **mode-dependent layers are modules**: BatchNorm, Dropout and anything unknown stay (or are
  turned back into) ``call_module`` nodes, so ``train()`` / ``eval()`` keep working;
* every node carries ``node.meta["sfx_module"]``: the qualified name of the module it
  belongs to (used by ``include=`` / ``exclude=`` and by the reports).

A pass then matches one pattern per op: :func:`find_dense_ops` returns every Linear, Conv
and matmul-against-a-parameter as a :class:`DenseOp`, whatever its spelling was.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from sparsify_fx.graph import meta
from sparsify_fx.graph.op_table import CONV_NDIM

__all__ = [
    "DenseOp",
    "clean_module_path",
    "IN_PLACE_OPERATORS",
    "dense_op",
    "find_dense_ops",
    "has_hooks",
    "install_module",
    "is_in_place",
    "module_name_of",
    "replace_node",
    "OPS_CONTAINER",
    "DENSE_LAYER_TYPES",
]

#: name of the submodule that holds the (parameter-free) op modules passes insert.
OPS_CONTAINER = "sfx_ops"

DENSE_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

#: what the capture records for augmented assignment (``out += identity``): the op mutates
#: (and returns) its first operand, as the model's own code did
IN_PLACE_OPERATORS = frozenset({
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor,
    operator.ilshift, operator.irshift,
})


def is_in_place(node: fx.Node) -> bool:
    """True when ``node`` overwrites its first argument: an augmented assignment, a
    ``x.add_()`` / ``torch.relu_`` spelling, or an ``inplace=True`` keyword (modules are not
    looked into: the op modules passes install run out of place in training)."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op != "call_function":
        return False
    if node.target in IN_PLACE_OPERATORS or node.kwargs.get("inplace") is True:
        return True
    name = getattr(node.target, "__name__", "")
    return name.endswith("_") and not name.startswith("_")


def module_name_of(node: fx.Node) -> str:
    """Qualified name of the module a node belongs to ('' for the root)."""
    name = node.meta.get(meta.MODULE)
    if name is not None:
        return name
    if node.op == "call_module":
        return str(node.target)
    if node.op == "get_attr":
        return str(node.target).rpartition(".")[0]
    stack = node.meta.get("nn_module_stack")
    if stack:
        last = list(stack.values())[-1]
        path = last[0] if isinstance(last, tuple) else str(last)
        return clean_module_path(path)
    return ""


def clean_module_path(path: str) -> str:
    """A module path as an ``nn_module_stack`` entry spells it, as a dotted qualified name.

    Dynamo spells ``L['self'].encoder.layer[0]`` or ``L['self']._modules['encoder']``; export
    and symbolic_trace spell dotted names already. Old flat spellings (``L__self___layer1_0``)
    cannot be split back: ''.
    """
    if path.startswith("L__self__"):
        return ""
    path = re.sub(r"^[LG]\['[^']*'\]", "", path)
    path = re.sub(r"\._(?:modules|parameters|buffers)\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    return path.strip(".")


def _module_type_of(gm: fx.GraphModule, name: str) -> str:
    try:
        return type(gm.get_submodule(name)).__name__ if name else type(gm).__name__
    except AttributeError:
        return ""


@dataclass
class DenseOp:
    """One matmul-like op against a parameter, whatever its spelling was.

    ``kind`` is ``"linear"`` (``F.linear(x, W[out, in], b)``), ``"conv"``
    (``F.convNd(x, W, b, stride, padding, dilation, groups)``) or ``"matmul"``
    (``x @ W[in, out]`` or ``addmm(b, x, W[in, out])``, GPT-2's Conv1D).

    ``input`` / ``weight`` / ``bias`` are read from ``node`` on each access (an earlier rewrite
    may have replaced the node producing the input), so read them *before* ``replace_node``
    erases ``node``: after that they are None.
    """

    node: fx.Node
    kind: str
    _input: fx.Node
    _weight: fx.Node
    _bias: fx.Node | None
    weight_name: str
    module_name: str
    module_type: str
    conv_ndim: int = 0
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    # operands are read from the node on each access: an earlier rewrite may have replaced
    # the node that produced this op's input
    @property
    def input(self) -> fx.Node:
        return _operands(self.node)[0]

    @property
    def weight(self) -> fx.Node:
        return _operands(self.node)[1]

    @property
    def bias(self) -> fx.Node | None:
        return _operands(self.node)[2]

    @property
    def weight_transposed(self) -> bool:
        """True when the weight is stored ``[in, out]`` (``x @ W``), False for ``[out, in]``."""
        return self.kind == "matmul"

    def conv_padding_ints(self, weight_shape: torch.Size) -> tuple[int, ...] | None:
        """Explicit symmetric padding, or None when ``padding='same'`` needs asymmetric pads."""
        if not isinstance(self.padding, str):
            return tuple(self.padding)
        if self.padding == "valid":
            return (0,) * self.conv_ndim
        pads = []
        for k, d in zip(weight_shape[2:], self.dilation):
            total = d * (k - 1)
            if total % 2:
                return None
            pads.append(total // 2)
        return tuple(pads)


def _operands(node: fx.Node) -> tuple[Any, Any, Any]:
    if node.target is torch.matmul:
        return node.args[0], node.args[1], None
    if node.target is torch.addmm:
        return node.args[1], node.args[2], node.args[0]
    if node.op == "call_function":
        return _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")
    return None, None, None


def _tuple(value: Any, n: int) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value) if len(value) == n else tuple(int(value[0]) for _ in range(n))
    return (int(value),) * n


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _param_name(gm: fx.GraphModule, node: Any) -> str | None:
    """Qualified parameter name when ``node`` is a get_attr of an nn.Parameter."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    try:
        gm.get_parameter(str(node.target))
    except AttributeError:
        return None
    return str(node.target)


def dense_op(gm: fx.GraphModule, node: fx.Node) -> DenseOp | str | None:
    """The :class:`DenseOp` of one ``call_function`` node of a canonical graph; a string saying
    why a matmul-like node is not one (an operand that is not a parameter); None for any other
    node."""
    target = node.target
    if target is F.linear or target in CONV_NDIM:
        x, w, b = _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")
        wname = _param_name(gm, w)
        if wname is None:
            return "weight is not a parameter of the model"
        if b is not None and _param_name(gm, b) is None:
            return "bias is not a parameter of the model"
        module = module_name_of(node) or wname.rpartition(".")[0]
        op = DenseOp(node, "linear", x, w, b, wname, module, _module_type_of(gm, module))
        if target in CONV_NDIM:
            n = CONV_NDIM[target]
            op.kind = "conv"
            op.conv_ndim = n
            op.stride = _tuple(_arg(node, 3, "stride", 1), n)
            padding = _arg(node, 4, "padding", 0)
            op.padding = padding if isinstance(padding, str) else _tuple(padding, n)
            op.dilation = _tuple(_arg(node, 5, "dilation", 1), n)
            op.groups = int(_arg(node, 6, "groups", 1))
        return op
    if target is torch.matmul or target is torch.addmm:
        if target is torch.matmul:
            x, w, b = node.args[0], node.args[1], None
        else:
            b, x, w = node.args[0], node.args[1], node.args[2]
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                return "addmm with alpha/beta != 1"
        wname = _param_name(gm, w)
        if wname is None:
            return "no operand is a parameter (activation x activation)"
        if gm.get_parameter(wname).dim() != 2:
            return "parameter operand is not 2-D"
        if b is not None and _param_name(gm, b) is None:
            return "bias is not a parameter of the model"
        module = module_name_of(node) or wname.rpartition(".")[0]
        return DenseOp(node, "matmul", x, w, b, wname, module, _module_type_of(gm, module))
    return None


def find_dense_ops(gm: fx.GraphModule) -> tuple[list[DenseOp], list[tuple[fx.Node, str]]]:
    """Every Linear / Conv / matmul-against-a-parameter in a canonical graph.

    Returns ``(ops, unmatched)`` where ``unmatched`` lists matmul-like nodes that are *not*
    against a parameter (activation x activation, e.g. attention scores) with the reason,
    so a pass can report them instead of skipping them silently.
    """
    ops: list[DenseOp] = []
    unmatched: list[tuple[fx.Node, str]] = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            if str(node.target).startswith(OPS_CONTAINER):
                why = _rewritten_dense_reason(gm, node, mod)
            else:
                why = _opaque_module_reason(mod)
            if why:
                unmatched.append((node, why))
            continue
        if node.op != "call_function":
            continue
        found = dense_op(gm, node)
        if isinstance(found, DenseOp):
            ops.append(found)
        elif found is not None:
            unmatched.append((node, found))
    return ops, unmatched


def _rewritten_dense_reason(gm: fx.GraphModule, node: fx.Node, mod: nn.Module) -> str | None:
    """Why an op module an earlier pass installed in place of a dense op is not a candidate.

    Without it a later pass of the same recipe would say nothing about that layer.
    """
    weights = [a for a in node.all_input_nodes if (name := _param_name(gm, a)) and gm.get_parameter(name).dim() >= 2]
    if weights or any(p.dim() >= 2 for p in mod.parameters()):
        return f"already rewritten by an earlier pass ({type(mod).__name__} at {node.target})"
    return None


def _opaque_module_reason(mod: nn.Module) -> str | None:
    """Why dense layers inside a module kept as one call are out of a pass's reach."""
    dense = [m for m in mod.modules() if isinstance(m, DENSE_LAYER_TYPES)]
    if isinstance(mod, nn.MultiheadAttention):
        return "nn.MultiheadAttention is kept as one module: its projections are not rewritten"
    if isinstance(mod, DENSE_LAYER_TYPES):
        why = "has hooks" if has_hooks(mod) else "parametrized weight" if _is_parametrized(mod) else "kept as a module"
        return f"{type(mod).__name__} {why}: called as a module, not rewritten"
    if dense:
        return f"{type(mod).__name__} is called as one module: its {len(dense)} dense layer(s) are not rewritten"
    return None


def install_module(gm: fx.GraphModule, name_hint: str, module: nn.Module) -> str:
    """Register ``module`` under ``gm.sfx_ops`` with a unique name; return its call target."""
    container = getattr(gm, OPS_CONTAINER, None)
    if container is None:
        container = nn.Module()
        gm.add_submodule(OPS_CONTAINER, container)
    base = "".join(c if c.isalnum() or c == "_" else "_" for c in name_hint) or "op"
    name, i = base, 1
    while hasattr(container, name):
        i += 1
        name = f"{base}_{i}"
    container.add_module(name, module)
    return f"{OPS_CONTAINER}.{name}"


def replace_node(old: fx.Node, new: fx.Node) -> None:
    """Point every user of ``old`` at ``new``, carry meta over, and erase ``old``."""
    for key, value in old.meta.items():
        new.meta.setdefault(key, value)
    new.meta.setdefault(meta.ORIGIN, old.name)
    old.replace_all_uses_with(new)
    old.graph.erase_node(old)


def has_hooks(mod: nn.Module) -> bool:
    """True when calling ``mod`` runs hooks: its own forward / pre-forward / backward hooks, or
    a global module hook (``nn.modules.module.register_module_forward_hook``), which runs on
    every module call. Such a module stays a module call: expanding or replacing it would
    drop the hooks. Canonicalize, the capture and every pass ask this one question."""
    return bool(
        mod._forward_hooks
        or mod._forward_pre_hooks
        or mod._backward_hooks
        or getattr(mod, "_forward_hooks_with_kwargs", None)
        or nn.modules.module._global_forward_hooks
        or nn.modules.module._global_forward_pre_hooks
    )


def _is_parametrized(mod: nn.Module) -> bool:
    return bool(getattr(mod, "parametrizations", None))
