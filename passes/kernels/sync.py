"""Host-device synchronisation in the passes' custom ops: where to avoid it.

A value read back from the device (``int(t)``, ``bool(t)``, ``t[mask]``, ``nonzero``) costs
nothing on CPU, and there it buys shortcuts: DropIT's exact over-capacity fallback, the bf16
cast's skipped clamp. On an accelerator each read stalls the queue until every kernel before
it has run, and the host cannot launch ahead. An H100 ResNet-50 step with 62 such reads in
DropIT and 53 in ActivationMemory's bf16 check ran 4.5-8.5x the dense step
(``benchmarks/run_gpu.sh memory``), where the same recipes run 1.1-1.5x on CPU. There the ops
take static-shape, read-free paths instead; ``tests/test_sync_free.py`` runs whole training
steps on them and fails on any read.
"""

from __future__ import annotations

import torch

__all__ = ["sync_free"]


def sync_free(device: torch.device) -> bool:
    """Whether ops on ``device`` must avoid device-to-host reads (every device but the CPU)."""
    return device.type != "cpu"
