"""The pass manager: results, rollback of a failing pass, and user-registered passes."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import mlp

import sparsify_fx as sfx


@dataclass(frozen=True)
class Explode(sfx.PassConfig):
    """Rewrites one layer, then fails half-way."""


@sfx.register_pass(Explode, name="explode")
def _explode(gm, config, ctx):
    ops, _ = sfx.find_dense_ops(gm)
    target = sfx.install_module(gm, "half_done", torch.nn.Identity())
    with gm.graph.inserting_after(ops[0].node):
        new = gm.graph.call_module(target, (ops[0].node,))
    ops[0].node.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
    err = RuntimeError("boom")
    err.sfx_node = ops[1].node
    raise err


def test_failing_pass_rolls_back_and_names_pass_and_node():
    model = mlp()
    x = torch.randn(2, 8)
    expected = model(x)
    with pytest.raises(sfx.PassError) as info:
        sfx.sparsify(model, [sfx.DropIT(keep=0.5), Explode()], (x,))
    msg = str(info.value)
    assert "'explode'" in msg and "boom" in msg and "at node %linear" in msg
    assert info.value.pass_name == "explode"
    # the user's model is untouched and still works
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    assert not hasattr(model, "sfx_ops")


def test_rollback_restores_graph_and_submodules():
    from sparsify_fx.infra.pass_base import run_passes

    gm = sfx.capture(mlp()).graph_module
    before = gm.code
    with pytest.raises(sfx.PassError):
        run_passes({"": gm}, [Explode()])
    assert gm.code == before
    assert not hasattr(gm, "sfx_ops") or len(gm.sfx_ops._modules) == 0


def test_pass_returning_wrong_type_is_reported():
    @dataclass(frozen=True)
    class Wrong(sfx.PassConfig):
        pass

    @sfx.register_pass(Wrong, name="wrong")
    def _wrong(gm, config, ctx):
        return gm

    with pytest.raises(sfx.PassError, match="expected PassResult"):
        sfx.sparsify(mlp(), Wrong())


def test_results_accumulate_in_recipe_order():
    model = mlp(depth=5)
    fast = sfx.sparsify(model, ["dropit:keep=0.5,include=['2']", "dropit:keep=0.3,include=['4']"],
                        (torch.randn(2, 8),))
    report = sfx.explain(fast)
    assert [(r.module, r.details["keep"]) for r in report.rewrites] == [("2", 0.5), ("4", 0.3)]
    assert [p[1] for p in report.passes] == [1, 1]


def test_custom_pass_example_runs():
    import runpy
    from pathlib import Path

    runpy.run_path(str(Path(__file__).parent.parent / "examples" / "custom_pass.py"), run_name="__main__")


@dataclass(frozen=True)
class SiluInNewModule(sfx.PassConfig):
    """Returns a brand-new GraphModule: ReLU -> SiLU, and the output doubled by a module that
    only the new GraphModule holds."""

    broken: bool = False


class _Double(torch.nn.Module):
    def forward(self, x):
        return 2 * x


@sfx.register_pass(SiluInNewModule, name="silu_in_new_module")
def _silu_in_new_module(gm, config, ctx):
    import torch.fx as fx
    import torch.nn.functional as F

    graph, env = fx.Graph(), {}
    for node in gm.graph.nodes:
        if node.op == "output":
            out = env[node.args[0]]
            doubled = graph.call_module("twice", (out,))
            graph.output(doubled if not config.broken else node.args[0])  # broken: a foreign node
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
        if node.target in (F.relu, torch.relu):
            env[node].target = F.silu
    root = torch.nn.Module()  # gm's children plus one only the new module holds
    for name, child in gm.named_children():
        root.add_module(name, child)
    root.twice = _Double()
    new = fx.GraphModule(root, graph)
    return sfx.PassResult(new, modified=True)


def test_pass_returning_a_new_graph_module_changes_the_result():
    model, x = mlp(), torch.randn(4, 8)
    silu = torch.nn.Sequential(*[torch.nn.SiLU() if isinstance(m, torch.nn.ReLU) else m for m in model])
    fast = sfx.sparsify(model, [SiluInNewModule(), sfx.DropIT(keep=1.0)], (x,), verify=False)
    torch.testing.assert_close(fast(x), 2 * silu(x))
    # the manager moved the new graph into the module it gave the pass: the later pass saw it
    assert isinstance(fast.twice, _Double)
    assert [r.pass_name for r in sfx.explain(fast).rewrites] == ["dropit"] * 2


def test_run_pass_rolls_back_a_broken_new_graph_module():
    gm = sfx.capture(mlp()).graph_module
    before = gm.code
    with pytest.raises(sfx.PassError, match="silu_in_new_module") as info:
        sfx.run_pass(gm, SiluInNewModule(broken=True))
    assert info.value.pass_name == "silu_in_new_module"
    assert gm.code == before and not hasattr(gm, "twice")


def test_run_pass_adopts_a_new_graph_module_in_place():
    model, x = mlp(), torch.randn(2, 8)
    gm = sfx.capture(model).graph_module
    result = sfx.run_pass(gm, SiluInNewModule())
    assert result.graph_module is gm and result.modified
    assert isinstance(gm.twice, _Double) and "silu" in gm.code
    assert gm(x).shape == model(x).shape
