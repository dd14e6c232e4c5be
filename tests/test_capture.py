"""The capture cascade: which method captures what, and that nothing is lost."""

from __future__ import annotations

import operator
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from conftest import SmallCNN, mlp

import sparsify_fx as sfx


class DataDependent(nn.Module):
    """Root forward branches on a tensor value: symbolic_trace fails, submodules work."""

    def __init__(self):
        super().__init__()
        self.encoder = mlp(depth=3, out=16)
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 4)

    def forward(self, x):
        h = self.encoder(x)
        if h.sum() > 0:
            h = h * 2
        return self.b(F.relu(self.a(h)))


class KwargsDict(nn.Module):
    """Keyword inputs with None defaults and a dict output, HF style."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.head = nn.Linear(8, 5)

    def forward(self, input_ids, attention_mask=None, output_hidden=False):
        h = self.embed(input_ids)
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1)
        hidden = []
        for layer in self.layers:
            h = F.gelu(layer(h))
            hidden.append(h)
        out = {"logits": self.head(h)}
        if output_hidden:
            out["hidden"] = tuple(hidden)
        return out


class Tied(nn.Module):
    """Tied embedding/output weights and one module called twice."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.mid = nn.Linear(6, 6)
        self.out = nn.Linear(6, 10, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        h = self.mid(F.relu(self.mid(h)))
        return self.out(h)


class ShapeBranchRawParam(nn.Module):
    """Shape-dependent branch at the root using a raw parameter: needs export."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Parameter(torch.randn(8, 8) * 0.1)
        self.inner = nn.Parameter(torch.randn(8, 8) * 0.1)
        self.out = nn.Parameter(torch.randn(8, 3) * 0.1)

    def forward(self, x):
        if x.shape[0] > 1:
            x = x @ self.proj
        return torch.relu(x @ self.inner) @ self.out


class ValueBranchRawParam(ShapeBranchRawParam):
    """Value-dependent branch using raw parameters: export fails, Dynamo graph-breaks."""

    def forward(self, x):
        h = x @ self.proj
        if h.sum() > 0:
            h = -h
        return torch.relu(h @ self.inner) @ self.out


def test_symbolic_trace_keeps_state_dict_and_shares_parameters():
    model = SmallCNN()
    cap = sfx.capture(model)
    assert cap.method == "symbolic_trace"
    assert isinstance(cap.graph_module, torch.fx.GraphModule)
    assert list(cap.graph_module.state_dict()) == list(model.state_dict())
    assert cap.graph_module.get_parameter("stem.weight") is model.stem.weight
    # own module objects: eval() on the capture does not flip the original's mode
    cap.graph_module.eval()
    assert model.training and model.bn.training


class Accumulates(nn.Module):
    """``+=`` on a tensor another name still refers to: only an in-place trace keeps both
    names the same tensor, as Python does."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        out = self.lin(x)
        alias = out
        out += x
        out *= 2
        return alias, out


def test_augmented_assignment_is_captured_in_place():
    model = Accumulates()
    x = torch.randn(3, 4)
    cap = sfx.capture(model)
    targets = [n.target for n in cap.graph_module.graph.nodes if n.op == "call_function"]
    assert operator.iadd in targets and operator.imul in targets
    assert operator.add not in targets and operator.mul not in targets
    with torch.no_grad():
        alias, out = cap.graph_module(x)
        ref_alias, ref_out = model(x)
    # the model returns one tensor twice; an out-of-place trace returned lin(x) as the alias
    assert alias is out
    torch.testing.assert_close(alias, ref_alias, rtol=0, atol=0)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)


def test_resnet_residual_add_is_in_place_and_trains_like_the_model():
    model = torchvision.models.resnet18(num_classes=10)
    gm = sfx.capture(model).graph_module
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (operator.add, operator.iadd)]
    assert len(adds) == 8 and all(n.target is operator.iadd for n in adds)
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    ref = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    gm(x).sum().backward()  # the capture shares the model's parameters
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_canonical_form_is_functional_for_stateless_layers():
    cap = sfx.capture(SmallCNN())
    gm = cap.graph_module
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert {F.conv2d, F.linear, F.relu, F.silu, F.pad} <= targets
    modules = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert modules == {"bn"}  # mode-dependent layers stay modules
    ops, _ = sfx.find_dense_ops(gm)
    assert [op.module_name for op in ops] == ["stem", "conv", "dw", "pw", "head"]


def test_data_dependent_branch_falls_back_to_submodules():
    model = DataDependent()
    x = torch.randn(4, 8)
    cap = sfx.capture(model, (x,))
    assert cap.method == "submodules"
    assert "symbolic_trace" in cap.failures
    assert set(cap.graphs) == {"encoder", "a", "b"}
    fast = sfx.sparsify(model, sfx.DropIT(keep=0.5), (x,))
    report = sfx.explain(fast)
    assert {r.module for r in report.rewrites} == {"encoder.2", "encoder.4", "a"}
    assert report.verification.startswith("ok")
    fast.train()
    fast(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_kwargs_and_dict_outputs():
    model = KwargsDict()
    ids = torch.randint(0, 20, (2, 7))
    mask = torch.ones(2, 7)
    fast = sfx.sparsify(model, sfx.DropIT(keep=0.5), (ids,), {"attention_mask": mask})
    out = fast(ids, attention_mask=mask)
    assert set(out) == {"logits"}
    torch.testing.assert_close(out["logits"], model(ids, attention_mask=mask)["logits"], rtol=1e-5, atol=1e-6)
    assert len(sfx.explain(fast).rewrites) == 2


def test_tied_weights_and_module_called_twice():
    model = Tied()
    ids = torch.randint(0, 10, (3, 4))
    fast = sfx.sparsify(model, sfx.DropIT(keep=0.5, skip_first_last=False), (ids,))
    assert fast.get_parameter("out.weight") is fast.get_parameter("embed.weight")
    assert list(fast.state_dict()) == list(model.state_dict())
    assert [r.module for r in sfx.explain(fast).rewrites] == ["mid", "mid", "out"]
    fast.train()
    fast(ids).sum().backward()
    assert model.embed.weight.grad is not None


def test_export_fallback_for_shape_branch_with_raw_parameters():
    model = ShapeBranchRawParam()
    x = torch.randn(4, 8)
    cap = sfx.capture(model, (x,), methods=("symbolic_trace", "export"))
    assert cap.method == "export"
    fast = sfx.sparsify(model, sfx.DropIT(keep=0.5, skip_first_last=False), (x,),
                        capture_methods=("symbolic_trace", "export"))
    assert len(sfx.explain(fast).rewrites) == 3


def test_export_keeps_the_batch_dim_dynamic_and_refuses_what_it_specialised():
    """torch.export with ``Dim.AUTO``: the batch dim stays dynamic (2..inf: the model branches
    on ``batch > 1``), the feature dim is fixed by a parameter; the rewrite trains and
    evaluates at other batch sizes, and a shape outside the graph's range is refused."""
    torch.manual_seed(0)
    model, x = ShapeBranchRawParam(), torch.randn(4, 8)
    fast = sfx.sparsify(model, "dropit:keep=0.5,skip_first_last=False+actmem", (x,),
                        capture_methods=("symbolic_trace", "export"))
    report = sfx.explain(fast)
    assert report.capture_method == "export"
    assert any("dim 0 of input 0 (2..inf) dynamic" in n for n in report.capture_notes), report.capture_notes
    for batch in (7, 3):
        y = torch.randn(batch, 8)
        fast.train()
        fast(y).sum().backward()
        fast.eval(), model.eval()
        with torch.no_grad():
            torch.testing.assert_close(fast(y), model(y), rtol=1e-6, atol=1e-6)
        model.train()
    with pytest.raises(sfx.CaptureError, match=r"\[\(2\.\.inf, 8\)\]"):
        fast(torch.randn(1, 8))  # (at batch 1 the model takes the other branch)
    with pytest.raises(sfx.CaptureError, match="input shapes"):
        fast(torch.randn(4, 9))


class _EvenBatchBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.w, self.v = nn.Parameter(torch.randn(8, 8) * 0.1), nn.Parameter(torch.randn(8, 8) * 0.1)

    def forward(self, x):
        if x.shape[0] % 2 == 0:  # export keeps the batch dynamic under this condition
            x = x * 2
        return torch.relu(x @ self.w) @ self.v


def test_export_guards_beyond_ranges_are_checked_on_every_call():
    """A dynamic dim export keeps only under a condition (an even batch) must not run the graph
    where the model would take the other path: refused with the condition, also on a copy."""
    torch.manual_seed(0)
    model = _EvenBatchBranch()
    fast = sfx.sparsify(model, sfx.DropIT(keep=0.5, skip_first_last=False), (torch.randn(4, 8),),
                        capture_methods=("export",))
    assert any("dynamic" in n for n in sfx.explain(fast).capture_notes)
    y = torch.randn(6, 8)
    fast.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(y), model(y), rtol=1e-6, atol=1e-6)
    for module in (fast, pickle.loads(pickle.dumps(fast))):
        with pytest.raises(sfx.CaptureError, match=r"% 2\) == 0.*break"):
            module(torch.randn(3, 8))


def test_full_cascade_reaches_export_when_submodules_miss_raw_parameters():
    model = ShapeBranchRawParam()
    cap = sfx.capture(model, (torch.randn(4, 8),))
    assert cap.method == "export"
    assert cap.failures["submodules"]


def test_dynamo_fallback_for_value_branch():
    model = ValueBranchRawParam()
    x = torch.randn(4, 8)
    cap = sfx.capture(model, (x,), methods=("symbolic_trace", "export", "dynamo"))
    assert cap.method == "dynamo"
    assert set(cap.failures) == {"symbolic_trace", "export"}
    fast = sfx.sparsify(model, sfx.DropIT(keep=0.5, skip_first_last=False), (x,),
                        capture_methods=("dynamo",))
    torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-6)
    assert len(sfx.explain(fast).rewrites) >= 2
    fast.train()
    fast(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_mode_dependent_submodule_becomes_leaf_and_train_eval_both_work():
    model = torchvision.models.googlenet(aux_logits=True, init_weights=False)
    x = torch.randn(1, 3, 64, 64)
    cap = sfx.capture(model, (x,))
    assert cap.method == "submodules"  # GoogLeNet.forward branches on self.training
    fast = sfx.sparsify(model, sfx.DropIT(keep=0.5), (x,))
    fast.train()
    out = fast(torch.randn(2, 3, 64, 64))
    assert hasattr(out, "aux_logits2")  # train-mode output structure preserved


def test_no_method_works_gives_one_error_listing_each_failure():
    class Hopeless(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x):
            if x.sum() > 0:
                return x * self.w
            return x

    with pytest.raises(sfx.CaptureError) as info:
        sfx.capture(Hopeless(), methods=("symbolic_trace", "submodules", "export"))
    assert "symbolic_trace" in str(info.value) and "export" in str(info.value)
    assert set(info.value.failures) == {"symbolic_trace", "submodules", "export"}


def test_bad_inputs():
    with pytest.raises(sfx.CaptureError, match="nn.Module"):
        sfx.capture(lambda x: x)
    with pytest.raises(sfx.CaptureError, match="unknown capture method"):
        sfx.capture(mlp(), methods=("magic",))
    with pytest.raises(sfx.CaptureError, match="do not match"):
        sfx.capture(mlp(), (torch.randn(2, 8), torch.randn(2, 8)))
    with pytest.raises(sfx.CaptureError, match="lazy"):
        sfx.capture(nn.Sequential(nn.LazyLinear(4)))


def test_hooks_are_kept():
    model = mlp()
    calls = []
    model[2].register_forward_hook(lambda m, i, o: calls.append(1))
    fast = sfx.sparsify(model, sfx.DropIT(keep=0.5), (torch.randn(2, 8),))
    calls.clear()
    fast(torch.randn(2, 8))
    assert calls == [1]
    assert "2" not in {r.module for r in sfx.explain(fast).rewrites}


@pytest.mark.parametrize("batch_first", [False, True])
def test_multihead_attention_is_expanded_to_explicit_ops(batch_first):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)
            self.out = nn.Linear(16, 2)

        def forward(self, x):
            h, _ = self.attn(x, x, x, need_weights=False)
            return self.out(h)

    model = Block()
    x = torch.randn(3, 5, 16)
    fast = sfx.sparsify(model, sfx.DropIT(keep=0.5, skip_first_last=False), (x,))
    modules = {r.module for r in sfx.explain(fast).rewrites}
    assert modules == {"attn", "attn.out_proj", "out"}
    assert F.scaled_dot_product_attention in {n.target for n in fast.graph.nodes}
    fast.train()
    fast(x).sum().backward()
    assert model.attn.in_proj_weight.grad is not None


def test_multihead_attention_with_mask_stays_a_module_and_is_reported():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x, mask):
            return self.attn(x, x, x, attn_mask=mask)[0]

    x, mask = torch.randn(2, 4, 8), torch.zeros(4, 4, dtype=torch.bool)
    fast = sfx.sparsify(Block(), sfx.DropIT(keep=0.5), (x, mask))
    report = sfx.explain(fast)
    assert report.rewrites == []
    assert "MultiheadAttention" in report.skipped[0].reason
    assert any("attn_mask given" in n for n in report.capture_notes)


# ---------------------------------------------------------------- non-tensor arguments


class KeywordOnly(nn.Module):
    """A keyword-only scale and an optional mask (non-tensor values are fixed at capture)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x, *, scale=1.0, mask=None):
        h = torch.relu(self.a(x)) * scale
        if mask is not None:
            h = h * mask
        return self.b(h)


def test_keyword_only_argument_is_captured_and_callable_by_name():
    import io

    model, x = KeywordOnly(), torch.randn(3, 8)
    fast = sfx.sparsify(model, "dropit:keep=0.1+actmem", (x,), {"scale": 0.5})  # verified with scale=0.5
    assert sfx.explain(fast).capture_method == "symbolic_trace"
    fast.eval()
    expected = model(x, scale=0.5)
    torch.testing.assert_close(fast(x, scale=0.5), expected)
    # a keyword passed at capture may be left out later: the captured value is used
    torch.testing.assert_close(fast(x), expected)
    buffer = io.BytesIO()
    torch.save(fast, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for module in (fast, loaded):  # the check survives pickling
        with pytest.raises(sfx.CaptureError, match=r"captured with scale=0\.5.*passed scale=2\.0: capture "
                                                   r"with example_kwargs=\{'scale': 2\.0\}"):
            module(x, scale=2.0)


def test_optional_argument_given_at_call_time_is_a_capture_error_naming_it():
    model, x = KeywordOnly(), torch.randn(3, 8)
    fast = sfx.sparsify(model, "dropit:keep=0.1+actmem", (x,))
    # not torch.fx's bare AssertionError: the argument, both values and the fix
    with pytest.raises(sfx.CaptureError, match=r"captured with mask=None.*passed mask=a Tensor\[3, 8\]: "
                                               r"capture with example_kwargs=\{'mask': <a tensor like it>\}"):
        fast(x, mask=torch.ones(3, 8))
    with pytest.raises(sfx.CaptureError, match=r"scale=1\.0.*scale=3"):
        fast(x, scale=3)
    # captured with the mask: a graph input, any value works
    mask = (torch.rand(3, 8) > 0.5).float()
    fast = sfx.sparsify(model, "dropit:keep=0.1+actmem", (x,), {"mask": mask})
    fast.eval()
    other = torch.ones(3, 8)
    torch.testing.assert_close(fast(x, mask=other), model(x, mask=other))


class ExportWithFlag(ShapeBranchRawParam):
    """Needs export (shape branch on raw parameters) and takes a non-tensor keyword."""

    def forward(self, x, use_cache=True):
        y = super().forward(x)
        return (y, y.sum()) if use_cache else (y,)


def test_exported_graph_checks_and_defaults_its_fixed_arguments():
    model, x = ExportWithFlag(), torch.randn(4, 8)
    fast = sfx.sparsify(model, sfx.DropIT(keep=0.5, skip_first_last=False), (x,), {"use_cache": False},
                        capture_methods=("export",))
    fast.eval()
    (expected,) = model(x, use_cache=False)
    # left out: the captured value (export made it a constant; it used to be a TypeError)
    torch.testing.assert_close(fast(x)[0], expected)
    torch.testing.assert_close(fast(x, use_cache=False)[0], expected)
    # another value used to be ignored silently
    with pytest.raises(sfx.CaptureError, match=r"captured with use_cache=False.*example_kwargs=\{'use_cache': True\}"):
        fast(x, use_cache=True)
    fast = sfx.sparsify(model, sfx.DropIT(keep=0.5, skip_first_last=False), (x,), capture_methods=("export",))
    with pytest.raises(sfx.CaptureError, match=r"captured without the argument 'use_cache'.*example_kwargs"):
        fast(x, use_cache=False)


def test_budget_plans_a_model_with_non_tensor_defaults():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj = nn.Linear(16, 48), nn.Linear(16, 16)
            self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

        def forward(self, x, attn_mask=None, is_causal=False):
            q, k, v = self.qkv(x).chunk(3, -1)
            x = x + self.proj(F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal))
            return x + self.fc2(torch.relu(self.fc1(x)))

    model, x = Attention(), torch.randn(2, 8, 16)
    # the cost probe used to feed None to `is_causal` ("specialized to have value False")
    fast = sfx.sparsify(model, "budget:fraction=0.5", (x,))
    fast.train()
    fast(x).sum().backward()
    assert model.fc1.weight.grad is not None


def test_wrong_example_inputs_print_no_fx_traceback(capfd):
    with pytest.raises(sfx.CaptureError, match="does not run on the example inputs"):
        sfx.sparsify(mlp(), "dropit:keep=0.1+actmem", (torch.randn(2, 5),))
    err = capfd.readouterr().err
    assert "FX-traced Module" not in err and "Traceback" not in err, err
