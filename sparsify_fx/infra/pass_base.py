"""What a pass returns, what it is given, and the manager that runs passes transactionally."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
import torch.nn as nn

from sparsify_fx.infra.config import PassConfig
from sparsify_fx.errors import PassError
from sparsify_fx.graph.form import OPS_CONTAINER, DenseOp, find_dense_ops
from sparsify_fx.infra.registry import lookup

__all__ = ["Rewrite", "Skip", "PassResult", "PassContext", "run_passes"]


@dataclass
class Rewrite:
    """One node a pass replaced."""

    pass_name: str
    node: str
    module: str
    op: str
    replacement: str
    saved_bytes_before: int | None = None
    saved_bytes_after: int | None = None
    flops_before: int | None = None
    flops_after: int | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Skip:
    """One candidate node a pass left alone, and why."""

    pass_name: str
    node: str
    module: str
    op: str
    reason: str


@dataclass
class PassResult:
    """What a pass returns: the module, whether it changed, and every rewrite and skip."""

    graph_module: fx.GraphModule
    modified: bool
    rewrites: list[Rewrite] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)


@dataclass
class PassContext:
    """What the manager hands a pass besides the graph and its config.

    Attributes:
        prefix: qualified name of this graph in the model ('' for the root; ``"encoder."``
            when only a submodule was traced), so names match ``model.named_modules()``.
        first_last: qualified module names of the model's first and last dense layers.
        pass_name: the recipe name of the running pass.
    """

    prefix: str = ""
    first_last: tuple[str, ...] = ()
    pass_name: str = ""

    def qualified(self, module_name: str) -> str:
        if not self.prefix:
            return module_name
        return self.prefix.rstrip(".") + ("." + module_name if module_name else "")

    def selection_reason(
        self, config: PassConfig, op: DenseOp | None, module_name: str, root: nn.Module
    ) -> str | None:
        """None when the layer may be rewritten, else the reason it is skipped."""
        name = self.qualified(module_name)
        try:
            module = root.get_submodule(module_name) if module_name else None
        except AttributeError:
            module = None
        return config.selection_reason(name, module)

    def skip(self, op: DenseOp | fx.Node, reason: str) -> Skip:
        node = op.node if isinstance(op, DenseOp) else op
        module = op.module_name if isinstance(op, DenseOp) else str(node.meta.get("sfx_module", ""))
        kind = op.kind if isinstance(op, DenseOp) else str(getattr(node.target, "__name__", node.target))
        return Skip(self.pass_name, node.name, self.qualified(module), kind, reason)


def _snapshot(gm: fx.GraphModule) -> tuple[fx.Graph, dict[str, Any], dict[str, Any]]:
    graph = fx.Graph(owning_module=gm)
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    ops = getattr(gm, OPS_CONTAINER, None)
    return graph, dict(gm._modules), dict(ops._modules) if ops is not None else {}


def _restore(gm: fx.GraphModule, snap: tuple[fx.Graph, dict[str, Any], dict[str, Any]]) -> None:
    graph, modules, ops_children = snap
    gm._modules.clear()
    gm._modules.update(modules)
    ops = getattr(gm, OPS_CONTAINER, None)
    if ops is not None:
        ops._modules.clear()
        ops._modules.update(ops_children)
    gm.graph = graph
    gm.recompile()


def _tensor_versions(gm: fx.GraphModule) -> dict[str, tuple[Any, int]]:
    """Each parameter / buffer and its in-place version counter (shared with the user's model)."""
    tensors = dict(gm.named_parameters())
    tensors.update(gm.named_buffers())
    return {name: (t, t._version) for name, t in tensors.items()}


def _mutated(versions: dict[str, tuple[Any, int]]) -> list[str]:
    return [name for name, (t, version) in versions.items() if t._version != version]


def run_passes(
    graphs: dict[str, fx.GraphModule],
    configs: Sequence[PassConfig],
    first_last: tuple[str, ...] = (),
) -> list[PassResult]:
    """Apply each config's pass to every graph, in order; lint + recompile after each.

    A pass that raises leaves its graph exactly as before the pass, and the error is re-raised
    as :class:`PassError` naming the pass and the node it was working on. A pass that modifies
    a parameter or buffer in place (they are the user's model's own tensors) is refused the
    same way: the message names the tensors, since their values cannot be rolled back.
    Op modules a pass installs take the graph's train/eval mode.
    """
    results = []
    for config in configs:
        spec = lookup(config)
        total = PassResult(graph_module=None, modified=False)  # type: ignore[arg-type]
        for prefix, gm in graphs.items():
            ctx = PassContext(prefix=prefix + "." if prefix else "", first_last=first_last, pass_name=spec.name)
            snap = _snapshot(gm)
            versions = _tensor_versions(gm)
            try:
                result = spec.transform(gm, config, ctx)
                if not isinstance(result, PassResult):
                    raise TypeError(f"pass returned {type(result).__name__}, expected PassResult")
                changed = _mutated(versions)
                if changed:
                    raise RuntimeError(
                        f"the pass modified {', '.join(ctx.qualified(n) for n in changed[:5])} in place; "
                        "passes must leave the model's parameters and buffers alone (add new ones instead)"
                    )
                gm.graph.lint()
                gm.recompile()
                ops = getattr(gm, OPS_CONTAINER, None)
                if ops is not None:
                    # nn.Module() starts in training mode: a pass run on an eval() model must
                    # not leave its op modules training (SliceOut would slice in eval)
                    ops.train(gm.training)
            except Exception as e:
                _restore(gm, snap)
                changed = _mutated(versions)
                node = getattr(e, "sfx_node", None)
                where = ""
                if isinstance(node, fx.Node):
                    module = ctx.qualified(str(node.meta.get("sfx_module", "")))
                    where = f" at node {node.format_node()}" + (f" (module {module!r})" if module else "")
                if changed:
                    outcome = (f"The graph was restored, but {', '.join(ctx.qualified(n) for n in changed[:5])} "
                               "(shared with the original model) was modified in place and cannot be restored.")
                else:
                    outcome = "The model was left unchanged."
                raise PassError(
                    f"pass {spec.name!r} failed on graph {prefix or '(root)'}{where}: "
                    f"{type(e).__name__}: {e}. {outcome}",
                    pass_name=spec.name,
                    node=node.name if isinstance(node, fx.Node) else "",
                ) from e
            total.modified |= result.modified
            total.rewrites.extend(result.rewrites)
            total.skips.extend(result.skips)
            total.graph_module = result.graph_module
        results.append(total)
    return results


def dense_layer_order(graphs: dict[str, fx.GraphModule]) -> list[str]:
    """Qualified module names of every dense op, in graph order, graphs in model order."""
    names: list[str] = []
    for prefix, gm in graphs.items():
        ops, _ = find_dense_ops(gm)
        ctx = PassContext(prefix=prefix + "." if prefix else "")
        for op in ops:
            q = ctx.qualified(op.module_name)
            if q not in names:
                names.append(q)
    return names
