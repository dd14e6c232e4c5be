"""What a replacement costs and how far it is from the dense op: weight counts, the FLOPs its
dense-tensor implementation runs, and the measured divergence on a seeded input."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from sparsify_fx.passes.iso_flop.build import DenseLayer
from sparsify_fx.passes.iso_flop.layers import (
    SparseDoped,
    SparseFactorized,
    SparseParallel,
    SparseParallelBN,
    SparseWide,
    lowrank_on_input,
)
from sparsify_fx.passes.iso_flop.masks import MaskedWeight

from sparsify_fx.graph.op_table import CONV_FUNCTIONS

__all__ = ["weight_counts", "dense_kernel_flops", "divergence"]


def weight_counts(module: nn.Module) -> tuple[int, int]:
    """(nonzero weights counted, dense numel of every weight factor) of a replacement, with
    the masks it trains with (the configured init's, drawn after verification)."""
    nnz = numel = 0
    for m in module.modules():
        if isinstance(m, MaskedWeight):
            nnz += m.target_nnz
            numel += m.mask.numel()
    if isinstance(module, SparseDoped) and module.up is not None:
        low_rank = module.up.numel() + module.down.numel()
        nnz += low_rank
        numel += low_rank
    return nnz, numel


def dense_kernel_flops(module: nn.Module, layer: DenseLayer) -> int | None:
    """Matmul / conv FLOPs the dense-tensor implementation runs in eval (as FlopCounterMode
    counts: 2 per multiply-add; elementwise mask products and sums are not included).
    ``SparseParallelBN`` runs its ``n`` branches as separate convs in training: n times this."""
    if layer.positions is None:
        return None
    n = layer.positions
    if isinstance(module, SparseParallel):
        return 2 * n * layer.weight.numel()
    if isinstance(module, SparseDoped):
        flops = 2 * n * layer.weight.numel()
        if module.up is not None:
            d_out, r, d_in = module.up.shape[0], module.up.shape[1], module.down.shape[1]
            if lowrank_on_input(n, d_in, d_out):
                flops += 2 * n * r * (d_in + d_out)
            else:
                flops += 2 * d_out * r * d_in
        return flops
    if isinstance(module, SparseFactorized):
        return 2 * n * (module.u.mask.numel() + module.v.mask.numel())
    if isinstance(module, SparseWide):
        return 2 * n * module.masked.mask.numel()
    return None


def divergence(
    module: nn.Module, layer: DenseLayer, extra_in: int, gen: torch.Generator
) -> tuple[float | None, float | None]:
    """Max abs (and relative-to-max) error of the replacement vs the dense op, in eval, on a
    seeded random input of the recorded input shape (None without shapes)."""
    meta = layer.input_meta
    if meta is None:
        return None, None
    shape, dtype = meta
    if not dtype.is_floating_point:
        return None, None
    op = layer.op
    device = layer.weight.device
    x = torch.randn(shape, generator=gen).to(device=device, dtype=layer.weight.dtype)
    with torch.no_grad():
        w = layer.weight
        b = layer.bias
        if op.kind == "conv":
            ref = CONV_FUNCTIONS[op.conv_ndim](x, w, b, op.stride, layer.geometry["padding"], op.dilation)
        else:
            ref = F.linear(x, w, b)
        if isinstance(module, SparseParallelBN):
            bn = module.bns[0]
            ref = F.batch_norm(ref, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                               bn.running_mean is None, 0.0, bn.eps)
        if extra_in:
            dim = 1 if op.kind == "conv" else x.dim() - 1
            pad_shape = list(x.shape)
            pad_shape[dim] = extra_in
            x = torch.cat([x, torch.randn(pad_shape, generator=gen).to(x)], dim=dim)
        args = (x,) if isinstance(module, SparseWide) else (x, b)
        training = module.training
        out = module.to(device).eval()(*args)  # eval: no running statistics updated
        module.train(training)
        dim = 1 if op.kind == "conv" else out.dim() - 1
        kept = out.narrow(dim, 0, ref.shape[dim])
        err = (kept.double() - ref.double()).abs().max()
        if out.shape[dim] > ref.shape[dim]:
            new_units = out.narrow(dim, ref.shape[dim], out.shape[dim] - ref.shape[dim])
            err = torch.maximum(err, new_units.double().abs().max())
    scale = float(ref.double().abs().max()) or 1.0
    return float(err), float(err) / scale
