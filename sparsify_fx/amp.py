"""Autocast for the passes' custom ops.

A ``torch.library.custom_op`` is invisible to autocast: its forward would see an autocast
activation next to an fp32 weight, and its backward (which runs outside autocast) would mix
dtypes in the weight-gradient matmul. Op modules therefore do autocast's job themselves:
cast the floating operands to the autocast dtype of their device, then call the op with
autocast off. The compressed copies the op saves are thus in the autocast dtype, and the
weight gradient flows back to the fp32 parameter through the cast, as with ``F.linear``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

__all__ = ["autocast_region"]


def _identity(t):
    return t


@contextmanager
def autocast_region(device_type: str) -> Iterator[Callable]:
    """Yield a cast function for the op's operands; inside the block autocast is off.

    Args:
        device_type: the operands' device type ("cpu", "cuda").

    Example:
        >>> import torch
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     with autocast_region("cpu") as cast:
        ...         cast(torch.ones(2)).dtype, torch.is_autocast_enabled("cpu")
        (torch.bfloat16, False)
    """
    if not torch.is_autocast_enabled(device_type):
        yield _identity
        return
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype:
            return t.to(dtype)
        return t

    with torch.autocast(device_type, enabled=False):
        yield cast
