"""Fused CPU kernels for DropIT's selection and ActivationMemory's ReLU / BatchNorm (C++, built on
first use).

DropIT's saved input is stored as the kept values in flat order plus a 1-bit-per-element
bitmap. In PyTorch ops that takes ``abs``, ``nan_to_num``, ``gt``, ``count_nonzero``,
``x[mask]`` (``nonzero`` + gather) and the bit packing in forward, ``masked_scatter_`` in
backward: about 3.5 ns per element on 2 cores, 150 ms of a ResNet-50 step (8x112x112) whose
dense step takes 430 ms. Here the same result is two passes per direction:

* ``sample_cutoff(x, index, dropped)``: the cut-off, from the sample ``|x[index]|``
  (:func:`sparsify_fx.passes.dropit._sample_index`) by a radix select on the float bits, in one call;
* ``threshold_bits(x, cutoff)``: the bitmap of ``!(|x| <= cutoff)`` (NaN is kept, as the
  PyTorch path keeps it) and the number of kept elements in each chunk of 65536;
* ``compact(x, bits, counts, capacity)``: the kept values in flat order, zero padded;
* ``expand(values, bits, n)``: the dense tensor back, zeros where a bit is clear.

ActivationMemory's: ``to_bf16`` (the saturating bf16 copy of any tensor whose last dim is
contiguous, in one pass instead of a cast and a check of its result's largest magnitude),
``normalize_rows_bf16`` (LayerNorm's normalised input as that bf16 copy, one pass instead of
four), ``relu_bits`` (the activation and its 1-bit mask in one pass; ``relu_bits_`` over its
input, for the model's in-place ReLU),
``masked_grad`` (its backward straight from the bits), ``normalize_bf16`` (BatchNorm's
normalised input, saturated to bf16, in one pass instead of five) and ``bn_backward_bf16``
(BatchNorm's backward read straight from that bf16 copy: two passes instead of an fp32 upcast,
a mean and the dense backward's three); ``affine_clamp`` (the ReLU output a fused
BatchNorm -> ReLU -> Conv rebuilds from its fp32 input or bf16 ``x_hat``: one pass instead of
two to four).

Chunks run in parallel through ``at::parallel_for``; each chunk's write offset is the prefix
sum of the counts before it. The bitmap layout is :func:`sparsify_fx.passes.kernels.bitpack.pack_bits`'s, so either
side can be the PyTorch path.

The C++ lives in source files beside this module, so that editors, formatters and compiler
messages see real files and lines: ``cpu_dropit.cpp`` (DropIT's kernels),
``cpu_activation.cpp`` (ActivationMemory's), ``cpu_kernels.h`` (their declarations and shared
chunking) and ``cpu_module.cpp`` (the Python bindings). They ship as package data and are
compiled with ``torch.utils.cpp_extension.load`` the first time the kernels are asked for
(under a minute; then cached on disk under ``TORCH_EXTENSIONS_DIR``, in a folder named after
this CPU and the sources, so an edited or reinstalled source is rebuilt). Where that fails (no
C++ compiler) or ``SPARSIFY_FX_CPU_KERNELS=0`` is set, :func:`load` returns ``None`` and
DropIT runs its PyTorch path: same results, slower.

On torch releases whose ``cpp_extension`` still locks builds with a lock file's existence (not
an OS-level lock, as 2.15 has), a build killed midway leaves ``lock`` in the build folder and
the next process waits on it: delete
``~/.cache/torch_extensions/*/sparsify_fx_cpu_kernels_*/lock``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import warnings

import torch
from sparsify_fx.passes.kernels import sync
from sparsify_fx.passes.kernels.cache import eager

__all__ = ["load", "unavailable_reason", "for_tensors", "for_strided", "DTYPES"]

#: value dtypes the kernels take
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

#: the C++ sources, beside this file (package data, so a wheel has them too); the header's text
#: is part of the build's name as theirs is (:func:`_source_tag`)
_HERE = pathlib.Path(__file__)
_SOURCES = tuple(_HERE.with_name(f) for f in ("cpu_dropit.cpp", "cpu_activation.cpp",
                                                "cpu_module.cpp"))
_HEADERS = (_HERE.with_name("cpu_kernels.h"),)


def _ninja_on_path() -> None:
    """cpp_extension runs ``ninja`` from PATH; the pip package's binary may not be on it."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])


def _cpu_tag() -> str:
    """A short hash of this CPU's model and feature flags (Linux; else the machine name)."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            text += "".join(line for line in f if line.startswith(("flags", "model name")))
    except OSError:
        pass
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def _source_tag() -> str:
    """A short hash of the C++ sources' paths and text, which the build folder is named after:
    ninja rebuilds a source only when its modification time is newer than the object's, which a
    reinstalled (older-dated) copy need not be, and two checkouts sharing one folder would
    rebuild each other's build on every start (the source paths are in its commands)."""
    digest = hashlib.sha1()
    for path in (*_SOURCES, *_HEADERS):
        digest.update(str(path).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


_reason: str | None = None


@functools.cache
def load():
    """The compiled kernels module, or ``None`` (then :func:`unavailable_reason` says why)."""
    global _reason
    _reason = None
    if os.environ.get("SPARSIFY_FX_CPU_KERNELS", "1") in ("0", "false", "off"):
        _reason = "disabled by SPARSIFY_FX_CPU_KERNELS=0"
        return None
    try:
        _ninja_on_path()
        # importing cpp_extension logs "No CUDA runtime is found" on CPU-only hosts
        logger = logging.getLogger("torch.utils.cpp_extension")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            from torch.utils.cpp_extension import load as build
        finally:
            logger.setLevel(level)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # built where it runs, so -march=native is safe; the build is named after this
            # CPU's features, so a cache shared with another kind of machine never loads it
            return build(
                name=f"sparsify_fx_cpu_kernels_{_cpu_tag()}_{_source_tag()}",
                sources=[str(p) for p in _SOURCES],
                extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False,
            )
    except Exception as e:  # no compiler, headers or ninja: the PyTorch path runs instead
        _reason = f"the C++ kernels did not build ({type(e).__name__}: {str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''})"
        return None


def unavailable_reason() -> str | None:
    """Why :func:`load` returned ``None`` (after it was called), else ``None``."""
    return _reason


def for_tensors(*tensors: torch.Tensor, bits: torch.Tensor | None = None):
    """The kernels, where they apply to all of ``tensors`` and the bitmap ``bits``: eager
    (never traced or fake) contiguous CPU tensors, ``tensors`` of a dtype in :data:`DTYPES` and
    ``bits`` ``uint8``, on a device where a value read back is free
    (:func:`sparsify_fx.passes.kernels.sync.sync_free`: the kernels read counts back). Else ``None``, and the caller
    runs its PyTorch path, which computes the same bits."""
    if bits is not None and (bits.dtype != torch.uint8 or not _usable(bits)):
        return None
    for t in tensors:
        if t.dtype not in DTYPES or not _usable(t):
            return None
    return load()


def for_strided(t: torch.Tensor):
    """The kernels for ``to_bf16`` on ``t``: as :func:`for_tensors`, but any layout whose last
    dim has stride 1 (a view of a larger tensor), fp32 only; else ``None``."""
    if t.dtype != torch.float32 or t.dim() == 0 or t.stride(-1) != 1 or not _usable(t, contiguous=False):
        return None
    return load()


def _usable(t: torch.Tensor, contiguous: bool = True) -> bool:
    return (t.device.type == "cpu" and not sync.sync_free(t.device) and (t.is_contiguous() or not contiguous)
            and eager(t))
