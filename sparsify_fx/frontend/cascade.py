"""Turn any ``nn.Module`` into graphs passes can rewrite: a cascade of capture methods.

1. ``symbolic_trace`` of the whole model, with torch.nn layers (and modules with hooks) kept
   as leaves, checked for ``self.training`` branches by tracing in both modes;
2. ``submodules``: when the root cannot be traced, the largest traceable submodules are
   traced and the rest stays Python (recursively, so layers deep inside are still reached);
   the model's real call arguments (recorded on the example inputs) fix non-tensor args;
3. ``export``: ``torch.export`` (non-strict) when example inputs are given;
4. ``dynamo``: Dynamo graph capture, graph breaks allowed (graphs are rewritten lazily, per
   input shape and mode, when the module first runs).

The last two live in ``export.py`` and ``dynamo``'s part of it; the fixed (non-tensor)
arguments of a traced graph in ``arguments.py``.

The original model is never mutated: capture works on a structural copy that shares the
model's parameters and buffers (so an optimizer built on either updates both) but has its
own module objects (so ``train()`` / ``eval()`` on one does not flip the other).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from sparsify_fx.errors import CaptureError
from sparsify_fx.frontend.arguments import (
    _concrete_args_for,
    _holds_tensor,
    _name_fixed_arguments,
)
from sparsify_fx.frontend.canonical import canonicalize
from sparsify_fx.frontend.captured_module import (
    make_graph_module,
)
from sparsify_fx.graph.form import DENSE_LAYER_TYPES, IN_PLACE_OPERATORS, has_hooks

__all__ = ["Capture", "capture", "structural_copy", "CAPTURE_METHODS"]

CAPTURE_METHODS = ("symbolic_trace", "submodules", "export", "dynamo")
_MAX_LEAF_ROUNDS = 64


@dataclass
class Capture:
    """The result of :func:`capture`.

    Attributes:
        graph_module: the captured module: a ``torch.fx.GraphModule`` when the model was
            captured whole, else a copy of the model whose traced submodules are
            GraphModules (``method == "submodules"``) or a lazily compiling wrapper
            (``method == "dynamo"``).
        method: which method captured it (one of ``CAPTURE_METHODS``).
        graphs: every GraphModule to rewrite, by qualified name ('' for the root).
        notes: what a user should know (leaves made, parts left untraced and why).
        failures: for each method tried before the one that worked, why it failed.
    """

    graph_module: nn.Module
    method: str
    graphs: dict[str, fx.GraphModule] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)

    @property
    def module(self) -> nn.Module:
        return self.graph_module


def structural_copy(model: nn.Module) -> nn.Module:
    """Deep copy of the module tree that shares every parameter and buffer with ``model``."""
    memo: dict[int, Any] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        memo[id(t)] = t
    return copy.deepcopy(model, memo)


@contextmanager
def _modes(module: nn.Module, training: bool) -> Iterator[None]:
    saved = {name: m.training for name, m in module.named_modules()}
    module.train(training)
    try:
        yield
    finally:
        for name, m in module.named_modules():
            m.training = saved.get(name, m.training)


# containers are not layers: their children are (a ModuleList is never even called)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _is_torch_nn_leaf(m: nn.Module) -> bool:
    mod = type(m).__module__
    return (mod.startswith("torch.nn") or mod.startswith("torch.ao.nn")) and not isinstance(
        m, _CONTAINERS
    )


def _in_place(op: Callable) -> Callable:
    def method(self: fx.Proxy, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", op, (self, other), {})

    method.__name__ = f"__{op.__name__}__"
    return method


class _InPlaceProxy(fx.Proxy):
    """A proxy that records augmented assignment as what it is: ``fx.Proxy`` has no
    ``__iadd__``, so ``out += identity`` traced as an out-of-place ``add``, and every residual
    block of a captured ResNet allocated a new tensor where the model wrote in place."""


for _op in IN_PLACE_OPERATORS:
    setattr(_InPlaceProxy, f"__{_op.__name__}__", _in_place(_op))


class _LeafTracer(fx.Tracer):
    """Keeps torch.nn layers, modules with hooks and the given extra modules as leaves;
    records ``+=`` and the other augmented assignments in place (:class:`_InPlaceProxy`)."""

    def __init__(self, extra_leaves: set[int] | None = None):
        super().__init__()
        # a default lets torch.load rebuild the tracer class of a pickled GraphModule
        self.extra_leaves = extra_leaves or set()

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _InPlaceProxy(node, self)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if id(m) in self.extra_leaves:
            return True
        # tracing through a module would silently drop its hooks: keep it a call_module
        if has_hooks(m):
            return True
        return super().is_leaf_module(m, qualname)


class _ModeDependent(Exception):
    pass


def _reads_training(m: nn.Module) -> bool:
    if _is_torch_nn_leaf(m) or any(isinstance(d, DENSE_LAYER_TYPES) for d in m.modules()):
        return False
    code = getattr(type(m).forward, "__code__", None)
    return code is not None and "training" in code.co_names


def _graph_key(graph: fx.Graph) -> list[tuple[str, str, str, str]]:
    return [(n.op, str(n.target), str(n.args), str(n.kwargs)) for n in graph.nodes]


def _culprit(node: fx.Node, root: nn.Module, leaves: set[int]) -> nn.Module | None:
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):
        if not path:
            continue
        try:
            m = root.get_submodule(path)
        except AttributeError:
            continue
        if id(m) not in leaves:
            return m
    return None


def _trace_graph(
    module: nn.Module, concrete_args: dict[str, Any] | None
) -> tuple[fx.Graph, list[str]]:
    """Trace in train and eval mode; make the modules that branch on ``self.training`` leaves."""
    names = {id(m): n for n, m in module.named_modules()}
    # modules with nothing to rewrite whose forward reads `training` (stochastic depth,
    # custom dropout) become leaves up front: finding them one trace round each is slow
    leaves: set[int] = {id(m) for m in module.modules() if m is not module and _reads_training(m)}
    notes: list[str] = []
    for _ in range(_MAX_LEAF_ROUNDS):
        graphs = []
        for training in (True, False):
            with _modes(module, training):
                graphs.append(_LeafTracer(leaves).trace(module, concrete_args=concrete_args))
        key_train, key_eval = _graph_key(graphs[0]), _graph_key(graphs[1])
        if key_train == key_eval:
            if concrete_args:
                _name_fixed_arguments(graphs[0], module, concrete_args)
            return graphs[0], notes
        index = next(
            (i for i, (a, b) in enumerate(zip(key_train, key_eval)) if a != b),
            min(len(key_train), len(key_eval)),
        )
        train_nodes, eval_nodes = list(graphs[0].nodes), list(graphs[1].nodes)
        node = train_nodes[index] if index < len(train_nodes) else eval_nodes[index]
        culprit = _culprit(node, module, leaves)
        if culprit is None:
            raise _ModeDependent(
                f"forward of {type(module).__name__} branches on self.training "
                f"(first difference at node {node.format_node()})"
            )
        leaves.add(id(culprit))
        notes.append(
            f"{names.get(id(culprit), '?')} ({type(culprit).__name__}) kept as a leaf: "
            "its forward branches on self.training"
        )
    raise _ModeDependent("too many self.training-dependent submodules")


def _short(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    first = text.splitlines()[0] if text else type(e).__name__
    return first[:400]


# ------------------------------------------------------------------ methods


def _capture_whole(
    model: nn.Module, args: tuple | None, kwargs: dict | None
) -> Capture:
    concrete = _concrete_args_for(model, args, kwargs or {}) if args is not None else None
    graph, notes = _trace_graph(model, concrete)
    gm = make_graph_module(model, graph)
    canon = canonicalize(gm)
    notes += [f"{name}: {why}" for name, why in canon.kept_as_modules]
    return Capture(gm, "symbolic_trace", {"": gm}, notes)


def _record_calls(
    model: nn.Module, args: tuple, kwargs: dict
) -> dict[int, list[tuple[tuple, dict]]]:
    """Run the model once (eval, no grad) and record each submodule's call arguments."""
    calls: dict[int, list[tuple[tuple, dict]]] = {}
    handles = []

    def hook(m: nn.Module, a: tuple, kw: dict) -> None:
        calls.setdefault(id(m), []).append((a, kw))

    for m in model.modules():
        if m is not model:
            handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad(), _modes(model, False):
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return calls


def _non_tensor_signature(a: tuple, kw: dict) -> str:
    def sig(v: Any) -> str:
        if isinstance(v, torch.Tensor):
            return "T"
        if _holds_tensor(v):
            return "S"
        return repr(v)

    return repr([sig(v) for v in a]) + repr({k: sig(v) for k, v in sorted(kw.items())})


def _copy_plain_attributes(src: nn.Module, gm: fx.GraphModule) -> None:
    # untraced parent code may read attributes of the child (num_heads, config...)
    for key, value in vars(src).items():
        if key.startswith("_") or key == "training" or key in gm.__dict__:
            continue
        if isinstance(value, (nn.Module, torch.Tensor)):
            continue
        gm.__dict__[key] = value


class _InputsDoNotRun(CaptureError):
    """The model raised on the example inputs: no capture method can do better."""


def _capture_submodules(
    model: nn.Module, args: tuple | None, kwargs: dict | None, root_reason: str
) -> Capture:
    calls: dict[int, list[tuple[tuple, dict]]] = {}
    if args is not None:
        try:
            calls = _record_calls(model, args, kwargs or {})
        except Exception as e:
            raise _InputsDoNotRun(
                f"{type(model).__name__} raises on the example inputs (eval mode, no grad): "
                f"{_short(e)}. Pass example_inputs of the shape, dtype and device the model takes "
                "(positional, as a tuple; keyword inputs as example_kwargs)."
            ) from e
    graphs: dict[str, fx.GraphModule] = {}
    notes = [f"root ({type(model).__name__}) kept as Python: {root_reason}"]

    def visit(parent: nn.Module, prefix: str) -> None:
        for cname, child in list(parent._modules.items()):
            if child is None:
                continue
            path = prefix + cname
            if not any(True for _ in child.parameters()):
                continue
            if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
                visit(child, path + ".")  # never called itself: its children are
                continue
            if _is_torch_nn_leaf(child) and type(child) not in DENSE_LAYER_TYPES:
                continue  # torch.nn layers are units; their internals are not rewritable
            if has_hooks(child):
                notes.append(f"{path}: has hooks; kept as Python")
                continue
            concrete = None
            if calls:
                seen = calls.get(id(child), [])
                if not seen:
                    notes.append(f"{path}: not called on the example inputs in eval mode; "
                                 "traced without knowing its call arguments")
                elif len({_non_tensor_signature(a, kw) for a, kw in seen}) > 1:
                    visit(child, path + ".")
                    notes.append(f"{path}: called with differing non-tensor arguments; traced its children")
                    continue
                else:
                    try:
                        concrete = _concrete_args_for(child, *seen[0])
                    except CaptureError:
                        concrete = None
            try:
                graph, leaf_notes = _trace_graph(child, concrete)
                gm = make_graph_module(child, graph)
                canonicalize(gm)
            except Exception as e:  # noqa: BLE001 - every failure means "trace its children"
                notes.append(f"{path}: untraceable ({_short(e)}); traced its children")
                visit(child, path + ".")
                continue
            _copy_plain_attributes(child, gm)
            parent._modules[cname] = gm
            graphs[path] = gm
            notes.extend(f"{path}.{n}" for n in leaf_notes)

    visit(model, "")
    if not graphs:
        raise CaptureError("no submodule with parameters could be traced")
    return Capture(model, "submodules", graphs, notes)


def _dense_layers_traced_alone(cap: Capture, model: nn.Module) -> list[str]:
    """torch.nn layers of ``model`` (the user's, unchanged) whose parent block stayed Python.

    Such layers are captured one by one (or not at all, for norms and activations), so passes
    that follow a tensor from layer to layer see nothing of the block. Layers directly under
    the root do not count: an untraceable root is what per-submodule capture is for.
    """
    def covered(name: str) -> bool:
        parts = name.split(".")
        return any(".".join(parts[:i]) in cap.graphs for i in range(1, len(parts) + 1))

    alone = []
    for name, module in model.named_modules():
        parent = name.rpartition(".")[0]
        if not parent or not _is_torch_nn_leaf(module) or next(module.children(), None) is not None:
            continue
        if not covered(parent) and isinstance(module, (*DENSE_LAYER_TYPES, nn.LayerNorm, nn.modules.batchnorm._BatchNorm)):
            alone.append(name)
    return alone


def _unreached_parameters(cap: Capture, model: nn.Module) -> list[str]:
    """Dense layers and custom-module parameters that no traced graph contains."""
    reached: set[int] = set()
    for gm in cap.graphs.values():
        reached.update(id(p) for p in gm.parameters())
    missing = []
    for name, m in model.named_modules():
        if isinstance(m, fx.GraphModule):
            continue
        direct = [p for p in m._parameters.values() if p is not None]
        if not direct:
            continue
        dense = isinstance(m, DENSE_LAYER_TYPES)
        if (dense or not _is_torch_nn_leaf(m)) and any(id(p) not in reached for p in direct):
            missing.append(name or "(root)")
    return missing


def capture(
    model: nn.Module,
    example_inputs: tuple | list | None = None,
    example_kwargs: dict[str, Any] | None = None,
    *,
    methods: tuple[str, ...] = CAPTURE_METHODS,
) -> Capture:
    """Capture ``model`` as graphs, trying each method in turn.

    Args:
        model: any ``nn.Module``; it is not mutated.
        example_inputs: positional inputs of one forward call (needed by export / Dynamo and
            to fix non-tensor arguments of submodules).
        example_kwargs: keyword inputs of that call (``{"attention_mask": mask}``). Tensors are
            inputs of the graph; other values (``use_cache=False``, ``scale=0.5``) are constants
            of it: a later call may leave them out (the captured value is used) and a call with
            another value raises a :class:`CaptureError` naming the argument (Dynamo captures
            re-capture per value instead).
        methods: the methods to try, in order (a subset of ``CAPTURE_METHODS``).

    Returns:
        A :class:`Capture`; ``capture.method`` says which method worked.

    Raises:
        CaptureError: when no method works; ``error.failures`` gives each method's reason.

    Example:
        >>> import torch, sparsify_fx as sfx
        >>> cap = sfx.capture(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))
        >>> cap.method
        'symbolic_trace'
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(
            f"sparsify_fx needs a torch.nn.Module, got {type(model).__name__}; "
            "wrap a function in an nn.Module whose forward calls it"
        )
    unknown = [m for m in methods if m not in CAPTURE_METHODS]
    if unknown:
        raise CaptureError(f"unknown capture method(s) {unknown}; choose from {CAPTURE_METHODS}")
    if example_inputs is not None and not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    args = tuple(example_inputs) if example_inputs is not None else None
    if args is None and example_kwargs:
        args = ()
    kwargs = dict(example_kwargs or {})
    for p in model.parameters():
        if isinstance(p, nn.parameter.UninitializedParameter):
            raise CaptureError(
                "the model has uninitialized (lazy) parameters; run one forward pass before sparsify"
            )

    # (capture_export imports this module's Capture: imported here, not at the top)
    from sparsify_fx.frontend.export import capture_dynamo, capture_export

    failures: dict[str, str] = {}
    partial: Capture | None = None
    for method in methods:
        work = structural_copy(model)
        try:
            if method == "symbolic_trace":
                return _finish(_capture_whole(work, args, kwargs), failures)
            if method == "submodules":
                cap = _capture_submodules(work, args, kwargs, failures.get("symbolic_trace", ""))
                missing = _unreached_parameters(cap, work)
                alone = _dense_layers_traced_alone(cap, model)
                if not missing and not alone:
                    return _finish(cap, failures)
                partial = cap
                if missing:
                    cap.notes.append(f"parameters of {missing[:5]} are used by untraced Python code")
                    failures[method] = f"partial: {len(missing)} module(s) not reached ({', '.join(missing[:3])})"
                else:
                    # every layer is reachable, but one by one: passes that follow a tensor from
                    # one layer to the next (SliceOut, IsoFLOP, fused recompute) would see none of
                    # it, so a whole-graph method is tried first and this is the fallback
                    cap.notes.append(f"{len(alone)} layer(s) captured one by one, their blocks untraceable: "
                                     f"{', '.join(alone[:3])}")
                    failures[method] = (f"partial: {len(alone)} layer(s) captured one by one, their blocks "
                                        f"untraceable ({', '.join(alone[:3])}); whole-graph methods tried first")
                continue
            if args is None:
                failures[method] = "needs example_inputs"
                continue
            if method == "export":
                return _finish(capture_export(work, args, kwargs), failures)
            if method == "dynamo":
                return _finish(capture_dynamo(work, args, kwargs), failures)
        except CaptureError as e:
            if isinstance(e, _InputsDoNotRun) or "example inputs do not match" in str(e):
                raise
            failures[method] = _short(e)
        except Exception as e:  # noqa: BLE001 - recorded and reported together below
            failures[method] = _short(e)
    if partial is not None:
        return _finish(partial, {k: v for k, v in failures.items() if k != "submodules"})
    lines = "\n".join(f"  - {m}: {why}" for m, why in failures.items())
    if args is None:
        hint = ("Give example_inputs (and example_kwargs) so export/Dynamo can be tried, or mark "
                "the untraceable code with torch.fx.wrap.")
    else:
        hint = ("Mark the untraceable code with torch.fx.wrap, or move it out of forward "
                "(data-dependent Python control flow cannot be captured as one graph).")
    raise CaptureError(f"no capture method could handle {type(model).__name__}:\n{lines}\n{hint}", failures)


def _finish(cap: Capture, failures: dict[str, str]) -> Capture:
    cap.failures = dict(failures)
    return cap
