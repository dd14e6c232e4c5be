"""How every custom op of the passes gets its autograd formula.

An op here returns its result first and, after it, side outputs: the compressed payload it
keeps for backward, statistics, running-stat copies. Only the result is differentiable. A
plain ``register_autograd`` leaves the side outputs differentiable with materialised
gradients, so each backward first allocated and zero-filled a gradient for every one of them:
on ResNet-50 a bf16 zero tensor the size of each BatchNorm's input and the fp32 statistics,
1.5 ms of a 6.5 ms BatchNorm step at 8x256x28x28. Here the side outputs are marked
non-differentiable and gradients are not materialised, so backward receives ``None`` for them
and no tensor is built.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["register_autograd"]


def register_autograd(op, backward: Callable, setup_context: Callable) -> None:
    """``op.register_autograd(backward, setup_context=...)`` for an op whose first output (or
    only output) is its result: the other outputs are non-differentiable, no zero gradients
    are materialised, and a result whose gradient is undefined (unused downstream) gives no
    input gradients without calling ``backward``."""

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
