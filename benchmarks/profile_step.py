"""Where a rewritten training step spends its time: torch.profiler over a few steps.

Prints the ops with the most self time (device time on CUDA, CPU time otherwise) for the
dense model and for the recipe, and the count of host-device synchronisations (each one
stalls the GPU's queue: the first thing to look for when a GPU step is slow).

    python -m benchmarks.profile_step --model resnet50 --recipe "dropit:keep=0.1+actmem" --device cuda
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import sparsify_fx as sfx
from benchmarks.bench_memory import MODELS
from benchmarks.device import add_device_args, check_device, timed_step

__all__ = ["main"]

_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::_local_scalar_dense", "aten::nonzero")


def _profile(model, x, target, device: str, amp: str, steps: int, top: int, label: str) -> None:
    for _ in range(2):
        timed_step(model, x, target, device, amp)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        times = [timed_step(model, x, target, device, amp) for _ in range(steps)]
    events = prof.key_averages()
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(f"\n=== {label}: median step {1e3 * sorted(times)[len(times) // 2]:.1f} ms ===")
    counts = {e.key: e.count // steps for e in events if e.key in _SYNCS}
    print("per step:", counts or "no synchronising ops")
    print(events.table(sort_by=sort, row_limit=top, max_name_column_width=48))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", choices=list(MODELS))
    parser.add_argument("--recipe", nargs="+", default=["dropit:keep=0.1+actmem"])
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=20)
    add_device_args(parser)
    args = parser.parse_args(argv)
    check_device(args.device)
    factory, shape = MODELS[args.model]
    if args.batch:
        shape = (args.batch, *shape[1:])
    torch.manual_seed(0)
    model = factory().to(args.device).train()
    x = torch.randn(*shape, device=args.device)
    target = torch.randint(0, 1000, (shape[0],), device=args.device)
    _profile(model, x, target, args.device, args.amp, args.steps, args.top, f"{args.model} dense")
    for recipe in args.recipe:
        fast = sfx.sparsify(model, recipe, example_inputs=(x[:1],)).train()
        _profile(fast, x, target, args.device, args.amp, args.steps, args.top, f"{args.model} {recipe}")


if __name__ == "__main__":
    main()
