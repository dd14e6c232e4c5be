"""What a pass returns, what it is given, and the manager that runs passes transactionally.

:func:`run_pass` applies one pass to one graph module (lint, recompile, rollback, errors that
name the pass and node); :func:`run_passes` applies a recipe to every captured graph with it.
A pass that runs other passes (``MemoryBudget`` trying its choices) calls :func:`run_pass`
too, so each inner pass gets the same checks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch.fx as fx
import torch.nn as nn

from sparsify_fx.errors import PassError
from sparsify_fx.graph import meta
from sparsify_fx.graph.form import OPS_CONTAINER, DenseOp, find_dense_ops
from sparsify_fx.infra.config import PassConfig
from sparsify_fx.infra.registry import lookup

__all__ = ["Rewrite", "Skip", "PlanOption", "PlanUnit", "PassPlan", "PassResult", "PassContext",
           "run_pass", "run_passes", "dense_layer_order"]


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


@dataclass(frozen=True)
class PlanOption:
    """One way a planning pass could treat a unit, as it priced it.

    Attributes:
        bytes: what backward would hold for the unit with this option.
        seconds: the price per training step the solver compared.
        estimated_seconds: the estimate before the pass's floor on prices (below zero where
            the option saves time).
    """

    bytes: int
    seconds: float
    estimated_seconds: float


@dataclass(frozen=True)
class PlanUnit:
    """One unit of a plan (a block of the model, a gap between blocks, or the rest).

    Attributes:
        name: the unit's name (a block's qualified module name, or the pass's own label).
        choice: the option chosen for it (a key of ``options``).
        options: every option the pass priced for the unit, by name.
        unavailable: options the unit could not take, with the reason.
    """

    name: str
    choice: str
    options: Mapping[str, PlanOption]
    unavailable: Mapping[str, str] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return self.options[self.choice].bytes

    @property
    def estimated_seconds(self) -> float:
        return self.options[self.choice].estimated_seconds

    def to_dict(self) -> dict[str, Any]:
        return {
            "choice": self.choice, "bytes": self.bytes, "estimated_seconds": self.estimated_seconds,
            "options": {k: {"bytes": o.bytes, "seconds": o.seconds, "estimated_seconds": o.estimated_seconds}
                        for k, o in self.options.items()},
            "unavailable": dict(self.unavailable),
        }


@dataclass(frozen=True)
class PassPlan:
    """A whole-graph plan a pass chose to fit a memory budget, beside its per-node rewrites.

    ``sfx.explain`` reports it (``ExplainReport.plans``, ``.memory_budget``); the rewrites the
    plan led to are the pass's :class:`Rewrite` entries as usual.

    Attributes:
        pass_name: the recipe name of the pass that made it.
        graph: qualified name of the graph it was made for ('' for the root).
        dense_bytes / budget_bytes / achieved_bytes: what backward holds with no rewrite, the
            budget, and what the applied plan holds (the memory plan's estimate).
        reachable: whether the plan meets the budget (within the pass's tolerance).
        estimated_seconds: the plan's estimated added time per training step.
        units: every unit of the graph and the option chosen for it, in graph order.
        details: the pass's own plain-data extras (how prices were made, its settings).
    """

    pass_name: str
    graph: str
    dense_bytes: int
    budget_bytes: int
    achieved_bytes: int
    reachable: bool
    estimated_seconds: float
    units: tuple[PlanUnit, ...] = ()
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def achieved_fraction(self) -> float:
        return self.achieved_bytes / self.dense_bytes if self.dense_bytes else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready with ``default=str``)."""
        return {
            "pass_name": self.pass_name, "graph": self.graph,
            "dense_bytes": self.dense_bytes, "budget_bytes": self.budget_bytes,
            "achieved_bytes": self.achieved_bytes, "achieved_fraction": self.achieved_fraction,
            "reachable": self.reachable, **self.details, "estimated_seconds": self.estimated_seconds,
            "units": {u.name: u.to_dict() for u in self.units},
        }


@dataclass
class PassResult:
    """What a pass returns: the module, whether it changed, and every rewrite, skip and plan.

    ``graph_module`` is the module the pass was given, or a new ``fx.GraphModule`` holding the
    rewritten graph: the manager then moves that graph (and the modules / tensors it reads)
    into the module it gave the pass, so the model, later passes and the result all see it.
    """

    graph_module: fx.GraphModule
    modified: bool
    rewrites: list[Rewrite] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    plans: list[PassPlan] = field(default_factory=list)


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
        module = op.module_name if isinstance(op, DenseOp) else str(node.meta.get(meta.MODULE, ""))
        kind = op.kind if isinstance(op, DenseOp) else str(getattr(node.target, "__name__", node.target))
        return Skip(self.pass_name, node.name, self.qualified(module), kind, reason)


# ---------------------------------------------------------------- rollback


@dataclass
class _Snapshot:
    graph: fx.Graph
    modules: dict[str, Any]
    parameters: dict[str, Any]
    buffers: dict[str, Any]
    ops_children: dict[str, Any]


def _snapshot(gm: fx.GraphModule) -> _Snapshot:
    graph = fx.Graph(owning_module=gm)
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    ops = getattr(gm, OPS_CONTAINER, None)
    return _Snapshot(graph, dict(gm._modules), dict(gm._parameters), dict(gm._buffers),
                     dict(ops._modules) if ops is not None else {})


def _restore(gm: fx.GraphModule, snap: _Snapshot) -> None:
    for slot, saved in (("_modules", snap.modules), ("_parameters", snap.parameters), ("_buffers", snap.buffers)):
        getattr(gm, slot).clear()
        getattr(gm, slot).update(saved)
    ops = getattr(gm, OPS_CONTAINER, None)
    if ops is not None:
        ops._modules.clear()
        ops._modules.update(snap.ops_children)
    gm.graph = snap.graph  # (the setter recompiles)


def _tensor_versions(gm: fx.GraphModule) -> dict[str, tuple[Any, int]]:
    """Each parameter / buffer and its in-place version counter (shared with the user's model)."""
    tensors = dict(gm.named_parameters())
    tensors.update(gm.named_buffers())
    return {name: (t, t._version) for name, t in tensors.items()}


def _mutated(versions: dict[str, tuple[Any, int]]) -> list[str]:
    return [name for name, (t, version) in versions.items() if t._version != version]


# ---------------------------------------------------------------- a returned GraphModule

_SLOTS = ("_parameters", "_buffers", "_modules")


def _attr_of(owner: Any, name: str) -> tuple[str | None, Any]:
    """Where ``owner`` keeps ``name`` (a module slot, ``"plain"``, None when absent), and its value."""
    for slot in _SLOTS:
        held = owner.__dict__.get(slot)
        if held is not None and name in held:
            return slot, held[name]
    if name in owner.__dict__:
        return "plain", owner.__dict__[name]
    return None, None


def _place(owner: Any, name: str, slot: str | None, value: Any) -> None:
    """Make ``owner.name`` be ``value``, kept in ``slot`` (None: absent)."""
    if _attr_of(owner, name)[0] is not None:
        delattr(owner, name)
    if slot == "_buffers":
        owner.register_buffer(name, value)
    elif slot is not None:
        setattr(owner, name, value)


def _adopt(gm: fx.GraphModule, new: fx.GraphModule, undo: list[Callable[[], None]]) -> None:
    """Move ``new``'s graph into ``gm``, with each module / tensor it reads that ``gm`` lacks.

    ``gm`` stays the object the model, a submodule capture and the record hold. ``undo``
    collects how to put back each attribute changed, for a rollback.
    """
    new.graph.lint()  # a broken graph fails before anything of gm changes
    for node in new.graph.nodes:
        if node.op not in ("get_attr", "call_module"):
            continue
        src, dst = new, gm
        *path, leaf = str(node.target).split(".")
        for atom in path:
            s, d = getattr(src, atom), getattr(dst, atom, None)
            if s is d or d is None:
                leaf = atom  # shared from here down, or gm lacks the whole subtree
                break
            src, dst = s, d
        slot, value = _attr_of(src, leaf)
        if slot is None:  # a property or class attribute of src: copy what it reads as
            slot, value = "plain", getattr(src, leaf)
        before = _attr_of(dst, leaf)
        if before[1] is value and before[0] is not None:
            continue
        _place(dst, leaf, slot, value)
        undo.append(lambda dst=dst, leaf=leaf, before=before: _place(dst, leaf, *before))
        if isinstance(value, nn.Module):
            value.train(gm.training)
    gm.graph = new.graph  # (the setter re-owns the graph and recompiles)


# ---------------------------------------------------------------- the manager


def run_pass(gm: fx.GraphModule, config: PassConfig, ctx: PassContext | None = None) -> PassResult:
    """Apply ``config``'s registered pass to ``gm`` in place; lint + recompile after it.

    A pass that raises leaves ``gm`` exactly as before the pass, and the error is re-raised
    as :class:`PassError` naming the pass, the graph (``ctx.prefix``) and the node it was
    working on (the exception's ``sfx_node`` attribute). A pass that modifies a parameter or
    buffer in place (they are the user's model's own tensors) is refused the same way: the
    message names the tensors, since their values cannot be rolled back. A new GraphModule
    in the result is moved into ``gm`` (see :class:`PassResult`), and the result's
    ``graph_module`` is ``gm``. Op modules a pass installs take the graph's train/eval mode.

    Example:
        >>> import torch, sparsify_fx as sfx
        >>> gm = sfx.capture(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(),
        ...                                      torch.nn.Linear(4, 2))).graph_module
        >>> result = sfx.run_pass(gm, sfx.DropIT(keep=0.5))
        >>> result.graph_module is gm, [r.module for r in result.rewrites]
        (True, ['0', '2'])
    """
    spec = lookup(config)
    ctx = replace(ctx or PassContext(), pass_name=spec.name)
    snap = _snapshot(gm)
    versions = _tensor_versions(gm)
    undo: list[Callable[[], None]] = []
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
        if result.graph_module is not gm:
            if not isinstance(result.graph_module, fx.GraphModule):
                raise TypeError(f"pass returned a PassResult whose graph_module is "
                                f"{type(result.graph_module).__name__}, expected a torch.fx.GraphModule")
            _adopt(gm, result.graph_module, undo)
            result.graph_module = gm
        gm.graph.lint()
        gm.recompile()
        ops = getattr(gm, OPS_CONTAINER, None)
        if ops is not None:
            # nn.Module() starts in training mode: a pass run on an eval() model must
            # not leave its op modules training (SliceOut would slice in eval)
            ops.train(gm.training)
    except Exception as e:
        for put_back in reversed(undo):
            put_back()
        _restore(gm, snap)
        raise _pass_error(e, spec.name, ctx, _mutated(versions)) from e
    return result


def _pass_error(e: Exception, pass_name: str, ctx: PassContext, changed: list[str]) -> PassError:
    node = getattr(e, "sfx_node", None)
    where = ""
    if isinstance(node, fx.Node):
        module = ctx.qualified(str(node.meta.get(meta.MODULE, "")))
        where = f" at node {node.format_node()}" + (f" (module {module!r})" if module else "")
    if changed:
        outcome = (f"The graph was restored, but {', '.join(ctx.qualified(n) for n in changed[:5])} "
                   "(shared with the original model) was modified in place and cannot be restored.")
    else:
        outcome = "The model was left unchanged."
    # an inner pass's PassError (a pass running passes) keeps naming its node
    name = node.name if isinstance(node, fx.Node) else getattr(e, "node", "") if isinstance(e, PassError) else ""
    return PassError(
        f"pass {pass_name!r} failed on graph {ctx.prefix.rstrip('.') or '(root)'}{where}: "
        f"{type(e).__name__}: {e}. {outcome}",
        pass_name=pass_name,
        node=name,
    )


def run_passes(
    graphs: dict[str, fx.GraphModule],
    configs: Sequence[PassConfig],
    first_last: tuple[str, ...] = (),
) -> list[PassResult]:
    """Apply each config's pass to every graph, in order, each through :func:`run_pass`.

    Returns one :class:`PassResult` per config, gathering its rewrites, skips and plans over
    the graphs.
    """
    results = []
    for config in configs:
        total = PassResult(graph_module=None, modified=False)  # type: ignore[arg-type]
        for prefix, gm in graphs.items():
            ctx = PassContext(prefix=prefix + "." if prefix else "", first_last=first_last)
            result = run_pass(gm, config, ctx)
            total.modified |= result.modified
            total.rewrites.extend(result.rewrites)
            total.skips.extend(result.skips)
            total.plans.extend(result.plans)
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
