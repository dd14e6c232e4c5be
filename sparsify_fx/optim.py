"""Optimizers and rewritten models: which parameters are shared, which ones a pass added.

:func:`sparsify_fx.sparsify` shares every parameter of the original model, so an optimizer
built on ``model.parameters()`` keeps training the rewritten module. Passes that add
parameters (``IsoFLOP``'s masked weights and low-rank factors, under ``sfx_ops.*``) are not in
such an optimizer: either build the optimizer on the rewritten module (``fast.parameters()``
covers both) or add them with :func:`extend_optimizer`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

__all__ = ["new_parameters", "extend_optimizer"]


def new_parameters(original: nn.Module, rewritten: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Parameters of ``rewritten`` that ``original`` does not have (by identity), with names.

    Args:
        original: the model given to :func:`sparsify_fx.sparsify`.
        rewritten: the module it returned.

    Returns:
        ``(qualified name, parameter)`` pairs, in ``rewritten.named_parameters()`` order.

    Example:
        >>> import torch, sparsify_fx as sfx
        >>> m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> fast = sfx.sparsify(m, sfx.DropIT(keep=0.5), example_inputs=(torch.randn(4, 8),))
        >>> sfx.new_parameters(m, fast)
        []
    """
    shared = {id(p) for p in original.parameters()}
    return [(n, p) for n, p in rewritten.named_parameters() if id(p) not in shared]


def extend_optimizer(
    optimizer: torch.optim.Optimizer, rewritten: nn.Module, **group_options: Any
) -> list[str]:
    """Add the parameters of ``rewritten`` that ``optimizer`` does not hold yet, as one group.

    Use it when the optimizer was built on the original model before :func:`sparsify_fx.sparsify`
    (shared parameters are already there; a pass like ``IsoFLOP`` adds new ones). The new group
    takes the optimizer's defaults, overridden by ``group_options`` (``lr=...``,
    ``weight_decay=...``). Idempotent: a second call adds nothing.

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        rewritten: the module returned by ``sparsify`` (or any module).
        **group_options: options of the added parameter group.

    Returns:
        The qualified names of the parameters added (empty if none).

    Example:
        >>> import torch, sparsify_fx as sfx
        >>> m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16),
        ...                         torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> opt = torch.optim.SGD(m.parameters(), lr=0.1)
        >>> fast = sfx.sparsify(m, sfx.IsoFLOP(kind="doped", init="random"), verify=False)
        >>> len(sfx.extend_optimizer(opt, fast)) > 0
        True
        >>> sfx.extend_optimizer(opt, fast)
        []
    """
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    added = [(n, p) for n, p in rewritten.named_parameters() if id(p) not in held]
    if added:
        optimizer.add_param_group({"params": [p for _, p in added], **group_options})
    return [n for n, _ in added]
