"""The one entry point: ``sparsify(model, recipe, example_inputs=...)``."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from sparsify_fx.analysis.held import false_savings, held_bytes, holder_kind, plan_graphs
from sparsify_fx.analysis.shapes import ShapeRecorder
from sparsify_fx.errors import CaptureError, ConfigError
from sparsify_fx.frontend.arguments import quiet_fx_traceback
from sparsify_fx.frontend.cascade import CAPTURE_METHODS, Capture, capture
from sparsify_fx.frontend.unpack import unbind_unpacking
from sparsify_fx.graph import meta
from sparsify_fx.graph.form import OPS_CONTAINER
from sparsify_fx.graph.op_module import OpModule
from sparsify_fx.infra.config import PassConfig
from sparsify_fx.infra.describe import short_description
from sparsify_fx.infra.pass_base import (
    PassPlan,
    PassResult,
    Rewrite,
    Skip,
    dense_layer_order,
    run_passes,
)
from sparsify_fx.infra.recipes import Recipe, resolve_recipe
from sparsify_fx.verify import VerifyReport
from sparsify_fx.verify import verify as verify_outputs

__all__ = ["sparsify", "SparsifyRecord", "RECORD_ATTR"]

#: attribute of a rewritten module holding its :class:`SparsifyRecord`.
RECORD_ATTR = "sfx_record"


@dataclass
class SparsifyRecord:
    """Everything :func:`sparsify` did, kept on the rewritten module for ``sfx.explain``."""

    capture_method: str
    capture_notes: list[str]
    capture_failures: dict[str, str]
    recipe: list[str]
    rewrites: list[Rewrite] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    passes: list[tuple[str, int, int]] = field(default_factory=list)  # name, rewritten, skipped
    verification: VerifyReport | None = None
    graphs: list[str] = field(default_factory=list)
    plans: list[PassPlan] = field(default_factory=list)  # the passes' whole-graph plans
    # the memory plan's bytes the backward holds after the forward, over the graphs with
    # recorded shapes: the captured model and the rewritten one (None: no shapes)
    held_bytes_before: int | None = None
    held_bytes_after: int | None = None
    # Dynamo captures: calls that ran the un-rewritten model (Dynamo gave up re-capturing)
    dense_fallback_calls: int = 0
    dense_fallback_reason: str | None = None


class _NodeTracker(fx.Interpreter):
    """Runs a graph remembering the node being run, to name the one an input breaks."""

    current: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        return super().run_node(n)


def _failing_node(gm: fx.GraphModule, args: tuple, kwargs: dict) -> str:
    tracker = _NodeTracker(gm)
    try:
        bound = inspect.signature(gm.forward).bind(*args, **kwargs)
        bound.apply_defaults()
        with torch.no_grad():
            tracker.run(*bound.args)
    except Exception:  # noqa: BLE001 - the error itself is reported by the caller
        node = tracker.current
        if node is not None:
            where = node.meta.get(meta.MODULE)
            return f" at node {node.format_node()}" + (f" (module {where!r})" if where else "")
    return ""


def _describe_inputs(args: tuple, kwargs: dict) -> str:
    def one(v: Any) -> str:
        if isinstance(v, torch.Tensor):
            return f"Tensor{list(v.shape)} {str(v.dtype).removeprefix('torch.')} on {v.device}"
        return type(v).__name__
    parts = [one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return "(" + ", ".join(parts) + ")"


def _record_shapes(cap: Capture, args: tuple, kwargs: dict) -> list[str]:
    """Run the captured module once (eval, no grad) to store tensor shapes in node.meta."""
    notes: list[str] = []
    inputs: dict[str, tuple[tuple, dict]] = {}
    handles = []
    for name, gm in cap.graphs.items():
        def hook(m: nn.Module, a: tuple, kw: dict, name: str = name) -> None:
            inputs.setdefault(name, (a, kw))
        handles.append(gm.register_forward_pre_hook(hook, with_kwargs=True))
    saved = {n: m.training for n, m in cap.graph_module.named_modules()}
    try:
        cap.graph_module.eval()
        with torch.no_grad():
            try:
                with quiet_fx_traceback():  # the error below says it all, once
                    cap.graph_module(*args, **kwargs)
            except Exception as e:
                where = _failing_node(cap.graph_module, args, kwargs) if isinstance(
                    cap.graph_module, fx.GraphModule) else ""
                raise CaptureError(
                    f"{type(cap.graph_module).__name__} does not run on the example inputs "
                    f"{_describe_inputs(args, kwargs)}{where}: {type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}. Pass example_inputs of the shape, dtype "
                    "and device the model takes (positional, as a tuple; keyword inputs as example_kwargs)."
                ) from e
    finally:
        for h in handles:
            h.remove()
        for n, m in cap.graph_module.named_modules():
            m.training = saved.get(n, m.training)
    for name, gm in cap.graphs.items():
        if name not in inputs:
            notes.append(f"{name or '(root)'}: not run on the example inputs; no shapes recorded")
            continue
        a, kw = inputs[name]
        try:
            bound = inspect.signature(gm.forward).bind(*a, **kw)
            bound.apply_defaults()
            gm.eval()
            with torch.no_grad():
                ShapeRecorder(gm).run(*bound.args)
        except Exception as e:  # noqa: BLE001 - shapes only feed estimates
            notes.append(f"{name or '(root)'}: shapes not recorded ({type(e).__name__}: {e})")
        finally:
            for n, m in gm.named_modules():
                m.training = saved.get((name + "." + n).strip("."), m.training)
    return notes


def sparsify(
    model: nn.Module,
    recipe: Recipe,
    example_inputs: tuple | list | Any = None,
    example_kwargs: dict[str, Any] | None = None,
    *,
    verify: bool | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    capture_methods: tuple[str, ...] = CAPTURE_METHODS,
) -> nn.Module:
    """Rewrite ``model`` with the passes of ``recipe``; the original is not mutated.

    Args:
        model: any ``nn.Module``.
        recipe: a pass config (``sfx.DropIT(keep=0.1)``), a list of them (applied in
            order), or a recipe string (``"dropit:keep=0.1"``).
        example_inputs: positional inputs of one forward call: used to record shapes (byte
            and FLOP estimates), by the export/Dynamo capture fallbacks, and by verification.
        example_kwargs: keyword inputs of that call.
        verify: compare eval-mode outputs with the original (default: True when example
            inputs are given). Raises :class:`sparsify_fx.VerificationError` on mismatch.
        rtol / atol: verification tolerances (default: per output dtype).
        capture_methods: capture methods to try, in order.

    Returns:
        The rewritten module: a ``torch.fx.GraphModule`` when the model was captured whole.
        It shares the original's parameters and buffers and keeps its ``state_dict`` keys.
        ``sfx.explain(result)`` reports what was rewritten and skipped.

    Example:
        >>> import torch, sparsify_fx as sfx
        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
        ...                             torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        >>> fast = sfx.sparsify(model, sfx.DropIT(keep=0.1), example_inputs=(torch.randn(8, 16),))
        >>> isinstance(fast, torch.fx.GraphModule)
        True
    """
    configs: list[PassConfig] = resolve_recipe(recipe)
    _refuse_rewritten(model)
    if isinstance(example_inputs, Mapping):
        raise ConfigError(
            "example_inputs is a dict: it holds the positional inputs of one forward call, as a "
            "tuple; pass keyword inputs as example_kwargs={...}"
        )
    if example_kwargs is not None and not isinstance(example_kwargs, Mapping):
        raise ConfigError(
            f"example_kwargs must be a dict of keyword inputs ({{'attention_mask': mask}}), "
            f"got {type(example_kwargs).__name__}"
        )
    if example_inputs is not None and not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    args = tuple(example_inputs) if example_inputs is not None else None
    kwargs = dict(example_kwargs or {})
    if verify and args is None:
        raise ConfigError(
            "sparsify(verify=True) needs example_inputs: verification runs both models on them"
        )
    cap = capture(model, args, kwargs, methods=capture_methods)
    record = SparsifyRecord(
        capture_method=cap.method,
        capture_notes=list(cap.notes),
        capture_failures=dict(cap.failures),
        recipe=[c.describe() for c in configs],
        graphs=list(cap.graphs),
    )
    if isinstance(model, nn.Module) and not model.training:
        record.capture_notes.append(
            "the model was in eval() mode, so the result is too: eval runs the original ops "
            "(exact passes give the original's outputs); training-time rewrites (compressed "
            "saved tensors, slicing, recomputation) act only after .train()"
        )
    if cap.method == "dynamo":
        from sparsify_fx.compiler.backend import rewrite_lazily

        module = rewrite_lazily(cap, configs, record)
    else:
        if args is not None:
            record.capture_notes += _record_shapes(cap, args, kwargs)
        # before the passes, which rewrite the graphs in place
        record.held_bytes_before = _planned(record, lambda: held_bytes(cap.graphs))
        order = dense_layer_order(cap.graphs)
        first_last = tuple(dict.fromkeys([order[0], order[-1]])) if order else ()
        results: list[PassResult] = run_passes(cap.graphs, configs, first_last)
        for config, result in zip(configs, results):
            record.rewrites += result.rewrites
            record.skips += result.skips
            record.plans += result.plans
            record.passes.append((config.describe(), len(result.rewrites), len(result.skips)))
        module = cap.graph_module
        for gm in cap.graphs.values():
            # after the passes, which match the traced getitem form: eager's unbind back
            for sub in gm.modules():
                if isinstance(sub, fx.GraphModule):
                    unbind_unpacking(sub)
            gm.graph.lint()
            gm.recompile()
        _check_savings(cap.graphs, configs, record)
    setattr(module, RECORD_ATTR, record)
    if verify is None:
        verify = args is not None
    if verify:
        record.verification = verify_outputs(model, module, args, kwargs, rtol=rtol, atol=atol)
    # after verification: op modules verified with a function-preserving init draw their own
    for sub in module.modules():
        if isinstance(sub, OpModule):
            sub.reinitialize()
    return module


def _check_companion(graphs: dict[str, fx.GraphModule], configs: list[PassConfig], record: SparsifyRecord,
                     plans: dict) -> None:
    """Warn when a recipe leaves most of the held bytes with activation / norm / pool
    backwards that ``actmem`` would store compressed (BSR alone on a residual MLP: the GELU
    keeps its 4x-wide input dense), naming the share and the fix."""
    names = {c.recipe_name for c in configs}
    b0, b1 = record.held_bytes_before, record.held_bytes_after
    # the passes whose point is activation memory; IsoFLOP / SliceOut are about compute
    if not names & {"dropit", "bsr"} or names & {"actmem", "budget"}:
        return
    if not record.rewrites or not b0 or b1 is None or b1 < 0.7 * b0:
        return
    kept: dict[str, int] = {}
    for prefix, plan in plans.items():
        for t in plan.tensors:
            kinds = [holder_kind(graphs[prefix], h) for h in t.holders]
            if t.bytes and kinds and all(any(w in k.lower() for w in _ACTMEM_HOLDERS) for k in kinds):
                for k in set(kinds):
                    kept[k] = kept.get(k, 0) + t.bytes // len(set(kinds))
    share = sum(kept.values()) / b1 if b1 else 0.0
    if share < 0.25:
        return
    recipe = "+".join(short_description(c) for c in configs)
    top = ", ".join(k for k, _ in sorted(kept.items(), key=lambda kv: -kv[1])[:3])
    warnings.warn(
        f"sparsify: {recipe} leaves {b1 / b0:.3f}x of the dense bytes held for backward (memory plan: "
        f"{_bytes(b0)} -> {_bytes(b1)}); {share:.0%} of what remains is kept dense by {top} backward, "
        f"which this recipe does not compress. Fix: add actmem, which stores those tensors compressed: "
        f"recipe {recipe + '+actmem'!r}.",
        UserWarning, stacklevel=4,
    )


#: op kinds whose backward keeps a tensor dense that ActivationMemory stores compressed
_ACTMEM_HOLDERS = ("relu", "batchnorm", "batch_norm", "gelu", "silu", "layernorm", "layer_norm",
                   "maxpool", "max_pool")


def _check_savings(graphs: dict[str, fx.GraphModule], configs: list[PassConfig], record: SparsifyRecord) -> None:
    """Record the rewritten model's held bytes; warn where a compressed copy is held beside a
    dense one (another op's backward keeps the same tensor), naming the holder and the fix."""
    if record.held_bytes_before is None:
        return
    plans = _planned(record, lambda: plan_graphs(graphs, record.rewrites))
    if plans is None:
        return
    record.held_bytes_after = sum(p.total_bytes for p in plans.values())
    doubled = false_savings(graphs, record.rewrites, plans)
    if not doubled:
        _check_companion(graphs, configs, record, plans)
        return
    targets = {(prefix, n.name): str(n.target) for prefix, gm in graphs.items() for n in gm.graph.nodes
               if n.op == "call_module"}
    by_target = {r.replacement: r.pass_name for r in record.rewrites}
    passes = sorted({by_target.get(targets.get((f.graph, c), ""), "?") for f in doubled for c in f.compressed_by})
    first = doubled[0]
    holder, kind = first.holders[0]
    kinds = sorted({k for f in doubled for _, k in f.holders})
    recipe = "+".join(short_description(c) for c in configs)
    if "actmem" not in {c.recipe_name for c in configs} and any(
            w in k.lower() for k in kinds for w in _ACTMEM_HOLDERS):
        fix = (f"add actmem, which stores those {'/'.join(kinds)} tensors compressed too: "
               f"recipe {recipe + '+actmem'!r}")
    else:
        fix = (f"compress what {'/'.join(kinds)} keeps too, or leave the consumers of those tensors "
               f"dense (exclude=[...])")
    b0, b1 = record.held_bytes_before, record.held_bytes_after
    ratio = f" ({b1 / b0:.3f}x)" if b0 else ""
    where = f" in module {first.module!r}" if first.module else ""
    warnings.warn(
        f"sparsify: {'/'.join(passes)} stores {len(doubled)} tensor(s) compressed that another "
        f"backward still keeps dense: for those the compressed copy is held beside the dense tensor "
        f"and saves nothing (whole model, memory plan: {_bytes(b0)} -> {_bytes(b1)} held{ratio}); e.g. {first.tensor}{where} "
        f"is kept by {holder} backward ({kind}). Fix: {fix}.",
        UserWarning, stacklevel=3,
    )


def _planned(record: SparsifyRecord, make: Any) -> Any:
    """``make()``, or None with a note: the memory plan is an estimate, and an op it cannot
    analyse must not fail the rewrite."""
    try:
        return make()
    except Exception as e:  # noqa: BLE001 - reported in the record's notes
        record.capture_notes.append(f"memory plan not made ({type(e).__name__}: {e}); held bytes not estimated")
        return None


def _bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB" if n >= 2**10 else f"{n} B"


def _refuse_rewritten(model: Any) -> None:
    """A module sparsify already rewrote cannot be rewritten again (its op modules are opaque)."""
    if not isinstance(model, nn.Module):
        return  # capture names the problem
    for name, m in model.named_modules():
        record = getattr(m, RECORD_ATTR, None)
        if isinstance(record, SparsifyRecord) or isinstance(getattr(m, OPS_CONTAINER, None), nn.Module):
            what = f"its submodule {name!r} is" if name else "it is"
            done = f" of recipe {record.recipe}" if isinstance(record, SparsifyRecord) else ""
            raise ConfigError(
                f"{type(model).__name__} was already rewritten by sparsify_fx ({what} the result{done}); "
                "rewriting a rewritten module again is not supported. Call sparsify once on the "
                "original model with every pass in one recipe: sfx.sparsify(model, [first, second])"
            )


def record_of(module: nn.Module) -> SparsifyRecord | None:
    """The :class:`SparsifyRecord` of a module made by :func:`sparsify`, else None."""
    record = getattr(module, RECORD_ATTR, None)
    return record if isinstance(record, SparsifyRecord) else None


def is_graph_module(module: nn.Module) -> bool:
    return isinstance(module, fx.GraphModule)
