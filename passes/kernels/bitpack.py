"""Bit packing shared by the passes: bool masks stored at 1 bit per element.

The 1-bit ReLU keeps its output's sign mask this way, and DropIT's threshold selection its
kept-element bitmap. Packing is one int64 multiply per 8 elements. Unpacking on the CPU is
one gather per 8 elements from a 256-entry table; on a GPU it is a broadcast shift-and-mask,
elementwise: CUDA's gather of 8-element rows ran at 120 us per ResNet-50 ReLU mask on an
H100 (a third of the step's GPU time), the shift a few us. All plain tensor ops, so they run
on any device and under ``torch.compile``.
"""

from __future__ import annotations

import math

import torch
from sparsify_fx.passes.kernels.cache import cached, eager

__all__ = ["pack_bits", "unpack_bits", "unpack_bits_as"]


# (b0 + b1<<8 + ... + b7<<56) * MAGIC puts b_i at bit 56+i and nothing else in bits 56..63
# (every other product term lands on a distinct lower bit, so there are no carries).
_PACK_MAGIC = 0x0102040810204080


def _build_table(device: torch.device, dtype: torch.dtype | None, invert: bool = False) -> torch.Tensor:
    bits = (torch.arange(256, device=device).unsqueeze(1) >> torch.arange(8, device=device)) & 1
    if invert:
        bits = 1 - bits
    if dtype is None:  # byte -> int64 whose 8 bytes are its bits: one gather unpacks 8 elements
        return bits.to(torch.uint8).view(torch.int64).reshape(256)
    return bits.to(dtype)  # byte -> its 8 bits as 0 / 1 values: one row gather per 8 elements


def _unpack_table(packed: torch.Tensor, dtype: torch.dtype | None = None, invert: bool = False) -> torch.Tensor:
    return cached(("unpack", packed.device, dtype, invert), packed,
                  lambda: _build_table(packed.device, dtype, invert))


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor into ``uint8`` (8 elements per byte, element ``i`` at bit ``i % 8``)."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    words = flat.contiguous().view(torch.uint8).view(torch.int64)
    return ((words * _PACK_MAGIC) >> 56).to(torch.uint8)


def _bits_elementwise(packed: torch.Tensor, invert: bool = False) -> torch.Tensor:
    """``packed``'s bits as a bool ``(n, 8)`` tensor, by broadcasting (no table, no gather)."""
    weights = cached(("bit weights", packed.device), packed,
                     lambda: torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=packed.device))
    bits = torch.bitwise_and(packed.unsqueeze(-1), weights)
    return bits == 0 if invert else bits != 0


def unpack_bits(packed: torch.Tensor, shape: list[int] | torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a bool tensor of ``shape``."""
    numel = math.prod(shape)
    # traced graphs take the broadcast form: torch 2.11's Inductor cannot lower the table's
    # int64 -> bool view (and fuses the broadcast anyway)
    if packed.device.type == "cpu" and eager(packed):
        flat = _unpack_table(packed)[packed.long()].view(torch.bool)
    else:
        flat = _bits_elementwise(packed).view(-1)
    return flat[:numel].view(shape)


def unpack_bits_as(
    packed: torch.Tensor, shape: list[int] | torch.Size, dtype: torch.dtype, invert: bool = False
) -> torch.Tensor:
    """Inverse of :func:`pack_bits` as ``0`` / ``1`` values of ``dtype`` (``1 - bit`` when
    ``invert``).

    For backward kernels that test a value (``threshold_backward``): on CPU a bool mask costs
    ~10x more to apply (``masked_fill`` / ``where``) than a 0/1 tensor to such a kernel.
    """
    numel = math.prod(shape)
    if packed.device.type == "cpu":
        flat = _unpack_table(packed, dtype, invert).index_select(0, packed.long()).view(-1)
    else:
        flat = _bits_elementwise(packed, invert).view(-1).to(dtype)
    return flat[:numel].view(shape)
