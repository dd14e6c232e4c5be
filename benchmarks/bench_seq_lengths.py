"""Variable sequence length: does the rewrite's saving hold on every step?

Hugging Face BERT and GPT-2 (small configs, random init) are sparsified once at length 16 and
trained at 12 lengths (16, 18, ... 38), as dynamic padding does. Both are captured by Dynamo
(their attention dropout differs between train and eval). Per length, after one warm-up step
(a new length may compile a graph first):

* ``ratio``: bytes autograd holds for backward after the model's forward, rewritten / dense,
  measured in the same process (``sfx.bench.saved_tensor_bytes`` with a loss that keeps
  nothing, so the figure is the model's, as the plan's is);
* ``planned``: the memory plan's held bytes after / before for the newest training graph
  (``sfx.explain(...).held_bytes_after / held_bytes_before``); also
  ``planned_at_length`` (fixed recipes): the plan of the model sparsified at that length (the dense model
  holds parts that do not grow with the length, autocast's weight casts, and attention scores
  that grow with its square where they are kept, so a ratio moves with the length).
  A budget's graph with a dynamic length is re-planned as the length grows (by 1.25x): its
  ``planned`` is the plan the step ran;
* ``graphs`` and ``dense calls``: graphs Dynamo captured so far, and calls that ran the
  un-rewritten model (Dynamo gave up re-capturing).

fp32 and ``--amp bf16`` (the forward under CPU autocast). Memory only: no timing.

    python -m benchmarks.bench_seq_lengths                     # fp32 and bf16, both models
    python -m benchmarks.bench_seq_lengths --models bert --amp fp32
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

import sparsify_fx as sfx
from sparsify_fx.bench import saved_tensor_bytes

__all__ = ["MODELS", "RECIPES", "LENGTHS", "run", "main"]

LENGTHS = tuple(range(16, 40, 2))
RECIPES = ("dropit:keep=0.1+actmem", "budget:fraction=0.5")


def _bert() -> nn.Module:
    import transformers as tf

    return tf.BertModel(tf.BertConfig(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=512, max_position_embeddings=64))


def _gpt2() -> nn.Module:
    import transformers as tf

    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=512, n_embd=128, n_layer=2, n_head=4, n_positions=64,
                                            bos_token_id=0, eos_token_id=0))


MODELS = {"bert": _bert, "gpt2": _gpt2}


def _inputs(name: str, length: int) -> tuple[tuple, dict]:
    ids = torch.randint(0, 512, (4, length), generator=torch.Generator().manual_seed(length))
    if name == "bert":
        return (ids,), {"attention_mask": torch.ones_like(ids)}
    return (ids,), {}


def _sum_loss(output) -> torch.Tensor:
    """A loss whose backward keeps nothing (a cast and a sum): the bytes measured are the model's."""
    leaves = [t for t in torch.utils._pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return sum(t.float().sum() for t in leaves)


def _planned(report: sfx.ExplainReport) -> float | None:
    b0, b1 = report.held_bytes_before, report.held_bytes_after
    return b1 / b0 if b0 and b1 is not None else None


def _planned_at(model: nn.Module, recipe: str, args: tuple, kwargs: dict, cast) -> float | None:
    """The memory plan of a model sparsified at this length (what a plan made here expects)."""
    with cast(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = sfx.sparsify(model, recipe, example_inputs=args, example_kwargs=kwargs, verify=False)
        saved_tensor_bytes(fresh, args, kwargs, _sum_loss)  # the training graph, made on first use
    return _planned(sfx.explain(fresh))


def run(name: str, recipe: str, amp: str) -> dict:
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = MODELS[name]()
    cast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if amp == "bf16" else contextlib.nullcontext
    args, kwargs = _inputs(name, LENGTHS[0])
    with cast(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = sfx.sparsify(model, recipe, example_inputs=args, example_kwargs=kwargs)
    rows = []
    for length in LENGTHS:
        args, kwargs = _inputs(name, length)
        # one autocast context per step: autocast caches weight casts until its outermost
        # context exits, and the two models share their weights
        with cast():
            saved_tensor_bytes(fast, args, kwargs, _sum_loss)  # warm-up: compiles (and plans) a new graph
        with cast():
            dense = saved_tensor_bytes(model, args, kwargs, _sum_loss)
        with cast():
            rewritten = saved_tensor_bytes(fast, args, kwargs, _sum_loss)
        report = sfx.explain(fast)
        rows.append({"length": length, "dense_bytes": dense, "rewritten_bytes": rewritten,
                     "ratio": rewritten / dense, "planned": _planned(report),
                     "graphs": len(fast.graphs), "dense_calls": report.dense_fallback_calls})
        print(f"  {name} {amp} {recipe:28s} L={length:2d} " + " ".join(
            f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[-1].items()
            if k in ("ratio", "planned", "graphs", "dense_calls")), flush=True)
    capture = sfx.explain(fast).capture_method
    # after the loop: sparsifying another copy resets Dynamo's caches, which would make the
    # measured model re-capture its graphs
    for row in rows:
        args, kwargs = _inputs(name, row["length"])
        # (a budget re-plans its own graph as the length grows: its "planned" is that plan)
        row["planned_at_length"] = None if recipe.startswith("budget") else _planned_at(model, recipe, args, kwargs, cast)
    return {"model": name, "recipe": recipe, "amp": amp, "capture": capture, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--amp", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="results/bench_seq_lengths.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = [run(m, r, a) for a in args.amp for m in args.models for r in args.recipes]
    print("\n| model | amp | recipe | measured / dense, 12 lengths | planned (graphs made) | "
          "worst measured vs plan | graphs | dense calls |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        ratios = [row["ratio"] for row in r["rows"]]
        planned = sorted({round(row["planned"], 3) for row in r["rows"] if row["planned"] is not None})
        # against the plan made at that length where there is one, else the graph's own plan
        refs = [(row["ratio"], row["planned_at_length"] or row["planned"]) for row in r["rows"]]
        worst = max((abs(m / p - 1) for m, p in refs if p), default=float("nan"))
        print(f"| {r['model']} | {r['amp']} | `{r['recipe']}` | {min(ratios):.3f}-{max(ratios):.3f} | "
              f"{', '.join(f'{p:.3f}' for p in planned) or '-'} | {worst:.1%} | "
              f"{r['rows'][-1]['graphs']} | {r['rows'][-1]['dense_calls']} |")
    meta = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.processor()
            or platform.machine(), "threads": args.threads, "date": time.strftime("%Y-%m-%d")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
