"""Sparse Iso-FLOP Transformations (Sparse-IFT, arXiv 2303.11525): replace a dense Linear /
Conv by a *sparse* layer family with the same counted FLOPs but more capacity.

For a dense layer ``W`` of shape ``[D_out, D_in]`` (``D_in = c_in * kh * kw`` for convs) and
sparsity ``s``:

* ``parallel``: ``n = round(1 / (1 - s))`` sparse branches of ``W``'s shape, each at density
  ``1 - s``, summed (the branches share the input, so the sum of their outputs is the op
  applied once to the sum of their masked weights: that is how it is computed).
* ``factorized``: ``W -> V @ U`` with hidden width ``d = ceil(D_in D_out / ((1-s)(D_in+D_out)))``;
  ``U`` is the original op (kxk conv / linear) to ``d`` outputs, ``V`` a 1x1 conv / linear.
* ``doped``: a sparse full matrix plus a dense rank-``r`` product ``B @ A`` with
  ``r = floor(s D_in D_out / (D_in + D_out))``.
* ``wide``: in ``dense -> elementwise ops / BatchNorm -> dense`` chains, the inner width is
  multiplied by ``k = sqrt(1 / (1 - s))``; each widened layer is masked to the dense layer's
  number of weights (density ``1 - s`` when both of its dims are widened).

Masks are boolean buffers applied in forward (``weight * mask``), so weights outside the mask
get zero gradient and stay zero under SGD / Adam; :func:`apply_masks_` re-zeroes the stored
weights (after loading a checkpoint or after an optimizer with stale state). :class:`RigL`
updates the masks during training (drop smallest ``|w|``, grow largest dense ``|grad|``).

``init="preserve"`` starts from the dense weights: exact for ``parallel`` (when
``round(1/(1-s)) * (1-s) >= 1``) and ``wide``; best-effort for ``factorized`` (truncated SVD,
then magnitude masking) and ``doped`` (truncated SVD plus the residual's largest entries);
each Rewrite records ``details["exact"]`` and the measured ``details["divergence"]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import sparsify_fx as sfx
from sparsify_fx import ConfigError, PassConfig, PassResult, Rewrite, check_range

__all__ = [
    "IsoFLOP",
    "ISO_FLOP_KINDS",
    "MaskedWeight",
    "SparseParallel",
    "SparseFactorized",
    "SparseDoped",
    "SparseWide",
    "RigL",
    "apply_masks_",
    "masked_weights",
    "hidden_width",
    "doped_rank",
    "parallel_branches",
    "wide_factor",
]

ISO_FLOP_KINDS = ("wide", "parallel", "factorized", "doped")
_INITS = ("preserve", "random")
# a branch count times the density within this of 1 still counts as covering every weight
# (1 / (1 - 0.9) is 9.999999999999998 in floating point)
_COVER_TOL = 1e-6


@dataclass(frozen=True)
class IsoFLOP(PassConfig):
    """Replace dense Linear / Conv layers by sparse iso-FLOP families (Sparse-IFT).

    Args:
        kind: ``"wide"``, ``"parallel"``, ``"factorized"`` or ``"doped"``.
        sparsity: fraction of zero weights in each sparse factor, in [0, 1).
        init: ``"preserve"`` (start from the dense weights; exact for parallel and wide) or
            ``"random"`` (kaiming-uniform weights and uniform random masks, the paper's setting).
        skip_first_last: keep the model's first and last dense layers dense (the paper's
            default: stem and head stay dense).
        seed: seed of the random masks / weights (identical on every rank).

    Example:
        >>> import torch, sparsify_fx as sfx
        >>> m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16),
        ...                         torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> fast = sfx.sparsify(m, sfx.IsoFLOP(kind="parallel", sparsity=0.5),
        ...                     example_inputs=(torch.randn(4, 8),))
        >>> [(r.module, r.flops_before, r.flops_after) for r in sfx.explain(fast).rewrites]
        [('2', 2048, 2048)]
    """

    kind: str = "parallel"
    sparsity: float = 0.5
    init: str = "preserve"
    skip_first_last: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind not in ISO_FLOP_KINDS:
            raise ConfigError(f"IsoFLOP.kind must be one of {list(ISO_FLOP_KINDS)}, got {self.kind!r}")
        check_range(self, "sparsity", self.sparsity, 0.0, 1.0, high_open=True)
        if self.init not in _INITS:
            raise ConfigError(f"IsoFLOP.init must be one of {list(_INITS)}, got {self.init!r}")
        if not isinstance(self.skip_first_last, bool):
            raise ConfigError(f"IsoFLOP.skip_first_last must be a bool, got {self.skip_first_last!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"IsoFLOP.seed must be an int, got {self.seed!r}")


# ---------------------------------------------------------------- formulas


def parallel_branches(sparsity: float) -> int:
    """``round(1 / (1 - s))`` branches (Python rounding: half to even)."""
    return max(1, round(1.0 / (1.0 - sparsity)))


def hidden_width(d_in: int, d_out: int, sparsity: float) -> int:
    """Factorized hidden width ``ceil(D_in D_out / ((1 - s)(D_in + D_out)))``."""
    # the epsilon keeps exact products (s=0.5 -> 1/(1-s) = 2.0000000000000004) from ceiling up
    return max(1, math.ceil(d_in * d_out / ((1.0 - sparsity) * (d_in + d_out)) - 1e-9))


def doped_rank(d_in: int, d_out: int, sparsity: float) -> int:
    """Doped low-rank width ``floor(s D_in D_out / (D_in + D_out))``."""
    return int(math.floor(sparsity * d_in * d_out / (d_in + d_out) + 1e-9))


def wide_factor(sparsity: float) -> float:
    """Widening factor ``k = sqrt(1 / (1 - s))``."""
    return math.sqrt(1.0 / (1.0 - sparsity))


def _widen(n: int, sparsity: float) -> int:
    return max(n, round(n * wide_factor(sparsity)))


# ---------------------------------------------------------------- masked weights


class MaskedWeight(nn.Module):
    """A weight and its boolean mask; ``forward()`` returns ``weight * mask``.

    Multiplying in forward (instead of masking the stored weight once) makes every gradient
    outside the mask exactly zero, so masked weights stay zero through optimizer steps.
    When ``capture_dense_grad`` is set (by :class:`RigL`), the gradient of the *effective*
    weight, dense including the masked positions, is kept in ``dense_grad``.
    """

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.register_buffer("mask", mask.to(torch.bool))
        self.capture_dense_grad = False
        self.dense_grad: torch.Tensor | None = None

    @property
    def nnz(self) -> int:
        """Number of active (unmasked) weights."""
        return int(self.mask.sum())

    @property
    def density(self) -> float:
        return self.nnz / self.mask.numel()

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}, density={self.density:.4f}"

    def forward(self) -> torch.Tensor:
        effective = self.weight * self.mask
        if self.capture_dense_grad and effective.requires_grad:
            effective.register_hook(self._keep_dense_grad)
        return effective

    def _keep_dense_grad(self, grad: torch.Tensor) -> None:
        grad = grad.detach()
        self.dense_grad = grad.clone() if self.dense_grad is None else self.dense_grad + grad


def masked_weights(model: nn.Module) -> list[tuple[str, MaskedWeight]]:
    """Every :class:`MaskedWeight` of ``model`` with its qualified name."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MaskedWeight)]


def apply_masks_(model: nn.Module) -> int:
    """Zero every stored weight outside its mask (in place); returns how many were nonzero.

    Forward already applies the masks; this keeps the *stored* tensors sparse too (after
    loading weights from elsewhere, or when optimizer state moved masked entries).
    """
    changed = 0
    with torch.no_grad():
        for _, m in masked_weights(model):
            outside = ~m.mask & (m.weight != 0)
            changed += int(outside.sum())
            m.weight.mul_(m.mask)
    return changed


def _random_mask(shape: torch.Size | tuple[int, ...], nnz: int, gen: torch.Generator) -> torch.Tensor:
    """Exactly ``nnz`` active positions, uniformly at random (seeded: same on every rank)."""
    numel = math.prod(shape)
    mask = torch.zeros(numel, dtype=torch.bool)
    if nnz >= numel:
        mask[:] = True
    elif nnz > 0:
        # top-k of uniform scores is a uniform k-subset, and much faster than randperm
        mask[torch.rand(numel, generator=gen).topk(nnz, sorted=False).indices] = True
    return mask.view(shape)


def _topk_mask(values: torch.Tensor, nnz: int) -> torch.Tensor:
    """Mask of the ``nnz`` largest ``|values|``."""
    flat = values.detach().abs().flatten()
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if nnz >= flat.numel():
        mask[:] = True
    elif nnz > 0:
        mask[flat.topk(nnz, sorted=False).indices] = True
    return mask.view(values.shape)


def _kaiming(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    # nn.Linear / nn.Conv default: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    bound = 1.0 / math.sqrt(max(1, fan_in))
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


# ---------------------------------------------------------------- replacement modules

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class _IsoFLOPOp(nn.Module):
    """Base of the replacement modules: the geometry of the dense op they replace."""

    def __init__(self, conv_ndim: int = 0, stride=(), padding=(), dilation=()):
        super().__init__()
        self.conv_ndim = int(conv_ndim)
        self.stride, self.padding, self.dilation = list(stride), list(padding), list(dilation)

    def _op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if self.conv_ndim == 0:
            return F.linear(x, w, b)
        return _CONV_FN[self.conv_ndim](x, w, b, self.stride, self.padding, self.dilation)

    def _pointwise(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if self.conv_ndim == 0:
            return F.linear(x, w, b)
        return _CONV_FN[self.conv_ndim](x, w, b)

    def extra_repr(self) -> str:
        if self.conv_ndim == 0:
            return "linear"
        return f"conv{self.conv_ndim}d, stride={self.stride}, padding={self.padding}, dilation={self.dilation}"


class SparseParallel(_IsoFLOPOp):
    """``forward(x, bias)``: sum of ``n`` sparse branches of the dense op's shape."""

    def __init__(self, branches: list[MaskedWeight], **geometry: Any):
        super().__init__(**geometry)
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # the branches share their input, so summing the weights first is the same function
        # (and the same gradients) at the cost of one dense op instead of n
        weight = self.branches[0]()
        for branch in self.branches[1:]:
            weight = weight + branch()
        return self._op(x, weight, bias)


class SparseFactorized(_IsoFLOPOp):
    """``forward(x, bias)``: ``V(U(x))``, U the dense op's geometry to ``d`` outputs, V pointwise."""

    def __init__(self, u: MaskedWeight, v: MaskedWeight, **geometry: Any):
        super().__init__(**geometry)
        self.u, self.v = u, v

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self._pointwise(self._op(x, self.u(), None), self.v(), bias)


class SparseDoped(_IsoFLOPOp):
    """``forward(x, bias)``: the op with weight ``sparse * mask + (up @ down)`` (dense low rank)."""

    def __init__(self, sparse: MaskedWeight, up: torch.Tensor | None, down: torch.Tensor | None, **geometry: Any):
        super().__init__(**geometry)
        self.sparse = sparse
        self.up = nn.Parameter(up) if up is not None else None
        self.down = nn.Parameter(down) if down is not None else None

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.sparse()
        if self.up is not None and self.down is not None:
            weight = weight + (self.up @ self.down).view_as(weight)
        return self._op(x, weight, bias)


class SparseWide(_IsoFLOPOp):
    """``forward(x)``: the op widened on its input and/or output side, masked to iso-FLOP."""

    def __init__(self, weight: MaskedWeight, bias: torch.Tensor | None, **geometry: Any):
        super().__init__(**geometry)
        self.masked = weight
        self.bias = nn.Parameter(bias) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._op(x, self.masked(), self.bias)


# ---------------------------------------------------------------- building one replacement


@dataclass
class _Layer:
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


def _parallel(layer: _Layer, config: IsoFLOP, gen: torch.Generator) -> tuple[nn.Module, dict]:
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
            MaskedWeight(_kaiming(tuple(w.shape), gen), _random_mask(w.shape, nnz, gen)) for _ in range(n)
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


def _factorized(layer: _Layer, config: IsoFLOP, gen: torch.Generator) -> tuple[nn.Module, dict]:
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
        u_mask, v_mask = _topk_mask(u_w, nnz_u), _topk_mask(v_w, nnz_v)
        u_w, v_w = u_w * u_mask, v_w * v_mask
    else:
        u_w, v_w = _kaiming(u_shape, gen), _kaiming(v_shape, gen)
        u_mask, v_mask = _random_mask(u_shape, nnz_u, gen), _random_mask(v_shape, nnz_v, gen)
    module = SparseFactorized(MaskedWeight(u_w, u_mask), MaskedWeight(v_w, v_mask), **layer.geometry)
    return module, {"hidden": d, "factor_density": density, "exact": False}


def _doped(layer: _Layer, config: IsoFLOP, gen: torch.Generator) -> tuple[nn.Module, dict]:
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
        mask = _topk_mask(residual, nnz).view(w.shape)
        sparse = residual.view(w.shape) * mask
    else:
        sparse, mask = _kaiming(tuple(w.shape), gen), _random_mask(w.shape, nnz, gen)
        if r:
            up, down = _kaiming((d_out, r), gen), _kaiming((r, d_in), gen)
    module = SparseDoped(MaskedWeight(sparse, mask), up, down, **layer.geometry)
    return module, {"rank": r, "sparse_density": nnz / w.numel(), "exact": r == 0 and nnz == w.numel()}


def _wide(
    layer: _Layer, config: IsoFLOP, gen: torch.Generator, widen_in: bool, widen_out: bool
) -> tuple[nn.Module, dict]:
    w = layer.weight.detach().float().cpu()
    d_out, c_in = w.shape[0], w.shape[1]
    new_out = _widen(d_out, config.sparsity) if widen_out else d_out
    new_in = _widen(c_in, config.sparsity) if widen_in else c_in
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
        weight, mask = _kaiming(shape, gen), _random_mask(shape, nnz, gen)
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


# ---------------------------------------------------------------- the wide chains

# unary ops that act per element, so they do not care how wide the channel dim is
_ELEMENTWISE_FUNCTIONS = {
    F.relu, F.relu6, F.gelu, F.silu, F.elu, F.leaky_relu, F.hardtanh, F.hardswish, F.mish,
    F.dropout, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh, torch.relu, torch.nn.functional.softplus,
}
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.ELU, nn.LeakyReLU, nn.Hardtanh, nn.Hardswish,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.Identity,
)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class _Chain:
    """The nodes between a widened producer and its consumers."""

    nodes: list[fx.Node]
    batchnorms: list[fx.Node]
    consumers: list[fx.Node]


def _only_first_arg(node: fx.Node, source: fx.Node) -> bool:
    extra = list(node.args[1:]) + list(node.kwargs.values())
    return bool(node.args) and node.args[0] is source and not any(isinstance(a, fx.Node) for a in extra)


def _follow_chain(
    gm: fx.GraphModule, producer: sfx.DenseOp, dense_by_node: dict[fx.Node, sfx.DenseOp]
) -> tuple[_Chain | None, str]:
    """The elementwise chain from ``producer`` to dense consumers, or None and why not."""
    chain = _Chain([], [], [])
    frontier = [producer.node]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            consumer = dense_by_node.get(user)
            if consumer is not None:
                if consumer.input is not node or user in (consumer.weight, consumer.bias):
                    return None, f"output is a weight/bias of {user.format_node()}"
                if consumer.kind != producer.kind:
                    return None, f"output feeds {user.format_node()} of another kind ({consumer.kind})"
                if user not in chain.consumers:
                    chain.consumers.append(user)
                continue
            if user.op == "call_function" and user.target in _ELEMENTWISE_FUNCTIONS and _only_first_arg(user, node):
                chain.nodes.append(user)
                frontier.append(user)
                continue
            if user.op == "call_module" and _only_first_arg(user, node):
                module = gm.get_submodule(str(user.target))
                if type(module) in _ELEMENTWISE_MODULES:
                    chain.nodes.append(user)
                    frontier.append(user)
                    continue
                if isinstance(module, _BATCHNORMS) and producer.kind == "conv":
                    chain.batchnorms.append(user)
                    chain.nodes.append(user)
                    frontier.append(user)
                    continue
            return None, (
                f"output reaches {user.format_node()}, which is not an elementwise op, BatchNorm "
                "or dense layer, so its width cannot change"
            )
    if not chain.consumers:
        return None, "output reaches no dense layer to widen with it"
    return chain, ""


def _widened_batchnorm(bn: nn.modules.batchnorm._BatchNorm, features: int) -> nn.Module:
    new = type(bn)(features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                   track_running_stats=bn.track_running_stats)
    new = new.to(device=next(iter(bn.buffers()), torch.empty(0)).device)
    c = bn.num_features
    with torch.no_grad():
        # new channels are fed zeros by inert units: mean 0 / var 1 / gamma 1 / beta 0 keeps
        # them at zero in both modes
        if bn.affine:
            new.weight[:c] = bn.weight
            new.bias[:c] = bn.bias
        if bn.track_running_stats:
            new.running_mean[:c] = bn.running_mean
            new.running_var[:c] = bn.running_var
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    return new


# ---------------------------------------------------------------- the pass


def _candidate_reason(gm: fx.GraphModule, op: sfx.DenseOp, config: IsoFLOP, ctx: Any) -> str | None:
    reason = ctx.selection_reason(config, op, op.module_name, gm)
    if reason is not None:
        return reason
    if config.skip_first_last and ctx.qualified(op.module_name) in ctx.first_last:
        return "first/last dense layer kept dense (skip_first_last=True; the paper keeps stem and head dense)"
    weight = gm.get_parameter(op.weight_name)
    if not weight.requires_grad:
        return "weight does not require grad (frozen layer): nothing to train sparsely"
    if op.kind == "conv":
        if op.groups != 1:
            return f"grouped/depthwise conv (groups={op.groups}) is not supported by IsoFLOP"
        if op.conv_padding_ints(weight.shape) is None:
            return "padding='same' with an even kernel needs asymmetric padding (not supported)"
    if op.kind == "matmul" and weight.dim() != 2:
        return "matmul weight is not 2-D"
    for node in gm.graph.nodes:
        # tied weights are one Parameter under several names (out.weight = embed.weight)
        if node.op == "get_attr" and _attr(gm, str(node.target)) is weight:
            if any(user is not op.node for user in node.users):
                return "weight is shared with another op (tied weights); rewriting one use would untie them"
    return None


def _attr(gm: fx.GraphModule, target: str) -> object:
    try:
        return gm.get_parameter(target)
    except AttributeError:
        return None


def _layer_of(gm: fx.GraphModule, op: sfx.DenseOp) -> _Layer:
    weight = gm.get_parameter(op.weight_name)
    bias = gm.get_parameter(str(op.bias.target)) if op.bias is not None else None
    w = weight.t() if op.weight_transposed else weight
    geometry: dict[str, Any] = {}
    if op.kind == "conv":
        geometry = {
            "conv_ndim": op.conv_ndim,
            "stride": op.stride,
            "padding": op.conv_padding_ints(weight.shape),
            "dilation": op.dilation,
        }
    positions = None
    out = sfx.tensor_meta(op.node)
    if out is not None:
        shape = out[0]
        channels = shape[1] if op.kind == "conv" else (shape[-1] if shape else 1)
        positions = math.prod(shape) // max(1, channels)
    return _Layer(op, w, bias, geometry, positions, sfx.tensor_meta(op.input))


def _counts(module: nn.Module) -> tuple[int, int]:
    """(nonzero weights counted, dense numel of every weight factor) of a replacement."""
    nnz = numel = 0
    for m in module.modules():
        if isinstance(m, MaskedWeight):
            nnz += m.nnz
            numel += m.mask.numel()
    if isinstance(module, SparseDoped) and module.up is not None:
        low_rank = module.up.numel() + module.down.numel()
        nnz += low_rank
        numel += low_rank
    return nnz, numel


def _dense_kernel_flops(module: nn.Module, layer: _Layer) -> int | None:
    """Matmul / conv FLOPs the dense-tensor implementation runs (as FlopCounterMode counts:
    2 per multiply-add; elementwise mask products and sums are not included)."""
    if layer.positions is None:
        return None
    n = layer.positions
    if isinstance(module, SparseParallel):
        return 2 * n * layer.weight.numel()
    if isinstance(module, SparseDoped):
        flops = 2 * n * layer.weight.numel()
        if module.up is not None:
            flops += 2 * module.up.shape[0] * module.up.shape[1] * module.down.shape[1]
        return flops
    if isinstance(module, SparseFactorized):
        return 2 * n * (module.u.mask.numel() + module.v.mask.numel())
    if isinstance(module, SparseWide):
        return 2 * n * module.masked.mask.numel()
    return None


def _divergence(
    module: nn.Module, layer: _Layer, extra_in: int, gen: torch.Generator
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
            ref = _CONV_FN[op.conv_ndim](x, w, b, op.stride, layer.geometry["padding"], op.dilation)
        else:
            ref = F.linear(x, w, b)
        if extra_in:
            dim = 1 if op.kind == "conv" else x.dim() - 1
            pad_shape = list(x.shape)
            pad_shape[dim] = extra_in
            x = torch.cat([x, torch.randn(pad_shape, generator=gen).to(x)], dim=dim)
        args = (x,) if isinstance(module, SparseWide) else (x, b)
        out = module.to(device)(*args)
        dim = 1 if op.kind == "conv" else out.dim() - 1
        kept = out.narrow(dim, 0, ref.shape[dim])
        err = (kept.double() - ref.double()).abs().max()
        if out.shape[dim] > ref.shape[dim]:
            new_units = out.narrow(dim, ref.shape[dim], out.shape[dim] - ref.shape[dim])
            err = torch.maximum(err, new_units.double().abs().max())
    scale = float(ref.double().abs().max()) or 1.0
    return float(err), float(err) / scale


def _live_input(op: sfx.DenseOp) -> fx.Node:
    # a widened BatchNorm upstream may have replaced the node op.input was found as
    if op.node.target is torch.addmm:
        return op.node.args[1]
    return op.node.args[0] if op.node.args else op.node.kwargs["input"]


@sfx.register_pass(IsoFLOP, name="isoflop")
def _isoflop_pass(gm: fx.GraphModule, config: IsoFLOP, ctx: Any) -> PassResult:
    ops, unmatched = sfx.find_dense_ops(gm)
    result = PassResult(gm, modified=False)
    for node, why in unmatched:
        result.skips.append(ctx.skip(node, why))
    gen = torch.Generator().manual_seed(config.seed)
    candidates: list[sfx.DenseOp] = []
    for op in ops:
        reason = _candidate_reason(gm, op, config, ctx)
        if reason is not None:
            result.skips.append(ctx.skip(op, reason))
        else:
            candidates.append(op)

    widen_in: set[fx.Node] = set()
    widen_out: dict[fx.Node, _Chain] = {}
    if config.kind == "wide":
        dense_by_node = {op.node: op for op in ops}
        chosen = {op.node for op in candidates}
        why_not: dict[fx.Node, str] = {}
        for op in candidates:
            chain, why = _follow_chain(gm, op, dense_by_node)
            if chain is not None:
                blocked = [c for c in chain.consumers if c not in chosen]
                if blocked:
                    chain, why = None, f"its consumer {blocked[0].format_node()} is not rewritten (see its skip)"
            if chain is None:
                why_not[op.node] = why
                continue
            widen_out[op.node] = chain
            widen_in.update(chain.consumers)
        kept = []
        for op in candidates:
            if op.node in widen_out or op.node in widen_in:
                kept.append(op)
            else:
                result.skips.append(ctx.skip(op, f"no widenable chain: {why_not.get(op.node, 'no widened producer')}"))
        candidates = kept

    # shapes are read before any rewrite: widening a producer changes its consumers' inputs
    layers = {op.node: _layer_of(gm, op) for op in candidates}
    for op in candidates:
        try:
            _rewrite(gm, layers[op.node], config, ctx, gen, result, op.node in widen_in, widen_out.get(op.node))
        except Exception as e:
            e.sfx_node = op.node  # type: ignore[attr-defined]
            raise
    return result


def _rewrite(
    gm: fx.GraphModule,
    layer: _Layer,
    config: IsoFLOP,
    ctx: Any,
    gen: torch.Generator,
    result: PassResult,
    widen_in: bool,
    chain: _Chain | None,
) -> None:
    op = layer.op
    extra_in = 0
    if config.kind == "parallel":
        module, details = _parallel(layer, config, gen)
    elif config.kind == "factorized":
        module, details = _factorized(layer, config, gen)
    elif config.kind == "doped":
        module, details = _doped(layer, config, gen)
    else:
        module, details = _wide(layer, config, gen, widen_in, chain is not None)
        if widen_in:
            extra_in = _widen(layer.weight.shape[1], config.sparsity) - layer.weight.shape[1]
    # .to(dtype) casts floating tensors only: the bool masks stay bool
    module = module.to(device=layer.weight.device, dtype=layer.weight.dtype)
    target = sfx.install_module(gm, f"isoflop_{op.module_name or op.node.name}", module)
    x = _live_input(op)
    args = (x,) if config.kind == "wide" else (x, op.bias)
    with gm.graph.inserting_before(op.node):
        new = gm.graph.call_module(target, args)
    flops_before = sfx.dense_op_flops(op, gm.get_parameter(op.weight_name).shape)
    unused = [op.weight_name]
    if config.kind == "wide" and op.bias is not None:
        unused.append(str(op.bias.target))
    # erasing the dense node clears what op.weight / op.bias point to: keep the nodes first
    params = (op.weight, op.bias) if config.kind == "wide" else (op.weight,)
    sfx.replace_node(op.node, new)
    for attr in params:
        if attr is not None and not attr.users:
            gm.graph.erase_node(attr)

    if chain is not None:
        _widen_chain(gm, op, [new, *chain.nodes], chain, config, unused)
    divergence, divergence_rel = _divergence(module, layer, extra_in, gen)
    nnz, numel = _counts(module)
    flops_after = None if layer.positions is None else 2 * layer.positions * nnz
    details.update(
        {
            "kind": config.kind,
            "sparsity": config.sparsity,
            "init": config.init,
            "nnz_before": layer.weight.numel(),
            "nnz_after": nnz,
            "numel_after": numel,
            "dense_kernel_flops": _dense_kernel_flops(module, layer),
            "divergence": divergence,
            "divergence_rel": divergence_rel,
            "divergence_input": "seeded randn of the recorded input shape, eval mode",
            "unused_parameters": [ctx.qualified(n) for n in unused],
            "note": "replaced dense parameters stay in the model (state_dict keys kept) "
            "but the rewritten forward no longer reads them",
        }
    )
    name = f"conv{op.conv_ndim}d" if op.kind == "conv" else op.kind
    result.rewrites.append(
        Rewrite(
            ctx.pass_name, new.name, ctx.qualified(op.module_name), name, target,
            flops_before=flops_before, flops_after=flops_after, details=details,
        )
    )
    result.modified = True


def _widen_chain(
    gm: fx.GraphModule, op: sfx.DenseOp, widened: list[fx.Node], chain: _Chain, config: IsoFLOP, unused: list[str]
) -> None:
    """Widen the BatchNorms of a producer's chain and the recorded shapes along it."""
    for bn_node in chain.batchnorms:
        bn = gm.get_submodule(str(bn_node.target))
        wide_bn = _widened_batchnorm(bn, _widen(bn.num_features, config.sparsity))
        target = sfx.install_module(gm, f"isoflop_{bn_node.target}", wide_bn)
        with gm.graph.inserting_before(bn_node):
            new = gm.graph.call_module(target, bn_node.args, bn_node.kwargs)
        unused.extend(f"{bn_node.target}.{n}" for n, _ in bn.named_parameters())
        widened[widened.index(bn_node)] = new
        sfx.replace_node(bn_node, new)
    for node in widened:
        meta = node.meta.get("sfx_shape")
        if meta is None:
            continue
        shape, dtype = list(meta[0]), meta[1]
        dim = 1 if op.kind == "conv" else len(shape) - 1
        shape[dim] = _widen(shape[dim], config.sparsity)
        node.meta["sfx_shape"] = (tuple(shape), dtype)


# ---------------------------------------------------------------- RigL


class RigL:
    """RigL mask updates (Evci et al. 2020) for every :class:`MaskedWeight` of a model.

    Every ``update_every`` steps until ``stop_fraction * total_steps``, each masked weight
    drops its ``f * nnz`` active weights of smallest ``|w|`` and grows as many inactive ones of
    largest dense ``|grad|`` (grown weights start at zero), with
    ``f = drop_fraction * (1 + cos(pi * step / stop_step)) / 2``. The number of active weights
    per layer never changes. Ties break by index (stable sorts), so identical gradients give
    identical masks on every rank.

    Distributed: the dense gradient (including masked positions) is captured by a hook on the
    effective weight, which DDP does not all-reduce, so when ``torch.distributed`` is
    initialised ``step()`` averages it over ranks itself before choosing; DDP's own
    all-reduce already covers the parameters' ``.grad``.

    Args:
        model: a module rewritten by ``IsoFLOP``.
        drop_fraction: initial fraction of active weights replaced per update, in (0, 1].
        update_every: steps between updates.
        stop_fraction: fraction of ``total_steps`` after which masks are frozen.
        total_steps: planned number of optimizer steps.
        optimizer: if given, its per-parameter state (momentum, Adam moments) is zeroed at
            every dropped and grown position, so stale state cannot move masked weights.

    Example:
        >>> import torch, sparsify_fx as sfx
        >>> from sparsify_fx.passes.iso_flop.rewrite import RigL
        >>> m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16),
        ...                         torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> fast = sfx.sparsify(m, sfx.IsoFLOP(kind="doped", init="random"), verify=False)
        >>> opt = torch.optim.SGD(fast.parameters(), lr=0.1)
        >>> rigl = RigL(fast, update_every=1, total_steps=4)
        >>> fast(torch.randn(4, 8)).sum().backward(); opt.step(); rigl.step()
        >>> rigl.updates
        1
    """

    def __init__(
        self,
        model: nn.Module,
        drop_fraction: float = 0.3,
        update_every: int = 100,
        stop_fraction: float = 0.75,
        total_steps: int = 1000,
        optimizer: torch.optim.Optimizer | None = None,
    ):
        check_range(self, "drop_fraction", drop_fraction, 0.0, 1.0, low_open=True)
        check_range(self, "stop_fraction", stop_fraction, 0.0, 1.0, low_open=True)
        for name, value in (("update_every", update_every), ("total_steps", total_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"RigL.{name} must be a positive int, got {value!r}")
        self.layers = masked_weights(model)
        if not self.layers:
            raise ConfigError("RigL found no masked weights in the model; rewrite it with sfx.IsoFLOP first")
        self.drop_fraction = drop_fraction
        self.update_every = update_every
        self.stop_step = max(1, int(stop_fraction * total_steps))
        self.optimizer = optimizer
        self.step_count = 0
        self.updates = 0
        self._arm()

    def drop_fraction_at(self, step: int) -> float:
        """Cosine-annealed drop fraction at ``step`` (0 from ``stop_step`` on)."""
        if step >= self.stop_step:
            return 0.0
        return self.drop_fraction * (1 + math.cos(math.pi * step / self.stop_step)) / 2

    def _is_update_step(self, step: int) -> bool:
        return step > 0 and step % self.update_every == 0 and step < self.stop_step

    def _arm(self) -> None:
        # the dense gradient costs a weight-sized copy: only keep it for the backward of a
        # step whose step() will update the masks
        want = self._is_update_step(self.step_count + 1)
        for _, m in self.layers:
            m.capture_dense_grad = want
            if not want:
                m.dense_grad = None

    def step(self) -> None:
        """Call once after each ``optimizer.step()``."""
        self.step_count += 1
        if self._is_update_step(self.step_count):
            fraction = self.drop_fraction_at(self.step_count)
            for _, m in self.layers:
                self._update(m, fraction)
            self.updates += 1
        self._arm()

    @torch.no_grad()
    def _update(self, m: MaskedWeight, fraction: float) -> None:
        grad = m.dense_grad
        if grad is None:
            return  # the layer did not run this step
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            grad = grad.clone()
            torch.distributed.all_reduce(grad)
            grad /= torch.distributed.get_world_size()
        mask = m.mask.flatten()
        active = int(mask.sum())
        k = min(int(fraction * active), mask.numel() - active)
        if k <= 0:
            return
        weight = m.weight.detach().flatten()
        inf = torch.tensor(float("inf"), device=weight.device)
        drop_score = torch.where(mask, weight.abs().float(), inf)
        dropped = torch.argsort(drop_score, stable=True)[:k]
        new_mask = mask.clone()
        new_mask[dropped] = False
        grow_score = torch.where(new_mask, -inf, grad.flatten().abs().float())
        grown = torch.argsort(-grow_score, stable=True)[:k]
        new_mask[grown] = True
        m.weight.view(-1)[grown] = 0
        m.weight.mul_(new_mask.view_as(m.weight))
        m.mask.copy_(new_mask.view_as(m.mask))
        if self.optimizer is not None:
            changed = torch.cat([dropped, grown])
            for value in self.optimizer.state.get(m.weight, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == m.weight.shape:
                    value.view(-1)[changed] = 0
        m.dense_grad = None
