"""Accuracy of dense vs each IsoFLOP kind, same training budget, on scikit-learn's digits.

    python benchmarks/bench_iso_flop.py [--epochs 40] [--seeds 0 1]

An MLP 64-256-256-256-10 (the two inner 256x256 layers are rewritten; first and last stay
dense), Adam, random init (the paper's setting) with RigL mask updates. Prints a markdown
table: mean +- std test accuracy over seeds, and counted FLOPs of the rewritten layers.
Needs scikit-learn (the `dev` extra). About two minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from sparsify_fx.passes.iso_flop import RigL

import sparsify_fx as sfx

__all__ = ["train_and_eval", "main"]


def _data(seed: int) -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    return x_tr, x_te, y_tr, y_te


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
        nn.Linear(256, 10),
    )


def train_and_eval(kind: str | None, sparsity: float, seed: int, epochs: int, batch: int = 64) -> tuple[float, int | None]:
    """Test accuracy after ``epochs`` of Adam; ``kind=None`` trains the dense MLP."""
    x_tr, x_te, y_tr, y_te = _data(seed)
    model = _mlp(seed)
    flops = None
    if kind is not None:
        config = sfx.IsoFLOP(kind=kind, sparsity=sparsity, init="random", seed=seed)
        model = sfx.sparsify(model, config, example_inputs=(x_tr[:batch],), verify=False)
        flops = sum(r.flops_after for r in sfx.explain(model).rewrites)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = epochs * ((len(x_tr) + batch - 1) // batch)
    rigl = RigL(model, update_every=25, total_steps=steps, optimizer=opt) if kind is not None else None
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x_tr), generator=gen)
        for i in range(0, len(x_tr), batch):
            idx = order[i : i + batch]
            opt.zero_grad()
            F.cross_entropy(model(x_tr[idx]), y_tr[idx]).backward()
            opt.step()
            if rigl is not None:
                rigl.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_te).argmax(-1) == y_te).float().mean().item()
    return accuracy, flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.time()
    runs: list[tuple[str | None, float]] = [(None, 0.0)]
    runs += [(k, s) for s in (0.5, 0.75) for k in ("parallel", "wide", "factorized", "doped")]
    dense_flops = None
    print("| model | s | test accuracy (mean +- std) | counted FLOPs of rewritten layers / dense |")
    print("|---|---|---|---|")
    for kind, s in runs:
        results = [train_and_eval(kind, s, seed, args.epochs) for seed in args.seeds]
        accs = [a * 100 for a, _ in results]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        if kind is None:
            dense_flops = 2 * 64 * 256 * 256 * 2  # the two inner layers at batch 64
        ratio = "1.0000" if kind is None else f"{results[0][1] / dense_flops:.4f}"
        print(f"| {kind or 'dense'} | {s if kind else '-'} | {statistics.mean(accs):.2f} +- {std:.2f} | {ratio} |", flush=True)
    print(f"\n{len(runs) * len(args.seeds)} runs, {args.epochs} epochs each, {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
