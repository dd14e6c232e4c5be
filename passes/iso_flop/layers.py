"""The replacement modules, one per IsoFLOP kind: each runs the dense op's geometry (linear
or convNd) on weights built from :class:`MaskedWeight` factors."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from sparsify_fx.passes.iso_flop.masks import MaskedWeight

from sparsify_fx import OpModule
from sparsify_fx.graph.op_table import CONV_FUNCTIONS

__all__ = ["IsoFLOPOp", "SparseParallel", "SparseFactorized", "SparseDoped", "SparseWide"]


class IsoFLOPOp(OpModule):
    """Base of the replacement modules: the geometry of the dense op they replace."""

    def __init__(self, conv_ndim: int = 0, stride=(), padding=(), dilation=()):
        super().__init__()
        self.conv_ndim = int(conv_ndim)
        self.stride, self.padding, self.dilation = list(stride), list(padding), list(dilation)

    def _op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if self.conv_ndim == 0:
            return F.linear(x, w, b)
        return CONV_FUNCTIONS[self.conv_ndim](x, w, b, self.stride, self.padding, self.dilation)

    def _pointwise(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if self.conv_ndim == 0:
            return F.linear(x, w, b)
        return CONV_FUNCTIONS[self.conv_ndim](x, w, b)

    def extra_repr(self) -> str:
        if self.conv_ndim == 0:
            return "linear"
        return f"conv{self.conv_ndim}d, stride={self.stride}, padding={self.padding}, dilation={self.dilation}"


class SparseParallel(IsoFLOPOp):
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


class SparseFactorized(IsoFLOPOp):
    """``forward(x, bias)``: ``V(U(x))``, U the dense op's geometry to ``d`` outputs, V pointwise."""

    def __init__(self, u: MaskedWeight, v: MaskedWeight, **geometry: Any):
        super().__init__(**geometry)
        self.u, self.v = u, v

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self._pointwise(self._op(x, self.u(), None), self.v(), bias)


class SparseDoped(IsoFLOPOp):
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


class SparseWide(IsoFLOPOp):
    """``forward(x)``: the op widened on its input and/or output side, masked to iso-FLOP."""

    def __init__(self, weight: MaskedWeight, bias: torch.Tensor | None, **geometry: Any):
        super().__init__(**geometry)
        self.masked = weight
        self.bias = nn.Parameter(bias) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._op(x, self.masked(), self.bias)
