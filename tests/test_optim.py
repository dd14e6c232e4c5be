"""Optimizers built before or after ``sparsify``: shared parameters, IsoFLOP's new ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import mlp

import sparsify_fx as sfx


@pytest.mark.parametrize("recipe", [
    "dropit:keep=0.5", "sliceout:p=0.5,skip_first_last=False", "bsr:block_size=4,density=0.5", "actmem",
])
def test_optimizer_on_original_trains_rewritten(recipe):
    model = mlp(width=16, depth=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)  # built before sparsify
    fast = sfx.sparsify(model, recipe, example_inputs=(torch.randn(8, 8),))
    assert sfx.new_parameters(model, fast) == []
    assert sfx.extend_optimizer(opt, fast) == []  # every parameter is already held
    fast.train()
    for _ in range(3):
        opt.zero_grad()
        fast(torch.randn(8, 8)).pow(2).mean().backward()
        opt.step()
    for name, p in model.named_parameters():
        assert p is fast.get_parameter(name)  # still shared after the steps
        assert not torch.equal(p.detach(), before[name]), name  # and trained through fast


def test_iso_flop_new_parameters_added_to_existing_optimizer():
    model = mlp(width=16, depth=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    fast = sfx.sparsify(model, sfx.IsoFLOP(kind="doped", sparsity=0.5, init="random"), verify=False)
    new = sfx.new_parameters(model, fast)
    assert new and all(n.startswith("sfx_ops.") for n, _ in new)
    added = sfx.extend_optimizer(opt, fast, lr=0.05)
    assert added == [n for n, _ in new]
    assert opt.param_groups[-1]["lr"] == 0.05 and opt.param_groups[-1]["momentum"] == 0.9
    assert sfx.extend_optimizer(opt, fast) == []  # idempotent
    snapshot = {n: p.detach().clone() for n, p in new}
    opt.zero_grad()
    fast(torch.randn(8, 8)).pow(2).mean().backward()
    opt.step()
    moved = [n for n, p in new if not torch.equal(p.detach(), snapshot[n])]
    assert moved, "no new IsoFLOP parameter was updated by the extended optimizer"


def test_iso_flop_optimizer_built_on_rewritten_covers_all():
    model = mlp(width=16, depth=4)
    fast = sfx.sparsify(model, sfx.IsoFLOP(kind="wide", sparsity=0.5), verify=False)
    opt = torch.optim.SGD(fast.parameters(), lr=0.1)
    assert sfx.extend_optimizer(opt, fast) == []
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert {id(p) for p in model.parameters()} <= held  # original's are shared and held too
    assert isinstance(model, nn.Module)
