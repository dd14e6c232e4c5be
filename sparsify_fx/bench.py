"""Measure what a training step holds and costs: dense and rewritten, interleaved, same run.

Activation memory is measured as the bytes autograd keeps for backward after the forward:
every tensor saved through ``saved_tensors_hooks`` (custom ops' ``save_for_backward``
included), de-duplicated by storage, with parameters' storages excluded (they are held
anyway). On CUDA the allocator's bytes after forward are reported too.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves

__all__ = ["StepMeasure", "saved_tensor_bytes", "measure_step", "compare_training_step"]


@dataclass
class StepMeasure:
    """One configuration's training-step figures (medians over the repeats)."""

    name: str
    saved_bytes: int
    step_seconds: float
    times: list[float] = field(default_factory=list)
    cuda_bytes_after_forward: int | None = None


def _default_loss(output: Any) -> torch.Tensor:
    tensors = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return sum(t.float().pow(2).mean() for t in tensors)  # type: ignore[return-value]


def saved_tensor_bytes(
    module: nn.Module, inputs: tuple, kwargs: dict | None = None,
    loss_fn: Callable[[Any], torch.Tensor] = _default_loss,
) -> int:
    """Bytes autograd holds for backward after one training forward (storage-deduplicated)."""
    # parameters and buffers (BatchNorm's running stats are saved too) live anyway
    params = {p.untyped_storage().data_ptr() for p in [*module.parameters(), *module.buffers()]}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params and s.device.type != "meta":
            storages[s.data_ptr()] = s.nbytes()
        return t

    module.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(*inputs, **(kwargs or {}))
        loss = loss_fn(out)
    loss.backward()
    module.zero_grad(set_to_none=True)
    return sum(storages.values())


def _step(module: nn.Module, inputs: tuple, kwargs: dict, loss_fn: Callable) -> float:
    sync = torch.cuda.synchronize if any(
        isinstance(t, torch.Tensor) and t.is_cuda for t in inputs) else (lambda: None)
    sync()
    t0 = time.perf_counter()
    loss = loss_fn(module(*inputs, **kwargs))
    loss.backward()
    sync()
    elapsed = time.perf_counter() - t0
    module.zero_grad(set_to_none=True)
    return elapsed


def compare_training_step(
    modules: dict[str, nn.Module], inputs: tuple, kwargs: dict | None = None, *,
    repeats: int = 5, warmup: int = 1, loss_fn: Callable[[Any], torch.Tensor] = _default_loss,
    progress: Callable[[str], None] | None = None,
) -> list[StepMeasure]:
    """Time one training step of each module, interleaved (A B A B ...), median of ``repeats``."""
    kwargs = kwargs or {}
    results = {name: StepMeasure(name, saved_tensor_bytes(m, inputs, kwargs, loss_fn), 0.0)
               for name, m in modules.items()}
    for m in modules.values():
        m.train()
        for _ in range(warmup):
            _step(m, inputs, kwargs, loss_fn)
    for i in range(repeats):
        for name, m in modules.items():
            results[name].times.append(_step(m, inputs, kwargs, loss_fn))
        if progress:
            progress(f"repeat {i + 1}/{repeats}")
    for r in results.values():
        r.step_seconds = statistics.median(r.times)
    return list(results.values())


def measure_step(module: nn.Module, inputs: tuple, **kwargs: Any) -> StepMeasure:
    """:func:`compare_training_step` for one module."""
    return compare_training_step({"model": module}, inputs, **kwargs)[0]
