"""Fixed (non-tensor) forward arguments of a captured graph: which are fixed at capture, how
they keep their names, how a later call with another value is refused, and the quieting of
torch.fx's own traceback.

``symbolic_trace`` bakes every non-tensor argument (and every argument the caller did not pass)
into the graph as a constant (``concrete_args``). Each one keeps its own name here, defaults to
the captured value, and :func:`check_fixed_argument` raises a :class:`CaptureError` naming the
argument, both values and the fix (``example_kwargs=``) where fx would raise a bare
``AssertionError``. Export graphs get the same contract from :class:`CapturedArguments`, a
forward pre-hook.
"""

from __future__ import annotations

import enum
import inspect
import io
import math
import operator
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from sparsify_fx.errors import CaptureError

__all__ = ["CapturedArguments", "check_fixed_argument", "quiet_fx_traceback"]


def _concrete_args_for(
    module: nn.Module, args: tuple, kwargs: dict[str, Any]
) -> dict[str, Any] | None:
    """Fix the forward arguments the caller did not pass (their defaults) and non-tensors."""
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return None
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise CaptureError(
            f"example inputs do not match {type(module).__name__}.forward{sig}: {e}. "
            "Pass example_inputs=(...) positionally and keyword inputs as example_kwargs={...}."
        ) from e
    concrete: dict[str, Any] = {}
    for name, param in sig.parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            if name in bound.arguments and bound.arguments[name]:
                return None  # *args/**kwargs actually used: let fx handle it plainly
            continue
        if name in bound.arguments:
            value = bound.arguments[name]
            if not isinstance(value, torch.Tensor) and not _holds_tensor(value):
                concrete[name] = value
        elif param.default is not inspect.Parameter.empty:
            concrete[name] = param.default
    return concrete


def _representable(value: Any) -> bool:
    """A value fx can write into generated code (a default or a constant argument)."""
    if value is None or isinstance(value, (bool, int, str, enum.Enum, torch.dtype)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        return all(_representable(v) for v in value)
    return False


@torch.fx.node.has_side_effect
def check_fixed_argument(received: Any, captured: Any, name: str, owner: str) -> None:
    """Raise a :class:`CaptureError` when a call passes another value than the one the graph
    was captured with (non-tensor arguments are constants of the graph)."""
    if isinstance(received, fx.Proxy):
        # fx re-traces the generated code when a GraphModule is unpickled: keep the check
        received.tracer.create_proxy("call_function", check_fixed_argument, (received, captured, name, owner), {})
        return
    if _same_value(received, captured):
        return
    if isinstance(received, torch.Tensor):
        shown = f"a Tensor{list(received.shape)}"
        fix = (f"capture with example_kwargs={{{name!r}: <a tensor like it>}} so that it is an "
               "input of the graph")
    else:
        shown = repr(received)
        fix = (f"capture with example_kwargs={{{name!r}: {received!r}}} (a non-tensor value is a "
               "constant of the graph: one sparsify per value)")
    raise CaptureError(
        f"{owner}.forward was captured with {name}={captured!r}, fixed in the captured graph; "
        f"this call passed {name}={shown}: {fix}."
    )


def _same_value(received: Any, captured: Any) -> bool:
    if isinstance(received, torch.Tensor) or isinstance(captured, torch.Tensor):
        return False
    try:
        return received is captured or bool(received == captured)
    except Exception:  # noqa: BLE001 - a value whose == cannot answer is not the same value
        return False


def _traced_argument_names(module: nn.Module) -> list[str]:
    """The forward arguments in the order fx makes their placeholders (``*args`` and
    ``**kwargs`` after the keyword-only ones)."""
    fn = inspect.unwrap(type(module).forward)
    code = fn.__code__
    total = code.co_argcount + code.co_kwonlyargcount
    names = list(code.co_varnames[1:total])
    rest = iter(code.co_varnames[total:])
    if code.co_flags & inspect.CO_VARARGS:
        names.append("*" + next(rest))
    if code.co_flags & inspect.CO_VARKEYWORDS:
        names.append("**" + next(rest))
    return names


def _fx_checks(ph: fx.Node) -> list[fx.Node] | None:
    """The nodes of fx's own check of a fixed argument's placeholder (``eq = ph == value;
    torch._assert(eq, msg)`` or ``_assert_is_none(ph, msg)``), in erasable order; None when
    the placeholder has another use."""
    dead: list[fx.Node] = []
    for user in ph.users:
        if user.target is torch.fx._symbolic_trace._assert_is_none and not user.users:
            dead.append(user)
        elif (user.target is operator.eq and user.users
              and all(u.target is torch._assert and not u.users for u in user.users)):
            dead.extend([*user.users, user])
        else:
            return None
    return dead


def _name_fixed_arguments(graph: fx.Graph, module: nn.Module, concrete: dict[str, Any]) -> None:
    """Give each argument fx fixed (``concrete_args``) one placeholder of its own name, optional,
    defaulting to the captured value, and a check that raises a :class:`CaptureError` naming
    it when a call passes another value.

    fx names such placeholders ``scale_1`` (so ``gm(x, scale=0.5)`` is a TypeError), gives them
    the signature's default (so leaving out a keyword passed at capture fails) and checks them
    with a bare ``AssertionError``.
    """
    try:
        names = _traced_argument_names(module)
    except (AttributeError, TypeError):
        return
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    groups: list[tuple[str, list[fx.Node]]] = []
    i = 0
    for name in names:
        if name not in concrete:
            groups.append((name, placeholders[i:i + 1]))
            i += 1
            continue
        count = [0]

        def leaf(v: Any) -> Any:
            count[0] += 1
            return v

        torch.utils._pytree.tree_map(leaf, concrete[name])
        groups.append((name, placeholders[i:i + count[0]]))
        i += count[0]
    if i != len(placeholders):
        return  # not the layout fx makes: leave the graph as traced
    owner = type(module).__name__
    last = placeholders[-1] if placeholders else None
    checks: list[tuple[fx.Node, Any, str]] = []
    for name, nodes in groups:
        if name not in concrete or not nodes:
            continue
        checked = [_fx_checks(ph) for ph in nodes]
        if any(c is None for c in checked):
            continue  # the placeholder is used otherwise: keep it as traced
        value = concrete[name]
        with graph.inserting_before(nodes[0]):
            new = graph.placeholder(name.lstrip("*"), default_value=value if _representable(value) else None)
        for dead in checked:
            for node in dead:
                graph.erase_node(node)
        for ph in nodes:
            if last is ph:
                last = new
            graph.erase_node(ph)
        if _representable(value):
            checks.append((new, value, name))
    # an argument may only have a default when every later one has one
    seen_required = False
    for node in reversed([n for n in graph.nodes if n.op == "placeholder"]):
        if not node.args:
            seen_required = True
        elif seen_required and node.target in concrete:
            node.args = ()
    if checks and last is not None:
        with graph.inserting_after(last):
            for ph, value, name in reversed(checks):
                graph.call_function(check_fixed_argument, (ph, value, name, owner))
    graph.lint()


class CapturedArguments:
    """Forward pre-hook of an exported graph: its non-tensor arguments are constants of the
    graph (``torch.export`` ignores another value silently), and it takes exactly the
    arguments of the example call. A keyword given at capture may be left out (the captured
    value is used); another value, or an argument not given at capture, raises a
    :class:`CaptureError` naming ``example_kwargs``."""

    def __init__(self, module: nn.Module, args: tuple, kwargs: dict):
        self.owner = type(module).__name__
        try:
            params = list(inspect.signature(module.forward).parameters.values())
        except (TypeError, ValueError):
            params = []
        self.positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self.n_args = len(args)
        self.keywords = list(kwargs)
        # the captured non-tensor values, by argument name (positional ones by position)
        self.fixed: dict[str, Any] = {}
        for i, v in enumerate(args):
            if not _holds_tensor(v) and _representable(v):
                self.fixed[self.positional[i] if i < len(self.positional) else f"argument {i}"] = v
        for k, v in kwargs.items():
            if not _holds_tensor(v) and _representable(v):
                self.fixed[k] = v

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        args, kwargs = tuple(args), dict(kwargs)
        # positional values past the captured ones that name a captured keyword
        extra = args[self.n_args:]
        args = args[:self.n_args]
        for i, v in enumerate(extra, start=self.n_args):
            name = self.positional[i] if i < len(self.positional) else f"argument {i}"
            if name not in self.keywords or name in kwargs:
                self._not_captured(name)
            kwargs[name] = v
        for name in kwargs:
            if name not in self.keywords:
                self._not_captured(name)
        for i, v in enumerate(args):
            name = self.positional[i] if i < len(self.positional) else f"argument {i}"
            if name in self.fixed:
                check_fixed_argument(v, self.fixed[name], name, self.owner)
        for name in self.keywords:
            if name in kwargs:
                if name in self.fixed:
                    check_fixed_argument(kwargs[name], self.fixed[name], name, self.owner)
            elif name in self.fixed:
                kwargs[name] = self.fixed[name]
            else:
                raise CaptureError(
                    f"{self.owner} was captured with the keyword input {name!r} (example_kwargs); "
                    f"pass {name}=... on every call, or capture without it."
                )
        if len(args) < self.n_args:
            missing = self.positional[len(args):self.n_args]
            raise CaptureError(
                f"{self.owner} was captured with {self.n_args} positional input(s) "
                f"({', '.join(self.positional[:self.n_args])}); this call passed {len(args)} "
                f"(missing {', '.join(missing)}). Pass every example input on each call."
            )
        return args, kwargs

    def _not_captured(self, name: str) -> None:
        raise CaptureError(
            f"{self.owner} was captured without the argument {name!r} (its default was fixed in the "
            f"graph); capture with example_kwargs={{{name!r}: ...}} to call it with that argument."
        )


class _DropFxTraceback(io.TextIOBase):
    """stderr without the generated-code excerpt fx prints for an exception raised inside a
    GraphModule (the exception itself still propagates)."""

    def __init__(self, stream: Any):
        self.stream = stream
        self.dropping = False

    def write(self, text: str) -> int:
        if "Call using an FX-traced Module" in text:
            self.dropping = True
            return len(text)
        if self.dropping and text == "\n":
            self.dropping = False
            return len(text)
        self.dropping = False
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


@contextmanager
def quiet_fx_traceback() -> Iterator[None]:
    """Run a captured module without fx printing its own traceback to stderr when it raises:
    the caller turns the exception into one clear error."""
    saved = sys.stderr
    sys.stderr = _DropFxTraceback(saved)
    try:
        yield
    finally:
        sys.stderr = saved


def _holds_tensor(value: Any) -> bool:
    leaves = torch.utils._pytree.tree_leaves(value)
    return any(isinstance(v, torch.Tensor) for v in leaves)
