"""Benchmark of BlockSparseActivations on ResMLP: saved bytes and step time vs dense and DropIT.

For each ResMLP config it builds one model and, from it, the dense graph, BSR at every
``density x block_size``, BSR with ``block_size = 32`` plus :class:`sfx.ActivationMemory`
(GELU inputs and the Affine / LayerScale products saved in bf16: the whole-model recipe the
issue's target is about), and DropIT at ``keep = density`` (same kept fraction). Training steps
(forward + backward) of all variants are interleaved, ``--reps`` rounds, and the median is
reported, so a neighbour's load on the shared cores hits every variant alike. Printed as a
table and written to ``results/bench_block_sparse.json``.

    python -m benchmarks.bench_block_sparse                  # small ResMLP, ~1-2 min on 2 cores
    python -m benchmarks.bench_block_sparse --config both    # + ResMLP-12, 224x224, batch 4
    python -m benchmarks.bench_block_sparse --config resmlp12 --reps 0   # bytes only, fast
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
from pathlib import Path

import torch
import torch.nn as nn

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

__all__ = ["CONFIGS", "run_config", "main"]

_ROOT = Path(__file__).resolve().parent.parent

#: name -> (ResMLP factory kwargs, batch size)
CONFIGS: dict[str, tuple[dict, int]] = {
    "small": ({"depth": 4, "dim": 128, "image_size": 64, "patch": 8}, 8),
    "resmlp12": ({"depth": 12, "dim": 384, "image_size": 224, "patch": 16}, 4),
}
DENSITIES = (0.25, 0.5, 0.75)
BLOCKS = (16, 32, 64)


def _resmlp_factory():
    # examples/ is not a package: load the file by path rather than editing sys.path
    spec = importlib.util.spec_from_file_location("resmlp_example", _ROOT / "examples" / "resmlp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.resmlp


def run_config(name: str, reps: int, *, device: str = "cpu", amp: str = "off", batch: int | None = None) -> list[dict]:
    """Measure every variant of one ResMLP config; one dict per variant."""
    kwargs, default_batch = CONFIGS[name]
    batch = batch or default_batch
    torch.manual_seed(0)
    model = _resmlp_factory()(**kwargs).train().to(device)
    size = kwargs["image_size"]
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    step = lambda m: timed_step(m, images, labels, device, amp)  # noqa: E731

    variants: dict[str, tuple[nn.Module, dict]] = {"dense": (model, {"method": "dense"})}
    for density in DENSITIES:
        for block in BLOCKS:
            config = sfx.BlockSparseActivations(block_size=block, density=density)
            variants[f"bsr d={density} b={block}"] = (
                sfx.sparsify(model, config, example_inputs=(images,), verify=False),
                {"method": "bsr", "density": density, "block_size": block},
            )
        variants[f"bsr d={density} b=32+actmem"] = (
            sfx.sparsify(model, [sfx.BlockSparseActivations(block_size=32, density=density),
                                 sfx.ActivationMemory()], example_inputs=(images,), verify=False),
            {"method": "bsr+actmem", "density": density, "block_size": 32},
        )
        variants[f"dropit keep={density}"] = (
            sfx.sparsify(model, sfx.DropIT(keep=density), example_inputs=(images,), verify=False),
            {"method": "dropit", "density": density},
        )

    rows = []
    for label, (module, info) in variants.items():
        module.train()
        row = {"config": name, "variant": label, **info}
        with autocast(device, amp):
            row["saved_bytes"] = saved_tensor_bytes(module, (images,), count_inputs=False)
        if device == "cuda":
            row["cuda"] = cuda_step_memory(module, images, labels, amp)
        if module is not model:
            # the dense layers' saved inputs only (ActivationMemory's rewrites are not layers)
            layers = [r for r in sfx.explain(module).rewrites if r.pass_name != "actmem"]
            row["layers_rewritten"] = len(layers)
            row["layer_bytes_before"] = sum(r.saved_bytes_before or 0 for r in layers)
            row["layer_bytes_after"] = sum(r.saved_bytes_after or 0 for r in layers)
            row["index_bytes"] = sum(r.details.get("index_bytes", 0) for r in layers)
        rows.append(row)
        if reps:
            step(module)  # warm-up (allocator, lazy init, Triton compilation)

    times: dict[str, list[float]] = {label: [] for label in variants}
    for _ in range(reps):
        for label, (module, _) in variants.items():
            times[label].append(step(module))
    dense_time = statistics.median(times["dense"]) if reps else None
    dense_bytes = rows[0]["saved_bytes"]
    for row in rows:
        row["step_s"] = statistics.median(times[row["variant"]]) if reps else None
        row["step_ratio"] = row["step_s"] / dense_time if reps else None
        row["memory_ratio"] = row["saved_bytes"] / dense_bytes
        if "cuda" in row:
            row["held_ratio"] = row["cuda"]["held_bytes"] / rows[0]["cuda"]["held_bytes"]
        if "layer_bytes_before" in row and row["layer_bytes_before"]:
            row["layer_compression"] = row["layer_bytes_after"] / row["layer_bytes_before"]
    return rows


def _table(rows: list[dict]) -> str:
    head = f"{'config':<9} {'variant':<23} {'saved MiB':>9} {'mem/dense':>9} {'held/dense':>10} {'layers after/before':>19} {'index KiB':>9} {'step s':>7} {'time/dense':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        comp = f"{r['layer_compression']:.3f}" if "layer_compression" in r else "-"
        index = f"{r['index_bytes'] / 1024:.1f}" if "index_bytes" in r else "-"
        step = f"{r['step_s']:>7.3f} {r['step_ratio']:>10.2f}" if r["step_s"] is not None else f"{'-':>7} {'-':>10}"
        lines.append(
            f"{r['config']:<9} {r['variant']:<23} {r['saved_bytes'] / 2**20:>9.2f} {r['memory_ratio']:>9.3f} "
            f"{r.get('held_ratio', float('nan')):>10.3f} "
            f"{comp:>19} {index:>9} {step}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=[*CONFIGS, "both"], default="small")
    parser.add_argument("--reps", type=int, default=7, help="interleaved rounds; the median is reported (0: bytes only, no timing)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the config's)")
    parser.add_argument("--out", type=Path, default=_ROOT / "results" / "bench_block_sparse.json")
    add_device_args(parser)
    args = parser.parse_args(argv)
    check_device(args.device)
    torch.set_num_threads(args.threads)

    names = list(CONFIGS) if args.config == "both" else [args.config]
    rows = []
    for name in names:
        rows += run_config(name, args.reps, device=args.device, amp=args.amp, batch=args.batch)
        print(_table([r for r in rows if r["config"] == name]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, **device_meta(args.device, args.amp), "reps": args.reps,
            "batch": args.batch, "configs": {n: CONFIGS[n] for n in names}}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
