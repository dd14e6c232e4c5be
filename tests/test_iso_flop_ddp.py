"""IsoFLOP masks and RigL under DDP: two CPU processes (gloo) stay identical."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn as nn
from test_distributed import run_workers

import sparsify_fx as sfx


def _worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    from sparsify_fx.passes.iso_flop import RigL, masked_weights

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same model on every rank
        model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                              nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
        fast = sfx.sparsify(model, sfx.IsoFLOP(kind="doped", sparsity=0.75, init="random"), verify=False)
        # the replaced dense weights stay in the model unused (their state_dict keys survive),
        # so DDP must be told that some parameters get no gradient
        ddp = nn.parallel.DistributedDataParallel(fast, find_unused_parameters=True)
        opt = torch.optim.SGD(fast.parameters(), lr=0.1)
        rigl = RigL(fast, drop_fraction=0.5, update_every=1, total_steps=20, optimizer=opt)
        g = torch.Generator().manual_seed(100 + rank)  # different data on every rank
        for _ in range(4):
            opt.zero_grad()
            ddp(torch.randn(16, 8, generator=g)).pow(2).mean().backward()
            opt.step()
            rigl.step()
        masks = torch.cat([m.mask.flatten().float() for _, m in masked_weights(fast)])
        weights = torch.cat([p.detach().flatten() for p in fast.parameters()])
        gathered_masks = [torch.zeros_like(masks) for _ in range(world)]
        gathered_weights = [torch.zeros_like(weights) for _ in range(world)]
        dist.all_gather(gathered_masks, masks)
        dist.all_gather(gathered_weights, weights)
        if rank == 0:
            torch.save({"masks": gathered_masks, "weights": gathered_weights,
                        "updates": rigl.updates}, out_file)
        dist.barrier()  # no rank tears gloo down while the other still communicates
    finally:
        dist.destroy_process_group()
    # gloo's threads can abort ("terminate called without an active exception") in the
    # interpreter's own teardown; the work is done and checked, so leave without it
    os._exit(0)


def test_rigl_masks_and_parameters_identical_across_ddp_ranks(tmp_path):
    out = tmp_path / "result.pt"
    run_workers(_worker, str(tmp_path / "init"), str(out))  # 2 ranks, fails after 120 s
    result = torch.load(out)
    assert result["updates"] == 4
    masks, weights = result["masks"], result["weights"]
    torch.testing.assert_close(masks[0], masks[1], rtol=0, atol=0)
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=0)
    assert 0 < masks[0].mean() < 1  # really sparse
