"""Dynamo captures under the shapes training uses: variable sequence lengths keep the rewrite
(dynamic dims after the first recompile), a fallback to the un-rewritten model is warned and
counted, MemoryBudget plans Dynamo's graphs, and recording their shapes leaves no trace."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import sparsify_fx as sfx
from sparsify_fx.bench import saved_tensor_bytes

_LIMIT = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"


class TokenMLP(nn.Module):
    """Token ids -> embeddings -> two residual MLP blocks with LayerNorm -> logits."""

    def __init__(self, vocab: int = 32, width: int = 32, batchnorm: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.ReLU(), nn.Linear(4 * width, width))
            for _ in range(2)
        )
        self.norm = nn.BatchNorm1d(width) if batchnorm else nn.Identity()
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids):
        h = self.embed(ids)
        for block in self.blocks:
            h = h + block(h)
        h = self.norm(h.transpose(1, 2)).transpose(1, 2)
        return self.head(self.drop(h))


def _ids(length: int, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, 32, (batch, length), generator=torch.Generator().manual_seed(length))


def _dynamo(model: nn.Module, recipe, length: int = 16) -> nn.Module:
    torch._dynamo.reset()  # Dynamo caches per code object: no graphs from another test's model
    return sfx.sparsify(model, recipe, example_inputs=(_ids(length),), capture_methods=("dynamo",))


def test_twelve_sequence_lengths_keep_the_rewrite():
    torch.manual_seed(0)
    model = TokenMLP()
    fast = _dynamo(model, "dropit:keep=0.1+actmem")
    ratios = []
    for length in range(16, 40, 2):
        ids = _ids(length)
        saved_tensor_bytes(fast, (ids,))  # a new length may compile a graph first
        ratios.append(saved_tensor_bytes(fast, (ids,)) / saved_tensor_bytes(model, (ids,)))
    report = sfx.explain(fast)
    assert report.dense_fallback_calls == 0
    # eval at capture, train at 16, one dynamic-length train graph for every later length
    assert len(fast.graphs) <= 4, len(fast.graphs)
    assert max(ratios) < 0.75, ratios
    assert max(ratios) <= 1.05 * min(ratios), ratios


def test_a_fallback_to_the_dense_model_is_warned_and_counted():
    torch.manual_seed(0)
    model = TokenMLP()
    fast = _dynamo(model, "dropit:keep=0.5")
    model.eval()
    fast.eval()
    with torch._dynamo.config.patch(**{_LIMIT: 1}):
        with torch.no_grad():
            fast(_ids(16))  # the graph sparsify verified
        with pytest.warns(UserWarning, match=r"ran un-rewritten \(dense\).*dense_fallback_calls"):
            with torch.no_grad():
                out = fast(_ids(20, batch=3))  # a new shape over the limit of 1
        with torch.no_grad():
            torch.testing.assert_close(out, model(_ids(20, batch=3)), rtol=0, atol=0)
    report = sfx.explain(fast)
    assert report.dense_fallback_calls >= 1 and report.dense_fallback_reason
    assert "ran the un-rewritten model" in report.render()


def test_memory_budget_plans_dynamo_graphs():
    torch.manual_seed(0)
    model = TokenMLP()
    fast = _dynamo(model, sfx.MemoryBudget(fraction=0.5))
    ids = _ids(16)
    saved_tensor_bytes(fast, (ids,))  # the training graph is made, and planned, on first use
    report = sfx.explain(fast)
    plans = [p for p in report.plans if p.units]
    assert plans, [s.reason for s in report.skipped]
    assert any(u.choice != "keep" for u in plans[-1].units)
    dense, held = saved_tensor_bytes(model, (ids,)), saved_tensor_bytes(fast, (ids,))
    assert held <= 0.5 * dense * 1.10, (held, dense)


def _sum_loss(out: torch.Tensor) -> torch.Tensor:
    return out.float().sum()  # keeps nothing: the bytes measured are the model's


def _budget_over_lengths(monkeypatch, growth: float, fraction: float) -> tuple[list[float], sfx.ExplainReport]:
    from sparsify_fx.compiler import backend

    monkeypatch.setattr(backend, "REPLAN_GROWTH", growth)
    torch.manual_seed(0)
    model = TokenMLP(width=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = _dynamo(model, sfx.MemoryBudget(fraction=fraction))
    ratios = []
    for length in range(16, 64, 6):
        ids = _ids(length)
        # one autocast context per step: the weight-cast cache lives until the outermost exits
        for module in (fast, model, fast):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                held = saved_tensor_bytes(module, (ids,), loss_fn=_sum_loss)
            if module is model:
                dense = held
        ratios.append(held / dense)
    return ratios, sfx.explain(fast)


def test_a_budget_is_replanned_as_the_length_grows(monkeypatch):
    """Under autocast the dense graph keeps weight casts whatever the length, which the budget's
    DropIT forms do not: a plan made at one length holds a growing fraction at longer ones. The
    dynamic-length graph is re-planned when the length grows past 1.25x the planned one."""
    once, _ = _budget_over_lengths(monkeypatch, float("inf"), 0.35)
    ratios, report = _budget_over_lengths(monkeypatch, 1.25, 0.35)
    assert max(once) > 0.35 * 1.05, once  # (planned once, the budget is exceeded at longer lengths)
    assert max(ratios) <= 0.35 * 1.05, ratios
    replans = [n for n in report.capture_notes if n.startswith("re-planned")]
    assert 1 <= len(replans) <= 5, replans  # 16 -> 58: one per 1.25x step at most
    assert report.dense_fallback_calls == 0


def test_a_failed_replan_warns_and_the_step_runs_the_plan_it_has(monkeypatch):
    from sparsify_fx.compiler import backend

    torch.manual_seed(0)
    model = TokenMLP()
    fast = _dynamo(model, sfx.MemoryBudget(fraction=0.5))
    for length in (16, 20):  # the static graph, then the dynamic one planned at 20
        saved_tensor_bytes(fast, (_ids(length),))
    real = backend.rewrite_prepared

    def failing(gm, configs, frame=None):
        raise RuntimeError("no plan today")
    monkeypatch.setattr(backend, "rewrite_prepared", failing)
    with pytest.warns(UserWarning, match=r"re-planning .* at sizes \[40\] failed .*no plan today"):
        held = saved_tensor_bytes(fast, (_ids(40),))
    monkeypatch.setattr(backend, "rewrite_prepared", real)
    assert held < saved_tensor_bytes(model, (_ids(40),))  # the earlier plan still rewrites
    assert not [n for n in sfx.explain(fast).capture_notes if n.startswith("re-planned")]


def test_compiling_a_dynamo_captured_model_says_it_compiles_nothing_more():
    torch.manual_seed(0)
    model = TokenMLP()
    fast = _dynamo(model, "dropit:keep=0.5")
    ids = _ids(16)
    expected = fast(ids)
    with pytest.warns(UserWarning, match=r"compiles nothing more.*backend=sfx\.backend\(recipe\)"):
        out = torch.compile(fast)(ids)
    assert out.shape == expected.shape  # (it still runs: the rewritten graphs, as they are)


def test_recording_a_dynamo_graphs_shapes_leaves_running_statistics_alone():
    torch.manual_seed(0)
    model = TokenMLP(batchnorm=True)
    reference = copy.deepcopy(model)
    fast = _dynamo(model, "dropit:keep=0.5")
    ids = _ids(16)
    torch.manual_seed(1)
    fast.train()(ids)
    torch.manual_seed(1)
    reference.train()(ids)
    torch.testing.assert_close(model.norm.running_mean, reference.norm.running_mean, rtol=0, atol=0)
    assert int(model.norm.num_batches_tracked) == 1
