"""One self-contained HTML file showing what a rewrite did: tables, graph picture, memory bars.

Everything is inline (CSS, a few lines of JS, SVG): the file makes no network request and
opens from disk or an e-mail attachment. The graph layout is computed here (a layered,
longest-path layout) so no graphviz binary is needed.
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch.nn as nn

from sparsify_fx.infra.describe import short_recipe
from sparsify_fx.report.explain import ExplainReport, PassSummary, explain
from sparsify_fx.report.formatting import fmt_bytes as _fmt_bytes
from sparsify_fx.report.formatting import fmt_flops as _fmt_flops
from sparsify_fx.report.graph_diff import module_order as _module_order

__all__ = ["render_html", "write_html", "layered_layout", "PASS_COLOURS"]

#: fill colours given to passes in recipe order (colour-blind-friendly Okabe-Ito hues)
PASS_COLOURS = ("#56b4e9", "#e69f00", "#009e73", "#cc79a7", "#0072b2", "#d55e00", "#f0e442")
_DENSE_KEPT = "#d9d9d9"
_PLAIN = "#ffffff"

_NODE_W, _NODE_H, _GAP_X, _GAP_Y, _MARGIN = 176, 26, 14, 20, 10
_GROUP_W, _GROUP_H = 240, 34


def layered_layout(nodes: list[Any], edges: Iterable[tuple[Any, Any]]) -> dict[Any, tuple[int, int]]:
    """``node -> (layer, index in layer)`` for a top-to-bottom drawing.

    ``nodes`` must be in a topological-ish order (fx graph order is). Edges that go back in
    that order (the module-level summary graph can have cycles: root -> layer -> root) are
    ignored for layering. Layer = longest path from a source; within a layer nodes are
    sorted by the mean position of their predecessors (one barycenter sweep), which removes
    most crossings on the chain-with-skips shapes of real networks.

    Example:
        >>> layered_layout(["x", "a", "b", "y"], [("x", "a"), ("x", "b"), ("a", "y"), ("b", "y")])
        {'x': (0, 0), 'a': (1, 0), 'b': (1, 1), 'y': (2, 0)}
    """
    rank = {n: i for i, n in enumerate(nodes)}
    preds: dict[Any, list[Any]] = {n: [] for n in nodes}
    for a, b in edges:
        if a in rank and b in rank and rank[a] < rank[b]:
            preds[b].append(a)
    layer: dict[Any, int] = {}
    for n in nodes:
        layer[n] = max((layer[p] + 1 for p in preds[n]), default=0)
    rows: dict[int, list[Any]] = {}
    for n in nodes:
        rows.setdefault(layer[n], []).append(n)
    pos: dict[Any, tuple[int, int]] = {}
    for depth in sorted(rows):
        row = rows[depth]
        if depth:
            def bary(n: Any) -> float:
                xs = [pos[p][1] for p in preds[n]]
                return sum(xs) / len(xs) if xs else 0.0

            row.sort(key=lambda n: (bary(n), rank[n]))
        for i, n in enumerate(row):
            pos[n] = (depth, i)
    return pos


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "\u2026"


def _group_of(module: str, op: str) -> str:
    if op == "placeholder":
        return "(inputs)"
    if op == "output":
        return "(outputs)"
    return module.split(".")[0] if module else "(root)"


class _Palette:
    def __init__(self, summaries: list[PassSummary]) -> None:
        self.colours: dict[str, str] = {}
        for s in summaries:
            self.colours.setdefault(s.pass_name, PASS_COLOURS[len(self.colours) % len(PASS_COLOURS)])

    def of(self, pass_name: str | None) -> str:
        if not pass_name:
            return _PLAIN
        return self.colours.setdefault(pass_name, PASS_COLOURS[len(self.colours) % len(PASS_COLOURS)])


def _edge_path(x1: float, y1: float, x2: float, y2: float) -> str:
    mid = (y1 + y2) / 2
    return f'<path d="M{x1:.0f},{y1:.0f} C{x1:.0f},{mid:.0f} {x2:.0f},{mid:.0f} {x2:.0f},{y2:.0f}"/>'


def _svg_graph(ids: list[str], edges: list[tuple[str, str]], box_w: int, box_h: int,
               draw_box: Any, css_class: str) -> str:
    pos = layered_layout(ids, edges)
    n_layers = max((d for d, _ in pos.values()), default=0) + 1
    widest = max((i for _, i in pos.values()), default=0) + 1
    width = 2 * _MARGIN + widest * (box_w + _GAP_X)
    height = 2 * _MARGIN + n_layers * (box_h + _GAP_Y)

    def xy(n: str) -> tuple[int, int]:
        d, i = pos[n]
        return _MARGIN + i * (box_w + _GAP_X), _MARGIN + d * (box_h + _GAP_Y)

    parts = [f'<svg class="{css_class}" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}">', '<g class="edges">']
    for a, b in edges:
        if a in pos and b in pos:
            (xa, ya), (xb, yb) = xy(a), xy(b)
            parts.append(_edge_path(xa + box_w / 2, ya + box_h, xb + box_w / 2, yb))
    parts.append("</g>")
    for n in ids:
        parts.append(draw_box(n, *xy(n)))
    parts.append("</svg>")
    return "".join(parts)


def _graph_section(report: ExplainReport, palette: _Palette) -> str:
    if not report.graph_modules:
        return ("<p>No graph to draw: the model was captured by "
                f"{_e(report.capture_method)}, whose graphs are rewritten lazily at run time.</p>")
    g = report.to_networkx()
    # parameters (get_attr) are hidden: they would put dozens of boxes in the first row
    shown = [n for n, d in g.nodes(data=True) if d["op"] != "get_attr"]
    attrs = dict(g.nodes(data=True))
    group = {n: _group_of(attrs[n]["module"], attrs[n]["op"]) for n in shown}
    groups: dict[str, list[str]] = {}
    for n in shown:
        groups.setdefault(group[n], []).append(n)

    group_edges = sorted({(group[a], group[b]) for a, b in g.edges
                          if a in group and b in group and group[a] != group[b]},
                         key=lambda e: (list(groups).index(e[0]), list(groups).index(e[1])))

    def group_stats(name: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in groups[name]:
            if attrs[n]["pass"]:
                counts[attrs[n]["pass"]] = counts.get(attrs[n]["pass"], 0) + 1
        return counts

    def draw_group(name: str, x: int, y: int) -> str:
        counts = group_stats(name)
        total = sum(counts.values())
        label = f"{name}  \u00b7 {len(groups[name])} nodes" + (f", {total} rewritten" if total else "")
        bar, bx = [], x + 1
        for pass_name, c in counts.items():
            w = (_GROUP_W - 2) * c / max(total, 1)
            bar.append(f'<rect x="{bx:.1f}" y="{y + _GROUP_H - 8}" width="{w:.1f}" height="7" '
                       f'fill="{palette.of(pass_name)}"/>')
            bx += w
        title = ", ".join(f"{p}: {c}" for p, c in counts.items()) or "nothing rewritten"
        return (f'<g class="group" data-group="{_e(name)}" tabindex="0"><title>{_e(name)}: {_e(title)} '
                f'(click to expand)</title><rect x="{x}" y="{y}" width="{_GROUP_W}" height="{_GROUP_H}" '
                f'rx="5" fill="{"#f4f8fb" if total else "#fff"}" stroke="#555"/>{"".join(bar)}'
                f'<text x="{x + 8}" y="{y + 16}">{_e(_short(label, 36))}</text></g>')

    overview = _svg_graph(list(groups), group_edges, _GROUP_W, _GROUP_H, draw_group, "overview")

    def draw_node(n: str, x: int, y: int) -> str:
        d = attrs[n]
        pass_name = d["pass"]
        dense_kept = d["op"] == "call_function" and d["target"] in ("linear", "conv1d", "conv2d",
                                                                   "conv3d", "matmul", "addmm")
        fill = palette.of(pass_name) if pass_name else (_DENSE_KEPT if dense_kept else _PLAIN)
        label = f"{d['rewrite']} \u2192 {pass_name}" if pass_name else (
            d["name"] if d["op"] in ("placeholder", "output") else d["target"].rpartition(".")[2])
        shape = "\u00d7".join(map(str, d["shape"])) if d["shape"] else "?"
        tip = (f"{d['name']}\nop: {d['op']}\ntarget: {d['target']}\nmodule: {d['module'] or '(root)'}\n"
               f"shape: {shape} {d['dtype'] or ''}\nbytes: {_fmt_bytes(d['bytes'])}")
        if pass_name:
            tip += f"\npass: {pass_name} (replaced %{d['origin']}: {d['rewrite']})"
        cls = "node op-node rewritten" if pass_name else "node op-node"
        dash = ' stroke-dasharray="3 2"' if dense_kept else ""
        return (f'<g class="{cls}" data-node="{_e(n)}" data-module="{_e(d["module"])}" '
                f'data-pass="{_e(pass_name or "")}"><title>{_e(tip)}</title>'
                f'<rect x="{x}" y="{y}" width="{_NODE_W}" height="{_NODE_H}" rx="4" fill="{fill}" '
                f'stroke="{"#222" if pass_name else "#888"}"{dash}/>'
                f'<text x="{x + 6}" y="{y + 17}">{_e(_short(label, 24))}</text></g>')

    details = []
    node_set = set(shown)
    for name, members in groups.items():
        member_set = set(members)
        inner = [(a, b) for a, b in g.edges if a in member_set and b in member_set and a in node_set]
        counts = group_stats(name)
        summary = f"{len(members)} nodes" + (
            ", " + ", ".join(f"{c} by {p}" for p, c in counts.items()) if counts else "")
        details.append(
            f'<details class="group-detail" id="group-{_e(name)}"><summary><b>{_e(name)}</b> '
            f'<span class="dim">{_e(summary)}</span></summary><div class="scroll">'
            f'{_svg_graph(members, inner, _NODE_W, _NODE_H, draw_node, "module-graph")}</div></details>')
    legend = "".join(
        f'<span class="swatch" style="background:{c}"></span>{_e(p)} ' for p, c in palette.colours.items())
    legend += (f'<span class="swatch" style="background:{_DENSE_KEPT};border-style:dashed"></span>'
               'dense op kept <span class="swatch"></span>other')
    return (f'<p class="legend">{legend}</p><div class="scroll">{overview}</div>'
            '<p class="dim">One box per top-level module (click one to open it below). '
            'Parameter reads (get_attr) are hidden; hover a node for its details.</p>'
            '<p><button type="button" id="expand-all">expand all</button> '
            '<button type="button" id="collapse-all">collapse all</button></p>'
            + "".join(details))


def _memory_bars(report: ExplainReport, palette: _Palette) -> str:
    rows = [r for r in report.rewrites if r.saved_bytes_before is not None and r.saved_bytes_after is not None]
    order = {m: i for i, m in enumerate(_module_order(report))}
    rows.sort(key=lambda r: order.get(r.module, len(order)))  # stable: graph order, then pass order
    if not rows:
        return "<p>No saved-activation estimates (run sparsify with example_inputs).</p>"
    label_w, bar_w, row_h = 200, 200, 26
    top = max(max(r.saved_bytes_before or 0, r.saved_bytes_after or 0) for r in rows) or 1
    height = row_h * len(rows) + 8
    parts = [f'<svg class="membars" width="{label_w + bar_w + 150}" '
             f'height="{height}">']
    for i, r in enumerate(rows):
        y = 4 + i * row_h
        before = bar_w * (r.saved_bytes_before or 0) / top
        after = bar_w * (r.saved_bytes_after or 0) / top
        label = _short(f"{r.module or '(root)'} \u00b7 {r.op}", 36)
        parts.append(
            f'<g class="membar" data-module="{_e(r.module)}" data-pass="{_e(r.pass_name)}">'
            f'<title>{_e(r.module)} {_e(r.op)} [{_e(r.pass_name)}]: {_fmt_bytes(r.saved_bytes_before)} '
            f'-&gt; {_fmt_bytes(r.saved_bytes_after)}</title>'
            f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end">'
            f'{_e(label)}</text>'
            f'<rect x="{label_w}" y="{y}" width="{before:.1f}" height="10" fill="#bbb"/>'
            f'<rect x="{label_w}" y="{y + 11}" width="{after:.1f}" height="10" '
            f'fill="{palette.of(r.pass_name)}"/>'
            f'<text x="{label_w + max(before, after) + 6:.1f}" y="{y + 15}" class="dim">'
            f'{_fmt_bytes(r.saved_bytes_before)} \u2192 {_fmt_bytes(r.saved_bytes_after)}</text></g>')
    parts.append("</svg>")
    return ('<p class="legend"><span class="swatch" style="background:#bbb"></span>before '
            '<span class="swatch" style="background:#56b4e9"></span>after (colour of the pass)</p>'
            + '<div class="scroll">' + "".join(parts) + "</div>")


class _Raw(str):
    """A table cell that is already HTML."""


def _table(head: list[str], rows: Iterable[list[Any]], css: str = "") -> str:
    out = [f'<table class="{css}"><thead><tr>'] + [f"<th>{_e(h)}</th>" for h in head] + ["</tr></thead><tbody>"]
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{c if isinstance(c, _Raw) else _e(c)}</td>" for c in row) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:18px 24px;color:#222}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:22px 0 6px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:4px 0 8px} th,td{padding:2px 10px;border-bottom:1px solid #eee;
text-align:left;vertical-align:top} th{background:#f3f3f3} td:nth-child(n+2){font-variant-numeric:tabular-nums}
.dim{color:#777} .ok{color:#0a7a2f} .bad{color:#b00020} .totals{font-size:15px}
.cols{display:flex;flex-wrap:wrap;gap:28px;align-items:flex-start} .cols>div{min-width:0;flex:1 1 480px}
.scroll{overflow:auto;max-width:100%} .small{font-size:12px} td.num,th.num{white-space:nowrap}
table.passes td:nth-child(n+2){white-space:nowrap} table.passes td:first-child{max-width:520px}
svg text{font:12px system-ui,sans-serif;fill:#222} svg .edges path{fill:none;stroke:#999;stroke-width:1.2}
.group{cursor:pointer} .group:hover rect:first-of-type{stroke-width:2.5}
.swatch{display:inline-block;width:12px;height:12px;border:1px solid #555;margin:0 4px -2px 10px}
details.group-detail{margin:3px 0;border:1px solid #e3e3e3;border-radius:4px;padding:2px 8px}
details.group-detail summary{cursor:pointer} button{font:inherit}
"""

_JS = """
document.querySelectorAll('.group').forEach(function (g) {
  g.addEventListener('click', function () {
    var d = document.getElementById('group-' + g.getAttribute('data-group'));
    if (d) { d.open = true; d.scrollIntoView({block: 'start'}); }
  });
});
function setAll(open) { document.querySelectorAll('details.group-detail').forEach(function (d) { d.open = open; }); }
document.getElementById('expand-all') && document.getElementById('expand-all').addEventListener('click', function () { setAll(true); });
document.getElementById('collapse-all') && document.getElementById('collapse-all').addEventListener('click', function () { setAll(false); });
"""


def _pass_cell(s: PassSummary, palette: _Palette) -> _Raw:
    # only the fields that differ from their defaults; commas get spaces so the cell can wrap
    _, _, params = short_recipe(s.name).partition(":")
    return _Raw(f'<span class="swatch" style="background:{palette.of(s.pass_name)}"></span>'
                f'<b>{_e(s.pass_name)}</b> <span class="dim small">{_e(params.replace(",", ", "))}</span>')


def _flops_change(before: int, after: int) -> str:
    # passes that only change what is saved (activation compression) have no FLOP estimate
    return "\u2013" if not before and not after else f"{_fmt_flops(before)} \u2192 {_fmt_flops(after)}"


#: background of each MemoryBudget choice (the same order of "cost" as the terminal table)
_BUDGET_COLOURS = {"keep": "#ffffff", "compress-exact": "#d8f1f5", "compress-light": "#dcf5dc", "compress-fused": "#d0f0d0", "compress-bf16": "#c4ecc4", "compress": "#fff3c4", "recompute": "#f3dcf5"}


def _budget_section(report: ExplainReport) -> list[str]:
    plan = report.memory_budget
    if plan is None:
        return []
    state = "" if plan["reachable"] else ' <b class="bad">(budget not reachable)</b>'
    head = (f'<p>budget {_fmt_bytes(plan["budget_bytes"])} of {_fmt_bytes(plan["dense_bytes"])} dense; the plan '
            f'holds <b>{_fmt_bytes(plan["achieved_bytes"])}</b> ({plan["achieved_fraction"]:.3f}\u00d7), estimated '
            f'{plan["estimated_seconds"] * 1e3:+.1f} ms per step{state}</p>')
    rows = []
    for unit, d in plan["units"].items():
        colour = _BUDGET_COLOURS.get(d["choice"], "#ffffff")
        options = "; ".join(f"{c}: {_fmt_bytes(o['bytes'])}, {o.get('estimated_seconds', o['seconds']) * 1e3:+.1f} ms"
                            for c, o in d["options"].items() if c != d["choice"])
        options += "".join(f"; {c}: {why}" for c, why in d.get("unavailable", {}).items())
        rows.append([unit, _Raw(f'<span style="background:{colour};padding:0 6px;border:1px solid #ccc">'
                                f'{_e(d["choice"])}</span>'),
                     _fmt_bytes(d["bytes"]), f'{d["estimated_seconds"] * 1e3:+.1f} ms', options])
    return ["<h2>Memory budget plan (per block)</h2>", head,
            _table(["block", "choice", "bytes held", "est. time", "other options"], rows, "budget")]


def _memory_plan_section(report: ExplainReport) -> list[str]:
    """The memory plan: what the backward holds after the forward, dense and compressed, the
    largest tensors still held dense and why, and compressed tensors still kept dense."""
    plans = report.memory_plans()
    if not plans:
        return ["<h2>Memory plan</h2>", "<p>No memory plan: no recorded shapes (run sparsify with "
                "example_inputs).</p>"]
    dense = sum(p.held_bytes for p in plans.values())
    compressed = sum(p.compressed_bytes for p in plans.values())
    still = sorted(((prefix, t) for prefix, p in plans.items() for t in p.still_dense()),
                   key=lambda pt: -(pt[1].bytes or 0))
    rows = [[_qualified_node(prefix, t.node), t.module or "(root)", _fmt_bytes(t.bytes), t.reason]
            for prefix, t in still[:25]]
    out = ["<h2>Memory plan</h2>",
           f'<p>after the forward the backward holds <b>{_fmt_bytes(dense)}</b> dense + '
           f'<b>{_fmt_bytes(compressed)}</b> compressed ({len(still)} tensor(s) held dense)</p>']
    doubled = report.false_savings()
    if doubled:
        out += [f'<p class="bad">{len(doubled)} compressed tensor(s) are still kept dense by another '
                f"backward: their compressed copies add bytes. Fix: {_e(report.fix_hint())}</p>",
                _table(["tensor", "module", "bytes", "why still dense", "compressed by"],
                       [[_qualified_node(f.graph, f.tensor), f.module or "(root)", _fmt_bytes(f.bytes), f.reason,
                         ", ".join(f.compressed_by)] for f in doubled[:25]], "doubled")]
    out += ["<h3>Largest tensors still held dense, and why</h3>",
            _table(["tensor", "module", "bytes", "why"], rows, "still-dense")]
    return out


def _qualified_node(prefix: str, node: str) -> str:
    return f"{prefix}:{node}" if prefix else node


def render_html(source: nn.Module | ExplainReport, title: str | None = None) -> str:
    """The HTML report of a module made by :func:`sparsify_fx.sparsify` (or of its report).

    Returns:
        One self-contained HTML document: summary, per-pass and per-layer tables, an SVG
        picture of the rewritten graph (nodes coloured by pass, one collapsible block per
        top-level module) and per-layer saved-activation bars (before vs after).
    """
    report = source if isinstance(source, ExplainReport) else explain(source)
    summaries = report.pass_summaries
    palette = _Palette(summaries)
    b0, b1 = report.saved_bytes_before, report.saved_bytes_after
    ratio = f" ({b1 / b0:.3f}\u00d7)" if b0 else ""
    title = title or "sparsify_fx report"
    verification = ""
    if report.verification:
        cls = "ok" if report.verification.startswith("ok") else "bad"
        verification = f'<p class="{cls}">verification: {_e(report.verification)}</p>'
    pass_rows = [[_pass_cell(s, palette), s.rewritten, s.skipped, _flops_change(s.flops_before, s.flops_after),
                  f"{_fmt_bytes(s.saved_bytes_before)} \u2192 {_fmt_bytes(s.saved_bytes_after)}"] for s in summaries]
    layer_rows = [[r.module or "(root)", r.op, r.pass_name, r.replacement, _fmt_bytes(r.saved_bytes_before),
                   _fmt_bytes(r.saved_bytes_after), _fmt_flops(r.flops_before), _fmt_flops(r.flops_after)]
                  for r in report.rewrites]
    skip_rows = [[s.module or s.node, s.op, s.pass_name, s.reason] for s in report.skipped]
    notes = "".join(f"<li>{_e(n)}</li>" for n in report.capture_notes)
    notes += "".join(f"<li>capture method {_e(m)} failed: {_e(w)}</li>" for m, w in report.capture_failures.items())
    body = [
        f"<h1>{_e(title)}</h1>",
        f'<p class="dim">captured by {_e(report.capture_method)} \u00b7 recipe: '
        f'{_e(" + ".join(short_recipe(r) for r in report.recipe) or "(none)")}</p>',
        f'<p class="totals headline"><b>{_e(report.headline.replace("->", chr(0x2192)))}</b></p>',
        f'<p class="dim"><b>{len(report.rewrites)}</b> nodes rewritten, <b>{len(report.skipped)}</b> '
        f"candidates kept \u00b7 per layer, saved for backward by the rewritten layers alone (other "
        f"holders not counted): {_fmt_bytes(b0)} \u2192 "
        f"{_fmt_bytes(b1)}{ratio} \u00b7 forward FLOPs {_fmt_flops(report.flops_before)} \u2192 "
        f"{_fmt_flops(report.flops_after)}</p>",
        verification,
        "<h2>Passes</h2>",
        _table(["pass", "rewritten", "skipped", "FLOPs before \u2192 after", "saved before \u2192 after"],
               pass_rows, "passes"),
        *_memory_plan_section(report),
        *_budget_section(report),
        '<div class="cols"><div><h2>Graph</h2>', _graph_section(report, palette), "</div>",
        "<div><h2>Saved activations per layer</h2>", _memory_bars(report, palette), "</div></div>",
        "<h2>Rewritten layers</h2>",
        _table(["module", "op", "pass", "replacement", "saved before", "saved after", "FLOPs before",
                "FLOPs after"], layer_rows, "layers"),
    ]
    if skip_rows:
        body += ["<h2>Kept (skipped) candidates</h2>", _table(["module", "op", "pass", "reason"], skip_rows, "skipped")]
    if notes:
        body += ["<h2>Capture notes</h2>", f"<ul>{notes}</ul>"]
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{_CSS}</style></head><body>{''.join(body)}<script>{_JS}</script></body></html>\n")


def write_html(source: nn.Module | ExplainReport, path: str | Path, title: str | None = None) -> Path:
    """Write :func:`render_html` of ``source`` to ``path``; return the path.

    Example:
        >>> import tempfile, torch, sparsify_fx as sfx
        >>> from sparsify_fx.report.html import write_html
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> fast = sfx.sparsify(m, "actmem", example_inputs=(torch.randn(2, 4),))
        >>> path = write_html(fast, tempfile.mkdtemp() + "/report.html")
        >>> "<svg" in path.read_text()
        True
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render_html(source, title), encoding="utf-8")
    return target
