"""SliceOut (arXiv 2007.10909): train on a contiguous window of each layer's units.

Per training forward and per slice group (see :func:`sparsify_fx.find_slice_groups`), a
window of ``width`` contiguous units is drawn; the producer's weight rows and bias, the
BatchNorms' parameters and running statistics, and the consumers' weight columns are
narrowed to it, so the matmuls and convolutions really run on smaller tensors. Kept units
are rescaled by ``units / width`` (inverted dropout with a contiguous mask, applied where the
units enter the consumer), so eval mode -- which runs the original dense ops -- is exactly
the dense model.

Windows are deterministic: the start is drawn from a ``torch.Generator`` seeded by
``(seed, group name, step)``, where ``step`` counts the group's training forwards. Every data
parallel rank with the same seed therefore takes the same windows without communication.

Gradients: every parameter gets a full-size gradient that is zero outside the window. The
sliced ops are ``torch.library.custom_op``\\ s whose backward computes the weight gradient
on the window only and writes it into one zero-filled full-size tensor (which autograd then
adopts as ``.grad``). Plain ``W[rows][:, cols]`` / ``torch.cat`` indexing would instead build
one zero-filled full-size temporary per slice (two for a weight narrowed on both sides,
three for the fused q/k/v rows of an attention projection) and sum them.

One module of ~570 lines, in reading order: the config and window width, the window
gradients, the two custom ops, the op modules, the pass and its node rewrites. The slice
groups it rewrites come from the core (``sparsify_fx.analysis.slice_groups``).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from sparsify_fx.passes.kernels.op_autograd import owned, register_autograd

import sparsify_fx as sfx
from sparsify_fx import ConfigError, PassConfig, PassResult, Rewrite, check_range
from sparsify_fx.graph.op_table import CONV_FUNCTIONS

__all__ = ["SliceOut", "SliceWindow", "SliceOutDense", "SliceOutBatchNorm", "window_width"]


@dataclass(frozen=True)
class SliceOut(PassConfig):
    """Train each sliceable layer on a random contiguous window of its units (SliceOut).

    Args:
        p: fraction of units dropped per step, in [0, 1); the window keeps
            ``round((1 - p) * n / align) * align`` units (at least ``align``).
        align: windows start and end on multiples of this many units (memory-friendly
            sizes run faster); attention heads are always sliced whole.
        seed: windows are drawn from ``(seed, group, step)``: the same on every rank.
        skip_first_last: leave groups whose producer is the model's first dense layer or
            whose consumer is its last one dense.
        heads: slice attention heads (q/k/v rows and out-projection columns; under
            grouped-query attention, whole key/value heads with their query heads).

    Example:
        >>> import torch, sparsify_fx as sfx
        >>> m = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32),
        ...                         torch.nn.ReLU(), torch.nn.Linear(32, 2))
        >>> fast = sfx.sparsify(m, sfx.SliceOut(p=0.5), example_inputs=(torch.randn(4, 8),))
        >>> [(r.module, r.details["width"]) for r in sfx.explain(fast).rewrites]
        []
        >>> fast = sfx.sparsify(m, sfx.SliceOut(p=0.5, skip_first_last=False), example_inputs=(torch.randn(4, 8),))
        >>> [(r.module, r.details["width"]) for r in sfx.explain(fast).rewrites]
        [('0', 16), ('2', 16)]
    """

    p: float = 0.25
    align: int = 8
    seed: int = 0
    skip_first_last: bool = True
    heads: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "p", self.p, 0.0, 1.0, high_open=True)
        for name in ("align", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"SliceOut.{name} must be an int, got {value!r}")
        if self.align < 1:
            raise ConfigError(f"SliceOut.align must be >= 1, got {self.align!r}")
        if self.seed < 0:
            raise ConfigError(f"SliceOut.seed must be >= 0, got {self.seed!r}")
        for name in ("skip_first_last", "heads"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ConfigError(f"SliceOut.{name} must be a bool, got {value!r}")


def window_width(units: int, p: float, align: int) -> int:
    """Units kept per step: ``round((1 - p) * units)`` rounded to a multiple of ``align``."""
    blocks = round((1.0 - p) * units / align)
    return min(units, max(align, blocks * align))


# ---------------------------------------------------------------- slicing helpers
# A "ranges" list is flat: [start0, length0, start1, length1, ...]; empty means "all".


def _take(t: torch.Tensor, dim: int, ranges: list[int]) -> torch.Tensor:
    if not ranges:
        return t
    parts = [t.narrow(dim, ranges[i], ranges[i + 1]) for i in range(0, len(ranges), 2)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _weight_window(weight: torch.Tensor, rows: list[int], cols: list[int], scale: float) -> torch.Tensor:
    w = _take(_take(weight, 0, rows), 1, cols)
    return w * scale if scale != 1.0 else w


def _complement(ranges: list[int], size: int) -> list[int]:
    """The flat ranges of ``[0, size)`` not covered by sorted, disjoint ``ranges``."""
    out, pos = [], 0
    for i in range(0, len(ranges), 2):
        if ranges[i] > pos:
            out += [pos, ranges[i] - pos]
        pos = ranges[i] + ranges[i + 1]
    if pos < size:
        out += [pos, size - pos]
    return out


def _scatter_window(full: torch.Tensor, grad: torch.Tensor, rows: list[int], cols: list[int]) -> torch.Tensor:
    """Write a window's gradient into ``full`` (uninitialized, parameter-sized), zeros elsewhere.

    Only the complement of the window is zero-filled: filling the whole tensor first and
    then copying the window would write the window twice.
    """
    rows = rows or [0, full.shape[0]]
    gap = _complement(rows, full.shape[0])
    for i in range(0, len(gap), 2):
        full.narrow(0, gap[i], gap[i + 1]).zero_()
    offset = 0
    for i in range(0, len(rows), 2):
        dst = full.narrow(0, rows[i], rows[i + 1])
        if cols:
            gap = _complement(cols, full.shape[1])
            for j in range(0, len(gap), 2):
                dst.narrow(1, gap[j], gap[j + 1]).zero_()
            dst = dst.narrow(1, cols[0], cols[1])
        dst.copy_(grad.narrow(0, offset, rows[i + 1]))
        offset += rows[i + 1]
    return full


# ---------------------------------------------------------------- custom ops


@torch.library.custom_op("sparsify_fx::sliceout_linear", mutates_args=())
def _sliceout_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    rows: list[int], cols: list[int], scale: float,
) -> torch.Tensor:
    b = _take(bias, 0, rows) if bias is not None else None
    return owned(F.linear(x, _weight_window(weight, rows, cols, scale), b))


@_sliceout_linear.register_fake
def _(x, weight, bias, rows, cols, scale):
    out = sum(rows[1::2]) if rows else weight.shape[0]
    return x.new_empty(*x.shape[:-1], out)


def _linear_setup(ctx, inputs, output) -> None:
    x, weight, bias, rows, cols, scale = inputs
    # x is already window-sized (the producer was sliced) and weight is the parameter itself:
    # nothing larger than the dense layer's own saved input is kept
    ctx.save_for_backward(x, weight)
    ctx.window = (list(rows), list(cols), float(scale))
    ctx.bias_shape = bias.shape if bias is not None else None


def _linear_backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    rows, cols, scale = ctx.window
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    w = _weight_window(weight, rows, cols, scale)
    grad_x = grad_out @ w if need_x else None
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    grad_w = grad_b = None
    if need_w:
        window = g2.t() @ x.reshape(-1, x.shape[-1])
        if scale != 1.0:
            window.mul_(scale)
        grad_w = _scatter_window(torch.empty_like(weight), window, rows, cols)
    if need_b and ctx.bias_shape is not None:
        grad_b = _scatter_window(g2.new_empty(ctx.bias_shape), g2.sum(0), rows, [])
    return grad_x, grad_w, grad_b, None, None, None


sliceout_linear = register_autograd(_sliceout_linear, _linear_backward, _linear_setup)


def _conv_window(x, weight, bias, rows, cols, scale, stride, padding, dilation) -> torch.Tensor:
    b = _take(bias, 0, rows) if bias is not None else None
    w = _weight_window(weight, rows, cols, scale)
    zeros = [0] * len(stride)
    return owned(torch.ops.aten.convolution(x, w, b, stride, padding, dilation, False, zeros, 1))


@torch.library.custom_op("sparsify_fx::sliceout_conv", mutates_args=())
def _sliceout_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    rows: list[int], cols: list[int], scale: float,
    stride: list[int], padding: list[int], dilation: list[int],
) -> torch.Tensor:
    return _conv_window(x, weight, bias, rows, cols, scale, stride, padding, dilation)


@_sliceout_conv.register_fake
def _(x, weight, bias, rows, cols, scale, stride, padding, dilation):
    # the real computation on the fake tensors: the convolution's meta gives its layout (a
    # channels-last input gives a channels-last output)
    return _conv_window(x, weight, bias, rows, cols, scale, stride, padding, dilation)


def _conv_setup(ctx, inputs, output) -> None:
    x, weight, bias, rows, cols, scale, stride, padding, dilation = inputs
    ctx.save_for_backward(x, weight)
    ctx.window = (list(rows), list(cols), float(scale))
    ctx.conv = (list(stride), list(padding), list(dilation))
    ctx.bias_shape = bias.shape if bias is not None else None


def _conv_backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    rows, cols, scale = ctx.window
    stride, padding, dilation = ctx.conv
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    w = _weight_window(weight, rows, cols, scale).contiguous()
    has_b = bool(need_b and ctx.bias_shape is not None)
    grad_x, window, grad_bw = torch.ops.aten.convolution_backward(
        grad_out.contiguous(), x, w, [w.shape[0]] if has_b else None, stride, padding, dilation,
        False, [0] * len(stride), 1, [bool(need_x), bool(need_w), has_b],
    )
    grad_w = grad_b = None
    if need_w:
        if scale != 1.0:
            window = window * scale
        grad_w = _scatter_window(torch.empty_like(weight), window, rows, cols)
    if has_b:
        grad_b = _scatter_window(grad_bw.new_empty(ctx.bias_shape), grad_bw, rows, [])
    return grad_x, grad_w, grad_b, None, None, None, None, None, None


sliceout_conv = register_autograd(_sliceout_conv, _conv_backward, _conv_setup)


# ---------------------------------------------------------------- op modules


class SliceWindow(sfx.OpModule):
    """Parameter-free: draws one group's window start per training forward (None in eval).

    The start is uniform over the aligned positions ``0, align, 2*align, ...`` (plus
    ``units - width``, so the last units are reachable when ``units`` is not a multiple of
    ``align``), from a (Python) generator seeded by ``(seed, name, step)``.

    Attributes:
        step: training forwards seen so far (set it to resume a run's window sequence).
        fixed: when not None, the start used on every step (tests, debugging).
    """

    #: runs in Python on every training call: a compiler that traces it once would bake the
    #: first window in (``sfx.backend`` refuses that for AOTAutograd-based inner backends)
    host_side = True

    def __init__(self, units: int, width: int, align: int, seed: int, name: str):
        super().__init__()
        self.units, self.width, self.align, self.seed, self.name = units, width, align, seed, name
        self.positions = sorted(set(range(0, units - width + 1, align)) | {units - width})
        self.step = 0
        self.fixed: int | None = None

    def extra_repr(self) -> str:
        return f"units={self.units}, width={self.width}, positions={len(self.positions)}, seed={self.seed}"

    # Dynamo must not trace the draw (it would turn the Python generator into graph ops):
    # run it in Python and hand the int to the graph (automatic dynamic after it changes)
    @torch.compiler.disable
    def start_at(self, step: int) -> int:
        """The window start of training step ``step`` (a pure function of seed, name, step)."""
        # blake2b, not hash(): Python's str hash is salted per process, ranks must agree
        digest = hashlib.blake2b(f"{self.seed}/{self.name}/{step}".encode(), digest_size=8).digest()
        # a Python generator, not a torch one: torch.export / Dynamo would trace a torch draw
        # into the graph (fixing it, or failing on the data-dependent start)
        gen = random.Random(int.from_bytes(digest, "little"))
        return self.positions[gen.randrange(len(self.positions))]

    def forward(self) -> int | None:
        if not self.training:
            return None
        start = self.fixed if self.fixed is not None else self.start_at(self.step)
        self.step += 1
        return start


class SliceOutDense(sfx.OpModule):
    """Parameter-free Linear / Conv taking output and/or input windows.

    ``forward(x, weight, bias, out_start, in_start)``: in training with a window, the op
    runs on the weight's rows ``offset + out_start * out_unit .. + out_width * out_unit``
    (each offset: q, k, v sections) and columns of the input window, with the input units
    rescaled by ``in_scale``; otherwise (eval, or no window) it runs the original op.
    """

    def __init__(
        self, kind: str, *, out_offsets: tuple[int, ...] = (0,), out_unit: int = 1,
        out_width: int = 0, in_unit: int = 1, in_width: int = 0, in_scale: float = 1.0,
        conv_args: tuple | None = None,
    ):
        super().__init__()
        self.kind = kind
        self.out_offsets, self.out_unit, self.out_width = tuple(out_offsets), out_unit, out_width
        self.in_unit, self.in_width, self.in_scale = in_unit, in_width, in_scale
        self.conv_args = conv_args  # (ndim, stride, padding, dilation, groups), padding as given

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, out_width={self.out_width * self.out_unit}, "
                f"in_width={self.in_width * self.in_unit}, in_scale={self.in_scale:.4g}")

    def _dense(self, x, weight, bias):
        if self.kind == "linear":
            return F.linear(x, weight, bias)
        ndim, stride, padding, dilation, groups = self.conv_args
        fn = CONV_FUNCTIONS[ndim]
        return fn(x, weight, bias, stride, padding, dilation, groups)

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                out_start: int | None = None, in_start: int | None = None) -> torch.Tensor:
        if not self.training or (out_start is None and in_start is None):
            return self._dense(x, weight, bias)
        rows: list[int] = []
        if out_start is not None:
            for offset in self.out_offsets:
                rows += [offset + out_start * self.out_unit, self.out_width * self.out_unit]
        cols = [in_start * self.in_unit, self.in_width * self.in_unit] if in_start is not None else []
        scale = self.in_scale if in_start is not None else 1.0
        # autocast does not reach inside a custom op: cast the operands as the dense op would
        with sfx.autocast_region(x.device.type) as cast:
            x, weight, bias = cast(x), cast(weight), cast(bias)
            if self.kind == "linear":
                return sliceout_linear(x, weight, bias, rows, cols, scale)
            _, stride, padding, dilation, _ = self.conv_args
            return sliceout_conv(
                x, weight, bias, rows, cols, scale, list(stride), list(padding), list(dilation))


class SliceOutBatchNorm(sfx.OpModule):
    """Parameter-free BatchNorm over a channel window (``nn.BatchNorm*d.forward`` otherwise).

    In training with a window, the affine parameters and running statistics are narrowed
    views of the module's tensors, so only the kept channels' running stats update (in
    place); ``num_batches_tracked`` advances as in the module.
    """

    def __init__(self, width: int, momentum: float | None, eps: float, track_running_stats: bool,
                 unit: int = 1):
        super().__init__()
        self.width, self.momentum, self.eps, self.unit = width, momentum, eps, unit
        self.track_running_stats = track_running_stats

    def extra_repr(self) -> str:
        return f"width={self.width * self.unit}, momentum={self.momentum}, eps={self.eps}"

    def forward(self, x, weight, bias, running_mean, running_var, num_batches_tracked,
                start: int | None = None) -> torch.Tensor:
        # mirrors torch.nn.modules.batchnorm._BatchNorm.forward, so eval is the module's op
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and num_batches_tracked is not None:
            num_batches_tracked.add_(1)
            factor = 1.0 / float(num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (running_mean is None and running_var is None)
        if not self.training or self.track_running_stats:
            mean, var = running_mean, running_var
        else:
            mean = var = None
        if self.training and start is not None:
            def cut(t):
                return t.narrow(0, start * self.unit, self.width * self.unit) if t is not None else None
            weight, bias, mean, var = cut(weight), cut(bias), cut(mean), cut(var)
        return F.batch_norm(x, mean, var, weight, bias, use_batch_stats, factor, self.eps)


# ---------------------------------------------------------------- the pass


def _conv_padding(node: fx.Node, weight: torch.Tensor) -> tuple[int, ...] | str | None:
    n = weight.dim() - 2
    padding = node.args[4] if len(node.args) > 4 else node.kwargs.get("padding", 0)
    dilation = node.args[5] if len(node.args) > 5 else node.kwargs.get("dilation", 1)
    dilation = tuple(dilation) if isinstance(dilation, (list, tuple)) else (dilation,) * n
    if padding == "valid":
        return (0,) * n
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(weight.shape[2:], dilation)]
        return None if any(t % 2 for t in total) else tuple(t // 2 for t in total)
    return tuple(padding) if isinstance(padding, (list, tuple)) else (padding,) * n


def _conv_args(node: fx.Node, weight: torch.Tensor) -> tuple:
    n = weight.dim() - 2

    def arg(i, name, default):
        value = node.args[i] if len(node.args) > i else node.kwargs.get(name, default)
        return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n if not isinstance(value, str) else value

    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    return (n, arg(3, "stride", 1), arg(4, "padding", 0), arg(5, "dilation", 1), int(groups))


def _group_skip_reason(gm, group, config: SliceOut, ctx, width: int, align: int) -> str | None:
    if group.kind == "heads" and not config.heads:
        return "attention heads not sliced (heads=False)"
    members = [p.node for p in group.producers] + [c.node for c in group.consumers]
    for node in members:
        name = sfx.module_name_of(node)
        reason = ctx.selection_reason(config, None, name, gm)
        if reason is not None:
            return f"{ctx.qualified(name)}: {reason}"
        if config.skip_first_last and ctx.qualified(name) in ctx.first_last:
            return f"{ctx.qualified(name)} is the first/last dense layer (skip_first_last=True)"
    for producer in group.producers:
        node = producer.node
        if node.target is not F.linear:
            weight = gm.get_parameter(producer.weight)
            if _conv_padding(node, weight) is None:
                return "padding='same' with an even kernel needs asymmetric padding (not supported)"
    for consumer in group.consumers:
        if consumer.node.target is not F.linear:
            if _conv_padding(consumer.node, gm.get_parameter(consumer.weight)) is None:
                return "consumer padding='same' with an even kernel (not supported)"
    if group.units < align:
        return f"{group.units} units, fewer than align={align}"
    if width >= group.units:
        what = ""
        if len({p.unit_size for p in group.producers}) > 1:
            what = (f" (grouped-query attention: the units are the {group.units} key/value head group(s), "
                    "each with its query heads)")
        return f"window covers all {group.units} units at p={config.p}, align={align}{what}"
    return None


@sfx.register_pass(SliceOut, name="sliceout")
def _sliceout_pass(gm: fx.GraphModule, config: SliceOut, ctx: sfx.PassContext) -> PassResult:
    result = PassResult(gm, modified=False)
    # dense ops this pass cannot see (replaced by an earlier pass, inside a module kept as one
    # call, activation x activation matmuls) are named too, as every pass does
    for node, why in sfx.find_dense_ops(gm)[1]:
        result.skips.append(ctx.skip(node, why))
    analysis = sfx.find_slice_groups(gm)
    for forbidden in analysis.forbidden:
        result.skips.append(sfx.Skip(ctx.pass_name, forbidden.producer.name,
                                     ctx.qualified(forbidden.module), "slice_group", forbidden.reason))
    graph = gm.graph
    # node -> window specs, collected first: a middle layer consumes one group and produces another
    out_side: dict[fx.Node, tuple] = {}
    in_side: dict[fx.Node, tuple] = {}
    norms: dict[fx.Node, tuple] = {}
    order = {node: i for i, node in enumerate(graph.nodes)}
    names: set[str] = set()
    for group in analysis.groups:
        align = 1 if group.kind == "heads" else config.align
        width = window_width(group.units, config.p, align)
        producer_modules = [ctx.qualified(sfx.module_name_of(p.node) or p.weight.rpartition(".")[0])
                            for p in group.producers]
        # the group's name seeds its windows: it must be unique (a root-level or shared parent
        # module is not), else the first producer's module names it
        name = ctx.qualified(group.module)
        if not name or name in names:
            name = producer_modules[0]
        names.add(name)
        reason = _group_skip_reason(gm, group, config, ctx, width, align)
        if reason is not None:
            # one skip per producer, so the report names every layer left dense
            together = f" (sliced together as {name})" if len(group.producers) > 1 else ""
            for producer, module in zip(group.producers, producer_modules):
                result.skips.append(sfx.Skip(ctx.pass_name, producer.node.name, module,
                                             f"slice_group[{group.kind}]", reason + together))
            continue
        window = SliceWindow(group.units, width, align, config.seed, name)
        target = sfx.install_module(gm, f"sliceout_window_{name}", window)
        # before the earliest producer: separate q/k/v projections may come in any order
        first = min((p.node for p in group.producers), key=order.__getitem__)
        with graph.inserting_before(first):
            start = graph.call_module(target, ())
        start.meta[sfx.meta.MODULE] = group.module
        sliced = []
        for producer in group.producers:
            out_side[producer.node] = (start, producer.offsets, producer.unit_size, width)
            what = "q/k/v rows" if len(producer.offsets) == 3 else "rows"
            sliced.append(f"{what} of {ctx.qualified(producer.weight)}")
            if producer.bias is not None:
                sliced.append(ctx.qualified(producer.bias))
        for bn in group.norms:
            norms[bn] = (start, width, gm.get_submodule(str(bn.target)).num_features // group.units)
            sliced.append(f"{ctx.qualified(str(bn.target))} (weight, bias, running stats)")
        for consumer in group.consumers:
            in_side[consumer.node] = (start, consumer.unit_size, width, group.units / width)
            sliced.append(f"columns of {ctx.qualified(consumer.weight)}")
        for node, path in group.resizes:
            _infer_size(node, path)
        result.rewrites.append(Rewrite(
            ctx.pass_name, group.producers[0].node.name, name, f"slice_group[{group.kind}]", target,
            details={"units": group.units, "width": width, "unit_size": group.unit_size,
                     "p_eff": 1 - width / group.units, "scale": group.units / width,
                     "positions": len(window.positions), "sliced": sliced},
        ))
        result.modified = True

    for node in list(graph.nodes):
        if node in out_side or node in in_side:
            _rewrite_dense(gm, node, out_side.get(node), in_side.get(node))
        elif node in norms:
            _rewrite_batchnorm(gm, node, *norms[node])
    return result


def _infer_size(node: fx.Node, path: tuple[int, ...]) -> None:
    """Set the size argument at ``node.args[path...]`` to -1, so the size follows the window.

    ``view(B, N, H, d)`` -> ``view(B, N, -1, d)``, ``unflatten(-1, (H, d))`` ->
    ``unflatten(-1, (-1, d))``, ``expand(B, KV, r, N, d)`` -> ``expand(B, -1, r, N, d)``.
    """

    def replaced(value, rest):
        if not rest:
            return -1
        items = list(value)
        items[rest[0]] = replaced(items[rest[0]], rest[1:])
        return type(value)(items) if isinstance(value, (list, tuple)) else items

    node.args = replaced(node.args, path)


def _rewrite_dense(gm: fx.GraphModule, node: fx.Node, out: tuple | None, inp: tuple | None) -> None:
    x = node.args[0]
    w = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    weight = gm.get_parameter(str(w.target))
    spec: dict = {}
    if out is not None:
        out_start, offsets, unit, width = out
        spec.update(out_offsets=offsets, out_unit=unit, out_width=width)
    if inp is not None:
        in_start, unit, width, scale = inp
        spec.update(in_unit=unit, in_width=width, in_scale=scale)
    if node.target is F.linear:
        module = SliceOutDense("linear", **spec)
    else:
        n, stride, padding, dilation, groups = _conv_args(node, weight)
        if isinstance(padding, str):
            padding = _conv_padding(node, weight)
        module = SliceOutDense("conv", conv_args=(n, stride, padding, dilation, groups), **spec)
    target = sfx.install_module(gm, f"sliceout_{sfx.module_name_of(node) or node.name}", module)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(target, (x, w, b, out[0] if out else None, inp[0] if inp else None))
    sfx.replace_node(node, new)


def _rewrite_batchnorm(gm: fx.GraphModule, node: fx.Node, start: fx.Node, width: int, unit: int) -> None:
    bn = gm.get_submodule(str(node.target))
    name = str(node.target)
    g = gm.graph
    with g.inserting_before(node):
        tensors = [g.get_attr(f"{name}.{attr}") if getattr(bn, attr) is not None else None
                   for attr in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
        module = SliceOutBatchNorm(width, bn.momentum, bn.eps, bn.track_running_stats, unit)
        target = sfx.install_module(gm, f"sliceout_{name}", module)
        new = g.call_module(target, (node.args[0], *tensors, start))
    sfx.replace_node(node, new)

