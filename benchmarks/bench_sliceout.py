"""CPU benchmark of SliceOut: training-step time and saved-activation bytes, dense vs sliced.

For each model, the dense graph and SliceOut at every ``p`` are built from the same model
(same parameters), and their training steps (forward + backward) are interleaved
(dense, p=0.25, p=0.5, dense, ...) for ``--reps`` rounds; the median is reported, so a
neighbour's load on shared cores hits every variant alike. Saved bytes are what autograd
holds after the forward (storage-deduplicated, parameters excluded). Printed as a table and
written to ``results/bench_sliceout.json``.

    python -m benchmarks.bench_sliceout                       # MLP + ViT-B/16 @64px, ~1-2 min
    python -m benchmarks.bench_sliceout --models mlp,vit_b_16,resnet50,wide_resnet50_2
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn as nn

import sparsify_fx as sfx
from sparsify_fx.bench import compare_training_step

__all__ = ["MODELS", "build", "run_model", "main"]

_ROOT = Path(__file__).resolve().parent.parent
PS = (0.25, 0.5)


def _mlp() -> nn.Module:
    # five Linears: with skip_first_last the two inner 1024x1024 groups are sliced
    return nn.Sequential(
        nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
        nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10),
    )


def _torchvision(name: str, **kwargs) -> nn.Module:
    import torchvision  # optional heavy import, only when a torchvision model is benchmarked

    return getattr(torchvision.models, name)(**kwargs)


#: name -> (factory, example input shape)
MODELS = {
    "mlp": (_mlp, (256, 256)),
    "vit_b_16": (lambda: _torchvision("vit_b_16", image_size=64, num_classes=10), (8, 3, 64, 64)),
    "vit_b_16_224": (lambda: _torchvision("vit_b_16", num_classes=10), (2, 3, 224, 224)),
    "resnet50": (lambda: _torchvision("resnet50", num_classes=10), (8, 3, 64, 64)),
    "wide_resnet50_2": (lambda: _torchvision("wide_resnet50_2", num_classes=10), (4, 3, 64, 64)),
}


def build(name: str) -> tuple[dict[str, nn.Module], tuple, dict]:
    """The dense graph and SliceOut at each p for one model, plus what was sliced."""
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    model = factory()
    x = torch.randn(*shape)
    variants = {"dense": sfx.capture(model, example_inputs=(x,)).graph_module}
    sliced: dict = {}
    for p in PS:
        fast = sfx.sparsify(model, sfx.SliceOut(p=p), example_inputs=(x,))
        variants[f"p={p}"] = fast
        rewrites = sfx.explain(fast).rewrites
        sliced[f"p={p}"] = {
            "groups": len(rewrites),
            "heads_groups": sum(r.op == "slice_group[heads]" for r in rewrites),
            "verified": fast.sfx_record.verification.ok,
        }
    return variants, (x,), sliced


def run_model(name: str, reps: int) -> dict:
    t0 = time.perf_counter()
    variants, inputs, sliced = build(name)
    measures = compare_training_step(variants, inputs, repeats=reps, warmup=1)
    dense = next(m for m in measures if m.name == "dense")
    rows = []
    for m in measures:
        rows.append({
            "variant": m.name,
            "step_ms": 1e3 * m.step_seconds,
            "min_ms": 1e3 * min(m.times),
            "times_ms": [1e3 * t for t in m.times],
            "speedup": dense.step_seconds / m.step_seconds,
            "saved_mb": m.saved_bytes / 2**20,
            "saved_vs_dense": m.saved_bytes / dense.saved_bytes if dense.saved_bytes else None,
            **sliced.get(m.name, {}),
        })
    return {"model": name, "input": list(inputs[0].shape), "rows": rows,
            "wall_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,vit_b_16", help=f"comma list of {sorted(MODELS)}")
    parser.add_argument("--reps", type=int, default=7, help="interleaved rounds (median reported)")
    parser.add_argument("--out", default=str(_ROOT / "results" / "bench_sliceout.json"))
    args = parser.parse_args(argv)
    results = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "device": "cpu"},
        "reps": args.reps,
        "note": "shared CPU; medians of interleaved steps, noisy",
        "models": [],
    }
    print(f"{'model':<18}{'variant':<10}{'step ms':>10}{'min ms':>9}{'speedup':>9}{'saved MB':>10}{'saved/dense':>12}{'groups':>8}")
    for name in args.models.split(","):
        entry = run_model(name.strip(), args.reps)
        results["models"].append(entry)
        for row in entry["rows"]:
            ratio = f"{row['saved_vs_dense']:.2f}" if row["saved_vs_dense"] else "-"
            print(f"{name:<18}{row['variant']:<10}{row['step_ms']:>10.1f}{row['min_ms']:>9.1f}{row['speedup']:>9.2f}"
                  f"{row['saved_mb']:>10.1f}{ratio:>12}{row.get('groups', '-'):>8}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
