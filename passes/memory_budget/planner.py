"""Memory budget: for every block, keep, compress or recompute its saved activations so that
the whole model's backward holds at most the budget, at the least added step time.

Units are the model's repeated blocks (``sfx.find_blocks``: ResNet's ``layer1.0``, ViT's
``encoder_layer_3``) plus one unit for everything outside them (stem, head). Each unit has
up to six choices:

===============  ===========================================================  ==============
choice           what is rewritten                                            gradient
===============  ===========================================================  ==============
keep             nothing                                                      exact
compress-exact   ReLU keeps a 1-bit mask; a GELU/SiLU/LayerNorm feeding a     exact
                 Linear is fused with it and recomputed in backward, and so
                 is a BatchNorm -> ReLU feeding a Conv
                 (``ActivationMemory(relu="bitmask", gelu=silu=layernorm=
                 batchnorm="recompute", scale=attention=dense="off")``)
compress-light   ``ActivationMemory(attention="bf16")`` alone: BatchNorm /       approximate
                 LayerNorm / GELU / SiLU / attention in bf16, ReLU 1-bit
compress-fused   compress-exact's fusions keeping a bf16 copy of their input     approximate
                 (``"recompute-bf16"``), the other norms / activations and
                 attention bf16: a fused link keeps 2 bytes per element where
                 compress-light keeps 2 + 4 (ResNet-50 0.59x at 1.08x,
                 ViT-B/16 0.35x at 1.07x, against 0.75x / 0.72x)
compress-bf16    compress-fused and the Linear / Conv inputs the fusions leave   approximate
                 in bf16 too (``dense="bf16"``), so every saved tensor is bf16
compress         DropIT(keep) on Linear/Conv + ``ActivationMemory(attention=  approximate
                 "bf16")`` (``MemoryBudget.attention``)
recompute        the block re-runs in backward (``sfx.recompute_segment``)     exact
===============  ===========================================================  ==============

Cost model (times: ``passes/memory_budget/costs.py``). Bytes come from the liveness analysis
(``sfx.memory_plan``) of a trial rewrite with one choice applied to every unit, each held
storage charged to the unit of its last holder (a block's output to the next block, so the
units' bytes add up across mixed choices). Time: a recompute costs the block's forward, timed
node by node on the example shapes (synchronised around each node on CUDA); a compression
costs its compress + decompress work, ``fixed seconds per op + bytes x seconds-per-byte`` from
a calibration of each compressed form on this device at two sizes (once per device and dtype,
cached on disk: ``passes/memory_budget/calibration_cache.py``). The fixed part is what dominates on a GPU in
eager mode.

Solver (``passes/memory_budget/solver.py``). Per unit, choices that are no smaller and no faster than another are dropped (a
compressed form slower than recomputing for the same bytes is never chosen). Then a dynamic
program over bytes (``solve_dp``, a multiple-choice knapsack in cells of budget/4096, each
choice rounded up so the plan always fits) finds the least estimated time; ``solve`` takes
greedy's plan instead where the rounding lost a faster one that fits. The plan is
applied to a copy, measured with the liveness analysis, and re-solved with the excess added
to the pressure until it fits, then with the pressure bisected back towards the budget (seven
rounds at most), so the achieved bytes, not the estimate, meet the budget without a plan
well under it. ``solve_exact`` is the brute-force optimum the tests compare with; ``solve_greedy``
(most bytes saved per second first) is kept for comparison.

About 590 lines, in pipeline order: the config, the units (blocks and gaps), the trials that
price each choice, solving to fit, and the plan it reports; the prices, the solver, the timings
and the calibration cache are the modules beside it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx as fx
from sparsify_fx.passes.activation_memory.rewrite import ActivationMemory
from sparsify_fx.passes.dropit import DropIT
from sparsify_fx.passes.kernels.bf16_matmul import WEIGHT_GRAD, bf16_weight_grad
from sparsify_fx.passes.memory_budget.costs import (
    calibrate,
    calibration_source,
    host_share,
    measure_added_seconds,
    node_seconds,
)
from sparsify_fx.passes.memory_budget.prices import compress_seconds, floored, timing_twins
from sparsify_fx.passes.memory_budget.solver import (
    Choice,
    plan_seconds,
    solve,
    solve_dp,
    solve_exact,
    solve_greedy,
)

import sparsify_fx as sfx
from sparsify_fx import (
    ConfigError,
    PassConfig,
    PassError,
    PassPlan,
    PassResult,
    PlanOption,
    PlanUnit,
    Rewrite,
    Skip,
    check_range,
)

__all__ = ["MemoryBudget", "Choice", "solve", "solve_dp", "solve_greedy", "solve_exact", "calibrate", "CHOICES"]

CHOICES = ("keep", "compress-exact", "compress-light", "compress-fused", "compress-bf16", "compress", "recompute")
_COMPRESSED = ("compress-exact", "compress-light", "compress-fused", "compress-bf16", "compress")
_EXACT = ("keep", "compress-exact", "recompute")
_REST = "(outside blocks)"
#: ``MemoryBudget.autocast`` -> dtype ("auto": the context active at sparsify)
_AUTOCAST_DTYPES: dict[str | None, torch.dtype | None] = {
    "auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "off": None, None: None}


@dataclass(frozen=True)
class MemoryBudget(PassConfig):
    """Hold at most ``fraction`` of the dense saved-activation bytes (or ``bytes``).

    Args:
        fraction: budget as a fraction of the dense model's saved-activation bytes, (0, 1].
        bytes: budget in bytes (instead of ``fraction``).
        exact_only: only choices with exact gradients (keep, 1-bit ReLU, recompute).
        keep: DropIT's kept fraction for the approximate ``compress`` choice.
        attention: how the ``compress`` choice stores unmasked attention's q, k, v
            (``ActivationMemory.attention``): ``"bf16"`` (default), ``"int8"`` or ``"off"``.
            On ViT-B/16 it is what takes a plan below 0.5 without recomputing blocks.
        measure_steps: rounds of whole-model training steps (on random inputs of the
            recorded shapes, interleaved with the dense model) that check the calibrated
            prices: a choice applied to every unit that measures dearer than its estimate
            (by more than the gap between the dense model's two best steps) has its
            per-unit prices scaled up to match. ``0`` (default): calibrated prices only.
            Opt-in because it costs
            ``(choices + 1) x (measure_steps + 1)`` training steps (ViT-B/16 on a CPU: about
            2.5 s each) and a few steps on a noisy host measure noise. Runs on copies with
            their own buffers (BatchNorm's running statistics are not touched); gradients
            and the RNG state are restored.
        calibration: ``"cached"`` (default) reuses this machine's calibration of the
            compressed forms from an earlier run (same device, dtype, torch, threads and
            code; ``passes/memory_budget/calibration_cache.py``), measuring it where there is none:
            planning ViT-B/16 on a 2-core CPU took 7 s instead of 12.6, and a budget gets the
            same prices run after run. ``"fresh"`` measures it again and replaces the file.
        weight_grad: how the approximate choices that keep a Linear / Conv input as bf16
            (compress-fused, compress-bf16) compute its weight gradient
            (``ActivationMemory.weight_grad``, ``passes/kernels/bf16_matmul.py``): ``"auto"`` (default)
            on bf16 operands where the device has bf16 matrix units, which makes those
            choices cheaper than their casts alone (ViT-B/16 keeping every input as bf16
            stepped in 0.85x the dense time on a 2-core Sapphire Rapids); priced with a
            calibrated ratio of the two weight gradients' times.
        autocast: the autocast dtype the training forward will run at, which the plan is made
            for: ``"auto"`` (default) that of a ``torch.autocast`` context active at
            ``sfx.sparsify`` (none: no autocast), or ``"bf16"`` / ``"fp16"``, or ``None`` /
            ``"off"``. Under it the shapes and dtypes are recorded again inside
            ``torch.autocast`` and the memory plan counts what autocast really keeps (the
            bf16 copies of matmul inputs and weights), so the fraction is of the autocast
            dense bytes, a bf16 form of an already-bf16 tensor saves nothing, and the
            planner recomputes where compression has nothing left to halve.

    Example:
        >>> import torch, torchvision, sparsify_fx as sfx
        >>> m = torchvision.models.resnet18()
        >>> fast = sfx.sparsify(m, sfx.MemoryBudget(fraction=0.5), example_inputs=(torch.randn(2, 3, 32, 32),))
        >>> sfx.explain(fast).memory_budget["achieved_fraction"] <= 0.5 * 1.05
        True
    """

    plans_per_size: ClassVar[bool] = True

    fraction: float | None = 0.5
    bytes: int | None = None
    exact_only: bool = False
    keep: float = 0.1
    attention: str = "bf16"
    measure_steps: int = 0
    calibration: str = "cached"
    weight_grad: str = "auto"
    autocast: str | None = "auto"
    #: where no plan holds the budget (+5 %): ``"warn"`` returns the smallest plan found with a
    #: UserWarning naming its fraction, ``"raise"`` refuses with a PassError naming it
    on_unreachable: str = "warn"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bytes is not None:
            if isinstance(self.bytes, bool) or not isinstance(self.bytes, int) or self.bytes < 0:
                raise ConfigError(f"MemoryBudget.bytes must be a non-negative int, got {self.bytes!r}")
        elif self.fraction is None:
            raise ConfigError("MemoryBudget needs fraction= or bytes=")
        else:
            check_range(self, "fraction", self.fraction, 0.0, 1.0, low_open=True)
        if not isinstance(self.exact_only, bool):
            raise ConfigError(f"MemoryBudget.exact_only must be a bool, got {self.exact_only!r}")
        check_range(self, "keep", self.keep, 0.0, 1.0, low_open=True)
        if isinstance(self.measure_steps, bool) or not isinstance(self.measure_steps, int) or self.measure_steps < 0:
            raise ConfigError(f"MemoryBudget.measure_steps must be an int >= 0, got {self.measure_steps!r}")
        if self.attention not in ("bf16", "int8", "off"):
            raise ConfigError(f"MemoryBudget.attention must be 'bf16', 'int8' or 'off', got {self.attention!r}")
        if self.weight_grad not in WEIGHT_GRAD:
            raise ConfigError(f"MemoryBudget.weight_grad must be one of {list(WEIGHT_GRAD)}, got {self.weight_grad!r}")
        if self.autocast not in _AUTOCAST_DTYPES:
            raise ConfigError(f"MemoryBudget.autocast must be one of {list(_AUTOCAST_DTYPES)}, got {self.autocast!r}")
        if self.calibration not in ("cached", "fresh"):
            raise ConfigError(f"MemoryBudget.calibration must be 'cached' or 'fresh', got {self.calibration!r}")
        if self.on_unreachable not in ("warn", "raise"):
            raise ConfigError(f"MemoryBudget.on_unreachable must be 'warn' or 'raise', got {self.on_unreachable!r}")


# ---------------------------------------------------------------- trial rewrites


@dataclass
class _Unit:
    name: str
    block: sfx.Block | None
    choices: dict[str, Choice] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)  # choice -> why it is unavailable
    #: each choice's estimated seconds; a compressed one's price (``choices``) is it ``budget_prices.floored``
    #: (it is negative where bf16 weight gradients save more than the casts cost)
    estimates: dict[str, float] = field(default_factory=dict)

    def offer(self, choice: str, nbytes: float, estimate: float) -> None:
        self.estimates[choice] = estimate
        price = floored(estimate) if choice in _COMPRESSED else estimate
        self.choices[choice] = Choice(choice, nbytes, price)


def _compress_configs(choice: str, config: MemoryBudget, in_units) -> list[PassConfig]:
    def filter_fn(name: str, module) -> bool:
        return in_units(name)

    if choice == "compress-exact":
        # exact forms only: 1-bit ReLU masks, GELU/SiLU/LayerNorm outputs recomputed for their
        # Linear, BatchNorm -> ReLU outputs recomputed for their Conv; every other form off
        # (``scale`` defaults to bf16: left on, ConvNeXt's layer scale keeps a bf16
        # input under exact_only=True, its gradient 1e-3 off)
        return [ActivationMemory(relu="bitmask", gelu="recompute", silu="recompute", batchnorm="recompute",
                                 layernorm="recompute", scale="off", attention="off", dense="off",
                                 filter_fn=filter_fn)]
    if choice == "compress-light":
        # the norms / activations / attention only: no DropIT, whose selection is most of the
        # compress choice's time on a CNN
        # (the attention keeps its output, which the projection after it holds anyway)
        return [ActivationMemory(attention=config.attention, attention_output="keep", filter_fn=filter_fn)]
    if choice in ("compress-fused", "compress-bf16"):
        # the exact fusions keeping bf16 inputs, the rest bf16; compress-bf16 also the Linear /
        # Conv inputs no fusion took: every saved tensor halved (so there the attention's output,
        # which the projection no longer holds, is not kept either)
        fused = "recompute-bf16"
        bf16 = choice == "compress-bf16"
        return [ActivationMemory(attention=config.attention, attention_output="recompute" if bf16 else "keep",
                                 gelu=fused, silu=fused, layernorm=fused, batchnorm=fused,
                                 dense="bf16" if bf16 else "off", weight_grad=config.weight_grad,
                                 filter_fn=filter_fn)]
    return [DropIT(keep=config.keep, filter_fn=filter_fn),
            ActivationMemory(attention=config.attention, filter_fn=filter_fn)]


def _apply(gm: fx.GraphModule, plan: dict[str, str], units: dict[str, _Unit], config, ctx):
    """Rewrite ``gm`` in place with ``plan`` (unit -> choice); returns the inner rewrites."""
    for name, choice in plan.items():
        if choice == "recompute":
            block = units[name].block
            fresh = {b.name: b for b in sfx.find_blocks(gm, gaps=True)}[block.name]
            sfx.recompute_segment(gm, fresh)
    rewrites: list[Rewrite] = []
    for choice in _COMPRESSED:
        chosen = {n for n, c in plan.items() if c == choice}
        if not chosen:
            continue

        def in_units(qualified: str, chosen=chosen) -> bool:
            return _unit_of(qualified, units, ctx) in chosen

        for inner in _compress_configs(choice, config, in_units):
            # through the manager: each inner pass is linted and rolled back on its own, and an
            # error names it (inside this pass's own error)
            rewrites += sfx.run_pass(gm, inner, ctx).rewrites
    gm.graph.lint()
    gm.recompile()
    return rewrites


def _unit_of(qualified: str, units: dict[str, _Unit], ctx) -> str:
    best, best_len = _REST, -1
    for name, unit in units.items():
        block = unit.block
        if block is None:
            continue
        if block.gap:
            # its modules, or its recomputed segment (named after the gap)
            if best_len < 0 and (qualified == ctx.qualified(block.name)
                                 or qualified in {ctx.qualified(m) for m in block.modules}):
                best = name
            continue
        q = ctx.qualified(block.name)
        if (qualified == q or qualified.startswith(q + ".")) and len(q) > best_len:
            best, best_len = name, len(q)
    return best


def _trial(gm, plan, units, config, ctx) -> tuple[dict[str, float], float, list[Rewrite], fx.GraphModule]:
    trial = sfx.structural_copy(gm)
    rewrites = _apply(trial, plan, units, config, ctx)
    compressed = sfx.compressed_bytes_of(rewrites)
    mplan = sfx.memory_plan(trial, compressed, inputs_require_grad=bool(ctx.prefix) or None)
    per_unit = {name: 0.0 for name in units}
    nodes = {n.name: n for n in trial.graph.nodes}
    # each held storage once, as memory_plan counts it (q, k, v of one projection once; a
    # recomputed segment's tuple of outputs too), charged to its last holder's unit: a block's
    # output to the next block, which keeps it whatever this block's choice (its first op, or
    # its re-run, holds it), so the units' bytes add up across mixed choices
    order = {name: i for i, name in enumerate(nodes)}  # graph order
    by_node = {t.node: t for t in mplan.tensors}
    for root, held in mplan.storage_bytes.items():
        holder = nodes.get(max(by_node[root].holders, key=lambda h: order.get(h, -1)))
        module = sfx.module_name_of(holder) if holder is not None else ""
        per_unit[_unit_of(ctx.qualified(module), units, ctx)] += held
    for name, side in mplan.side_bytes.items():
        if name in nodes:
            per_unit[_unit_of(ctx.qualified(sfx.module_name_of(nodes[name])), units, ctx)] += side
    for r in rewrites:
        per_unit[_unit_of(r.module, units, ctx)] += r.saved_bytes_after or 0
    return per_unit, float(mplan.total_bytes), rewrites, trial


# ---------------------------------------------------------------- measured prices


def _check_prices(gm, units: dict[str, _Unit], trials: dict[str, fx.GraphModule], rounds: int) -> dict[str, Any]:
    """Scale each choice's per-unit seconds up to what applying it to every unit measures.

    The calibration times each compressed form alone, on one tensor; in a model, every custom
    op's dispatch, cache misses and the allocator add to that (with a 1 MB calibration tensor,
    ResNet-50's compress plan measured 3-5x its estimate). Prices only go up, and only
    when the measured excess over the estimate is larger than the gap between the dense
    model's two best steps: on a noisy host a few steps measure noise (negative added times are
    common), and a price lowered by noise would let a budget above dense compress.
    """
    measured, noise = measure_added_seconds(gm, trials, rounds)
    scales: dict[str, float] = {}
    for choice, added in measured.items():
        estimated = sum(u.choices[choice].seconds for u in units.values() if choice in u.choices)
        scale = added / estimated if estimated > 0 and added - estimated > noise else 1.0
        scales[choice] = scale
        for u in units.values():
            if choice in u.choices:
                c = u.choices[choice]
                u.choices[choice] = Choice(c.name, c.bytes, c.seconds * scale)
                if u.estimates.get(choice, 0.0) > 0:  # the reported estimate follows; a saving stays
                    u.estimates[choice] *= scale
    return {"measured_added_seconds": measured, "noise_seconds": noise, "price_scale": scales}


# ---------------------------------------------------------------- the pass


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def _autocast_of(config: MemoryBudget, device: torch.device) -> torch.dtype | None:
    """The dtype the training forward will run at: the config's, or the context's at sparsify."""
    if config.autocast != "auto":
        return _AUTOCAST_DTYPES[config.autocast]
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    # (enabled=False where the plan is for no autocast: a context around sparsify with
    # autocast="off" must not change what the planner times and probes)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def _record_under_autocast(gm: fx.GraphModule, dtype: torch.dtype, device: torch.device) -> None:
    """Record shapes and dtypes again as autocast computes them (a Linear's output in bf16,
    the residual stream in fp32), on random inputs of the recorded shapes."""
    from sparsify_fx.passes.memory_budget.costs import example_input, rng_kept
    args = [example_input(n, device) for n in gm.graph.nodes if n.op == "placeholder"]
    modes = {name: m.training for name, m in gm.named_modules()}
    try:
        gm.eval()
        with torch.no_grad(), rng_kept(device), _autocast(device, dtype):
            sfx.ShapeRecorder(gm).run(*args)
    finally:
        for name, m in gm.named_modules():
            m.training = modes.get(name, m.training)


def _units_of(gm: fx.GraphModule) -> dict[str, _Unit]:
    units: dict[str, _Unit] = {_REST: _Unit(_REST, None)}
    for block in sfx.find_blocks(gm, gaps=True):
        units[block.name] = _Unit(block.name, block)
        if block.reason is not None:
            units[block.name].reasons["recompute"] = block.reason
    units[_REST].reasons["recompute"] = "nodes outside every block and gap"
    return units


def _price(gm: fx.GraphModule, units: dict[str, _Unit], config: MemoryBudget, ctx,
           result: PassResult) -> dict[str, Any]:
    """Fill every unit's choices (bytes, estimated seconds); returns how the prices were made."""
    # identical blocks take the first one's node times: one price per structure, so which of
    # them a plan picks does not depend on each one's draw of the host's noise
    per_node = node_seconds(gm, timing_twins(gm, [u.block.nodes for u in units.values() if u.block is not None]))
    param = next(gm.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    with torch.autocast(device.type, enabled=False):  # (the cached calibration is of plain ops)
        rates = calibrate(device, dtype, fresh=config.calibration == "fresh")
    bf16_mm = bf16_weight_grad(config.weight_grad, torch.empty(0, device=device, dtype=dtype))

    names = list(units)
    allowed = _EXACT if config.exact_only else CHOICES
    host = host_share(gm) if any(c in allowed for c in _COMPRESSED) else 1.0
    keep_bytes, _, _, _ = _trial(gm, {}, units, config, ctx)
    for name in names:
        units[name].offer("keep", keep_bytes[name], 0.0)
    trials: dict[str, fx.GraphModule] = {}  # each choice applied to every unit it can take
    for choice in _COMPRESSED:
        if choice not in allowed:
            continue
        per_unit, _, rewrites, trials[choice] = _trial(gm, dict.fromkeys(names, choice), units, config, ctx)
        # (a unit with a rewrite in it has an entry, even a zero one)
        seconds = compress_seconds(rewrites, lambda m: _unit_of(m, units, ctx), rates, per_node, host, bf16_mm)
        for name in names:
            if name in seconds:
                units[name].offer(choice, per_unit[name], seconds[name])
            else:
                units[name].reasons[choice] = "nothing in it to compress"
    if "recompute" in allowed:
        recomputable = [n for n in names if "recompute" not in units[n].reasons]
        if recomputable:
            per_unit, _, _, trial = _trial(gm, dict.fromkeys(recomputable, "recompute"), units, config, ctx)
            trials["recompute"] = trial
            # what backward re-runs: the block less the Linears whose value nothing reads
            skipped = {n.name for m in trial.modules() if isinstance(m, sfx.RecomputedSegment)
                       and m.replay is not None for n in m.replay.graph.nodes
                       if n.target is sfx.grad_only_linear}
            for name in recomputable:
                fwd = sum(per_node.get(n.name, 0.0) for n in units[name].block.nodes if n.name not in skipped)
                units[name].offer("recompute", per_unit[name], fwd)

    prices: dict[str, Any] = {"measured": False, "host_share": host, "calibration": calibration_source(device, dtype)}
    if config.measure_steps and trials:
        try:
            prices |= {"measured": True, **_check_prices(gm, units, trials, config.measure_steps)}
        except Exception as e:  # noqa: BLE001  (the calibrated prices still make a plan)
            prices["why"] = f"{type(e).__name__}: {e}"
            result.skips.append(Skip(ctx.pass_name, "(prices)", ctx.prefix.rstrip("."), "plan",
                                     f"whole-model training steps failed on random inputs ({prices['why']}); "
                                     "planned with the calibrated prices alone (measure_steps=0 skips the check)"))
    return prices


def _solve_to_fit(gm: fx.GraphModule, units: dict[str, _Unit], budget: float, config: MemoryBudget,
                  ctx) -> tuple[float, dict[str, str]]:
    """The fastest plan whose applied rewrite holds at most ``budget`` bytes (else the smallest
    found); returns its achieved bytes and the plan (unit -> choice)."""
    # the estimate charges each tensor to one unit; the liveness analysis of the applied plan
    # is the truth (a block's output is held by the next block's first op, whose choice
    # decides how), so re-solve under more pressure until the achieved bytes fit, then bisect
    # the pressure back towards the budget: a plan well under it recomputes more than needed
    names = list(units)
    measured_bytes: dict[tuple, float] = {}

    def achieved_by(candidate: dict[str, str]) -> float:
        key = tuple(sorted(candidate.items()))
        if key not in measured_bytes:
            measured_bytes[key] = _trial(gm, {n: c for n, c in candidate.items() if c != "keep"},
                                         units, config, ctx)[1]
        return measured_bytes[key]

    pressure, fitting, failing = budget, None, None
    best: tuple[bool, float, float, dict[str, str]] | None = None
    for _round in range(7):
        picked = solve([list(units[n].choices.values()) for n in names], pressure)
        candidate = {n: c.name for n, c in zip(names, picked)}
        measured = achieved_by(candidate)
        seconds = plan_seconds(picked)  # (the same for plans of the same choices in any order)
        fits = measured <= budget
        key = (fits, -seconds if fits else -measured)
        if best is None or key > (best[0], best[1]):
            best = (fits, key[1], measured, candidate)
        if fits:
            fitting = pressure
            if failing is None:
                break  # the plan for the budget itself fits
        else:
            failing = pressure
        if fitting is None:
            pressure = max(0.0, pressure - (measured - budget) * 1.5)
        elif failing - fitting <= 0.01 * budget:
            break
        else:
            pressure = (fitting + failing) / 2
    _, _, achieved, plan = best
    return achieved, plan


def _plan_units(units: dict[str, _Unit], plan: dict[str, str]) -> tuple[PlanUnit, ...]:
    # (seconds: the price the solver compared, estimated_seconds: the estimate before the
    # floor, below zero where bf16 weight gradients save more than the casts cost)
    return tuple(
        PlanUnit(name, plan[name],
                 {k: PlanOption(int(v.bytes), v.seconds, unit.estimates[k]) for k, v in unit.choices.items()},
                 dict(unit.reasons))
        for name, unit in units.items()
    )


def _report(result: PassResult, units: dict[str, _Unit], plan: dict[str, str], summary: PassPlan,
            inner: list[Rewrite], config: MemoryBudget, ctx) -> None:
    """The plan, one rewrite per unit changed (then the inner passes' own), and skips."""
    result.plans.append(summary)
    for name, unit in units.items():
        choice = plan[name]
        c = unit.choices[choice]
        module = ctx.qualified(unit.block.name) if unit.block and not unit.block.gap else name
        if choice == "keep":
            others = ", ".join(f"{k}: {_mib(v.bytes)} {unit.estimates[k] * 1e3:+.1f} ms"
                               for k, v in unit.choices.items() if k != "keep")
            result.skips.append(Skip(ctx.pass_name, name, module, "block",
                                     f"kept dense ({_mib(c.bytes)}): the budget is met "
                                     f"without it" + (f" (options: {others})" if others else "")))
            continue
        # compressed units' bytes are counted by the DropIT / ActivationMemory rewrites below
        counted = choice == "recompute"
        result.rewrites.append(Rewrite(
            ctx.pass_name, name, module, choice, choice,
            saved_bytes_before=int(unit.choices["keep"].bytes) if counted else None,
            saved_bytes_after=int(c.bytes) if counted else None,
            details={"estimated_seconds": c.seconds, "bytes_before": int(unit.choices["keep"].bytes),
                     "bytes_after": int(c.bytes)},
        ))
    result.rewrites += inner
    if not summary.reachable:
        achieved, budget, dense = summary.achieved_bytes, summary.budget_bytes, summary.dense_bytes
        result.skips.append(Skip(ctx.pass_name, "(plan)", ctx.prefix.rstrip("."), "plan",
                                 f"budget {_mib(budget)} not reachable with "
                                 f"{'exact ' if config.exact_only else ''}choices; smallest plan "
                                 f"found holds {_mib(achieved)} "
                                 f"({achieved / dense:.3f}x dense)"))


@sfx.register_pass(MemoryBudget, name="budget")
def _memory_budget_pass(gm: fx.GraphModule, config: MemoryBudget, ctx) -> PassResult:
    result = PassResult(gm, modified=False)
    if gm.meta.get(sfx.meta.NO_GRAD):
        result.skips.append(Skip(ctx.pass_name, "(graph)", ctx.prefix.rstrip("."), "graph",
                                 "graph captured with grad disabled: it holds nothing for backward"))
        return result
    if not any(sfx.meta.SHAPE in n.meta for n in gm.graph.nodes):
        result.skips.append(Skip(ctx.pass_name, "(graph)", ctx.prefix.rstrip("."), "graph",
                                 "no recorded shapes: call sparsify with example_inputs"))
        return result
    param = next(gm.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    low = _autocast_of(config, device)
    if low is not None:
        try:
            _record_under_autocast(gm, low, device)
            gm.meta[sfx.meta.AUTOCAST] = low
        except Exception as e:  # noqa: BLE001  (the fp32 shapes still make a plan)
            low = None
            result.skips.append(Skip(ctx.pass_name, "(autocast)", ctx.prefix.rstrip("."), "plan",
                                     f"shapes not recorded under autocast ({type(e).__name__}: {e}); "
                                     "planned without autocast"))
    if low is None:
        gm.meta.pop(sfx.meta.AUTOCAST, None)
    with _autocast(device, low):  # node times, probes and trial steps as the training step runs them
        # (a submodule's graph takes activations, which require grad; the root takes data)
        dense = float(sfx.memory_plan(gm, inputs_require_grad=bool(ctx.prefix) or None).total_bytes)
        budget = float(config.bytes) if config.bytes is not None else config.fraction * dense
        units = _units_of(gm)
        prices = _price(gm, units, config, ctx, result)
        achieved, plan = _solve_to_fit(gm, units, budget, config, ctx)
        inner = _apply(gm, {n: c for n, c in plan.items() if c != "keep"}, units, config, ctx)
    summary = PassPlan(
        ctx.pass_name, ctx.prefix.rstrip("."),
        dense_bytes=int(dense), budget_bytes=int(budget), achieved_bytes=int(achieved),
        reachable=achieved <= budget * 1.05,
        estimated_seconds=sum(units[n].estimates[plan[n]] for n in units),
        units=_plan_units(units, plan),
        details={"exact_only": config.exact_only, "prices": prices,
                 "autocast": str(low).removeprefix("torch.") if low is not None else None},
    )
    if not summary.reachable:
        _unreachable(summary, config, ctx)
    _report(result, units, plan, summary, inner, config, ctx)
    result.modified = any(c != "keep" for c in plan.values())
    return result


def _unreachable(summary: PassPlan, config: MemoryBudget, ctx) -> None:
    """Refuse (``on_unreachable="raise"``) or warn: a plan over its budget must not pass
    as one that holds it (the skip in the report alone went unseen)."""
    smallest = summary.achieved_bytes / summary.dense_bytes if summary.dense_bytes else 1.0
    asked = summary.budget_bytes / summary.dense_bytes if summary.dense_bytes else 0.0
    where = ctx.prefix.rstrip(".") or "(root)"
    choices = "exact choices (exact_only=True)" if config.exact_only else "its choices"
    message = (f"MemoryBudget: the budget {asked:.3f}x of dense ({_mib(summary.budget_bytes)}) of graph {where} "
               f"is not reachable with {choices}; the smallest plan found holds {smallest:.3f}x "
               f"({_mib(summary.achieved_bytes)}): the block inputs and what no rewrite compresses. Ask for "
               f"fraction >= {math.ceil(smallest * 100) / 100:.2f}" + ("" if not config.exact_only else
                                                                       " or allow approximate choices") +
               (", or pass on_unreachable='warn' to accept the smallest plan" if config.on_unreachable == "raise"
                else " (on_unreachable='raise' refuses instead)"))
    if config.on_unreachable == "raise":
        raise PassError(message, pass_name=ctx.pass_name)
    warnings.warn(message, UserWarning, stacklevel=2)
