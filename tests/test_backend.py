"""torch.compile integration (basic; the full matrix is the ecosystem work)."""

from __future__ import annotations

import torch
from conftest import mlp

import sparsify_fx as sfx


def test_backend_eager_rewrites_and_matches_in_eval():
    model = mlp(depth=4)
    x = torch.randn(4, 8)
    compiled = torch.compile(model, backend=sfx.backend("dropit:keep=0.5", inner="eager"))
    model.eval()
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    model.train()
    compiled(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    torch._dynamo.reset()


def test_backend_registered_by_name():
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group="torch_dynamo_backends")}
    assert "sparsify_fx" in names


def test_backend_rejects_unknown_inner():
    import pytest

    with pytest.raises(ValueError, match="inner"):
        sfx.backend("dropit", inner="tvm")
