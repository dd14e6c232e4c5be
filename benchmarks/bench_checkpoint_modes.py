"""Reentrant against non-reentrant ``torch.utils.checkpoint`` on ResNet-50's 16 blocks.

``MemoryBudget``'s recompute segments are reentrant (a nested backward per segment, like
``use_reentrant=True``). This measures what the non-reentrant form (saved-tensor hooks, no
nested engine) saves on the same blocks: each round times dense, reentrant and non-reentrant
back to back; ratios are medians over rounds of each round's step over its dense step.

    python -m benchmarks.bench_checkpoint_modes --rounds 9
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as ckpt
import torchvision

from benchmarks.bench_memory import interleaved_times, paired_ratios

__all__ = ["main"]


class _Blocks(nn.Module):
    """ResNet-50's forward with each bottleneck block checkpointed (``reentrant`` None: dense)."""

    def __init__(self, model: nn.Module, reentrant: bool | None):
        super().__init__()
        self.model, self.reentrant = model, reentrant

    def forward(self, x):
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
            for block in layer:
                x = block(x) if self.reentrant is None else ckpt.checkpoint(block, x, use_reentrant=self.reentrant)
        return m.fc(torch.flatten(m.avgpool(x), 1))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", default="results/bench_checkpoint_modes.json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = torchvision.models.resnet50().train()
    x, target = torch.randn(args.batch, 3, 112, 112), torch.randint(0, 1000, (args.batch,))
    variants = {"dense": _Blocks(model, None), "reentrant": _Blocks(model, True), "non-reentrant": _Blocks(model, False)}

    def step(m: nn.Module) -> float:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        F.cross_entropy(m(x), target).backward()
        return time.perf_counter() - start

    times = interleaved_times(variants, step, args.rounds, warmup=2)
    paired = paired_ratios(times)
    for k in variants:
        print(f"{k:14s} {1e3 * statistics.median(times[k]):7.1f} ms  paired {paired[k]:.3f}")
    result = {"batch": args.batch, "times_s": times, "step_ratio_paired": paired}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
