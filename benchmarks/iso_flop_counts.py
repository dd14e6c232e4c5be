"""Counted FLOPs, nonzero weights and dense-kernel cost of each IsoFLOP kind vs dense.

    python benchmarks/iso_flop_counts.py      # prints the markdown table used in docs/iso_flop.md

Totals are over the rewritten layers (first/last layers stay dense and are not counted).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

import sparsify_fx as sfx

__all__ = ["count_rows"]


def _models() -> dict[str, tuple[nn.Module, tuple[torch.Tensor]]]:
    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
        nn.Linear(256, 10),
    )
    return {
        "resnet18 (32x32, batch 1)": (torchvision.models.resnet18(num_classes=10), (torch.randn(1, 3, 32, 32),)),
        "MLP 64-256-256-256-10 (batch 64)": (mlp, (torch.randn(64, 64),)),
        "small ViT (vit_b_16 at 32x32, 4 layers, batch 1)": (
            torchvision.models.VisionTransformer(32, 16, num_layers=4, num_heads=4, hidden_dim=128,
                                                 mlp_dim=512, num_classes=10),
            (torch.randn(1, 3, 32, 32),),
        ),
    }


def count_rows() -> list[str]:
    rows = [
        "| model | kind | s | layers | counted FLOPs / dense | nonzero weights / dense | dense-kernel FLOPs / dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, (model, x) in _models().items():
        for kind in ("parallel", "wide", "factorized", "doped"):
            for s in (0.5, 0.75, 0.9):
                fast = sfx.sparsify(model, sfx.IsoFLOP(kind=kind, sparsity=s, init="random"), example_inputs=x, verify=False)
                rw = sfx.explain(fast).rewrites
                fb = sum(r.flops_before for r in rw)
                fa = sum(r.flops_after for r in rw)
                nb = sum(r.details["nnz_before"] for r in rw)
                na = sum(r.details["nnz_after"] for r in rw)
                dk = sum(r.details["dense_kernel_flops"] for r in rw)
                rows.append(f"| {name} | {kind} | {s} | {len(rw)} | {fa / fb:.4f} | {na / nb:.4f} | {dk / fb:.2f} |")
    return rows


if __name__ == "__main__":
    print("\n".join(count_rows()))
