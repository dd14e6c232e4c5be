"""Saved-for-backward memory and step time: dense vs DropIT vs DropIT + ActivationMemory.

For each model, every configuration is measured in the same process, interleaved (one step
of each configuration per round, so machine noise hits all of them alike), median of
``--repeats`` rounds after one warm-up round:

* ``saved``: bytes the autograd graph of one training forward holds for backward, de-duplicated
  by storage, parameters, buffers and the input batch left out (``benchmarks.memory``);
* ``step``: wall time of forward + cross-entropy + backward.

Prints a table (ratios vs dense) and writes ``results/bench_memory.json``.

    python -m benchmarks.bench_memory                 # resnet18, resnet50, vit_b_16
    python -m benchmarks.bench_memory --models resnet18 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import sparsify_fx as sfx
from benchmarks.memory import saved_tensor_bytes

__all__ = ["MODELS", "CONFIGS", "bench_model", "interleaved_times", "main"]

#: name -> (factory, input shape): the issue's target sizes (ResNet-50 8x3x112x112,
#: ViT-B/16 4x3x224x224), plus convnext_tiny and an MLP.
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "resnet18": (lambda: torchvision.models.resnet18(), (8, 3, 112, 112)),
    "resnet50": (lambda: torchvision.models.resnet50(), (8, 3, 112, 112)),
    "vit_b_16": (lambda: torchvision.models.vit_b_16(), (4, 3, 224, 224)),
    "convnext_tiny": (lambda: torchvision.models.convnext_tiny(), (8, 3, 112, 112)),
    "mlp": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 1024), nn.GELU(),
                                  nn.Linear(1024, 1024), nn.GELU(), nn.Linear(1024, 1024),
                                  nn.GELU(), nn.Linear(1024, 1000)), (64, 3, 32, 32)),
}

#: configuration name -> recipe (None = the dense model itself)
CONFIGS: dict[str, list | None] = {
    "dense": None,
    "dropit": [sfx.DropIT(keep=0.1)],
    "dropit+actmem": [sfx.DropIT(keep=0.1), sfx.ActivationMemory()],
    # + attention q, k, v in bf16 (opt-in: approximate; only models with SDPA are affected)
    "dropit+actmem+attn": [sfx.DropIT(keep=0.1), sfx.ActivationMemory(attention="bf16")],
    # the planner: compress (DropIT keep=0.1 + ActivationMemory) or recompute per block, 0.4x
    "budget:0.4": [sfx.MemoryBudget(fraction=0.4, keep=0.1)],
}


def _step(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> float:
    for p in model.parameters():
        p.grad = None
    start = time.perf_counter()
    F.cross_entropy(model(x), target).backward()
    return time.perf_counter() - start


def interleaved_times(
    variants: dict[str, nn.Module], step: Callable[[nn.Module], float], repeats: int
) -> dict[str, list[float]]:
    """``repeats`` step times per variant, one step of each per round (machine noise hits them
    alike), after one warm-up round."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(repeats + 1):
        for name, m in variants.items():
            t = step(m)
            if round_:  # round 0 warms up allocators and kernels
                times[name].append(t)
    return times


def bench_model(name: str, repeats: int = 3, shape: tuple[int, ...] | None = None) -> dict:
    """Measure every configuration on one model; returns a JSON-ready dict."""
    torch.manual_seed(0)
    factory, default_shape = MODELS[name]
    shape = shape or default_shape
    model = factory()
    x = torch.randn(*shape)
    target = torch.randint(0, 1000, (shape[0],))
    small = torch.randn(1, *shape[1:])
    variants: dict[str, nn.Module] = {}
    for config, recipe in CONFIGS.items():
        variants[config] = model if recipe is None else sfx.sparsify(model, recipe, example_inputs=(small,))
        variants[config].train()
    saved = {
        config: saved_tensor_bytes(m, (x,), count_inputs=False) for config, m in variants.items()
    }
    times = interleaved_times(variants, lambda m: _step(m, x, target), repeats)
    step = {config: statistics.median(ts) for config, ts in times.items()}
    return {
        "model": name,
        "input_shape": list(shape),
        "saved_bytes": saved,
        "step_s": step,
        "step_s_all": times,
        "saved_ratio": {c: saved[c] / saved["dense"] for c in saved},
        "step_ratio": {c: step[c] / step["dense"] for c in step},
    }


def _table(rows: list[dict]) -> str:
    lines = [
        "| model | input | config | saved MiB | saved vs dense | step s | step vs dense |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        for c in r["saved_bytes"]:
            lines.append(
                f"| {r['model']} | {'x'.join(map(str, r['input_shape']))} | {c} | "
                f"{r['saved_bytes'][c] / 2**20:.1f} | {r['saved_ratio'][c]:.3f} | "
                f"{r['step_s'][c]:.3f} | {r['step_ratio'][c]:.2f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="results/bench_memory.json")
    args = parser.parse_args(argv)
    rows = []
    start = time.perf_counter()
    for name in args.models:
        rows.append(bench_model(name, args.repeats))
        print(f"{name}: done at {time.perf_counter() - start:.0f} s", flush=True)
    print(_table(rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "repeats": args.repeats,
        "wall_s": time.perf_counter() - start,
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
