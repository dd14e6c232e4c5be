"""The IsoFLOP pass: pick the candidate dense ops, find the wide chains, and replace each op
by the module its kind builds (``build.py``), recording counts, FLOPs and divergence."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.fx as fx
from sparsify_fx.passes.iso_flop.build import (
    DenseLayer,
    build_doped,
    build_factorized,
    build_parallel,
    build_wide,
    set_schedules,
)
from sparsify_fx.passes.iso_flop.chain import Chain, follow_chain, widened_batchnorm
from sparsify_fx.passes.iso_flop.config import IsoFLOP, widened_width
from sparsify_fx.passes.iso_flop.flops import dense_kernel_flops, divergence, weight_counts
from sparsify_fx.passes.iso_flop.layers import SparseParallelBN

import sparsify_fx as sfx
from sparsify_fx import PassResult, Rewrite
from sparsify_fx.graph.op_table import BATCH_NORM_MODULES

__all__: list[str] = []  # registers the pass; its config is IsoFLOP (config.py)


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


def _layer_of(gm: fx.GraphModule, op: sfx.DenseOp) -> DenseLayer:
    weight = gm.get_parameter(op.weight_name)
    bias = gm.get_parameter(str(op.bias.target)) if op.bias is not None else None
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
    return DenseLayer(op, weight, bool(op.weight_transposed), bias, geometry, positions, sfx.tensor_meta(op.input))


def _following_batchnorm(gm: fx.GraphModule, op: sfx.DenseOp) -> fx.Node | None:
    """The BatchNorm module call that is the conv's only user (RepVGG-style branches)."""
    if op.kind != "conv" or len(op.node.users) != 1:
        return None
    (user,) = op.node.users
    if user.op != "call_module" or not user.args or user.args[0] is not op.node or len(user.args) > 1 or user.kwargs:
        return None
    bn = gm.get_submodule(str(user.target))
    if not isinstance(bn, BATCH_NORM_MODULES) or sfx.has_hooks(bn):
        return None
    if sum(n.op == "call_module" and n.target == user.target for n in gm.graph.nodes) != 1:
        return None  # one BatchNorm module called twice: splitting one call would untie them
    meta = sfx.tensor_meta(op.node)
    if meta is not None and (len(meta[0]) < 2 or meta[0][1] != bn.num_features):
        return None
    return user


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
    originals = {id(p) for p in gm.parameters()}
    for op in ops:
        reason = _candidate_reason(gm, op, config, ctx)
        if reason is not None:
            result.skips.append(ctx.skip(op, reason))
        else:
            candidates.append(op)

    widen_in: set[fx.Node] = set()
    widen_out: dict[fx.Node, Chain] = {}
    if config.kind == "wide":
        dense_by_node = {op.node: op for op in ops}
        chosen = {op.node for op in candidates}
        why_not: dict[fx.Node, str] = {}
        for op in candidates:
            chain, why = follow_chain(gm, op, dense_by_node)
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
    _warn_new_parameters(gm, originals, ctx)
    return result


def _warn_new_parameters(gm: fx.GraphModule, originals: set[int], ctx: Any) -> None:
    new = [p for p in gm.parameters() if id(p) not in originals]
    if not new:
        return
    warnings.warn(
        f"IsoFLOP created {len(new)} new parameters ({sum(p.numel() for p in new)} values) in "
        f"{ctx.qualified('') or 'the model'}: an optimizer built on the original model does not "
        "train them. Build the optimizer on the rewritten module "
        "(torch.optim.AdamW(fast.parameters())) or call sfx.extend_optimizer(optimizer, fast).",
        UserWarning,
        stacklevel=2,
    )


def _rewrite(
    gm: fx.GraphModule,
    layer: DenseLayer,
    config: IsoFLOP,
    ctx: Any,
    gen: torch.Generator,
    result: PassResult,
    widen_in: bool,
    chain: Chain | None,
) -> None:
    op = layer.op
    extra_in = 0
    bn_node = None
    if config.kind == "parallel":
        bn_node = _following_batchnorm(gm, op)
        bn = gm.get_submodule(str(bn_node.target)) if bn_node is not None else None
        module, details = build_parallel(layer, config, gen, bn)
    elif config.kind == "factorized":
        module, details = build_factorized(layer, config, gen)
    elif config.kind == "doped":
        module, details = build_doped(layer, config, gen)
    else:
        module, details = build_wide(layer, config, gen, widen_in, chain is not None)
        if widen_in:
            extra_in = widened_width(layer.weight.shape[1], config.sparsity) - layer.weight.shape[1]
    set_schedules(module, config)
    # .to(dtype) casts floating tensors only: the bool masks stay bool (and the shared
    # original parameters already have this device and dtype)
    module = module.to(device=layer.weight.device, dtype=layer.weight.dtype).train(gm.training)
    target = sfx.install_module(gm, f"isoflop_{op.module_name or op.node.name}", module)
    x = _live_input(op)
    args = (x,) if config.kind == "wide" else (x, op.bias)
    with gm.graph.inserting_before(op.node):
        new = gm.graph.call_module(target, args)
    flops_before = sfx.dense_op_flops(op, gm.get_parameter(op.weight_name).shape)
    live = {id(p) for p in module.parameters()}
    unused = [op.weight_name] if id(layer.param) not in live else []
    # erasing the dense node clears what op.weight / op.bias point to: keep the nodes first
    params = (op.weight, op.bias) if config.kind == "wide" else (op.weight,)
    if bn_node is not None:
        # the replacement computes conv + BatchNorm per branch: it stands for the BatchNorm
        sfx.replace_node(bn_node, new)
        new.meta.update({k: v for k, v in op.node.meta.items() if k not in new.meta})
        # named after the dense layer it replaces, as its Rewrite is: a later pass's
        # "already rewritten" skip then names that layer, not the BatchNorm
        if sfx.meta.MODULE in op.node.meta:
            new.meta[sfx.meta.MODULE] = op.node.meta[sfx.meta.MODULE]
        gm.graph.erase_node(op.node)
    else:
        sfx.replace_node(op.node, new)
    for attr in params:
        if attr is not None and not attr.users:
            gm.graph.erase_node(attr)

    if chain is not None:
        _widen_chain(gm, op, [new, *chain.nodes], chain, config, unused)
    max_error, max_error_rel = divergence(module, layer, extra_in, gen)
    nnz, numel = weight_counts(module)
    flops_after = None if layer.positions is None else 2 * layer.positions * nnz
    details.update(
        {
            "kind": config.kind,
            "sparsity": config.sparsity,
            "init": config.init,
            "nnz_before": layer.weight.numel(),
            "nnz_after": nnz,
            "numel_after": numel,
            "dense_kernel_flops": dense_kernel_flops(module, layer),
            "train_kernel_flops_factor": len(module.bns) if isinstance(module, SparseParallelBN) else 1,
            "divergence": max_error,
            "divergence_rel": max_error_rel,
            "divergence_input": "seeded randn of the recorded input shape, eval mode, "
            "with the initialisation sparsify verifies",
            "unused_parameters": [ctx.qualified(n) for n in unused],
            "verification_init": "function-preserving" + (" (exact)" if details["exact"] else " (inexact)"),
            "mask_evolution": (
                f"RigL every {config.update_every} training forwards, drop fraction "
                f"{config.drop_fraction:g}" + (f" cosine-annealed to 0 at step {config.stop_at}"
                                               if config.stop_at else " (constant, no stop_at)")
                if config.dynamic else "static masks (dynamic=False)"
            ),
        }
    )
    if config.init == "random":
        details["reinitialized"] = (
            "verified with the function-preserving init, then re-initialised: random (uniform "
            "random masks at the layer's density, kaiming-uniform new weights; the replaced "
            "layer's own weight keeps its values)"
        )
    if unused:
        details["note"] = "the replaced weight stays in the model (state_dict key kept) but is not read"
    name = f"conv{op.conv_ndim}d" if op.kind == "conv" else op.kind
    result.rewrites.append(
        Rewrite(
            ctx.pass_name, new.name, ctx.qualified(op.module_name), name, target,
            flops_before=flops_before, flops_after=flops_after, details=details,
        )
    )
    result.modified = True


def _widen_chain(
    gm: fx.GraphModule, op: sfx.DenseOp, widened: list[fx.Node], chain: Chain, config: IsoFLOP, unused: list[str]
) -> None:
    """Widen the BatchNorms of a producer's chain and the recorded shapes along it."""
    for bn_node in chain.batchnorms:
        bn = gm.get_submodule(str(bn_node.target))
        wide_bn = widened_batchnorm(bn, widened_width(bn.num_features, config.sparsity))
        target = sfx.install_module(gm, f"isoflop_{bn_node.target}", wide_bn)
        with gm.graph.inserting_before(bn_node):
            new = gm.graph.call_module(target, bn_node.args, bn_node.kwargs)
        widened[widened.index(bn_node)] = new
        sfx.replace_node(bn_node, new)
    for node in widened:
        meta = sfx.tensor_meta(node)
        if meta is None:
            continue
        shape, dtype = list(meta[0]), meta[1]
        dim = 1 if op.kind == "conv" else len(shape) - 1
        shape[dim] = widened_width(shape[dim], config.sparsity)
        node.meta[sfx.meta.SHAPE] = (tuple(shape), dtype)
