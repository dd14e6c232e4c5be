"""Saved-for-backward memory and step time: dense vs DropIT vs DropIT + ActivationMemory.

For each model, every configuration is measured in the same process, interleaved (one step
of each configuration per round, so machine noise hits all of them alike), median of
``--repeats`` rounds after one warm-up round:

* ``saved``: bytes the autograd graph of one training forward holds for backward, de-duplicated
  by storage, parameters, buffers and the input batch left out (``benchmarks.memory``);
* ``step``: wall time of forward + cross-entropy + backward;
* on ``--device cuda`` also ``held``: the caching allocator's bytes after the forward minus
  before it (what the step really keeps until backward), and the step's peak.

``--amp bf16`` runs the forward under ``torch.autocast`` (bf16). ``--batch`` overrides the
batch size (the issue's CPU sizes are too small to fill a GPU).

Prints a table (ratios vs dense) and writes ``results/bench_memory.json``.

    python -m benchmarks.bench_memory                 # resnet18, resnet50, vit_b_16
    python -m benchmarks.bench_memory --models resnet18 --repeats 5
    python -m benchmarks.bench_memory --device cuda --amp bf16 --batch 64 --models resnet50
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
import torchvision

import sparsify_fx as sfx
from benchmarks.device import (
    add_device_args,
    autocast,
    check_device,
    cuda_step_memory,
    device_meta,
    timed_step,
)
from benchmarks.memory import saved_tensor_bytes

__all__ = ["MODELS", "CONFIGS", "bench_model", "interleaved_times", "paired_ratios", "main"]

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
    # the norms / activations / attention in bf16, 1-bit ReLU: MemoryBudget's compress-light
    "actmem+attn": [sfx.ActivationMemory(attention="bf16")],
    # every saved tensor in bf16, Linear / Conv inputs included, no DropIT (MemoryBudget's
    # compress-bf16 choice on every block)
    "actmem+bf16": [sfx.ActivationMemory(attention="bf16", dense="bf16")],
    # the exact fusions (BatchNorm -> ReLU -> Conv, GELU / LayerNorm -> Linear recomputed) and
    # 1-bit ReLU: MemoryBudget's compress-exact choice on every block
    "actmem:fused": [sfx.ActivationMemory(gelu="recompute", silu="recompute", layernorm="recompute",
                                          batchnorm="recompute")],
    # the same fusions keeping bf16 inputs, the rest bf16, attention bf16: compress-light
    "actmem:fused-bf16": [sfx.ActivationMemory(gelu="recompute-bf16", silu="recompute-bf16",
                                               layernorm="recompute-bf16", batchnorm="recompute-bf16",
                                               attention="bf16")],
    # and the Linear / Conv inputs the fusions leave bf16 too: compress-bf16
    "actmem:fused-bf16+dense": [sfx.ActivationMemory(gelu="recompute-bf16", silu="recompute-bf16",
                                                     layernorm="recompute-bf16", batchnorm="recompute-bf16",
                                                     attention="bf16", dense="bf16")],
    # the planner: compress (DropIT keep=0.1 + ActivationMemory) or recompute per block, 0.4x
    "budget:0.4": [sfx.MemoryBudget(fraction=0.4, keep=0.1)],
}


def interleaved_times(
    variants: dict[str, nn.Module], step: Callable[[nn.Module], float], repeats: int, warmup: int = 1,
    block: int = 1,
) -> dict[str, list[float]]:
    """``repeats`` step times per variant, one step of each per round (machine noise hits them
    alike), after ``warmup`` rounds.

    ``block`` > 1: each round runs ``block`` consecutive steps of a variant and records the
    median of all but the first. The first step runs on the memory another variant's step
    left behind (freed blocks of other sizes, pages handed back to the OS); training runs one
    model step after step, as the later ones do."""
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(repeats + warmup):
        for name, m in variants.items():
            ts = [step(m) for _ in range(block)]
            if round_ >= warmup:  # the first rounds warm up allocators and kernels
                times[name].append(ts[0] if block == 1 else statistics.median(ts[1:]))
    return times


def paired_ratios(times: dict[str, list[float]], base: str = "dense") -> dict[str, float]:
    """Per variant, the median over rounds of its step over ``base``'s step of the same round:
    a host whose speed drifts between rounds moves both (this 2-core one moved 10 % between runs)."""
    return {k: statistics.median(a / b for a, b in zip(ts, times[base], strict=True)) for k, ts in times.items()}


def bench_model(
    name: str, repeats: int = 3, shape: tuple[int, ...] | None = None, *,
    device: str = "cpu", amp: str = "off", compile_: str = "off", configs: list[str] | None = None,
) -> dict:
    """Measure every configuration on one model; returns a JSON-ready dict."""
    torch.manual_seed(0)
    factory, default_shape = MODELS[name]
    shape = shape or default_shape
    model = factory().to(device)
    x = torch.randn(*shape, device=device)
    target = torch.randint(0, 1000, (shape[0],), device=device)
    small = torch.randn(1, *shape[1:], device=device)
    variants: dict[str, nn.Module] = {}
    for config, recipe in CONFIGS.items():
        if configs and config not in configs and config != "dense":
            continue
        variants[config] = model if recipe is None else sfx.sparsify(model, recipe, example_inputs=(small,))
        variants[config].train()
    with autocast(device, amp):
        saved = {
            config: saved_tensor_bytes(m, (x,), count_inputs=False) for config, m in variants.items()
        }
    timed = variants
    if compile_ != "off":
        # the step time of each variant under torch.compile (the memory figures stay eager's):
        # "cudagraphs" replays the step as CUDA graphs and takes the host out of the loop,
        # "reduce-overhead" is inductor plus CUDA graphs
        kwargs = {"backend": compile_} if compile_ in ("cudagraphs", "aot_eager") else {"mode": compile_}
        timed = {k: torch.compile(m, **kwargs) for k, m in variants.items()}
        for m in timed.values():  # compile, then the CUDA graph trees' warm-up and recording
            for _ in range(3):
                timed_step(m, x, target, device, amp)
    times = interleaved_times(timed, lambda m: timed_step(m, x, target, device, amp), repeats)
    step = {config: statistics.median(ts) for config, ts in times.items()}
    row = {
        "model": name,
        "input_shape": list(shape),
        "saved_bytes": saved,
        "step_s": step,
        "step_s_all": times,
        "compile": compile_,
        "saved_ratio": {c: saved[c] / saved["dense"] for c in saved},
        "step_ratio": {c: step[c] / step["dense"] for c in step},
    }
    if device == "cuda" and compile_ in ("aot_eager", "default"):
        # what the compiled step holds: AOT autograd's partitioner picks the saved tensors anew
        # (a CUDA graph's private pool would hide them, so not under cudagraphs)
        compiled = {config: cuda_step_memory(m, x, target, amp) for config, m in timed.items()}
        row["compiled_held_ratio"] = {c: compiled[c]["held_bytes"] / compiled["dense"]["held_bytes"] for c in compiled}
        row["compiled_cuda"] = compiled
    if device == "cuda":
        cuda = {config: cuda_step_memory(m, x, target, amp) for config, m in variants.items()}
        row["cuda"] = cuda
        row["held_ratio"] = {c: cuda[c]["held_bytes"] / cuda["dense"]["held_bytes"] for c in cuda}
        row["peak_ratio"] = {c: cuda[c]["step_peak_bytes"] / cuda["dense"]["step_peak_bytes"] for c in cuda}
    return row


def _table(rows: list[dict]) -> str:
    cuda = any("cuda" in r for r in rows)
    head = "| model | input | config | saved MiB | saved vs dense |"
    rule = "|---|---|---|---:|---:|"
    if cuda:
        head += " held MiB (allocator) | held vs dense | peak vs dense |"
        rule += "---:|---:|---:|"
    compiled = any("compiled_held_ratio" in r for r in rows)
    if compiled:
        head += " held vs dense, compiled |"
        rule += "---:|"
    lines = [head + " step ms | step vs dense |", rule + "---:|---:|"]
    for r in rows:
        for c in r["saved_bytes"]:
            line = (f"| {r['model']} | {'x'.join(map(str, r['input_shape']))} | {c} | "
                    f"{r['saved_bytes'][c] / 2**20:.1f} | {r['saved_ratio'][c]:.3f} |")
            if cuda:
                line += (f" {r['cuda'][c]['held_bytes'] / 2**20:.1f} | {r['held_ratio'][c]:.3f} |"
                         f" {r['peak_ratio'][c]:.3f} |")
            if compiled:
                line += f" {r.get('compiled_held_ratio', {}).get(c, float('nan')):.3f} |"
            lines.append(line + f" {1e3 * r['step_s'][c]:.1f} | {r['step_ratio'][c]:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the issue's)")
    parser.add_argument("--out", default="results/bench_memory.json")
    parser.add_argument("--configs", nargs="+", default=None, choices=list(CONFIGS),
                        help="configurations to measure (default: all; dense always)")
    parser.add_argument("--compile", default="off", choices=["off", "default", "reduce-overhead", "cudagraphs", "aot_eager"],
                        help="time each variant under torch.compile (memory is measured eagerly)")
    add_device_args(parser)
    args = parser.parse_args(argv)
    check_device(args.device)
    rows = []
    start = time.perf_counter()
    for name in args.models:
        shape = MODELS[name][1]
        if args.batch:
            shape = (args.batch, *shape[1:])
        rows.append(bench_model(name, args.repeats, shape, device=args.device, amp=args.amp,
                                compile_=args.compile, configs=args.configs))
        print(f"{name}: done at {time.perf_counter() - start:.0f} s", flush=True)
    print(_table(rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        **device_meta(args.device, args.amp),
        "machine": platform.machine(),
        "repeats": args.repeats,
        "compile": args.compile,
        "wall_s": time.perf_counter() - start,
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
