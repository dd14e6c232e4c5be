"""Mixed precision: torch.autocast (bf16 on CPU; bf16 / fp16 on CUDA) through every pass,
compressed saved tensors in the autocast dtype, channels_last inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsify_fx as sfx


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.c3 = nn.Conv2d(32, 32, 1)
        self.fc = nn.Linear(32, 64)
        self.ln = nn.LayerNorm(64)
        self.fc2 = nn.Linear(64, 64)
        self.head = nn.Linear(64, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = F.gelu(self.c2(x))
        x = F.silu(self.c3(x)).mean((2, 3))
        x = torch.relu(self.fc2(self.ln(self.fc(x))))
        return self.head(x)


RECIPES = {
    "dropit": "dropit:keep=0.25",
    "actmem": "actmem",
    "actmem-bf16": "actmem:dense=bf16",  # Linear / Conv inputs kept as bf16 too
    "bsr": "bsr:block_size=8,density=0.5",
    "sliceout": "sliceout:p=0.5",
    "isoflop": sfx.IsoFLOP(kind="wide", sparsity=0.5),
    "all": "dropit:keep=0.25+actmem",
}
EXACT_TRAIN_FORWARD = {"dropit", "actmem", "actmem-bf16", "bsr", "all"}  # only the backward is approximated


def _pair(name: str, device: str = "cpu"):
    torch.manual_seed(0)
    model = ConvNet().to(device)
    x = torch.randn(8, 3, 8, 8, device=device)
    return model, sfx.sparsify(model, RECIPES[name], example_inputs=(x,)), x


def _train_step_under_autocast(model, fast, x, device: str, dtype: torch.dtype, name: str):
    fast.train(), model.train()
    with torch.autocast(device, dtype=dtype):
        out = fast(x)
        ref = model(x)
    assert out.dtype == dtype == ref.dtype
    if name in EXACT_TRAIN_FORWARD:
        torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    out.float().pow(2).mean().backward()
    grads = [p.grad for p in fast.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert fast.get_parameter("c2.weight").grad is not None or name == "isoflop"
    # eval under autocast: the original's numbers (IsoFLOP: its own eager numbers)
    fast.eval(), model.eval()
    with torch.no_grad(), torch.autocast(device, dtype=dtype):
        reference = model(x) if name != "isoflop" else fast.float()(x)
        torch.testing.assert_close(fast(x), reference, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name", list(RECIPES))
def test_autocast_bf16_cpu_every_pass(name):
    model, fast, x = _pair(name)
    _train_step_under_autocast(model, fast, x, "cpu", torch.bfloat16, name)


@pytest.mark.parametrize("name", ["dropit", "bsr"])
def test_compressed_saved_tensors_in_autocast_dtype(name):
    """What the rewritten layers keep for backward is bf16 under autocast, never an fp32
    copy of an activation (parameters, indices and small statistics aside)."""
    model, fast, x = _pair(name)
    params = {p.data_ptr() for p in fast.parameters()}
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    fast.train()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fast(x)
    activations = [t for t in saved if t.is_floating_point() and t.data_ptr() not in params and t.numel() > 64]
    assert activations
    assert all(t.dtype == torch.bfloat16 for t in activations), sorted({str(t.dtype) for t in activations})
    # and the compressed form is really smaller than the bf16 dense input would be
    dense = sfx.sparsify(model, "actmem", example_inputs=(x,))  # reference: no dense-op rewrite
    saved_dense: list[torch.Tensor] = []
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved_dense.append(t) or t, lambda t: t):
        model.train()(x)
    total = sum(t.numel() * t.element_size() for t in saved if t.data_ptr() not in params)
    total_dense = sum(t.numel() * t.element_size() for t in saved_dense if t.data_ptr() not in params)
    assert total < total_dense
    assert dense is not None


@pytest.mark.parametrize("name", ["dropit", "actmem", "bsr", "sliceout"])
def test_channels_last_inputs(name):
    model, fast, x = _pair(name)
    x = x.contiguous(memory_format=torch.channels_last)
    fast.train(), model.train()
    out = fast(x)
    if name in EXACT_TRAIN_FORWARD:
        torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)
    out.pow(2).mean().backward()
    g = fast.get_parameter("c2.weight").grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    fast.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(RECIPES))
def test_autocast_cuda_every_pass(name, dtype):
    model, fast, x = _pair(name, "cuda")
    _train_step_under_autocast(model, fast, x, "cuda", dtype, name)
