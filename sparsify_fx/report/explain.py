"""``sfx.explain``: what a rewrite did, as an object for code and a rich report for people."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch.fx as fx
import torch.nn as nn

from sparsify_fx.analysis.held import FalseSaving, false_savings, plan_graphs
from sparsify_fx.analysis.memory_plan import MemoryPlan
from sparsify_fx.analysis.shapes import tensor_bytes
from sparsify_fx.graph import meta
from sparsify_fx.infra.describe import short_recipe
from sparsify_fx.infra.pass_base import PassPlan, Rewrite, Skip
from sparsify_fx.report.formatting import fmt_bytes as _fmt_bytes
from sparsify_fx.report.formatting import fmt_flops as _fmt_flops
from sparsify_fx.report.formatting import ratio as _ratio
from sparsify_fx.report.graph_diff import is_op_call as _is_op_call
from sparsify_fx.report.graph_diff import qualified as _qualified
from sparsify_fx.report.graph_diff import render_graph_diff as _graph_diff
from sparsify_fx.report.graph_diff import rewrite_index as _rewrite_index
from sparsify_fx.report.graph_diff import target_str as _target_str
from sparsify_fx.sparsify import SparsifyRecord, record_of

if TYPE_CHECKING:  # networkx is only needed by to_networkx
    import networkx

__all__ = ["ExplainReport", "PassSummary", "explain", "graph_diff"]


#: colour of each plan choice in the rich report (unknown choices print plain)
_CHOICE_COLOURS = {"keep": "white", "compress-exact": "cyan", "compress-light": "green", "compress-fused": "green4",
                   "compress-bf16": "bright_green", "compress": "yellow", "recompute": "magenta"}


@dataclass
class PassSummary:
    """Totals of one pass of the recipe.

    Attributes:
        name: the pass as a recipe string (``"dropit:keep=0.1,..."``).
        pass_name: its registry name (``"dropit"``), as in :attr:`Rewrite.pass_name`.
        rewritten / skipped: how many candidates it replaced / left alone.
        flops_before / flops_after: forward FLOPs of the layers it rewrote.
        saved_bytes_before / saved_bytes_after: bytes those layers save for backward (only
            rewrites with both estimates count, as in the report totals).
    """

    name: str
    pass_name: str
    rewritten: int = 0
    skipped: int = 0
    flops_before: int = 0
    flops_after: int = 0
    saved_bytes_before: int = 0
    saved_bytes_after: int = 0


@dataclass
class ExplainReport:
    """What :func:`sparsify_fx.sparsify` did to a module.

    Attributes:
        capture_method / capture_notes / capture_failures: how the model was captured.
        recipe: the passes applied, as recipe strings.
        rewrites: every node replaced (:class:`~sparsify_fx.Rewrite`).
        skipped: every candidate left alone, with its reason (:class:`~sparsify_fx.Skip`).
        plans: the whole-graph plans passes made (:class:`~sparsify_fx.PassPlan`, one per graph
            a budget pass planned).
        held_bytes_before / held_bytes_after: the headline: bytes the whole model's backward
            holds after the forward (dense plus compressed copies), from the memory plan of the
            captured graph and of the rewritten one (None without recorded shapes). Unlike the
            per-layer figures, these count every holder: a compressed copy of a tensor that
            another op keeps dense adds bytes.
        measured_bytes_before / measured_bytes_after: the same, measured over one training
            step (``sfx.bench.saved_tensor_bytes``), where a caller ran one (the demo, bench).
        dense_fallback_calls / dense_fallback_reason: Dynamo captures only: calls so far that
            ran the un-rewritten model because Dynamo gave up re-capturing it, and why.
        saved_bytes_before / saved_bytes_after: per-layer detail: estimated bytes the rewritten
            layers save for backward, dense vs rewritten (only layers with recorded shapes
            count; other holders of the same tensors are ignored).
        flops_before / flops_after: forward FLOPs of the rewritten layers.
        verification: summary line of the eval-mode check, if one ran.
        graph_modules: the rewritten graph(s) by qualified name ('' for the root); kept for
            :meth:`to_networkx`, :meth:`graph_diff` and the HTML report, never serialised.
    """

    capture_method: str
    capture_notes: list[str]
    capture_failures: dict[str, str]
    recipe: list[str]
    rewrites: list[Rewrite] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    passes: list[tuple[str, int, int]] = field(default_factory=list)
    verification: str | None = None
    plans: list[PassPlan] = field(default_factory=list)
    held_bytes_before: int | None = None
    held_bytes_after: int | None = None
    measured_bytes_before: int | None = None
    measured_bytes_after: int | None = None
    dense_fallback_calls: int = 0
    dense_fallback_reason: str | None = None
    graph_modules: dict[str, fx.GraphModule] = field(default_factory=dict, repr=False, compare=False)

    @property
    def saved_bytes_before(self) -> int:
        return sum(r.saved_bytes_before or 0 for r in self.rewrites if r.saved_bytes_after is not None)

    @property
    def saved_bytes_after(self) -> int:
        return sum(r.saved_bytes_after or 0 for r in self.rewrites if r.saved_bytes_after is not None)

    @property
    def flops_before(self) -> int:
        return sum(r.flops_before or 0 for r in self.rewrites)

    @property
    def flops_after(self) -> int:
        return sum(r.flops_after or 0 for r in self.rewrites)

    @property
    def headline(self) -> str:
        """The whole model's held bytes before -> after: estimated, and measured when known."""
        b0, b1 = self.held_bytes_before, self.held_bytes_after
        if b1 is None:
            text = "held for backward: not estimated (no recorded shapes: pass example_inputs)"
        elif b0 is None:
            text = f"held for backward after the forward: {_fmt_bytes(b1)} (memory plan; dense not estimated)"
        else:
            text = (f"held for backward after the forward: {_fmt_bytes(b0)} -> {_fmt_bytes(b1)}"
                    f"{_ratio(b0, b1)} (memory plan estimate)")
        m0, m1 = self.measured_bytes_before, self.measured_bytes_after
        if m0 is not None and m1 is not None:
            text += f"; measured {_fmt_bytes(m0)} -> {_fmt_bytes(m1)}{_ratio(m0, m1)}"
        return text

    def false_savings(self) -> list[FalseSaving]:
        """Tensors a rewrite stores compressed while another backward keeps them dense (their
        compressed copy adds bytes), largest first."""
        return false_savings(self.graph_modules, self.rewrites, self.memory_plans())

    def fix_hint(self) -> str:
        """What makes the compressions :meth:`false_savings` lists real."""
        recipe = "+".join(short_recipe(r) for r in self.recipe)
        if not any(r.partition(":")[0] == "actmem" for r in self.recipe):
            return f"add actmem (recipe {recipe + '+actmem'!r}), which compresses those holders too"
        return "compress what those holders keep too, or leave their consumers dense (exclude=[...])"

    @property
    def memory_budget(self) -> dict[str, Any] | None:
        """The first memory-budget plan (dense / budget / achieved bytes, per-unit choices) as
        plain data (:meth:`PassPlan.to_dict`), if a pass made one."""
        return self.plans[0].to_dict() if self.plans else None

    @property
    def pass_summaries(self) -> list[PassSummary]:
        """One :class:`PassSummary` per pass of the recipe, in recipe order."""
        summaries: dict[str, PassSummary] = {}
        start = 0
        # the record lists each pass's rewrites contiguously, in the order of ``passes``
        # (the Dynamo path repeats the passes once per captured graph), so counts slice it
        for name, n_rewritten, n_skipped in self.passes:
            chunk = self.rewrites[start:start + n_rewritten]
            start += n_rewritten
            pass_name = chunk[0].pass_name if chunk else name.partition(":")[0]
            s = summaries.setdefault(name, PassSummary(name, pass_name))
            s.rewritten += n_rewritten
            s.skipped += n_skipped
            for r in chunk:
                s.flops_before += r.flops_before or 0
                s.flops_after += r.flops_after or 0
                if r.saved_bytes_after is not None:
                    s.saved_bytes_before += r.saved_bytes_before or 0
                    s.saved_bytes_after += r.saved_bytes_after
        return list(summaries.values())

    @classmethod
    def from_record(cls, record: SparsifyRecord) -> ExplainReport:
        return cls(
            capture_method=record.capture_method,
            capture_notes=list(record.capture_notes),
            capture_failures=dict(record.capture_failures),
            recipe=list(record.recipe),
            rewrites=list(record.rewrites),
            skipped=list(record.skips),
            passes=list(record.passes),
            verification=record.verification.summary() if record.verification else None,
            plans=list(record.plans),
            held_bytes_before=record.held_bytes_before,
            held_bytes_after=record.held_bytes_after,
            dense_fallback_calls=record.dense_fallback_calls,
            dense_fallback_reason=record.dense_fallback_reason,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready with ``default=str``); the graph modules are left out."""
        # not asdict(self): it would deep-copy the GraphModules
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "graph_modules"}
        data["memory_plan"] = self._memory_plan_dict()
        data["headline"] = self.headline
        data["rewrites"] = [asdict(r) for r in self.rewrites]
        data["skipped"] = [asdict(s) for s in self.skipped]
        data["plans"] = [p.to_dict() for p in self.plans]
        data["capture_notes"] = list(self.capture_notes)
        data["capture_failures"] = dict(self.capture_failures)
        data["recipe"] = list(self.recipe)
        data["passes"] = [list(p) for p in self.passes]
        data["pass_summaries"] = [asdict(s) for s in self.pass_summaries]
        data["totals"] = {
            "saved_bytes_before": self.saved_bytes_before,
            "saved_bytes_after": self.saved_bytes_after,
            "flops_before": self.flops_before,
            "flops_after": self.flops_after,
        }
        return data

    def memory_plans(self) -> dict[str, MemoryPlan]:
        """Saved-tensor liveness of each graph with recorded shapes (see ``memory_plan``)."""
        return plan_graphs(self.graph_modules, self.rewrites)

    def _memory_plan_dict(self) -> dict[str, Any]:
        plans = self.memory_plans()
        dense = sorted((t for p in plans.values() for t in p.still_dense()), key=lambda t: -(t.bytes or 0))
        return {
            "held_bytes": sum(p.held_bytes for p in plans.values()),
            "compressed_bytes": sum(p.compressed_bytes for p in plans.values()),
            "still_dense": [{"node": t.node, "module": t.module, "bytes": t.bytes, "reason": t.reason}
                            for t in dense[:50]],
            "compressed_but_kept_dense": [
                {"node": f.tensor, "module": f.module, "bytes": f.bytes, "reason": f.reason,
                 "compressed_by": list(f.compressed_by)}
                for f in false_savings(self.graph_modules, self.rewrites, plans)[:50]],
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), default=str, **kwargs)

    # ------------------------------------------------------------ graphs

    def rewrite_of(self, prefix: str, node: fx.Node) -> Rewrite | None:
        """The :class:`Rewrite` that created ``node`` (an op-module call) in graph ``prefix``."""
        return _rewrite_index(self).get((prefix, str(node.target))) if _is_op_call(node) else None

    def to_networkx(self) -> networkx.DiGraph:
        """The rewritten graph(s) as one ``networkx.DiGraph``; edges follow data flow.

        Node ids are fx node names (``"graph:node"`` when the model was captured as several
        graphs). Attributes: ``op``, ``target``, ``module`` (qualified), ``graph``, ``pass``
        (registry name of the pass that installed an op module, else None), ``rewrite`` (the
        replaced op, e.g. ``"conv2d"``), ``origin`` (the replaced node), ``shape`` (tuple or
        None), ``dtype``, ``bytes`` (output bytes or None).

        Example:
            >>> import torch, sparsify_fx as sfx
            >>> m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
            >>> g = sfx.explain(sfx.sparsify(m, "actmem", example_inputs=(torch.randn(2, 4),))).to_networkx()
            >>> [n for n, d in g.nodes(data=True) if d["pass"]]
            ['sfx_ops_actmem_relu_1']
        """
        import networkx as nx

        graph = nx.DiGraph()
        several = len(self.graph_modules) > 1 or any(self.graph_modules)
        for prefix, gm in self.graph_modules.items():
            def node_id(n: fx.Node, prefix: str = prefix) -> str:
                return f"{prefix}:{n.name}" if several else n.name

            for n in gm.graph.nodes:
                rewrite = self.rewrite_of(prefix, n)
                shape_dtype = n.meta.get(meta.SHAPE)
                graph.add_node(
                    node_id(n),
                    name=n.name,
                    op=n.op,
                    target=_target_str(n),
                    module=_qualified(prefix, str(n.meta.get(meta.MODULE, ""))),
                    graph=prefix,
                    **{"pass": rewrite.pass_name if rewrite else None},
                    rewrite=rewrite.op if rewrite else None,
                    origin=n.meta.get(meta.ORIGIN),
                    shape=tuple(shape_dtype[0]) if shape_dtype else None,
                    dtype=str(shape_dtype[1]).replace("torch.", "") if shape_dtype else None,
                    bytes=tensor_bytes(n),
                )
                for inp in n.all_input_nodes:
                    graph.add_edge(node_id(inp), node_id(n))
        return graph

    def graph_diff(self, width: int = 80) -> str:
        """What each pass replaced, grouped by module, as plain text at most ``width`` wide.

        ``-`` is the original node, ``+`` the op-module call that replaced it (with its
        inputs, when it is still in the graph), ``~`` a candidate a pass left alone and why.
        """
        return _graph_diff(self, width)

    # ------------------------------------------------------------ rendering (rich)

    def __rich_console__(self, console: Any, options: Any) -> Any:
        from rich.table import Table
        from rich.text import Text

        yield Text(f"sparsify_fx report  (captured by {self.capture_method})", style="bold")
        yield Text(f"recipe: {' + '.join(short_recipe(r) for r in self.recipe)}")
        grew = (self.held_bytes_before is not None and self.held_bytes_after is not None
                and self.held_bytes_after >= 0.95 * self.held_bytes_before and self.rewrites)
        yield Text(self.headline, style="bold red" if grew else "bold")
        doubled = self.false_savings()
        if doubled:
            f = doubled[0]
            yield Text(
                f"{len(doubled)} compressed tensor(s) are still kept dense by another backward (e.g. "
                f"{f.tensor}: {f.reason}), so their compressed copies add bytes. Fix: {self.fix_hint()}",
                style="red")
        summary = Table(title="passes", show_lines=False)
        summary.add_column("pass", overflow="fold")
        for col in ("rewritten", "skipped", "FLOPs before -> after", "saved before -> after"):
            summary.add_column(col, justify="right")
        for s in self.pass_summaries:
            summary.add_row(short_recipe(s.name), str(s.rewritten), str(s.skipped),
                            f"{_fmt_flops(s.flops_before)} -> {_fmt_flops(s.flops_after)}"
                            if s.flops_before or s.flops_after else "-",
                            f"{_fmt_bytes(s.saved_bytes_before)} -> {_fmt_bytes(s.saved_bytes_after)}")
        yield summary
        b0, b1 = self.saved_bytes_before, self.saved_bytes_after
        ratio = f" ({b1 / b0:.3f}x)" if b0 else ""
        yield Text(
            f"per layer: saved-for-backward inputs of the rewritten layers alone (other holders not "
            f"counted): {_fmt_bytes(b0)} -> {_fmt_bytes(b1)}{ratio}; "
            f"forward FLOPs {_fmt_flops(self.flops_before)} -> {_fmt_flops(self.flops_after)}"
        )
        if self.verification:
            yield Text(f"verification: {self.verification}", style="green" if self.verification.startswith("ok") else "red")
        table = Table(title="rewritten layers")
        for col in ("module", "op", "pass", "saved before", "saved after", "FLOPs"):
            table.add_column(col, overflow="fold")
        for r in self.rewrites:
            table.add_row(r.module, r.op, r.pass_name, _fmt_bytes(r.saved_bytes_before),
                          _fmt_bytes(r.saved_bytes_after), _fmt_flops(r.flops_before))
        yield table
        if self.skipped:
            skipped = Table(title="skipped")
            for col in ("module", "op", "pass", "reason"):
                skipped.add_column(col, overflow="fold")
            for s in self.skipped:
                skipped.add_row(s.module or s.node, s.op, s.pass_name, s.reason)
            yield skipped
        for budget in self.plans:
            yield Text(
                f"memory budget: {_fmt_bytes(budget.budget_bytes)} of {_fmt_bytes(budget.dense_bytes)} "
                f"dense; plan holds {_fmt_bytes(budget.achieved_bytes)} "
                f"({budget.achieved_fraction:.3f}x), est. {budget.estimated_seconds * 1e3:+.1f} ms per step"
                + ("" if budget.reachable else "  (budget NOT reachable)"),
                style=None if budget.reachable else "red",
            )
            units = Table(title="memory budget plan (per block)" + (f" of {budget.graph}" if budget.graph else ""))
            for col in ("block", "choice", "bytes", "est. time", "other options"):
                units.add_column(col, overflow="fold")
            for u in budget.units:
                other = "; ".join(f"{k} {_fmt_bytes(o.bytes)} {o.estimated_seconds * 1e3:+.1f} ms"
                                  for k, o in u.options.items() if k != u.choice)
                units.add_row(u.name, Text(u.choice, style=_CHOICE_COLOURS.get(u.choice)), _fmt_bytes(u.bytes),
                              f"{u.estimated_seconds * 1e3:+.1f} ms", other)
            yield units
        plan = self._memory_plan_dict()
        if plan["held_bytes"] or plan["compressed_bytes"]:
            yield Text(
                f"memory plan (estimate): backward holds {_fmt_bytes(plan['held_bytes'])} dense + "
                f"{_fmt_bytes(plan['compressed_bytes'])} compressed after the forward"
            )
            dense = Table(title="largest tensors still held dense, and why")
            for col in ("tensor", "module", "bytes", "why"):
                dense.add_column(col, overflow="fold")
            for t in plan["still_dense"][:8]:
                dense.add_row(t["node"], t["module"], _fmt_bytes(t["bytes"]), t["reason"])
            yield dense
        if self.dense_fallback_calls:
            yield Text(f"warning: {self.dense_fallback_calls} call(s) ran the un-rewritten model "
                       f"(dense): {self.dense_fallback_reason}", style="bold red")
        for note in self.capture_notes:
            yield Text(f"note: {note}", style="dim")
        for method, why in self.capture_failures.items():
            yield Text(f"capture method {method} failed: {why}", style="dim")

    def render(self, width: int = 120) -> str:
        """The rich report as plain text."""
        from rich.console import Console

        console = Console(width=width, record=True, file=_Null(), color_system=None)
        console.print(self)
        return console.export_text()

    def __str__(self) -> str:
        return self.render()


def _graph_modules_of(module: nn.Module, record: SparsifyRecord | None) -> dict[str, fx.GraphModule]:
    """The rewritten graph(s) of ``module``: itself, or its traced children."""
    if isinstance(module, fx.GraphModule):
        return {"": module}
    found: dict[str, fx.GraphModule] = {}
    if record is not None and record.graphs:
        for name in record.graphs:
            try:
                sub = module.get_submodule(name) if name else module
            except AttributeError:
                continue
            if isinstance(sub, fx.GraphModule):
                found[name] = sub
        if found:
            return found
    for name, sub in module.named_modules():
        # the outermost GraphModules only: a traced graph's own children are not separate graphs
        if isinstance(sub, fx.GraphModule) and not any(name.startswith(f + ".") for f in found):
            found[name] = sub
    return found


class _Null:
    def write(self, _: str) -> int:
        return 0

    def flush(self) -> None:
        pass


def explain(module: nn.Module) -> ExplainReport:
    """Report what :func:`sparsify_fx.sparsify` rewrote in ``module`` and what it skipped.

    Print it (``print(report)`` or ``rich.print(report)``) for tables; use ``.rewrites``,
    ``.skipped`` and ``.to_dict()`` from code. A module not made by ``sparsify`` is captured
    and reported with no rewrites, so the report still shows how it would be captured.

    Example:
        >>> import torch, sparsify_fx as sfx
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4),
        ...                         torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> report = sfx.explain(sfx.sparsify(m, "dropit:keep=0.5"))
        >>> len(report.rewrites), len(report.skipped)
        (1, 2)
    """
    record = record_of(module)
    graph_source = module
    if record is None:
        from sparsify_fx.frontend.cascade import capture

        cap = capture(module)
        record = SparsifyRecord(cap.method, cap.notes, cap.failures, [], graphs=list(cap.graphs))
        graph_source = cap.graph_module
    report = ExplainReport.from_record(record)
    report.graph_modules = _graph_modules_of(graph_source, record)
    if report.held_bytes_after is None:
        # graphs rewritten lazily (Dynamo) or a module sparsify did not make: plan what is there
        plans = report.memory_plans()
        if plans:
            report.held_bytes_after = sum(p.total_bytes for p in plans.values())
            if not report.rewrites:
                report.held_bytes_before = report.held_bytes_after
    return report


def graph_diff(module: nn.Module, width: int = 80) -> str:
    """What :func:`sparsify_fx.sparsify` replaced in ``module``, by module, as plain text.

    Lines fit ``width`` columns (80 by default). See :meth:`ExplainReport.graph_diff`.

    Example:
        >>> import torch, sparsify_fx as sfx
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> print(sfx.graph_diff(sfx.sparsify(m, "actmem", example_inputs=(torch.randn(2, 4),))))
        graph diff: 1 node(s) replaced, 0 candidate(s) kept, 1 module(s)
        - original node   + replacement (op module)   ~ kept, with the reason
        <BLANKLINE>
        1
          - %relu: relu  [actmem]
          + %sfx_ops_actmem_relu_1 = sfx_ops.actmem_relu_1(%linear)
              saved 32 B -> 1 B
        <BLANKLINE>
    """
    return explain(module).graph_diff(width)
