"""torch.compile integration: every Dynamo graph is canonicalized, rewritten, then compiled.

``torch.compile(model, backend="sparsify_fx")`` uses :data:`DEFAULT_RECIPE` and Inductor;
``torch.compile(model, backend=sfx.backend(recipe, inner="inductor"))`` picks both.
Each graph Dynamo makes (one per graph break, per input shape, per train/eval mode) is
rewritten the first time Dynamo makes it, then handed to the inner backend.

How a graph is made ready for the passes and handed back:

* Dynamo passes parameters as graph inputs; they are turned into ``get_attr`` nodes named by
  their qualified names (so ``include=`` globs and ``sfx.explain`` see ``"layer1.0.conv1"``)
  and, for the AOTAutograd-based inner backends, turned back into inputs after the rewrite.
* The op modules the passes install switch on ``self.training``; a Dynamo graph has no mode,
  so each op module takes the mode of the model's module it replaced (read from the frame
  Dynamo is compiling; Dynamo guards on that mode and recompiles when it changes), or the
  grad mode where the module cannot be found.
* Op modules that must run in Python on every training call (``OpModule.host_side``:
  SliceOut's window draw) would be traced once by AOTAutograd and their first result baked
  into the compiled code, so a training graph holding one is refused for ``aot_eager`` /
  ``inductor`` / ``cudagraphs`` (``inner="eager"`` runs it; so does compiling ``sfx.sparsify``'s result, where
  Dynamo itself sees the draw). Eval graphs are fine: there the module is a constant ``None``.
* Passes that add parameters (IsoFLOP) are rejected: parameters created inside a compiler
  backend would be invisible to the optimizer and re-created on every recompilation; use
  ``torch.compile(sfx.sparsify(model, recipe), ...)`` for them.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from sparsify_fx.analysis.held import held_bytes
from sparsify_fx.analysis.shapes import record_shapes_fake
from sparsify_fx.errors import ConfigError
from sparsify_fx.frontend.canonical import canonicalize
from sparsify_fx.graph import meta
from sparsify_fx.graph.form import OPS_CONTAINER, clean_module_path
from sparsify_fx.graph.op_module import OpModule
from sparsify_fx.infra.pass_base import dense_layer_order, run_passes
from sparsify_fx.infra.recipes import Recipe, resolve_recipe

__all__ = ["backend", "default_backend", "DEFAULT_RECIPE", "INNER_BACKENDS", "prepare_dynamo_graph",
           "ReplanningGraph", "REPLAN_GROWTH", "rewrite_prepared", "rewrite_lazily"]

#: recipe of ``backend="sparsify_fx"``: DropIT keeping 10% of each saved dense-layer input.
DEFAULT_RECIPE = "dropit:keep=0.1"

#: backends a rewritten graph can be handed to.
INNER_BACKENDS = ("eager", "aot_eager", "inductor", "cudagraphs")

# L['self']._modules['layer1']._modules['0']._parameters['weight'] -> layer1.0.weight
_SOURCE_STEP = re.compile(r"\._(?:modules|parameters|buffers)\['([^']+)'\]|\.([A-Za-z_0-9]+)|\[(\d+)\]|\['([^']+)'\]")


def _source_name(node: fx.Node) -> str | None:
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return None
    name = source.name
    return name() if callable(name) else str(name)


def _resolve_source(path: str, frame: dict[str, dict]) -> Any:
    """The object a Dynamo source string (``L['self'].layers[0]``) names in ``frame``."""
    head = re.match(r"^([LG])\['([^']+)'\]", path)
    if head is None:
        raise KeyError(path)
    obj = frame[head.group(1)][head.group(2)]
    for match in _SOURCE_STEP.finditer(path, head.end()):
        private, attr, index, key = match.groups()
        if private is not None or attr is not None:
            obj = getattr(obj, private or attr)
        elif index is not None:
            obj = obj[int(index)]
        else:
            obj = obj[key]
    return obj


def _dynamo_frame() -> dict[str, dict] | None:
    """Locals and globals of the frame Dynamo is compiling (None outside a Dynamo compile)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        return {"L": dict(tx.f_locals), "G": dict(tx.f_globals)}
    except Exception:  # noqa: BLE001 - internal API; the grad mode is the fallback
        return None


def _lift_parameters(
    gm: fx.GraphModule, example_inputs: list, names: dict[int, str]
) -> list[tuple[fx.Node, str]]:
    """Dynamo passes parameters as graph inputs; make them get_attr nodes passes can match.

    Returns the (placeholder, qualified name) pairs lifted, for :func:`_lower_parameters`.
    """
    lifted: list[tuple[fx.Node, str]] = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        if not isinstance(value, nn.Parameter):
            continue
        source = _source_name(node)
        qualified = names.get(id(value)) or (clean_module_path(source) if source else "") or node.name
        *path, leaf = qualified.split(".")
        owner: nn.Module = gm
        for part in path:
            child = owner._modules.get(part)
            if child is None:
                child = nn.Module()
                owner.add_module(part, child)
            owner = child
        if leaf in owner._parameters and owner._parameters[leaf] is not value:
            qualified = node.name  # two graph inputs claim one name: keep them apart
            owner, leaf = gm, qualified
        if leaf not in owner._parameters:
            owner.register_parameter(leaf, value)
        with gm.graph.inserting_after(node):
            attr = gm.graph.get_attr(qualified)
        # the module stack says which block a parameter belongs to (the budget's segments)
        attr.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
        node.replace_all_uses_with(attr)
        lifted.append((node, qualified))
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack and meta.MODULE not in node.meta:
            node.meta[meta.MODULE] = clean_module_path(str(list(stack.values())[-1][0]))
    gm.graph.lint()
    gm.recompile()
    return lifted


def _lower_parameters(gm: fx.GraphModule, lifted: list[tuple[fx.Node, str]]) -> None:
    """Undo :func:`_lift_parameters`: AOTAutograd wants Dynamo's parameter inputs back."""
    by_name = {qualified: node for node, qualified in lifted}
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and node.target in by_name:
            node.replace_all_uses_with(by_name[node.target])
            gm.graph.erase_node(node)
    for qualified in by_name:
        *path, leaf = qualified.split(".")
        owner = gm
        for part in path:
            owner = owner._modules[part]
        owner._parameters.pop(leaf, None)
    for name in {q.split(".")[0] for q in by_name if "." in q}:
        child = gm._modules.get(name)
        if child is not None and next(child.parameters(), None) is None:
            del gm._modules[name]
    gm.graph.lint()
    gm.recompile()


def _set_op_modes(gm: fx.GraphModule, frame: dict[str, dict] | None) -> None:
    """Give each installed op module the train/eval mode of the model module it replaced."""
    fallback = torch.is_grad_enabled()
    for node in gm.graph.nodes:
        if node.op != "call_module" or not str(node.target).startswith(OPS_CONTAINER + "."):
            continue
        mode = None
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        for path, _ in reversed(stack):  # the innermost module that can be found
            try:
                mode = bool(_resolve_source(str(path), frame).training) if frame else None
            except Exception:  # noqa: BLE001 - unknown source: try the enclosing module
                continue
            break
        gm.get_submodule(str(node.target)).training = fallback if mode is None else mode


def prepare_dynamo_graph(gm: fx.GraphModule, example_inputs: list, names: dict[int, str] | None = None) -> list:
    """Put one Dynamo graph in the canonical form, in place, with recorded shapes.

    Parameters become ``get_attr`` nodes of ``gm`` (named by ``names[id(param)]``, else by
    their Dynamo source). Returns the lifted (placeholder, name) pairs.
    """
    lifted = _lift_parameters(gm, example_inputs, names or {})
    canonicalize(gm)
    record_shapes_fake(gm, example_inputs)
    # Dynamo guards on grad mode and autocast: both are fixed for the life of this graph
    gm.meta[meta.NO_GRAD] = not torch.is_grad_enabled()
    device = next((t.device.type for t in example_inputs if isinstance(t, torch.Tensor)), "cpu")
    if torch.is_autocast_enabled(device):  # the memory plan counts the copies autocast keeps
        gm.meta[meta.AUTOCAST] = torch.get_autocast_dtype(device)
    return lifted


def rewrite_prepared(gm: fx.GraphModule, configs: list, frame: dict[str, dict] | None = None) -> list:
    """Run the recipe on a prepared Dynamo graph; installed op modules take the mode of the
    modules they replaced (found in ``frame``, by default the one Dynamo is compiling).
    Returns the pass results."""
    order = dense_layer_order({"": gm})
    first_last = tuple(dict.fromkeys([order[0], order[-1]])) if order else ()
    results = run_passes({"": gm}, configs, first_last)
    _set_op_modes(gm, frame if frame is not None else _dynamo_frame())
    return results


#: a training graph with dynamic sizes, rewritten by a pass that plans per size (a budget), is
#: re-planned when a call's dynamic size exceeds the largest it was planned at by this factor
REPLAN_GROWTH = 1.25


class ReplanningGraph:
    """Runs a Dynamo graph with dynamic sizes (a sequence length) rewritten by a budget, and
    re-plans it when a call's size grows past :data:`REPLAN_GROWTH` times the largest planned.

    A budget is a fraction of what the dense graph holds at the sizes it was planned at, and
    the parts of what it holds grow differently with a length (autocast's weight casts not at
    all, activations linearly, attention scores with its square): a plan made at length 18
    held 0.50x there and 0.55x at length 38 (GPT-2 under bf16 autocast). The re-plan runs the
    recipe again on an un-rewritten copy of the graph (sharing the model's parameters) with
    shapes recorded at the call's sizes, once per growth step, in that call. Shorter calls
    keep the newest plan: made at a longer length, it holds at most its fraction there.
    """

    def __init__(self, pristine: fx.GraphModule, rewritten: fx.GraphModule, configs: list,
                 size_inputs: list[int], sizes: list[int], frame: dict[str, dict] | None,
                 on_replan: Callable[[fx.GraphModule, list, list[int], int | None], None]):
        self.pristine, self.current, self.configs = pristine, rewritten, configs
        self.size_inputs, self.sizes, self.frame, self.on_replan = size_inputs, sizes, frame, on_replan

    def __call__(self, *args: Any) -> Any:
        sizes = [int(args[i]) for i in self.size_inputs]
        if any(s > REPLAN_GROWTH * p for s, p in zip(sizes, self.sizes)):
            grown = [max(s, p) for s, p in zip(sizes, self.sizes)]
            try:
                fresh = fx.GraphModule(self.pristine, copy.deepcopy(self.pristine.graph))
                fresh.meta.update(self.pristine.meta)
                record_shapes_fake(fresh, list(args))
                before = held_bytes({"": fresh})
                results = rewrite_prepared(fresh, self.configs, self.frame)
            except Exception as e:  # noqa: BLE001 - a training step must not fail on a re-plan
                planned, self.sizes = self.sizes, grown  # (not retried until the size grows again)
                warnings.warn(f"sparsify: re-planning a dynamic-size training graph at sizes {sizes} failed "
                              f"({type(e).__name__}: {e}); the plan made at {planned} keeps running, and may "
                              "hold more than its budget at this size", UserWarning, stacklevel=2)
                return self.current.forward(*args)
            self.current, self.sizes = fresh, grown
            self.on_replan(fresh, results, sizes, before)
        return self.current.forward(*args)


def _refuse_added_parameters(gm: fx.GraphModule, configs: list, results: list, why: str) -> None:
    """Raise when a pass added parameters to a Dynamo graph (nobody could train them)."""
    ops = getattr(gm, OPS_CONTAINER, None)
    added = [n for n, _ in ops.named_parameters()] if ops is not None else []
    if added:
        passes = sorted({c.describe() for c, r in zip(configs, results) if r.rewrites})
        raise ConfigError(f"{', '.join(passes)} adds parameters ({', '.join(added[:3])}, ...): {why}")


def backend(recipe: Recipe = DEFAULT_RECIPE, inner: str = "inductor") -> Callable:
    """A ``torch.compile`` backend that rewrites each graph with ``recipe`` then runs ``inner``.

    Args:
        recipe: as for :func:`sparsify_fx.sparsify` (passes that add parameters, like
            ``IsoFLOP``, are refused: sparsify first, then compile).
        inner: ``"eager"`` (run the rewritten graph as is), ``"aot_eager"``, ``"inductor"``
            or ``"cudagraphs"`` (AOTAutograd, then each forward and backward replayed as a
            CUDA graph: on a GPU that takes the host out of the step, where the passes' ops
            otherwise leave it host-bound; elsewhere it runs like ``aot_eager``).

    Returns:
        A function ``(gm, example_inputs) -> callable`` to pass as ``torch.compile(backend=...)``.

    Example:
        >>> import torch, sparsify_fx as sfx
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> compiled = torch.compile(model, backend=sfx.backend("dropit:keep=0.5", inner="eager"))
        >>> compiled(torch.randn(4, 8)).shape
        torch.Size([4, 2])
    """
    configs = resolve_recipe(recipe)
    if inner not in INNER_BACKENDS:
        raise ValueError(f"inner must be one of {', '.join(map(repr, INNER_BACKENDS))}, got {inner!r}")

    def compile_graph(gm: fx.GraphModule, example_inputs: list) -> Any:
        lifted = prepare_dynamo_graph(gm, example_inputs)
        results = rewrite_prepared(gm, configs)
        compile_graph.results.append(results)
        _refuse_added_parameters(gm, configs, results, "a torch.compile backend cannot hand them to your "
                                 "optimizer; use torch.compile(sfx.sparsify(model, recipe, example_inputs), "
                                 "...) instead")
        if inner == "eager":
            return gm.forward
        _lower_parameters(gm, lifted)
        host_side = [n for n, m in gm.named_modules() if isinstance(m, OpModule) and m.host_side and m.training]
        if host_side:
            raise ConfigError(
                f"sfx.backend(inner={inner!r}): {host_side[0]} must run in Python on every training "
                "step (a SliceOut window is drawn per step) and AOTAutograd would bake its first "
                "value into the compiled graph; use inner='eager', or compile the sparsified "
                "module: torch.compile(sfx.sparsify(model, recipe, example_inputs), ...)"
            )
        return torch._dynamo.lookup_backend(inner)(gm, example_inputs)

    compile_graph.results = []  # per compiled graph: the PassResult of each config
    return compile_graph


def default_backend(gm: fx.GraphModule, example_inputs: list) -> Any:
    """The backend registered as ``"sparsify_fx"``: :data:`DEFAULT_RECIPE`, inner inductor."""
    return backend(DEFAULT_RECIPE, inner="inductor")(gm, example_inputs)


def rewrite_lazily(cap: Any, configs: list, record: Any) -> nn.Module:
    """For a Dynamo capture: a module that rewrites each graph Dynamo makes, on first use."""
    from sparsify_fx.frontend.export import DynamoCaptured
    from sparsify_fx.sparsify import _planned

    model = cap.graph_module.model
    names = {id(p): n for n, p in model.named_parameters()}

    def adopt(gm: fx.GraphModule, results: list, before: int | None) -> None:
        if before is not None:  # the headline: the newest graph that trains
            record.held_bytes_before = before
            rewrites = [r for res in results for r in res.rewrites]
            record.held_bytes_after = _planned(record, lambda: held_bytes({"": gm}, rewrites))
        _refuse_added_parameters(gm, configs, results, "this model could only be captured by Dynamo, whose graphs "
                                 "are made per input shape and train/eval mode (each would get its own new "
                                 "parameters); make it capturable by export (e.g. no mode-dependent attention "
                                 "dropout) or restrict the pass with include=/exclude=")
        for config, result in zip(configs, results):
            record.rewrites += result.rewrites
            record.skips += result.skips
            record.plans += result.plans
            record.passes.append((config.describe(), len(result.rewrites), len(result.skips)))

    def transform(gm: fx.GraphModule, example_inputs: list) -> tuple[fx.GraphModule, Callable | None]:
        prepare_dynamo_graph(gm, example_inputs, names)
        training = not gm.meta[meta.NO_GRAD]
        size_inputs = [i for i, v in enumerate(example_inputs) if isinstance(v, torch.SymInt)]
        hints = [example_inputs[i].node.hint for i in size_inputs]
        replans = training and bool(size_inputs) and all(h is not None for h in hints) \
            and any(c.plans_per_size for c in configs)
        pristine = fx.GraphModule(gm, copy.deepcopy(gm.graph)) if replans else None
        if pristine is not None:
            pristine.meta.update(gm.meta)
        before = _planned(record, lambda: held_bytes({"": gm})) if training else None
        frame = _dynamo_frame()
        results = rewrite_prepared(gm, configs, frame)
        adopt(gm, results, before)
        if pristine is None:
            return gm, None
        # a re-plan finds the modules' modes through the frame's modules only: its input
        # tensors are not kept alive for the graph's life
        frame = {"L": {k: v for k, v in frame["L"].items() if isinstance(v, nn.Module)}, "G": {}} if frame else None

        def on_replan(fresh: fx.GraphModule, results: list, sizes: list[int], before: int | None) -> None:
            record.capture_notes.append(f"re-planned a dynamic-size training graph at sizes {sizes} "
                                        f"(grown past {REPLAN_GROWTH}x the sizes it was planned at)")
            adopt(fresh, results, before)

        return gm, ReplanningGraph(pristine, gm, configs, size_inputs, [int(h) for h in hints], frame, on_replan)

    def on_fallback(cause: str) -> None:
        record.dense_fallback_calls += 1
        record.dense_fallback_reason = record.dense_fallback_reason or cause

    return DynamoCaptured(model, transform, on_fallback)
