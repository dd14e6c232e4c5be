"""MemoryBudget against per-block activation checkpointing (issue #10).

For each model, in one process and interleaved (one step of every configuration per round,
median of ``--repeats`` rounds after a warm-up round; "paired" is the median over rounds of
each round's step over that round's dense step; ``--block K``: K consecutive steps of each
configuration per round, timed by the median of the last K - 1, the steps that follow the same
model's step as in training):

* ``dense``: the model as is;
* ``checkpoint``: every repeated block wrapped in ``torch.utils.checkpoint`` (reentrant, so its
  saved inputs are visible to the saved-tensor counter; the non-reentrant variant holds the
  same tensors);
* ``budget F`` / ``budget F exact``: ``sfx.MemoryBudget(fraction=F, exact_only=...)`` for
  F in ``--fractions``, plus ``budget @ckpt exact``: the exact planner at checkpointing's own
  measured memory fraction (the issue's "at checkpointing's memory" comparison).

Memory is the bytes autograd holds for backward after the forward (storage-deduplicated,
parameters, buffers and the input batch left out: ``benchmarks.memory``); time is forward +
cross-entropy + backward. Prints a table and writes ``results/bench_budget.json``.

    python -m benchmarks.bench_budget                        # vit_b_16, resnet50, gpt2
    python -m benchmarks.bench_budget --models resnet50 --repeats 5 --fractions 0.5 0.25
    python -m benchmarks.bench_budget --repeats 7 --block 3 --fractions 0.5   # warm steps
    python -m benchmarks.bench_budget --amp bf16 --fractions 0.5 0.25 --no-exact   # bf16 autocast

Under ``--amp bf16`` the saved bytes are measured, and the budgets planned, inside
``torch.autocast``: dense is what autocast keeps, and the fraction is of that.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as ckpt
import torchvision

import sparsify_fx as sfx
from benchmarks.bench_memory import interleaved_times, paired_ratios
from benchmarks.device import (
    add_device_args,
    check_device,
    cuda_step_memory,
    autocast,
    device_meta,
    timed_step,
)
from benchmarks.memory import saved_tensor_bytes

__all__ = ["MODELS", "GPT", "checkpoint_blocks", "bench_model", "main"]


class _Block(nn.Module):
    """GPT-2 block: pre-LayerNorm causal self-attention and a 4x GELU MLP."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A GPT-2-style decoder (token + position embeddings, blocks, LM head)."""

    def __init__(self, vocab: int = 2048, d: int = 384, layers: int = 6, heads: int = 6, ctx: int = 256):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(_Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos.weight[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


#: name -> (factory, input factory, target factory (each given the batch size), the model's
#: repeated blocks, the default batch size: the CPU's)
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[int], torch.Tensor], Callable[[int], torch.Tensor], str, int]] = {
    "vit_b_16": (lambda: torchvision.models.vit_b_16(), lambda b: torch.randn(b, 3, 224, 224),
                 lambda b: torch.randint(0, 1000, (b,)), "encoder.layers", 4),
    "resnet50": (lambda: torchvision.models.resnet50(), lambda b: torch.randn(b, 3, 112, 112),
                 lambda b: torch.randint(0, 1000, (b,)), "layer1,layer2,layer3,layer4", 8),
    "gpt2": (lambda: GPT(), lambda b: torch.randint(0, 2048, (b, 256)),
             lambda b: torch.randint(0, 2048, (b * 256,)), "blocks", 4),
}


class _Checkpointed(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.inner(x)
        return ckpt.checkpoint(self.inner, x, use_reentrant=True)


def checkpoint_blocks(model: nn.Module, containers: str) -> nn.Module:
    """A copy of ``model`` (sharing parameters) whose blocks in ``containers`` are checkpointed."""
    copy = sfx.structural_copy(model)
    for name in containers.split(","):
        seq = copy.get_submodule(name)
        for i, block in enumerate(list(seq)):
            seq[i] = _Checkpointed(block)
    return copy


def bench_model(
    name: str, repeats: int, fractions: list[float], measure_steps: int = 0, *,
    device: str = "cpu", amp: str = "off", batch: int | None = None, block: int = 1, exact: bool = True,
) -> dict:
    """Measure dense, checkpointing and the budget plans on one model."""
    torch.manual_seed(0)
    factory, make_x, make_target, containers, default_batch = MODELS[name]
    batch = batch or default_batch
    model = factory().to(device)
    x, target = make_x(batch).to(device), make_target(batch).to(device)
    model.train()
    variants: dict[str, nn.Module] = {"dense": model, "checkpoint": checkpoint_blocks(model, containers)}
    # under --amp the bytes autocast keeps (bf16 copies of matmul inputs and weights), and the
    # budget planned inside the same autocast context (MemoryBudget.autocast="auto")
    with autocast(device, amp):
        saved = {k: saved_tensor_bytes(m, (x,), count_inputs=False) for k, m in variants.items()}
    ckpt_fraction = saved["checkpoint"] / saved["dense"]
    plans: dict[str, dict] = {}
    budgets = [(f"budget {f:g}", f, False) for f in fractions]
    if exact:
        budgets += [(f"budget {f:g} exact", f, True) for f in fractions]
        budgets.append(("budget @ckpt exact", round(ckpt_fraction, 4), True))
    for label, fraction, exact in budgets:
        start = time.perf_counter()
        config = sfx.MemoryBudget(fraction=fraction, exact_only=exact, measure_steps=measure_steps)
        with autocast(device, amp):
            fast = sfx.sparsify(model, config, example_inputs=(x,))
        plan = sfx.explain(fast).memory_budget
        plans[label] = {
            "fraction": fraction, "exact_only": exact, "planning_s": time.perf_counter() - start,
            "planned_fraction": plan["achieved_fraction"], "reachable": plan["reachable"],
            "estimated_added_s": plan["estimated_seconds"], "prices": plan["prices"],
            "choices": {u: d["choice"] for u, d in plan["units"].items()},
            "autocast": (plan.get("details") or {}).get("autocast"),
        }
        fast.train()
        variants[label] = fast
        with autocast(device, amp):
            saved[label] = saved_tensor_bytes(fast, (x,), count_inputs=False)
        print(f"  {label}: planned {plan['achieved_fraction']:.3f}, measured {saved[label] / saved['dense']:.3f}, "
              f"planning {plans[label]['planning_s']:.1f} s", flush=True)
    times = interleaved_times(variants, lambda m: timed_step(m, x, target, device, amp), repeats, block=block)
    step = {k: statistics.median(ts) for k, ts in times.items()}
    # on CUDA, the allocator's view too: the bytes really held between forward and backward
    # (whatever the saved-tensor count says) and the step's peak
    allocator = {k: cuda_step_memory(m, x, target, amp) for k, m in variants.items()} if device == "cuda" else {}
    return {
        "model": name,
        "input_shape": list(x.shape),
        "allocator": allocator,
        "saved_bytes": saved,
        "saved_ratio": {k: saved[k] / saved["dense"] for k in saved},
        "step_s": step,
        "step_s_all": times,
        "step_ratio": {k: step[k] / step["dense"] for k in step},
        "step_ratio_paired": paired_ratios(times),
        "plans": plans,
    }


def _table(rows: list[dict]) -> str:
    # the cost model's estimate of the added step time next to the measured one: where they
    # part, the plan was chosen on wrong prices
    lines = ["| model | config | budget | planned | held vs dense | step vs dense | paired | added ms, est. / measured "
             "| choices |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        for k in r["saved_bytes"]:
            plan = r["plans"].get(k)
            counts: dict[str, int] = {}
            for c in (plan or {}).get("choices", {}).values():
                counts[c] = counts.get(c, 0) + 1
            choices = ", ".join(f"{n} {c}" for c, n in sorted(counts.items()))
            budget = f"{plan['fraction']:.3f}" if plan else ""
            planned = f"{plan['planned_fraction']:.3f}" + ("" if plan["reachable"] else " (unreachable)") if plan else ""
            added = ""
            if plan and "estimated_added_s" in plan:
                measured = (r["step_s"][k] - r["step_s"]["dense"]) * 1e3
                added = f"{plan['estimated_added_s'] * 1e3:.0f} / {measured:.0f}"
            held = f"{r['saved_ratio'][k]:.3f}"
            if r.get("allocator"):  # CUDA: the saved-tensor count / the allocator's held bytes
                alloc = r["allocator"]
                held += f" / {alloc[k]['held_bytes'] / alloc['dense']['held_bytes']:.3f}"
            lines.append(f"| {r['model']} | {k} | {budget} | {planned} | {held} | "
                         f"{r['step_ratio'][k]:.2f} | {r['step_ratio_paired'][k]:.2f} | {added} | {choices} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.5, 0.25, 0.1])
    parser.add_argument("--measure-steps", type=int, default=0,
                        help="MemoryBudget.measure_steps: check the calibrated prices with whole-model steps")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: each model's CPU size)")
    parser.add_argument("--block", type=int, default=1,
                        help="consecutive steps of each configuration per round; > 1 times the warm ones")
    parser.add_argument("--no-exact", action="store_true",
                        help="leave out the exact_only plans and the plan at checkpointing's fraction")
    parser.add_argument("--out", default="results/bench_budget.json")
    add_device_args(parser)
    args = parser.parse_args(argv)
    check_device(args.device)
    if any(not 0 < f <= 1 or math.isnan(f) for f in args.fractions):
        parser.error("--fractions must be in (0, 1]")
    if args.block < 1:
        parser.error("--block must be >= 1")
    rows, start = [], time.perf_counter()
    for name in args.models:
        print(f"{name}:", flush=True)
        rows.append(bench_model(name, args.repeats, args.fractions, args.measure_steps,
                                device=args.device, amp=args.amp, batch=args.batch, block=args.block,
                                exact=not args.no_exact))
        print(f"{name}: done at {time.perf_counter() - start:.0f} s", flush=True)
    print(_table(rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "machine": platform.machine(), **device_meta(args.device, args.amp),
            "repeats": args.repeats, "block": args.block, "measure_steps": args.measure_steps, "wall_s": time.perf_counter() - start}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
