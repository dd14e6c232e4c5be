"""What :func:`sparsify_fx.analysis.slice_groups.find_slice_groups` returns: the producers, consumers
and per-channel ops of each slice group, and the groups it refused (with the node and why).

Kept apart from the analysis so a reader of a SliceOut rewrite finds the data it consumes
without the graph walk around it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

__all__ = ["SliceProducer", "SliceConsumer", "SliceGroup", "ForbiddenSliceGroup", "SliceGroupAnalysis"]


@dataclass
class SliceProducer:
    """A dense op whose output units are sliced.

    Attributes:
        node: the ``F.linear`` / ``F.convNd`` node.
        weight / bias: qualified parameter names (bias None when absent).
        offsets: where each section of units starts in the weight's output dim, in rows:
            ``(0,)`` for a plain layer, ``(0, E, 2E)`` for a fused q/k/v projection (the
            same window is taken in each section).
        unit_size: weight rows per unit in each section (1 for features / channels, the
            head dim for heads, ``H / KV`` head dims for a query projection under
            grouped-query attention).
    """

    node: fx.Node
    weight: str
    bias: str | None
    offsets: tuple[int, ...] = (0,)
    unit_size: int = 1


@dataclass
class SliceConsumer:
    """A dense op whose input features / channels take the group's window.

    ``unit_size`` is the number of input features (weight columns) one unit spans.
    """

    node: fx.Node
    weight: str
    unit_size: int = 1


@dataclass
class SliceGroup:
    """Units that can be sliced together.

    Attributes:
        kind: ``"channels"`` (features / channels, one row each) or ``"heads"`` (units of
            several rows: attention heads or key/value head groups).
        units: how many units.
        unit_size: rows per unit in the first producer's weight (each member has its own
            ``unit_size``).
        module: qualified name of the producer's module, relative to the graph; with
            several producers, of the innermost module holding them all (``""`` when that
            is the graph's root).
        producers / consumers: the dense ops that are sliced on their output / input side.
        norms: BatchNorm ``call_module`` nodes on the way (parameters and running stats
            are sliced with the units).
        passthrough: the window-preserving nodes in between (activations, dropout, ...).
        resizes: ``(node, path)`` of each size argument that spells the unit dim's full
            size (``view(B, N, H, d)``'s ``H``, ``expand``'s key/value head count):
            ``node.args`` followed along ``path``; a rewrite sets it to ``-1`` so the size
            follows the window.
    """

    kind: str
    units: int
    unit_size: int
    module: str
    producers: list[SliceProducer]
    consumers: list[SliceConsumer]
    norms: list[fx.Node] = field(default_factory=list)
    passthrough: list[fx.Node] = field(default_factory=list)
    resizes: list[tuple[fx.Node, tuple[int, ...]]] = field(default_factory=list)


@dataclass
class ForbiddenSliceGroup:
    """A producer whose units cannot be sliced, and why (naming the node responsible)."""

    producer: fx.Node
    module: str
    reason: str


@dataclass
class SliceGroupAnalysis:
    """Result of :func:`find_slice_groups`: the groups, in graph order, and the refusals."""

    groups: list[SliceGroup] = field(default_factory=list)
    forbidden: list[ForbiddenSliceGroup] = field(default_factory=list)
