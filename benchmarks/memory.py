"""Measure what a training forward keeps for backward: saved-tensor bytes, deduplicated by
storage. Core-free (plain torch), so it measures any module, rewritten or not.

Why storages and not tensors: two saved tensors often share one buffer (ReLU's output is also
the next conv's input; views of one projection), and freeing one holder frees nothing while
the other lives. Counting each storage once is what tells a real saving from a moved one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

__all__ = ["saved_tensor_bytes", "SavedTensorCounter"]


class SavedTensorCounter:
    """``saved_tensors_hooks`` pack hook recording each saved tensor's storage once.

    Tensors stay referenced (the pack hook returns them), so a storage cannot be freed and
    its address reused by another one while the forward runs.
    """

    def __init__(self, exclude: set[int] | None = None):
        self.exclude = set(exclude or ())
        self.storages: dict[int, int] = {}
        self.n_saved = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.n_saved += 1
        try:
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without a plain storage
            key, nbytes = id(t), t.numel() * t.element_size()
        if key not in self.exclude and nbytes:
            self.storages[key] = nbytes
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    @property
    def total_bytes(self) -> int:
        return sum(self.storages.values())


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def saved_tensor_bytes(
    model: nn.Module,
    inputs: tuple | list | torch.Tensor,
    kwargs: dict[str, Any] | None = None,
    *,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    count_inputs: bool = True,
) -> int:
    """Bytes the autograd graph of one training forward holds for backward.

    Runs ``model(*inputs, **kwargs)`` once in the module's current mode with grad enabled,
    records every tensor saved for backward, de-duplicates by storage address and leaves out
    the storages of the model's parameters and buffers (held anyway). The graph is freed
    without running backward.

    Args:
        model: any module (put it in ``train()`` mode first to measure training).
        inputs: positional inputs of the forward.
        kwargs: keyword inputs.
        loss_fn: optional ``loss_fn(output) -> scalar`` whose own saved tensors are counted
            too; by default only the model's forward is recorded.
        count_inputs: also count storages of the inputs when the model saves them (the first
            layer usually does; they are held by the caller anyway).

    Returns:
        Total bytes of distinct storages saved for backward.

    Example:
        >>> import torch
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> saved_tensor_bytes(m, (torch.randn(16, 4),))  # input (256 B) + ReLU output (512 B)
        768
    """
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    exclude = {_storage_key(t) for t in list(model.parameters()) + list(model.buffers())}
    if not count_inputs:
        exclude |= {_storage_key(t) for t in inputs if isinstance(t, torch.Tensor)}
    counter = SavedTensorCounter(exclude)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        out = model(*inputs, **(kwargs or {}))
        loss = loss_fn(out) if loss_fn is not None else None
    total = counter.total_bytes
    del out, loss
    return total
