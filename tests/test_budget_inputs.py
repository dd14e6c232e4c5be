"""MemoryBudget on the inputs and dtypes users bring: non-tensor and ``None`` defaults, dict
inputs, float64 models, budgets no plan reaches; the bf16 Conv3d weight gradient; NaN configs."""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from sparsify_fx.passes.kernels.bf16_matmul import conv_weight_grad
from sparsify_fx.passes.memory_budget.costs import node_seconds

import sparsify_fx as sfx
from sparsify_fx.infra import registry


class Block(nn.Module):
    def __init__(self, d: int = 32):
        super().__init__()
        self.ln, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 64), nn.Linear(64, d)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.ln(x))))


class WithFlags(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(*[Block() for _ in range(3)])
        self.head = nn.Linear(32, 4)

    def forward(self, x, attn_mask=None, is_causal=False):
        x = self.blocks(x)
        if attn_mask is not None:
            x = x + attn_mask
        if is_causal:
            x = x * 2
        return self.head(x)


class WithDict(WithFlags):
    def forward(self, inputs):
        return self.head(self.blocks(inputs["x"]) * inputs["scale"])


def _budget(model, inputs, **kwargs):
    fast = sfx.sparsify(model, sfx.MemoryBudget(fraction=0.5, **kwargs), example_inputs=inputs)
    return fast, sfx.explain(fast).memory_budget


def test_non_tensor_default_arguments():
    """``forward(x, attn_mask=None, is_causal=False)`` (timm's ViT): the budget plans and trains."""
    torch.manual_seed(0)
    x = torch.randn(4, 8, 32)
    fast, plan = _budget(WithFlags(), (x,))
    assert plan["reachable"] and plan["achieved_fraction"] <= 0.5 * 1.05
    fast(x).sum().backward()


def test_node_seconds_with_a_fixed_argument_unlike_its_default():
    """fx's check of an argument fixed to another value than its default (``is_causal=True``
    captured, ``False`` the default) is not run by the timer: no 'specialized' error."""
    model = WithFlags()
    gm = fx.symbolic_trace(model, concrete_args={"attn_mask": None, "is_causal": True})
    sfx.ShapeRecorder(gm).run(torch.randn(2, 8, 32), None, True)
    seconds = node_seconds(gm)
    assert any(name.startswith("blocks") for name in seconds)


def test_none_default_placeholder():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 32)
    _, plan = _budget(WithFlags(), (x, None))
    assert plan["reachable"]


def test_node_seconds_skips_nodes_of_unknown_inputs():
    """A dict input has no recorded shape: the nodes reading it are not timed, the rest are."""
    inputs = {"x": torch.randn(2, 8, 32), "scale": torch.tensor(2.0)}
    gm = fx.symbolic_trace(WithDict())
    sfx.ShapeRecorder(gm).run(inputs)
    assert any(name.startswith("blocks") for name in node_seconds(gm))


def test_dict_input():
    torch.manual_seed(0)
    inputs = {"x": torch.randn(4, 8, 32), "scale": torch.tensor(2.0)}
    fast, plan = _budget(WithDict(), (inputs,))
    assert plan["reachable"] and plan["achieved_fraction"] <= 0.5 * 1.05
    fast(inputs).sum().backward()


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
                                      for _ in range(3)])
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def test_float64_model_trains_with_dense_gradients():
    # .backward(), not torch.autograd.grad: a recomputed block runs its own backward inside the
    # outer one and accumulates into .grad, like reentrant checkpointing (docs/memory.md)
    torch.manual_seed(0)
    model = ConvNet().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    fast, plan = _budget(model, (x,), exact_only=True)
    assert plan["achieved_fraction"] <= 0.5 * 1.05
    reference = copy.deepcopy(model)
    reference(x).sum().backward()
    fast(x).sum().backward()
    ref = dict(reference.named_parameters())
    for name, p in fast.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert p.grad.dtype == torch.float64
        torch.testing.assert_close(p.grad, ref[name].grad, rtol=1e-9, atol=1e-12)


def test_unreachable_budget_warns_or_refuses():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"not reachable.*smallest plan found holds \d\.\d{3}x"):
        fast = sfx.sparsify(ConvNet(), sfx.MemoryBudget(fraction=0.01, exact_only=True), example_inputs=(x,))
    assert not sfx.explain(fast).memory_budget["reachable"]
    with pytest.raises(sfx.PassError, match=r"fraction >= \d\.\d\d"):
        sfx.sparsify(ConvNet(), sfx.MemoryBudget(fraction=0.01, exact_only=True, on_unreachable="raise"),
                     example_inputs=(x,))
    with pytest.raises(sfx.ConfigError, match="on_unreachable"):
        sfx.MemoryBudget(on_unreachable="best")
    with warnings.catch_warnings():  # a reachable budget says nothing
        warnings.simplefilter("error", UserWarning)
        sfx.sparsify(ConvNet(), sfx.MemoryBudget(fraction=1.0, on_unreachable="raise"), example_inputs=(x,))


def test_bf16_conv3d_weight_grad_is_finite():
    """Kernel (3, 1, 1), padding (1, 0, 0), two frames: oneDNN's bf16 weight gradient is
    non-finite on some CPUs; the shape falls back to fp32."""
    torch.manual_seed(0)
    x, w = torch.randn(2, 8, 2, 6, 6), torch.randn(16, 8, 3, 1, 1)
    g = torch.randn(2, 16, 2, 6, 6)
    conv = ((1, 1, 1), (1, 0, 0), (1, 1, 1), 1)
    ref = torch.ops.aten.convolution_backward(g, x, w, None, *conv[:3], False, [0, 0, 0], 1,
                                              [False, True, False])[1]
    for _ in range(2):  # the check, then the cached decision
        got = conv_weight_grad(g, x.to(torch.bfloat16), w, conv)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, ref, rtol=0.05, atol=0.05 * ref.abs().max().item())


def _float_fields():
    for name, spec in sorted(registry.registered().items()):
        cls = spec.config_type
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if "float" in str(hints.get(f.name)):
                yield pytest.param(cls, f.name, id=f"{name}.{f.name}")


@pytest.mark.parametrize(("cls", "field"), list(_float_fields()))
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_config_values_are_rejected(cls, field, bad):
    with pytest.raises(sfx.ConfigError, match=rf"{cls.__name__}\.{field}"):
        cls(**{field: bad})
