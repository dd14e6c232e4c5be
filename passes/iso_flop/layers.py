"""The replacement modules, one per IsoFLOP kind: each runs the dense op's geometry (linear
or convNd) on weights built from :class:`MaskedWeight` factors.

Each is built with a function-preserving initialisation (what ``sparsify`` verifies) and
re-draws its weights and masks in :meth:`IsoFLOPOp.reinitialize` when the config asks for
``init="random"``; sparsify calls it once, after verification."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from sparsify_fx.passes.iso_flop.masks import MaskedWeight, kaiming_uniform

from sparsify_fx import OpModule
from sparsify_fx.graph.op_table import CONV_FUNCTIONS

__all__ = [
    "IsoFLOPOp",
    "SparseParallel",
    "SparseParallelBN",
    "SparseFactorized",
    "SparseDoped",
    "SparseWide",
    "FactorNorm",
    "lowrank_on_input",
]


def lowrank_on_input(rows: int, d_in: int, d_out: int) -> bool:
    """Whether ``(x @ down) @ up`` costs fewer multiply-adds than rebuilding the dense weight
    ``up @ down`` (the op with the full weight runs either way, for the sparse part):
    ``rows r (D_in + D_out) < r D_in D_out``."""
    return rows * (d_in + d_out) < d_in * d_out


class IsoFLOPOp(OpModule):
    """Base of the replacement modules: the geometry of the dense op they replace, and the
    re-initialisation after verification.

    The buffer ``initialized`` says the configured initialisation is in place (so a loaded
    checkpoint is never re-drawn); a module that sparsify did not re-initialise (a lazily
    rewritten graph) does it at its first training forward.
    """

    def __init__(self, conv_ndim: int = 0, stride=(), padding=(), dilation=(), init: str = "preserve",
                 seed: int = 0, dynamic: bool = False):
        super().__init__()
        self.conv_ndim = int(conv_ndim)
        self.stride, self.padding, self.dilation = list(stride), list(padding), list(dilation)
        self.init, self.seed = init, int(seed)
        # RigL updates masks from Python between steps: the module must run eagerly in training
        self.host_side = bool(dynamic)
        self.register_buffer("initialized", torch.tensor(init == "preserve"))
        self._ready = init == "preserve"

    def _op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if self.conv_ndim == 0:
            return F.linear(x, w, b)
        return CONV_FUNCTIONS[self.conv_ndim](x, w, b, self.stride, self.padding, self.dilation)

    def _pointwise(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if self.conv_ndim == 0:
            return F.linear(x, w, b)
        return CONV_FUNCTIONS[self.conv_ndim](x, w, b)

    def _rows(self, x: torch.Tensor, kernel: tuple[int, ...]) -> int:
        """Output positions of the op on ``x`` (batch x spatial)."""
        if self.conv_ndim == 0:
            return x.numel() // max(1, x.shape[-1])
        rows = x.shape[0] if x.dim() == self.conv_ndim + 2 else 1
        for i, k in enumerate(kernel):
            size = x.shape[-self.conv_ndim + i]
            rows *= (size + 2 * self.padding[i] - self.dilation[i] * (k - 1) - 1) // self.stride[i] + 1
        return rows

    def reinitialize(self) -> None:
        """Draw the configured initialisation (``init="random"``) once; no-op for preserve.

        ``sfx.sparsify`` calls it after verification. Forward never does: the passes after
        IsoFLOP (a budget's trial steps) run the module, and must not see its weights change."""
        if self._ready:
            return
        gen = torch.Generator().manual_seed(self.seed)
        self._randomize(gen)
        self.initialized.fill_(True)
        self._ready = True

    def _randomize(self, gen: torch.Generator) -> None:
        for m in self.modules():
            if isinstance(m, MaskedWeight):
                m.randomize_(gen)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ready = bool(self.initialized)

    def extra_repr(self) -> str:
        geo = "linear" if self.conv_ndim == 0 else (
            f"conv{self.conv_ndim}d, stride={self.stride}, padding={self.padding}, dilation={self.dilation}")
        return f"{geo}, init={self.init}"


class SparseParallel(IsoFLOPOp):
    """``forward(x, bias)``: sum of ``n`` sparse branches of the dense op's shape; branch 0
    holds the replaced layer's own weight."""

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


class SparseParallelBN(SparseParallel):
    """``forward(x, bias)``: RepVGG-style parallel branches, each sparse conv followed by its
    own BatchNorm, summed after normalisation (Sparse-IFT's parallel block); ``bns[0]`` is the
    BatchNorm that followed the dense conv (live), ``bias`` enters branch 0 before its norm.

    Training runs the ``n`` convs separately (each branch normalised by its own batch
    statistics). In eval every BatchNorm is an affine map, so the branches fold into one conv
    with weight ``sum_b w_b s_b`` and bias ``sum_b (beta_b - mu_b s_b) + s_0 bias``
    (``s_b = gamma_b / sqrt(var_b + eps)``): one dense op, as the dense layer cost.
    """

    def __init__(self, branches: list[MaskedWeight], bns: list[nn.Module], **geometry: Any):
        super().__init__(branches, **geometry)
        self.bns = nn.ModuleList(bns)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.training or any(bn.running_mean is None for bn in self.bns):
            out = None
            for i, (branch, bn) in enumerate(zip(self.branches, self.bns)):
                y = bn(self._op(x, branch(), bias if i == 0 else None))
                out = y if out is None else out + y
            return out
        weight, shift = None, None
        for i, (branch, bn) in enumerate(zip(self.branches, self.bns)):
            scale = torch.rsqrt(bn.running_var + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight
            b = -bn.running_mean * scale
            if bn.bias is not None:
                b = b + bn.bias
            if i == 0 and bias is not None:
                b = b + bias * scale
            w = branch() * scale.view(-1, *(1,) * (self.conv_ndim + 1))
            weight = w if weight is None else weight + w
            shift = b if shift is None else shift + b
        return self._op(x, weight, shift)

    @torch.no_grad()
    def _randomize(self, gen: torch.Generator) -> None:
        super()._randomize(gen)
        for bn in self.bns[1:]:
            bn.reset_parameters()  # parameters and running statistics


class FactorNorm(nn.Module):
    """BatchNorm (optionally + ReLU) over the hidden channels between the two factors (the
    paper's ``uv_layer`` option); linear factors normalise the last dim."""

    def __init__(self, channels: int, conv_ndim: int, relu: bool):
        super().__init__()
        bn = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[conv_ndim]
        self.bn, self.relu, self.conv_ndim = bn(channels), relu, conv_ndim
        # off only while a function-preserving init that a ReLU would break is verified
        self.relu_on = relu

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.conv_ndim == 0:
            shape = h.shape
            h = self.bn(h.reshape(-1, shape[-1])).reshape(shape)
        else:
            h = self.bn(h)
        return torch.relu(h) if self.relu_on else h

    @torch.no_grad()
    def make_identity_(self) -> None:
        # eval-mode identity: (h - 0) / sqrt(var + eps) * 1 + 0 with var + eps == 1
        self.bn.reset_parameters()
        self.bn.running_var.fill_(1.0 - self.bn.eps)


class SparseFactorized(IsoFLOPOp):
    """``forward(x, bias)``: ``V(norm(U(x)))``, U the dense op's geometry to ``d`` outputs, V
    pointwise, ``norm`` an optional :class:`FactorNorm`."""

    def __init__(self, u: MaskedWeight, v: MaskedWeight, norm: FactorNorm | None = None, **geometry: Any):
        super().__init__(**geometry)
        self.u, self.v = u, v
        self.norm = norm

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        h = self._op(x, self.u(), None)
        if self.norm is not None:
            h = self.norm(h)
        return self._pointwise(h, self.v(), bias)

    def _randomize(self, gen: torch.Generator) -> None:
        super()._randomize(gen)
        if self.norm is not None:
            self.norm.bn.reset_parameters()
            self.norm.bn.reset_running_stats()
            self.norm.relu_on = self.norm.relu


class SparseDoped(IsoFLOPOp):
    """``forward(x, bias)``: the op with weight ``sparse * mask`` plus the dense rank-``r``
    path ``up @ down``, applied to the input (``(x @ down) @ up``) when that is cheaper than
    rebuilding the dense weight (:func:`lowrank_on_input`)."""

    def __init__(self, sparse: MaskedWeight, up: torch.Tensor | None, down: torch.Tensor | None, **geometry: Any):
        super().__init__(**geometry)
        self.sparse = sparse
        self.up = nn.Parameter(up) if up is not None else None
        self.down = nn.Parameter(down) if down is not None else None

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.sparse()
        if self.up is None or self.down is None:
            return self._op(x, weight, bias)
        d_out, d_in = self.up.shape[0], self.down.shape[1]
        if lowrank_on_input(self._rows(x, tuple(weight.shape[2:])), d_in, d_out):
            down = self.down.view(self.down.shape[0], *weight.shape[1:])
            up = self.up.view(d_out, self.up.shape[1], *(1,) * self.conv_ndim)
            return self._op(x, weight, bias) + self._pointwise(self._op(x, down, None), up, None)
        return self._op(x, weight + (self.up @ self.down).view_as(weight), bias)

    @torch.no_grad()
    def _randomize(self, gen: torch.Generator) -> None:
        super()._randomize(gen)
        if self.up is not None and self.down is not None:
            self.up.copy_(kaiming_uniform(tuple(self.up.shape), gen))
            self.down.copy_(kaiming_uniform(tuple(self.down.shape), gen))


class SparseWide(IsoFLOPOp):
    """``forward(x)``: the op widened on its input and/or output side, masked to iso-FLOP; the
    replaced layer's weight (and bias) are the kept leading block."""

    def __init__(self, weight: MaskedWeight, bias: nn.Parameter | None, bias_extra: torch.Tensor | None,
                 **geometry: Any):
        super().__init__(**geometry)
        self.masked = weight
        self.bias_kept = bias
        self.bias_extra = nn.Parameter(bias_extra) if bias_extra is not None else None

    def bias(self) -> torch.Tensor | None:
        if self.bias_kept is None or self.bias_extra is None:
            return self.bias_kept
        return torch.cat([self.bias_kept, self.bias_extra])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._op(x, self.masked(), self.bias())

    @torch.no_grad()
    def _randomize(self, gen: torch.Generator) -> None:
        super()._randomize(gen)
        if self.bias_extra is not None:
            bound = 1.0 / math.sqrt(math.prod(self.masked.shape[1:]))
            self.bias_extra.copy_(torch.empty(self.bias_extra.shape).uniform_(-bound, bound, generator=gen))
