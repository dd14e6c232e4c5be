"""Every ``sparsify_fx::`` custom op under ``torch.library.opcheck``, and torch.compile
(``aot_eager``, checking each op's traced strides against its real output) of rewritten
models against the eager rewritten module.

opcheck runs each op's schema, autograd registration, fake kernel (shapes, dtypes and
strides against the real kernel) and AOT dispatch with dynamic shapes. A fake kernel that
gives the right shape but the wrong strides passes eager tests and fails only once
``torch.compile`` checks it, so every op has cases with the layouts models feed it:
transposed activations, channels-last 4-D inputs, bf16 (autocast), odd sizes.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree as pytree

import sparsify_fx as sfx

# ---------------------------------------------------------------- inputs


def _t(*shape: int, dtype: torch.dtype = torch.float32, grad: bool = True, layout: str = "contiguous"):
    """A random tensor of ``shape`` in ``layout``: ``"contiguous"``, ``"transposed"`` (the last
    two dims swapped in memory, as ``x.transpose(-2, -1)`` of a contiguous tensor gives) or
    ``"channels_last"`` (4-D)."""
    if layout == "transposed":
        x = torch.randn(*shape[:-2], shape[-1], shape[-2], dtype=dtype).transpose(-2, -1)
        assert not x.is_contiguous()
    elif layout == "channels_last":
        x = torch.randn(*shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
        assert not x.is_contiguous()
    else:
        x = torch.randn(*shape, dtype=dtype)
    return x.requires_grad_(grad)


def _heads(b: int, heads: int, seq: int, dim: int, dtype=torch.float32):
    """q / k / v as GPT-2 makes them: ``[b, seq, heads, dim]`` viewed as ``[b, heads, seq, dim]``."""
    x = torch.randn(b, seq, heads, dim, dtype=dtype).transpose(1, 2)
    return x.requires_grad_()


_BF16 = torch.bfloat16
_CL = "channels_last"
_TR = "transposed"

# ---------------------------------------------------------------- one table: op -> cases
# Each case is (id, a function building the op's positional arguments). Arguments are built
# per test so that each test gets fresh leaves.

Case = tuple[str, Callable[[], tuple]]


def _bn_stats(c: int):
    return torch.randn(c).abs(), torch.rand(c) + 0.5


def _batch_norm(layout: str, storage: str, dtype=torch.float32):
    def args():
        return (_t(2, 5, 7, 13, dtype=dtype, layout=layout), _t(5), _t(5), *_bn_stats(5), 0.1, 1e-5, storage, 16)
    return args


def _bn_relu_conv(layout: str, upper, store: str, stride=(1, 1), groups: int = 1):
    def args():
        return (_t(2, 4, 7, 9, layout=layout), _t(4), _t(4), *_bn_stats(4), 0.1, 1e-5,
                _t(6, 4 // groups, 3, 3), _t(6), list(stride), [1, 1], [1, 1], groups, upper, store, False)
    return args


def _conv_args(layout: str, dtype=torch.float32, stride=(1, 1), padding=(1, 1), groups: int = 1):
    """(x, weight, bias, stride, padding, dilation, groups) of a 3x3 conv, 4 -> 6 channels."""
    return (_t(2, 4, 7, 9, dtype=dtype, layout=layout), _t(6, 4 // groups, 3, 3, dtype=dtype), _t(6, dtype=dtype),
            list(stride), list(padding), [1, 1], groups)


def _sdpa(layout: str, is_causal: bool, storage: str, keep_out: bool, dtype=torch.float32):
    def args():
        if layout == "heads":
            q, k, v = (_heads(2, 2, 7, 8, dtype) for _ in range(3))
        else:
            q, k, v = (_t(2, 2, 7, 8, dtype=dtype) for _ in range(3))
        return q, k, v, is_causal, None, storage, 16, keep_out
    return args


def _sdpa_dropout(layout: str, mask: str | None, storage: str, dtype=torch.float32, is_causal: bool = False):
    def args():
        if layout == "heads":
            q, k, v = (_heads(2, 2, 7, 8, dtype) for _ in range(3))
        else:
            q, k, v = (_t(2, 2, 7, 8, dtype=dtype) for _ in range(3))
        m = None if mask is None else (torch.rand(2, 1, 7, 7) > 0.3 if mask == "bool" else
                                       torch.randn(2, 1, 7, 7, dtype=dtype))
        return q, k, v, m, torch.tensor(1234), 0.25, is_causal, None, storage, 16
    return args


def _sdpa_dropout_backward(layout: str, mask: str | None, dtype=torch.float32):
    def args():
        q, k, v, m, seed, p, is_causal, scale, _, _ = _sdpa_dropout(layout, mask, "exact", dtype)()
        return (_t(2, 2, 7, 8, dtype=dtype, grad=False), *(t.detach() for t in (q, k, v)), m, seed, p, is_causal,
                scale)
    return args


def _bsc_args() -> tuple:
    from sparsify_fx.passes.block_sparse.blocks import compress_blocks

    blocks = compress_blocks(torch.randn(64, 48, device="cuda"), 16, 0.5, "l2", "topk")
    return blocks.values, blocks.col_ptr, blocks.row_idx, torch.randn(64, 24, device="cuda"), 48


CASES: dict[str, list[Case]] = {
    "actmem_relu": [
        ("relu", lambda: (_t(7, 13), 0.0)),
        ("leaky", lambda: (_t(7, 13), 0.01)),
        ("relu-transposed", lambda: (_t(3, 7, 13, layout=_TR), 0.0)),
        ("relu-channels_last", lambda: (_t(2, 3, 7, 13, layout=_CL), 0.0)),
        ("leaky-channels_last", lambda: (_t(2, 3, 7, 13, layout=_CL), 0.2)),
        ("relu-bf16", lambda: (_t(7, 13, dtype=_BF16), 0.0)),
    ],
    "actmem_gelu": [
        ("bf16-storage", lambda: (_t(7, 13), "none", "bf16", 16)),
        ("int8-tanh", lambda: (_t(7, 13), "tanh", "int8", 16)),
        ("bf16-storage-transposed", lambda: (_t(3, 7, 13, layout=_TR), "none", "bf16", 16)),
        ("int8-transposed", lambda: (_t(3, 7, 13, layout=_TR), "none", "int8", 16)),
        ("bf16-storage-channels_last", lambda: (_t(2, 3, 7, 13, layout=_CL), "none", "bf16", 16)),
        ("bf16-input-int8", lambda: (_t(7, 13, dtype=_BF16), "none", "int8", 16)),
    ],
    "actmem_silu": [
        ("bf16-storage", lambda: (_t(7, 13), "bf16", 16)),
        ("int8", lambda: (_t(7, 13), "int8", 16)),
        ("bf16-storage-transposed", lambda: (_t(3, 7, 13, layout=_TR), "bf16", 16)),
        ("bf16-storage-channels_last", lambda: (_t(2, 3, 7, 13, layout=_CL), "bf16", 16)),
        ("bf16-input-int8", lambda: (_t(7, 13, dtype=_BF16), "int8", 16)),
    ],
    "actmem_act_linear": [
        ("gelu-exact", lambda: (_t(2, 7, 13), _t(5, 13), _t(5), "gelu", "none", "exact", False)),
        ("silu-bf16-store", lambda: (_t(2, 7, 13), _t(5, 13), None, "silu", "none", "bf16", False)),
        ("gelu-bf16-mm", lambda: (_t(2, 7, 13), _t(5, 13), _t(5), "gelu", "tanh", "bf16", True)),
        ("gelu-transposed", lambda: (_t(2, 13, 7, layout=_TR), _t(5, 7), _t(5), "gelu", "none", "bf16", False)),
        ("gelu-bf16", lambda: (_t(2, 7, 13, dtype=_BF16), _t(5, 13, dtype=_BF16), _t(5, dtype=_BF16), "gelu",
                               "none", "bf16", False)),
        # autocast: the activation in fp32, the Linear in bf16
        ("gelu-fp32-in-bf16-weight", lambda: (_t(2, 7, 13), _t(5, 13, dtype=_BF16), _t(5, dtype=_BF16), "gelu",
                                              "none", "exact", False)),
    ],
    "actmem_batch_norm": [
        ("bf16-storage", _batch_norm("contiguous", "bf16")),
        ("int8", _batch_norm("contiguous", "int8")),
        ("bf16-storage-channels_last", _batch_norm(_CL, "bf16")),
        ("int8-channels_last", _batch_norm(_CL, "int8")),
        ("bf16-input-int8", _batch_norm("contiguous", "int8", _BF16)),
        ("bf16-input-int8-channels_last", _batch_norm(_CL, "int8", _BF16)),
    ],
    "actmem_bn_relu_conv": [
        ("relu-exact", _bn_relu_conv("contiguous", None, "exact")),
        ("relu6-bf16-store", _bn_relu_conv("contiguous", 6.0, "bf16")),
        ("relu-exact-channels_last", _bn_relu_conv(_CL, None, "exact")),
        ("relu-bf16-store-channels_last", _bn_relu_conv(_CL, None, "bf16")),
        ("relu-stride2-groups2-channels_last", _bn_relu_conv(_CL, None, "exact", (2, 2), 2)),
    ],
    "actmem_layer_norm": [
        ("bf16-storage", lambda: (_t(2, 7, 13), [13], _t(13), _t(13), 1e-5, "bf16", 16)),
        ("int8-no-affine", lambda: (_t(2, 7, 13), [13], None, None, 1e-5, "int8", 16)),
        ("two-dims", lambda: (_t(3, 7, 13), [7, 13], _t(7, 13), _t(7, 13), 1e-5, "bf16", 16)),
        ("bf16-storage-transposed", lambda: (_t(2, 13, 7, layout=_TR), [7], _t(7), _t(7), 1e-5, "bf16", 16)),
        ("bf16-input-int8", lambda: (_t(2, 7, 13, dtype=_BF16), [13], _t(13, dtype=_BF16), _t(13, dtype=_BF16),
                                     1e-5, "int8", 16)),
    ],
    "actmem_ln_linear": [
        ("exact", lambda: (_t(2, 7, 13), [13], _t(13), _t(13), 1e-5, _t(5, 13), _t(5), "exact", False)),
        ("bf16-store", lambda: (_t(2, 7, 13), [13], _t(13), _t(13), 1e-5, _t(5, 13), None, "bf16", False)),
        ("bf16-mm", lambda: (_t(2, 7, 13), [13], None, None, 1e-5, _t(5, 13), _t(5), "bf16", True)),
        ("transposed", lambda: (_t(2, 13, 7, layout=_TR), [7], _t(7), _t(7), 1e-5, _t(5, 7), _t(5), "bf16", False)),
        ("bf16", lambda: (_t(2, 7, 13, dtype=_BF16), [13], _t(13, dtype=_BF16), _t(13, dtype=_BF16), 1e-5,
                          _t(5, 13, dtype=_BF16), _t(5, dtype=_BF16), "exact", False)),
        # autocast: the LayerNorm in fp32, the Linear in bf16
        ("fp32-in-bf16-weight", lambda: (_t(2, 7, 13), [13], _t(13), _t(13), 1e-5, _t(5, 13, dtype=_BF16),
                                         _t(5, dtype=_BF16), "bf16", False)),
    ],
    "actmem_scale": [
        ("bf16-storage", lambda: (_t(2, 7, 13), _t(13), "bf16", 16)),
        ("int8", lambda: (_t(2, 7, 13), _t(13), "int8", 16)),
        ("bf16-storage-transposed", lambda: (_t(2, 13, 7, layout=_TR), _t(7), "bf16", 16)),
        ("channels_last", lambda: (_t(2, 5, 7, 9, layout=_CL), _t(5, 1, 1), "bf16", 16)),
        ("bf16-input-int8", lambda: (_t(2, 7, 13, dtype=_BF16), _t(13, dtype=_BF16), "int8", 16)),
    ],
    "actmem_sdpa": [
        ("bf16-storage", _sdpa("contiguous", False, "bf16", False)),
        ("int8-causal", _sdpa("contiguous", True, "int8", False)),
        ("keep-out", _sdpa("contiguous", False, "bf16", True)),
        ("heads-layout", _sdpa("heads", True, "bf16", False)),
        ("heads-layout-keep-out", _sdpa("heads", True, "bf16", True)),
        ("bf16-input-int8-keep-out", _sdpa("contiguous", True, "int8", True, _BF16)),
        ("bf16-input-heads-layout", _sdpa("heads", False, "int8", False, _BF16)),
    ],
    "actmem_sdpa_dropout": [
        ("exact", _sdpa_dropout("contiguous", None, "exact")),
        ("bf16-float-mask", _sdpa_dropout("contiguous", "float", "bf16")),
        ("int8-bool-mask-heads-layout", _sdpa_dropout("heads", "bool", "int8")),
        ("bf16-input-causal", _sdpa_dropout("heads", None, "exact", _BF16, is_causal=True)),
    ],
    "actmem_sdpa_dropout_backward": [
        ("float-mask", _sdpa_dropout_backward("contiguous", "float")),
        ("bf16-heads-layout", _sdpa_dropout_backward("heads", None, _BF16)),
    ],
    "actmem_max_pool2d": [
        ("k2", lambda: (_t(2, 3, 8, 12), [2, 2], [2, 2], [0, 0], [1, 1], False)),
        ("k3-odd-ceil", lambda: (_t(2, 3, 7, 13), [3, 3], [2, 2], [1, 1], [1, 1], True)),
        ("k3-channels_last", lambda: (_t(2, 3, 7, 13, layout=_CL), [3, 3], [2, 2], [1, 1], [1, 1], False)),
        ("k2-channels_last-dilated", lambda: (_t(2, 3, 7, 13, layout=_CL), [2, 2], [1, 1], [0, 0], [2, 2], True)),
        ("bf16-channels_last", lambda: (_t(2, 3, 7, 13, dtype=_BF16, layout=_CL), [2, 2], [2, 2], [0, 0], [1, 1],
                                        False)),
    ],
    "bf16in_linear": [
        ("plain", lambda: (_t(2, 7, 13), _t(5, 13), _t(5), False, False)),
        ("transposed-weight", lambda: (_t(7, 13), _t(13, 5), None, True, False)),
        ("transposed-input", lambda: (_t(2, 13, 7, layout=_TR), _t(5, 7), _t(5), False, False)),
        ("bf16-mm", lambda: (_t(2, 7, 13), _t(5, 13), _t(5), False, True)),
    ],
    "bf16in_conv": [
        ("plain", lambda: (*_conv_args("contiguous"), False)),
        ("channels_last", lambda: (*_conv_args(_CL), False)),
        ("channels_last-stride2-groups2", lambda: (*_conv_args(_CL, stride=(2, 2), groups=2), False)),
        ("bf16-mm-channels_last", lambda: (*_conv_args(_CL), True)),
    ],
    "dropit_linear": [
        ("threshold", lambda: (_t(2, 7, 13), _t(5, 13), _t(5), 0.5, 16, "threshold", False)),
        ("topk", lambda: (_t(2, 7, 13), _t(5, 13), None, 0.3, 16, "topk", False)),
        ("threshold-transposed", lambda: (_t(2, 13, 7, layout=_TR), _t(5, 7), _t(5), 0.5, 16, "threshold",
                                          False)),
        ("topk-transposed-weight", lambda: (_t(7, 13), _t(13, 5), _t(5), 0.5, 16, "topk", True)),
        ("threshold-bf16", lambda: (_t(2, 7, 13, dtype=_BF16), _t(5, 13, dtype=_BF16), _t(5, dtype=_BF16), 0.5,
                                    16, "threshold", False)),
    ],
    "dropit_conv": [
        ("threshold", lambda: (*_conv_args("contiguous"), 0.5, 16, "threshold")),
        ("topk", lambda: (*_conv_args("contiguous"), 0.3, 16, "topk")),
        ("threshold-channels_last", lambda: (*_conv_args(_CL), 0.5, 16, "threshold")),
        ("topk-channels_last-stride2", lambda: (*_conv_args(_CL, stride=(2, 2)), 0.3, 16, "topk")),
        ("threshold-bf16-channels_last", lambda: (*_conv_args(_CL, dtype=_BF16), 0.5, 16, "threshold")),
    ],
    "in_backward": [
        ("bf16-payload", lambda: (_t(7, 13, dtype=_BF16, grad=False), _t(3, 5, grad=False))),
        ("transposed", lambda: (_t(13, 7, layout=_TR, grad=False), _t(3, 5, grad=False))),
        ("channels_last", lambda: (_t(2, 3, 7, 13, layout=_CL, grad=False), _t(2, 3, 7, 13, grad=False))),
    ],
    "sliceout_linear": [
        ("window", lambda: (_t(3, 8), _t(12, 16), _t(12), [2, 4, 8, 2], [4, 8], 2.0)),
        ("all-rows", lambda: (_t(2, 7, 13), _t(5, 13), None, [], [], 1.0)),
        ("transposed", lambda: (_t(2, 7, 8, layout=_TR), _t(12, 16), _t(12), [0, 5], [4, 8], 1.5)),
    ],
    "sliceout_conv": [
        ("window", lambda: (_t(2, 4, 6, 6), _t(6, 8, 3, 3), _t(6), [1, 3], [2, 4], 1.5, [1, 1], [1, 1], [1, 1])),
        ("channels_last", lambda: (_t(2, 4, 7, 9, layout=_CL), _t(6, 8, 3, 3), _t(6), [1, 3], [2, 4], 1.5,
                                   [1, 1], [1, 1], [1, 1])),
        ("channels_last-stride2", lambda: (_t(2, 4, 7, 9, layout=_CL), _t(6, 4, 3, 3), None, [0, 2, 3, 3], [],
                                           1.0, [2, 2], [0, 0], [1, 1])),
    ],
    "block_sparse_dense": [
        ("linear-sample", lambda: (_t(2, 7, 13), _t(5, 13), _t(5), 4, 0.5, "l2", "sample", "linear", [])),
        ("linear-topk-transposed", lambda: (_t(2, 13, 7, layout=_TR), _t(5, 7), None, 4, 0.5, "l1", "topk",
                                            "linear", [])),
        ("addmm", lambda: (_t(7, 13), _t(13, 5), _t(5), 4, 0.5, "l2", "topk", "addmm", [])),
        ("matmul", lambda: (_t(2, 7, 13), _t(13, 5), None, 4, 0.5, "l2", "sample", "matmul", [])),
        ("conv1x1", lambda: (_t(2, 6, 5, 7), _t(9, 6, 1, 1), _t(9), 4, 0.5, "l2", "sample", "conv", [1, 1])),
        ("conv1x1-channels_last", lambda: (_t(2, 6, 5, 7, layout=_CL), _t(9, 6, 1, 1), _t(9), 4, 0.5, "l2",
                                           "topk", "conv", [1, 1])),
        ("linear-bf16", lambda: (_t(2, 7, 13, dtype=_BF16), _t(5, 13, dtype=_BF16), _t(5, dtype=_BF16), 4, 0.5,
                                 "l2", "topk", "linear", [])),
    ],
    # CUDA (triton) only: block_sparse_dense's weight gradient on the GPU
    "bsc_weight_grad_triton": [("cuda", _bsc_args)],
}

#: ops whose kernel needs CUDA and triton: their cases skip elsewhere
_CUDA_ONLY = {"bsc_weight_grad_triton"}

#: every case runs opcheck's schema, autograd-registration and fake-tensor checks (what a
#: layout or dtype changes); these also run ``test_aot_dispatch_dynamic`` (forward and backward
#: traced with dynamic shapes against eager, 0.5-1 s each): each op's backward branches (storage,
#: store, bf16 GEMM, kept output) and a non-contiguous or bf16 input
_AOT_CASES = {
    "actmem_relu-relu", "actmem_relu-leaky-channels_last", "actmem_relu-relu-bf16",
    "actmem_gelu-bf16-storage", "actmem_gelu-int8-transposed", "actmem_gelu-bf16-input-int8",
    "actmem_silu-int8", "actmem_silu-bf16-storage-channels_last",
    "actmem_act_linear-gelu-exact", "actmem_act_linear-gelu-bf16-mm", "actmem_act_linear-gelu-fp32-in-bf16-weight",
    "actmem_batch_norm-int8", "actmem_batch_norm-bf16-storage-channels_last", "actmem_batch_norm-bf16-input-int8",
    "actmem_bn_relu_conv-relu-exact", "actmem_bn_relu_conv-relu6-bf16-store",
    "actmem_bn_relu_conv-relu-bf16-store-channels_last",
    "actmem_layer_norm-bf16-storage", "actmem_layer_norm-bf16-storage-transposed",
    "actmem_layer_norm-bf16-input-int8",
    "actmem_ln_linear-exact", "actmem_ln_linear-bf16-mm", "actmem_ln_linear-bf16",
    "actmem_scale-int8", "actmem_scale-channels_last",
    "actmem_sdpa-int8-causal", "actmem_sdpa-heads-layout-keep-out", "actmem_sdpa-bf16-input-heads-layout",
    "actmem_sdpa_dropout-exact", "actmem_sdpa_dropout-int8-bool-mask-heads-layout",
    "actmem_sdpa_dropout-bf16-input-causal", "actmem_sdpa_dropout_backward-float-mask",
    "actmem_max_pool2d-k3-odd-ceil", "actmem_max_pool2d-k3-channels_last",
    "bf16in_linear-plain", "bf16in_linear-bf16-mm",
    "bf16in_conv-channels_last", "bf16in_conv-bf16-mm-channels_last",
    "dropit_linear-threshold", "dropit_linear-topk-transposed-weight",
    "dropit_conv-threshold-channels_last", "dropit_conv-topk-channels_last-stride2",
    "in_backward-bf16-payload",
    "sliceout_linear-window", "sliceout_linear-transposed",
    "sliceout_conv-channels_last",
    "block_sparse_dense-linear-sample", "block_sparse_dense-conv1x1-channels_last", "block_sparse_dense-linear-bf16",
    "bsc_weight_grad_triton-cuda",
}
_CHEAP_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")

#: gradient tolerance (rtol = atol) where the eager backward and the traced one (AOT dispatch)
#: are different kernels: the eager fused CPU kernel (BatchNorm from a bf16 x_hat), the re-run
#: fused attention against the written-out math backward, per-column GEMMs against one GEMM of
#: the rebuilt input (block sparse), all in bf16 where the case says so
_TOLERANCES = {
    "actmem_batch_norm-bf16-storage-channels_last": 1e-4,
    "actmem_batch_norm-bf16-input-int8": 1e-4,
    "actmem_sdpa-bf16-input-heads-layout": 2e-2,
    "block_sparse_dense-linear-bf16": 2e-2,
}


def _triton_ready() -> bool:
    from sparsify_fx.passes.block_sparse.triton_kernel import triton_available

    return torch.cuda.is_available() and triton_available()


def _registered_ops() -> set[str]:
    """Every op in the ``sparsify_fx`` namespace, after importing every module of the passes
    (an op defined in a module no pass imports yet is still found)."""
    import sparsify_fx.passes as passes

    for info in pkgutil.walk_packages(passes.__path__, prefix=passes.__name__ + "."):
        importlib.import_module(info.name)
    prefix = "sparsify_fx::"
    return {name[len(prefix):].split(".")[0] for name in torch._C._dispatch_get_all_op_names()
            if name.startswith(prefix)}


def test_every_registered_op_has_an_opcheck_case():
    registered = _registered_ops()
    assert {"actmem_sdpa", "in_backward"} <= registered  # the enumeration sees the namespace at all
    missing = registered - set(CASES)
    assert not missing, f"custom ops without an opcheck case in tests/test_opcheck.py: {sorted(missing)}"
    stale = set(CASES) - registered
    assert not stale, f"opcheck cases for ops that are not registered: {sorted(stale)}"
    assert all(CASES.values()), [op for op, cases in CASES.items() if not cases]
    ids = {f"{op}-{case_id}" for op, cases in CASES.items() for case_id, _ in cases}
    assert len(ids) == sum(map(len, CASES.values())), "duplicate case ids"
    assert _AOT_CASES <= ids, _AOT_CASES - ids
    assert set(_TOLERANCES) <= _AOT_CASES, set(_TOLERANCES) - _AOT_CASES  # only the AOT check compares values
    without_aot = {op for op, cases in CASES.items() if not any(f"{op}-{c}" in _AOT_CASES for c, _ in cases)}
    assert not without_aot, f"ops never traced by test_aot_dispatch_dynamic: {sorted(without_aot)}"


# one test per op, not per case: the suite's per-test teardown (a full gc) costs more than
# most cases' checks; a failure lists every failing case
@pytest.mark.parametrize("op", list(CASES))
def test_opcheck(op: str):
    if op in _CUDA_ONLY and not _triton_ready():
        pytest.skip(f"{op} runs a triton kernel: needs CUDA and triton")
    failures = []
    for case_id, build in CASES[op]:
        case = f"{op}-{case_id}"
        tol = _TOLERANCES.get(case)
        kwargs = {} if tol is None else {"rtol": tol, "atol": tol}
        utils = (*_CHEAP_UTILS, "test_aot_dispatch_dynamic") if case in _AOT_CASES else _CHEAP_UTILS
        torch.manual_seed(0)
        try:
            torch.library.opcheck(getattr(torch.ops.sparsify_fx, op).default, build(), test_utils=utils, **kwargs)
        except Exception as error:  # noqa: BLE001  (every case's failure is reported)
            failures.append(f"{case}: {type(error).__name__}: {(str(error).splitlines() or [''])[0]}")
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------- torch.compile of rewritten models


class _AttentionBlock(nn.Module):
    """A GPT-2 block: q / k / v split from one projection and viewed as heads (the
    ``[b, seq, heads, dim]`` memory the fused attention returns its output in)."""

    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc, self.out = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class _TinyGPT(nn.Module):
    def __init__(self, dim: int = 16):
        super().__init__()
        self.blocks = nn.Sequential(_AttentionBlock(dim), _AttentionBlock(dim))
        self.ln_f, self.head = nn.LayerNorm(dim), nn.Linear(dim, 5)

    def forward(self, x):
        return self.head(self.ln_f(self.blocks(x)))


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.bn2 = nn.Conv2d(8, 12, 3, stride=2), nn.BatchNorm2d(12)
        self.c3 = nn.Conv2d(12, 12, 1)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.bn1(self.c1(x))), 2, ceil_mode=True)
        x = self.c3(torch.relu(self.bn2(self.c2(x))))
        return self.head(F.gelu(x).mean((2, 3)))


class _FakeMatchesReal(torch.fx.Interpreter):
    """Runs an AOT graph and asserts that every ``sparsify_fx`` op's real output has the sizes,
    strides and dtype its fake kernel traced (``node.meta["val"]``). (PyTorch's own metas are
    not held to it: some differ from the CPU kernels, e.g. ``native_batch_norm_backward`` on a
    channels-last input, and Inductor decomposes those ops instead of trusting them.)"""

    def run_node(self, n: torch.fx.Node):
        result = super().run_node(n)
        if getattr(n.target, "namespace", None) == "sparsify_fx" and "val" in n.meta:
            fakes, reals = pytree.tree_leaves(n.meta["val"]), pytree.tree_leaves(result)
            for i, (fake, real) in enumerate(zip(fakes, reals)):
                if not (isinstance(fake, torch.Tensor) and isinstance(real, torch.Tensor)):
                    continue
                where = f"{n.format_node()} output {i}"
                assert (fake.shape, fake.dtype) == (real.shape, real.dtype), \
                    f"{where}: traced {fake.dtype}{list(fake.shape)}, ran {real.dtype}{list(real.shape)}"
                # strides of size-1 dims (and of empty tensors) carry no layout
                significant = [d for d in range(real.dim()) if real.shape[d] > 1] if real.numel() else []
                assert all(fake.stride(d) == real.stride(d) for d in significant), \
                    f"{where}: traced strides {fake.stride()}, ran {real.stride()}"
        return result


def _aot_eager_checked():
    """``backend="aot_eager"`` (the same AOT autograd and partitioner, no compiler) that also
    checks each op's fake kernel against the real output. Plain ``aot_eager`` runs a wrong fake
    kernel's graph without noticing (the real tensors flow on); Inductor's generated code
    asserts sizes and strides (``assert_size_stride``), which is how a wrong fake kernel
    crashes there, at a compile cost too high for this test."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_compiler
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    @make_boxed_compiler
    def checked(gm: torch.fx.GraphModule, example_inputs):
        return _FakeMatchesReal(gm).run

    return aot_autograd(fw_compiler=checked, bw_compiler=checked,
                        partition_fn=min_cut_rematerialization_partition, keep_inference_input_mutations=True)


def _step(run, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # the ops' own sampling (DropIT), identical for both runs
    out = run(x)
    out.pow(2).mean().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


# (model, input shape, input layout, recipe, what it must install: (pass, op) rewrites, op
# module class names)
_COMPILE_CASES = [
    pytest.param(_TinyGPT, (2, 8, 16), "contiguous", sfx.MemoryBudget(fraction=0.5),
                 {("actmem", "attention"), ("actmem", "layer_norm")}, id="gpt-memory_budget"),
    pytest.param(_TinyGPT, (2, 8, 16), "contiguous", "actmem", {("actmem", "layer_norm"), ("actmem", "gelu")},
                 id="gpt-actmem"),
    pytest.param(_TinyGPT, (2, 8, 16), "contiguous", sfx.ActivationMemory(attention="bf16", attention_output="keep"),
                 {("actmem", "attention")}, id="gpt-actmem-attention-keep"),
    pytest.param(_ConvNet, (3, 3, 13, 13), _CL, "actmem",
                 {("actmem", "batch_norm"), ("actmem", "max_pool2d"), ("actmem", "relu")},
                 id="convnet-channels_last-actmem"),
    pytest.param(_ConvNet, (3, 3, 13, 13), _CL, "dropit:keep=0.5+actmem",
                 {("dropit", "conv2d"), ("actmem", "batch_norm")}, id="convnet-channels_last-dropit-actmem"),
    pytest.param(_ConvNet, (3, 3, 13, 13), _CL, sfx.ActivationMemory(batchnorm="recompute-bf16", dense="bf16"),
                 {("actmem", "conv2d"), "ActMemBnReLUConv", "Bf16InputConv"},
                 id="convnet-channels_last-actmem-fused-bf16"),
]


@pytest.mark.parametrize("make,shape,layout,recipe,expected", _COMPILE_CASES)
def test_compiled_rewrite_trains_like_eager_rewrite(make, shape, layout, recipe, expected):
    """``torch.compile`` (``aot_eager``: AOT autograd traces every op's fake kernel and
    backward) of a rewritten model gives the eager rewrite's output and gradients."""
    torch.manual_seed(0)
    x = _t(*shape, grad=False, layout=layout)
    fast = sfx.sparsify(make(), recipe, example_inputs=(x,))
    installed = {(r.pass_name, r.op) for r in sfx.explain(fast).rewrites} | {type(m).__name__ for m in fast.modules()}
    assert expected <= installed, expected - installed
    fast.train()
    ref_out, ref_grads = _step(fast, fast, x)
    torch._dynamo.reset()
    compiled = torch.compile(fast, backend=_aot_eager_checked(), dynamic=False)
    out, grads = _step(compiled, fast, x)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    # and one optimiser step through the compiled module moves the parameters
    before = [p.detach().clone() for p in fast.parameters()]
    torch.optim.SGD(fast.parameters(), lr=0.1).step()
    assert any(not torch.equal(b, p) for b, p in zip(before, fast.parameters()))
