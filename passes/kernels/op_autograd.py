"""How every custom op of the passes gets its autograd formula.

An op here returns its result first and, after it, side outputs: the compressed payload it
keeps for backward, statistics, running-stat copies. Only the result is differentiable. A
plain ``register_autograd`` leaves the side outputs differentiable with materialised
gradients, so each backward first allocated and zero-filled a gradient for every one of them:
on ResNet-50 a bf16 zero tensor the size of each BatchNorm's input and the fp32 statistics,
1.5 ms of a 6.5 ms BatchNorm step at 8x256x28x28. Here the side outputs are marked
non-differentiable and gradients are not materialised, so backward receives ``None`` for them
and no tensor is built.

Under ``torch.compile``, AOT autograd traces forward and backward into one graph and splits
it. Its default split (``aot_eager``, the ``cudagraphs`` backend) puts every backward node that
does not read the incoming gradient into the forward graph, and saves its result. A
decompression (the bf16 copy cast back to fp32, BatchNorm's ``x_hat`` and its channel mean)
then ran in forward and its dense result was kept: on an H100, ResNet-50 with bf16 storage
held 513 MiB compiled against 387 MiB eager. :func:`in_backward` ties the compressed tensors
to the gradient while tracing, so their decompression stays in backward.

The custom op's own autograd wrapper costs about 60-80 us per forward + backward on the CPU
(the dispatcher's round trips and ``fill_defaults`` over the schema), more than some ops'
whole work: ResNet-50 calls about 80 of them per step. :func:`register_autograd` therefore
returns a caller that, on real tensors outside any tracing, transform or dispatch mode, runs
the same implementation, ``setup_context`` and backward through a plain
``torch.autograd.Function``; everything else (``torch.compile``, ``torch.export``, fake
tensors, ``torch.func``, a ``TorchDispatchMode``) sees the custom op as before.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from sparsify_fx.passes.kernels.cache import eager

__all__ = ["register_autograd", "in_backward", "owned", "eager_call"]


@torch.library.custom_op("sparsify_fx::in_backward", mutates_args=())
def _in_backward(saved: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return saved.clone()  # a custom op may not return its input; the copy is of the compact form


@_in_backward.register_fake
def _(saved, grad):
    return torch.empty_like(saved)


def owned(result: torch.Tensor) -> torch.Tensor:
    """An op's result as a tensor of its own, for autograd: a view (on torch 2.11 a 3-D
    ``F.linear`` with a bias returns a view of its 2-D ``addmm``, on 2.15 it does not; below autograd a conv1d is a
    squeezed conv2d) would make an in-place op after it (``ReLU(inplace=True)``) raise, since
    autograd forbids modifying in place a view made inside a custom function. Same storage,
    no copy."""
    return torch.ops.aten._unsafe_view(result, result.shape) if result._is_view() else result


def in_backward(grad: torch.Tensor, *saved: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """``saved`` as they are, in eager; while tracing, each made to depend on ``grad`` (an
    opaque copy), so that what backward computes from them cannot be hoisted into forward."""
    if eager(grad):
        return saved
    return tuple(t if t is None else torch.ops.sparsify_fx.in_backward(t, grad) for t in saved)


def eager_call(args: tuple) -> bool:
    """Whether an op called with ``args`` may run as a plain ``autograd.Function``: real
    tensors, no compiler, ``torch.func`` transform or dispatch mode that must see the op."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() or (
            torch._C._functorch.peek_interpreter_stack() is not None):
        return False
    return all(eager(a) for a in args if isinstance(a, torch.Tensor))


def register_autograd(op, backward: Callable, setup_context: Callable) -> Callable:
    """``op.register_autograd(backward, setup_context=...)`` for an op whose first output (or
    only output) is its result: the other outputs are non-differentiable, no zero gradients
    are materialised, and a result whose gradient is undefined (unused downstream) gives no
    input gradients without calling ``backward``.

    Returns the function to call the op with (positional arguments, as the schema orders
    them): the op itself, or on eager tensors the same implementation and formulas as a plain
    ``autograd.Function`` (see the module's docstring)."""

    def setup(ctx, inputs, output) -> None:
        setup_context(ctx, inputs, output)
        if isinstance(output, tuple) and len(output) > 1:
            ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)

    def backward_or_none(ctx, grad, *side_grads):
        if grad is None:
            return (None,) * len(ctx.needs_input_grad)
        return backward(ctx, grad, *side_grads)

    backward_or_none.__name__ = getattr(backward, "__name__", "backward")
    op.register_autograd(backward_or_none, setup_context=setup)
    dispatched = getattr(getattr(torch.ops, op._namespace), op._name)
    # private fields of CustomOpDef (torch 2.6-2.15): where one is missing, or the op has
    # device kernels or dispatch rules the plain path would skip, always dispatch
    impl = getattr(op, "_init_fn", None)
    if impl is None or set(getattr(op, "_backend_fns", {None: None})) - {None} or getattr(
            op, "_torch_dispatch_fns", None):
        return dispatched

    def forward(ctx, *args):
        output = impl(*args)
        setup(ctx, args, output)
        return output

    # named after the op, so a grad_fn reads "<op>_eagerBackward"
    plain = type(f"{op._name}_eager", (torch.autograd.Function,),
                 {"forward": staticmethod(forward), "backward": staticmethod(backward_or_none)})

    def call(*args):
        return plain.apply(*args) if eager_call(args) else dispatched(*args)

    call.__name__ = op._name
    return call
