"""sparsify_fx.passes.kernels.op_autograd: side outputs are non-differentiable and get no materialised gradient; results are owned (never a view);
eager calls skip the custom op's dispatch, and anything that must see the op still does."""

from __future__ import annotations

import pytest
import torch
from sparsify_fx.passes.kernels import op_autograd
from sparsify_fx.passes.kernels.op_autograd import owned, register_autograd

import passes  # noqa: F401  (registers the sparsify_fx ops)
import sparsify_fx as sfx

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


scaled_with_side = register_autograd(_scaled, _backward, _setup)


@torch.library.custom_op("sfx_test::flat_double", mutates_args=())
def _flat_double(x: torch.Tensor, own: bool) -> tuple[torch.Tensor, torch.Tensor]:
    out = (x * 2).view(-1)  # a view of a tensor made inside the op, as a 3-D F.linear gave before torch 2.13
    return owned(out) if own else out, x.new_empty(0)


@_flat_double.register_fake
def _(x, own):
    return x.new_empty(x.numel()), x.new_empty(0)


register_autograd(_flat_double, lambda ctx, grad, side: (grad.view(ctx.shape) * 2, None),
                  lambda ctx, inputs, output: setattr(ctx, "shape", inputs[0].shape))


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


def test_an_owned_result_can_be_modified_in_place():
    x = torch.randn(3, 4, requires_grad=True)
    view, _ = torch.ops.sfx_test.flat_double(x, False)
    assert view._is_view()
    with pytest.raises(RuntimeError, match="view and is being modified inplace"):
        view.relu_()
    out, _ = torch.ops.sfx_test.flat_double(x, True)
    assert not out._is_view()
    out.relu_().sum().backward()
    torch.testing.assert_close(x.grad, (x > 0).float() * 2, rtol=0, atol=0)


def test_owned_shares_storage():
    base = torch.randn(2, 3)
    assert owned(base) is base
    flat = owned(base.view(-1))
    assert not flat._is_view() and flat.data_ptr() == base.data_ptr()


@pytest.mark.parametrize("recipe", [
    "actmem:layernorm='recompute',gelu='recompute'", "actmem:layernorm='recompute-bf16',gelu='recompute-bf16'",
    "dropit:keep=0.5,skip_first_last=False", "sliceout:p=0.5,skip_first_last=False", "actmem:dense='bf16'",
    "bsr:block_size=4,density=0.5,skip_first_last=False",
])
def test_a_rewritten_linears_result_on_3d_input_takes_an_inplace_relu(recipe):
    """Each Linear op's result on a (batch, tokens, features) input, followed by
    ``ReLU(inplace=True)``: torch 2.11's F.linear returned a view there (fuzz, on the H100)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 8),
                                torch.nn.ReLU(inplace=True), torch.nn.Linear(8, 8), torch.nn.GELU(),
                                torch.nn.Linear(8, 8), torch.nn.ReLU(inplace=True), torch.nn.Linear(8, 2))
    if recipe.startswith("sliceout"):  # whole blocks of 8 units, not read by a LayerNorm
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(inplace=True), torch.nn.Linear(16, 16),
                                    torch.nn.ReLU(inplace=True), torch.nn.Linear(16, 2))
    x = torch.randn(2, 5, 8)
    fast = sfx.sparsify(model, recipe, (x,))
    assert sfx.explain(fast).rewrites, recipe
    fast(x).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fast.parameters() if p.requires_grad)


def test_an_eager_call_runs_a_plain_function_with_the_ops_results_and_gradients():
    x = torch.randn(5, requires_grad=True)
    out, side = scaled_with_side(x)
    assert type(out.grad_fn).__name__ == "scaled_with_side_eagerBackward"
    assert out.requires_grad and not side.requires_grad
    seen.clear()
    out.sum().backward()
    assert seen[0][1] is None  # still no materialised side gradient
    via_op = x.detach().requires_grad_()
    ref, ref_side = torch.ops.sfx_test.scaled_with_side(via_op)
    assert "eager" not in type(ref.grad_fn).__name__
    ref.sum().backward()
    torch.testing.assert_close((out, side, x.grad), (ref, ref_side, via_op.grad), rtol=0, atol=0)


def test_modes_fake_tensors_and_transforms_see_the_custom_op():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    x = torch.randn(3, requires_grad=True)
    with Seen() as mode:
        scaled_with_side(x)
    assert "sfx_test.scaled_with_side.default" in mode.ops
    assert op_autograd.eager_call((x,))
    with FakeTensorMode() as fake:
        assert not op_autograd.eager_call((fake.from_tensor(x),))
    seen_inside = []
    torch.func.grad(lambda t: seen_inside.append(op_autograd.eager_call((t,))) or t.sum())(x.detach())
    assert seen_inside == [False]


@pytest.mark.parametrize("store", ["exact", "bf16"])
def test_a_fused_pass_op_gives_the_same_results_eager_and_dispatched(store, monkeypatch):
    from sparsify_fx.passes.activation_memory.bn_relu_conv import ActMemBnReLUConv

    torch.manual_seed(0)
    bn, conv = torch.nn.BatchNorm2d(6), torch.nn.Conv2d(6, 4, 3, padding=1)
    x = torch.randn(3, 6, 9, 9)

    def run(eager: bool):
        with monkeypatch.context() as m:
            if not eager:
                m.setattr(op_autograd, "eager_call", lambda args: False)
            op = ActMemBnReLUConv(0.1, 1e-5, [1, 1], [1, 1], [1, 1], 1, None, store).train()
            xr = x.clone().requires_grad_()
            stats = [bn.running_mean.clone(), bn.running_var.clone()]
            out = op(xr, bn.weight, bn.bias, *stats, None, conv.weight, conv.bias)
            assert ("eager" in type(out.grad_fn).__name__) == eager
            grads = torch.autograd.grad(out, [xr, bn.weight, bn.bias, conv.weight, conv.bias], torch.ones_like(out))
            return out, *grads, *stats

    torch.testing.assert_close(run(True), run(False), rtol=0, atol=0)
