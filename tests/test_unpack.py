"""Tuple-unpacking of a tensor runs as eager's ``unbind`` in the rewritten graph
(``sparsify_fx/unpack.py``)."""

import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsify_fx as sfx
from benchmarks.bench_budget import GPT
from benchmarks.memory import saved_tensor_bytes
from sparsify_fx.frontend.unpack import unbind_unpacking

# a pass that rewrites nothing in these models: what remains is the capture and the cleanup
_NOTHING = sfx.ActivationMemory(relu="off", gelu="off", silu="off", batchnorm="off", layernorm="off",
                                scale="off", maxpool="off")


class _Attention(nn.Module):
    def __init__(self, d: int = 16, heads: int = 2, write: bool = False):
        super().__init__()
        self.heads, self.write = heads, write
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.write:
            # indexed, not unpacked (eager's unpacking is an unbind, whose views cannot be
            # written into): the same getitems in the trace, each a select in eager
            q, k, v = qkv[0], qkv[1], qkv[2]
            q.mul_(0.5)
        else:
            q, k, v = qkv
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


def _backward_ops(out: torch.Tensor) -> set[str]:
    seen, todo, names = set(), [out.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names


def _grads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    for p in model.parameters():
        p.grad = None
    out = model(x)
    out.pow(2).mean().backward()
    return out.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


def test_unpacking_runs_as_unbind_with_the_eager_values_and_gradients():
    torch.manual_seed(0)
    model, x = _Attention(), torch.randn(2, 5, 16)
    fast = sfx.sparsify(model, _NOTHING, example_inputs=(x,))
    unbinds = [n for n in fast.graph.nodes if n.op == "call_method" and n.target == "unbind"]
    assert len(unbinds) == 1
    items = list(unbinds[0].users)
    assert sorted(i.args[1] for i in items) == [0, 1, 2] and all(i.target is operator.getitem for i in items)
    names = _backward_ops(fast(x))
    assert "UnbindBackward0" in names and "SelectBackward0" not in names
    out_ref, g_ref = _grads(model, x)
    out, g = _grads(fast, x)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    for k in g_ref:
        torch.testing.assert_close(g[k], g_ref[k], rtol=0, atol=0, msg=k)


def test_an_item_written_in_place_stays_a_select():
    """autograd forbids writing into a view unbind returned: such an unpacking is left alone."""
    torch.manual_seed(0)
    model, x = _Attention(write=True), torch.randn(2, 5, 16)
    fast = sfx.sparsify(model, _NOTHING, example_inputs=(x,))
    assert not [n for n in fast.graph.nodes if n.target == "unbind"]
    out_ref, g_ref = _grads(model, x)
    out, g = _grads(fast, x)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    for k in g_ref:
        torch.testing.assert_close(g[k], g_ref[k], rtol=0, atol=0, msg=k)


class _Partial(nn.Module):
    def forward(self, x):
        return x[0] * x[2]  # two of three rows: indexing, not an unpacking


class _Chunked(nn.Module):
    def forward(self, x):
        a, b = x.chunk(2)  # a tuple already: nothing to do
        return a * b


class _Full(nn.Module):
    def forward(self, x):
        a, b, c = x
        return a * b + c


@pytest.mark.parametrize("model,rewritten", [(_Full(), 1), (_Partial(), 0), (_Chunked(), 0)])
def test_only_a_whole_unpacking_of_a_tensor_is_rewritten(model, rewritten):
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(3, 4)
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            n.meta["sfx_shape"] = (tuple(x.shape), x.dtype)
    assert unbind_unpacking(gm) == rewritten
    assert unbind_unpacking(gm) == 0  # idempotent
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_gpt_blocks_recomputed_and_planned_with_unbind():
    """GPT-2-style blocks: the unpacking inside a recomputed block's body and replay runs as
    unbind too, the gradients are eager's, and the memory plan (unbind is a view) still
    equals what autograd holds."""
    torch.manual_seed(0)
    model = GPT(vocab=64, d=32, layers=2, heads=2, ctx=16).train()
    ids = torch.randint(0, 64, (2, 16))
    fast = sfx.sparsify(model, sfx.MemoryBudget(fraction=0.2, exact_only=True, measure_steps=0),
                        example_inputs=(ids,))
    segments = [m for m in fast.modules() if isinstance(m, sfx.RecomputedSegment)]
    assert segments
    for s in segments:
        for gm in (s.body, s.replay):
            if gm is not None:
                assert [n for n in gm.graph.nodes if n.target == "unbind"], s.block
    ref, fast_g = {}, {}
    for model_, into in ((model, ref), (fast, fast_g)):
        for p in model_.parameters():
            p.grad = None
        model_(ids).float().pow(2).mean().backward()
        into.update({k: p.grad.clone() for k, p in model_.named_parameters()})
    for k in ref:
        torch.testing.assert_close(fast_g[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)

    plain = sfx.sparsify(model, _NOTHING, example_inputs=(ids,))
    assert [n for n in plain.graph.nodes if n.target == "unbind"]
    planned = sfx.memory_plan(plain).total_bytes
    measured = saved_tensor_bytes(plain, (ids,))
    assert abs(planned - measured) <= 0.01 * measured
