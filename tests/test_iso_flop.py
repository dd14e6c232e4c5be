"""Tests of the Sparse Iso-FLOP pass (passes/iso_flop/)."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn as nn
import torchvision
from sparsify_fx.passes.iso_flop import (
    RigL,
    apply_masks_,
    doped_rank,
    hidden_width,
    masked_weights,
    parallel_branches,
)
from torch.utils.flop_counter import FlopCounterMode

import sparsify_fx as sfx

KINDS = ["parallel", "wide", "factorized", "doped"]
SPARSITIES = [0.5, 0.75, 0.9]


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64), nn.ReLU(),
        nn.Linear(64, 10),
    )


class _TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv1 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 16, 1)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        x = self.conv3(x)
        return self.head(x.mean((2, 3)))


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    model = _TinyCNN()
    # non-trivial running statistics, so a widened BatchNorm must carry them over
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 8, 8))
    return model.eval()


def _inputs(name: str) -> tuple[torch.Tensor]:
    torch.manual_seed(1)
    return (torch.randn(4, 16),) if name == "mlp" else (torch.randn(2, 3, 8, 8),)


MODELS = {"mlp": _mlp, "cnn": _cnn}


def _rewrite(model: nn.Module, x: tuple, **kw) -> nn.Module:
    verify = kw.pop("verify", False)
    return sfx.sparsify(model, sfx.IsoFLOP(**kw), example_inputs=x, verify=verify)


def _within(after: int, before: int, tol: float = 0.02) -> bool:
    return abs(after / before - 1) <= tol


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"kind": "deep"}, "kind"),
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": -0.1}, "sparsity"),
        ({"sparsity": "0.5"}, "sparsity"),
        ({"init": "zeros"}, "init"),
        ({"skip_first_last": 1}, "skip_first_last"),
        ({"seed": 1.5}, "seed"),
        ({"dynamic": 1}, "dynamic"),
        ({"update_every": 0}, "update_every"),
        ({"drop_fraction": 0.0}, "drop_fraction"),
        ({"stop_at": 0}, "stop_at"),
        ({"factorized_norm": "ln"}, "factorized_norm"),
    ],
)
def test_config_validation_names_field_and_value(kwargs, field):
    with pytest.raises(sfx.ConfigError) as info:
        sfx.IsoFLOP(**kwargs)
    assert f"IsoFLOP.{field}" in str(info.value)
    assert repr(kwargs[field]) in str(info.value)


def test_config_defaults_and_recipe_name():
    config = sfx.IsoFLOP()
    assert (config.kind, config.sparsity, config.init, config.skip_first_last) == ("parallel", 0.5, "random", True)
    assert (config.dynamic, config.update_every, config.drop_fraction, config.stop_at) == (True, 100, 0.3, None)
    assert config.recipe_name == "isoflop"
    assert sfx.IsoFLOP(sparsity=0).sparsity == 0


def test_formulas():
    assert parallel_branches(0.5) == 2 and parallel_branches(0.75) == 4 and parallel_branches(0.9) == 10
    assert hidden_width(64, 64, 0.5) == 64
    assert hidden_width(576, 64, 0.9) == math.ceil(576 * 64 / (0.1 * 640))
    assert doped_rank(64, 64, 0.5) == 16


# ---------------------------------------------------------------- iso-FLOP counts


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_nonzero_weights_and_counted_flops_match_dense(model_name, kind, sparsity):
    x = _inputs(model_name)
    fast = _rewrite(MODELS[model_name](), x, kind=kind, sparsity=sparsity, init="random")
    rewrites = sfx.explain(fast).rewrites
    assert rewrites, "nothing was rewritten"
    for r in rewrites:
        assert _within(r.details["nnz_after"], r.details["nnz_before"]), (r.module, r.details)
        assert _within(r.flops_after, r.flops_before), (r.module, r.flops_before, r.flops_after)
    # the masks in the module are what the report counted
    counted = sum(r.details["nnz_after"] for r in rewrites)
    in_model = sum(m.nnz for _, m in masked_weights(fast))
    low_rank = sum(p.numel() for n, p in fast.named_parameters() if n.endswith((".up", ".down")))
    assert in_model + low_rank == counted


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("kind", KINDS)
def test_resnet18_iso_flop(kind, sparsity):
    model = torchvision.models.resnet18(num_classes=10)
    # layer4 holds 75% of the weights and repeats layer3's shapes at twice the width; above
    # s=0.5 the replacements hold up to 10x its weights, so it is left out to keep this fast
    exclude = () if sparsity == 0.5 else ("layer4.*",)
    fast = _rewrite(model, (torch.randn(1, 3, 32, 32),), kind=kind, sparsity=sparsity, init="random", exclude=exclude)
    report = sfx.explain(fast)
    assert len(report.rewrites) + len(report.skipped) == 21  # 20 convs + fc
    # wide: conv1 -> bn1 -> relu -> conv2 of each block; the others: every inner conv
    expected = {("wide", 0.5): 16, ("wide", 0.75): 12}.get((kind, min(sparsity, 0.75)), 19 if sparsity == 0.5 else 14)
    assert len(report.rewrites) == expected
    for r in report.rewrites:
        assert _within(r.details["nnz_after"], r.details["nnz_before"]), (r.module, r.details)
        assert _within(r.flops_after, r.flops_before), (r.module, r.flops_before, r.flops_after)
    skipped = {s.module: s.reason for s in report.skipped}
    assert "first/last" in skipped["conv1"] and "first/last" in skipped["fc"]
    if kind == "wide":
        assert "operator.iadd" in skipped["layer2.0.downsample.0"]  # the residual `out += identity`


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_flop_accounting_matches_flop_counter(model_name, kind):
    x = _inputs(model_name)
    model = MODELS[model_name]()
    fast = _rewrite(model, x, kind=kind, sparsity=0.75, init="random")
    report = sfx.explain(fast)
    with FlopCounterMode(display=False) as dense_counter:
        model(*x)
    with FlopCounterMode(display=False) as sparse_counter:
        fast(*x)
    untouched = dense_counter.get_total_flops() - sum(r.flops_before for r in report.rewrites)
    assert untouched > 0  # first and last layers stay dense
    kernel = sum(r.details["dense_kernel_flops"] for r in report.rewrites)
    assert sparse_counter.get_total_flops() == untouched + kernel


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize("kind", ["parallel", "wide"])
@pytest.mark.parametrize("sparsity", [0.5, 0.75, 0.9])
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_preserving_init_is_exact(model_name, kind, sparsity):
    x = _inputs(model_name)
    model = MODELS[model_name]()
    fast = _rewrite(model, x, kind=kind, sparsity=sparsity, init="preserve", verify=True)
    assert sfx.verify(model, fast, x).ok
    for r in sfx.explain(fast).rewrites:
        assert r.details["exact"] is True
        assert r.details["divergence"] < 1e-5
    if kind == "wide" and model_name == "cnn":
        assert any(r.module == "conv1" and r.details["widened"] == ["out"] for r in sfx.explain(fast).rewrites)


def test_parallel_is_inexact_when_branches_cannot_cover_the_weight():
    x = _inputs("mlp")
    # round(1 / 0.4) = 2 branches at density 0.4 hold only 80% of the weights
    fast = _rewrite(_mlp(), x, kind="parallel", sparsity=0.6, init="preserve")
    for r in sfx.explain(fast).rewrites:
        assert r.details["exact"] is False and r.details["divergence"] > 0
        assert "why_inexact" in r.details


@pytest.mark.parametrize("kind", ["factorized", "doped"])
def test_approximate_kinds_record_divergence(kind):
    x = _inputs("mlp")
    model = _mlp()
    fast = _rewrite(model, x, kind=kind, sparsity=0.5, init="preserve")
    for r in sfx.explain(fast).rewrites:
        assert r.details["exact"] is False
        assert isinstance(r.details["divergence"], float) and r.details["divergence"] >= 0
    with pytest.raises(sfx.VerificationError):
        sfx.verify(model, fast, x)


def test_doped_preserve_is_better_than_dropping_the_low_rank_part():
    x = _inputs("mlp")
    preserve = _rewrite(_mlp(), x, kind="doped", sparsity=0.5, init="preserve")
    for r in sfx.explain(preserve).rewrites:
        assert r.details["divergence_rel"] < 0.5


# ---------------------------------------------------------------- state and training


def test_state_dict_keeps_original_keys_and_masks_survive_save_load():
    x = _inputs("cnn")
    model = _cnn()
    fast = _rewrite(model, x, kind="wide", sparsity=0.75, init="random")
    keys = set(fast.state_dict())
    assert set(model.state_dict()) <= keys
    assert all(k.startswith("sfx_ops.") for k in keys - set(model.state_dict()))
    assert any(k.endswith(".mask") for k in keys)
    buffer = io.BytesIO()
    torch.save(fast.state_dict(), buffer)
    other = _rewrite(_cnn(), x, kind="wide", sparsity=0.75, init="random", seed=123)
    masks_before = {n: m.mask.clone() for n, m in masked_weights(other)}
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer))
    changed = False
    for (name, m), (_, ref) in zip(masked_weights(other), masked_weights(fast)):
        assert torch.equal(m.mask, ref.mask)
        changed |= not torch.equal(m.mask, masks_before[name])
    assert changed, "a different seed should have given different masks before loading"
    torch.testing.assert_close(other(*x), fast(*x))


@pytest.mark.parametrize("kind", KINDS)
def test_masked_weights_stay_zero_through_optimizer_steps(kind):
    x = _inputs("mlp")
    fast = _rewrite(_mlp(), x, kind=kind, sparsity=0.75, init="random")
    apply_masks_(fast)
    opt = torch.optim.AdamW(fast.parameters(), lr=1e-2, weight_decay=0.1)
    fast.train()
    for _ in range(3):
        opt.zero_grad()
        fast(*x).square().mean().backward()
        opt.step()
    for name, m in masked_weights(fast):
        assert torch.all(m.full()[~m.mask] == 0), name
    assert apply_masks_(fast) == 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_one_training_step_gives_finite_gradients(model_name, kind):
    x = _inputs(model_name)
    model = MODELS[model_name]()
    fast = _rewrite(model, x, kind=kind, sparsity=0.5)
    report = sfx.explain(fast)
    # every original parameter is a live part of the model (the replaced weights included)
    assert all(r.details["unused_parameters"] == [] for r in report.rewrites)
    fast.train()
    opt = torch.optim.SGD(fast.parameters(), lr=0.01)
    loss = fast(*x).square().mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient for original {name}"
    for name, p in fast.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(p.grad).all(), name
    opt.step()
    assert torch.isfinite(fast(*x)).all()


# ---------------------------------------------------------------- RigL


def _rigl_run(seed_data: int) -> tuple[nn.Module, list[dict[str, int]], int]:
    x = _inputs("cnn")
    fast = _rewrite(_cnn(), x, kind="factorized", sparsity=0.75)
    opt = torch.optim.SGD(fast.parameters(), lr=0.05, momentum=0.9)
    rigl = RigL(fast, drop_fraction=0.3, update_every=2, stop_fraction=0.75, total_steps=12, optimizer=opt)
    counts = []
    g = torch.Generator().manual_seed(seed_data)
    fast.train()
    for _ in range(12):
        opt.zero_grad()
        fast(torch.randn(2, 3, 8, 8, generator=g)).square().mean().backward()
        opt.step()
        rigl.step()
        counts.append({n: m.nnz for n, m in masked_weights(fast)})
    return fast, counts, rigl.updates


def test_rigl_keeps_per_layer_sparsity_exact_and_is_deterministic():
    x = _inputs("cnn")
    initial = {n: m.mask.clone() for n, m in masked_weights(_rewrite(_cnn(), x, kind="factorized", sparsity=0.75, init="random"))}
    fast, counts, updates = _rigl_run(0)
    assert updates == 4  # steps 2, 4, 6, 8 (< 0.75 * 12)
    for step_counts in counts:
        assert step_counts == {n: int(m.sum()) for n, m in initial.items()}
    moved = [n for n, m in masked_weights(fast) if not torch.equal(m.mask, initial[n])]
    assert moved, "RigL never changed a mask"
    for name, m in masked_weights(fast):
        assert torch.all(m.full()[~m.mask] == 0), name
        assert m.dense_grad is None  # not kept after the last update
    again, _, _ = _rigl_run(0)
    for (name, a), (_, b) in zip(masked_weights(fast), masked_weights(again)):
        assert torch.equal(a.mask, b.mask), name


def test_rigl_schedule_and_validation():
    fast = _rewrite(_mlp(), _inputs("mlp"), kind="parallel", sparsity=0.5, init="random")
    rigl = RigL(fast, drop_fraction=0.3, update_every=100, stop_fraction=0.75, total_steps=1000)
    assert rigl.drop_fraction_at(0) == pytest.approx(0.3)
    assert rigl.drop_fraction_at(375) == pytest.approx(0.15)
    assert rigl.drop_fraction_at(750) == 0.0
    with pytest.raises(sfx.ConfigError, match="RigL.drop_fraction"):
        RigL(fast, drop_fraction=0.0)
    with pytest.raises(sfx.ConfigError, match="RigL.update_every"):
        RigL(fast, update_every=0)
    with pytest.raises(sfx.ConfigError, match="no masked weights"):
        RigL(_mlp())


# ---------------------------------------------------------------- negative cases


def test_include_matching_nothing_rewrites_nothing():
    x = _inputs("mlp")
    model = _mlp()
    fast = _rewrite(model, x, kind="parallel", include=["no_such_layer"], verify=True)
    report = sfx.explain(fast)
    assert report.rewrites == []
    assert len(report.skipped) == 4
    for skip in report.skipped:
        assert "not matched by include=['no_such_layer']" in skip.reason
    assert not any(k.startswith("sfx_ops") for k in fast.state_dict())


def test_grouped_conv_is_skipped_with_reason():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    fast = _rewrite(model, (torch.randn(1, 3, 8, 8),), kind="doped")
    report = sfx.explain(fast)
    assert report.rewrites == []
    assert any("groups=8" in s.reason for s in report.skipped)


def test_wide_without_a_widenable_chain_is_skipped_with_reason():
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            return self.c(self.b(h) + h)

    fast = _rewrite(Residual(), (torch.randn(2, 8),), kind="wide", skip_first_last=False)
    report = sfx.explain(fast)
    reasons = {s.module: s.reason for s in report.skipped}
    assert "no widenable chain" in reasons["b"] and "operator.add" in reasons["b"]
    assert [r.module for r in report.rewrites] == []


# ---------------------------------------------------------------- defaults: the paper's way


def _train(fast: nn.Module, x: tuple, steps: int, lr: float = 0.05) -> list[float]:
    opt = torch.optim.SGD(fast.parameters(), lr=lr)
    fast.train()
    g = torch.Generator().manual_seed(7)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        xb = torch.randn(x[0].shape, generator=g)
        loss = fast(xb).square().mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("kind", KINDS)
def test_default_masks_evolve_after_update_every_training_steps(kind):
    x = _inputs("mlp")
    fast = _rewrite(_mlp(), x, kind=kind)
    layers = masked_weights(fast)
    assert layers and all(m.dynamic and m.update_every == 100 for _, m in layers)
    before = {n: m.mask.clone() for n, m in layers}
    _train(fast, x, 100)
    # step 100 kept its dense gradient; the update happens at the next training forward
    assert all(torch.equal(m.mask, before[n]) for n, m in layers)
    _train(fast, x, 1)
    moved = [n for n, m in layers if not torch.equal(m.mask, before[n])]
    assert moved, "no mask changed after update_every training steps"
    for n, m in layers:
        assert m.nnz == int(before[n].sum()), n  # RigL keeps each layer's count
        assert int(m.rigl_step) == 101


def test_static_masks_with_dynamic_false_and_eval_forwards_do_not_count():
    x = _inputs("mlp")
    fast = _rewrite(_mlp(), x, kind="doped", dynamic=False, update_every=1)
    before = {n: m.mask.clone() for n, m in masked_weights(fast)}
    _train(fast, x, 3)
    assert all(torch.equal(m.mask, before[n]) for n, m in masked_weights(fast))
    dyn = _rewrite(_mlp(), x, kind="doped", update_every=1)
    dyn.eval()
    with torch.no_grad():
        dyn(*x)
    assert all(int(m.rigl_step) == 0 for _, m in masked_weights(dyn))


def test_stop_at_anneals_and_freezes():
    fast = _rewrite(_mlp(), _inputs("mlp"), kind="parallel", update_every=2, stop_at=8)
    _, m = masked_weights(fast)[0]
    assert m.drop_fraction_at(0) == pytest.approx(0.3) and m.drop_fraction_at(4) == pytest.approx(0.15)
    assert m.drop_fraction_at(8) == 0.0
    _train(fast, _inputs("mlp"), 9)
    frozen = {n: w.mask.clone() for n, w in masked_weights(fast)}
    _train(fast, _inputs("mlp"), 6)
    assert all(torch.equal(w.mask, frozen[n]) for n, w in masked_weights(fast))


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip_restores_masks_and_rigl_step(kind):
    x = _inputs("mlp")
    fast = _rewrite(_mlp(), x, kind=kind, update_every=3)
    _train(fast, x, 7)  # two updates done, one dense gradient pending
    state = fast.state_dict()
    resumed = _rewrite(_mlp(), x, kind=kind, update_every=3, seed=5)
    resumed.load_state_dict(state)
    for (n, a), (_, b) in zip(masked_weights(fast), masked_weights(resumed)):
        assert torch.equal(a.mask, b.mask), n
        assert int(b.rigl_step) == 7
    # the resumed run continues the schedule (its next update is at step 9) without re-drawing
    for a, b in ((fast, resumed),):
        _train(a, x, 3)
        _train(b, x, 3)
    assert all(int(m.rigl_step) == 10 for _, m in masked_weights(resumed))
    torch.testing.assert_close(fast.eval()(*x), resumed.eval()(*x))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_default_verifies_with_preserving_init_then_reinitialises(model_name, kind):
    x = _inputs(model_name)
    model = MODELS[model_name]()
    fast = _rewrite(model, x, kind=kind, verify=True)  # raises if verification fails
    report = sfx.explain(fast)
    assert str(report.verification).startswith("ok")
    for r in report.rewrites:
        assert r.details["exact"] is True and r.details["divergence"] < 1e-5
        assert "then re-initialised: random" in r.details["reinitialized"]
    # after verification the configured random init is in place: no longer the dense function
    for _, m in masked_weights(fast):
        assert m.nnz == m.target_nnz
    with torch.no_grad():
        assert not torch.allclose(fast.eval()(*x), model.eval()(*x), atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_default_training_differs_from_dense(kind):
    x = _inputs("mlp")
    dense = _train(_mlp(), x, 5)
    sparse = _train(_rewrite(_mlp(), x, kind=kind), x, 5)
    assert dense != sparse


@pytest.mark.parametrize("kind", ["parallel", "doped", "factorized"])
def test_preserve_keeps_function_then_rigl_moves_masks(kind):
    x = _inputs("mlp")
    model = _mlp()
    fast = _rewrite(model, x, kind=kind, init="preserve", update_every=2)
    if kind == "parallel":
        torch.testing.assert_close(fast.eval()(*x), model.eval()(*x))
    before = {n: m.mask.clone() for n, m in masked_weights(fast)}
    _train(fast, x, 3)
    assert any(not torch.equal(m.mask, before[n]) for n, m in masked_weights(fast))


@pytest.mark.parametrize("norm", ["bn", "bn_relu"])
def test_factorized_norm_between_factors(norm):
    x = _inputs("cnn")
    model = _cnn()
    fast = _rewrite(model, x, kind="factorized", factorized_norm=norm, verify=True)
    norms = [m for m in fast.modules() if type(m).__name__ == "FactorNorm"]
    assert norms and all(isinstance(n.bn, nn.BatchNorm2d) and n.relu == (norm == "bn_relu") for n in norms)
    _train(fast, x, 2)


def test_doped_low_rank_on_the_input_when_cheaper():
    from sparsify_fx.passes.iso_flop.layers import lowrank_on_input

    assert lowrank_on_input(4, 64, 96) and not lowrank_on_input(4096, 64, 96)
    x = _inputs("mlp")
    fast = _rewrite(_mlp(), x, kind="doped")
    for big in (torch.randn(4, 16), torch.randn(4096, 16)):
        with FlopCounterMode(display=False) as counter:
            fast.eval()(big)
        assert counter.get_total_flops() > 0
    # the two paths are the same function
    layer = next(m for m in fast.modules() if type(m).__name__ == "SparseDoped")
    h = torch.randn(8, layer.down.shape[1])
    w = layer.sparse()
    ref = torch.nn.functional.linear(h, w + layer.up @ layer.down)
    torch.testing.assert_close(layer(h), ref, rtol=1e-5, atol=1e-5)


def test_new_parameters_warning_names_count_and_extend_optimizer():
    x = _inputs("mlp")
    with pytest.warns(UserWarning, match=r"IsoFLOP created \d+ new parameters.*sfx.extend_optimizer"):
        _rewrite(_mlp(), x, kind="doped")


def test_parallel_after_batchnorm_has_a_batchnorm_per_branch_and_folds_in_eval():
    from sparsify_fx.passes.iso_flop.layers import SparseParallelBN

    x = _inputs("cnn")
    model = _cnn()
    fast = _rewrite(model, x, kind="parallel", init="preserve", verify=True)  # exact in eval
    (layer,) = [m for m in fast.modules() if isinstance(m, SparseParallelBN)]
    assert len(layer.bns) == len(layer.branches) == 2 and layer.bns[0].weight is model.bn1.weight
    assert "bn1" not in fast.code  # the replacement stands for conv1 -> bn1
    # training: each branch its own conv and batch statistics; eval: one folded conv
    fast.train()
    fast(torch.randn(4, 3, 8, 8)).square().mean().backward()
    for bn in layer.bns:
        assert bn.weight.grad is not None and bn.weight.grad.abs().sum() > 0
    fast.eval()
    with FlopCounterMode(display=False) as folded:
        fast(*x)
    fast.train()
    with torch.no_grad(), FlopCounterMode(display=False) as branches:
        fast(*x)
    assert branches.get_total_flops() > folded.get_total_flops()


def test_conv_batchnorm_replacement_is_named_after_the_conv_for_later_passes():
    """The fused conv + BatchNorm branch stands for the conv: a later pass's "already
    rewritten" skip names the conv (the report accounts for every dense layer)."""
    x = _inputs("cnn")
    fast = sfx.sparsify(_cnn(), [sfx.IsoFLOP(kind="parallel"), sfx.BlockSparseActivations(skip_first_last=False)],
                        example_inputs=x, verify=False)
    report = sfx.explain(fast)
    iso = {r.module for r in report.rewrites if r.pass_name == "isoflop"}
    bsr = {s.module: s.reason for s in report.skipped if s.pass_name == "bsr"}
    assert "conv1" in iso and "bn1" not in bsr
    assert "already rewritten" in bsr["conv1"] and "SparseParallelBN" in bsr["conv1"]


def test_factorized_bn_relu_verified_without_relu_then_turned_on():
    x = _inputs("cnn")
    fast = _rewrite(_cnn(), x, kind="factorized", factorized_norm="bn_relu", verify=True)
    norms = [m for m in fast.modules() if type(m).__name__ == "FactorNorm"]
    assert norms and all(n.relu_on for n in norms)
    assert any("verified_without_relu" in r.details for r in sfx.explain(fast).rewrites)
