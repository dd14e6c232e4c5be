"""torch.compile integration: every Dynamo graph is canonicalized, rewritten, then compiled.

``torch.compile(model, backend="sparsify_fx")`` uses :data:`DEFAULT_RECIPE`;
``torch.compile(model, backend=sfx.backend(recipe, inner="inductor"))`` picks both.
The same machinery rewrites models that only Dynamo can capture (``capture`` method
``"dynamo"``): there each graph is rewritten the first time Dynamo makes it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .graph import canonicalize
from .pass_base import dense_layer_order, run_passes
from .recipes import Recipe, resolve_recipe

__all__ = ["backend", "default_backend", "DEFAULT_RECIPE", "rewrite_dynamo_graph", "rewrite_lazily"]

#: recipe of ``backend="sparsify_fx"``: DropIT keeping 10% of each saved dense-layer input.
DEFAULT_RECIPE = "dropit:keep=0.1"


def _clean_dynamo_path(path: str) -> str:
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    return path.strip(".")


def _lift_parameters(gm: fx.GraphModule, example_inputs: list, names: dict[int, str]) -> None:
    """Dynamo passes parameters as graph inputs; make them get_attr nodes passes can match."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        if not isinstance(value, nn.Parameter):
            continue
        qualified = names.get(id(value), node.name)
        *path, leaf = qualified.split(".")
        owner: nn.Module = gm
        for part in path:
            child = owner._modules.get(part)
            if child is None:
                child = nn.Module()
                owner.add_module(part, child)
            owner = child
        if leaf not in owner._parameters:
            owner.register_parameter(leaf, value)
        with gm.graph.inserting_after(node):
            attr = gm.graph.get_attr(qualified)
        node.replace_all_uses_with(attr)
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack and "sfx_module" not in node.meta:
            node.meta["sfx_module"] = _clean_dynamo_path(str(list(stack.values())[-1][0]))
    gm.graph.lint()
    gm.recompile()


def rewrite_dynamo_graph(
    gm: fx.GraphModule, example_inputs: list, configs: list, names: dict[int, str] | None = None
) -> tuple[fx.GraphModule, list]:
    """Canonicalize and rewrite one Dynamo graph; returns it and the pass results."""
    _lift_parameters(gm, example_inputs, names or {})
    canonicalize(gm)
    order = dense_layer_order({"": gm})
    first_last = tuple(dict.fromkeys([order[0], order[-1]])) if order else ()
    results = run_passes({"": gm}, configs, first_last)
    return gm, results


def backend(recipe: Recipe = DEFAULT_RECIPE, inner: str = "inductor") -> Callable:
    """A ``torch.compile`` backend that rewrites each graph with ``recipe`` then runs ``inner``.

    Args:
        recipe: as for :func:`sparsify_fx.sparsify`.
        inner: ``"eager"`` (run the rewritten graph as is), ``"aot_eager"`` or ``"inductor"``.
    """
    configs = resolve_recipe(recipe)
    if inner not in ("eager", "aot_eager", "inductor"):
        raise ValueError(f"inner must be 'eager', 'aot_eager' or 'inductor', got {inner!r}")

    def compile_graph(gm: fx.GraphModule, example_inputs: list) -> Any:
        gm, _ = rewrite_dynamo_graph(gm, example_inputs, configs)
        if inner == "eager":
            return gm.forward
        return torch._dynamo.lookup_backend(inner)(gm, example_inputs)

    return compile_graph


def default_backend(gm: fx.GraphModule, example_inputs: list) -> Any:
    """The backend registered as ``"sparsify_fx"``: :data:`DEFAULT_RECIPE`, inner inductor."""
    return backend(DEFAULT_RECIPE, inner="inductor")(gm, example_inputs)


def rewrite_lazily(cap: Any, configs: list, record: Any) -> nn.Module:
    """For a Dynamo capture: a module that rewrites each graph Dynamo makes, on first use."""
    from .capture import DynamoCaptured

    model = cap.graph_module.model
    names = {id(p): n for n, p in model.named_parameters()}

    def transform(gm: fx.GraphModule, example_inputs: list) -> fx.GraphModule:
        gm, results = rewrite_dynamo_graph(gm, example_inputs, configs, names)
        for config, result in zip(configs, results):
            record.rewrites += result.rewrites
            record.skips += result.skips
            record.passes.append((config.describe(), len(result.rewrites), len(result.skips)))
        return gm

    return DynamoCaptured(model, transform)
