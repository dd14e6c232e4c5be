"""Activation memory: ReLU, GELU/SiLU, BatchNorm and LayerNorm keep a compressed copy of what
their backward needs, so that a dense activation stops having a second holder.

Why a pass of its own: DropIT (``passes/dropit.py``) compresses the input a Linear/Conv saves,
but in ``Conv -> BN -> ReLU -> Conv`` that input is ReLU's output, which ReLU's own backward
keeps, and BatchNorm keeps its input too; in transformers GELU and LayerNorm keep theirs. A
saving only counts when the compressed copy is the *only* holder, so the ops around the dense
layers have to stop holding dense tensors as well. Per op (training mode, grad enabled):

* **ReLU / LeakyReLU** save a packed 1-bit mask (``uint8``, 8 elements per byte) of
  ``out <= 0`` (ReLU, the exact test ``threshold_backward`` makes) or ``x > 0``
  (LeakyReLU). Backward runs the dense kernel (``threshold_backward`` /
  ``leaky_relu_backward``) on the mask unpacked as a 0/1 tensor of where the gradient passes
  (~5x faster on CPU than applying a bool mask); the gradient is bit-identical.
* **GELU / SiLU** save their input as ``bf16`` (or ``int8`` with one fp32 scale per block) and
  call the dense backward kernel (``aten.gelu_backward`` / ``aten.silu_backward``) on the
  decompressed input. Error bound (mean value theorem on ``f'``):
  ``bf16`` (8-bit significand, ``|x - bf16(x)| <= 2^-8 |x|``): ``|dgrad| <= c * |grad_out|``
  with ``c = 2^-8/(1-2^-8) * sup|x f''(x)|`` = 1.3e-3 (GELU, both variants; sup = 0.331) and
  1.2e-3 (SiLU; sup = 0.302);
  ``int8``: ``|dgrad| <= sup|f''| * absmax_block / 254 * |grad_out|`` with
  ``sup|f''|`` = 0.798 (GELU) and 0.5 (SiLU).
* **BatchNorm1d/2d/3d** (training with running stats): the forward is the exact
  ``aten.native_batch_norm`` (running stats updated in place like ``nn.BatchNorm``,
  ``num_batches_tracked`` too, ``momentum=None`` as a cumulative average). It saves the
  normalised input ``x_hat`` compressed, plus per-channel mean / invstd. ``x_hat`` is better
  conditioned than ``x`` (no cancellation when ``|mean| >> std``). Backward is the dense fused
  kernel run on ``x_hat`` with ``mean=0, invstd=1, weight=weight*invstd``, which is the same
  formula. ``grad_bias`` is exact; with ``|x_hat - x_hat_stored| <= 2^-8 |x_hat|`` (bf16):
  ``|dgrad_weight_c| <= 2^-8 * (sum|g x_hat| + sum|g|)`` and, per element,
  ``|dgrad_x| <= 2^-7 * |w| * invstd * (|x_hat| + 1) * (mean_c|g x_hat| + mean_c|g|)``
  (first order; the ``|g|`` and ``+ 1`` terms come from re-centring the stored ``x_hat`` on its
  own channel mean, see ``_bn_backward``, and use ``mean_c|x_hat| <= 1``).
* **LayerNorm** (call_module ``nn.LayerNorm``): the same scheme with per-row mean / rstd,
  ``aten.native_layer_norm`` forward and ``aten.native_layer_norm_backward`` on ``x_hat``
  (no re-centring). bf16, per row, first order with ``gw = g * weight``:
  ``|dgrad_x| <= 2^-7 * rstd * |x_hat| * mean_row|gw x_hat|``;
  ``|dgrad_weight| <= 2^-8 * sum|g x_hat|``; ``grad_bias`` exact.

* **BatchNorm -> ReLU / ReLU6 -> Conv, recomputed** (``batchnorm="recompute"``): the three become one
  op keeping the BatchNorm's input and channel statistics; the ReLU output the Conv would keep
  is rebuilt in backward (``bn_relu_conv.py``). Exact gradients; forward and running
  statistics bit-identical to the modules'.
* **Fused and bf16** (``"recompute-bf16"`` for ``gelu`` / ``silu`` / ``layernorm`` /
  ``batchnorm``): the same fusions, but the fused op keeps a bf16 copy of its input (of the
  normalised ``x_hat`` for the norms) instead of the input itself, and the ops that do not fuse
  store bf16 as with ``"bf16"``. Approximate, with the bf16 bounds above: of all forms it keeps
  the least per link without DropIT (a ResNet ``BN -> ReLU -> Conv`` link keeps 2 bytes per
  element instead of the exact fusion's 4 or ``"bf16"``'s 2 + 4).

* **Scale by a parameter** (``alpha * x`` / ``x * gamma`` with a learned per-channel or scalar
  ``alpha``: LayerScale, ResMLP's Affine, ConvNeXt's ``layer_scale``): the dense backward keeps
  ``x`` only for ``alpha``'s gradient. The op saves ``x`` as ``bf16`` (or ``int8``); ``grad_x``
  is exact (``grad_out * alpha``, as dense) and ``grad_alpha = sum(grad_out * x_stored)`` over
  the broadcast dimensions, so ``|dgrad_alpha| <= 2^-8 * sum|grad_out * x|`` (bf16) or
  ``<= absmax_block / 254 * sum|grad_out|`` (int8).

In eval mode, under ``no_grad``, or for inputs that cannot be compressed (half-precision
inputs with ``bf16`` storage), each op module runs the exact original op (``F.relu``,
``F.batch_norm`` with running stats...), so eval outputs are bit-identical.

Op modules have no parameters or buffers: BatchNorm/LayerNorm take their weight, bias and
running stats as graph inputs (``get_attr`` nodes on the original module), so ``state_dict``
keys and parameter sharing are unchanged. The ops are ``torch.library.custom_op`` with
registered autograd and fake kernels.

* **Attention with dropout** (``attention_dropout="recompute"``, the default; CPU): the math
  path's three ``[b, heads, L, L]`` tensors and its own q, k, v copies give way to q, k, v (as
  they are, or as ``attention`` stores them) and a seed; backward recomputes the probabilities
  and regenerates the dropout mask (``attention_dropout.py``). Exact for the mask drawn.

* **MaxPool2d** (``maxpool="indices"``): keeps only the index of each maximum,
  int16 (int32 for planes over 32768 elements), not its input and int64 indices: its backward
  reads the input for its shape alone (``max_pool.py``). Exact; in ResNet's stem the
  pooled ReLU output is then held by nobody once the ReLU keeps a 1-bit mask.

Modules beside this one: ``config`` (the config), ``ops`` (the custom ops), ``modules`` (their op
modules), ``attention_dropout``, ``bn_relu_conv``, ``dense_storage``, ``max_pool`` and ``fp8_storage``
(one form each).
This one holds the per-op planning rules (one ``_plan_*`` per op family, each deciding a node's
form from the config and the node's neighbours) and the pass: ~660 lines, most of it this
docstring and the rules, which read best side by side.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from sparsify_fx.passes.activation_memory.attention_dropout import ActMemAttentionDropout
from sparsify_fx.passes.activation_memory.bn_relu_conv import ActMemBnReLUConv
from sparsify_fx.passes.activation_memory.config import (
    FUSED_FORMS as _FUSED,
)
from sparsify_fx.passes.activation_memory.config import (
    GRAD_ERROR_BOUNDS,
    ActivationMemory,
)
from sparsify_fx.passes.activation_memory.max_pool import ActMemMaxPool2d, index_dtype

# the ops live in actmem_ops.py and their modules in actmem_modules.py; the names tests and
# users import from here stay
from sparsify_fx.passes.activation_memory.modules import (
    ActMemActivation,
    ActMemActLinear,
    ActMemAttention,
    ActMemBatchNorm,
    ActMemLayerNorm,
    ActMemLnLinear,
    ActMemReLU,
    ActMemScale,
)
from sparsify_fx.passes.activation_memory.ops import NONFINITE_CODE, compress, decompress
from sparsify_fx.passes.kernels.bf16_matmul import kernel_details
from sparsify_fx.passes.kernels.bitpack import pack_bits, unpack_bits

import sparsify_fx as sfx
from sparsify_fx import (
    PassResult,
    Rewrite,
    has_hooks,
    overwritten_in_place,
)
from sparsify_fx.graph.op_table import BATCH_NORM_MODULES, is_view

# listed, not built from actmem_ops.__all__: tools (ruff's unused-import fix) only see a literal
__all__ = [
    "ActivationMemory", "GRAD_ERROR_BOUNDS", "pack_bits", "unpack_bits", "NONFINITE_CODE", "compress",
    "decompress", "ActMemReLU", "ActMemActivation", "ActMemBatchNorm", "ActMemLayerNorm", "ActMemActLinear",
    "ActMemLnLinear", "ActMemScale", "ActMemAttention", "ActMemBnReLUConv", "ActMemMaxPool2d",
]

# ---------------------------------------------------------------- the pass


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _inplace_reason(node: fx.Node, x: object) -> str | None:
    # training runs in place only on the eager CPU path (out of place when compiled, or another
    # dtype): either is the model's program only when nobody else sees x
    if not isinstance(x, fx.Node):
        return "input is not a graph value"
    if x.op in ("placeholder", "get_attr"):
        return "in-place op on a tensor visible outside the graph (input or attribute)"
    if len(x.users) > 1:
        return f"in-place op whose input {x.name!r} has other users"
    return None


def _numel_of(node: object) -> int | None:
    meta = sfx.tensor_meta(node)
    return math.prod(meta[0]) if meta is not None else None


def _stored_bytes(numel: int | None, storage: str, block: int) -> int | None:
    if numel is None:
        return None
    if storage == "bf16":
        return 2 * numel
    return math.ceil(numel / block) * (block + 4)


def _plan_functional_batch_norm(node: fx.Node, x, config, numel, before):
    """``F.batch_norm`` as Dynamo writes an inlined BatchNorm: it updates the running statistics
    in place, with the exponential-average factor already computed (``num_batches_tracked`` is
    a separate op). The op module does the same given no counter."""
    storage = _unfused(config.batchnorm)
    if storage == "off":
        return "batchnorm='off'"
    found = _functional_batch_norm_args(node)
    if isinstance(found, str):
        return found
    weight, bias, mean, var, momentum, eps = found
    op_module = ActMemBatchNorm(momentum, eps, storage, config.block_size)
    return op_module, (x, weight, bias, mean, var, None), before, _stored_bytes(numel, storage, config.block_size)


def _functional_batch_norm_args(node: fx.Node):
    """``(weight, bias, running_mean, running_var, momentum, eps)`` of a training-mode
    ``F.batch_norm`` node with running statistics and constant factors, else why not."""
    mean, var = _arg(node, 1, "running_mean"), _arg(node, 2, "running_var")
    weight, bias = _arg(node, 3, "weight"), _arg(node, 4, "bias")
    training, momentum, eps = _arg(node, 5, "training", False), _arg(node, 6, "momentum", 0.1), _arg(node, 7, "eps", 1e-5)
    if training is not True:
        return "functional batch_norm with training not the constant True (it saves nothing for backward)"
    if not isinstance(mean, fx.Node) or not isinstance(var, fx.Node):
        return "functional batch_norm without running statistics (track_running_stats=False) is not supported"
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not isinstance(eps, (int, float)):
        return "momentum / eps are not constants (BatchNorm with momentum=None)"
    return weight, bias, mean, var, float(momentum), float(eps)


def _candidate(gm: fx.GraphModule, node: fx.Node):
    """``(op name, original module or None)`` for a node this pass may rewrite, else None."""
    if node.op == "call_function":
        name = {F.relu: "relu", F.leaky_relu: "leaky_relu", F.gelu: "gelu", F.silu: "silu",
                F.layer_norm: "layer_norm", F.batch_norm: "batch_norm",
                F.scaled_dot_product_attention: "attention", F.max_pool2d: "max_pool2d"}.get(node.target)
        if name:
            return name, None
        if node.target in (operator.mul, torch.mul) and len(node.args) == 2 and not node.kwargs \
                and sum(isinstance(a, fx.Node) and a.op == "get_attr" for a in node.args) == 1:
            return "scale", None
        return None
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if type(module) in BATCH_NORM_MODULES:
            return "batch_norm", module
        if type(module) is nn.LayerNorm:
            return "layer_norm", module
        if type(module) is nn.LeakyReLU:
            return "leaky_relu", module
        if type(module) is nn.MaxPool2d:
            return "max_pool2d", module
    return None


def _through_identity_dropout(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node | None, list[fx.Node]]:
    """The single consumer of ``node`` past ``Dropout(p=0)`` modules, and the dropouts passed."""
    passed: list[fx.Node] = []
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.op == "call_module" and isinstance(gm.get_submodule(str(user.target)), nn.Dropout) \
                and gm.get_submodule(str(user.target)).p == 0 and len(user.args) == 1:
            passed.append(user)
            node = user
            continue
        return user, passed
    return None, passed


def _linear_consumer(gm: fx.GraphModule, node: fx.Node, what: str):
    """``(linear node, weight, bias)`` of the one Linear ``node`` feeds, or why there is none."""
    consumer, dropouts = _through_identity_dropout(gm, node)
    if consumer is None:
        return f"{what} needs one consumer (a Linear); {node.name} has {len(node.users)}"
    last = dropouts[-1] if dropouts else node
    if not (consumer.op == "call_function" and consumer.target is F.linear and consumer.args
            and consumer.args[0] is last):
        return f"{what} needs a Linear consumer; it feeds {consumer.format_node()}"
    weight, bias = _arg(consumer, 1, "weight"), _arg(consumer, 2, "bias")
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        return f"the consumer's weight is not a parameter: {consumer.format_node()}"
    if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
        return f"the consumer's bias is not a parameter: {consumer.format_node()}"
    return consumer, weight, bias


def _store(storage: str) -> str:
    """The fused op's ``store`` for a ``_FUSED`` setting."""
    return "bf16" if storage == "recompute-bf16" else "exact"


def _unfused(storage: str) -> str:
    """How an op stores what it keeps when it does not fuse: ``"recompute-bf16"`` falls back to
    ``"bf16"``."""
    return "bf16" if storage == "recompute-bf16" else storage


def _fused_bytes(x: fx.Node, store: str, freed: int | None):
    """``(before, after)`` of a fused op: ``freed`` (what the consumer kept) alone when it keeps
    ``x`` itself, else also ``x``'s hold, against the bf16 copy it keeps instead."""
    if store == "exact":
        return freed, 0
    numel = _numel_of(x)
    return (freed or 0) + (sfx.tensor_bytes(x) or 0), None if numel is None else 2 * numel


def _plan_act_linear(gm: fx.GraphModule, node: fx.Node, op: str, approximate: object, x: object,
                     store: str = "exact", weight_grad: str = "auto"):
    if not isinstance(approximate, str):
        return "approximate is not a constant"
    if not isinstance(x, fx.Node):
        return "input is not a graph value"
    if op == "silu" and _arg(node, 1, "inplace", False):
        return "in-place SiLU"
    found = _linear_consumer(gm, node, f"{op}='recompute'")
    if isinstance(found, str):
        return found
    consumer, weight, bias = found
    before, after = _fused_bytes(x, store, sfx.tensor_bytes(node))
    return ActMemActLinear(op, approximate, store, weight_grad), (x, weight, bias), before, after, consumer


def _plan_ln_linear(gm: fx.GraphModule, node: fx.Node, module: nn.Module | None, x: object,
                    store: str = "exact", weight_grad: str = "auto"):
    if not isinstance(x, fx.Node):
        return "input is not a graph value"
    found = _linear_consumer(gm, node, "layernorm='recompute'")
    if isinstance(found, str):
        return found
    consumer, weight, bias = found
    if module is not None:
        if has_hooks(module):
            return "module has hooks; kept as a module call"
        if len(node.args) + len(node.kwargs) != 1:
            return "called with more than one argument"
        shape, eps = tuple(module.normalized_shape), module.eps
        with gm.graph.inserting_before(node):
            ln_w, ln_b = (gm.graph.get_attr(f"{node.target}.{n}") if getattr(module, n, None) is not None else None
                          for n in ("weight", "bias"))
        for a in (ln_w, ln_b):
            if a is not None:
                a.meta[sfx.meta.MODULE] = str(node.target)
    else:
        shape, ln_w, ln_b, eps = (_arg(node, 1, "normalized_shape"), _arg(node, 2, "weight"),
                                  _arg(node, 3, "bias"), _arg(node, 4, "eps", 1e-5))
        shape = (shape,) if isinstance(shape, int) else shape
        if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) for d in shape) \
                or not isinstance(eps, (int, float)):
            return "normalized_shape / eps are not constants"
    before, after = _fused_bytes(x, store, sfx.tensor_bytes(node))
    op_module = ActMemLnLinear(tuple(shape), float(eps), store, weight_grad)
    return op_module, (x, ln_w, ln_b, weight, bias), before, after, consumer


def _output_kept_dense(gm: fx.GraphModule, act: fx.Node) -> str | None:
    """Why a ReLU's 1-bit mask would add bytes: a dense Linear / Conv consuming its output
    keeps that output for its weight gradient, and ReLU's own backward reads the same tensor
    (a DropIT placed before actmem in the recipe compresses both)."""
    aliases, users = {act}, list(act.users)
    while users:  # through views (a flatten before the classifier keeps the same storage)
        user = users.pop()
        viewing = is_view(user) or (user.op == "call_module" and isinstance(
            gm.get_submodule(str(user.target)), (nn.Flatten, nn.Unflatten, nn.Identity)))
        if viewing and user.args and user.args[0] in aliases:
            aliases.add(user)
            users += list(user.users)
            continue
        op = sfx.dense_op(gm, user)
        if isinstance(op, sfx.DenseOp) and op.input in aliases and gm.get_parameter(op.weight_name).requires_grad:
            return (f"its output is kept dense by {user.name} ({op.kind}) backward, which ReLU's backward "
                    "reads too: a 1-bit mask would add bytes (put dropit before actmem to compress both)")
    return None


def _relu_upper(gm: fx.GraphModule, act: fx.Node, x: fx.Node) -> tuple[float | None, bool] | str:
    """``(upper, keeps_input)`` for a ReLU of ``x`` (upper None) or a ``hardtanh(x, 0, upper)``
    (ReLU6), where ``keeps_input``: its dense backward keeps its input besides its output (a
    hardtanh does, in place too: autograd saves a clone of the input); else why not (appended
    to the message, may be empty)."""
    if act.op == "call_function" and act.args and act.args[0] is x:
        if act.target is F.relu:
            return None, False
        if act.target is F.relu6:
            return 6.0, True
        if act.target is F.hardtanh:
            low, high = _arg(act, 1, "min_val", -1.0), _arg(act, 2, "max_val", 1.0)
            if low == 0 and isinstance(high, (int, float)) and high > 0:
                return float(high), True
            return f" (min_val={low!r}: only hardtanh(x, 0, upper) is a clipped ReLU)"
    if act.op == "call_module" and len(act.args) == 1 and act.args[0] is x and not act.kwargs:
        module = gm.get_submodule(str(act.target))
        if isinstance(module, nn.Hardtanh):  # ReLU6 is a Hardtanh(0, 6)
            if has_hooks(module):
                return " (the activation module has hooks)"
            if module.min_val == 0 and module.max_val > 0:
                return float(module.max_val), True
    return ""


def _plan_bn_relu_conv(gm: fx.GraphModule, node: fx.Node, module: nn.Module | None, x: object,
                       store: str = "exact", weight_grad: str = "auto"):
    what = f"batchnorm={'recompute' if store == 'exact' else 'recompute-bf16'!r}"
    if module is None:
        # F.batch_norm as Dynamo inlines a BatchNorm (a torch.compile graph, sfx.backend): the
        # average factor already computed, num_batches_tracked counted by a separate op
        functional = _functional_batch_norm_args(node)
        if isinstance(functional, str):
            return functional
        if not isinstance(x, fx.Node):
            return "input is not a graph value"
    else:
        if has_hooks(module):
            return "module has hooks; kept as a module call"
        if not module.track_running_stats or module.running_mean is None:
            return "track_running_stats=False (batch statistics in eval) is not supported"
        if len(node.args) + len(node.kwargs) != 1 or not isinstance(x, fx.Node):
            return "called with more than one argument"
    if len(node.users) != 1:
        return f"{what} needs one consumer (a ReLU); {node.name} has {len(node.users)}"
    relu = next(iter(node.users))
    upper = _relu_upper(gm, relu, node)
    if isinstance(upper, str):
        return f"{what} needs BatchNorm -> ReLU -> Conv; the BatchNorm feeds {relu.format_node()}{upper}"
    upper, keeps_input = upper
    if len(relu.users) != 1:
        return f"{what} needs the ReLU to feed one Conv; {relu.name} has {len(relu.users)} consumers"
    conv = next(iter(relu.users))
    op = sfx.dense_op(gm, conv) if conv.op == "call_function" else None
    if not isinstance(op, sfx.DenseOp) or op.kind != "conv" or op.input is not relu:
        why = f" ({op})" if isinstance(op, str) else ""
        return f"{what} needs BatchNorm -> ReLU -> Conv; the ReLU feeds {conv.format_node()}{why}"
    if isinstance(op.padding, str):
        return f"{what}: the Conv's padding={op.padding!r} is not explicit: {conv.format_node()}"
    weight, bias = op.weight, op.bias
    stride, padding, dilation, groups = op.stride, op.padding, op.dilation, op.groups
    if module is None:
        bn_weight, bn_bias, mean, var, momentum, eps = functional
        attrs = [bn_weight, bn_bias, mean, var, None]
    else:
        prefix, momentum, eps = str(node.target), module.momentum, module.eps
        with gm.graph.inserting_before(node):
            attrs = [gm.graph.get_attr(f"{prefix}.{name}") if getattr(module, name) is not None else None
                     for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
        for a in attrs:
            if a is not None:
                a.meta[sfx.meta.MODULE] = prefix
    op_module = ActMemBnReLUConv(momentum, eps, stride, padding, dilation, groups, upper, store, weight_grad)
    # freed: the activation's output (the conv's input) and, for a hardtanh, the BatchNorm
    # output its backward kept
    freed = (sfx.tensor_bytes(relu) or 0) + ((sfx.tensor_bytes(node) or 0) if keeps_input else 0)
    return (op_module, (x, *attrs, weight, bias), *_fused_bytes(x, store, freed), conv)


def _plan_scale(gm: fx.GraphModule, node: fx.Node, config: ActivationMemory):
    if config.scale == "off":
        return "scale='off'"
    param, x = node.args if node.args[0].op == "get_attr" else node.args[::-1]
    if not isinstance(x, fx.Node):
        return "the other operand is not a graph value"
    try:
        value = gm.get_parameter(str(param.target))
    except AttributeError:  # a buffer or a constant tensor: no gradient, nothing kept
        value = None
    if value is None or not value.requires_grad:
        return f"{param.target} is not a trainable parameter: the product keeps nothing for backward"
    x_meta, out_meta = sfx.tensor_meta(x), sfx.tensor_meta(node)
    if x_meta is None or out_meta is None:
        return "shapes unknown (no example inputs recorded)"
    if tuple(out_meta[0]) != tuple(x_meta[0]):
        return f"{param.target} broadcasts {x.name} to a larger shape {tuple(out_meta[0])}"
    if not x_meta[1].is_floating_point:
        return f"{x.name} is not floating point"
    return (ActMemScale(config.scale, config.block_size), (x, param), sfx.tensor_bytes(x),
            _stored_bytes(_numel_of(x), config.scale, config.block_size))


def _plan_attention_dropout(gm: fx.GraphModule, node: fx.Node, args: dict, config: ActivationMemory):
    """Attention with dropout: keep q, k, v and a seed instead of the math path's scores."""
    if config.attention_dropout == "off":
        return f"dropout_p={args['dropout_p']} and attention_dropout='off'"
    p, is_causal, scale = args["dropout_p"], args["is_causal"] or False, args["scale"]
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p < 1:
        return f"dropout_p={p!r} is not a constant probability"
    if not isinstance(is_causal, bool) or not (scale is None or isinstance(scale, (int, float))):
        return "is_causal / scale are not constants"
    q, k, v, mask = args["query"], args["key"], args["value"], args["attn_mask"]
    if not all(isinstance(t, fx.Node) for t in (q, k, v)) or not (mask is None or isinstance(mask, fx.Node)):
        return "q, k, v or the mask are not graph values"
    if any(t.is_cuda for t in gm.parameters()):
        return "on a GPU the fused attention kernels take dropout and keep no scores"
    metas = [sfx.tensor_meta(t) for t in (q, k, v)]
    storage, before, after = "exact", None, None
    if all(m is not None for m in metas):
        if not (tuple(metas[0][0][:-2]) == tuple(metas[1][0][:-2]) == tuple(metas[2][0][:-2])):
            return "q, k, v batch dims differ (broadcasting attention is not supported)"
        width = torch.empty((), dtype=metas[0][1]).element_size()
        if config.attention != "off" and width > (2 if config.attention == "bf16" else 1):
            storage = config.attention
        mask_bytes = (sfx.tensor_bytes(mask) or 0) if mask is not None else 0
        # (the dense op keeps its own copies of q, k, v, not the operands: counted there)
        before = sfx.math_attention_bytes(node, gm, getattr(gm, "meta", {}).get(sfx.meta.AUTOCAST))
        kept = (sum(_stored_bytes(_numel_of(t), storage, config.block_size) or 0 for t in (q, k, v))
                if storage != "exact" else sum(sfx.tensor_bytes(t) or 0 for t in (q, k, v)))
        after = kept + (mask_bytes if storage != "exact" else 0)
    module = ActMemAttentionDropout(float(p), is_causal, None if scale is None else float(scale), storage,
                                    config.block_size)
    return module, (q, k, v) + ((mask,) if mask is not None else ()), before, after


def _plan_attention(gm: fx.GraphModule, node: fx.Node, config: ActivationMemory):
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
    args = {name: _arg(node, i, name) for i, name in enumerate(names)}
    if node.kwargs.get("enable_gqa", False):
        return "enable_gqa=True (grouped-query attention) is not supported"
    if args["dropout_p"] not in (None, 0, 0.0):
        return _plan_attention_dropout(gm, node, args, config)
    if config.attention == "off":
        return "attention='off'"
    if args["attn_mask"] is not None:
        return "attn_mask given: the op would keep the mask dense; only unmasked / is_causal attention is rewritten"
    is_causal, scale = args["is_causal"] or False, args["scale"]
    if not isinstance(is_causal, bool) or not (scale is None or isinstance(scale, (int, float))):
        return "is_causal / scale are not constants"
    q, k, v = args["query"], args["key"], args["value"]
    if not all(isinstance(t, fx.Node) for t in (q, k, v)):
        return "q, k, v are not graph values"
    metas = [sfx.tensor_meta(t) for t in (q, k, v)]
    before = after = None
    # (where the shapes say the CPU flash kernel will not take them, the op re-runs instead)
    # (nor where the model overwrites the output in place: backward would find it changed)
    keep = config.attention_output == "keep" and not overwritten_in_place(node) and not any(
        m is not None and (len(m[0]) != 4 or m[0][-1] != metas[0][0][-1]) for m in metas)
    if all(m is not None for m in metas):
        if not (tuple(metas[0][0][:-2]) == tuple(metas[1][0][:-2]) == tuple(metas[2][0][:-2])):
            return "q, k, v batch dims differ (broadcasting attention is not supported)"
        width = torch.empty((), dtype=metas[0][1]).element_size()
        if width <= (2 if config.attention == "bf16" else 1):
            # (recorded under autocast: the op module would run the dense attention)
            return f"q, k, v are {str(metas[0][1]).removeprefix('torch.')} already: attention={config.attention!r} has nothing to compress"
        before = sum(sfx.tensor_bytes(t) or 0 for t in (q, k, v, node))
        after = sum(_stored_bytes(_numel_of(t), config.attention, config.block_size) or 0 for t in (q, k, v))
        if keep:  # + the fp32 log-sum-exp per query row (the output itself is counted as held)
            after += 4 * (_numel_of(q) or 0) // max(1, metas[0][0][-1])
    # without recorded shapes (a torch.compile graph) the op module checks them at run time and
    # runs the dense op on broadcasting batch dims
    module = ActMemAttention(is_causal, None if scale is None else float(scale), config.attention, config.block_size,
                             keep_output=keep)
    return module, (q, k, v), before, after


def _plan_max_pool(node: fx.Node, module: nn.Module | None, config: ActivationMemory):
    if config.maxpool == "off":
        return "maxpool='off'"
    if module is not None:
        if has_hooks(module):
            return "module has hooks; kept as a module call"
        if len(node.args) + len(node.kwargs) != 1:
            return "called with more than one argument"
        x = node.args[0] if node.args else node.kwargs.get("input")
        args = (module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode,
                module.return_indices)
    else:
        x = _arg(node, 0, "input")
        names = (("kernel_size", None), ("stride", None), ("padding", 0), ("dilation", 1), ("ceil_mode", False),
                 ("return_indices", False))
        args = tuple(_arg(node, i + 1, name, default) for i, (name, default) in enumerate(names))
    kernel_size, stride, padding, dilation, ceil_mode, return_indices = args
    if return_indices is not False:
        return "return_indices=True: the model reads the int64 indices"
    sizes = (kernel_size, stride if stride is not None else kernel_size, padding, dilation)
    if not all(isinstance(v, int) or (isinstance(v, (list, tuple)) and all(isinstance(a, int) for a in v))
               for v in sizes) or not isinstance(ceil_mode, bool):
        return "kernel_size / stride / padding / dilation / ceil_mode are not constants"
    if not isinstance(x, fx.Node):
        return "input is not a graph value"
    x_meta, out_meta = sfx.tensor_meta(x), sfx.tensor_meta(node)
    before = after = None
    if x_meta is not None and out_meta is not None:
        if len(x_meta[0]) not in (3, 4):
            return f"a {len(x_meta[0])}-D input (max_pool2d takes 3-D or 4-D)"
        out_numel = _numel_of(node) or 0
        index_size = torch.empty((), dtype=index_dtype(x_meta[0][-1] * x_meta[0][-2])).element_size()
        before, after = (sfx.tensor_bytes(x) or 0) + 8 * out_numel, index_size * out_numel
    return ActMemMaxPool2d(kernel_size, stride, padding, dilation, ceil_mode), (x,), before, after


def _plan(gm: fx.GraphModule, node: fx.Node, op: str, module: nn.Module | None, config: ActivationMemory):
    """``(op module, graph args, stored bytes before, after)`` or a skip reason string."""
    if op == "scale":
        return _plan_scale(gm, node, config)
    if op == "attention":
        return _plan_attention(gm, node, config)
    if op == "max_pool2d":
        return _plan_max_pool(node, module, config)
    x = _arg(node, 0, "input")
    numel = _numel_of(x)
    before = sfx.tensor_bytes(x)
    if op in ("relu", "leaky_relu"):
        if config.relu == "off":
            return "relu='off'"
        if module is not None:
            slope, inplace = module.negative_slope, module.inplace
            if has_hooks(module):
                return "module has hooks; kept as a module call"
        else:
            slope = 0.0 if op == "relu" else _arg(node, 1, "negative_slope", 0.01)
            inplace = _arg(node, 2 if op == "leaky_relu" else 1, "inplace", False)
        if not isinstance(slope, (int, float)) or not isinstance(inplace, bool):
            return "negative_slope / inplace are not constants"
        if slope < 0:
            return f"negative_slope={slope} < 0: the sign of the output does not give the mask"
        if inplace and (why := _inplace_reason(node, x)):
            return why
        # (with dense storage on, this pass stores those Linear / Conv inputs in bf16 too)
        if config.dense == "off" and (why := _output_kept_dense(gm, node)):
            return why
        after = math.ceil(numel / 8) if numel is not None else None
        return ActMemReLU(slope, inplace), (x,), before, after
    if op in ("gelu", "silu"):
        storage = getattr(config, op)
        if storage == "off":
            return f"{op}='off'"
        approximate = _arg(node, 1, "approximate", "none") if op == "gelu" else "none"
        if storage in _FUSED:
            fused = _plan_act_linear(gm, node, op, approximate, x, _store(storage), config.weight_grad)
            if storage == "recompute" or not isinstance(fused, str):
                return fused
            storage = "bf16"  # "recompute-bf16" where the pair does not fuse
        inplace = _arg(node, 1, "inplace", False) if op == "silu" else False
        if not isinstance(approximate, str) or not isinstance(inplace, bool):
            return "approximate / inplace are not constants"
        if inplace and (why := _inplace_reason(node, x)):
            return why
        module = ActMemActivation(op, storage, config.block_size, approximate, inplace)
        return module, (x,), before, _stored_bytes(numel, storage, config.block_size)
    g = gm.graph
    prefix = str(node.target)
    if op == "batch_norm" and config.batchnorm in _FUSED:
        fused = _plan_bn_relu_conv(gm, node, module, x, _store(config.batchnorm), config.weight_grad)
        if config.batchnorm == "recompute" or not isinstance(fused, str):
            return fused
    if op == "batch_norm" and module is None:
        return _plan_functional_batch_norm(node, x, config, numel, before)
    if op == "layer_norm" and config.layernorm in _FUSED:
        fused = _plan_ln_linear(gm, node, module, x, _store(config.layernorm), config.weight_grad)
        if config.layernorm == "recompute" or not isinstance(fused, str):
            return fused
    layernorm, batchnorm = _unfused(config.layernorm), _unfused(config.batchnorm)
    if op == "layer_norm" and module is None:
        if layernorm == "off":
            return "layernorm='off'"
        shape = _arg(node, 1, "normalized_shape")
        weight, bias, eps = _arg(node, 2, "weight"), _arg(node, 3, "bias"), _arg(node, 4, "eps", 1e-5)
        if isinstance(shape, int):
            shape = (shape,)
        if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) for d in shape):
            return "normalized_shape is not a constant"
        if not isinstance(eps, (int, float)):
            return "eps is not a constant"
        op_module = ActMemLayerNorm(tuple(shape), float(eps), layernorm, config.block_size)
        return op_module, (x, weight, bias), before, _stored_bytes(numel, layernorm, config.block_size)
    if op == "batch_norm":
        if batchnorm == "off":
            return "batchnorm='off'"
        if has_hooks(module):
            return "module has hooks; kept as a module call"
        if not module.track_running_stats or module.running_mean is None:
            return "track_running_stats=False (batch statistics in eval) is not supported"
        if len(node.args) + len(node.kwargs) != 1:
            return "called with more than one argument"
        with g.inserting_before(node):
            attrs = [
                g.get_attr(f"{prefix}.{n}") if getattr(module, n) is not None else None
                for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
            ]
        for a in attrs:
            if a is not None:
                a.meta[sfx.meta.MODULE] = prefix
        op_module = ActMemBatchNorm(module.momentum, module.eps, batchnorm, config.block_size)
        return op_module, (x, *attrs), before, _stored_bytes(numel, batchnorm, config.block_size)
    # layer_norm
    if layernorm == "off":
        return "layernorm='off'"
    if has_hooks(module):
        return "module has hooks; kept as a module call"
    if len(node.args) + len(node.kwargs) != 1:
        return "called with more than one argument"
    with g.inserting_before(node):
        attrs = [
            g.get_attr(f"{prefix}.{n}") if getattr(module, n, None) is not None else None
            for n in ("weight", "bias")
        ]
    for a in attrs:
        if a is not None:
            a.meta[sfx.meta.MODULE] = prefix
    op_module = ActMemLayerNorm(module.normalized_shape, module.eps, layernorm, config.block_size)
    return op_module, (x, *attrs), before, _stored_bytes(numel, layernorm, config.block_size)


def _fused_storage(op_module: nn.Module) -> str:
    return "recompute" if getattr(op_module, "store", "exact") == "exact" else "recompute-bf16"


@sfx.register_pass(ActivationMemory, name="actmem")
def _activation_memory_pass(gm: fx.GraphModule, config: ActivationMemory, ctx) -> PassResult:
    result = PassResult(gm, modified=False)
    erased: set[fx.Node] = set()  # the ops a fused rewrite absorbed (a BatchNorm's ReLU)
    for node in list(gm.graph.nodes):
        if node in erased:
            continue
        found = _candidate(gm, node)
        if found is None:
            continue
        op, module = found
        module_name = str(node.meta.get(sfx.meta.MODULE, "")) or (str(node.target) if module else "")
        reason = ctx.selection_reason(config, None, module_name, gm)
        try:
            plan = reason if reason is not None else _plan(gm, node, op, module, config)
        except Exception as e:
            e.sfx_node = node  # the pass manager names this node in its PassError
            raise
        if isinstance(plan, str):
            result.skips.append(sfx.Skip(ctx.pass_name, node.name, ctx.qualified(module_name), op, plan))
            continue
        op_module, args, before, after, *fused = plan
        target = sfx.install_module(gm, f"actmem_{op}_{module_name or node.name}", op_module)
        replaced = fused[0] if fused else node
        with gm.graph.inserting_before(replaced):
            new = gm.graph.call_module(target, tuple(args))
        # a fused op *is* the Linear call now: later passes skip it under the Linear's name
        linear = sfx.module_name_of(fused[0]) if fused else ""
        new.meta[sfx.meta.MODULE] = linear or module_name
        origin = node.name
        sfx.replace_node(replaced, new)
        if fused:  # the activation (and identity dropouts) now feed nothing
            dead = node
            chain = [dead]
            while dead.users:
                dead = next(iter(dead.users))
                chain.append(dead)
            for n in reversed(chain):
                if not n.users:
                    gm.graph.erase_node(n)
                    erased.add(n)
        result.rewrites.append(
            Rewrite(
                ctx.pass_name, origin, ctx.qualified(module_name), op, target,
                saved_bytes_before=before, saved_bytes_after=after,
                details={"storage": getattr(op_module, "storage", _fused_storage(op_module) if fused else "bitmask"),
                         **({"weight_grad": config.weight_grad} if getattr(op_module, "store", "exact") == "bf16"
                            else {}),
                         **({"fused_linear": ctx.qualified(linear), "fused_node": fused[0].name} if fused else {}),
                         # (args: x, the BatchNorm's tensors, the Conv's weight, its bias)
                         **(kernel_details(args[-2]) if isinstance(op_module, ActMemBnReLUConv) else {}),
                         **({"output": "keep"} if op_module.keeps_output else {}),
                         **({"dropout_p": op_module.dropout_p} if isinstance(op_module, ActMemAttentionDropout)
                            else {})},
            )
        )
        result.modified = True
    if config.dense != "off":
        # after the activations: a fused activation->Linear pair already is that Linear's call
        from sparsify_fx.passes.activation_memory.dense_storage import rewrite_dense_inputs

        rewrite_dense_inputs(gm, config, ctx, result)
    return result
