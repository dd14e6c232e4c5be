"""MemoryBudget is deterministic: identical blocks get one price, two plans from the same
calibration are the same plan, and a seeded training run with a budget is reproducible.

Nothing here reads the host's clock: the budget's timings come from
:func:`tick_clock` (``budget_costs._clock``) and its calibration from :data:`RATES`, injected
(:func:`inject`) in place of a measured one. ``test_memory_budget.py`` uses both too.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn
import torchvision
from sparsify_fx.passes.memory_budget import calibration_cache
from sparsify_fx.passes.memory_budget import costs as budget_costs
from sparsify_fx.passes.memory_budget.planner import MemoryBudget
from sparsify_fx.passes.memory_budget.prices import timing_twins, unit_signature
from sparsify_fx.passes.memory_budget.solver import Choice, plan_seconds, solve
from test_memory_budget import _TinyViT

import sparsify_fx as sfx

#: the calibrated forms (``budget_costs.calibrate``'s rates)
KINDS = ("dropit", "bf16", "recompute", "bitmask", "dense", "batchnorm", "bn_relu_conv", "bn_relu_conv_bf16",
         "act_linear", "act_linear_bf16", "ln_linear", "ln_linear_bf16")

#: one tick of :func:`tick_clock`: a power of two, so sums and differences of ticks are exact
TICK = 2.0**-12

#: a calibration (seconds per byte, per op, bf16 / fp32 weight-gradient times), rounded from
#: one measured on a 2-core Sapphire Rapids; its host reference is one tick, what
#: :func:`tick_clock` times the reference at (so a cached copy passes the host check)
RATES = {"dropit": 2.3e-10, "bf16": 4e-11, "recompute": 7e-11, "bitmask": 0.0, "dense": 6e-11, "batchnorm": 1e-10,
         "bn_relu_conv": 2.3e-10, "bn_relu_conv_bf16": 0.0, "act_linear": 1.2e-10, "act_linear_bf16": 1.1e-10,
         "ln_linear": 1.5e-10, "ln_linear_bf16": 8e-11,
         "op:dropit": 7.6e-5, "op:bf16": 2e-5, "op:recompute": 2e-5, "op:bitmask": 2e-5, "op:dense": 2e-5,
         "op:batchnorm": 2.7e-5, "op:bn_relu_conv": 1.1e-4, "op:bn_relu_conv_bf16": 1.1e-4, "op:act_linear": 2e-5,
         "op:act_linear_bf16": 3.5e-5, "op:ln_linear": 2e-5, "op:ln_linear_bf16": 2.7e-5,
         "mm_bf16:linear": 0.3, "mm_bf16:conv": 0.7, "mm_bf16:conv1x1": 0.8, "host:reference": TICK}


def tick_clock(jitter: float = 0.0, seed: int = 0) -> Callable[[], float]:
    """A clock that advances one :data:`TICK` per reading, or with ``jitter`` a tick times a
    factor drawn from ``[1, 1 + jitter)`` by a seeded generator: every timed region takes one
    tick (a node's forward, a calibration's best-of), or a reproducible noisy draw of it."""
    draw = random.Random(seed)
    now = [0.0]

    def clock() -> float:
        now[0] += TICK * (1.0 + jitter * draw.random())
        return now[0]

    return clock


def inject(monkeypatch, clock: Callable[[], float] | None = None, rates: dict[str, float] | None = None) -> None:
    """Time the budget with ``clock`` (default :func:`tick_clock`) and price it with ``rates``
    (default :data:`RATES`) as this process's calibration for CPU float32."""
    monkeypatch.setattr(budget_costs, "_clock", clock or tick_clock())
    key = ("cpu", torch.float32)
    monkeypatch.setattr(budget_costs, "_RATES", {key: dict(rates or RATES)})
    monkeypatch.setattr(budget_costs, "_SOURCES", {key: "injected"})


class Block(nn.Module):
    def __init__(self, c: int = 8, p: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.drop = nn.Dropout(p)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv2(self.drop(torch.relu(self.bn(self.conv1(x))))))


class Net(nn.Module):
    """A stem, ``depth`` identical residual blocks and a head."""

    def __init__(self, depth: int = 4, p: float = 0.0):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(*[Block(8, p) for _ in range(depth)])
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.blocks(torch.relu(self.stem(x))).mean((2, 3)))


def _captured(model: nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    """``model``'s canonical graph with the shapes of ``x``'s forward recorded."""
    return sfx.sparsify(model, sfx.DropIT(keep=1.0, include=("nothing",)), example_inputs=(x,))


def _plan(model: nn.Module, x: torch.Tensor, **config) -> tuple[nn.Module, dict]:
    fast = sfx.sparsify(model, MemoryBudget(**config), example_inputs=(x,))
    return fast, sfx.explain(fast).memory_budget


# ---------------------------------------------------------------- one price per structure


def test_identical_blocks_have_one_signature_and_others_their_own():
    """A unit's signature is its ops on their shapes: ResNet-18's two blocks of layer1 are
    identical, layer2's first (a strided conv and a downsample) is not its second; the first
    block of a stack (whose input is the stem's) has its followers' signature."""
    torch.manual_seed(0)
    gm = _captured(torchvision.models.resnet18(), torch.randn(2, 3, 32, 32))
    blocks = {b.name: b for b in sfx.find_blocks(gm, gaps=True)}
    sig = {name: unit_signature(gm, b.nodes) for name, b in blocks.items()}
    assert sig["layer1.0"] == sig["layer1.1"]
    assert len({sig["layer2.0"], sig["layer2.1"], sig["layer3.1"], sig["layer1.1"]}) == 4
    twins = timing_twins(gm, [b.nodes for b in blocks.values()])
    # every node of layer1.1 takes the time of its counterpart in layer1.0, and only those
    assert set(twins) == {n.name for n in blocks["layer1.1"].nodes}
    assert list(twins.values()) == [n.name for n in blocks["layer1.0"].nodes]
    assert all(n.op == twin.op and (n.op == "call_module" or n.target == twin.target)
               for n, twin in zip(blocks["layer1.1"].nodes, blocks["layer1.0"].nodes, strict=True))

    gm = _captured(Net(depth=4), torch.randn(2, 3, 8, 8))
    blocks = [b for b in sfx.find_blocks(gm, gaps=True) if not b.gap]
    assert len({unit_signature(gm, b.nodes) for b in blocks}) == 1 and len(blocks) == 4


def test_node_seconds_time_each_structure_once():
    """With a noisy clock every node's time is its own draw; with the twins, the nodes of the
    identical blocks take the first block's times, and the other nodes keep their draws."""
    torch.manual_seed(0)
    gm = _captured(Net(depth=3), torch.randn(2, 3, 8, 8))
    blocks = [b for b in sfx.find_blocks(gm) if not b.gap]
    twins = timing_twins(gm, [b.nodes for b in blocks])

    def block_seconds(seconds: dict[str, float]) -> list[float]:
        return [sum(seconds[n.name] for n in b.nodes) for b in blocks]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(budget_costs, "_clock", tick_clock(jitter=0.5, seed=1))
        apart = budget_costs.node_seconds(gm)
        mp.setattr(budget_costs, "_clock", tick_clock(jitter=0.5, seed=1))
        shared = budget_costs.node_seconds(gm, twins)
    assert len(set(block_seconds(apart))) == 3  # timed apart: three prices for one block
    assert len(set(block_seconds(shared))) == 1
    assert all(shared[name] == shared[twin] for name, twin in twins.items())
    assert set(shared) == set(apart)
    assert all(TICK <= s < 1.5 * TICK for s in shared.values())  # each a (min of two) draws


def test_identical_blocks_get_one_price_whatever_the_noise():
    """Priced under a noisy clock, the identical blocks of a model offer the same seconds for
    every choice (their bytes differ only where a block's neighbours hold its tensors)."""
    inject_clock = tick_clock(jitter=0.5, seed=3)
    with pytest.MonkeyPatch.context() as mp:
        inject(mp, inject_clock)
        torch.manual_seed(0)
        _, plan = _plan(Net(depth=4), torch.randn(2, 3, 8, 8), fraction=0.5)
    blocks = {name: u for name, u in plan["units"].items() if name.startswith("blocks.")}
    assert len(blocks) == 4
    choices = set(blocks["blocks.1"]["options"])
    assert {"keep", "compress", "recompute"} <= choices
    # the last block's ReLU feeds the head's mean, not the next block's conv: it alone gets a
    # 1-bit mask under ActivationMemory (a conv that keeps the output makes one redundant)
    del blocks["blocks.3"]
    for choice in choices - {"keep"}:
        prices = {u["options"][choice]["seconds"] for u in blocks.values()}
        assert len(prices) == 1, (choice, prices)


def test_the_solver_breaks_ties_between_identical_units_the_same_way_at_any_price():
    """Six identical units priced alike: the plan's choice per unit is the same whatever the
    prices' common scale. With float sums in each DP path's order, 50 scales gave 16 different
    plans over these three budgets (which blocks recompute moved with the rounding)."""
    plans: dict[float, set[tuple[str, ...]]] = {}
    draw = random.Random(0)
    for _ in range(50):
        k = draw.uniform(0.5, 2.0)
        units = [[Choice("keep", 66048, 0.0), Choice("compress-exact", 41472, 1.25e-4 * k),
                  Choice("recompute", 4096, 5.5e-3 * k)] for _ in range(6)]
        for fraction in (0.3, 0.5, 0.7):
            budget = fraction * 6 * 66048
            plan = solve(units, budget)
            assert sum(c.bytes for c in plan) <= budget
            assert plan_seconds(plan) == plan_seconds(plan[::-1])
            plans.setdefault(fraction, set()).add(tuple(c.name for c in plan))
    assert all(len(p) == 1 for p in plans.values()), plans
    assert len({p for ps in plans.values() for p in ps}) == 3  # a plan per budget


# ---------------------------------------------------------------- plans and runs


def _choices(plan: dict) -> dict[str, str]:
    return {name: u["choice"] for name, u in plan["units"].items()}


@pytest.mark.parametrize("exact_only", [True, False], ids=["exact", "any"])
def test_two_plans_from_the_same_calibration_are_identical(exact_only, monkeypatch, tmp_path):
    """Two plans from one calibration (cached on disk, as a second process finds it) are the
    same plan: the same choice per unit, even where the node timings of the two runs differ by
    noise (the identical blocks share one price, so which of them a budget recomputes or
    compresses is not decided by their draws); with the same timings, the same prices too."""
    monkeypatch.setenv(calibration_cache.CACHE_DIR_ENV, str(tmp_path))
    key = calibration_cache.calibration_key(torch.device("cpu"), torch.float32)
    assert calibration_cache.store(key, RATES, 1.0) is not None
    torch.manual_seed(0)
    model, x = _TinyViT(depth=6), torch.randn(2, 16, 32)

    def plan(seed: int) -> dict:
        # a fresh process: nothing calibrated in memory, the cached calibration on disk
        monkeypatch.setattr(budget_costs, "_RATES", {})
        monkeypatch.setattr(budget_costs, "_clock", tick_clock(jitter=0.2, seed=seed))
        torch.manual_seed(0)
        _, summary = _plan(model, x, fraction=0.3, exact_only=exact_only)
        assert summary["prices"]["calibration"].startswith("cached (")
        return summary

    first, second, other = plan(seed=0), plan(seed=0), plan(seed=1)
    assert first == second  # the same timings: the same plan, every price and byte
    assert _choices(first) == _choices(other)
    assert first["achieved_bytes"] == other["achieved_bytes"]
    # identical blocks with different choices: which ones take which is what the draws decided
    # when each block was timed apart
    blocks = [c for name, c in _choices(first).items() if name.startswith("blocks.")]
    assert len(set(blocks)) > 1 and first["achieved_fraction"] <= 0.3 * 1.05


def test_a_seeded_training_run_with_a_budget_is_reproducible(monkeypatch):
    """Same seed, same injected calibration and clock: a budget at half the dense bytes with
    approximate choices (DropIT's random selection, bf16 storage) trains to bitwise the same
    losses and parameters twice."""

    def run() -> tuple[list[torch.Tensor], dict[str, torch.Tensor], dict[str, str]]:
        inject(monkeypatch)
        torch.manual_seed(0)
        model, x = Net(depth=3, p=0.1), torch.randn(4, 3, 8, 8)
        target = torch.randn(4, 5)
        fast, plan = _plan(model, x, fraction=0.5, exact_only=False)
        fast.train()
        opt = torch.optim.SGD(fast.parameters(), lr=0.05, momentum=0.9)
        losses = []
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            loss = (fast(x) - target).square().mean()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        params = {name: p.detach().clone() for name, p in fast.named_parameters()}
        return losses, params, _choices(plan)

    losses, params, choices = run()
    assert "compress" in choices.values()  # DropIT's random selection among the rewrites
    losses_again, params_again, choices_again = run()
    assert choices_again == choices
    torch.testing.assert_close(losses_again, losses, rtol=0, atol=0)
    torch.testing.assert_close(params_again, params, rtol=0, atol=0)
    assert not torch.equal(losses[0], losses[-1])  # it did train
