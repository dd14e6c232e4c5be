"""torch.export of rewritten modules (eval and training IR), torch.save / torch.load, and the
state_dict round trip back into the original architecture."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn

import sparsify_fx as sfx


class ConvMLP(nn.Module):
    """Conv + BatchNorm + ReLU/GELU + LayerNorm + Linear: something for every pass."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 32, 1)
        self.fc1 = nn.Linear(32, 32)
        self.ln = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = nn.functional.gelu(self.pw(x)).mean((2, 3))
        x = torch.relu(self.ln(self.fc1(x)))
        return self.head(torch.relu(self.fc2(x)))


RECIPES = {
    "dropit": "dropit:keep=0.25",
    "actmem": "actmem",
    "bsr": "bsr:block_size=8,density=0.5",
    "sliceout": "sliceout:p=0.5,skip_first_last=False",
    "isoflop": sfx.IsoFLOP(kind="wide", sparsity=0.5),
}
# custom ops each pass's training graph must contain
TRAIN_OPS = {"dropit": "dropit_", "actmem": "actmem_", "bsr": "block_sparse_dense", "sliceout": "sliceout_"}


def _rewritten(name: str):
    torch.manual_seed(0)
    model = ConvMLP()
    x = torch.randn(4, 3, 8, 8)
    return model, sfx.sparsify(model, RECIPES[name], example_inputs=(x,)), x


def _op_names(ep: torch.export.ExportedProgram) -> str:
    return " ".join(str(n.target) for n in ep.graph.nodes if n.op == "call_function")


@pytest.mark.parametrize("name", list(RECIPES))
def test_export_eval_matches_eager(name):
    model, fast, x = _rewritten(name)
    fast.eval()
    ep = torch.export.export(fast, (x,))
    y = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(y), fast(y), rtol=1e-5, atol=1e-6)
        if name != "isoflop":  # exact passes: eval is the original model
            torch.testing.assert_close(ep.module()(y), model.eval()(y), rtol=1e-5, atol=1e-6)
    # the inference IR (core ATen after decompositions) keeps the same numbers
    inference = ep.run_decompositions()
    with torch.no_grad():
        torch.testing.assert_close(inference.module()(y), fast(y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(TRAIN_OPS))
def test_export_training_ir_keeps_custom_ops_and_trains(name):
    _, fast, x = _rewritten(name)
    fast.train()
    ep = torch.export.export(fast, (x,))  # training IR: autograd-ready, custom ops kept whole
    assert TRAIN_OPS[name] in _op_names(ep), _op_names(ep)
    exported = ep.module()
    torch.manual_seed(1)
    out = exported(x)
    out.pow(2).mean().backward()
    grads = {n: p.grad for n, p in exported.named_parameters()}
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads.values())
    if name != "sliceout":  # SliceOut's window is fixed at export time; the others are step-free
        fast.zero_grad()
        torch.manual_seed(1)
        ref = fast(x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        ref.pow(2).mean().backward()
        for n, p in fast.named_parameters():
            if p.grad is not None and grads.get(n) is not None:
                torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(RECIPES))
def test_save_load_and_state_dict_round_trip(name):
    model, fast, x = _rewritten(name)
    fast.train()
    fast(x).sum().backward()  # a step's worth of state (SliceOut step counters, BN stats)
    buffer = io.BytesIO()
    torch.save(fast, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    fast.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), fast(x), rtol=0, atol=0)
    # the rewritten state_dict loads into a fresh copy of the original architecture
    state = fast.state_dict()
    fresh = ConvMLP()
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert missing == []
    assert all(k.startswith("sfx_ops.") for k in unexpected), unexpected  # IsoFLOP's additions only
    if name != "isoflop":
        assert unexpected == []
        with torch.no_grad():
            torch.testing.assert_close(fresh.eval()(x), fast(x), rtol=1e-6, atol=1e-6)
    # and the original's state_dict loads back into the rewritten module (strict)
    fast.load_state_dict({**fast.state_dict(), **model.state_dict()}, strict=True)
