"""Accuracy parity: dense vs each recipe, same training budget, on scikit-learn's digits.

    python -m benchmarks.bench_accuracy [--epochs 30] [--seeds 0 1 2] [--recipes R ...]

Small models on the bundled 8x8 digits (1797 images, 25% held out, stratified): an MLP
64-256-256-256-10 and a CNN (conv-BN-ReLU x2, pool, linear) by default; ``--models vit`` adds a
tiny ViT (2x2 patches, 2 layers, width 64) for the attention forms
(``--recipes "dropit:keep=0.1+actmem:attention=bf16"``). Each recipe is trained with the
same optimizer, steps and data order as dense, per seed; the table gives mean +- std test
accuracy and the difference to dense. Writes ``results/bench_accuracy.json``. Not a CI test:
about a minute on two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsify_fx as sfx

__all__ = ["DEFAULT_RECIPES", "train_and_eval", "main"]

DEFAULT_RECIPES = ["dropit:keep=0.1+actmem", "bsr:density=0.5,block_size=16", "sliceout:p=0.25"]


def _data(seed: int) -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    return tuple(train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y))


class _Gray2RGB(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, 3, -1, -1)


def _model(kind: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "vit":
        import torchvision

        vit = torchvision.models.VisionTransformer(image_size=8, patch_size=2, num_layers=2, num_heads=4,
                                                   hidden_dim=64, mlp_dim=128, num_classes=10)
        return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), _Gray2RGB(), vit)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                             nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(256, 10),
    )


def train_and_eval(model_kind: str, recipe: str | None, seed: int, epochs: int, batch: int = 64) -> float:
    """Test accuracy after ``epochs`` of Adam; ``recipe=None`` trains the dense model."""
    x_tr, x_te, y_tr, y_te = _data(seed)
    model = _model(model_kind, seed)
    if recipe is not None:
        model = sfx.sparsify(model, recipe, example_inputs=(x_tr[:batch],))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x_tr), generator=gen)
        for i in range(0, len(x_tr), batch):
            idx = order[i:i + batch]
            opt.zero_grad()
            F.cross_entropy(model(x_tr[idx]), y_tr[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return (model(x_te).argmax(-1) == y_te).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES)
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn", "vit"])
    parser.add_argument("--out", default="results/bench_accuracy.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    print("| model | recipe | test accuracy % (mean +- std) | vs dense (points) |")
    print("|---|---|---:|---:|")
    for model_kind in args.models:
        dense = [train_and_eval(model_kind, None, s, args.epochs) for s in args.seeds]
        for recipe in [None, *args.recipes]:
            accs = dense if recipe is None else [
                train_and_eval(model_kind, recipe, s, args.epochs) for s in args.seeds]
            mean = 100 * statistics.mean(accs)
            std = 100 * statistics.pstdev(accs)
            delta = mean - 100 * statistics.mean(dense)
            rows.append({"model": model_kind, "recipe": recipe or "dense", "accuracies": accs,
                         "mean": mean, "std": std, "delta_points": delta})
            print(f"| {model_kind} | {recipe or 'dense'} | {mean:.2f} +- {std:.2f} | {delta:+.2f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"epochs": args.epochs, "seeds": args.seeds, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
