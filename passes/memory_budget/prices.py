"""What a compressed choice of the memory budget adds to a training step, estimated from the
rewrites a trial applied (``passes/memory_budget/planner.py`` runs the trials):

* each rewrite's calibrated form (``passes/memory_budget/costs.py``: fixed seconds per op + seconds
  per byte) times its bytes;
* the attention forward that a compressed attention's backward re-runs;
* what a weight gradient on bf16 operands saves (``passes/kernels/bf16_matmul.py``): the dense op's
  forward time times the calibrated ratio - 1, negative where the device has bf16 matrix units.

:func:`floored` turns such an estimate into the price the solver compares.

Identical blocks (ViT's 12 encoder layers) get one price: :func:`unit_signature` keys a unit by
its ops, their arguments, shapes and dtypes, and :func:`timing_twins` has the nodes of every
block but the first of each signature take the first's forward times
(``budget_costs.node_seconds(same_as=...)``). Timed apart, each copy drew its own noise, and
which of the identical blocks a plan recomputed changed from one run to the next.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import torch
import torch.fx as fx
from sparsify_fx.passes.memory_budget.costs import OP_SECONDS

from sparsify_fx import Rewrite, tensor_meta

__all__ = ["compress_seconds", "floored", "rate_kind", "unit_signature", "timing_twins", "DENSE_OPS"]

#: the ops a bf16-input rewrite (``dense="bf16"``) replaces: priced at the "dense" rate
DENSE_OPS = ("linear", "matmul", "addmm", "conv1d", "conv2d", "conv3d")


def _fused_linear_kind(r: Rewrite) -> str:
    kind = "ln_linear" if r.op == "layer_norm" else "act_linear"
    return kind + ("_bf16" if r.details.get("storage") == "recompute-bf16" else "")


def rate_kind(r: Rewrite) -> str:
    """The calibrated form (a key of ``budget_costs.calibrate``'s rates) ``r`` is priced by."""
    storage = r.details.get("storage")
    return ("dropit" if r.pass_name == "dropit" else "bitmask" if r.op in ("relu", "leaky_relu")
            else "dense" if r.op in DENSE_OPS
            else "bn_relu_conv" if r.op == "batch_norm" and storage == "recompute"
            else "bn_relu_conv_bf16" if r.op == "batch_norm" and storage == "recompute-bf16"
            # a GELU / SiLU / LayerNorm fused with its Linear: the fused op's net cost
            else _fused_linear_kind(r) if storage in ("recompute", "recompute-bf16")
            else "batchnorm" if r.op == "batch_norm" and storage == "bf16"
            else "indices" if r.op == "max_pool2d" else "bf16")


def _mm_ratio(r: Rewrite, kind: str, rates: dict[str, float]) -> float:
    """The calibrated bf16 / fp32 weight-gradient time ratio of ``r``'s Linear or Conv."""
    if not (kind.startswith("bn_relu_conv") or r.op.startswith("conv")):
        return rates.get("mm_bf16:linear", 1.0)
    conv = rates.get("mm_bf16:conv", 1.0)
    # a 1x1 Conv gains less (an older cached calibration has only the 3x3 ratio)
    pointwise = all(k == 1 for k in r.details.get("kernel", [0]))
    return rates.get("mm_bf16:conv1x1", conv) if pointwise else conv


def compress_seconds(rewrites: list[Rewrite], unit_of: Callable[[str], str], rates: dict[str, float],
                     node_seconds: dict[str, float], host: float = 1.0, bf16_mm: bool = False) -> dict[str, float]:
    """Estimated seconds the rewrites add to a step, per unit: ``{unit_of(r.module): seconds}``.

    ``rates``: the calibration; ``node_seconds``: each node's forward time; ``host``: the
    host's share of a step (the fixed costs are host time); ``bf16_mm``: whether the
    bf16-operand weight gradients run (``bf16_matmul.bf16_weight_grad``).
    """
    seconds: dict[str, float] = {}
    for r in rewrites:
        kind = rate_kind(r)
        unit = unit_of(r.module)
        # plus the op's fixed cost, calibrated on a tiny tensor (at least OP_SECONDS, which
        # also makes every compressed form strictly dearer than keeping, so a budget that
        # fits dense keeps everything); it is host time, of which only the host's share of a
        # GPU step is charged (budget_costs.host_share)
        fixed = rates.get(f"op:{kind}", OP_SECONDS)
        if host < 1.0:
            fixed = max(OP_SECONDS, fixed * host)
        nbytes = r.saved_bytes_before or 0
        if kind == "bn_relu_conv_bf16":  # calibrated per input byte, as its bf16 x_hat's double
            nbytes = 2 * (r.saved_bytes_after or 0)
        if kind == "indices":  # max pooling's narrow indices: a cast of what it keeps, each way
            nbytes = r.saved_bytes_after or 0
        added = nbytes * rates["bf16" if kind == "indices" else kind] + fixed
        if bf16_mm and r.details.get("weight_grad") is not None:
            # the dense op's forward time stands for its fp32 weight gradient's (as long)
            dense_node = r.details.get("fused_node", r.node)
            added += node_seconds.get(dense_node, 0.0) * (_mm_ratio(r, kind, rates) - 1.0)
        seconds[unit] = seconds.get(unit, 0.0) + added
        if r.op == "attention" and r.details.get("output") != "keep":
            # its backward re-runs the attention forward on the stored q, k, v
            seconds[unit] += node_seconds.get(r.node, 0.0)
    return seconds


def floored(seconds: float) -> float:
    """A compressed unit's price: its estimate, or below one op's least cost (``OP_SECONDS``) a
    positive price that still falls as the estimate falls. Every compressed choice stays dearer
    than keeping (a budget that fits dense keeps everything), and of two choices whose bf16
    weight gradients save more than their casts cost, the faster is still the cheaper (floored
    flat, ResNet-50 plans took compress-fused over a faster compress-bf16)."""
    if seconds >= OP_SECONDS:
        return seconds
    return OP_SECONDS * OP_SECONDS / (2 * OP_SECONDS - seconds)


_PROXY = re.compile(r"Proxy\([^)]*\)")


class _Ref:
    """A node in a signature's arguments: ``%i`` the unit's own i-th node, ``$i`` its i-th input."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _tensor_key(t: Any) -> Hashable:
    if isinstance(t, torch.Tensor):
        return (tuple(t.shape), str(t.dtype), t.requires_grad)
    return type(t).__qualname__


def _module_key(module: torch.nn.Module) -> Hashable:
    # its configuration (repr: channels, kernel, eps, p, ...), mode and tensors' shapes; a
    # custom leaf module's forward is its class's
    tensors = tuple((name, _tensor_key(t)) for name, t in
                    [*module.named_parameters(recurse=True), *module.named_buffers(recurse=True)])
    return (type(module).__module__, type(module).__qualname__, repr(module), module.training, tensors)


def unit_signature(gm: fx.GraphModule, nodes: list[fx.Node]) -> Hashable:
    """What a unit's forward time depends on, equal for identical blocks and only for them:
    per node (in graph order) its op and target (a module's configuration and tensors, an
    attribute's shape), its arguments with the nodes replaced by their position in the unit or
    among its inputs (with the inputs' recorded shapes), and its own recorded shape and dtype."""
    local = {n: i for i, n in enumerate(nodes)}
    inputs: dict[fx.Node, int] = {}
    outside: list[Hashable] = []

    def ref(a: fx.Node) -> _Ref:
        if a in local:
            return _Ref(f"%{local[a]}")
        if a not in inputs:
            inputs[a] = len(inputs)
            # (its shape, not its op: the first block's input is a placeholder, the next one's a call)
            attr = _attr(gm, a.target) if a.op == "get_attr" else None
            outside.append((repr(tensor_meta(a)), _tensor_key(attr) if attr is not None else None))
        return _Ref(f"${inputs[a]}")

    per_node = []
    for n in nodes:
        if n.op == "call_module":
            target: Hashable = _module_key(gm.get_submodule(n.target))
        elif n.op == "get_attr":
            target = _tensor_key(_attr(gm, n.target))
        else:
            target = n.target  # the function object, or a method's name
        # (a message formatted while tracing names the traced node: "got Proxy(getattr_4)")
        args = _PROXY.sub("Proxy", repr(fx.node.map_arg((n.args, n.kwargs), ref)))
        per_node.append((n.op, target, args, repr(tensor_meta(n))))
    return tuple(per_node), tuple(outside)


def _attr(gm: fx.GraphModule, target: str) -> Any:
    try:
        return functools.reduce(getattr, target.split("."), gm)
    except AttributeError:
        return None


def timing_twins(gm: fx.GraphModule, units: Iterable[list[fx.Node]]) -> dict[str, str]:
    """``{node: twin}`` for the nodes of every unit whose :func:`unit_signature` an earlier unit
    has: the node at the same position in the first such unit, whose forward time it takes."""
    first: dict[Hashable, list[fx.Node]] = {}
    twins: dict[str, str] = {}
    for nodes in units:
        if not nodes:
            continue
        signature = unit_signature(gm, nodes)
        if signature not in first:
            first[signature] = nodes
            continue
        twins |= {n.name: twin.name for n, twin in zip(nodes, first[signature], strict=True)}
    return twins
