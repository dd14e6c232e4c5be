"""passes.op_autograd: side outputs are non-differentiable and get no materialised gradient."""

from __future__ import annotations

import torch

import passes  # noqa: F401  (registers the sparsify_fx ops)
from passes.op_autograd import register_autograd

seen: list[tuple] = []


@torch.library.custom_op("sfx_test::scaled_with_side", mutates_args=())
def _scaled(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x * 2, x.detach() + 1


@_scaled.register_fake
def _(x):
    return torch.empty_like(x), torch.empty_like(x)


def _setup(ctx, inputs, output):
    pass


def _backward(ctx, grad, side_grad):
    seen.append((grad, side_grad))
    return grad * 2


register_autograd(_scaled, _backward, _setup)


def test_side_outputs_get_no_gradient_and_none_is_materialised():
    seen.clear()
    x = torch.randn(5, requires_grad=True)
    out, side = torch.ops.sfx_test.scaled_with_side(x)
    assert out.requires_grad and not side.requires_grad
    (out.sum() + side.sum()).backward()
    (grad, side_grad), = seen
    assert side_grad is None  # a plain register_autograd hands backward zeros_like(side) here
    torch.testing.assert_close(x.grad, torch.full((5,), 2.0), rtol=0, atol=0)


def test_the_passes_ops_mark_their_payloads_non_differentiable():
    x = torch.randn(4, 6, 5, 5, requires_grad=True)
    w, b = torch.ones(6, requires_grad=True), torch.zeros(6, requires_grad=True)
    out = torch.ops.sparsify_fx.actmem_batch_norm(x, w, b, torch.zeros(6), torch.ones(6), 0.1, 1e-5, "bf16", 64)
    assert out[0].requires_grad and not any(t.requires_grad for t in out[1:])
    relu_out, bits = torch.ops.sparsify_fx.actmem_relu(x, 0.0)
    assert relu_out.requires_grad and not bits.requires_grad
