"""DropIT (arXiv 2202.13808): Linear / Conv / matmul-against-a-parameter keep only the
largest-magnitude ``keep`` fraction of the input they save for backward.

Forward is exact. Two selection rules, both free of a full top-k over the whole tensor:

- ``selection="threshold"`` (default): the cut-off is the ``1 - keep`` quantile of ``|x|`` on a
  fixed sample of 16384 elements (one per stride window at a hashed offset; no RNG, so seeded
  runs stay reproducible); the kept
  elements are stored as their values (a buffer of ``ceil(1.06 * keep * numel)``, zero padded)
  plus a 1-bit-per-element bitmap. If the sample under-estimates the cut-off and more than the
  buffer's worth pass it, the cut-off is raised to the exact one among the candidates (a
  k-th value over ~``keep * numel`` elements). ``keep * 1.06 * itemsize + 1/8`` bytes per
  element: 0.55 B at keep=0.1 fp32.
- ``selection="topk"``: the input is split into chunks of ``chunk_size`` elements and each
  chunk keeps exactly its ``ceil(keep * chunk_size)`` largest values with int16 in-chunk
  indices: ``keep * (itemsize + 2)`` bytes per element; more compact below keep=1/16 but
  a partial sort per chunk (2-3x slower than the threshold on CPU).

Backward scatters the kept values into a zero tensor to compute ``grad_weight``;
``grad_input`` and ``grad_bias`` never read ``x`` and are exact. In eval mode (or under
``no_grad``) the layer runs the plain dense op.

The ops are ``torch.library.custom_op`` with registered autograd and fake kernels (every
saved shape is static), so they work in eager, FX, ``torch.export`` and ``torch.compile``.

One module of ~580 lines, in reading order: the config, the two selection rules, the two
custom ops, their op modules, the pass. ``activation_memory`` and ``memory_budget`` reuse the
selection and the Linear / Conv gradient helpers from here by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from sparsify_fx.passes.kernels import cpu as cpu_kernels
from sparsify_fx.passes.kernels import sync
from sparsify_fx.passes.kernels.bitpack import pack_bits, unpack_bits
from sparsify_fx.passes.kernels.cache import cached
from sparsify_fx.passes.kernels.op_autograd import in_backward, owned, register_autograd

import sparsify_fx as sfx
from sparsify_fx import ConfigError, PassConfig, PassResult, Rewrite, autocast_region, check_range
from sparsify_fx.graph.op_table import CONV_FUNCTIONS

__all__ = [
    "DropIT", "compress", "decompress", "compress_topk", "decompress_topk", "compress_threshold",
    "decompress_threshold", "compressed_bytes", "DropITLinear", "DropITConv", "saved_input_reason",
    "dense_call", "linear_grads", "conv_forward", "conv_grads", "ConvOpModule",
]

_MAX_CHUNK = 32768  # in-chunk indices 0..32767 fit in int16
_SAMPLE = 16384  # elements the threshold's quantile is estimated on
_SLACK = 1.06  # value-buffer head-room over keep * numel (the sample quantile's error)
SELECTIONS = ("threshold", "topk")


@dataclass(frozen=True)
class DropIT(PassConfig):
    """Keep only the top-``keep`` fraction (by ``|x|``) of each dense layer's saved input.

    Args:
        keep: fraction of the saved input kept (``1 - gamma`` in the paper), in (0, 1].
        chunk_size: elements per selection chunk for ``selection="topk"`` (indices are int16
            within a chunk), 64..32768.
        selection: "threshold" (a sampled cut-off plus a bitmap; fast) or "topk" (exact
            per-chunk top-k with int16 indices; more compact at keep < 1/16).
        skip_first_last: leave the model's first and last dense layers dense (the paper's
            default: the first layer's input is the data, held by the caller anyway).

    Example:
        >>> import torch, sparsify_fx as sfx
        >>> m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8),
        ...                         torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> fast = sfx.sparsify(m, sfx.DropIT(keep=0.25), example_inputs=(torch.randn(4, 8),))
        >>> [r.module for r in sfx.explain(fast).rewrites]
        ['2']
    """

    keep: float = 0.1
    chunk_size: int = 16384
    skip_first_last: bool = True
    selection: str = "threshold"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "keep", self.keep, 0.0, 1.0, low_open=True)
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int):
            raise ConfigError(f"DropIT.chunk_size must be an int, got {self.chunk_size!r}")
        check_range(self, "chunk_size", self.chunk_size, 64, _MAX_CHUNK)
        if not isinstance(self.skip_first_last, bool):
            raise ConfigError(f"DropIT.skip_first_last must be a bool, got {self.skip_first_last!r}")
        if self.selection not in SELECTIONS:
            raise ConfigError(
                f"DropIT.selection must be one of {SELECTIONS}, got {self.selection!r}"
            )


# ---------------------------------------------------------------- compression


def _chunking(numel: int, keep: float, chunk: int) -> tuple[int, int, int]:
    chunk = max(1, min(chunk, numel))
    n_chunks = math.ceil(numel / chunk)
    k = min(chunk, max(1, math.ceil(keep * chunk)))
    return chunk, n_chunks, k


def compress_topk(x: torch.Tensor, keep: float, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-chunk top-k of ``|x|``: values ``(n_chunks, k)`` and int16 in-chunk indices."""
    flat = x.detach().reshape(-1)
    chunk, n_chunks, k = _chunking(flat.numel(), keep, chunk)
    pad = n_chunks * chunk - flat.numel()
    if pad:
        flat = F.pad(flat, (0, pad))
    rows = flat.view(n_chunks, chunk)
    if k == chunk:
        idx = torch.arange(chunk, device=x.device).expand(n_chunks, chunk)
        return rows.clone(), idx.to(torch.int16)
    _, idx = torch.topk(rows.abs(), k, dim=1, sorted=False)
    return torch.gather(rows, 1, idx), idx.to(torch.int16)


def decompress_topk(
    values: torch.Tensor, indices: torch.Tensor, shape: list[int] | torch.Size, chunk: int
) -> torch.Tensor:
    """Scatter kept values back into a zero tensor of ``shape`` (``chunk`` as compressed)."""
    numel = math.prod(shape)
    chunk = _chunking(numel, 1.0, chunk)[0]
    rows = values.new_zeros(values.shape[0], chunk)
    rows.scatter_(1, indices.long(), values)
    return rows.view(-1)[:numel].view(shape)


def _capacity(numel: int, keep: float) -> int:
    return min(numel, max(1, math.ceil(_SLACK * keep * numel)))


def _sample_index(n: int, device: torch.device, like: torch.Tensor | None = None) -> torch.Tensor:
    """One element per window of ``n // 16384``, at a hashed offset inside the window; all of
    them when the tensor has fewer than 32768.

    A plain strided sample aliases with NCHW layouts (stride a multiple of a channel's plane:
    it reads the same pixel of every channel), which mis-estimated the cut-off on half of
    ResNet-50's convs and sent them to the slower exact re-selection. The offset hash mixes
    the window index's bits (a multiply-shift), so it has no short period: ``i * odd % 2`` had
    period 2 and read only the diagonal of each 2x2 plane in ResNet-50's last stage, passing
    1.2-1.28x the kept fraction. With 16384 samples the estimate's standard error is 2.3 % of
    ``keep * n`` at keep = 0.1, inside the 6 % capacity slack: no layer of ResNet-50,
    ViT-B/16 or ConvNeXt-T ran the exact re-selection (8192 samples and a 4 % slack sent 6,
    21 and 16 layers there). ``kthvalue`` grows faster than linearly on CPU: 0.03 ms for
    16384 samples, 0.28 ms for 32768. Deterministic, so seeded runs stay reproducible. With
    ``like`` (the tensor it will index) eager calls reuse one index per ``(n, device)``.
    """
    stride = max(1, n // _SAMPLE)

    def build() -> torch.Tensor:
        if stride == 1:
            return torch.arange(n, device=device)
        i = torch.arange(n // stride, device=device)
        return i * stride + ((i * 2654435761) >> 13) % stride

    return build() if like is None else cached(("dropit-sample", n, device), like, build)


def compress_threshold(x: torch.Tensor, keep: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Values above a sampled ``|x|`` cut-off, zero padded to a static capacity, and a bitmap.

    Returns ``(values, bitmap)``: ``values`` has ``ceil(1.06 * keep * numel)`` elements (the
    kept ones in flat order, then zeros), ``bitmap`` is ``uint8`` with bit ``i % 8`` of byte
    ``i // 8`` set where element ``i`` is kept.

    More passing the cut-off than the capacity holds (the sample under-estimated it) is
    handled two ways. On CPU the cut-off is raised to the exact one among the candidates, so
    the largest ``capacity`` are kept. Where :func:`sparsify_fx.passes.kernels.sync.sync_free` (accelerators: the count is
    never read back) the first ``capacity`` in flat order are kept. Whenever everything that
    passes fits, both give the same result.
    """
    flat = x.detach().reshape(-1)
    n = flat.numel()
    cap = _capacity(n, keep)
    kernels = cpu_kernels.for_tensors(flat)
    if kernels is not None:
        fused = _compress_fused(kernels, flat, keep, cap)
        if fused is not None:
            return fused
    # NaN ranks above every number (as in torch.topk) and inf above every finite value, so
    # non-finite inputs are kept and reach grad_weight instead of being dropped as zeros
    magnitude = flat.abs().nan_to_num_(nan=float("inf"))
    # a cut-off is at most the largest finite value: inf always passes "> cutoff"
    largest = torch.finfo(magnitude.dtype).max
    cutoff = _cutoff(magnitude[_sample_index(n, magnitude.device, magnitude)], keep)
    mask = torch.ones_like(flat, dtype=torch.bool) if cutoff is None else magnitude > cutoff
    if sync.sync_free(flat.device):
        return _gather_static(flat, mask, cap)
    count = int(torch.count_nonzero(mask))
    if count > cap:
        candidates = magnitude[mask]
        mask = magnitude > torch.kthvalue(candidates, count - cap).values.clamp(max=largest)
        count = int(torch.count_nonzero(mask))
        if count > cap:  # ties at the exact cut-off: keep the first ``cap`` in flat order
            mask &= torch.cumsum(mask, 0) <= cap
            count = cap
    values = flat.new_zeros(cap)
    values[:count] = flat[mask]
    return values, pack_bits(mask)


def _cutoff(sample: torch.Tensor, keep: float) -> torch.Tensor | None:
    """``|x|``'s cut-off from its sample (already ``abs`` and NaN-as-inf), None to keep all."""
    m = sample.numel()
    dropped = m - min(m, math.ceil(keep * m))
    if dropped == 0:
        return None
    # strictly above the largest dropped sample value: ties (ReLU's zeros) are dropped; a
    # cut-off is at most the largest finite value, so inf always passes
    return torch.kthvalue(sample, dropped).values.clamp(max=torch.finfo(sample.dtype).max)


def _compress_fused(kernels, flat: torch.Tensor, keep: float, cap: int):
    """:func:`compress_threshold` in two fused passes (:mod:`sparsify_fx.passes.kernels.cpu`); None when
    more than the capacity pass the sampled cut-off (the exact refinement then runs)."""
    n = flat.numel()
    index = _sample_index(n, flat.device, flat)
    m = index.numel()
    dropped = m - min(m, math.ceil(keep * m))  # as in _cutoff
    if dropped == 0:
        return None
    bits, counts = kernels.threshold_bits(flat, kernels.sample_cutoff(flat, index, dropped))
    if int(counts.sum()) > cap:
        return None
    return kernels.compact(flat, bits, counts, cap), bits


def _gather_static(flat: torch.Tensor, mask: torch.Tensor, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`compress_threshold`'s tail at static shapes: no count is read back to the host.

    ``nonzero_static`` lists the first ``cap`` kept positions (``n`` pads the rest); the
    bitmap is rebuilt from that list, so a truncated tail is dropped from both alike.
    """
    n = flat.numel()
    index = torch.nonzero_static(mask, size=cap, fill_value=n).squeeze(1)
    padding = index == n
    values = flat[index.clamp(max=n - 1)].masked_fill_(padding, 0)
    kept = mask.new_zeros(n + 1).index_fill_(0, index, True)[:n]
    return values, pack_bits(kept)


def decompress_threshold(
    values: torch.Tensor, bitmap: torch.Tensor, shape: list[int] | torch.Size
) -> torch.Tensor:
    """Inverse of :func:`compress_threshold`: the kept values in place, zeros elsewhere."""
    n = math.prod(shape)
    kernels = cpu_kernels.for_tensors(values, bits=bitmap)
    if kernels is not None:
        return kernels.expand(values, bitmap, n).view(shape)
    mask = unpack_bits(bitmap, [n])
    out = values.new_zeros(mask.shape)
    out.masked_scatter_(mask, values)
    return out.view(shape)


def compress(
    x: torch.Tensor, keep: float, chunk: int, selection: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, index)`` of the kept part of ``x`` under ``selection``."""
    if selection == "threshold":
        return compress_threshold(x, keep)
    return compress_topk(x, keep, chunk)


def decompress(
    values: torch.Tensor, index: torch.Tensor, shape: list[int], chunk: int, selection: str
) -> torch.Tensor:
    """Inverse of :func:`compress`: a dense tensor of ``shape`` with zeros where dropped."""
    if selection == "threshold":
        return decompress_threshold(values, index, shape)
    return decompress_topk(values, index, shape, chunk)


def _fake_payload(x: torch.Tensor, keep: float, chunk: int, selection: str):
    if selection == "threshold":
        n = x.numel()
        return x.new_empty(_capacity(n, keep)), x.new_empty(math.ceil(n / 8), dtype=torch.uint8)
    _, n_chunks, k = _chunking(x.numel(), keep, chunk)
    return x.new_empty(n_chunks, k), x.new_empty(n_chunks, k, dtype=torch.int16)


def compressed_bytes(
    numel: int, itemsize: int, keep: float, chunk: int, selection: str = "threshold"
) -> int:
    """Bytes the backward keeps for a saved input of ``numel`` elements (index included)."""
    if selection == "threshold":
        return _capacity(numel, keep) * itemsize + math.ceil(numel / 8)
    chunk, n_chunks, k = _chunking(numel, keep, chunk)
    return n_chunks * k * (itemsize + 2)


# ---------------------------------------------------------------- custom ops


@torch.library.custom_op("sparsify_fx::dropit_linear", mutates_args=())
def _dropit_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    keep: float,
    chunk: int,
    selection: str,
    transposed: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    weight, bias = _to_compute(weight, x), _to_compute(bias, x)
    out = owned(F.linear(x, weight.t() if transposed else weight, bias))
    values, index = compress(x, keep, chunk, selection)
    return out, values, index


@_dropit_linear.register_fake
def _(x, weight, bias, keep, chunk, selection, transposed):
    out_features = weight.shape[1] if transposed else weight.shape[0]
    out = x.new_empty(*x.shape[:-1], out_features)
    return (out, *_fake_payload(x, keep, chunk, selection))


def _to_compute(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """``t`` in ``like``'s dtype: under autocast the op modules pass the fp32 weight and the
    op casts it, in forward and again in backward, so the backward keeps the parameter (held
    anyway) and not a low-precision copy of it."""
    if t is None or t.dtype == like.dtype or not like.is_floating_point():
        return t
    return t.to(like.dtype)


def _linear_setup(ctx, inputs, output) -> None:
    x, weight, bias, keep, chunk, selection, transposed = inputs
    _, values, indices = output
    ctx.save_for_backward(values, indices, weight)
    ctx.x_shape = list(x.shape)
    ctx.chunk = _chunking(x.numel(), keep, chunk)[0]
    ctx.selection = selection
    ctx.transposed = transposed
    ctx.has_bias = bias is not None


def _restore_input(ctx, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return decompress(values, indices, ctx.x_shape, ctx.chunk, ctx.selection)


def linear_grads(ctx, grad_out: torch.Tensor, weight: torch.Tensor, restore_x: Callable[[], torch.Tensor] | None,
                 need_weight: bool = True):
    """``(grad_x, grad_weight, grad_bias)`` of a Linear (``ctx.transposed``: ``x @ W[in, out]``)
    whose saved input ``restore_x()`` rebuilds, called only when the weight needs a gradient:
    shared by every op that keeps a Linear's input in another form (DropIT, bf16).
    ``need_weight=False``: no weight gradient (the caller computes it another way)."""
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    need_w = need_w and need_weight
    low = _to_compute(weight, grad_out)
    w = low.t() if ctx.transposed else low  # [out, in]
    grad_x = grad_out @ w if need_x else None
    grad_w = grad_b = None
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    if need_w:
        x = restore_x()
        x2 = x.reshape(-1, x.shape[-1])
        grad_w = (x2.t() @ g2 if ctx.transposed else g2.t() @ x2).to(weight.dtype)
    if need_b and ctx.has_bias:
        grad_b = g2.sum(0)
    return grad_x, grad_w, grad_b


def conv_forward(x, weight, bias, stride, padding, dilation, groups: int) -> torch.Tensor:
    """The convolution a Conv op keeps its input for, as a custom op may return it."""
    zeros = [0] * len(stride)
    weight, bias = _to_compute(weight, x), _to_compute(bias, x)
    return owned(torch.ops.aten.convolution(x, weight, bias, stride, padding, dilation, False, zeros, groups))


def conv_grads(ctx, grad_out: torch.Tensor, weight: torch.Tensor, x: torch.Tensor, need_weight: bool = True):
    """``(grad_x, grad_weight, grad_bias)`` of a Conv whose input is ``x`` (read only for the
    weight gradient; without it a tensor of its shape does); ``ctx.conv`` holds
    ``(stride, padding, dilation, groups)`` and ``ctx.bias_sizes`` the bias shape or None.
    ``need_weight=False``: no weight gradient (the caller computes it another way)."""
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    stride, padding, dilation, groups = ctx.conv
    if not (need_x or (need_w and need_weight) or (need_b and ctx.bias_sizes is not None)):
        return None, None, None
    grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
        grad_out.contiguous(), x, _to_compute(weight, grad_out), ctx.bias_sizes, stride, padding, dilation,
        False, [0] * len(stride), groups,
        [bool(need_x), bool(need_w and need_weight), bool(need_b and ctx.bias_sizes is not None)],
    )
    return grad_x, grad_w.to(weight.dtype) if grad_w is not None else None, grad_b


def _linear_backward(ctx, grad_out, _grad_values, _grad_indices):
    values, indices, weight = ctx.saved_tensors
    values, indices = in_backward(grad_out, values, indices)
    grads = linear_grads(ctx, grad_out, weight, lambda: _restore_input(ctx, values, indices))
    return (*grads, None, None, None, None)


dropit_linear = register_autograd(_dropit_linear, _linear_backward, _linear_setup)


@torch.library.custom_op("sparsify_fx::dropit_conv", mutates_args=())
def _dropit_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    keep: float,
    chunk: int,
    selection: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out = conv_forward(x, weight, bias, stride, padding, dilation, groups)
    values, index = compress(x, keep, chunk, selection)
    return out, values, index


@_dropit_conv.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, keep, chunk, selection):
    # the convolution's own meta: a channels-last input gives a channels-last output
    out = conv_forward(x, weight, bias, stride, padding, dilation, groups)
    return (out, *_fake_payload(x, keep, chunk, selection))


def _conv_setup(ctx, inputs, output) -> None:
    x, weight, bias, stride, padding, dilation, groups, keep, chunk, selection = inputs
    _, values, indices = output
    ctx.save_for_backward(values, indices, weight)
    ctx.x_shape = list(x.shape)
    ctx.chunk = _chunking(x.numel(), keep, chunk)[0]
    ctx.selection = selection
    ctx.conv = (list(stride), list(padding), list(dilation), groups)
    ctx.bias_sizes = [weight.shape[0]] if bias is not None else None


def _conv_backward(ctx, grad_out, _grad_values, _grad_indices):
    values, indices, weight = ctx.saved_tensors
    values, indices = in_backward(grad_out, values, indices)
    x = _restore_input(ctx, values, indices) if ctx.needs_input_grad[1] else values.new_zeros(ctx.x_shape)
    return (*conv_grads(ctx, grad_out, weight, x), None, None, None, None, None, None, None)


dropit_conv = register_autograd(_dropit_conv, _conv_backward, _conv_setup)


# ---------------------------------------------------------------- op modules


class DropITLinear(sfx.OpModule):
    """Parameter-free op module: ``forward(x, weight, bias)`` like the op it replaced.

    ``kind`` is the replaced spelling ("linear", "matmul" or "addmm"): eval mode runs exactly
    that op, so eval outputs are bit-identical to the original graph's.
    """

    #: the backward keeps only a compressed copy (read by sfx memory_plan)
    keeps_dense_inputs = False
    recasts_weight = True

    def __init__(self, keep: float, chunk: int, kind: str = "linear", selection: str = "threshold"):
        super().__init__()
        self.keep, self.chunk, self.kind, self.selection = keep, chunk, kind, selection

    def extra_repr(self) -> str:
        return f"keep={self.keep}, selection={self.selection}, chunk={self.chunk}, kind={self.kind}"

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
        if self.training and torch.is_grad_enabled() and weight.requires_grad:
            with autocast_region(x.device.type) as cast:
                return dropit_linear(
                    cast(x), weight, cast(bias), self.keep, self.chunk, self.selection,
                    self.kind != "linear",
                )[0]
        return dense_call(self.kind, x, weight, bias)


class ConvOpModule(sfx.OpModule):
    """Base of the parameter-free Conv1d/2d/3d op modules: the convolution's arguments, and
    the dense convolution eval mode runs (``dense``)."""

    #: the backward keeps only a compressed copy (read by sfx memory_plan)
    keeps_dense_inputs = False

    def __init__(self, stride, padding, dilation, groups: int):
        super().__init__()
        self.stride, self.padding = list(stride), list(padding)
        self.dilation, self.groups = list(dilation), int(groups)
        self._functional = CONV_FUNCTIONS[len(self.stride)]

    def dense(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self._functional(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class DropITConv(ConvOpModule):
    """Parameter-free op module: ``forward(x, weight, bias)`` for Conv1d/2d/3d."""

    recasts_weight = True

    def __init__(
        self, keep: float, chunk: int, stride, padding, dilation, groups: int,
        selection: str = "threshold",
    ):
        super().__init__(stride, padding, dilation, groups)
        self.keep, self.chunk, self.selection = keep, chunk, selection

    def extra_repr(self) -> str:
        return f"keep={self.keep}, selection={self.selection}, stride={self.stride}, padding={self.padding}, groups={self.groups}"

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
        if self.training and torch.is_grad_enabled() and weight.requires_grad:
            with autocast_region(x.device.type) as cast:
                return dropit_conv(
                    cast(x), weight, cast(bias), self.stride, self.padding, self.dilation,
                    self.groups, self.keep, self.chunk, self.selection,
                )[0]
        return self.dense(x, weight, bias)


# ---------------------------------------------------------------- the pass


def dense_call(kind: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The dense op a Linear-like op module replaced, in its original spelling (``kind``:
    "linear", "addmm" or "matmul"), so that eval outputs are bit-identical."""
    if kind == "linear":
        return F.linear(x, weight, bias)
    if kind == "addmm":
        return torch.addmm(bias, x, weight)
    return torch.matmul(x, weight)


def saved_input_reason(op: sfx.DenseOp, weight: torch.Tensor) -> tuple[str | None, list[int] | None]:
    """``(why op's saved input cannot be replaced, None)`` or ``(None, its integer padding)``:
    shared by every pass that swaps what a dense op saves (DropIT, bf16 inputs)."""
    if not weight.requires_grad:
        return "weight does not require grad: no input is saved for it", None
    if op.kind != "conv":
        return None, None
    padding = op.conv_padding_ints(weight.shape)
    if padding is None:
        return "padding='same' with an even kernel needs asymmetric padding (not supported)", None
    return None, padding


@sfx.register_pass(DropIT, name="dropit")
def _dropit_pass(gm, config: DropIT, ctx) -> PassResult:
    ops, unmatched = sfx.find_dense_ops(gm)
    result = PassResult(gm, modified=False)
    for node, why in unmatched:
        result.skips.append(ctx.skip(node, why))
    for op in ops:
        qualified = ctx.qualified(op.module_name)
        weight = gm.get_parameter(op.weight_name)
        reason = ctx.selection_reason(config, op, op.module_name, gm)
        if reason is None and config.skip_first_last and qualified in ctx.first_last:
            reason = "first/last dense layer kept dense (skip_first_last=True)"
        padding = None
        if reason is None:
            reason, padding = saved_input_reason(op, weight)
        if reason is not None:
            result.skips.append(ctx.skip(op, reason))
            continue
        if op.kind == "conv":
            module = DropITConv(
                config.keep, config.chunk_size, op.stride, padding, op.dilation, op.groups,
                config.selection,
            )
            op_name = f"conv{op.conv_ndim}d"
        else:
            kind = "addmm" if op.node.target is torch.addmm else op.kind
            module = DropITLinear(config.keep, config.chunk_size, kind, config.selection)
            op_name = kind
        x = op.input
        before = sfx.tensor_bytes(x)
        after = None
        if before is not None:
            shape, dtype = sfx.tensor_meta(x)
            itemsize = torch.empty((), dtype=dtype).element_size()
            after = compressed_bytes(
                math.prod(shape), itemsize, config.keep, config.chunk_size, config.selection
            )
        flops = sfx.dense_op_flops(op, weight.shape)
        target = sfx.install_module(gm, f"dropit_{op.module_name or op.node.name}", module)
        with gm.graph.inserting_before(op.node):
            new = gm.graph.call_module(target, (x, op.weight, op.bias))
        sfx.replace_node(op.node, new)
        result.rewrites.append(
            Rewrite(
                ctx.pass_name, op.node.name, qualified, op_name, target,
                saved_bytes_before=before, saved_bytes_after=after,
                flops_before=flops, flops_after=flops,
                details={"keep": config.keep, "selection": config.selection},
            )
        )
        result.modified = True
    return result
