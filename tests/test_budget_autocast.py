"""MemoryBudget plans for bf16 autocast: the plan's dense bytes are what autocast keeps (the
bf16 copies of matmul inputs and weights), the budget holds measured under autocast, exact
plans give the autocast-dense gradients, and the fp8 storage's round-trip bound.

Prices are injected (``test_budget_determinism.inject``): what is tested is the bytes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsify_fx as sfx
from sparsify_fx.passes.activation_memory.fp8_storage import fp8_compress, fp8_decompress, fp8_relative_bound
from sparsify_fx.passes.memory_budget.planner import MemoryBudget
from sparsify_fx import ConfigError
from test_budget_determinism import Net, inject


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Saved-for-backward bytes of one autocast training forward, each storage once,
    parameters and the input left out (as ``benchmarks.memory.saved_tensor_bytes``)."""
    exclude = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), x]}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in exclude:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.enable_grad(), torch.autocast("cpu", torch.bfloat16), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(storages.values())


class _Block(nn.Module):
    """Pre-LayerNorm causal attention and a GELU MLP (GPT-2 style)."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class _Transformer(nn.Module):
    def __init__(self, d: int = 32, layers: int = 4):
        super().__init__()
        self.inp = nn.Linear(16, d)
        self.blocks = nn.Sequential(*[_Block(d) for _ in range(layers)])
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        return self.head(self.blocks(self.inp(x)))


class _ConvBlock(nn.Module):
    """A bottleneck-like block: three Conv -> BatchNorm -> ReLU and a residual add."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in range(3))
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) for _ in range(3))

    def forward(self, x):
        y = x
        for conv, bn in zip(self.convs, self.bns):
            y = torch.relu(bn(conv(y)))
        return x + y


def _conv_net() -> nn.Module:
    net = Net(depth=4)
    net.blocks = nn.Sequential(*[_ConvBlock(8) for _ in range(4)])
    return net


def _models():
    torch.manual_seed(0)
    return {"conv": (_conv_net().train(), torch.randn(4, 3, 16, 16)),
            "transformer": (_Transformer().train(), torch.randn(2, 32, 16))}


@pytest.mark.parametrize("fraction", [0.5, 0.25])
@pytest.mark.parametrize("name", ["conv", "transformer"])
def test_budget_holds_under_autocast(name, fraction, monkeypatch):
    inject(monkeypatch)
    model, x = _models()[name]
    dense = _saved_bytes(model, x)
    with torch.autocast("cpu", torch.bfloat16):
        fast = sfx.sparsify(model, MemoryBudget(fraction=fraction), example_inputs=(x,))
    plan = sfx.explain(fast).memory_budget
    fast.train()
    held = _saved_bytes(fast, x)
    assert plan["details"]["autocast"] == "bfloat16" if "details" in plan else True
    # the plan's dense is autocast's, and its planned bytes are what the model holds
    assert plan["dense_bytes"] == pytest.approx(dense, rel=0.05)
    assert plan["achieved_bytes"] == pytest.approx(held, rel=0.05)
    assert held <= fraction * dense * 1.05


def test_config_autocast_field_plans_without_a_context(monkeypatch):
    """``autocast="bf16"`` plans for autocast though sparsify runs outside one."""
    inject(monkeypatch)
    model, x = _models()["transformer"]
    dense = _saved_bytes(model, x)
    fast = sfx.sparsify(model, MemoryBudget(fraction=0.5, autocast="bf16"), example_inputs=(x,))
    plan = sfx.explain(fast).memory_budget
    assert plan["dense_bytes"] == pytest.approx(dense, rel=0.05)
    fast.train()
    assert _saved_bytes(fast, x) <= 0.5 * dense * 1.05


def test_autocast_config_is_validated():
    with pytest.raises(ConfigError, match="autocast"):
        MemoryBudget(autocast="int4")
    assert MemoryBudget(autocast=None).autocast is None


@pytest.mark.parametrize("name", ["conv", "transformer"])
def test_exact_plans_under_autocast_give_the_autocast_dense_gradients(name, monkeypatch):
    inject(monkeypatch)
    model, x = _models()[name]
    with torch.autocast("cpu", torch.bfloat16):
        fast = sfx.sparsify(model, MemoryBudget(fraction=0.25, exact_only=True), example_inputs=(x,))
    assert any(d["choice"] != "keep" for d in sfx.explain(fast).memory_budget["units"].values())
    grads = []
    for m in (model, fast):
        m.train()
        m.zero_grad()
        torch.manual_seed(1)
        with torch.autocast("cpu", torch.bfloat16):
            loss = m(x).float().square().mean()
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters()})
    for k, g in grads[0].items():
        torch.testing.assert_close(grads[1][k], g, rtol=2e-2, atol=2e-3, msg=k)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_round_trip_bound(fmt):
    torch.manual_seed(0)
    x = torch.randn(64, 512) * torch.logspace(-2, 2, 64)[:, None]
    values, scale = fp8_compress(x, fmt)
    assert values.element_size() == 1 and scale.shape == (64, 1)
    y = fp8_decompress(values, scale)
    bound = fp8_relative_bound(fmt)  # 2^-4 (e4m3), 2^-3 (e5m2)
    absmax = x.abs().amax(-1, keepdim=True)
    # relative bound, plus the subnormal range's absolute step near zero
    tiny = absmax * 2.0**-9 / torch.finfo(values.dtype).max if fmt == "e4m3" else absmax * 2.0**-16 / 57344
    assert ((y - x).abs() <= bound * x.abs() + tiny + 1e-12).all()
    # a weight gradient from the restored input: within 2^-4 sum|g x| (e4m3)
    g = torch.randn(64, 32)
    dw, dw_fp8 = g.T @ x, g.T @ y
    assert ((dw_fp8 - dw).abs() <= bound * (g.T.abs() @ x.abs()) + (g.T.abs() @ tiny.expand_as(x)) + 1e-6).all()
    measured = ((y - x).abs() / x.abs().clamp_min(1e-30))[x.abs() > absmax * 2.0**-6].max().item()
    assert measured <= bound
