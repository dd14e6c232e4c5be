"""The bf16 forms' attention output kept and one-pass bf16 copies, A/B on one plan, interleaved.

The plan is built once (``MemoryBudget(fraction=F)``), then each round times four steps back
to back:
- ``dense``: the original model;
- ``old``: the attention re-run in backward (``keep_output`` off on the ops that have it) and
  the PyTorch path for the bf16 copies (the C++ kernels off);
- ``keep``: the attention's output kept for the flash backward, kernels still off;
- ``new``: both.

The ratios are medians over rounds of each round's step over that round's dense step.

    python -m benchmarks.bench_attention_output --model gpt2 --fraction 0.5 --rounds 15
"""

from __future__ import annotations

import statistics

from sparsify_fx.passes.activation_memory.modules import ActMemAttention
from sparsify_fx.passes.kernels import cpu as cpu_kernels

from benchmarks.bench_eager_ops import ab_rounds, one_plan, write_result
from benchmarks.device import timed_step

__all__ = ["main"]


def main(argv: list[str] | None = None) -> dict:
    args, model, fast, x, target, forms = one_plan(
        __doc__.splitlines()[0], "gpt2", "results/bench_attention_output.json", argv)
    kept = [m for m in fast.modules() if isinstance(m, ActMemAttention) and m.keeps_output]
    for_strided, for_tensors = cpu_kernels.for_strided, cpu_kernels.for_tensors

    def state(keep: bool, kernels: bool) -> None:
        for m in kept:
            m.keeps_output = keep
        cpu_kernels.for_strided = for_strided if kernels else (lambda t: None)
        cpu_kernels.for_tensors = for_tensors if kernels else (lambda *t, **k: None)

    def step(keep: bool, kernels: bool) -> float:
        state(keep, kernels)
        try:
            return timed_step(fast, x, target, "cpu", "off")
        finally:
            state(True, True)

    runs = {"dense": lambda: timed_step(model, x, target, "cpu", "off"), "old": lambda: step(False, False),
            "keep": lambda: step(True, False), "new": lambda: step(True, True)}
    times, ratio = ab_rounds(runs, args.rounds)
    result = {"model": args.model, "fraction": args.fraction, "forms": dict(forms),
              "attention_ops_keeping_output": len(kept), "times_s": times, "step_ratio_paired": ratio}
    print(f"{args.model} at {args.fraction} ({len(kept)} attention ops keep their output): step vs dense, "
          f"old {ratio['old']:.3f}, output kept {ratio['keep']:.3f}, + bf16 kernels {ratio['new']:.3f}; "
          f"dense {1e3 * statistics.median(times['dense']):.0f} ms")
    return write_result(args.out, result)


if __name__ == "__main__":
    main()
