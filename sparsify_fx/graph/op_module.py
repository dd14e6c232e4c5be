"""What an op module (the ``nn.Module`` a pass installs under ``gm.sfx_ops``) tells the core.

The memory plan (``sfx.memory_plan``) and the compile backend (``sfx.backend``) cannot look
inside an op module's autograd function, so each op module declares what its backward holds
and how it must run by subclassing :class:`OpModule` and overriding the class attributes
below (or setting them per instance in ``__init__`` when they depend on the config).

A module installed under ``gm.sfx_ops`` that is not an :class:`OpModule` is read with the
defaults: its backward keeps its tensor inputs dense, like the eager op it replaced.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["OpModule"]


class OpModule(nn.Module):
    """Base class of the op modules passes install; the class attributes are its contract.

    Attributes:
        keeps_dense_inputs: backward holds the module's tensor inputs as they are (the memory
            plan counts them dense). ``False`` when it keeps only a compressed form, whose
            bytes the pass reports in its :class:`~sparsify_fx.Rewrite`.
        keeps_output: backward also holds the module's output dense (an attention kept for
            its flash backward); read only when ``keeps_dense_inputs`` is ``False``.
        host_side: in training the module must run in Python on every call (SliceOut draws a
            window per step); the compile backend refuses to hand a training graph holding one
            to an AOTAutograd backend, which would bake its first result into the code.
        recasts_weight: under autocast the module takes the fp32 weight and casts it itself,
            in forward and again in backward, so the backward keeps the parameter (held
            anyway) instead of autocast's low-precision copy (the memory plan counts none).
        casts_operands: under autocast the module casts its floating-point inputs to the
            autocast dtype first, so the inputs it keeps (``keeps_dense_inputs``) are those
            casts: the memory plan counts an fp32 input at the autocast dtype's width.

    Example:
        >>> import torch, sparsify_fx as sfx
        >>> class HalfInput(sfx.OpModule):
        ...     keeps_dense_inputs = False  # backward keeps a bf16 copy, reported by the pass
        ...     def forward(self, x):
        ...         return x
        >>> HalfInput().keeps_output, HalfInput().host_side
        (False, False)
    """

    keeps_dense_inputs: bool = True
    keeps_output: bool = False
    host_side: bool = False
    recasts_weight: bool = False
    casts_operands: bool = False

    def reinitialize(self) -> None:
        """Called once by :func:`sparsify_fx.sparsify` after verification (also when it does
        not verify): a module verified with a function-preserving initialisation draws the
        initialisation its config asks for here (IsoFLOP's ``init="random"``). No-op unless
        overridden; the pass's Rewrite details say what it does."""

    def stat_bytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        """Bytes backward keeps beside the tensors above (a normalisation's statistics) for an
        input of ``shape`` / ``dtype``; 0 unless the module overrides it."""
        return 0
