"""Shared fixtures: small deterministic models and inputs."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import tempfile

import pytest
import torch
import torch.nn as nn


def _libc_malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None


_MALLOC_TRIM = _libc_malloc_trim()

# the memory budget's calibration is cached on disk (passes/memory_budget/calibration_cache.py): the suite
# (and the example scripts it runs, which inherit the environment) share a directory of its
# own, so it neither reads nor writes the user's cache
os.environ.setdefault("SPARSIFY_FX_CACHE_DIR", tempfile.mkdtemp(prefix="sparsify-fx-test-cache-"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _return_freed_memory():
    """Hand the heap pages freed by a test back to the OS.

    glibc raises its mmap threshold after large frees, so big CPU tensors end up on the heap,
    and the resident size of one pytest process only ever grows: the torchvision zoo pushed
    it past 20 GiB (the CI runner, 24 GiB, killed the suite). ``malloc_trim`` releases the free
    pages; CPU tensors are freed once the test's objects are collected.
    """
    yield
    if _MALLOC_TRIM is not None:
        gc.collect()
        _MALLOC_TRIM(0)


def grads_of(fn, *tensors, seed: int = 1):
    """``(output, [t.grad for t in tensors], upstream gradient)`` of ``fn()`` backpropagated
    with a seeded random upstream gradient (grads reset first)."""
    for t in tensors:
        t.grad = None
    out = fn()
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    out.backward(g)
    return out.detach(), [t.grad.clone() if t.grad is not None else None for t in tensors], g


def mlp(width: int = 16, depth: int = 4, out: int = 3) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(8, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.GELU()]
    layers.append(nn.Linear(width, out))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="reflect")
        self.pw = nn.Conv2d(8, 16, 1)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = x + self.conv(x)
        x = nn.functional.silu(self.pw(self.dw(x)))
        return self.head(x.mean((2, 3)))
