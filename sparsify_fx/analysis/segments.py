"""Blocks of a graph, and recomputing one in backward instead of keeping its activations.

``find_blocks`` groups the compute nodes of a captured graph by the repeated block they came
from, read from the ``nn_module_stack`` that tracing records: the outermost child of an
``nn.Sequential`` / ``nn.ModuleList`` that holds parameters and is not a torch.nn layer, a
container or a stage (ResNet's ``layer1.0``, ViT's ``encoder.layers.encoder_layer_0``, GPT-2's
``h.3``, RegNet's ``block2-1`` rather than its Conv-Norm-Activation parts ``block2-1.f.a``,
MaxViT's ``MBconv`` / ``window_attention`` rather than their stage ``blocks.0``).

``recompute_segment`` moves one block's nodes into a parameter-free sub-graph called through
:class:`RecomputedSegment`. In training its forward runs under ``no_grad`` and saves only the
block's inputs (with ``save_for_backward``, so memory tools see them); backward re-runs the
block with grad enabled and back-propagates through it, like
``torch.utils.checkpoint(use_reentrant=True)``, but:

- parameters read by ``get_attr`` are explicit inputs, so their gradients are returned by
  the autograd node (not accumulated on the side);
- modules the block calls (BatchNorm, LayerNorm, Dropout) are passed in by reference, so the
  sub-graph registers nothing and ``state_dict`` keys do not change;
- the re-run does not update BatchNorm running statistics a second time (it runs on copies
  of the buffers), restores the RNG state (Dropout draws the same mask) and the autocast
  state of the forward: the recomputed gradients are the exact ones.
"""

from __future__ import annotations

import operator
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from sparsify_fx.graph import meta
from sparsify_fx.graph.form import clean_module_path, install_module, is_in_place, module_name_of
from sparsify_fx.graph.op_module import OpModule

__all__ = ["Block", "find_blocks", "recompute_segment", "RecomputedSegment", "call_module_by_ref", "grad_only_linear"]

_CONTAINERS = (nn.Sequential, nn.ModuleList)
_STATE = threading.local()


@dataclass
class Block:
    """The compute nodes of one repeated block, in graph order.

    ``reason`` is None when the block can be recomputed, else why not.
    """

    name: str
    nodes: list[fx.Node] = field(default_factory=list)
    reason: str | None = None
    gap: bool = False  # a run of nodes between blocks (stem, head), not a module of its own

    @property
    def modules(self) -> set[str]:
        """Qualified names (relative to the graph) of the modules the nodes came from."""
        return {module_name_of(n) for n in self.nodes}


def _is_layer(kind: object) -> bool:
    # torch.nn's own non-container modules (Conv2d, ReLU, LayerNorm, ...) and subclasses of
    # them (ConvNeXt's LayerNorm2d) are layers, not blocks; a ModuleDict (DenseNet's dense
    # block) is not a layer
    return isinstance(kind, type) and any(
        base.__module__.startswith("torch.nn.") and base.__module__ != "torch.nn.modules.container"
        and base is not nn.Module for base in kind.__mro__
    )


def _is_container(kind: object) -> bool:
    return isinstance(kind, type) and issubclass(kind, _CONTAINERS)


def _stack(node: fx.Node) -> list[tuple[str, object]]:
    stack = node.meta.get("nn_module_stack") or {}
    entries = [v if isinstance(v, tuple) else (str(v), object) for v in stack.values()]
    cleaned = [(clean_module_path(re.sub(r"@\d+$", "", str(path))), kind) for path, kind in entries]
    return [(path, kind) for path, kind in cleaned if path]  # Dynamo lists the root module too


def _candidates(entries: list[tuple[str, object]]) -> list[tuple[str, object]]:
    """The modules on a node's stack that could be blocks, outermost first: children of a
    container (or a ModuleList's indexed items) that are not layers."""
    found = []
    for i, (path, kind) in enumerate(entries):
        parent_type = entries[i - 1][1] if i else None
        # a ModuleList's items are indexed, not called through it: their path ends in a number
        if (_is_container(parent_type) or path.rpartition(".")[2].isdigit()) and not _is_layer(kind):
            found.append((path, kind))
    return found


def _module_roles(gm: fx.GraphModule) -> tuple[set[str], set[str]]:
    """``(stages, weighted)``: the modules that are sequences of blocks rather than blocks, and
    the modules that hold parameters (a module without any is glue, like a ``Permute``).

    A stage is a non-container module with a container child holding two or more parametrised
    non-container modules of one type (MaxViT's ``blocks.0``, a timm stage with its
    ``blocks``; not RegNet's bottleneck, whose ``f`` holds Conv-Norm-Activation containers,
    nor ConvNeXt's block and its two ``Permute``s)."""
    types: dict[str, object] = {}
    weighted: set[str] = set()
    for node in gm.graph.nodes:
        entries = _stack(node)
        for path, kind in entries:
            types.setdefault(path, kind)
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if node.op == "get_attr" or (module is not None and next(module.parameters(), None) is not None):
            weighted.update(path for path, _ in entries)
        elif isinstance(module, RecomputedSegment):
            # a block already recomputed keeps its name (its outputs carry its stack), though
            # its parameters are now inputs of a parameter-free call
            parts = str(node.meta.get(meta.MODULE, "")).split(".")
            weighted.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    items: dict[str, dict[object, int]] = {}  # container -> item type -> parametrised items
    for path, kind in types.items():
        parent, _, last = path.rpartition(".")
        # a ModuleList is never on the stack (its items are indexed, not called through it)
        in_container = _is_container(types.get(parent)) or (parent not in types and last.isdigit())
        if path in weighted and not _is_container(kind) and not _is_layer(kind) and in_container:
            counts = items.setdefault(parent, {})
            counts[kind] = counts.get(kind, 0) + 1
    stages = {parent.rpartition(".")[0] for parent, counts in items.items()
              if parent and max(counts.values()) >= 2 and not _is_container(types.get(parent.rpartition(".")[0]))}
    return stages, weighted


def _block_of(node: fx.Node, stages: set[str], weighted: set[str]) -> str | None:
    # the outermost candidate that is neither a container (a stage of ResNet / RegNet /
    # EfficientNet blocks, a Conv-Norm-Activation group) nor a stage module: the block, not
    # its sequence and not its parts (RegNet's ``block2-1``, not ``block2-1.f.a``)
    block = None
    for path, kind in _candidates(_stack(node)):
        if path not in weighted:
            continue  # glue between a block's layers (Swin's stem Permute) is not a block
        block = path
        if not _is_container(kind) and path not in stages:
            break
    return block


def _compute(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method", "call_module")


def find_blocks(gm: fx.GraphModule, gaps: bool = False) -> list[Block]:
    """The repeated blocks of ``gm``, each a contiguous run of compute nodes, in graph order.

    With ``gaps=True`` the runs of compute nodes between blocks (a stem, a head) are returned
    too, as ``Block(gap=True)`` named after their first and last module. A block whose nodes
    are interleaved with other nodes, or that produces a non-tensor value used outside it, is
    returned with a ``reason`` and cannot be recomputed.
    """
    stages, weighted = _module_roles(gm)
    blocks: dict[str, Block] = {}
    order: list[str] = []
    current: str | None = None
    gap: Block | None = None
    for node in gm.graph.nodes:
        if not _compute(node):
            continue
        name = _block_of(node, stages, weighted)
        if name is None:
            current = None
            if gaps:
                if gap is None:
                    gap = Block(f"#{len(order)}", gap=True)
                    blocks[gap.name] = gap
                    order.append(gap.name)
                gap.nodes.append(node)
            continue
        gap = None
        block = blocks.get(name)
        if block is None:
            block = blocks[name] = Block(name)
            order.append(name)
        elif current != name and block.reason is None:
            block.reason = "its nodes are not contiguous in the graph"
        block.nodes.append(node)
        current = name
    result = []
    for key in order:
        block = blocks[key]
        if block.gap:
            mods = [m for m in (module_name_of(n) for n in block.nodes) if m]
            block.name = f"({mods[0]}..{mods[-1]})" if mods else f"(nodes {block.nodes[0].name}..)"
        if block.reason is None:
            block.reason = _segment_reason(block.nodes)
        result.append(block)
    return result


def _segment_reason(nodes: list[fx.Node]) -> str | None:
    inside = set(nodes)
    for n in nodes:
        escapes = any(u not in inside for u in n.users)
        if escapes and meta.SHAPE not in n.meta:
            return f"node {n.name} leaves the block with a non-tensor (or unrecorded) value"
        if n.op == "call_method" and n.target.endswith("_"):
            return f"in-place method {n.target} at {n.name}"
        first = n.args[0] if n.args else None
        if (n.kwargs.get("inplace") is True or is_in_place(n)) and isinstance(first, fx.Node) \
                and first not in inside:
            # the forward would overwrite the saved input the backward re-runs the block from
            return f"in-place op on a block input: {n.format_node()}"
    return None


# ---------------------------------------------------------------- run-time


def call_module_by_ref(module: nn.Module, *args, **kwargs):
    """Call ``module``; during a recompute, on copies of its buffers (BatchNorm statistics
    were updated by the forward already)."""
    if getattr(_STATE, "recomputing", False) and module.training:
        buffers = {n: b.clone() for n, b in module.named_buffers()}
        if buffers:
            return torch.func.functional_call(module, buffers, args, kwargs, strict=False)
    return module(*args, **kwargs)


@contextmanager
def _recomputing() -> Iterator[None]:
    before = getattr(_STATE, "recomputing", False)
    _STATE.recomputing = True
    try:
        yield
    finally:
        _STATE.recomputing = before


def _autocast_state() -> list[tuple[str, torch.dtype]]:
    return [
        (dev, torch.get_autocast_dtype(dev))
        for dev in ("cpu", "cuda")
        if torch.is_autocast_enabled(dev)
    ]


class _GradOnlyLinear(torch.autograd.Function):
    """``F.linear`` for a re-run whose output value nothing reads: forward returns an
    uninitialised tensor of the output's shape (no matmul), backward computes the input,
    weight and bias gradients from the saved input and weight, as addmm's backward does."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = rows.mm(weight).view(x.shape)
        if ctx.needs_input_grad[1]:
            # in the weight's own layout: a transposed result would be copied into it by
            # AccumulateGrad (4 ms for ViT-B/16's 768x3072 MLP weight on a 2-core CPU)
            grad_w = rows.t().mm(x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = rows.sum(0)
        return grad_x, grad_w, grad_b


def grad_only_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """See :class:`_GradOnlyLinear`: what a recomputed block's tail Linear runs in backward."""
    if isinstance(x, fx.Proxy):  # re-traced (deepcopy / pickle of the replay graph): a leaf
        return x.tracer.create_proxy("call_function", grad_only_linear, (x, weight, bias), {})
    return _GradOnlyLinear.apply(x, weight, bias)


_LINEAR = (torch._C._nn.linear, torch.nn.functional.linear)
_PASS_THROUGH = (operator.add, torch.add, operator.sub, torch.sub, operator.iadd, operator.isub)


def _value_free_linears(body: fx.Graph, dropouts: set[str]) -> set[fx.Node]:
    """Linear nodes whose output no backward of the block reads: it reaches the block's outputs
    only through additions, subtractions and dropout (a ViT / GPT block's last projection
    before the residual add). Their re-run can skip the matmul."""

    def value_free(n: fx.Node) -> bool:
        for u in n.users:
            if u.op == "output":
                continue
            passes = u.op == "call_function" and (
                u.target in _PASS_THROUGH
                or (u.target is call_module_by_ref and isinstance(u.args[0], fx.Node) and u.args[0].name in dropouts))
            if not (passes and value_free(u)):
                return False
        return True

    return {n for n in body.nodes if n.op == "call_function" and n.target in _LINEAR and not n.kwargs
            and 2 <= len(n.args) <= 3 and value_free(n)}


def _replay_graph(body: fx.Graph, tail: set[fx.Node]) -> fx.Graph:
    """``body`` with each node of ``tail`` replaced by :func:`grad_only_linear`."""
    replay = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in body.nodes:
        if n in tail:
            # same name as the node it stands for, so cost models can find what was skipped
            env[n] = replay.create_node("call_function", grad_only_linear,
                                        fx.node.map_arg(n.args, lambda x: env[x]), {}, name=n.name)
            env[n].meta = dict(n.meta)
        else:
            env[n] = replay.node_copy(n, lambda x: env[x])
    return replay


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, segment: RecomputedSegment, *args):
        body = segment.body
        is_tensor = [isinstance(a, torch.Tensor) for a in args]
        ctx.save_for_backward(*[a for a, t in zip(args, is_tensor) if t])
        ctx.others = [None if t else a for a, t in zip(args, is_tensor)]
        ctx.is_tensor = is_tensor
        ctx.body = body
        ctx.autocast = _autocast_state()
        # the replay skips value-free tail matmuls; under autocast the dtypes of the skipped
        # ops' outputs would have to be mimicked, so the full body re-runs there
        ctx.replay = segment.replay if segment.replay is not None and not ctx.autocast else body
        ctx.cuda = any(t and a.is_cuda for a, t in zip(args, is_tensor))
        ctx.rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state() if ctx.cuda else None
        with torch.no_grad():
            return tuple(body(*args))

    @staticmethod
    def backward(ctx, *grads):
        saved = iter(ctx.saved_tensors)
        args = []
        for other, is_tensor in zip(ctx.others, ctx.is_tensor):
            if is_tensor:
                t = next(saved)
                leaf = t.detach()
                leaf.requires_grad_(t.requires_grad)
                args.append(leaf)
            else:
                args.append(other)
        devices = [torch.cuda.current_device()] if ctx.cuda else []
        with torch.random.fork_rng(devices=devices, enabled=True):
            torch.set_rng_state(ctx.rng)
            if ctx.cuda:
                torch.cuda.set_rng_state(ctx.cuda_rng)
            casts = [torch.autocast(dev, dtype=dtype) for dev, dtype in ctx.autocast]
            with torch.enable_grad(), _recomputing(), (casts[0] if casts else nullcontext()), (
                casts[1] if len(casts) > 1 else nullcontext()
            ):
                outs = tuple(ctx.replay(*args))
        pairs = [
            (o, g) for o, g in zip(outs, grads)
            if isinstance(o, torch.Tensor) and o.requires_grad and g is not None
        ]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, *[a.grad if isinstance(a, torch.Tensor) else None for a in args])


class RecomputedSegment(OpModule):
    """Calls a parameter-free sub-graph; in training keeps only its inputs for backward.

    ``keeps_dense_inputs`` tells the memory plan that the inputs are what backward holds.
    """

    keeps_dense_inputs = True

    def __init__(self, body: fx.GraphModule, block: str, replay: fx.GraphModule | None = None):
        super().__init__()
        self.body = body
        self.block = block
        # what backward re-runs: the body, with Linears whose output no backward reads
        # replaced by grad_only_linear (None: the body itself)
        self.replay = replay

    def extra_repr(self) -> str:
        return f"block={self.block!r}"

    def forward(self, *args):
        needs_grad = any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        if self.training and torch.is_grad_enabled() and needs_grad:
            return _Recompute.apply(self, *args)
        return tuple(self.body(*args))


def recompute_segment(gm: fx.GraphModule, block: Block) -> fx.Node:
    """Replace ``block``'s nodes by one :class:`RecomputedSegment` call; returns that node.

    Raises ValueError with the block's reason when it cannot be recomputed.
    """
    if block.reason is not None:
        raise ValueError(f"block {block.name!r} cannot be recomputed: {block.reason}")
    nodes = block.nodes
    inside = set(nodes)
    inputs: list[fx.Node] = []
    module_inputs: dict[str, fx.Node] = {}
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside and a not in inputs:
                inputs.append(a)
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]

    body = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for a in inputs:
        env[a] = body.placeholder(a.name)
        env[a].meta = dict(a.meta)
    module_args: list[str] = []
    for n in nodes:
        if n.op == "call_module":
            target = str(n.target)
            if target not in module_inputs:
                module_args.append(target)
                # module names need not be identifiers (RegNet's ``block1-0``)
                module_inputs[target] = body.placeholder("mod_" + re.sub(r"\W", "_", target))
            new = body.call_function(
                call_module_by_ref,
                (module_inputs[target], *fx.node.map_arg(n.args, lambda x: env[x])),
                fx.node.map_arg(n.kwargs, lambda x: env[x]),
            )
            new.meta = dict(n.meta)
            env[n] = new
        else:
            env[n] = body.node_copy(n, lambda x: env[x])
    body.output(tuple(env[o] for o in outputs))
    body_gm = fx.GraphModule(nn.Module(), body, class_name="RecomputedBody")
    dropouts = {module_inputs[t].name for t in module_args
                if isinstance(gm.get_submodule(t), nn.modules.dropout._DropoutNd)}
    tail = _value_free_linears(body, dropouts)
    replay = fx.GraphModule(nn.Module(), _replay_graph(body, tail), class_name="RecomputedReplay") if tail else None

    segment = RecomputedSegment(body_gm, block.name, replay)
    target = install_module(gm, "recompute_" + block.name.replace(".", "_"), segment)
    # new nodes go, in order, right after the block's last node
    with gm.graph.inserting_before(nodes[-1].next):
        module_nodes = [gm.graph.get_attr(t) for t in module_args]
        call = gm.graph.call_module(target, (*inputs, *module_nodes))
        call.meta[meta.MODULE] = block.name
        for i, o in enumerate(outputs):
            item = gm.graph.call_function(operator.getitem, (call, i))
            item.meta = dict(o.meta)
            o.replace_all_uses_with(item, delete_user_cb=lambda u: u not in inside)
    for n in reversed(nodes):
        gm.graph.erase_node(n)
    gm.graph.lint()
    gm.recompile()
    return call
