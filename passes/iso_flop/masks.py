"""Masked weights: a weight times its boolean mask, and the helpers that build and re-apply
masks. Multiplying in forward keeps every gradient outside the mask zero."""

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
]


class MaskedWeight(nn.Module):
    """A weight and its boolean mask; ``forward()`` returns ``weight * mask``.

    Multiplying in forward (instead of masking the stored weight once) makes every gradient
    outside the mask exactly zero, so masked weights stay zero through optimizer steps.
    When ``capture_dense_grad`` is set (by :class:`RigL`), the gradient of the *effective*
    weight, dense including the masked positions, is kept in ``dense_grad``.
    """

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.register_buffer("mask", mask.to(torch.bool))
        self.capture_dense_grad = False
        self.dense_grad: torch.Tensor | None = None

    @property
    def nnz(self) -> int:
        """Number of active (unmasked) weights."""
        return int(self.mask.sum())

    @property
    def density(self) -> float:
        return self.nnz / self.mask.numel()

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}, density={self.density:.4f}"

    def forward(self) -> torch.Tensor:
        effective = self.weight * self.mask
        if self.capture_dense_grad and effective.requires_grad:
            effective.register_hook(self._keep_dense_grad)
        return effective

    def _keep_dense_grad(self, grad: torch.Tensor) -> None:
        grad = grad.detach()
        self.dense_grad = grad.clone() if self.dense_grad is None else self.dense_grad + grad


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
            outside = ~m.mask & (m.weight != 0)
            changed += int(outside.sum())
            m.weight.mul_(m.mask)
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
