"""RigL (Evci et al. 2020): drop-and-grow updates of the masks of an IsoFLOP-rewritten model."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from sparsify_fx.passes.iso_flop.masks import MaskedWeight, masked_weights, rigl_update_

from sparsify_fx import ConfigError, check_range

__all__ = ["RigL"]


class RigL:
    """RigL mask updates (Evci et al. 2020) for every :class:`MaskedWeight` of a model, stepped
    by hand after each optimizer step (the optimizer-state reset below needs the optimizer).

    ``IsoFLOP`` runs the same updates inside the rewritten modules by default
    (``dynamic=True``); building this object turns that off for the layers it drives.

    Every ``update_every`` steps until ``stop_fraction * total_steps``, each masked weight
    drops its ``f * nnz`` active weights of smallest ``|w|`` and grows as many inactive ones of
    largest dense ``|grad|`` (grown weights start at zero), with
    ``f = drop_fraction * (1 + cos(pi * step / stop_step)) / 2``. The number of active weights
    per layer never changes. Ties break by index (stable sorts), so identical gradients give
    identical masks on every rank.

    Distributed: the dense gradient (including masked positions) is captured by a hook on the
    effective weight, which DDP does not all-reduce, so when ``torch.distributed`` is
    initialised ``step()`` averages it over ranks itself before choosing; DDP's own
    all-reduce already covers the parameters' ``.grad``.

    Args:
        model: a module rewritten by ``IsoFLOP``.
        drop_fraction: initial fraction of active weights replaced per update, in (0, 1].
        update_every: steps between updates.
        stop_fraction: fraction of ``total_steps`` after which masks are frozen.
        total_steps: planned number of optimizer steps.
        optimizer: if given, its per-parameter state (momentum, Adam moments) is zeroed at
            every dropped and grown position, so stale state cannot move masked weights.

    Example:
        >>> import torch, sparsify_fx as sfx
        >>> from sparsify_fx.passes.iso_flop import RigL
        >>> m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16),
        ...                         torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> fast = sfx.sparsify(m, sfx.IsoFLOP(kind="doped", dynamic=False), verify=False)
        >>> opt = torch.optim.SGD(fast.parameters(), lr=0.1)
        >>> rigl = RigL(fast, update_every=1, total_steps=4)
        >>> fast(torch.randn(4, 8)).sum().backward(); opt.step(); rigl.step()
        >>> rigl.updates
        1
    """

    def __init__(
        self,
        model: nn.Module,
        drop_fraction: float = 0.3,
        update_every: int = 100,
        stop_fraction: float = 0.75,
        total_steps: int = 1000,
        optimizer: torch.optim.Optimizer | None = None,
    ):
        check_range(self, "drop_fraction", drop_fraction, 0.0, 1.0, low_open=True)
        check_range(self, "stop_fraction", stop_fraction, 0.0, 1.0, low_open=True)
        for name, value in (("update_every", update_every), ("total_steps", total_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"RigL.{name} must be a positive int, got {value!r}")
        self.layers = masked_weights(model)
        if not self.layers:
            raise ConfigError("RigL found no masked weights in the model; rewrite it with sfx.IsoFLOP first")
        for _, m in self.layers:
            m.dynamic = False  # this object drives the schedule instead of the modules
        self.drop_fraction = drop_fraction
        self.update_every = update_every
        self.stop_step = max(1, int(stop_fraction * total_steps))
        self.optimizer = optimizer
        self.step_count = 0
        self.updates = 0
        self._arm()

    def drop_fraction_at(self, step: int) -> float:
        """Cosine-annealed drop fraction at ``step`` (0 from ``stop_step`` on)."""
        if step >= self.stop_step:
            return 0.0
        return self.drop_fraction * (1 + math.cos(math.pi * step / self.stop_step)) / 2

    def _is_update_step(self, step: int) -> bool:
        return step > 0 and step % self.update_every == 0 and step < self.stop_step

    def _arm(self) -> None:
        # the dense gradient costs a weight-sized copy: only keep it for the backward of a
        # step whose step() will update the masks
        want = self._is_update_step(self.step_count + 1)
        for _, m in self.layers:
            m.capture_dense_grad = want
            if not want:
                m.dense_grad = None

    def step(self) -> None:
        """Call once after each ``optimizer.step()``."""
        self.step_count += 1
        if self._is_update_step(self.step_count):
            fraction = self.drop_fraction_at(self.step_count)
            for _, m in self.layers:
                self._update(m, fraction)
            self.updates += 1
        self._arm()

    def _update(self, m: MaskedWeight, fraction: float) -> None:
        grad = m.dense_grad
        if grad is None:
            return  # the layer did not run this step
        changed = rigl_update_(m, grad, fraction)
        m.dense_grad = None
        if changed is None or self.optimizer is None:
            return
        changed_mask = torch.zeros(m.mask.numel(), dtype=torch.bool, device=m.mask.device)
        changed_mask[torch.cat(changed)] = True
        with torch.no_grad():
            for param, sel in m.in_storage(changed_mask.view(m.mask.shape)):
                for value in self.optimizer.state.get(param, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == param.shape:
                        value.masked_fill_(sel, 0)
