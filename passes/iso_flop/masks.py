"""Masked weights: a weight times its boolean mask, the RigL schedule that evolves the mask
during training, and the helpers that build and re-apply masks. Multiplying in forward keeps
every gradient outside the mask zero."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = [
    "MaskedWeight",
    "masked_weights",
    "apply_masks_",
    "random_mask",
    "topk_mask",
    "kaiming_uniform",
    "rigl_update_",
]


class MaskedWeight(nn.Module):
    """A weight and its boolean mask; ``forward()`` returns ``weight * mask`` in the op's layout.

    The full-layout weight is one of:

    * ``weight`` alone (a new parameter, or the replaced layer's own parameter, so the
      original weight stays a live part of the model; ``transposed`` when it is stored as the
      transpose of the op's layout, as a ``x @ W`` matmul weight is);
    * ``weight`` with ``kept`` placed in its leading block ``[:a, :b]`` (wide / factorized: the
      original weight is the kept block of a larger one; the block of ``weight`` under it
      is never read).

    Multiplying in forward (instead of masking the stored weight once) makes every gradient
    outside the mask exactly zero, so masked weights stay zero through optimizer steps.

    Mask evolution (RigL, Evci et al. 2020) runs inside the module when ``dynamic`` is set:
    the buffer ``rigl_step`` counts training forwards (``self.training`` and grad enabled);
    the forward numbered a multiple of ``update_every`` (below ``stop_at``) keeps the dense
    gradient of its effective weight, and the next training forward, i.e. after the
    optimizer step, drops the ``f * nnz`` active weights of smallest ``|w|`` and grows as many
    inactive ones of largest dense ``|grad|`` (grown weights start at zero), with ``f`` the
    drop fraction annealed by a cosine to 0 at ``stop_at`` (constant without ``stop_at``). The
    number of active weights never changes; ties break by index, and under
    ``torch.distributed`` the dense gradient is averaged over ranks first, so every rank
    chooses the same mask. ``mask`` and ``rigl_step`` are buffers: they are in the
    ``state_dict`` and a resumed run continues the schedule.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        mask: torch.Tensor,
        *,
        kept: nn.Parameter | None = None,
        transposed: bool = False,
        target_nnz: int | None = None,
    ):
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        self.kept = kept
        if kept is not None and kept.numel() == self.weight.numel():
            # the replaced weight is the whole layout (a factor no larger than the layer): ``weight``
            # is never read, so it is frozen, not left a trainable parameter that gets no gradient
            self.weight.requires_grad_(False)
        self.transposed = transposed
        self.register_buffer("mask", mask.to(torch.bool))
        self.register_buffer("rigl_step", torch.zeros((), dtype=torch.long))
        # the replaced layer's parameter: its values are the caller's and are never re-drawn
        self.owns_values = not (kept is None and isinstance(weight, nn.Parameter))
        self.target_nnz = int(self.mask.sum()) if target_nnz is None else int(target_nnz)
        self.dynamic = False
        self.update_every = 100
        self.drop_fraction = 0.3
        self.stop_at: int | None = None
        self.capture_dense_grad = False
        self.dense_grad: torch.Tensor | None = None
        self._step: int | None = None  # host copy of rigl_step (no device sync per forward)
        self._pending: int | None = None  # step whose dense gradient awaits its update

    def set_schedule(self, dynamic: bool, update_every: int, drop_fraction: float, stop_at: int | None) -> None:
        self.dynamic, self.update_every = dynamic, update_every
        self.drop_fraction, self.stop_at = drop_fraction, stop_at

    # ------------------------------------------------------------ layout

    @property
    def shape(self) -> torch.Size:
        return self.mask.shape

    def _block(self) -> tuple[int, int]:
        assert self.kept is not None
        k = self.kept.t() if self.transposed else self.kept
        return k.shape[0], k.numel() // k.shape[0] // max(1, math.prod(self.mask.shape[2:]))

    def _kept_view(self) -> torch.Tensor:
        """``kept`` in the op's layout of its block (a view: writable)."""
        assert self.kept is not None
        k = self.kept.t() if self.transposed else self.kept
        a, b = self._block()
        return k.view(a, b, *self.mask.shape[2:]) if not self.transposed else k

    def full(self) -> torch.Tensor:
        """The full-layout weight (differentiable), before masking."""
        if self.kept is None:
            return self.weight.t() if self.transposed else self.weight
        a, b = self._block()
        k = self._kept_view()
        top = torch.cat([k, self.weight[:a, b:]], 1) if b < self.weight.shape[1] else k
        return torch.cat([top, self.weight[a:]], 0) if a < self.weight.shape[0] else top

    def in_storage(self, where: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """``where`` (a bool tensor of the full layout) in the layout of each stored
        parameter: ``[(param, where_in_param)]``."""
        if self.kept is None:
            return [(self.weight, where.t() if self.transposed else where)]
        a, b = self._block()
        block = where[:a, :b]
        block = block.t() if self.transposed else block.reshape(self.kept.shape)
        return [(self.weight, where), (self.kept, block)]

    @torch.no_grad()
    def zero_where_(self, where: torch.Tensor) -> None:
        """Zero the stored weights at ``where`` (a bool tensor of the full layout)."""
        for param, sel in self.in_storage(where):
            param.masked_fill_(sel, 0)

    # ------------------------------------------------------------ counts

    @property
    def nnz(self) -> int:
        """Number of active (unmasked) weights."""
        return int(self.mask.sum())

    @property
    def density(self) -> float:
        return self.nnz / self.mask.numel()

    def extra_repr(self) -> str:
        parts = [f"shape={tuple(self.mask.shape)}", f"density={self.density:.4f}"]
        if self.kept is not None:
            parts.append(f"kept_block={self._block()}")
        if self.dynamic:
            parts.append(f"rigl(update_every={self.update_every}, drop_fraction={self.drop_fraction}, "
                         f"stop_at={self.stop_at})")
        return ", ".join(parts)

    # ------------------------------------------------------------ forward and schedule

    def forward(self) -> torch.Tensor:
        if self.dynamic and self.training and torch.is_grad_enabled():
            self._advance()
        effective = self.full() * self.mask
        if self.capture_dense_grad and effective.requires_grad:
            effective.register_hook(self._keep_dense_grad)
        return effective

    def drop_fraction_at(self, step: int) -> float:
        """Drop fraction of the update at ``step``: cosine-annealed to 0 at ``stop_at``."""
        if self.stop_at is None:
            return self.drop_fraction
        if step >= self.stop_at:
            return 0.0
        return self.drop_fraction * (1 + math.cos(math.pi * step / self.stop_at)) / 2

    def _advance(self) -> None:
        if self._pending is not None:
            # the previous training forward kept its dense gradient; the optimizer has stepped
            if self.dense_grad is not None:
                rigl_update_(self, self.dense_grad, self.drop_fraction_at(self._pending))
            self._pending, self.dense_grad = None, None
        if self._step is None:
            self._step = int(self.rigl_step)
        self._step += 1
        self.rigl_step.add_(1)
        step = self._step
        update = step % self.update_every == 0 and (self.stop_at is None or step < self.stop_at)
        self.capture_dense_grad = update
        if update:
            self._pending = step

    def _keep_dense_grad(self, grad: torch.Tensor) -> None:
        grad = grad.detach()
        self.dense_grad = grad.clone() if self.dense_grad is None else self.dense_grad + grad

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # a checkpoint brings its own step: re-read it, and drop a half-done update
        self._step, self._pending, self.dense_grad, self.capture_dense_grad = None, None, None, False

    # ------------------------------------------------------------ initialisation

    @torch.no_grad()
    def randomize_(self, gen: torch.Generator) -> None:
        """A uniform random mask of ``target_nnz`` weights; new weights kaiming-uniform (the
        replaced layer's own values, when this holds them, are kept: for a model trained from
        scratch they are its random initialisation)."""
        mask = random_mask(self.mask.shape, self.target_nnz, gen).to(self.mask.device)
        if self.owns_values:
            values = kaiming_uniform(tuple(self.mask.shape), gen).to(self.weight)
            target = self.weight.t() if self.transposed and self.kept is None else self.weight
            target.copy_(values)
            if self.kept is not None:
                a, b = self._block()
                self.weight[:a, :b] = 0  # under the kept block: never read
        self.mask.copy_(mask)
        self.rigl_step.zero_()
        self._step, self._pending, self.dense_grad = None, None, None


def rigl_update_(m: MaskedWeight, grad: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One RigL drop-and-grow update of ``m``'s mask from its dense gradient ``grad``; returns
    the flat (dropped, grown) positions, or None when nothing changed."""
    with torch.no_grad():
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            grad = grad.clone()
            torch.distributed.all_reduce(grad)
            grad /= torch.distributed.get_world_size()
        mask = m.mask.flatten()
        active = int(mask.sum())
        k = min(int(fraction * active), mask.numel() - active)
        if k <= 0:
            return None
        weight = m.full().detach().flatten()
        inf = torch.tensor(float("inf"), device=weight.device)
        drop_score = torch.where(mask, weight.abs().float(), inf)
        dropped = torch.argsort(drop_score, stable=True)[:k]
        new_mask = mask.clone()
        new_mask[dropped] = False
        grow_score = torch.where(new_mask, -inf, grad.flatten().abs().float())
        grown = torch.argsort(-grow_score, stable=True)[:k]
        new_mask[grown] = True
        zero = ~new_mask
        zero[grown] = True  # grown weights start at zero
        m.zero_where_(zero.view(m.mask.shape))
        m.mask.copy_(new_mask.view(m.mask.shape))
        return dropped, grown


def masked_weights(model: nn.Module) -> list[tuple[str, MaskedWeight]]:
    """Every :class:`MaskedWeight` of ``model`` with its qualified name."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MaskedWeight)]


def apply_masks_(model: nn.Module) -> int:
    """Zero every stored weight outside its mask (in place); returns how many were nonzero.

    Forward already applies the masks; this keeps the *stored* tensors sparse too (after
    loading weights from elsewhere, or when optimizer state moved masked entries).
    """
    changed = 0
    with torch.no_grad():
        for _, m in masked_weights(model):
            outside = ~m.mask & (m.full() != 0)
            changed += int(outside.sum())
            m.zero_where_(~m.mask)
    return changed


def random_mask(shape: torch.Size | tuple[int, ...], nnz: int, gen: torch.Generator) -> torch.Tensor:
    """Exactly ``nnz`` active positions, uniformly at random (seeded: same on every rank)."""
    numel = math.prod(shape)
    mask = torch.zeros(numel, dtype=torch.bool)
    if nnz >= numel:
        mask[:] = True
    elif nnz > 0:
        # top-k of uniform scores is a uniform k-subset, and much faster than randperm
        mask[torch.rand(numel, generator=gen).topk(nnz, sorted=False).indices] = True
    return mask.view(shape)


def topk_mask(values: torch.Tensor, nnz: int) -> torch.Tensor:
    """Mask of the ``nnz`` largest ``|values|``."""
    flat = values.detach().abs().flatten()
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if nnz >= flat.numel():
        mask[:] = True
    elif nnz > 0:
        mask[flat.topk(nnz, sorted=False).indices] = True
    return mask.view(values.shape)


def kaiming_uniform(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    # nn.Linear / nn.Conv default: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    bound = 1.0 / math.sqrt(max(1, fan_in))
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)
