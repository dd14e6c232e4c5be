"""The in-place residual add and 1-bit ReLU, A/B on one plan, interleaved in one process.

``old``: the state before them: ``out += identity`` traced as an out-of-place ``add`` (a new
tensor per residual block) and the rewritten in-place ReLU run out of place. ``new``: the
capture records ``+=`` in place and ``nn.ReLU(inplace=True)`` stays in place on the eager path.
Each round times, back to back: the dense model; its capture alone (no rewrite), old and new;
the plan (``MemoryBudget(fraction=F)``, built once), old and new. The ratios are medians over
rounds of each round's step over that round's dense step.

    python -m benchmarks.bench_in_place --model resnet50 --fraction 0.5 --rounds 15
"""

from __future__ import annotations

import operator
import statistics

import torch.fx as fx
from sparsify_fx.passes.activation_memory.modules import ActMemReLU

import sparsify_fx as sfx
from benchmarks.bench_eager_ops import ab_rounds, one_plan, write_result
from benchmarks.bench_memory import paired_ratios
from benchmarks.device import timed_step

__all__ = ["main", "InPlaceSwitch"]


class InPlaceSwitch:
    """Switches one GraphModule between the out-of-place state (its residual ``+=`` as
    ``+``, its in-place rewritten ReLUs run out of place) and the in-place one; recompiles only on a
    change, outside the timed step."""

    def __init__(self, gm: fx.GraphModule):
        self.gm, self.new = gm, True
        self.adds = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.iadd]
        self.relus = [m for m in gm.modules() if isinstance(m, ActMemReLU) and m.inplace]

    def set(self, new: bool) -> None:
        if new == self.new:
            return
        for n in self.adds:
            n.target = operator.iadd if new else operator.add
        self.gm.recompile()
        for m in self.relus:
            m.inplace = new
        self.new = new


def main(argv: list[str] | None = None) -> dict:
    args, model, fast, x, target, forms = one_plan(
        __doc__.splitlines()[0], "resnet50", "results/bench_in_place.json", argv)
    captured = sfx.capture(model).graph_module.train()
    switches = {"capture": InPlaceSwitch(captured), "plan": InPlaceSwitch(fast)}
    n_adds = {k: len(sw.adds) for k, sw in switches.items()}

    def step(which: str, new: bool) -> float:
        switches[which].set(new)
        return timed_step(switches[which].gm, x, target, "cpu", "off")

    runs = {"dense": lambda: timed_step(model, x, target, "cpu", "off"),
            "capture old": lambda: step("capture", False), "capture new": lambda: step("capture", True),
            "plan old": lambda: step("plan", False), "plan new": lambda: step("plan", True)}
    times, ratio = ab_rounds(runs, args.rounds)
    result = {"model": args.model, "fraction": args.fraction, "forms": dict(forms), "in_place_adds": n_adds,
              "times_s": times, "step_ratio_paired": ratio,
              "plan_new_over_old": paired_ratios(times, base="plan old")["plan new"]}
    print(f"{args.model} ({n_adds['plan']} residual adds): step vs dense, capture alone old {ratio['capture old']:.3f}"
          f" new {ratio['capture new']:.3f}; budget {args.fraction} old {ratio['plan old']:.3f} new "
          f"{ratio['plan new']:.3f}; dense {1e3 * statistics.median(times['dense']):.0f} ms")
    return write_result(args.out, result)


if __name__ == "__main__":
    main()
