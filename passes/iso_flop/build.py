"""Building one replacement module from the dense layer it replaces: the weights and masks of
each kind, from the dense weights (``init="preserve"``) or at random."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from sparsify_fx.passes.iso_flop.config import (
    IsoFLOP,
    doped_rank,
    hidden_width,
    parallel_branches,
    wide_factor,
    widened_width,
)
from sparsify_fx.passes.iso_flop.layers import (
    SparseDoped,
    SparseFactorized,
    SparseParallel,
    SparseWide,
)
from sparsify_fx.passes.iso_flop.masks import MaskedWeight, kaiming_uniform, random_mask, topk_mask

import sparsify_fx as sfx

__all__ = ["DenseLayer", "build_parallel", "build_factorized", "build_doped", "build_wide"]

# a branch count times the density within this of 1 still counts as covering every weight
# (1 / (1 - 0.9) is 9.999999999999998 in floating point)
_COVER_TOL = 1e-6


@dataclass
class DenseLayer:
    """What a replacement needs to know about the dense op it replaces."""

    op: sfx.DenseOp
    weight: torch.Tensor  # [D_out, c_in, *kernel] (matmul weights transposed)
    bias: torch.Tensor | None
    geometry: dict[str, Any]
    positions: int | None  # output positions (batch x spatial); None without shapes
    input_meta: tuple[tuple[int, ...], torch.dtype] | None  # recorded before any widening

    @property
    def d_out(self) -> int:
        return self.weight.shape[0]

    @property
    def d_in(self) -> int:
        return math.prod(self.weight.shape[1:])


def build_parallel(layer: DenseLayer, config: IsoFLOP, gen: torch.Generator) -> tuple[nn.Module, dict]:
    w = layer.weight.detach().float().cpu()
    n = parallel_branches(config.sparsity)
    numel = w.numel()
    nnz = round((1.0 - config.sparsity) * numel)
    if n * (1.0 - config.sparsity) >= 1.0 - _COVER_TOL:
        # 1/(1-s) is an integer: rounding each branch's count must not leave weights uncovered
        nnz = max(nnz, math.ceil(numel / n))
    exact = True
    if config.init == "preserve":
        covering = n * nnz >= numel
        if covering:
            order = torch.randperm(numel, generator=gen)
        else:
            # the branches cannot hold every weight: give them the largest ones
            exact = False
            by_size = w.abs().flatten().topk(n * nnz).indices
            order = by_size[torch.randperm(by_size.numel(), generator=gen)]
        owner = torch.full((numel,), -1, dtype=torch.long)
        branches = []
        for b in range(n):
            # slots wrap around the permutation, so every weight gets one owner and a branch
            # never holds a position twice (nnz <= numel); extra slots hold zero-valued weights
            slots = torch.arange(b * nnz, (b + 1) * nnz) % order.numel()
            positions = order[slots]
            mask = torch.zeros(numel, dtype=torch.bool)
            mask[positions] = True
            free = owner[positions] < 0
            owner[positions[free]] = b
            values = torch.where(owner == b, w.flatten(), torch.zeros(()))
            branches.append(MaskedWeight(values.view(w.shape), mask.view(w.shape)))
    else:
        branches = [
            MaskedWeight(kaiming_uniform(tuple(w.shape), gen), random_mask(w.shape, nnz, gen)) for _ in range(n)
        ]
        exact = False
    module = SparseParallel(branches, **layer.geometry)
    details = {"branches": n, "branch_density": nnz / numel, "exact": exact}
    if config.init == "preserve" and not exact:
        details["why_inexact"] = f"{n} branches x density {1 - config.sparsity:g} < 1: smallest weights dropped"
    return module, details


def _svd_factors(w2d: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``up [D_out, rank]``, ``down [rank, D_in]`` with ``up @ down`` the best rank-``rank``
    approximation; the singular values are split evenly so the factors have similar scale."""
    # eigh of the small Gram matrix in float64 instead of a full SVD: ~50x faster on conv
    # weights like 512 x 4608, and only the leading components (well conditioned) are used
    w = w2d.double()
    tall = w.shape[0] > w.shape[1]
    if tall:
        w = w.t()
    evals, evecs = torch.linalg.eigh(w @ w.t())
    evals, evecs = evals.flip(0), evecs.flip(1)
    q = min(rank, evals.numel())
    singular = evals[:q].clamp_min(0).sqrt()
    root = singular.sqrt()
    usable = singular > singular.max().clamp_min(1e-300) * 1e-10
    left = evecs[:, :q] * root
    right = torch.where(usable[:, None], (evecs[:, :q].t() @ w) / root.clamp_min(1e-300)[:, None], 0.0)
    left = left * usable
    up_q, down_q = (right.t(), left.t()) if tall else (left, right)
    up = torch.zeros(w2d.shape[0], rank, dtype=torch.double)
    down = torch.zeros(rank, w2d.shape[1], dtype=torch.double)
    up[:, :q] = up_q
    down[:q] = down_q
    return up.float(), down.float()


def build_factorized(layer: DenseLayer, config: IsoFLOP, gen: torch.Generator) -> tuple[nn.Module, dict]:
    w = layer.weight.detach().float().cpu()
    d_in, d_out = layer.d_in, layer.d_out
    d = hidden_width(d_in, d_out, config.sparsity)
    # both factors at the same density, chosen so their weights add up to the dense layer's
    # (1 - s up to the ceil in d)
    density = min(1.0, d_in * d_out / (d * (d_in + d_out)))
    kernel = tuple(w.shape[2:])
    u_shape = (d, *w.shape[1:])
    v_shape = (d_out, d, *(1,) * len(kernel))
    nnz_u = round(density * math.prod(u_shape))
    nnz_v = d_in * d_out - nnz_u if density < 1.0 else math.prod(v_shape)
    nnz_v = max(0, min(nnz_v, math.prod(v_shape)))
    if config.init == "preserve":
        up, down = _svd_factors(w.reshape(d_out, d_in), d)
        u_w, v_w = down.view(u_shape), up.view(v_shape)
        u_mask, v_mask = topk_mask(u_w, nnz_u), topk_mask(v_w, nnz_v)
        u_w, v_w = u_w * u_mask, v_w * v_mask
    else:
        u_w, v_w = kaiming_uniform(u_shape, gen), kaiming_uniform(v_shape, gen)
        u_mask, v_mask = random_mask(u_shape, nnz_u, gen), random_mask(v_shape, nnz_v, gen)
    module = SparseFactorized(MaskedWeight(u_w, u_mask), MaskedWeight(v_w, v_mask), **layer.geometry)
    return module, {"hidden": d, "factor_density": density, "exact": False}


def build_doped(layer: DenseLayer, config: IsoFLOP, gen: torch.Generator) -> tuple[nn.Module, dict]:
    w = layer.weight.detach().float().cpu()
    d_in, d_out = layer.d_in, layer.d_out
    r = doped_rank(d_in, d_out, config.sparsity)
    # the sparse part takes whatever the floor in r leaves, so the total matches the dense layer
    nnz = max(0, min(w.numel(), d_in * d_out - r * (d_in + d_out)))
    up = down = None
    if config.init == "preserve":
        residual = w.reshape(d_out, d_in)
        if r:
            up, down = _svd_factors(residual, r)
            residual = residual - up @ down
        mask = topk_mask(residual, nnz).view(w.shape)
        sparse = residual.view(w.shape) * mask
    else:
        sparse, mask = kaiming_uniform(tuple(w.shape), gen), random_mask(w.shape, nnz, gen)
        if r:
            up, down = kaiming_uniform((d_out, r), gen), kaiming_uniform((r, d_in), gen)
    module = SparseDoped(MaskedWeight(sparse, mask), up, down, **layer.geometry)
    return module, {"rank": r, "sparse_density": nnz / w.numel(), "exact": r == 0 and nnz == w.numel()}


def build_wide(
    layer: DenseLayer, config: IsoFLOP, gen: torch.Generator, widen_in: bool, widen_out: bool
) -> tuple[nn.Module, dict]:
    w = layer.weight.detach().float().cpu()
    d_out, c_in = w.shape[0], w.shape[1]
    new_out = widened_width(d_out, config.sparsity) if widen_out else d_out
    new_in = widened_width(c_in, config.sparsity) if widen_in else c_in
    shape = (new_out, new_in, *w.shape[2:])
    nnz = w.numel()  # iso-FLOP: exactly the dense layer's number of weights
    bias = layer.bias.detach().float().cpu() if layer.bias is not None else None
    if config.init == "preserve":
        # the dense weights are the kept block; new rows / columns start inactive (inert)
        weight = torch.zeros(shape)
        weight[:d_out, :c_in] = w
        mask = torch.zeros(shape, dtype=torch.bool)
        mask[:d_out, :c_in] = True
        new_bias = torch.zeros(new_out) if bias is not None else None
        if new_bias is not None:
            new_bias[:d_out] = bias
    else:
        weight, mask = kaiming_uniform(shape, gen), random_mask(shape, nnz, gen)
        new_bias = None
        if bias is not None:
            bound = 1.0 / math.sqrt(math.prod(shape[1:]))
            new_bias = torch.empty(new_out).uniform_(-bound, bound, generator=gen)
    module = SparseWide(MaskedWeight(weight, mask), new_bias, **layer.geometry)
    details = {
        "widen_factor": wide_factor(config.sparsity),
        "widened": [side for side, on in (("in", widen_in), ("out", widen_out)) if on],
        "shape": list(shape),
        "density": nnz / math.prod(shape),
        "exact": config.init == "preserve",
    }
    return module, details
