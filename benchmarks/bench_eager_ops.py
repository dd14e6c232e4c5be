"""Two eager-path costs (Parameters as eager tensors, op dispatch), A/B on one plan, interleaved.

``old``: the state before them (an ``nn.Parameter`` is not an eager tensor, so the fused
BatchNorm -> ReLU -> Conv's bf16 rebuild ran its four-pass PyTorch path in a model; every op
call went through the custom op's autograd wrapper). ``new``: both fixes. The plan is built
once (``MemoryBudget(fraction=F)``) and each round times dense, old and new back to back; the
ratios are medians over rounds of each round's step over that round's dense step.

    python -m benchmarks.bench_eager_ops --model resnet50 --fraction 0.5 --rounds 15
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from sparsify_fx.passes.kernels import cache, op_autograd

import sparsify_fx as sfx
from benchmarks.bench_budget import MODELS
from benchmarks.bench_memory import interleaved_times, paired_ratios
from benchmarks.device import timed_step

__all__ = ["main", "one_plan", "ab_rounds", "write_result"]


def one_plan(description: str, model: str, out: str, argv: list[str] | None):
    """An A/B on one plan's setup: ``(args, dense model, plan, x, target, forms)`` from the
    command line ``--model --fraction --rounds --out``; the plan is ``MemoryBudget(fraction)``
    built once, ``forms`` counts its rewrites by storage (``+output``: the attention keeps it)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default=model, choices=list(MODELS))
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default=out)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    factory, make_x, make_target, _, batch = MODELS[args.model]
    dense = factory().train()
    x, target = make_x(batch), make_target(batch)
    fast = sfx.sparsify(dense, sfx.MemoryBudget(fraction=args.fraction), example_inputs=(x,)).train()
    forms = Counter(r.details.get("storage", r.op) + ("+output" if r.details.get("output") else "")
                    for r in sfx.explain(fast).rewrites)
    return args, dense, fast, x, target, forms


def ab_rounds(runs: dict[str, Callable[[], float]], rounds: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Each round calls every run once, in order (after 2 warm-up rounds); returns the times
    and each run's paired ratio to ``runs["dense"]``."""
    times = interleaved_times(runs, lambda run: run(), rounds, warmup=2)  # type: ignore[arg-type]
    return times, {k: v for k, v in paired_ratios(times).items() if k != "dense"}


def write_result(out: str, result: dict) -> dict:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> dict:
    args, model, fast, x, target, forms = one_plan(
        __doc__.splitlines()[0], "resnet50", "results/bench_eager_ops.json", argv)
    real, eager_call = cache._REAL, op_autograd.eager_call

    def state(new: bool) -> None:
        cache._REAL = real if new else (torch.Tensor,)
        op_autograd.eager_call = eager_call if new else (lambda args: False)

    def step(m: torch.nn.Module, new: bool = True) -> float:
        state(new)
        try:
            return timed_step(m, x, target, "cpu", "off")
        finally:
            state(True)

    runs = {"dense": lambda: step(model), "old": lambda: step(fast, new=False), "new": lambda: step(fast)}
    times, ratio = ab_rounds(runs, args.rounds)
    result = {"model": args.model, "fraction": args.fraction, "forms": dict(forms), "times_s": times,
              "step_ratio_paired": ratio, "new_over_old": paired_ratios(times, base="old")["new"]}
    print(f"{args.model} at {args.fraction}: step vs dense, old {ratio['old']:.3f}, new {ratio['new']:.3f}; "
          f"new / old {result['new_over_old']:.3f}; dense {1e3 * statistics.median(times['dense']):.0f} ms")
    return write_result(args.out, result)


if __name__ == "__main__":
    main()
