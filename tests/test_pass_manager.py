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
