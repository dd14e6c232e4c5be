"""IsoFLOP under DDP: two CPU processes (gloo), plain DDP (no find_unused_parameters), the
masks evolving by the built-in RigL schedule, stay identical on both ranks."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from test_distributed import run_workers

import sparsify_fx as sfx


def _model() -> nn.Module:
    torch.manual_seed(0)  # same model on every rank
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16),
        nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2),
    )


def _worker(rank: int, world: int, init_file: str, out_file: str, kind: str) -> None:
    from sparsify_fx.passes.iso_flop import masked_weights

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _model()
        config = sfx.IsoFLOP(kind=kind, sparsity=0.75, update_every=2, drop_fraction=0.5)
        fast = sfx.sparsify(model, config, example_inputs=(torch.randn(2, 3, 8, 8),))
        initial = torch.cat([m.mask.flatten().float() for _, m in masked_weights(fast)])
        # every parameter, the replaced dense weights included, takes part in the loss
        ddp = nn.parallel.DistributedDataParallel(fast)
        opt = torch.optim.SGD(fast.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(100 + rank)  # different data on every rank
        for _ in range(7):  # updates at the forwards after steps 2, 4, 6
            opt.zero_grad()
            ddp(torch.randn(4, 3, 8, 8, generator=g)).pow(2).mean().backward()
            opt.step()
        masks = torch.cat([m.mask.flatten().float() for _, m in masked_weights(fast)])
        weights = torch.cat([p.detach().flatten() for p in fast.parameters()])
        steps = torch.tensor([float(m.rigl_step) for _, m in masked_weights(fast)])
        gathered = {}
        for name, t in (("masks", masks), ("weights", weights), ("steps", steps)):
            gathered[name] = [torch.zeros_like(t) for _ in range(world)]
            dist.all_gather(gathered[name], t)
        if rank == 0:
            torch.save({**gathered, "initial": initial}, out_file)
        dist.barrier()  # no rank tears gloo down while the other still communicates
    finally:
        dist.destroy_process_group()
    # gloo's threads can abort ("terminate called without an active exception") in the
    # interpreter's own teardown; the work is done and checked, so leave without it
    os._exit(0)


@pytest.mark.parametrize("kind", ["parallel", "wide", "factorized", "doped"])
def test_default_rigl_identical_across_plain_ddp_ranks(tmp_path, kind):
    out = tmp_path / "result.pt"
    run_workers(_worker, str(tmp_path / "init"), str(out), kind)  # 2 ranks, fails after 120 s
    result = torch.load(out)
    masks, weights, steps = result["masks"], result["weights"], result["steps"]
    torch.testing.assert_close(masks[0], masks[1], rtol=0, atol=0)
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=0)
    assert torch.all(steps[0] == 7) and torch.equal(steps[0], steps[1])
    assert not torch.equal(masks[0], result["initial"]), "the masks never evolved"
    assert 0 < masks[0].mean() < 1  # really sparse
