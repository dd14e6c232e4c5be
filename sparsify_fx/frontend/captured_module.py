"""What a captured GraphModule is: the model's module tree and state, shared, kept shared.

A capture replaces (parts of) a model by ``fx.GraphModule`` s. These helpers make such a
GraphModule a faithful stand-in for the module it replaces: the same module tree, parameters
and buffers (so ``state_dict`` keys are identical and tensors stay shared with the original
model), the module's own hooks, and device / dtype conversions, copies and pickles that do
not silently end the sharing or drop what ``fx.GraphModule`` would drop.
"""

from __future__ import annotations

import copy
import inspect
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

__all__ = ["make_graph_module", "mirror_tree", "convert_buffers_in_place", "SharedStateGraphModule"]


def mirror_tree(gm: fx.GraphModule, root: nn.Module) -> None:
    """Make gm's module tree, parameters and buffers exactly root's (state_dict keys kept)."""
    extra_modules = [(k, v) for k, v in gm._modules.items() if k not in root._modules]
    gm._modules = OrderedDict(list(root._modules.items()) + extra_modules)
    extra_buffers = {k: v for k, v in gm._buffers.items() if k not in root._buffers}
    gm._parameters = OrderedDict(root._parameters)
    gm._buffers = OrderedDict(list(root._buffers.items()) + list(extra_buffers.items()))
    # tensor constants the tracer lifted are not state: keep them out of state_dict
    gm._non_persistent_buffers_set = set(root._non_persistent_buffers_set) | set(extra_buffers)


def convert_buffers_in_place(module: nn.Module, fn: Callable) -> None:
    """Apply a ``.to()`` / ``.cuda()`` / ``.double()`` conversion to every buffer in place.

    ``nn.Module._apply`` converts parameters in place (``param.data = fn(param)``) but *replaces*
    buffers, which would silently end the sharing with the original model: the result would
    train its own BatchNorm statistics and leave the original half moved (parameters converted,
    buffers not). Converting buffers in place first keeps every tensor shared; the replacement
    ``_apply`` then makes is a no-op (``fn`` of an already converted tensor is that tensor).
    """
    with torch.no_grad():
        for m in module.modules():
            for buf in m._buffers.values():
                if buf is not None:
                    new = fn(buf)
                    if new is not buf:
                        if buf.is_meta != new.is_meta:
                            # to_empty() of a meta model: a meta tensor has no storage to
                            # share, and set_data refuses it; _apply replaces the buffer
                            continue
                        buf.data = new


class SharedStateGraphModule(fx.GraphModule):
    """A captured GraphModule whose device / dtype conversions keep buffers shared with the
    original model (see :func:`convert_buffers_in_place`), and whose copies and pickles keep
    what ``fx.GraphModule`` would drop: forward hooks carried from the model, the
    ``sfx_record`` and the model's plain attributes."""

    def _apply(self, fn: Callable, recurse: bool = True) -> nn.Module:
        if recurse:
            convert_buffers_in_place(self, fn)
        return super()._apply(fn, recurse)

    def __deepcopy__(self, memo: dict) -> fx.GraphModule:
        res = super().__deepcopy__(memo)
        # GraphModule.__init__ keeps only what the graph references (and state-dict hooks)
        for key, value in self.__dict__.items():
            if key not in res.__dict__ or (key in _HOOK_DICTS and value):
                res.__dict__[key] = copy.deepcopy(value, memo)
        return res

    def __reduce__(self) -> tuple[Any, ...]:
        _, (body, import_block) = super().__reduce__()
        return (_rebuild_captured, (body, import_block))


def _rebuild_captured(body: dict[str, Any], import_block: str) -> fx.GraphModule:
    """Unpickle a :class:`SharedStateGraphModule` (fx's own reducer returns a plain
    GraphModule without the hooks)."""
    from torch.fx.graph_module import _deserialize_graph_module, _forward_from_src

    forward = _forward_from_src(import_block + (body.get("_code") or body["code"]), {})
    if not _constructible_without_arguments(body.get("_tracer_cls")):
        # torch.export's graphs name a tracer that takes arguments (torch 2.11's
        # _ModuleStackTracer); fx re-traces the saved code with it, and the plain Tracer
        # re-traces that code the same
        body = {**body, "_tracer_cls": None}
    gm = _deserialize_graph_module(forward, body, graph_module_cls=SharedStateGraphModule)
    for key in _HOOK_DICTS:
        if body.get(key):
            gm.__dict__[key] = body[key]
    return gm


def _constructible_without_arguments(cls: type | None) -> bool:
    if cls is None:
        return True
    try:
        inspect.signature(cls).bind()
    except (TypeError, ValueError):
        return False
    return True


_HOOK_DICTS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
    "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


def _carry_hooks(gm: nn.Module, module: nn.Module) -> None:
    """The traced module's own hooks run around its forward, which tracing does not see: the
    GraphModule replacing it must run them (forward hooks on the root model, state-dict hooks)."""
    for name in _HOOK_DICTS:
        hooks = module.__dict__.get(name)
        if hooks:
            gm.__dict__[name] = type(hooks)(hooks)
    if module.__dict__.get("_is_full_backward_hook") is not None:
        gm._is_full_backward_hook = module._is_full_backward_hook


def make_graph_module(module: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    gm = SharedStateGraphModule(module, graph, class_name=type(module).__name__)
    mirror_tree(gm, module)
    _carry_hooks(gm, module)
    gm.training = module.training
    return gm
