"""MemoryBudget across torchvision's families: does each plan hold what it says it holds?

For each model and budget (``--fractions``, any choice and ``exact_only=True``), plans with
``sfx.MemoryBudget`` and measures the bytes autograd really saves (storage-deduplicated,
``saved_tensors_hooks``, with a loss whose backward keeps nothing) against the model's own
dense bytes. Prints planned vs measured fractions, whether the budget is met within 5 %, the
plan's choices and planning time; with ``exact_only`` also whether every gradient equals the
dense model's (``rtol=1e-4, atol=1e-5``). Writes ``results/bench_budget_zoo.json``.

Small inputs (2x3x32x32; Swin and ViT at their sizes for 32 px): this checks the accounting,
not speed (``benchmarks.bench_budget`` measures step times).

    python -m benchmarks.bench_budget_zoo
    python -m benchmarks.bench_budget_zoo --models swin_t densenet121 --fractions 0.25
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from collections import Counter
from pathlib import Path

import torch
import torchvision
from torch.utils._pytree import tree_leaves

import sparsify_fx as sfx
from sparsify_fx.bench import saved_tensor_bytes

__all__ = ["MODELS", "check_model", "main"]

#: name -> get_model keyword arguments
MODELS: dict[str, dict] = {
    "resnet18": {}, "mobilenet_v3_small": {}, "convnext_tiny": {}, "vit_b_16": {"image_size": 32},
    "efficientnet_b0": {}, "densenet121": {}, "swin_t": {}, "regnet_x_400mf": {}, "shufflenet_v2_x0_5": {},
}


def _sum(out) -> torch.Tensor:
    # a sum's backward keeps nothing: the measured bytes are the model's alone
    return sum(t.float().sum() for t in tree_leaves(out) if isinstance(t, torch.Tensor))


def _grads(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout / stochastic-depth draws in both models
    _sum(model(x)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def check_model(name: str, fractions: list[float], size: int = 32, batch: int = 2) -> list[dict]:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **MODELS[name])
    x = torch.randn(batch, 3, size, size)
    dense = saved_tensor_bytes(model, (x,), loss_fn=_sum)
    rows = []
    for fraction in fractions:
        for exact in (False, True):
            start = time.perf_counter()
            fast = sfx.sparsify(model, sfx.MemoryBudget(fraction=fraction, exact_only=exact), example_inputs=(x,))
            planning = time.perf_counter() - start
            plan = sfx.explain(fast).memory_budget
            measured = saved_tensor_bytes(fast, (x,), loss_fn=_sum) / dense
            row = {
                "model": name, "fraction": fraction, "exact_only": exact, "planning_s": planning,
                "plan_dense_vs_measured": plan["dense_bytes"] / dense,
                "planned": plan["achieved_fraction"], "measured": measured, "reachable": plan["reachable"],
                "within_budget": measured <= fraction * 1.05,
                "choices": dict(Counter(u["choice"] for u in plan["units"].values())),
            }
            if exact:
                ref, got = _grads(copy.deepcopy(model), x), _grads(fast, x)
                bad = []
                for k in ref:
                    try:
                        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5)
                    except AssertionError:
                        bad.append(k)
                row["gradient_mismatches"] = bad
            rows.append(row)
            print(f"  {name} {fraction:g}{' exact' if exact else ''}: planned {row['planned']:.3f}, "
                  f"measured {measured:.3f}, planning {planning:.1f} s", flush=True)
    return rows


def _table(rows: list[dict]) -> str:
    lines = ["| model | budget | planned | measured | within 5 % | gradients | choices | planning s |",
             "|---|---|---:|---:|---|---|---|---:|"]
    for r in rows:
        budget = f"{r['fraction']:g}{' exact' if r['exact_only'] else ''}"
        planned = f"{r['planned']:.3f}" + ("" if r["reachable"] else " (unreachable)")
        grads = "" if "gradient_mismatches" not in r else (
            "dense" if not r["gradient_mismatches"] else f"{len(r['gradient_mismatches'])} differ")
        choices = ", ".join(f"{c} {n}" for c, n in sorted(r["choices"].items()))
        ok = "yes" if r["within_budget"] else ("no (unreachable)" if not r["reachable"] else "NO")
        lines.append(f"| {r['model']} | {budget} | {planned} | {r['measured']:.3f} | {ok} | {grads} | "
                     f"{choices} | {r['planning_s']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.5, 0.25, 0.1])
    parser.add_argument("--out", default="results/bench_budget_zoo.json")
    args = parser.parse_args(argv)
    if any(not 0 < f <= 1 for f in args.fractions):
        parser.error("--fractions must be in (0, 1]")
    rows, start = [], time.perf_counter()
    for name in args.models:
        rows += check_model(name, args.fractions)
    print(_table(rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "torchvision": torchvision.__version__, "machine": platform.machine(),
            "threads": torch.get_num_threads(), "wall_s": time.perf_counter() - start}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
