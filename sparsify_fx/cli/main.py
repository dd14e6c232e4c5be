"""``sparsify-fx`` / ``python -m sparsify_fx``: demo, inspect, verify, bench."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import textwrap
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from sparsify_fx.errors import SparsifyError

__all__ = ["main", "DEMO_RECIPE"]

#: the demo's recipe: DropIT plus the nodes that make its saving real (1-bit ReLU,
#: compressed BatchNorm); the demo also times DropIT alone for comparison
DEMO_RECIPE = "dropit:keep=0.1+actmem"


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace("x", ",").split(",") if v)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"input shape must look like 2,3,224,224, got {text!r}") from e


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}") from e
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (one timed step per repeat), got {value}")
    return value


def _recipe_help() -> str:
    """Recipe syntax and the registered passes, for --help."""
    from sparsify_fx.infra.registry import registered

    lines = ["recipes:", "  PASS[:FIELD=VALUE,...][+PASS...]   values are Python literals (0.1, True, 'a*',",
             "  ['x','y']); leave fields out for their defaults. e.g. dropit:keep=0.1+actmem,",
             "  budget:fraction=0.5, sliceout:p=0.25,include=['layer1.*']", "", "passes:"]
    for name, spec in sorted(registered().items()):
        doc = (spec.config_type.__doc__ or "").strip().splitlines()
        text = f"{spec.config_type.__name__}: {doc[0].replace('``', '') if doc else ''}"
        lines += textwrap.wrap(text, 78, initial_indent=f"  {name:<9} ", subsequent_indent=" " * 12)
    lines.append("  (fields and defaults: python -c \"import sparsify_fx as sfx; help(sfx.DropIT)\")")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    from sparsify_fx.cli.models import INPUT_SYNTAX

    epilog = _recipe_help()
    raw = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="sparsify-fx", description="Rewrite models for cheaper training.",
                                epilog=epilog, formatter_class=raw)
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the main job on the embedded default (resnet18, DropIT)",
                          epilog=epilog, formatter_class=raw)
    demo.add_argument("--recipe", default=DEMO_RECIPE, help=f"default {DEMO_RECIPE} (syntax below)")
    demo.add_argument("--repeats", type=_positive_int, default=3, help="timed steps per config (>= 1)")
    demo.add_argument("--out", default="results", help="folder for the JSON results")
    for name, helptext in (("inspect", "capture + rewrite + report"), ("verify", "eval-mode check"),
                           ("bench", "dense vs rewritten training step")):
        sp = sub.add_parser(name, help=helptext, epilog=epilog + "\n\ninputs:\n" + INPUT_SYNTAX, formatter_class=raw)
        sp.add_argument("model", help="torchvision:NAME | package.module:factory | path/file.py:factory")
        sp.add_argument("--recipe", required=True, help="e.g. dropit:keep=0.1+actmem (syntax and passes below)")
        sp.add_argument("--input-shape", type=_shape, default=None,
                        help="one float input of this shape (default 2,3,224,224)")
        sp.add_argument("--input", dest="inputs", action="append", default=None, metavar="[NAME=]DTYPE[SHAPE][:RANGE]",
                        help="an example input (repeat for several; NAME= for a keyword input), "
                             "e.g. int64[2,16]:0-1000 for token ids; see below")
        if name == "bench":
            sp.add_argument("--repeats", type=_positive_int, default=5, help="timed steps per config (>= 1)")
            sp.add_argument("--out", default="results", help="folder for the JSON results")
        if name == "inspect":
            sp.add_argument("--json", dest="json_path", default=None,
                            help="write the report as JSON (a file, or a folder: FOLDER/report.json)")
            sp.add_argument("--diff", action="store_true", help="print what each pass replaced, by module")
            sp.add_argument("--html", dest="html_path", default=None,
                            help="write a self-contained HTML report (tables, graph, memory plan; "
                                 "a file, or a folder: FOLDER/report.html)")
            sp.add_argument("--plot", dest="plot_path", default=None,
                            help="write saved-activation bytes per layer as a PNG (needs matplotlib)")
    return p


def _console():
    from rich.console import Console

    return Console()


@contextmanager
def _stage(console: Any, what: str) -> Iterator[None]:
    """A spinner while ``what`` runs, then one line with how long it took."""
    start = time.perf_counter()
    with console.status(f"{what}..."):
        yield
    console.print(f"[dim]{what}: {time.perf_counter() - start:.1f} s[/dim]", highlight=False)


@contextmanager
def _warnings_to(console: Any) -> Iterator[None]:
    """sparsify's warnings (a saving the memory plan shows is not real) as console lines."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        yield
    for w in caught:
        console.print(f"[yellow]warning:[/yellow] {w.message}", highlight=False)


def _out_file(path: str, default_name: str, flag: str) -> Path:
    """Where ``--json`` / ``--html`` writes: the file named, or ``default_name`` inside a folder
    (one that exists, or a path ending in a separator). Checked before the (slow) run."""
    target = Path(path)
    if target.is_dir() or path.endswith((os.sep, "/")):
        target = target / default_name
    parent = target.parent
    existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise SparsifyError(f"{flag} {path!r}: {str(existing)!r} is a file, not a folder")
    if existing is not None and not os.access(existing, os.W_OK):
        raise SparsifyError(f"{flag} {path!r}: folder {str(existing)!r} is not writable")
    if target.is_dir():
        raise SparsifyError(f"{flag} {path!r}: {str(target)!r} is a folder; name a file")
    return target


def _inputs(args: argparse.Namespace) -> tuple[tuple, dict]:
    from sparsify_fx.cli.models import default_input, make_inputs, parse_input

    if args.inputs:
        if args.input_shape is not None:
            raise SparsifyError("give either --input-shape or --input, not both")
        return make_inputs([parse_input(t) for t in args.inputs])
    return (default_input(args.model, args.input_shape),), {}


def _prepare(args: argparse.Namespace, console: Any = None):
    from sparsify_fx import sparsify
    from sparsify_fx.cli.models import load_model
    from sparsify_fx.infra.recipes import resolve_recipe

    configs = resolve_recipe(args.recipe)  # bad recipes and inputs fail before the model is built
    inputs, kwargs = _inputs(args)
    with _stage(console or _console(), f"building {args.model}"):
        model = load_model(args.model)
    return model, inputs, kwargs, configs, sparsify


def _recipe_name(configs: list) -> str:
    from sparsify_fx.infra.describe import short_description

    return "+".join(short_description(c) for c in configs)


def _describe_inputs(inputs: tuple, kwargs: dict) -> str:
    parts = [f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}" for t in inputs]
    parts += [f"{k}={str(t.dtype).removeprefix('torch.')}{list(t.shape)}" for k, t in kwargs.items()]
    return ", ".join(parts)


def _bench_table(console, measures, title: str) -> list[dict]:
    from rich.table import Table

    dense = measures[0]
    table = Table(title=title)
    for col in ("config", "saved for backward", "x dense", "step time", "x dense"):
        table.add_column(col)
    rows = []
    for m in measures:
        mem_ratio = m.saved_bytes / dense.saved_bytes if dense.saved_bytes else float("nan")
        t_ratio = m.step_seconds / dense.step_seconds if dense.step_seconds else float("nan")
        table.add_row(m.name, f"{m.saved_bytes / 2**20:.1f} MiB", f"{mem_ratio:.3f}",
                      f"{m.step_seconds * 1e3:.1f} ms", f"{t_ratio:.3f}")
        rows.append({"config": m.name, "saved_bytes": m.saved_bytes, "memory_ratio": mem_ratio,
                     "step_seconds": m.step_seconds, "time_ratio": t_ratio, "times": m.times})
    console.print(table)
    return rows


def _write(out: str, name: str, data: object) -> Path:
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    target = path / name
    target.write_text(json.dumps(data, indent=2, default=str))
    return target


def _measure(console, modules: dict, inputs: tuple, kwargs: dict, repeats: int) -> list:
    from sparsify_fx.bench import compare_training_step

    with console.status("timing dense and rewritten training steps (interleaved)..."):
        return compare_training_step(modules, inputs, kwargs, repeats=repeats)


def _report_bench(console, measures: list, inputs: tuple, kwargs: dict, repeats: int, out: str,
                  fname: str, report: Any) -> list[dict]:
    rows = _bench_table(console, measures, f"one training step, median of {repeats}, {_describe_inputs(inputs, kwargs)}")
    target = _write(out, fname, {
        "input_shape": list(inputs[0].shape) if inputs else None,
        "inputs": _describe_inputs(inputs, kwargs), "threads": torch.get_num_threads(), "rows": rows,
        "headline": report.headline,
        "held_bytes_estimated": [report.held_bytes_before, report.held_bytes_after],
        "held_bytes_measured": [report.measured_bytes_before, report.measured_bytes_after],
    })
    console.print(f"results written to {target}")
    return rows


def _demo(args: argparse.Namespace) -> int:
    from sparsify_fx import explain, sparsify
    from sparsify_fx.cli.models import DEMO_INPUT_SHAPE, DEMO_MODEL, default_input, load_model
    from sparsify_fx.infra.recipes import resolve_recipe

    console = _console()
    torch.manual_seed(0)
    configs = resolve_recipe(args.recipe)
    name = _recipe_name(configs)
    console.rule(f"sparsify-fx demo: {DEMO_MODEL} at {DEMO_INPUT_SHAPE}, recipe {name}")
    model = load_model(DEMO_MODEL)
    x = default_input(DEMO_MODEL, DEMO_INPUT_SHAPE)
    with console.status("capturing, rewriting and verifying..."):
        fast = sparsify(model, configs, example_inputs=(x,))
        with warnings.catch_warnings():
            # shown on purpose: DropIT alone keeps ReLU outputs dense beside its compressed copies
            warnings.simplefilter("ignore", UserWarning)
            dropit_only = sparsify(model, "dropit:keep=0.1", example_inputs=(x,))
    measures = _measure(console, {"dense": model, "dropit:keep=0.1 alone": dropit_only, name: fast},
                        (x,), {}, args.repeats)
    report = explain(fast)
    report.measured_bytes_before, report.measured_bytes_after = measures[0].saved_bytes, measures[-1].saved_bytes
    console.print(report)
    _report_bench(console, measures, (x,), {}, args.repeats, args.out, "demo.json", report)
    return 0


def _plot_memory(report: Any, path: str) -> None:
    """Saved-activation bytes per rewritten layer, before vs after, as a PNG (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; the CLI only writes files
    import matplotlib.pyplot as plt

    rows = [r for r in report.rewrites if r.saved_bytes_before is not None and r.saved_bytes_after is not None]
    labels = [f"{r.module or '(root)'} {r.op} [{r.pass_name}]" for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(rows) + 1.2))
    pos = range(len(rows))
    ax.barh([p - 0.2 for p in pos], [r.saved_bytes_before / 1024 for r in rows], 0.4, label="before")
    ax.barh([p + 0.2 for p in pos], [r.saved_bytes_after / 1024 for r in rows], 0.4, label="after")
    ax.set_yticks(list(pos), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("saved for backward (KiB)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _inspect(args: argparse.Namespace) -> int:
    from sparsify_fx import explain

    if args.plot_path and importlib.util.find_spec("matplotlib") is None:
        # checked before the (slow) rewrite so the user learns at once
        print("sparsify-fx inspect: error: --plot needs matplotlib, which is not installed "
              "(pip install matplotlib); --html draws the same bars without it", file=sys.stderr)
        return 2
    console = _console()
    json_path = _out_file(args.json_path, "report.json", "--json") if args.json_path else None
    html_path = _out_file(args.html_path, "report.html", "--html") if args.html_path else None
    model, inputs, kwargs, configs, sparsify = _prepare(args, console)
    with _stage(console, f"capturing and rewriting {args.model}"), _warnings_to(console):
        fast = sparsify(model, configs, example_inputs=inputs, example_kwargs=kwargs, verify=False)
    report = explain(fast)
    console.print(report)
    if args.diff:
        from rich.text import Text

        styles = {"-": "red", "+": "green", "~": "yellow"}
        for line in report.graph_diff(width=min(console.width, 80)).splitlines():
            console.print(Text(line, style=styles.get(line.lstrip()[:1], "bold" if line and line[0] != " " else "")))
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(report.to_json(indent=2))
        console.print(f"report written to {json_path}", soft_wrap=True, highlight=False)
    if html_path:
        from sparsify_fx.report.html import write_html

        with _stage(console, "writing the HTML report"):
            write_html(report, html_path, title=f"sparsify_fx: {args.model} with {_recipe_name(configs)}")
        console.print(f"HTML report written to {html_path}", soft_wrap=True, highlight=False)
    if args.plot_path:
        with _stage(console, "plotting saved bytes per layer"):
            _plot_memory(report, args.plot_path)
        console.print(f"plot written to {args.plot_path}", soft_wrap=True, highlight=False)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from sparsify_fx.verify import verify

    console = _console()
    model, inputs, kwargs, configs, sparsify = _prepare(args, console)
    with _stage(console, f"capturing and rewriting {args.model}"), _warnings_to(console):
        fast = sparsify(model, configs, example_inputs=inputs, example_kwargs=kwargs, verify=False)
    with _stage(console, "comparing eval-mode outputs"):
        report = verify(model, fast, inputs, kwargs, raise_on_mismatch=False)
    console.print(("[green]" if report.ok else "[red]") + report.summary())
    return 0 if report.ok else 1


def _bench(args: argparse.Namespace) -> int:
    from sparsify_fx import explain

    console = _console()
    model, inputs, kwargs, configs, sparsify = _prepare(args, console)
    with _stage(console, f"capturing, rewriting and verifying {args.model}"), _warnings_to(console):
        fast = sparsify(model, configs, example_inputs=inputs, example_kwargs=kwargs)
    name = args.model.replace(":", "_").replace("/", "_")
    measures = _measure(console, {"dense": model, _recipe_name(configs): fast}, inputs, kwargs, args.repeats)
    report = explain(fast)
    report.measured_bytes_before, report.measured_bytes_after = measures[0].saved_bytes, measures[-1].saved_bytes
    console.print(report.headline, style="bold", highlight=False)
    _report_bench(console, measures, inputs, kwargs, args.repeats, args.out, f"bench_{name}.json", report)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = {"demo": _demo, "inspect": _inspect, "verify": _verify, "bench": _bench}[args.command]
    try:
        return handler(args)
    except SparsifyError as e:
        print(f"sparsify-fx {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
