"""What an op the liveness analysis has no rule for saves for backward, measured once.

``memory_plan`` knows the backward of torch's own ops. An opaque module (a leaf the tracer
kept whole, like torchvision's ``ShiftedWindowAttention``, which reads ``self.training``) or
an unlisted function used to be assumed to keep its tensor inputs. Swin-T's attention keeps
20x to 320x its input (q, k, the softmax, v, the padded windows), so the plan saw a fifth of
swin_t's bytes and a budget's fraction was of the wrong total.

:func:`probe` runs the op once, in training mode, on random tensors of the recorded shapes
(the real parameters and buffers), under ``saved_tensors_hooks``, and sorts each saved
storage into: an input's (the op keeps that input), the output's (it keeps its output), a
parameter's or buffer's (not counted), or its own (``internal`` bytes, counted beside the
activations like normalisation statistics). Inputs require grad as the graph's would
(``grads``: a frozen module fed by data saves nothing). The RNG state is restored, and a
module runs as a copy with buffers of its own (put in training mode by ``train()``, whose
return value is not used: an override may return None). Results are cached per module (or function) and argument
shapes, so a planner that analyses many rewrites of one graph measures each op once.
"""

from __future__ import annotations

import copy
import operator
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from sparsify_fx.analysis.shapes import tensor_meta
from sparsify_fx.graph.form import is_in_place

__all__ = ["SavedProbe", "probe"]


@dataclass(frozen=True)
class SavedProbe:
    """What one op's backward keeps: which of its tensor inputs (positions among the node's
    input nodes), its output or not, and bytes of storages of its own."""

    inputs: tuple[int, ...]
    output: bool
    internal: int


_BY_MODULE: weakref.WeakKeyDictionary[nn.Module, dict[tuple, SavedProbe | None]] = weakref.WeakKeyDictionary()
_BY_FUNCTION: dict[tuple, SavedProbe | None] = {}
_MAX_FUNCTIONS = 4096


def _signature(node: fx.Node, gm: fx.GraphModule) -> tuple | None:
    """A hashable description of the node's arguments: shapes and dtypes of tensors,
    values of constants; None when an argument is neither."""
    parts: list[Any] = []
    ok = True

    def describe(a: Any) -> Any:
        nonlocal ok
        if isinstance(a, fx.Node):
            if a.op == "get_attr":
                t = operator.attrgetter(str(a.target))(gm)
                return ("attr", tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else ("attr", str(a.target))
            meta = tensor_meta(a)
            if meta is None:
                ok = False
                return None
            return ("tensor", tuple(meta[0]), meta[1])
        if isinstance(a, (list, tuple)):
            return tuple(describe(x) for x in a)
        if isinstance(a, dict):
            return tuple(sorted((k, describe(v)) for k, v in a.items()))
        if a is None or isinstance(a, (bool, int, float, str, torch.dtype, torch.device)):
            return a
        ok = False
        return None

    parts.append(describe(node.args))
    parts.append(describe(node.kwargs))
    return tuple(parts) if ok else None


def _device(gm: fx.GraphModule) -> torch.device:
    for t in (*gm.parameters(), *gm.buffers()):
        return t.device
    return torch.device("cpu")


def _run(node: fx.Node, gm: fx.GraphModule, grads: tuple[bool, ...] | None) -> SavedProbe | None:
    device = _device(gm)
    inputs = [a for a in node.all_input_nodes if a.op != "get_attr"]
    grad_of = dict(zip(inputs, grads)) if grads is not None else {}
    made: dict[fx.Node, torch.Tensor] = {}
    constants: list[torch.Tensor] = []

    def value(a: fx.Node) -> Any:
        if a.op == "get_attr":
            t = operator.attrgetter(str(a.target))(gm)
            if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter):
                t = t.detach().clone()  # a buffer (running statistics) the op may update
                constants.append(t)
            return t
        if a not in made:
            shape, dtype = tensor_meta(a)
            if dtype.is_floating_point or dtype.is_complex:
                made[a] = torch.randn(shape, dtype=dtype, device=device).requires_grad_(grad_of.get(a, True))
            else:  # indices and masks: zeros are in range for any index
                made[a] = torch.zeros(shape, dtype=dtype, device=device)
        return made[a]

    module = None
    if node.op == "call_module":
        # a copy sharing the parameters, with buffers of its own: a forward in training
        # updates running statistics, which planning must not touch
        original = gm.get_submodule(str(node.target))
        module = copy.deepcopy(original, {id(p): p for p in original.parameters()})
        module.train()

    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        saved[s.data_ptr()] = s.nbytes()
        return t

    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            args = fx.node.map_arg(node.args, value)  # (random inputs: inside the forked RNG)
            kwargs = fx.node.map_arg(node.kwargs, value)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                if module is not None:
                    out = module(*args, **kwargs)
                elif node.op == "call_method":
                    out = getattr(args[0], str(node.target))(*args[1:], **kwargs)
                else:
                    out = node.target(*args, **kwargs)
    except Exception:  # noqa: BLE001  (an op that cannot run on random inputs keeps the old rule)
        return None
    params = {t.untyped_storage().data_ptr() for t in (
        *gm.parameters(), *gm.buffers(), *constants, *(module.buffers() if module is not None else ()))}
    if not isinstance(out, torch.Tensor):
        return None
    by_storage = {made[a].untyped_storage().data_ptr(): i for i, a in enumerate(inputs) if a in made}
    out_ptr = out.untyped_storage().data_ptr()
    kept_inputs: set[int] = set()
    output, internal = False, 0
    for ptr, nbytes in saved.items():
        if ptr in params or nbytes == 0:
            continue
        if ptr in by_storage:
            kept_inputs.add(by_storage[ptr])
        elif ptr == out_ptr:
            output = True
        else:
            internal += nbytes
    return SavedProbe(tuple(sorted(kept_inputs)), output, internal)


def probe(node: fx.Node, gm: fx.GraphModule, grads: tuple[bool, ...] | None = None) -> SavedProbe | None:
    """What ``node``'s op saves for backward, measured (cached); None when it cannot be run
    on its recorded shapes (an argument with no recorded shape, an op that raises).

    ``grads``: whether each input node (``node.all_input_nodes`` less ``get_attr`` nodes)
    requires grad; None: every floating-point input does."""
    if node.op not in ("call_module", "call_function", "call_method") or tensor_meta(node) is None:
        return None
    if is_in_place(node):
        return None  # it would write over a real buffer (and keeps what its input's rule says)
    signature = _signature(node, gm)
    if signature is None:
        return None
    signature = (*signature, grads)
    if node.op == "call_module":
        cache = _BY_MODULE.setdefault(gm.get_submodule(str(node.target)), {})
        key: tuple = signature
    else:
        cache, key = _BY_FUNCTION, (node.op, node.target, signature)
        if len(cache) > _MAX_FUNCTIONS:
            cache.clear()
    if key not in cache:
        cache[key] = _run(node, gm, grads)
    return cache[key]
