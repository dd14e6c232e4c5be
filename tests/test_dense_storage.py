"""ActivationMemory(dense="bf16"): Linear / Conv / matmul keep their input as bf16 for the
weight gradient. The ops against dense autograd, the pass's choices and reports, and the
memory it frees."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from conftest import grads_of as _grads
from sparsify_fx.passes.activation_memory.dense_storage import Bf16InputConv, Bf16InputLinear

import sparsify_fx as sfx
from benchmarks.memory import saved_tensor_bytes

BF16_UNIT = 2.0**-8  # bf16 relative rounding error bound (round to nearest: half of it)


LINEAR_CASES = {
    "linear": (lambda x, w, b: F.linear(x, w, b), (5, 7, 12), (6, 12)),
    "matmul": (lambda x, w, b: torch.matmul(x, w), (5, 7, 12), (12, 6)),
    "addmm": (lambda x, w, b: torch.addmm(b, x, w), (9, 12), (12, 6)),
}


#: the weight gradient's first-order error bound, in units of ``sum|grad_out| |x|``: the input
#: rounded ("input"), or the input, grad_out and the product rounded ("bf16", bf16_matmul.py)
WEIGHT_GRAD_UNITS = {"input": BF16_UNIT, "bf16": 3 * BF16_UNIT + 2.0**-14}


@pytest.mark.parametrize("weight_grad", ["input", "bf16"])
@pytest.mark.parametrize("kind", list(LINEAR_CASES))
def test_linear_forward_and_input_grad_exact_weight_grad_sees_bf16_input(kind, weight_grad):
    dense_fn, x_shape, w_shape = LINEAR_CASES[kind]
    torch.manual_seed(0)
    x = torch.randn(*x_shape, requires_grad=True)
    w = torch.randn(*w_shape, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    op = Bf16InputLinear(kind, weight_grad).train()
    out, (gx, gw, gb), g = _grads(lambda: op(x, w, b if kind != "matmul" else None), x, w, b)
    ref, (rgx, rgw, rgb), _ = _grads(lambda: dense_fn(x, w, b), x, w, b)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(gx, rgx, rtol=0, atol=0)
    if kind != "matmul":
        torch.testing.assert_close(gb, rgb, rtol=0, atol=0)
    # the weight gradient is the dense formula on the rounded input (and grad_out)...
    xr = x.detach().to(torch.bfloat16).float().reshape(-1, x_shape[-1])
    g2 = g.reshape(-1, g.shape[-1])
    gr = g2.to(torch.bfloat16).float() if weight_grad == "bf16" else g2
    expected = xr.t() @ gr if kind != "linear" else gr.t() @ xr
    # (with bf16 operands the product itself is rounded to bf16: half an ulp of it)
    torch.testing.assert_close(gw, expected, rtol=1e-5 if weight_grad == "input" else 2.0**-8, atol=1e-5)
    # ...within the documented bound of the exact one
    bound = WEIGHT_GRAD_UNITS[weight_grad] * (g2.abs().t() @ x.detach().abs().reshape(-1, x_shape[-1]))
    err = (gw - rgw).abs()
    assert torch.all(err <= (bound.t() if kind != "linear" else bound) + 1e-6)
    assert err.max() > 0  # the rounding is real: this is not the dense op


@pytest.mark.parametrize("weight_grad", ["input", "bf16"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv_forward_and_input_grad_exact(dims, weight_grad):
    torch.manual_seed(0)
    spatial = (9,) * dims
    x = torch.randn(2, 4, *spatial, requires_grad=True)
    w = torch.randn(6, 2, *(3,) * dims, requires_grad=True)  # groups=2
    b = torch.randn(6, requires_grad=True)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    op = Bf16InputConv([2] * dims, [1] * dims, [1] * dims, 2, weight_grad).train()
    out, (gx, gw, gb), g = _grads(lambda: op(x, w, b), x, w, b)
    ref, (rgx, rgw, rgb), _ = _grads(lambda: conv(x, w, b, 2, 1, 1, 2), x, w, b)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(gx, rgx, rtol=0, atol=0)
    torch.testing.assert_close(gb, rgb, rtol=0, atol=0)
    xr = x.detach().to(torch.bfloat16).float().requires_grad_()
    wr = w.detach().requires_grad_()
    # a CPU Conv3d computes the weight gradient upcast (oneDNN's bf16 Conv3d backward is unreliable)
    bf16_operands = weight_grad == "bf16" and dims != 3
    conv(xr, wr, None, 2, 1, 1, 2).backward(g.to(torch.bfloat16).float() if bf16_operands else g)
    torch.testing.assert_close(gw, wr.grad, rtol=2.0**-8 if bf16_operands else 1e-5, atol=1e-5)
    # |dgrad_weight| <= unit * (the weight gradient of |x| against |grad_out|)
    xa = x.detach().abs().requires_grad_(False)
    wa = w.detach().requires_grad_()
    conv(xa, wa, None, 2, 1, 1, 2).backward(g.abs())
    assert torch.all((gw - rgw).abs() <= WEIGHT_GRAD_UNITS[weight_grad] * wa.grad + 1e-6)
    assert gw.dtype == w.dtype


@pytest.mark.parametrize("weight_grad", ["auto", "bf16", "input"])
def test_weight_grad_mode_follows_the_device(weight_grad, monkeypatch):
    """"auto" takes bf16 operands exactly where the device has bf16 matrix units."""
    from sparsify_fx.passes.kernels import bf16_matmul

    x = torch.randn(3, 8)
    for native in (False, True):
        monkeypatch.setattr(bf16_matmul, "_native", lambda kind, index, native=native: native)
        expected = {"auto": native, "bf16": True, "input": False}[weight_grad]
        assert bf16_matmul.bf16_weight_grad(weight_grad, x) is expected
        # never for an input already 2 bytes wide (nothing was rounded to store it)
        assert bf16_matmul.bf16_weight_grad(weight_grad, x.to(torch.bfloat16)) is False


def test_bad_weight_grad_is_an_error_naming_the_setting():
    with pytest.raises(sfx.ConfigError, match="weight_grad"):
        sfx.ActivationMemory(dense="bf16", weight_grad="fp8")
    with pytest.raises(ValueError, match="Bf16InputLinear: weight_grad"):
        Bf16InputLinear("linear", "fp32")


def test_eval_autocast_and_half_inputs_run_the_original_op():
    torch.manual_seed(0)
    x, w = torch.randn(4, 8), torch.randn(3, 8, requires_grad=True)
    op = Bf16InputLinear("linear")
    op.eval()
    with torch.no_grad():
        torch.testing.assert_close(op(x, w), F.linear(x, w), rtol=0, atol=0)
    op.train()
    # autocast already saves the cast input; the op must not add a second copy
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = op(x, w)
        ref = F.linear(x, w)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert out.grad_fn.name() == ref.grad_fn.name()  # the aten op, not ours
    half = op(x.to(torch.bfloat16), w.detach().to(torch.bfloat16).requires_grad_())
    assert "bf16in" not in half.grad_fn.name()


def test_non_finite_inputs_give_the_dense_non_finite_weight_grads():
    x = torch.tensor([[1.0, float("inf"), 3.0e38, float("nan")]])
    w = torch.ones(2, 4, requires_grad=True)
    Bf16InputLinear("linear").train()(x, w).sum().backward()
    w2 = torch.ones(2, 4, requires_grad=True)
    F.linear(x, w2).sum().backward()
    # inf and NaN survive the cast: the weight gradient is non-finite exactly where dense's is
    assert torch.equal(torch.isnan(w.grad), torch.isnan(w2.grad))
    assert torch.equal(torch.isposinf(w.grad), torch.isposinf(w2.grad))
    assert torch.isfinite(w.grad[:, 2]).all()  # 3e38 is within bf16's range
    torch.testing.assert_close(w.grad[:, 0], w2.grad[:, 0], rtol=0, atol=0)


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(F.gelu(self.fc1(x)))))


def test_pass_rewrites_dense_layers_and_reports_the_graph_input_layer():
    torch.manual_seed(0)
    model, x = _MLP(), torch.randn(16, 32)
    fast = sfx.sparsify(model, sfx.ActivationMemory(dense="bf16"), example_inputs=(x,))
    report = sfx.explain(fast)
    dense = [r for r in report.rewrites if r.op == "linear"]
    assert sorted(r.module for r in dense) == ["fc2", "fc3"]
    assert all(r.details["storage"] == "bf16" and r.saved_bytes_after * 2 == r.saved_bytes_before for r in dense)
    skipped = {s.module: s.reason for s in report.skipped}
    assert "graph input" in skipped["fc1"]
    assert set(fast.state_dict()) == set(model.state_dict())
    assert all(isinstance(m, nn.Linear) for m in (model.fc1, model.fc2, model.fc3))  # not mutated


def test_pass_leaves_dropit_layers_to_dropit():
    torch.manual_seed(0)
    model, x = _MLP(), torch.randn(16, 32)
    fast = sfx.sparsify(model, [sfx.DropIT(keep=0.5, filter_fn=lambda name, m: name == "fc2"),
                                sfx.ActivationMemory(dense="bf16")], example_inputs=(x,))
    by_pass = {(r.pass_name, r.module) for r in sfx.explain(fast).rewrites if r.op == "linear"}
    assert ("dropit", "fc2") in by_pass
    assert ("actmem", "fc3") in by_pass and ("actmem", "fc2") not in by_pass


def test_frees_the_dense_inputs_and_the_plan_agrees():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().train()
    x = torch.randn(2, 3, 64, 64)
    light = sfx.sparsify(model, sfx.ActivationMemory(), example_inputs=(x,))
    fast = sfx.sparsify(model, sfx.ActivationMemory(dense="bf16"), example_inputs=(x,))
    dense_b = saved_tensor_bytes(model, (x,), count_inputs=False)
    light_b = saved_tensor_bytes(light.train(), (x,), count_inputs=False)
    fast_b = saved_tensor_bytes(fast.train(), (x,), count_inputs=False)
    # ActivationMemory alone cannot free a conv input (ReLU's output); dense="bf16" does
    assert fast_b < 0.9 * light_b and fast_b < 0.7 * dense_b
    compressed = {r.node: r.saved_bytes_after or 0 for r in sfx.explain(fast).rewrites}
    planned = sfx.memory_plan(fast, compressed)
    with_input = saved_tensor_bytes(fast, (x,))  # the plan counts the batch the stem conv holds
    assert abs(planned.total_bytes - with_input) <= 0.02 * with_input


@pytest.mark.parametrize("weight_grad", ["input", "bf16"])
def test_training_step_matches_dense_loosely_and_survives_copies(weight_grad):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    fast = sfx.sparsify(model, sfx.ActivationMemory(dense="bf16", weight_grad=weight_grad), example_inputs=(x,))
    dense_rewrites = [r for r in sfx.explain(fast).rewrites if r.op.startswith("conv")]
    assert dense_rewrites and all(r.details["weight_grad"] == weight_grad for r in dense_rewrites)
    # the kernel each Conv's weight gradient is priced by (MemoryBudget: a 1x1 gains less)
    kernels = {r.module: r.details["kernel"] for r in dense_rewrites}
    assert kernels["layer1.0.conv1"] == [3, 3] and kernels["layer2.0.downsample.0"] == [1, 1]

    def grads(m: nn.Module) -> dict[str, torch.Tensor]:
        m.train()
        for p in m.parameters():
            p.grad = None
        F.cross_entropy(m(x), y).backward()
        return {k: p.grad.clone() for k, p in m.named_parameters()}

    ref, got = grads(copy.deepcopy(model)), grads(fast)
    for k, g in got.items():  # bf16 weight-gradient inputs and BatchNorm x_hat, 20 layers deep
        assert (g - ref[k]).norm() <= 0.02 * ref[k].norm(), k
    for clone in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
        for k, g in grads(clone).items():
            torch.testing.assert_close(g, got[k], rtol=1e-6, atol=1e-7, msg=k)


def test_bad_dense_value_is_a_config_error():
    with pytest.raises(sfx.ConfigError, match="dense"):
        sfx.ActivationMemory(dense="int8")
