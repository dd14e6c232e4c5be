"""Where a benchmark runs: device, autocast and the CUDA allocator's view of memory.

Shared by the benchmarks that take ``--device`` / ``--amp``. On CUDA a step is timed between
two synchronisations (kernels run asynchronously; a host clock alone would time the launches),
and memory is also read from the caching allocator: the bytes allocated after the forward
minus before it are what the step really holds until backward, whatever autograd's saved
tensors report. That is the figure that shows a dense tensor was actually freed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["add_device_args", "check_device", "autocast", "sync", "timed_step", "cuda_step_memory", "device_meta"]


def add_device_args(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--amp``, validated against what this machine has."""
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--amp", default="off", choices=["off", "bf16"],
                        help="bf16: forward under torch.autocast (weights stay fp32)")


def check_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")


def autocast(device: str, amp: str) -> contextlib.AbstractContextManager:
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=torch.bfloat16)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor, device: str, amp: str) -> float:
    """Wall time of forward + cross-entropy + backward, synchronised on CUDA."""
    for p in model.parameters():
        p.grad = None
    sync(device)
    start = time.perf_counter()
    with autocast(device, amp):
        logits = model(x)  # (batch, classes) or a language model's (batch, tokens, vocab)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target)
    loss.backward()
    sync(device)
    return time.perf_counter() - start


def cuda_step_memory(model: nn.Module, x: torch.Tensor, target: torch.Tensor, amp: str) -> dict[str, int]:
    """Allocator bytes held between forward and backward, and the step's peak, above the
    bytes allocated before it (parameters, inputs)."""
    for p in model.parameters():
        p.grad = None
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with autocast("cuda", amp):
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target)
    del logits
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - base
    forward_peak = torch.cuda.max_memory_allocated() - base
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for p in model.parameters():
        p.grad = None
    del loss
    return {"held_bytes": held, "forward_peak_bytes": forward_peak, "step_peak_bytes": peak}


def device_meta(device: str, amp: str) -> dict:
    meta = {"device": device, "amp": amp, "threads": torch.get_num_threads()}
    if device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    return meta

