"""Bit packing shared by the passes: bool masks stored at 1 bit per element.

The 1-bit ReLU keeps its output's sign mask this way, and DropIT's threshold selection its
kept-element bitmap. Packing is one int64 multiply per 8 elements; unpacking one gather per
8 elements from a 256-entry table, both plain tensor ops so they run on any device.
"""

from __future__ import annotations

import math

import torch

__all__ = ["pack_bits", "unpack_bits"]


# (b0 + b1<<8 + ... + b7<<56) * MAGIC puts b_i at bit 56+i and nothing else in bits 56..63
# (every other product term lands on a distinct lower bit, so there are no carries).
_PACK_MAGIC = 0x0102040810204080
_UNPACK_TABLES: dict[torch.device, torch.Tensor] = {}


def _build_table(device: torch.device) -> torch.Tensor:
    # byte -> int64 whose 8 bytes are its bits: one gather unpacks 8 elements
    bits = (torch.arange(256, device=device).unsqueeze(1) >> torch.arange(8, device=device)) & 1
    return bits.to(torch.uint8).view(torch.int64).reshape(256)


def _unpack_table(packed: torch.Tensor) -> torch.Tensor:
    # A cached tensor must never meet traced code: under torch.compile the backward is traced
    # with fake tensors, and a cached real table (or a cached fake one) breaks that trace or
    # the next one. Traced graphs build the table as ops; eager calls reuse a real one.
    tracing = type(packed) is not torch.Tensor or torch._guards.detect_fake_mode() is not None
    if tracing:
        return _build_table(packed.device)
    table = _UNPACK_TABLES.get(packed.device)
    if table is None:
        table = _UNPACK_TABLES[packed.device] = _build_table(packed.device)
    return table


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor into ``uint8`` (8 elements per byte, element ``i`` at bit ``i % 8``)."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    words = flat.contiguous().view(torch.uint8).view(torch.int64)
    return ((words * _PACK_MAGIC) >> 56).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: list[int] | torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a bool tensor of ``shape``."""
    numel = math.prod(shape)
    flat = _unpack_table(packed)[packed.long()].view(torch.bool)
    return flat[:numel].view(shape)
