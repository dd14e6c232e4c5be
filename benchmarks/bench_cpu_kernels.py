"""CPU training step with and without the fused C++ kernels (passes/kernels/cpu.py), same run.

For each model and recipe, three variants are timed interleaved (one step of each per round,
median of ``--repeats`` after a warm-up round): the dense model, the rewritten model with
the kernels, and the same rewritten model with the kernels switched off (every op then takes
its PyTorch path, which computes the same bits). Prints a table and writes
``results/bench_cpu_kernels.json``.

    python -m benchmarks.bench_cpu_kernels
    python -m benchmarks.bench_cpu_kernels --models resnet50 --recipes "dropit:keep=0.1+actmem" --repeats 9
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn as nn
from sparsify_fx.passes.kernels import cpu as cpu_kernels

import sparsify_fx as sfx
from benchmarks.bench_memory import MODELS, interleaved_times
from benchmarks.device import timed_step

__all__ = ["main"]

_ROOT = Path(__file__).resolve().parent.parent


def _bench(name: str, recipe: str, repeats: int) -> dict:
    torch.manual_seed(0)
    factory, shape = MODELS[name]
    model = factory().train()
    x, target = torch.randn(*shape), torch.randint(0, 1000, (shape[0],))
    fast = sfx.sparsify(model, recipe, example_inputs=(x[:1],)).train()
    real = cpu_kernels.for_tensors
    variants: dict[str, tuple[nn.Module, bool]] = {"dense": (model, True), "kernels": (fast, True), "pytorch": (fast, False)}

    def step(label: str) -> float:
        module, kernels = variants[label]
        cpu_kernels.for_tensors = real if kernels else (lambda *t, **k: None)
        try:
            return timed_step(module, x, target, "cpu", "off")
        finally:
            cpu_kernels.for_tensors = real

    times = interleaved_times({k: k for k in variants}, step, repeats)  # type: ignore[arg-type]
    median = {k: statistics.median(v) for k, v in times.items()}
    return {"model": name, "recipe": recipe, "input_shape": list(shape), "step_s": median, "step_s_all": times,
            "ratio": {k: median[k] / median["dense"] for k in median}}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "vit_b_16"], choices=list(MODELS))
    parser.add_argument("--recipes", nargs="+", default=["dropit:keep=0.1", "dropit:keep=0.1+actmem"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=_ROOT / "results" / "bench_cpu_kernels.json")
    args = parser.parse_args(argv)
    if cpu_kernels.load() is None:
        raise SystemExit(f"the C++ kernels are unavailable: {cpu_kernels.unavailable_reason()}")
    rows = [_bench(m, r, args.repeats) for m in args.models for r in args.recipes]
    print("| model | recipe | dense ms | kernels | PyTorch path |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | `{r['recipe']}` | {1e3 * r['step_s']['dense']:.0f} | "
              f"{r['ratio']['kernels']:.2f}x | {r['ratio']['pytorch']:.2f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": args.repeats}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
