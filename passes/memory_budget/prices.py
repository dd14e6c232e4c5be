"""What a compressed choice of the memory budget adds to a training step, estimated from the
rewrites a trial applied (``passes/memory_budget.py`` runs the trials):

* each rewrite's calibrated form (``passes/budget_costs.py``: fixed seconds per op + seconds
  per byte) times its bytes;
* the attention forward that a compressed attention's backward re-runs;
* what a weight gradient on bf16 operands saves (``passes/bf16_matmul.py``): the dense op's
  forward time times the calibrated ratio - 1, negative where the device has bf16 matrix units.

:func:`floored` turns such an estimate into the price the solver compares.
"""

from __future__ import annotations

from collections.abc import Callable

from sparsify_fx import Rewrite

from sparsify_fx.passes.memory_budget.costs import OP_SECONDS

__all__ = ["compress_seconds", "floored", "rate_kind", "DENSE_OPS"]

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
    # a 1x1 Conv gains less (a calibration from before session 19 has only the 3x3 ratio)
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
    flat, session 18's ResNet-50 plans took compress-fused over a faster compress-bf16)."""
    if seconds >= OP_SECONDS:
        return seconds
    return OP_SECONDS * OP_SECONDS / (2 * OP_SECONDS - seconds)
