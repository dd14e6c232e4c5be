"""Small constant tensors the passes' ops reuse between calls (bit tables, sample indices).

A cached tensor must never meet traced code: under ``torch.compile`` a backward is traced
with fake or functional tensors, and a cached real tensor (or a cached fake one) breaks that
trace or the next one. So the cache serves eager calls only; traced calls build the tensor as
ops. The check is two C-level lookups (~0.3 us), where ``torch._guards.detect_fake_mode`` took
6 us: it ran once per saved tensor per step, the hot path of every training step.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch

__all__ = ["cached", "eager"]

_CACHE: dict[Hashable, torch.Tensor] = {}
_FAKE = torch._C._TorchDispatchModeKey.FAKE


_REAL = (torch.Tensor, torch.nn.Parameter)


def eager(like: torch.Tensor) -> bool:
    """Whether ``like`` is a real tensor outside tracing (what a cache or a C++ kernel may see).

    An ``nn.Parameter`` is one (a module's weight reaches backward as itself); subclasses that
    stand for other things (fake, functional, distributed tensors) are not."""
    return type(like) in _REAL and torch._C._get_dispatch_mode(_FAKE) is None


def cached(key: Hashable, like: torch.Tensor, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``build()``, remembered under ``key`` when ``like`` is a real tensor outside tracing."""
    if not eager(like):
        return build()
    tensor = _CACHE.get(key)
    if tensor is None:
        tensor = _CACHE[key] = build()
    return tensor
