"""DDP and FSDP2 (``fully_shard``) training of rewritten models: two CPU processes (gloo).

Each test spawns two workers with a hard time limit; rank 0 writes what both ranks
all-gathered, the test process checks it. Workers end with a barrier, destroy the process
group, and ``os._exit(0)`` (gloo's threads can abort in the interpreter's teardown; see
tests/test_iso_flop_ddp.py).
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import sparsify_fx as sfx

WORLD = 2
TIMEOUT_S = 120


def run_workers(fn, *args, timeout: float = TIMEOUT_S) -> None:
    """Spawn ``WORLD`` processes running ``fn(rank, WORLD, *args)``; fail if any fails or hangs."""
    context = mp.start_processes(fn, args=(WORLD, *args), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in context.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"distributed workers did not finish within {timeout:.0f} s")


def _model(bn: bool = True) -> nn.Module:
    torch.manual_seed(0)  # the same weights on every rank
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16) if bn else nn.Identity(), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(), nn.Conv2d(16, 16, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4),
    )


RECIPE = "sliceout:p=0.5+dropit:keep=0.25+actmem"
# exact per sample (no selection over the batch), so per-rank shards and one full batch agree
FSDP_RECIPE = "sliceout:p=0.5+actmem"


def _gather(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def _windows(module: nn.Module) -> dict[str, tuple[int, list[int]]]:
    from sparsify_fx.passes.sliceout import SliceWindow

    return {n: (m.step, [m.start_at(s) for s in range(m.step)])
            for n, m in module.named_modules() if isinstance(m, SliceWindow)}


def _ddp_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _model()
        x0 = torch.randn(4, 3, 8, 8)
        fast = sfx.sparsify(model, RECIPE, example_inputs=(x0,))
        ddp = nn.parallel.DistributedDataParallel(fast)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(100 + rank)  # different data on every rank
        zero_rows = []
        for _ in range(3):
            opt.zero_grad()
            ddp(torch.randn(4, 3, 8, 8, generator=g)).pow(2).mean().backward()
            zero_rows.append((fast.get_parameter("3.weight").grad.flatten(1).abs().sum(1) == 0).float())
            opt.step()
        weights = torch.cat([p.detach().flatten() for p in model.parameters()])
        ddp.eval()
        with torch.no_grad():  # DDP broadcasts rank 0's buffers (BatchNorm stats) first
            evaluated = ddp(x0)
        buffers = torch.cat([b.detach().float().flatten() for b in model.buffers()])
        result = {"weights": _gather(weights), "buffers": _gather(buffers), "eval": _gather(evaluated),
                  "zero_rows": _gather(torch.stack(zero_rows)), "windows": _windows(fast)}
        if rank == 0:
            torch.save(result, out_file)
        dist.barrier()  # no rank tears gloo down while the other still communicates
    finally:
        dist.destroy_process_group()
    os._exit(0)


def test_ddp_rewritten_model_ranks_stay_identical(tmp_path):
    out = tmp_path / "ddp.pt"
    run_workers(_ddp_worker, str(tmp_path / "init"), str(out))
    r = torch.load(out)
    torch.testing.assert_close(r["weights"][0], r["weights"][1], rtol=0, atol=0)
    # BatchNorm running stats: DDP broadcasts rank 0's before each forward; eval agrees exactly
    torch.testing.assert_close(r["buffers"][0], r["buffers"][1], rtol=0, atol=0)
    torch.testing.assert_close(r["eval"][0], r["eval"][1], rtol=0, atol=0)
    # SliceOut: the same windows on both ranks, without communication, and they move
    torch.testing.assert_close(r["zero_rows"][0], r["zero_rows"][1], rtol=0, atol=0)
    assert r["zero_rows"][0].sum(1).gt(0).all()  # every step sliced the second conv's units
    assert r["windows"] and all(step == 3 for step, _ in r["windows"].values())
    # the model really trained
    assert not torch.equal(r["weights"][0], torch.cat([p.detach().flatten() for p in _model().parameters()]))


def _fsdp_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _model(bn=False)
        x0 = torch.randn(4, 3, 8, 8)
        fast = sfx.sparsify(model, FSDP_RECIPE, example_inputs=(x0,))
        reference = sfx.sparsify(_model(bn=False), FSDP_RECIPE, example_inputs=(x0,))  # unsharded
        from torch.distributed.device_mesh import init_device_mesh

        # a CPU mesh named: without one FSDP2 takes the GPU where there is one (on an H100 the
        # worker died with SIGSEGV: gloo with both ranks' shards on one device)
        fully_shard(fast, mesh=init_device_mesh("cpu", (world,)))  # parameters become DTensor shards (FSDP2)
        opt = torch.optim.SGD(fast.parameters(), lr=0.05)
        ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05)
        g = torch.Generator().manual_seed(7)  # the same global batch on every rank
        for _ in range(3):
            batch = torch.randn(2 * world, 3, 8, 8, generator=g)
            opt.zero_grad(), ref_opt.zero_grad()
            fast(batch.chunk(world)[rank]).pow(2).mean().backward()
            opt.step()
            # the reference sees the whole batch (equal shards: its mean is FSDP's average)
            reference(batch).pow(2).mean().backward()
            ref_opt.step()
        full = {n: p.full_tensor().detach() for n, p in fast.named_parameters()}
        flat = torch.cat([full[n].flatten() for n in sorted(full)])
        result = {"full": _gather(flat), "names": sorted(full),
                  "reference": {n: p.detach() for n, p in reference.named_parameters()},
                  "windows": _windows(fast), "ref_windows": _windows(reference)}
        if rank == 0:
            torch.save(result, out_file)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)


def test_fsdp2_fully_shard_rewritten_model(tmp_path):
    out = tmp_path / "fsdp.pt"
    run_workers(_fsdp_worker, str(tmp_path / "init"), str(out))
    r = torch.load(out)
    torch.testing.assert_close(r["full"][0], r["full"][1], rtol=0, atol=0)
    assert r["windows"] == r["ref_windows"] and r["windows"]
    # sharded training follows the unsharded rewritten model on the same global batch
    offset = 0
    for name in r["names"]:
        ref = r["reference"][name]
        got = r["full"][0][offset:offset + ref.numel()].view_as(ref)
        offset += ref.numel()
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5, msg=name)
