"""The wide chains: from a widened producer, through ops that do not care how wide the
channel dim is (op_table's zero-safe elementwise ops, BatchNorm after a conv), to the dense
consumers whose input side widens with it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import sparsify_fx as sfx
from sparsify_fx.graph.op_table import (
    BATCH_NORM_MODULES,
    ELEMENTWISE_MODULES,
    SAME_VALUE_METHODS,
    ZERO_SAFE_UNARY_FUNCTIONS,
    ZERO_SAFE_UNARY_METHODS,
)

__all__ = ["Chain", "follow_chain", "widened_batchnorm", "WideBatchNorm"]

# per element and finite at 0 (the inert channels a preserved widening adds are zeros), or
# the same values in another dtype / layout: neither cares how wide the channel dim is
_CHAIN_METHODS = ZERO_SAFE_UNARY_METHODS | SAME_VALUE_METHODS


@dataclass
class Chain:
    """The nodes between a widened producer and its consumers."""

    nodes: list[fx.Node]
    batchnorms: list[fx.Node]
    consumers: list[fx.Node]


def _only_first_arg(node: fx.Node, source: fx.Node) -> bool:
    extra = list(node.args[1:]) + list(node.kwargs.values())
    return bool(node.args) and node.args[0] is source and not any(isinstance(a, fx.Node) for a in extra)


def follow_chain(
    gm: fx.GraphModule, producer: sfx.DenseOp, dense_by_node: dict[fx.Node, sfx.DenseOp]
) -> tuple[Chain | None, str]:
    """The elementwise chain from ``producer`` to dense consumers, or None and why not."""
    chain = Chain([], [], [])
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
            elementwise = (user.op == "call_function" and user.target in ZERO_SAFE_UNARY_FUNCTIONS
                           or user.op == "call_method" and user.target in _CHAIN_METHODS)
            if elementwise and _only_first_arg(user, node):
                chain.nodes.append(user)
                frontier.append(user)
                continue
            if user.op == "call_module" and _only_first_arg(user, node):
                module = gm.get_submodule(str(user.target))
                if type(module) in ELEMENTWISE_MODULES:
                    chain.nodes.append(user)
                    frontier.append(user)
                    continue
                if isinstance(module, BATCH_NORM_MODULES) and producer.kind == "conv":
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


class WideBatchNorm(nn.Module):
    """A BatchNorm over more channels whose first ones are the replaced BatchNorm's own affine
    parameters (live, so they get gradients); the new channels' affine parameters and every
    channel's running statistics are its own."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, features: int):
        super().__init__()
        self.eps, self.momentum = bn.eps, bn.momentum
        self.track_running_stats = bn.track_running_stats
        extra = features - bn.num_features
        device = next(iter(bn.buffers()), torch.empty(0)).device
        self.weight_kept = bn.weight if bn.affine else None
        self.bias_kept = bn.bias if bn.affine else None
        # new channels are fed zeros by inert units: mean 0 / var 1 / gamma 1 / beta 0 keeps
        # them at zero in both modes
        self.weight_extra = nn.Parameter(torch.ones(extra, device=device)) if bn.affine else None
        self.bias_extra = nn.Parameter(torch.zeros(extra, device=device)) if bn.affine else None
        if bn.track_running_stats:
            c = bn.num_features
            self.register_buffer("running_mean", torch.zeros(features, device=device))
            self.register_buffer("running_var", torch.ones(features, device=device))
            self.register_buffer("num_batches_tracked", bn.num_batches_tracked.clone())
            with torch.no_grad():
                self.running_mean[:c] = bn.running_mean
                self.running_var[:c] = bn.running_var
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = bias = None
        if self.weight_kept is not None:
            weight = torch.cat([self.weight_kept, self.weight_extra])
            bias = torch.cat([self.bias_kept, self.bias_extra])
        momentum = 0.0 if self.momentum is None else self.momentum
        use_batch = self.training or self.running_mean is None
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm does
                momentum = 1.0 / float(self.num_batches_tracked)
        running = (None, None) if (self.training and not self.track_running_stats) else (self.running_mean, self.running_var)
        return F.batch_norm(x, *running, weight, bias, use_batch, momentum, self.eps)


def widened_batchnorm(bn: nn.modules.batchnorm._BatchNorm, features: int) -> nn.Module:
    """``bn`` widened to ``features`` channels (:class:`WideBatchNorm`)."""
    return WideBatchNorm(bn, features)
