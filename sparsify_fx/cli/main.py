"""``sparsify-fx`` / ``python -m sparsify_fx``: demo, inspect, verify, bench."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsify-fx", description="Rewrite models for cheaper training.")
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the main job on the embedded default (resnet18, DropIT)")
    demo.add_argument("--recipe", default=DEMO_RECIPE)
    demo.add_argument("--repeats", type=int, default=3)
    demo.add_argument("--out", default="results", help="folder for the JSON results")
    for name, helptext in (("inspect", "capture + rewrite + report"), ("verify", "eval-mode check"),
                           ("bench", "dense vs rewritten training step")):
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument("model", help="torchvision:NAME | package.module:factory | path/file.py:factory")
        sp.add_argument("--recipe", required=True, help="e.g. dropit:keep=0.1 (join passes with +)")
        sp.add_argument("--input-shape", type=_shape, default=None, help="default 2,3,224,224")
        if name == "bench":
            sp.add_argument("--repeats", type=int, default=5)
            sp.add_argument("--out", default="results")
        if name == "inspect":
            sp.add_argument("--json", dest="json_path", default=None, help="write the report as JSON")
            sp.add_argument("--diff", action="store_true", help="print what each pass replaced, by module")
            sp.add_argument("--html", dest="html_path", default=None,
                            help="write a self-contained HTML report (tables, graph, memory bars)")
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


def _prepare(args: argparse.Namespace, console: Any = None):
    from sparsify_fx import sparsify
    from sparsify_fx.cli.models import default_input, load_model
    from sparsify_fx.infra.recipes import resolve_recipe

    configs = resolve_recipe(args.recipe)  # bad recipes fail before the model is built
    with _stage(console or _console(), f"building {args.model}"):
        model = load_model(args.model)
    x = default_input(args.model, args.input_shape)
    return model, x, configs, sparsify


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


def _run_bench(console, modules: dict, x, repeats: int, out: str, fname: str) -> list[dict]:
    from sparsify_fx.bench import compare_training_step

    with console.status("timing dense and rewritten training steps (interleaved)..."):
        measures = compare_training_step(modules, (x,), repeats=repeats)
    rows = _bench_table(console, measures, f"one training step, median of {repeats}, {tuple(x.shape)}")
    target = _write(out, fname, {"input_shape": list(x.shape), "threads": torch.get_num_threads(), "rows": rows})
    console.print(f"results written to {target}")
    return rows


def _demo(args: argparse.Namespace) -> int:
    from sparsify_fx import explain, sparsify
    from sparsify_fx.cli.models import DEMO_INPUT_SHAPE, DEMO_MODEL, default_input, load_model

    console = _console()
    torch.manual_seed(0)
    console.rule(f"sparsify-fx demo: {DEMO_MODEL} at {DEMO_INPUT_SHAPE}, recipe {args.recipe}")
    model = load_model(DEMO_MODEL)
    x = default_input(DEMO_MODEL, DEMO_INPUT_SHAPE)
    with console.status("capturing, rewriting and verifying..."):
        fast = sparsify(model, args.recipe, example_inputs=(x,))
        dropit_only = sparsify(model, "dropit:keep=0.1", example_inputs=(x,))
    console.print(explain(fast))
    _run_bench(console, {"dense": model, "dropit:keep=0.1 alone": dropit_only, args.recipe: fast},
               x, args.repeats, args.out, "demo.json")
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
    model, x, configs, sparsify = _prepare(args, console)
    with _stage(console, f"capturing and rewriting {args.model}"):
        fast = sparsify(model, configs, example_inputs=(x,), verify=False)
    report = explain(fast)
    console.print(report)
    if args.diff:
        from rich.text import Text

        styles = {"-": "red", "+": "green", "~": "yellow"}
        for line in report.graph_diff(width=min(console.width, 80)).splitlines():
            console.print(Text(line, style=styles.get(line.lstrip()[:1], "bold" if line and line[0] != " " else "")))
    if args.json_path:
        Path(args.json_path).write_text(report.to_json(indent=2))
        console.print(f"report written to {args.json_path}")
    if args.html_path:
        from sparsify_fx.report.html import write_html

        with _stage(console, "writing the HTML report"):
            write_html(report, args.html_path, title=f"sparsify_fx: {args.model} with {args.recipe}")
        console.print(f"HTML report written to {args.html_path}", soft_wrap=True, highlight=False)
    if args.plot_path:
        with _stage(console, "plotting saved bytes per layer"):
            _plot_memory(report, args.plot_path)
        console.print(f"plot written to {args.plot_path}", soft_wrap=True, highlight=False)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from sparsify_fx.verify import verify

    console = _console()
    model, x, configs, sparsify = _prepare(args, console)
    with _stage(console, f"capturing and rewriting {args.model}"):
        fast = sparsify(model, configs, example_inputs=(x,), verify=False)
    with _stage(console, "comparing eval-mode outputs"):
        report = verify(model, fast, (x,), raise_on_mismatch=False)
    console.print(("[green]" if report.ok else "[red]") + report.summary())
    return 0 if report.ok else 1


def _bench(args: argparse.Namespace) -> int:
    console = _console()
    model, x, configs, sparsify = _prepare(args, console)
    with _stage(console, f"capturing, rewriting and verifying {args.model}"):
        fast = sparsify(model, configs, example_inputs=(x,))
    name = args.model.replace(":", "_").replace("/", "_")
    _run_bench(console, {"dense": model, args.recipe: fast}, x, args.repeats, args.out, f"bench_{name}.json")
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
