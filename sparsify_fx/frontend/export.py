"""The capture cascade's last two methods (``capture.py`` runs the cascade):

* ``export``: ``torch.export`` (non-strict) in both modes; the graphs must agree once the
  train/eval-dependent ops are put back as BatchNorm / Dropout module calls. Each input dim is
  dynamic where export can keep it so (batch, sequence length: ``Dim.AUTO``) and specialised
  otherwise; :class:`_ShapeGuard` rejects shapes outside what the graph was made for;
* ``dynamo``: :class:`DynamoCaptured`, whose graphs Dynamo hands over (and a transform
  rewrites) lazily, per input shape and mode, when the module first runs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from sparsify_fx.errors import CaptureError, SparsifyError
from sparsify_fx.frontend.arguments import CapturedArguments
from sparsify_fx.frontend.canonical import canonicalize
from sparsify_fx.frontend.captured_module import SharedStateGraphModule, convert_buffers_in_place
from sparsify_fx.frontend.cascade import Capture, _modes
from sparsify_fx.graph import meta
from sparsify_fx.graph.form import has_hooks

__all__ = ["capture_export", "capture_dynamo", "DynamoCaptured"]

# renamed from ``fail_on_cache_limit_hit`` (both spellings exist on the torch versions we support)
_FAIL_ON_LIMIT = ("fail_on_recompile_limit_hit" if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit")
                  else "fail_on_cache_limit_hit")
_LIMIT_HIT = getattr(torch._dynamo.exc, "FailOnRecompileLimitHit", None) or torch._dynamo.exc.FailOnCacheLimitHit


_MODE_OPS = {
    torch.ops.aten.batch_norm.default: (nn.modules.batchnorm._BatchNorm, 5),
    torch.ops.aten.dropout.default: (nn.modules.dropout._DropoutNd, 2),
}


def _module_call_region(gm: fx.GraphModule, node: fx.Node, key: str) -> tuple[list[fx.Node], fx.Node, fx.Node] | None:
    """The nodes one module call (``key`` of ``nn_module_stack``) made, its one input and
    its one output; None when the call does not have exactly one of each."""
    region = [n for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr", "output")
              and key in (n.meta.get("nn_module_stack") or {})]
    inside = set(region)
    inputs = {a for n in region for a in n.all_input_nodes if a not in inside and a.op != "get_attr"}
    outputs = [n for n in region if any(u not in inside for u in n.users)]
    if node not in inside or len(inputs) != 1 or len(outputs) != 1:
        return None
    return region, next(iter(inputs)), outputs[0]


def _restore_mode_ops(gm: fx.GraphModule) -> list[str]:
    """export bakes train/eval flags: put BatchNorm / Dropout back as module calls.

    A module that runs torch's own BatchNorm / Dropout forward replaces just its op. A
    subclass with a forward of its own (timm's ``BatchNormAct2d``: batch norm, then its
    activation in place) replaces every node its call made: calling it in place of the
    batch norm alone would run the activation twice."""
    unresolved = []
    erased: set[fx.Node] = set()
    for node in list(gm.graph.nodes):
        if node in erased or node.op != "call_function" or node.target not in _MODE_OPS:
            continue
        want, _ = _MODE_OPS[node.target]
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""
        try:
            mod = gm.get_submodule(path) if path else None
        except AttributeError:
            mod = None
        if not isinstance(mod, want):
            unresolved.append(node.format_node())
            continue
        region, x, out = [node], node.args[0], node
        if not getattr(type(mod).forward, "__module__", "").startswith("torch.nn."):
            found = _module_call_region(gm, node, list(stack)[-1])
            if found is None:
                unresolved.append(f"{node.format_node()} (in {type(mod).__name__} {path}, a forward of its own "
                                  "whose call has not exactly one tensor input and output)")
                continue
            region, x, out = found
        with gm.graph.inserting_after(out):
            new = gm.graph.call_module(path, (x,))
        new.meta.update(node.meta)
        new.meta[meta.MODULE] = path
        out.replace_all_uses_with(new)
        for n in reversed(region):
            gm.graph.erase_node(n)
            erased.add(n)
    gm.graph.lint()
    gm.recompile()
    return unresolved


def _counts_batches(node: fx.Node, buffers: dict[str, str]) -> bool:
    """A training graph's ``num_batches_tracked += 1``: the BatchNorm module call put back in
    place of ``aten.batch_norm`` does it itself (the eval graph, the one kept, has none)."""
    if node.target is not torch.ops.aten.add_.Tensor or not node.args:
        return False
    target = node.args[0]
    return (isinstance(target, fx.Node) and target.op == "placeholder"
            and buffers.get(target.name, "").endswith("num_batches_tracked"))


def capture_export(model: nn.Module, args: tuple, kwargs: dict | None) -> Capture:
    hooked = [name or "(root)" for name, m in model.named_modules() if has_hooks(m)]
    if hooked:
        # export runs hooks once while tracing and keeps only their tensor ops: a hook that
        # logs, collects features or counts calls would silently stop running
        raise CaptureError(f"export would inline the hooks of {hooked[:3]} (their Python side effects would be lost)")
    programs, guards = None, None
    try:  # every dim dynamic where export can keep it so (batch, sequence length)
        dims = _auto_dims(args, kwargs)
        if dims is not None:
            programs = _export_both_modes(model, args, kwargs, dims)
            guards = _readable_guards(programs[1], model, args)
    except Exception:  # noqa: BLE001 - a model export cannot keep dynamic: specialised instead
        programs = None
    sizes = _input_sizes(programs[1]) if programs is not None and guards is not None else None
    if sizes is None:
        programs, guards = _export_both_modes(model, args, kwargs, None), []
    keys = []
    for ep in programs:
        buffers = ep.graph_signature.inputs_to_buffers
        keys.append(
            [
                str(n.target)
                for n in ep.graph.nodes
                if n.op == "call_function" and n.target not in _MODE_OPS
                and not _counts_batches(n, buffers)
            ]
        )
    if keys[0] != keys[1]:
        raise CaptureError("the exported graph differs between train and eval mode")
    unlifted = programs[1].module()
    # the unlifted module refuses train()/eval(); a plain GraphModule over the same graph
    # (its pytree codegen included) does not
    gm = SharedStateGraphModule(unlifted, unlifted.graph, class_name=type(model).__name__)
    for name, m in model._modules.items():
        gm._modules[name] = m
    gm.register_forward_pre_hook(CapturedArguments(model, args, kwargs or {}), with_kwargs=True)
    guard = _ShapeGuard(args, kwargs or {}, sizes, guards, _parameter_names(model, args))
    gm.register_forward_pre_hook(guard, with_kwargs=True)
    # export's own input guard is a module whose forward is a local function: it cannot be
    # pickled, and the shape guard above already rejects inputs the graph was not made for
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            gm.graph.erase_node(node)
    if "_guards_fn" in gm._modules and not any(
            n.op == "call_module" and n.target == "_guards_fn" for n in gm.graph.nodes):
        del gm._modules["_guards_fn"]
    unresolved = _restore_mode_ops(gm)
    if unresolved:
        raise CaptureError(
            "export baked train/eval-dependent ops outside BatchNorm/Dropout modules: "
            + "; ".join(unresolved[:3])
        )
    canonicalize(gm)
    notes = [f"export kept {guard.describe()} dynamic; other shapes raise" if guard.dynamic
             else "export specialises shapes to the example inputs; other shapes raise"]
    return Capture(gm, "export", {"": gm}, notes)


def _export_both_modes(model: nn.Module, args: tuple, kwargs: dict | None, dynamic_shapes: Any) -> list:
    programs = []
    for training in (True, False):
        with _modes(model, training):
            programs.append(torch.export.export(model, tuple(args), kwargs or None, strict=False,
                                                dynamic_shapes=dynamic_shapes))
    return programs


def _auto_dims(args: tuple, kwargs: dict | None) -> Any:
    """``Dim.AUTO`` for every dim of every tensor argument: export keeps a dim dynamic where the
    model allows it and specialises the rest (a size the code branches on, a dim a parameter
    fixes). None (all static) where there are keyword arguments, whose spec export wants in
    signature order, or where this torch has no ``Dim.AUTO``."""
    auto = getattr(torch.export.Dim, "AUTO", None)
    if kwargs or auto is None:
        return None
    return tuple(torch.utils._pytree.tree_map(
        lambda t: {i: auto for i in range(t.dim())} if isinstance(t, torch.Tensor) else None, a) for a in args)


Sizes = list[tuple[int | tuple[int, int | None], ...]]


def _parameter_names(model: nn.Module, args: tuple) -> list[str]:
    import inspect

    params = list(inspect.signature(model.forward).parameters.values())
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params[:len(args)]) or len(params) < len(args):
        return []
    return [p.name for p in params[:len(args)]]


def _holds(guards: list[str], names: list[str], args: tuple) -> list[str]:
    """The guards (export's, on the inputs' sizes: ``(L['x'].size()[0] % 2) == 0``) that fail."""
    scope = {"L": dict(zip(names, args))}
    failed = []
    for code in guards:
        try:
            ok = bool(eval(code, {"__builtins__": {}}, scope))  # noqa: S307 - export's own guard text
        except Exception:  # noqa: BLE001 - a guard that cannot be read counts as failed
            ok = False
        if not ok:
            failed.append(code)
    return failed


def _readable_guards(program: Any, model: nn.Module, args: tuple) -> list[str] | None:
    """Export's guards on the input sizes, beyond the dims' ranges (a branch on
    ``batch % 2``): the dynamic graph holds only where they do, so they are checked on every
    call. None where they cannot be read (older torch, an argument layout they do not name) or
    do not hold on the example: the capture is then specialised."""
    guards = getattr(program, "_guards_code", None)
    names = _parameter_names(model, args)
    if guards is None or not names or _holds(list(guards), names, args):
        return None
    return list(guards)


def _input_sizes(program: Any) -> Sizes | None:
    """Per tensor input, per dim: its size, or the (min, max) range export kept it dynamic in
    (max None: unbounded). None where the inputs cannot be read back."""
    try:
        ranges = program.range_constraints
        sizes: Sizes = []
        user = set(program.graph_signature.user_inputs)
        for node in program.graph.nodes:
            value = node.meta.get("val")
            if node.op != "placeholder" or node.name not in user or not isinstance(value, torch.Tensor):
                continue
            dims = []
            for size in value.shape:
                if isinstance(size, torch.SymInt) and not size.node.expr.is_Integer:
                    bound = ranges[size.node.expr]  # (a derived expression: KeyError, all static)
                    upper = int(bound.upper) if bound.upper.is_Integer else None  # (int_oo: unbounded)
                    dims.append((int(bound.lower) if bound.lower.is_Integer else 0, upper))
                else:  # (a SymInt export specialised is a constant)
                    dims.append(int(size))
            sizes.append(tuple(dims))
        return sizes
    except Exception:  # noqa: BLE001 - unknown program layout: the example's shapes only
        return None


class _ShapeGuard:
    """Rejects inputs whose shapes the exported graph was not made for: a dim export kept
    dynamic may take any size in its range, the others must equal the example's."""

    def __init__(self, args: tuple, kwargs: dict, sizes: Sizes | None = None, guards: list[str] = (),
                 names: list[str] = ()):
        shapes = [tuple(t.shape) for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)]
        if sizes is None or len(sizes) != len(shapes) or any(len(a) != len(b) for a, b in zip(sizes, shapes)):
            sizes = [tuple(s) for s in shapes]
        self.sizes = sizes
        self.dynamic = [(i, d, s) for i, dims in enumerate(sizes) for d, s in enumerate(dims) if isinstance(s, tuple)]
        self.guards, self.names = (list(guards), list(names)) if self.dynamic else ([], [])

    def describe(self) -> str:
        return ", ".join(f"dim {d} of input {i} ({lo}..{hi if hi is not None else 'inf'})"
                         for i, d, (lo, hi) in self.dynamic)

    def _fits(self, shapes: list[tuple[int, ...]]) -> bool:
        if len(shapes) != len(self.sizes) or any(len(a) != len(b) for a, b in zip(shapes, self.sizes)):
            return False
        return all(got == want if isinstance(want, int) else
                   (want[0] <= got and (want[1] is None or got <= want[1]))
                   for shape, dims in zip(shapes, self.sizes) for got, want in zip(shape, dims))

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        shapes = [tuple(t.shape) for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)]
        fits = self._fits(shapes)
        failed = _holds(self.guards, self.names, args) if fits and self.guards else []
        if failed:
            raise CaptureError(
                f"{type(module).__name__} was captured by torch.export with dynamic sizes under the "
                f"conditions {failed}, which these inputs {shapes} break (the model takes another path "
                "there). Call sparsify with example inputs of the shape you train with.")
        if not fits:
            expected = "[" + ", ".join("(" + ", ".join(
                str(s) if isinstance(s, int) else f"{s[0]}..{s[1] if s[1] is not None else 'inf'}" for s in dims)
                + ("," if len(dims) == 1 else "") + ")" for dims in self.sizes) + "]"
            raise CaptureError(
                f"{type(module).__name__} was captured by torch.export for input shapes "
                f"{expected}; got {shapes}. Call sparsify with example inputs of the shape "
                "you train with."
            )


class DynamoCaptured(nn.Module):
    """A model captured by Dynamo: graphs are made (and rewritten) lazily on each new call.

    ``graph_transform(gm, example_inputs) -> (gm, runner)`` is applied to every graph Dynamo
    hands over (``runner``: what runs it, None for ``gm`` itself); ``self.graphs`` lists the
    graphs captured so far. Dims whose size changes between calls
    (batch, sequence length) become dynamic on the first recompile (Dynamo's automatic dynamic
    shapes), so variable-length training reuses one rewritten graph per mode. Where Dynamo
    would still give up (its recompile limit), the call runs the un-rewritten model, warns
    once naming the cause and is counted in ``self.dense_calls`` (and by ``on_fallback``).
    """

    def __init__(self, model: nn.Module, graph_transform: Callable | None = None,
                 on_fallback: Callable[[str], None] | None = None):
        super().__init__()
        self.model = model
        self.graphs: list[fx.GraphModule] = []
        self.dense_calls = 0
        self.fallback_reason: str | None = None
        self._transform = graph_transform
        self._on_fallback = on_fallback
        self._compiled = torch.compile(model, backend=self._backend, dynamic=None)
        self._outer_compile_warned = False

    def _backend(self, gm: fx.GraphModule, example_inputs: list) -> Callable:
        runner = None
        if self._transform is not None:
            gm, runner = self._transform(gm, example_inputs)
        self.graphs.append(gm)
        return runner or gm.forward

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling() and not self._outer_compile_warned:
            # an outer torch.compile reaches this module's own compiled call and runs it as it
            # is: Inductor makes no kernel for the rewritten graphs (HF BERT: 0 kernels)
            self._outer_compile_warned = True
            warnings.warn(
                f"sparsify: torch.compile of {type(self.model).__name__}, which sparsify captured with Dynamo, "
                "compiles nothing more: its rewritten graphs run as they are. To compile them, give the "
                "recipe to the compiler instead: torch.compile(model, backend=sfx.backend(recipe)).",
                UserWarning, stacklevel=2)
        try:
            # Dynamo's own fallback at its recompile limit runs the eager forward with a log
            # line only: raised instead, and taken below where it is counted and warned
            with torch._dynamo.config.patch(_FAIL_ON_LIMIT, True):
                return self._compiled(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            # our own errors (a refused rewrite) are the user's to see, not Dynamo's wrapper
            inner = getattr(e, "inner_exception", None)
            if isinstance(inner, SparsifyError):
                raise inner from None
            raise
        except _LIMIT_HIT as e:
            return self._dense_call(str(e).splitlines()[0] if str(e) else type(e).__name__, args, kwargs)

    def _dense_call(self, cause: str, args: tuple, kwargs: dict) -> Any:
        self.dense_calls += 1
        if self.fallback_reason is None:
            self.fallback_reason = cause
            warnings.warn(
                f"sparsify: {type(self.model).__name__} ran un-rewritten (dense): Dynamo gave up "
                f"re-capturing it after {len(self.graphs)} graph(s) ({cause}). This and later calls "
                "Dynamo cannot capture save no memory; counted in sfx.explain(...).dense_fallback_calls. "
                "Keep the input shapes and train/eval switches to a few, or raise "
                "torch._dynamo.config.recompile_limit.", UserWarning, stacklevel=3)
        if self._on_fallback is not None:
            self._on_fallback(cause)
        return self.model(*args, **kwargs)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict:  # keys of the original model
        return self.model.state_dict(*args, **kwargs)

    def _apply(self, fn: Callable, recurse: bool = True) -> nn.Module:
        if recurse:
            convert_buffers_in_place(self, fn)
        return super()._apply(fn, recurse)


def capture_dynamo(model: nn.Module, args: tuple, kwargs: dict | None) -> Capture:
    wrapper = DynamoCaptured(model)
    with torch.no_grad(), _modes(model, False):
        wrapper(*args, **(kwargs or {}))
    if not wrapper.graphs:
        raise CaptureError("Dynamo produced no graph")
    torch._dynamo.reset()
    notes = [
        f"Dynamo captured {len(wrapper.graphs)} graph(s) on the example inputs; "
        "graphs are re-captured per input shape and train/eval mode"
    ]
    return Capture(wrapper, "dynamo", {}, notes)
