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
    FactorNorm,
    SparseDoped,
    SparseFactorized,
    SparseParallel,
    SparseParallelBN,
    SparseWide,
)
from sparsify_fx.passes.iso_flop.masks import MaskedWeight, random_mask, topk_mask

import sparsify_fx as sfx

__all__ = [
    "DenseLayer", "build_parallel", "build_factorized", "build_doped", "build_wide", "layer_options",
    "set_schedules",
]

# a branch count times the density within this of 1 still counts as covering every weight
# (1 / (1 - 0.9) is 9.999999999999998 in floating point)
_COVER_TOL = 1e-6


@dataclass
class DenseLayer:
    """What a replacement needs to know about the dense op it replaces."""

    op: sfx.DenseOp
    param: nn.Parameter  # the replaced layer's own weight, as stored
    transposed: bool  # stored as the transpose of the op's layout (a `x @ W` weight)
    bias: nn.Parameter | None
    geometry: dict[str, Any]
    positions: int | None  # output positions (batch x spatial); None without shapes
    input_meta: tuple[tuple[int, ...], torch.dtype] | None  # recorded before any widening

    @property
    def weight(self) -> torch.Tensor:
        """The weight in the op's layout ``[D_out, c_in, *kernel]`` (a view of ``param``)."""
        return self.param.t() if self.transposed else self.param

    @property
    def d_out(self) -> int:
        return self.weight.shape[0]

    @property
    def d_in(self) -> int:
        return math.prod(self.weight.shape[1:])


def layer_options(layer: DenseLayer, config: IsoFLOP, gen: torch.Generator) -> dict[str, Any]:
    """Constructor options of a replacement: the op's geometry, the init to draw after
    verification and its seed (drawn from the pass's seeded generator: the same on every rank)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    return {**layer.geometry, "init": config.init, "seed": seed, "dynamic": config.dynamic}


def set_schedules(module: nn.Module, config: IsoFLOP) -> None:
    for m in module.modules():
        if isinstance(m, MaskedWeight):
            m.set_schedule(config.dynamic, config.update_every, config.drop_fraction, config.stop_at)


def _original(layer: DenseLayer, mask: torch.Tensor, target_nnz: int) -> MaskedWeight:
    """The replaced layer's own weight as a masked weight (a live part of the replacement)."""
    return MaskedWeight(layer.param, mask, transposed=layer.transposed, target_nnz=target_nnz)


def _branch_norm(bn: nn.Module) -> nn.Module:
    """A branch's own BatchNorm, set so that the branches' sum is the dense conv + ``bn`` in
    eval: ``bn``'s scale, zero mean and zero shift (branch 0, ``bn`` itself, adds those)."""
    new = type(bn)(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                   track_running_stats=bn.track_running_stats)
    with torch.no_grad():
        if bn.affine:
            new.weight.copy_(bn.weight)
        if bn.track_running_stats:
            new.running_var.copy_(bn.running_var)
    return new.to(next(iter(bn.buffers()), torch.empty(0)).device)


def build_parallel(
    layer: DenseLayer, config: IsoFLOP, gen: torch.Generator, bn: nn.Module | None = None
) -> tuple[nn.Module, dict]:
    w = layer.weight.detach().float().cpu()
    n = parallel_branches(config.sparsity)
    numel = w.numel()
    nnz = round((1.0 - config.sparsity) * numel)
    if n * (1.0 - config.sparsity) >= 1.0 - _COVER_TOL:
        # 1/(1-s) is an integer: rounding each branch's count must not leave weights uncovered
        nnz = max(nnz, math.ceil(numel / n))
    exact = True
    options = layer_options(layer, config, gen)
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
            if b == 0:
                # branch 0 is the layer's own weight: it owns every position of its mask
                branches.append(_original(layer, mask.view(w.shape), nnz))
                continue
            values = torch.where(owner == b, w.flatten(), torch.zeros(()))
            branches.append(MaskedWeight(values.view(w.shape), mask.view(w.shape)))
    else:
        # verified as the dense layer itself (branch 0 whole, the others zero), then re-drawn
        branches = [_original(layer, torch.ones(w.shape, dtype=torch.bool), nnz)]
        branches += [
            MaskedWeight(torch.zeros(w.shape), random_mask(w.shape, nnz, gen)) for _ in range(n - 1)
        ]
    details = {"branches": n, "branch_density": nnz / numel, "exact": exact,
               "original_weight": "branch 0 (masked like the others)"}
    if bn is None:
        module: nn.Module = SparseParallel(branches, **options)
    else:
        module = SparseParallelBN(branches, [bn, *(_branch_norm(bn) for _ in range(n - 1))], **options)
        details["branch_norm"] = (
            f"each branch its own {type(bn).__name__}, summed after normalisation (branch 0: the "
            "original); training runs the branches as separate convs, eval folds them into one")
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


def _factor_identity(layer: DenseLayer, d: int, signs: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Factors whose product is the dense weight, with the dense weight itself as one factor's
    leading block: ``"u"`` (U's first D_out rows are W, V selects them) when ``d >= D_out``,
    else ``"v"`` (U copies the input patch: an identity / im2col, V's first D_in columns are
    W). ``signs=2`` adds the negated copy so that a ReLU between the factors passes
    ``relu(h) - relu(-h) = h``. Returns the new parts of U and V (zeros under the block)."""
    w = layer.weight.detach().float().cpu()
    d_in, d_out, c_in = layer.d_in, layer.d_out, w.shape[1]
    kernel = tuple(w.shape[2:])
    u = torch.zeros(d, c_in, *kernel)
    v = torch.zeros(d_out, d, *(1,) * len(kernel))
    u2, v2 = u.view(d, d_in), v.view(d_out, d)
    if d >= signs * d_out:
        v2[:, :d_out] = torch.eye(d_out)
        if signs == 2:
            u[d_out:2 * d_out] = -w
            v2[:, d_out:2 * d_out] = -torch.eye(d_out)
        return u, v, "u"
    u2[:d_in] = torch.eye(d_in)
    if signs == 2:
        u2[d_in:2 * d_in] = -torch.eye(d_in)
        v2[:, d_in:2 * d_in] = -w.reshape(d_out, d_in)
    return u, v, "v"


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
    options = layer_options(layer, config, gen)
    relu = config.factorized_norm == "bn_relu"
    norm = FactorNorm(d, layer.op.conv_ndim if layer.op.kind == "conv" else 0, relu) if config.factorized_norm else None
    if norm is not None:
        norm.make_identity_()
    details: dict[str, Any] = {"hidden": d, "factor_density": density, "norm": config.factorized_norm}
    signs = 2 if relu and d >= 2 * min(d_out, d_in) else 1
    if d >= min(d_out, d_in):
        u_w, v_w, holder = _factor_identity(layer, d, signs)
        full_u, full_v = u_w.clone(), v_w.clone()
        if holder == "u":
            full_u[:d_out] = w
        else:
            full_v.view(d_out, d)[:, :d_in] = w.reshape(d_out, d_in)
        if config.init == "preserve":
            u_mask, v_mask = topk_mask(full_u, nnz_u), topk_mask(full_v, nnz_v)
            exact = False
        else:
            u_mask = torch.ones(u_shape, dtype=torch.bool)
            v_mask = torch.ones(v_shape, dtype=torch.bool)
            exact = not relu or signs == 2
        kept = {"kept": layer.param, "transposed": layer.transposed}
        u = MaskedWeight(u_w, u_mask, target_nnz=nnz_u, **(kept if holder == "u" else {}))
        v = MaskedWeight(v_w, v_mask, target_nnz=nnz_v, **(kept if holder == "v" else {}))
        details["original_weight"] = ("the leading D_out rows of U" if holder == "u"
                                      else "the leading D_in columns of V")
        if relu and signs == 1:
            if config.init == "random" and norm is not None:
                # no function-preserving init passes a ReLU at this width: verify the
                # factors without it; reinitialize() turns it on with the random init
                norm.relu_on = False
                exact = True
                details["verified_without_relu"] = (
                    f"d={d} < 2 min(D_in, D_out): verified with the ReLU between the factors off")
            else:
                details["why_inexact"] = (
                    f"a ReLU between the factors needs d >= 2 min(D_in, D_out) to pass W exactly (d={d})")
    else:
        # d < min(D_in, D_out) (sparsity below 0.5): neither factor can hold W; best rank-d
        up, down = _svd_factors(w.reshape(d_out, d_in), d)
        u_w, v_w = down.view(u_shape), up.view(v_shape)
        u_mask, v_mask = topk_mask(u_w, nnz_u), topk_mask(v_w, nnz_v)
        u = MaskedWeight(u_w * u_mask, u_mask)
        v = MaskedWeight(v_w * v_mask, v_mask)
        exact = False
        details["original_weight"] = None
        details["why_inexact"] = f"hidden width {d} < min(D_in, D_out): truncated SVD"
    if config.init == "preserve" and "why_inexact" not in details:
        details["why_inexact"] = "the factors are masked to iso-FLOP: W's smallest weights are dropped"
    module = SparseFactorized(u, v, norm, **options)
    details["exact"] = exact
    return module, details


def build_doped(layer: DenseLayer, config: IsoFLOP, gen: torch.Generator) -> tuple[nn.Module, dict]:
    w = layer.weight.detach().float().cpu()
    d_in, d_out = layer.d_in, layer.d_out
    r = doped_rank(d_in, d_out, config.sparsity)
    # the sparse part takes whatever the floor in r leaves, so the total matches the dense layer
    nnz = max(0, min(w.numel(), d_in * d_out - r * (d_in + d_out)))
    options = layer_options(layer, config, gen)
    up = down = None
    if config.init == "preserve":
        # the sparse part keeps W's largest weights; the low-rank part approximates the rest
        mask = topk_mask(w, nnz)
        if r:
            up, down = _svd_factors((w * ~mask).reshape(d_out, d_in), r)
        exact = bool(mask.all())
    else:
        # verified as the dense layer itself (whole mask, zero low-rank part), then re-drawn
        mask = torch.ones(w.shape, dtype=torch.bool)
        if r:
            up, down = torch.zeros(d_out, r), torch.zeros(r, d_in)
        exact = True
    module = SparseDoped(_original(layer, mask, nnz), up, down, **options)
    details = {"rank": r, "sparse_density": nnz / w.numel(), "exact": exact,
               "original_weight": "the sparse matrix"}
    return module, details


def build_wide(
    layer: DenseLayer, config: IsoFLOP, gen: torch.Generator, widen_in: bool, widen_out: bool
) -> tuple[nn.Module, dict]:
    w = layer.weight
    d_out, c_in = w.shape[0], w.shape[1]
    new_out = widened_width(d_out, config.sparsity) if widen_out else d_out
    new_in = widened_width(c_in, config.sparsity) if widen_in else c_in
    shape = (new_out, new_in, *w.shape[2:])
    nnz = w.numel()  # iso-FLOP: exactly the dense layer's number of weights
    # the dense weights are the kept block; new rows / columns start inactive (inert) and the
    # configured init re-draws the mask over the whole widened layer after verification
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[:d_out, :c_in] = True
    weight = MaskedWeight(torch.zeros(shape), mask, kept=layer.param, transposed=layer.transposed, target_nnz=nnz)
    extra = torch.zeros(new_out - d_out) if layer.bias is not None and new_out > d_out else None
    module = SparseWide(weight, layer.bias, extra, **layer_options(layer, config, gen))
    details = {
        "widen_factor": wide_factor(config.sparsity),
        "widened": [side for side, on in (("in", widen_in), ("out", widen_out)) if on],
        "shape": list(shape),
        "density": nnz / math.prod(shape),
        "exact": True,
        "original_weight": "the kept leading block (and its bias the leading bias entries)",
    }
    return module, details
