"""Every error a user can hit, one test per row of ``docs/errors.md`` (issue #9).

Each row triggers the error and matches its documented message; the last test checks that the
table in ``docs/errors.md`` and the rows here name the same cases, so neither drifts. A second
group covers the situations that are deliberately *not* errors (documented in the same file).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import sparsify_fx as sfx

DOC = Path(__file__).parent.parent / "docs" / "errors.md"


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def _x() -> torch.Tensor:
    return torch.randn(2, 4)


class ValueBranch(nn.Module):
    """Branches on a tensor's value: no graph capture can hold that."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        h = x @ self.w
        if h.sum() > 0:
            h = -h
        return h


class ShapeBranch(nn.Module):
    """Branches on a shape at the root: captured per submodule (its Linear layers traced)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        if x.shape[0] > 1:
            x = x * 2
        return self.b(torch.relu(self.a(x)))


class Scaled(nn.Module):
    """A keyword-only non-tensor argument: a constant of the captured graph."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, *, scale=1.0):
        return self.lin(x) * scale


def _call_other_fixed_argument():
    fast = sfx.sparsify(Scaled(), sfx.DropIT(keep=0.5), (_x(),), {"scale": 0.5})
    fast(_x(), scale=2.0)


@dataclass(frozen=True)
class FailsAtNode(sfx.PassConfig):
    """A pass that fails half-way, naming the node it was working on."""


@sfx.register_pass(FailsAtNode, name="fails_at_node")
def _fails_at_node(gm, config, ctx):
    ops, _ = sfx.find_dense_ops(gm)
    # half-done: an op module installed and wired in before the failure (rolled back)
    target = sfx.install_module(gm, "half_done", nn.Identity())
    with gm.graph.inserting_after(ops[0].node):
        new = gm.graph.call_module(target, (ops[0].node,))
    ops[0].node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    err = RuntimeError("cannot rewrite this layer")
    err.sfx_node = ops[1].node
    raise err


@dataclass(frozen=True)
class ReturnsGraph(sfx.PassConfig):
    """A pass that forgets to return a PassResult."""


@sfx.register_pass(ReturnsGraph, name="returns_graph")
def _returns_graph(gm, config, ctx):
    return gm


@dataclass(frozen=True)
class NotExact(sfx.PassConfig):
    """A pass that changes eval outputs (ReLU -> GELU): verification must catch it."""


@sfx.register_pass(NotExact, name="not_exact")
def _not_exact(gm, config, ctx):
    result = sfx.PassResult(gm, modified=False)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.nn.functional.relu:
            node.target = torch.nn.functional.gelu
            node.kwargs = {}
            result.modified = True
    return result


@dataclass(frozen=True)
class Unregistered(sfx.PassConfig):
    """A config whose transform was never registered."""


def _sparsify(recipe, *args, **kwargs):
    return sfx.sparsify(_mlp(), recipe, *args, **kwargs)


def _twice():
    model = _mlp()
    fast = sfx.sparsify(model, sfx.DropIT(keep=0.5), (_x(),))
    sfx.sparsify(fast, sfx.BlockSparseActivations(block_size=2), (_x(),))


def _twice_nested():
    model = _mlp()
    fast = sfx.sparsify(model, sfx.DropIT(keep=0.5), (_x(),))
    sfx.sparsify(nn.Sequential(fast, nn.Linear(2, 2)), sfx.DropIT(keep=0.5), (_x(),))


def _export_other_shape():
    fast = sfx.sparsify(_mlp(), sfx.DropIT(keep=0.5), (_x(),), capture_methods=("export",))
    fast(torch.randn(3, 5))  # (the batch dim export kept dynamic; the feature dim it fixed)


def _isoflop_under_dynamo():
    fast = sfx.sparsify(ValueBranch(), sfx.IsoFLOP(kind="parallel", skip_first_last=False), (_x(),),
                        capture_methods=("dynamo",), verify=False)
    fast(_x())  # Dynamo graphs are rewritten lazily, on the first call


def _rigl_without_masks():
    from sparsify_fx.passes.iso_flop import RigL

    RigL(_mlp())


# id -> (trigger, exception type, regex the message must match)
ROWS = {
    # ---- invalid config values (ConfigError, raised when the config is built)
    "config-out-of-range": (lambda: sfx.DropIT(keep=0.0), sfx.ConfigError,
                            r"^DropIT\.keep must be in \(0\.0, 1\.0\], got 0\.0$"),
    "config-not-a-number": (lambda: sfx.DropIT(keep="0.1"), sfx.ConfigError,
                            r"^DropIT\.keep must be a number, got '0\.1' \(str\)$"),
    "config-not-an-int": (lambda: sfx.BlockSparseActivations(block_size=2.5), sfx.ConfigError,
                          r"^BlockSparseActivations\.block_size must be an int, got 2\.5$"),
    "config-not-a-choice": (lambda: sfx.IsoFLOP(kind="dense"), sfx.ConfigError,
                            r"^IsoFLOP\.kind must be one of \['wide', 'parallel', 'factorized', 'doped'\], got 'dense'$"),
    "config-storage-choice": (lambda: sfx.ActivationMemory(gelu="fp8"), sfx.ConfigError,
                              r"^ActivationMemory\.gelu must be one of \['bf16', 'int8', 'off'\], got 'fp8'$"),
    "config-sparsity-one": (lambda: sfx.IsoFLOP(sparsity=1.0), sfx.ConfigError,
                            r"^IsoFLOP\.sparsity must be in \[0\.0, 1\.0\), got 1\.0$"),
    "config-sliceout-p": (lambda: sfx.SliceOut(p=1.0), sfx.ConfigError,
                          r"^SliceOut\.p must be in \[0\.0, 1\.0\), got 1\.0$"),
    "config-budget-missing": (lambda: sfx.MemoryBudget(fraction=None), sfx.ConfigError,
                              r"^MemoryBudget needs fraction= or bytes=$"),
    "config-not-a-bool": (lambda: sfx.DropIT(skip_first_last="yes"), sfx.ConfigError,
                          r"^DropIT\.skip_first_last must be a bool, got 'yes'$"),
    "config-include-type": (lambda: sfx.DropIT(include=3), sfx.ConfigError,
                            r"^DropIT\.include must be a glob pattern or a list of them"),
    "config-filter-fn": (lambda: sfx.DropIT(filter_fn="fc*"), sfx.ConfigError,
                         r"^DropIT\.filter_fn must be callable\(name, module\) -> bool, got 'fc\*'$"),
    "rigl-without-masks": (_rigl_without_masks, sfx.ConfigError,
                           r"^RigL found no masked weights in the model; rewrite it with sfx\.IsoFLOP first$"),
    # ---- recipes (RecipeError; a bad value inside a string is still a ConfigError)
    "recipe-unknown-pass": (lambda: _sparsify("dropitt:keep=0.1"), sfx.RecipeError,
                            r"^unknown pass 'dropitt' in recipe; known: \[.*'dropit'.*\]$"),
    "recipe-unknown-field": (lambda: _sparsify("dropit:kep=0.1"), sfx.RecipeError,
                             r"^recipe item 'dropit:kep=0\.1': .*unexpected keyword argument 'kep'"),
    "recipe-no-value": (lambda: _sparsify("dropit:keep"), sfx.RecipeError,
                        r"^recipe item 'dropit:keep': expected key=value, got 'keep'$"),
    "recipe-bad-value": (lambda: _sparsify("dropit:keep=2"), sfx.ConfigError,
                         r"^DropIT\.keep must be in \(0\.0, 1\.0\], got 2$"),
    "recipe-empty-string": (lambda: _sparsify(""), sfx.RecipeError, r"^empty recipe string"),
    "recipe-empty-list": (lambda: _sparsify([]), sfx.RecipeError, r"^empty recipe: give at least one pass config$"),
    "recipe-wrong-type": (lambda: _sparsify({"keep": 0.1}), sfx.RecipeError,
                          r"^a recipe is a pass config \(e\.g\. sfx\.DropIT\(keep=0\.1\)\), a list of them, "
                          r"or a string like 'dropit:keep=0\.1'; got dict$"),
    "recipe-item-not-config": (lambda: _sparsify([sfx.DropIT(), 0.1]), sfx.RecipeError,
                               r"^recipe item 0\.1 is not a pass config$"),
    "recipe-unregistered": (lambda: _sparsify(Unregistered()), sfx.RecipeError,
                            r"^no pass is registered for Unregistered; decorate its transform with "
                            r"sparsify_fx\.register_pass$"),
    # ---- the model
    "model-not-a-module": (lambda: sfx.sparsify(lambda x: x, sfx.DropIT(), (_x(),)), sfx.CaptureError,
                           r"^sparsify_fx needs a torch\.nn\.Module, got function; wrap a function in an "
                           r"nn\.Module whose forward calls it$"),
    "model-lazy": (lambda: sfx.sparsify(nn.Sequential(nn.LazyLinear(4)), sfx.DropIT(), (_x(),)), sfx.CaptureError,
                   r"^the model has uninitialized \(lazy\) parameters; run one forward pass before sparsify$"),
    "model-uncapturable": (lambda: sfx.sparsify(ValueBranch(), sfx.DropIT()), sfx.CaptureError,
                           r"(?s)^no capture method could handle ValueBranch:\n  - symbolic_trace: TraceError.*"
                           r"Give example_inputs \(and example_kwargs\) so export/Dynamo can be tried"),
    "model-uncapturable-with-inputs": (
        lambda: sfx.sparsify(ValueBranch(), sfx.DropIT(), (_x(),), capture_methods=("symbolic_trace",)),
        sfx.CaptureError,
        r"(?s)^no capture method could handle ValueBranch:.*Mark the untraceable code with torch\.fx\.wrap"),
    "capture-unknown-method": (lambda: _sparsify(sfx.DropIT(), (_x(),), capture_methods=("jit",)), sfx.CaptureError,
                               r"^unknown capture method\(s\) \['jit'\]; choose from \('symbolic_trace', "),
    "model-already-rewritten": (_twice, sfx.ConfigError,
                                r"^Sequential was already rewritten by sparsify_fx \(it is the result of recipe "
                                r"\[\"dropit:.*\"\]\); rewriting a rewritten module again is not supported\. Call "
                                r"sparsify once on the original model with every pass in one recipe"),
    "model-contains-rewritten": (_twice_nested, sfx.ConfigError,
                                 r"^Sequential was already rewritten by sparsify_fx \(its submodule '0' is the result"),
    # ---- example inputs
    "inputs-wrong-shape": (lambda: _sparsify(sfx.DropIT(), (torch.randn(2, 5),)), sfx.CaptureError,
                           r"^Sequential does not run on the example inputs \(Tensor\[2, 5\] float32 on cpu\) "
                           r"at node %linear : .* \(module '0'\): RuntimeError: .*shapes cannot be multiplied"),
    "inputs-wrong-dtype": (lambda: _sparsify(sfx.DropIT(), (torch.randn(2, 4, dtype=torch.float64),)),
                           sfx.CaptureError,
                           r"^Sequential does not run on the example inputs \(Tensor\[2, 4\] float64 on cpu\) "
                           r"at node %linear .*same dtype"),
    "inputs-wrong-device": (lambda: _sparsify(sfx.DropIT(), (torch.randn(2, 4, device="meta"),)),
                            sfx.CaptureError,
                            r"^Sequential does not run on the example inputs \(Tensor\[2, 4\] float32 on meta\) "
                            r"at node %linear .*device"),
    "inputs-untraceable-model": (lambda: sfx.sparsify(ShapeBranch(), sfx.DropIT(), (torch.randn(2, 5),)),
                                 sfx.CaptureError,
                                 r"^ShapeBranch raises on the example inputs \(eval mode, no grad\): "
                                 r"RuntimeError: .*Pass example_inputs of the shape, dtype and device"),
    "inputs-signature": (lambda: _sparsify(sfx.DropIT(), (_x(), _x())), sfx.CaptureError,
                         r"^example inputs do not match Sequential\.forward\(input\): too many positional "
                         r"arguments\. Pass example_inputs=\(\.\.\.\) positionally"),
    "inputs-unknown-kwarg": (lambda: _sparsify(sfx.DropIT(), (_x(),), {"mask": _x()}), sfx.CaptureError,
                             r"^example inputs do not match Sequential\.forward\(input\): got an unexpected "
                             r"keyword argument 'mask'"),
    "inputs-dict": (lambda: _sparsify(sfx.DropIT(), {"input": _x()}), sfx.ConfigError,
                    r"^example_inputs is a dict: it holds the positional inputs of one forward call, as a "
                    r"tuple; pass keyword inputs as example_kwargs=\{\.\.\.\}$"),
    "kwargs-not-a-dict": (lambda: _sparsify(sfx.DropIT(), (_x(),), [_x()]), sfx.ConfigError,
                          r"^example_kwargs must be a dict of keyword inputs .*got list$"),
    "verify-without-inputs": (lambda: _sparsify(sfx.DropIT(), verify=True), sfx.ConfigError,
                              r"^sparsify\(verify=True\) needs example_inputs"),
    "export-other-shape": (_export_other_shape, sfx.CaptureError,
                           r"^Sequential was captured by torch\.export for input shapes \[\(2\.\.inf, 4\)\]; got "
                           r"\[\(3, 5\)\]\. Call sparsify with example inputs of the shape you train with\.$"),
    "call-other-fixed-argument": (_call_other_fixed_argument, sfx.CaptureError,
                                  r"^Scaled\.forward was captured with scale=0\.5, fixed in the captured graph; "
                                  r"this call passed scale=2\.0: capture with example_kwargs=\{'scale': 2\.0\}"),
    # ---- passes and verification
    "pass-failed": (lambda: _sparsify([sfx.DropIT(keep=0.5), FailsAtNode()], (_x(),)), sfx.PassError,
                    r"^pass 'fails_at_node' failed on graph \(root\) at node %linear_2 : .* \(module '4'\): RuntimeError: "
                    r"cannot rewrite this layer\. The model was left unchanged\.$"),
    "pass-wrong-return": (lambda: _sparsify(ReturnsGraph(), (_x(),)), sfx.PassError,
                          r"^pass 'returns_graph' failed on graph \(root\): TypeError: pass returned "
                          r"Sequential, expected PassResult\. The model was left unchanged\.$"),
    "verification-failed": (lambda: _sparsify(NotExact(), (_x(),)), sfx.VerificationError,
                            r"^rewritten Sequential differs from the original in eval mode: MISMATCH: output 0: "
                            r".*; first diverging node: %relu : .*gelu\]\(args = \(%linear,\), kwargs = \{\}\) in module '1'$"),
    "isoflop-under-dynamo": (_isoflop_under_dynamo, sfx.ConfigError,
                             r"isoflop:.* adds parameters \(.*\): this model could only be captured by Dynamo"),
    "register-not-a-config": (lambda: sfx.register_pass(int), TypeError,
                              r"^register_pass needs a PassConfig subclass, got <class 'int'>$"),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_error_row(row):
    trigger, kind, pattern = ROWS[row]
    with pytest.raises(kind) as info:
        trigger()
    assert re.search(pattern, str(info.value)), f"{row}: {info.value}"
    if kind is not TypeError:
        assert isinstance(info.value, sfx.SparsifyError)


def test_config_errors_are_value_errors():
    # callers catching ValueError (the dataclass convention) keep working
    with pytest.raises(ValueError):
        sfx.DropIT(keep=2)


def test_failed_pass_and_bad_inputs_leave_the_model_untouched():
    model = _mlp()
    x = _x()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for trigger in (lambda: sfx.sparsify(model, [sfx.DropIT(keep=0.5), FailsAtNode()], (x,)),
                    lambda: sfx.sparsify(model, sfx.DropIT(), (torch.randn(2, 5),))):
        with pytest.raises(sfx.SparsifyError):
            trigger()
    assert not hasattr(model, "sfx_ops")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# ---------------------------------------------------------------- not errors (documented)


class SameConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.even = nn.Conv2d(8, 8, 2, padding="same")
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.relu(self.even(torch.relu(self.stem(x)))).mean((2, 3)))


def test_unsupported_layer_is_skipped_with_a_reason():
    fast = sfx.sparsify(SameConvNet(), sfx.DropIT(keep=0.5), (torch.randn(2, 3, 6, 6),))
    skipped = {s.module: s.reason for s in sfx.explain(fast).skipped}
    assert skipped["even"] == "padding='same' with an even kernel needs asymmetric padding (not supported)"


def test_recipe_rewriting_nothing_is_not_an_error():
    fast = _sparsify(sfx.DropIT(include="no_such_layer*"), (_x(),))
    report = sfx.explain(fast)
    assert report.rewrites == []
    assert {s.reason for s in report.skipped} == {"not matched by include=['no_such_layer*']"}


def test_same_pass_twice_in_one_recipe_skips_what_the_first_rewrote():
    fast = _sparsify([sfx.DropIT(keep=0.5), sfx.DropIT(keep=0.2)], (_x(),))
    report = sfx.explain(fast)
    assert [r.details["keep"] for r in report.rewrites] == [0.5]
    second = [s for s in report.skipped if s.reason.startswith("already rewritten")]
    assert [s.module for s in second] == ["2"]
    assert "DropITLinear" in second[0].reason


@pytest.mark.parametrize("recipe", ["dropit:keep=0.5,skip_first_last=False", "bsr:block_size=2,skip_first_last=False",
                                    "sliceout:p=0.5,align=1,skip_first_last=False", "actmem"])
def test_eval_mode_model_is_rewritten_and_trains_after_train(recipe):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.GELU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2)).eval()
    x = torch.randn(8, 4)
    fast = sfx.sparsify(model, recipe, (x,))
    assert not fast.training and not model.training  # modes are mirrored, not changed
    report = sfx.explain(fast)
    assert report.rewrites
    assert any(n.startswith("the model was in eval() mode") for n in report.capture_notes)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=0, atol=0)
    fast.train()
    fast(x).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert not model.training


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("recipe", ["dropit:keep=0.5,skip_first_last=False", "bsr:block_size=2,skip_first_last=False",
                                    "actmem", "sliceout:p=0.5,align=1,skip_first_last=False"])
def test_moving_the_result_moves_the_shared_tensors(recipe, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.GELU(),
                          nn.Linear(16, 2))
    x = torch.randn(8, 4)
    fast = sfx.sparsify(model, recipe, (x,)).to(dtype)
    # parameters and buffers stay shared: the original moved with the result
    assert all(p.dtype == dtype for p in model.parameters())
    assert model[1].running_mean.dtype == dtype and model[1].running_mean is fast.get_submodule("1").running_mean
    fast.train()
    fast(x.to(dtype)).float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == dtype for p in model.parameters())
    assert int(model[1].num_batches_tracked) == 1  # the statistics updated are the original's
    fast.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(x.to(dtype)), model(x.to(dtype)), rtol=0, atol=0)


def test_moving_the_original_after_sparsify_unshares_its_buffers():
    # documented limitation: move the model before sparsify (or move the result instead)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    fast = sfx.sparsify(model, sfx.DropIT(keep=0.5), (torch.randn(4, 4),))
    model.double()
    with pytest.raises(RuntimeError, match="expected scalar type Double but found Float"):
        fast(torch.randn(4, 4, dtype=torch.float64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_moving_the_result_to_cuda_moves_the_original():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    fast = sfx.sparsify(model, "dropit:keep=0.5,skip_first_last=False+actmem", (torch.randn(4, 4),)).cuda()
    assert all(t.is_cuda for t in list(model.parameters()) + list(model.buffers()))
    x = torch.randn(4, 4, device="cuda")
    fast(x).sum().backward()
    fast.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=0, atol=0)


# ---------------------------------------------------------------- the catalogue


def _documented_ids() -> list[str]:
    ids = []
    for line in DOC.read_text().splitlines():
        m = re.match(r"^\|\s*`([a-z0-9-]+)`\s*\|", line)
        if m:
            ids.append(m.group(1))
    return ids


def test_catalogue_and_tests_name_the_same_rows():
    documented = _documented_ids()
    assert len(documented) == len(set(documented)), "duplicate ids in docs/errors.md"
    assert set(documented) == set(ROWS), (
        f"only in docs: {sorted(set(documented) - set(ROWS))}; only in tests: {sorted(set(ROWS) - set(documented))}")
