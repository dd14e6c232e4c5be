"""What the memory budget's choices cost in time, measured on this device: a calibration of
each compressed form (fixed seconds per op + seconds per byte, cached per device and dtype)
and the forward time of each node for recompute (``passes/memory_budget/planner.py`` combines them
with the bytes of trial rewrites).

Whole training steps, for the measured-prices check and the host's share of a GPU step
(:func:`measure_added_seconds`, :func:`host_share`): random inputs of the recorded shapes,
copies with their own buffers, the RNG state and the gradients kept.

About 510 lines: the calibration, the per-node timing and the whole-step measurement share the
timing seam (``_clock``), the example inputs and the device syncs, so they stay in one module.
"""

from __future__ import annotations

import contextlib
import copy
import math
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from sparsify_fx.passes.memory_budget import calibration_cache

from sparsify_fx import meta, tensor_meta

__all__ = ["calibrate", "calibration_source", "bf16_matmul_ratios", "host_share", "node_seconds", "train_step_seconds", "measure_added_seconds", "example_input",
           "with_own_buffers", "rng_kept", "synchronizer", "OP_SECONDS", "UNKNOWN"]

#: the clock every timed region reads (seconds); the tests replace it with a deterministic one
#: so that what they assert is the arithmetic on the timings, not this host's speed
_clock: Callable[[], float] = time.perf_counter

#: the least fixed cost of a rewritten op (also what makes every compressed form strictly
#: dearer than keeping, so a budget that fits dense keeps everything)
OP_SECONDS = 2e-5

#: the calibration sweeps this many 8 MB tensors per timed call: together larger than a CPU's
#: last-level cache (as a training step's activations are by the time backward reads them),
#: each small enough for glibc's malloc to serve from its heap after the warm-up
_SWEEP = 6
_SWEEP_BYTES = 8 * 2**20


def synchronizer(device: torch.device) -> Callable[[], None]:
    """What to call on both sides of a timed region: CUDA runs kernels asynchronously, so a
    host clock alone would time the launches."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


_RATES: dict[tuple[str, torch.dtype], dict[str, float]] = {}
_SOURCES: dict[tuple[str, torch.dtype], str] = {}


def _time(fn, device: torch.device, repeats: int = 5) -> float:
    sync = synchronizer(device)
    fn()
    best = math.inf
    for _ in range(repeats):
        sync()
        t0 = _clock()
        fn()
        sync()
        best = min(best, _clock() - t0)
    return best


def calibrate(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
              fresh: bool = False) -> dict[str, float]:
    """Seconds added by each compressed form, cached per device and dtype: per input byte
    (``"dropit"``, ``"bf16"``, ...) and per op (``"op:dropit"``, ``"op:bf16"``, ...).

    Cached in this process and on disk (``passes/memory_budget/calibration_cache.py``: reused on the same
    machine, torch, threads and code; :func:`calibration_source` says which), measured
    afresh with ``fresh=True``.

    DropIT costs its conv's forward + backward less the dense conv's (at least its compress +
    decompress: alone, those priced it 1.3-2.8x low against the op on ResNet-50's shapes, and
    the planner chose DropIT where bf16 storage was faster), the generic bf16 storage its
    compress + decompress; a Linear / Conv
    input kept as bf16 costs its Linear's forward + backward less the dense one's, and a
    BatchNorm -> ReLU -> Conv that rebuilds the ReLU output (``"bn_relu_conv"``; from a bf16
    ``x_hat``: ``"bn_relu_conv_bf16"``) the three ops' less the dense three's. The 1-bit ReLU and
    BatchNorm's bf16 ``x_hat`` replace the dense op's own forward and backward (on CPU with
    fused kernels that read the compact form directly), so what they add is their op's
    forward + backward less the dense op's, measured the same way (at least 0): pricing them
    as a compress + decompress made compression look dearer than recomputing on ResNet-50.

    Each form is timed on 8 MB tensors and a tiny one: the tiny one's time is the fixed cost
    per op (dispatch, the small ops around the kernels, on a GPU their launches), the
    difference over the bytes between them the cost per byte. A timed call sweeps six 8 MB
    tensors, so each is read from memory, not cache. One 32 MB tensor would sit at
    glibc's largest mmap threshold: in some processes every output was fresh pages that fault
    on first touch, in others recycled heap, and the rates differed 2-5x between processes
    (bf16 0.14-0.71 ns/B); swept 8 MB tensors agree within 1.3x (DropIT) and 1.5x (bf16).
    On an H100 the fixed cost is what dominates: the eager bf16-storage ResNet-50 step took 4x
    the dense one while its per-byte work was a few percent of it, and a flat per-op guess
    priced the GPU plans 2x low.
    """
    device = torch.device(device)
    key = (device.type, dtype)
    if fresh or key not in _RATES:
        disk_key = calibration_cache.calibration_key(device, dtype)
        cached = None if fresh else calibration_cache.load(disk_key)
        why = ""
        if cached is not None and _REFERENCE in cached[0]:
            # a calibration taken while the host was busy (or idle) prices every compressed
            # form 10-30x off against the recompute prices timed now: check the host first
            then, now = cached[0][_REFERENCE], _reference_seconds(device, dtype)
            ratio = then / now if now > 0 else math.inf
            if not 1 / _HOST_TOLERANCE <= ratio <= _HOST_TOLERANCE:
                why = f" (the cached one was timed on a host {ratio:.2f}x as slow as now)"
                cached = None
        if cached is not None:
            _RATES[key], path = cached
            _SOURCES[key] = f"cached ({path})"
        else:
            t0 = _clock()
            _RATES[key] = _measured_rates(device, dtype)
            path = calibration_cache.store(disk_key, _RATES[key], _clock() - t0)
            _SOURCES[key] = "measured" + (f", cached to {path}" if path is not None else " (cache not writable)") + why
    return _RATES[key]


#: the rates' entry holding the host reference (:func:`_reference_seconds`) timed with them
_REFERENCE = "host:reference"
#: how far the host may have moved since the calibration before it is measured again
_HOST_TOLERANCE = 1.5


def _sweep_tensors(device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    batch = _SWEEP_BYTES // (128 * 64 * 64 * torch.empty((), dtype=dtype).element_size())
    sweep = _SWEEP * (2 if device.type == "cuda" else 1)  # an H100's L2 holds 50 MB
    return [torch.randn(batch, 128, 64, 64, device=device, dtype=dtype) for _ in range(sweep)]


def _reference_seconds(device: torch.device, dtype: torch.dtype, xs: list[torch.Tensor] | None = None) -> float:
    """A bf16 round trip over the calibration's swept tensors: memory-bound like most of the
    compressed forms' work, timed with the calibration and again before a cached one is used.
    A calibration cached while other processes shared the 2 cores had every
    rate 10-30x the idle host's, so budget plans recomputed blocks a compression would have
    freed for a tenth of the time (ResNet-50 at 0.5: 1.19x instead of 1.03x)."""
    xs = xs if xs is not None else _sweep_tensors(device, dtype)

    def round_trip() -> None:
        for x in xs:
            x.to(torch.bfloat16).to(dtype)

    return _time(round_trip, device)


def calibration_source(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> str | None:
    """Where this process's calibration for ``device`` and ``dtype`` came from: ``"measured"``
    (and the file it was cached to) or ``"cached (<file>)"``; ``None`` before any."""
    return _SOURCES.get((torch.device(device).type, dtype))


def _measured_rates(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    big_xs = _sweep_tensors(device, dtype)
    small_x = [torch.randn(2, 8, 8, 8, device=device, dtype=dtype)]
    reference = _reference_seconds(device, dtype, big_xs)
    big, small = _calibration_seconds(big_xs), _calibration_seconds(small_x)
    # (and after: a host that got busier or quieter during the calibration shows in the mean)
    reference = (reference + _reference_seconds(device, dtype, big_xs)) / 2
    span = (big_xs[0].numel() - small_x[0].numel()) * small_x[0].element_size()
    rates = {kind: max(0.0, big[kind] - small[kind]) / span for kind in big}
    return (rates | {f"op:{kind}": max(OP_SECONDS, small[kind]) for kind in small} | {_REFERENCE: reference}
            | bf16_matmul_ratios(device, dtype))


def bf16_matmul_ratios(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """``{"mm_bf16:linear": r, "mm_bf16:conv": r, "mm_bf16:conv1x1": r}``: a weight gradient's
    time on bf16 operands (``grad_out`` cast here, the input already bf16:
    ``passes/kernels/bf16_matmul.py``) over its time on ``dtype`` operands, for a Linear, a 3x3 Conv
    and 1x1 Convs (a channel-reducing and a channel-expanding one) of mid-sized layers. Below
    1 where the device has bf16 matrix units (a 2-core Sapphire Rapids: about 0.3 for a Linear,
    0.45 for a 3x3 Conv, 0.7-0.95 for 1x1 Convs), above where bf16 is emulated."""
    from sparsify_fx.passes.kernels.bf16_matmul import conv_weight_grad, linear_weight_grad

    x = torch.randn(2048, 512, device=device, dtype=dtype)
    g = torch.randn(2048, 512, device=device, dtype=dtype)
    xb = x.to(torch.bfloat16)
    linear = (_time(lambda: linear_weight_grad(g, xb, False, dtype), device, 7)
              / _time(lambda: g.t() @ x, device, 7))

    def conv_ratio(shapes: list[tuple[int, int, int, int]]) -> float:
        bf16 = fp32 = 0.0
        for c_in, c_out, size, kernel in shapes:
            xc = torch.randn(8, c_in, size, size, device=device, dtype=dtype)
            w = torch.randn(c_out, c_in, kernel, kernel, device=device, dtype=dtype)
            gc = torch.randn(8, c_out, size, size, device=device, dtype=dtype)
            xcb = xc.to(torch.bfloat16)
            conv = (1, 1), (kernel // 2,) * 2, (1, 1), 1
            bf16 += _time(lambda: conv_weight_grad(gc, xcb, w, conv), device, 7)
            fp32 += _time(lambda: torch.ops.aten.convolution_backward(
                gc, xc, w, None, *conv[:3], False, [0, 0], 1, [False, True, False]), device, 7)
        return bf16 / fp32

    # a 1x1 Conv's weight gradient is a plain matrix product with less to gain on this path
    # than a 3x3 one (0.55-0.97 against 0.45 on ResNet-50's layers, 2-core Sapphire Rapids)
    return {"mm_bf16:linear": linear, "mm_bf16:conv": conv_ratio([(64, 64, 28, 3)]),
            "mm_bf16:conv1x1": conv_ratio([(512, 128, 14, 1), (128, 512, 14, 1)])}


def _calibration_seconds(xs: list[torch.Tensor]) -> dict[str, float]:
    """Seconds each compressed form adds on one tensor like ``xs[0]`` (see :func:`calibrate`):
    each timed call sweeps all of ``xs`` and is divided by their number."""
    from sparsify_fx.passes.activation_memory.bn_relu_conv import ActMemBnReLUConv
    from sparsify_fx.passes.activation_memory.dense_storage import bf16in_linear
    from sparsify_fx.passes.activation_memory.modules import ActMemActLinear, ActMemLnLinear
    from sparsify_fx.passes.activation_memory.ops import actmem_batch_norm, actmem_relu
    from sparsify_fx.passes.activation_memory.rewrite import compress, decompress
    from sparsify_fx.passes.dropit import compress_threshold, decompress_threshold, dropit_conv

    x0 = xs[0]
    device, dtype, n = x0.device, x0.dtype, len(xs)
    sync = synchronizer(device)
    grad = torch.randn_like(x0)
    channels = x0.shape[1]
    # the tiny tensor's steps take ~0.1 ms, where one descheduling doubles a time: more pairs
    # (one busy calibration priced a BatchNorm -> ReLU -> Conv fixed cost at 0.32 ms, 0.13 ms in 7
    # others, and the ResNet-50 plan at 0.5 took DropIT for it: 1.08x instead of 1.03x)
    tiny = x0.numel() * x0.element_size() < 2**20

    def dropit():
        for x in xs:
            v, b = compress_threshold(x, 0.1)
            decompress_threshold(v, b, x.shape)

    def bf16():
        for x in xs:
            decompress(*compress(x, "bf16", 256), x.shape, dtype)

    def recompute():  # the GELU an activation->Linear pair re-runs in backward
        for x in xs:
            F.gelu(x)

    def net(rewritten, dense, out_grad: torch.Tensor = grad, pairs: int = 9) -> float:
        """Added seconds of ``rewritten(x)``'s forward + backward over ``dense(x)``'s."""
        pairs = pairs * 4 if tiny else pairs
        def step(fn) -> float:
            inputs = [x.detach().requires_grad_() for x in xs]
            sync()
            t0 = _clock()
            for xr in inputs:
                fn(xr).backward(out_grad)
            sync()
            return (_clock() - t0) / n

        step(rewritten), step(dense)  # warm-up
        # a difference of two small times: interleaved, best of ``pairs`` each
        timed = [(step(rewritten), step(dense)) for _ in range(pairs)]
        return max(0.0, min(a for a, _ in timed) - min(b for _, b in timed))

    # (running statistics in the tensor's dtype, as a BatchNorm of a float64 model keeps them)
    stats = (torch.zeros(channels, device=device, dtype=dtype),
             torch.ones(channels, device=device, dtype=dtype))
    weight = torch.ones(channels, device=device, dtype=dtype, requires_grad=True)
    bias = torch.zeros(channels, device=device, dtype=dtype, requires_grad=True)
    bitmask = net(lambda t: actmem_relu(t, 0.0)[0], torch.relu)
    # a Linear keeping a bf16 input: the cast in forward and the upcast for the weight
    # gradient; a narrow output keeps the matmuls from drowning that difference
    proj = torch.randn(64, x0.shape[-1] * x0.shape[-2], device=device, dtype=dtype, requires_grad=True)
    flat = (x0.shape[0] * x0.shape[1], x0.shape[-1] * x0.shape[-2])
    # (the casts alone: the weight gradient's precision is priced apart, bf16_matmul_ratios)
    dense = net(lambda t: bf16in_linear(t.view(flat), proj, None, False, False)[0],
                lambda t: F.linear(t.view(flat), proj), torch.randn(flat[0], 64, device=device, dtype=dtype))
    batchnorm = net(
        lambda t: actmem_batch_norm(t, weight, bias, *stats, 0.1, 1e-5, "bf16", 256)[0],
        lambda t: F.batch_norm(t, *stats, weight, bias, True, 0.1, 1e-5))
    # BatchNorm -> ReLU -> Conv with the ReLU output rebuilt in backward; a depthwise 1x1 conv
    # keeps the convolution's own time from drowning the difference
    conv_w = torch.ones(channels, 1, 1, 1, device=device, dtype=dtype, requires_grad=True)
    fused = ActMemBnReLUConv(0.1, 1e-5, [1, 1], [0, 0], [1, 1], channels, weight_grad="input").train()
    bn_relu_conv = net(lambda t: fused(t, weight, bias, *stats, None, conv_w),
                       lambda t: F.conv2d(F.relu(F.batch_norm(t, *stats, weight, bias, True, 0.1, 1e-5)), conv_w,
                                          groups=channels))
    # the same keeping a bf16 x_hat
    fused_bf16 = ActMemBnReLUConv(0.1, 1e-5, [1, 1], [0, 0], [1, 1], channels, store="bf16",
                                  weight_grad="input").train()
    bn_relu_conv_bf16 = net(lambda t: fused_bf16(t, weight, bias, *stats, None, conv_w),
                            lambda t: F.conv2d(F.relu(F.batch_norm(t, *stats, weight, bias, True, 0.1, 1e-5)),
                                               conv_w, groups=channels))
    # an activation / LayerNorm fused with its Linear (the output recomputed in backward,
    # exact or from a bf16 copy): the fused op's forward + backward less the dense pair's, per
    # byte of what the pair keeps (its input and the Linear's, twice the tensor's: hence / 2).
    # Priced as GELU's re-run alone, on an H100 a GPT-2 plan at 0.5 that fused
    # LN / GELU -> Linear with bf16 attention measured 7 ms added against 1 ms estimated
    rows = x0.numel() // x0.shape[-1]
    linear_w = torch.randn(16, x0.shape[-1], device=device, dtype=dtype, requires_grad=True)
    linear_grad = torch.randn(rows, 16, device=device, dtype=dtype)
    features = [x0.shape[-1]]
    ln_w = torch.ones(features, device=device, dtype=dtype, requires_grad=True)
    ln_b = torch.zeros(features, device=device, dtype=dtype, requires_grad=True)

    def act_linear(store: str) -> float:
        op = ActMemActLinear("gelu", store=store, weight_grad="input").train()
        return net(lambda t: op(t.view(rows, -1), linear_w), lambda t: F.linear(F.gelu(t.view(rows, -1)), linear_w),
                   linear_grad, pairs=5) / 2

    def ln_linear(store: str) -> float:
        op = ActMemLnLinear(tuple(features), 1e-5, store=store, weight_grad="input").train()
        return net(lambda t: op(t.view(rows, -1), ln_w, ln_b, linear_w),
                   lambda t: F.linear(F.layer_norm(t.view(rows, -1), features, ln_w, ln_b), linear_w),
                   linear_grad, pairs=5) / 2

    # DropIT's conv forward + backward less the dense conv's, as for the forms above: its
    # compress + decompress alone priced it 1.3-2.8x low against the op on ResNet-50's shapes
    # (the weight gradient reads the expanded input, the kept values are gathered and scattered)
    proj_conv = torch.randn(64, channels, 1, 1, device=device, dtype=dtype, requires_grad=True)
    conv_grad = torch.randn(x0.shape[0], 64, *x0.shape[2:], device=device, dtype=dtype)
    dropit_net = net(
        lambda t: dropit_conv(t, proj_conv, None, [1, 1], [0, 0], [1, 1], 1, 0.1, 16384, "threshold")[0],
        lambda t: F.conv2d(t, proj_conv), conv_grad)
    return {"dropit": max(dropit_net, _time(dropit, device) / n), "bf16": _time(bf16, device) / n,
            "recompute": _time(recompute, device) / n, "bitmask": bitmask, "dense": dense, "batchnorm": batchnorm,
            "bn_relu_conv": bn_relu_conv, "bn_relu_conv_bf16": bn_relu_conv_bf16,
            "act_linear": act_linear("exact"), "act_linear_bf16": act_linear("bf16"),
            "ln_linear": ln_linear("exact"), "ln_linear_bf16": ln_linear("bf16")}


class _Unknown:
    """A value the timer cannot make: a placeholder without a recorded shape or a usable
    default (a dict of tensors; an argument with no default fixed at capture)."""

    def __repr__(self) -> str:
        return "<unknown>"


#: what :func:`example_input` returns where it cannot make an input
UNKNOWN = _Unknown()

#: the checks a capture adds on an argument fixed at capture (``is_causal=False``): they
#: compare the placeholder with the captured value, and the timer's stand-in (the signature's
#: default) need not be that value ("is_causal has been specialized to have value False"), so
#: they are not run (they do no tensor work)
_FIXED_ARGUMENT_CHECKS = frozenset({"_assert", "_assert_is_none", "check_fixed_argument"})


def _is_unknown(value: Any) -> bool:
    return any(v is UNKNOWN for v in torch.utils._pytree.tree_leaves(value))


class _NodeTimer(fx.Interpreter):
    """Times each node. A node reading an unknown input is not timed: its output is a random
    tensor of its recorded shape (a ``getitem`` of a dict input), else unknown too."""

    def __init__(self, gm: fx.GraphModule, device: torch.device, untimed: frozenset[str] = frozenset()):
        super().__init__(gm)
        self.seconds: dict[str, float] = {}
        self.untimed = untimed
        self.device = device
        # CUDA runs kernels asynchronously: without a synchronisation on both sides a node's
        # time would be its launch, and recomputing a GPU block would look nearly free
        self.sync = synchronizer(device)

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "call_function" and getattr(n.target, "__name__", "") in _FIXED_ARGUMENT_CHECKS:
            return None
        if n.op not in ("placeholder", "output"):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            if _is_unknown((args, kwargs)):
                return example_input(n, self.device)
        if n.name in self.untimed:
            return super().run_node(n)
        self.sync()
        t0 = _clock()
        out = super().run_node(n)
        self.sync()
        self.seconds[n.name] = min(self.seconds.get(n.name, math.inf), _clock() - t0)
        return out


def example_input(node: fx.Node, device: torch.device) -> Any:
    """A random tensor of ``node``'s recorded shape and dtype; for a placeholder without one
    its recorded number (a Dynamo graph's dynamic size) or its default (a non-tensor argument
    fixed at capture); else :data:`UNKNOWN`."""
    recorded = tensor_meta(node)
    if recorded is None:
        if node.op == "placeholder" and meta.VALUE in node.meta:
            return node.meta[meta.VALUE]
        if node.op == "placeholder" and node.args:
            return node.args[0]
        return UNKNOWN
    shape, dtype = recorded
    if dtype.is_floating_point:
        return torch.randn(shape, dtype=dtype, device=device)
    return torch.zeros(shape, dtype=dtype, device=device)


def with_own_buffers(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy sharing ``gm``'s parameters but not its buffers: a training forward updates
    BatchNorm's running statistics, which ``gm`` shares with the user's model."""
    return copy.deepcopy(gm, {id(p): p for p in gm.parameters()})


def rng_kept(device: torch.device):
    """Restore the RNG state afterwards: random inputs, dropout and DropIT's draws must not
    shift the user's random stream."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


@contextlib.contextmanager
def _inputs_with_state_kept(gm: fx.GraphModule) -> Iterator[list]:
    """Random inputs of ``gm``'s recorded shapes, with grad enabled; the RNG state and the
    parameters' gradients are restored afterwards (the steps run on copies sharing them)."""
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    grads = {name: p.grad for name, p in gm.named_parameters()}
    try:
        with rng_kept(device), torch.enable_grad():
            args = [example_input(n, device) for n in gm.graph.nodes if n.op == "placeholder"]
            unknown = [n.name for n, a in zip((n for n in gm.graph.nodes if n.op == "placeholder"), args)
                       if _is_unknown(a)]
            if unknown:
                raise ValueError(f"no recorded shape or default for input(s) {', '.join(unknown)}: "
                                 "whole-model steps need every input")
            yield args
    finally:
        for name, p in gm.named_parameters():
            p.grad = grads[name]


def train_step_seconds(gm: fx.GraphModule, args: list) -> tuple[float, float]:
    """One forward + backward of ``gm``: seconds until both were issued, and until the device
    was done (the same on a CPU). Gradients start from ``None``, so none accumulate into the
    tensors the caller restores."""
    for p in gm.parameters():
        p.grad = None
    sync = synchronizer(next((p.device for p in gm.parameters()), torch.device("cpu")))
    sync()
    t0 = _clock()
    out = gm(*args)
    leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
    torch.autograd.backward(leaves, [torch.ones_like(t) for t in leaves])
    issued = _clock() - t0
    sync()
    return issued, _clock() - t0


def measure_added_seconds(
    gm: fx.GraphModule, variants: dict[str, fx.GraphModule], rounds: int,
) -> tuple[dict[str, float], float]:
    """Seconds each variant's training step adds over ``gm``'s (best of ``rounds`` each,
    interleaved after a warm-up round), and the gap between ``gm``'s two best steps (the
    noise). Runs on copies with their own buffers; restores the gradients and the RNG state."""
    models = {key: with_own_buffers(m).train() for key, m in {"": gm, **variants}.items()}
    times: dict[str, list[float]] = {key: [] for key in models}
    with _inputs_with_state_kept(gm) as args:
        for round_ in range(rounds + 1):
            for key, m in models.items():
                _, seconds = train_step_seconds(m, args)
                if round_:  # round 0 warms up allocators and kernels
                    times[key].append(seconds)
    # the noise of a best-of-n: how far the second-best dense step is from the best
    dense = sorted(times[""])
    noise = dense[1] - dense[0] if len(dense) > 1 else dense[0]
    return {key: min(times[key]) - dense[0] for key in variants}, noise


def host_share(gm: fx.GraphModule, rounds: int = 3) -> float:
    """The share of a dense training step during which the host is busy issuing it: 1.0 on a
    CPU; on a GPU the time until forward and backward have been launched over the time until
    the device is done (median of ``rounds`` steps after a warm-up, on a copy with its own
    buffers, gradients and RNG state restored).

    The calibrated fixed cost of an op is host time (dispatch, the small ops around the
    kernels, launches). Where the GPU is the bottleneck that time runs while the device works
    and adds little: on an H100 at batch 32, ViT-B/16's fused LayerNorm / GELU -> Linear ops,
    priced 0.2-0.4 ms each, measured no slower than dense, while a host-bound GPT-2's measured
    about their price. So the planner charges ``share`` of each fixed cost."""
    if next((p.device for p in gm.parameters()), torch.device("cpu")).type != "cuda":
        return 1.0
    if any(_is_unknown(example_input(n, torch.device("meta"))) for n in gm.graph.nodes if n.op == "placeholder"):
        return 1.0  # (an input it cannot make, a dict of tensors: each fixed cost charged in full)
    model = with_own_buffers(gm).train()
    shares: list[float] = []
    with _inputs_with_state_kept(gm) as args:
        for round_ in range(rounds + 1):
            issued, done = train_step_seconds(model, args)
            if round_:  # round 0 warms up the allocator and the kernels
                shares.append(issued / max(done, 1e-9))
    return min(1.0, statistics.median(shares))


def node_seconds(gm: fx.GraphModule, same_as: dict[str, str] | None = None) -> dict[str, float]:
    """Forward time of each node on random inputs of the recorded shapes, as the re-run in
    backward runs it: training mode, grad enabled (BatchNorm's batch statistics, the
    autograd graph and its saved tensors), on a copy with its own buffers.

    ``same_as`` maps a node to the node whose time it takes (``prices.timing_twins``: the
    same op on the same shapes in an identical block); such a node runs untimed, so the
    identical blocks of a model get one price, not one draw of the host's noise each."""
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    same_as = same_as or {}
    with rng_kept(device):
        args = [example_input(n, device) for n in gm.graph.nodes if n.op == "placeholder"]
        copy_ = with_own_buffers(gm).train()
        timer = _NodeTimer(copy_, device, frozenset(same_as))
        try:
            with torch.enable_grad():
                for _ in range(2):
                    timer.run(*args)
        except Exception:  # noqa: BLE001  e.g. BatchNorm1d on a batch of one in training mode
            copy_.eval()
            timer.seconds.clear()
            with torch.no_grad():
                for _ in range(2):
                    timer.run(*args)
    for name, twin in same_as.items():
        if twin in timer.seconds:
            timer.seconds[name] = timer.seconds[twin]
    return timer.seconds
