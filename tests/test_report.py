"""sfx.explain, graph_diff, networkx export, the HTML report and the inspect command."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from conftest import SmallCNN

import sparsify_fx as sfx
from sparsify_fx.cli.main import main
from sparsify_fx.report.html import layered_layout, render_html, write_html

RECIPE = "dropit:keep=0.5+actmem"
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
MODEL_FILE = (
    "import torch.nn as nn\n"
    "def build():\n"
    "    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),\n"
    "                         nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 1),\n"
    "                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))\n"
)


@pytest.fixture(scope="module")
def fast() -> fx.GraphModule:
    torch.manual_seed(0)
    return sfx.sparsify(SmallCNN(), RECIPE, example_inputs=(torch.randn(2, 3, 8, 8),))


@pytest.fixture(scope="module")
def report(fast) -> sfx.ExplainReport:
    return sfx.explain(fast)


class _Branchy(nn.Module):
    """The root branches on data, so only its children are traced (two graphs)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8))
        self.b = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:
            h = h * 2
        return self.b(h)


# ------------------------------------------------------------------ report content


def test_pass_summaries_count_and_bytes(report):
    summaries = {s.pass_name: s for s in report.pass_summaries}
    assert list(summaries) == ["dropit", "actmem"]
    dropit, actmem = summaries["dropit"], summaries["actmem"]
    # stem and head are the first/last dense layers: kept by default
    assert (dropit.rewritten, dropit.skipped) == (3, 2)
    assert (actmem.rewritten, actmem.skipped) == (3, 0)
    assert dropit.flops_before == dropit.flops_after > 0
    assert 0 < dropit.saved_bytes_after < dropit.saved_bytes_before
    assert 0 < actmem.saved_bytes_after < actmem.saved_bytes_before
    assert dropit.saved_bytes_before + actmem.saved_bytes_before == report.saved_bytes_before
    assert dropit.saved_bytes_after + actmem.saved_bytes_after == report.saved_bytes_after
    text = report.render(width=160)
    assert "FLOPs before -> after" in text and "saved before -> after" in text


def test_to_dict_is_json_and_leaves_graphs_out(report):
    assert set(report.graph_modules) == {""}
    data = json.loads(json.dumps(report.to_dict()))  # no default=str: plain data only
    assert "graph_modules" not in data
    assert [s["rewritten"] for s in data["pass_summaries"]] == [3, 3]
    assert data["totals"]["saved_bytes_before"] == report.saved_bytes_before
    assert json.loads(report.to_json())["rewrites"][0]["pass_name"] == "dropit"


def test_explain_of_a_plain_module_has_its_graph():
    report = sfx.explain(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    assert report.rewrites == [] and report.pass_summaries == []
    assert report.to_networkx().number_of_nodes() == len(report.graph_modules[""].graph.nodes)


# ------------------------------------------------------------------ networkx


def test_to_networkx_nodes_attributes_and_edges(fast, report):
    g = report.to_networkx()
    nodes = list(fast.graph.nodes)
    assert g.number_of_nodes() == len(nodes)
    for n in nodes:
        attrs = g.nodes[n.name]
        assert {"op", "target", "module", "pass", "shape", "bytes"} <= set(attrs)
        assert attrs["op"] == n.op
        assert set(g.predecessors(n.name)) == {i.name for i in n.all_input_nodes}
    rewritten = {n: d for n, d in g.nodes(data=True) if d["pass"]}
    assert len(rewritten) == len(report.rewrites) == 6
    by_module = {d["module"]: d for d in rewritten.values() if d["pass"] == "dropit"}
    assert set(by_module) == {"conv", "dw", "pw"}
    assert by_module["pw"]["shape"] == (2, 16, 8, 8) and by_module["pw"]["bytes"] == 2 * 16 * 64 * 4
    assert by_module["conv"]["target"].startswith("sfx_ops.") and by_module["conv"]["rewrite"] == "conv2d"


def test_to_networkx_of_submodule_capture():
    # DropIT first: a ReLU whose output a dense Linear keeps anyway gets no mask
    fast = sfx.sparsify(_Branchy(), "dropit:skip_first_last=False+actmem", example_inputs=(torch.randn(2, 6),))
    report = sfx.explain(fast)
    assert set(report.graph_modules) == {"a", "b"}
    g = report.to_networkx()
    assert g.number_of_nodes() == sum(len(gm.graph.nodes) for gm in report.graph_modules.values())
    passes = {n: d["module"] for n, d in g.nodes(data=True) if d["pass"] == "actmem"}
    assert sorted(passes.values()) == ["a.1", "b.1"] and all(":" in n for n in passes)


# ------------------------------------------------------------------ diff


def test_graph_diff_names_every_rewritten_module_and_fits_80_columns(fast, report):
    diff = sfx.graph_diff(fast)
    assert diff == report.graph_diff()
    lines = diff.splitlines()
    assert max(len(line) for line in lines) <= 80
    for r in report.rewrites:
        assert (r.module or "(root)") in lines and r.replacement in diff
    assert "first/last dense layer kept dense" in diff
    assert "- %conv2d_1: conv2d  [dropit]" in diff
    assert max(len(line) for line in report.graph_diff(width=50).splitlines()) <= 50


# ------------------------------------------------------------------ HTML


def _assert_self_contained(text: str) -> None:
    urls = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]+)""", text, flags=re.I)
    assert not [u for u in urls if re.match(r"(?:https?:)?//", u)], urls
    assert not re.search(r"<script[^>]*\bsrc\s*=", text, flags=re.I)
    assert not re.search(r"<link\b", text, flags=re.I)
    assert "http://" not in text and "https://" not in text


def test_html_is_self_contained_with_a_node_per_rewritten_layer(fast, report, tmp_path):
    path = write_html(fast, tmp_path / "r.html")
    text = path.read_text()
    _assert_self_contained(text)
    assert text.count("<svg") >= 3  # overview, one per module group, memory bars
    rewritten = re.findall(r'<g class="node op-node rewritten" data-node="([^"]+)"', text)
    assert len(rewritten) == len(report.rewrites)
    for r in report.rewrites:
        assert f'class="membar" data-module="{r.module}" data-pass="{r.pass_name}"' in text
    assert "<details" in text and "<summary>" in text
    assert render_html(report) == render_html(fast)


def test_layered_layout_handles_back_edges():
    pos = layered_layout(["a", "b", "c"], [("a", "b"), ("b", "c"), ("c", "a")])
    assert pos == {"a": (0, 0), "b": (1, 0), "c": (2, 0)}


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_html_renders_in_headless_chromium(fast, report, tmp_path):
    html = write_html(fast, tmp_path / "r.html")
    png = tmp_path / "shot.png"
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}"]
    subprocess.run(flags + [f"--screenshot={png}", "--window-size=1200,900", html.as_uri()],
                   capture_output=True, timeout=120, check=False)
    assert png.exists() and png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    dom = subprocess.run(flags + ["--dump-dom", html.as_uri()], capture_output=True, text=True,
                         timeout=120, check=False).stdout
    assert "<svg" in dom
    assert len(re.findall(r'class="node op-node rewritten"', dom)) == len(report.rewrites)


# ------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny.py"
    path.write_text(MODEL_FILE)
    return path


def test_inspect_diff_html_json(model_file, tmp_path, capsys):
    html, js = tmp_path / "out" / "r.html", tmp_path / "r.json"
    rc = main(["inspect", f"{model_file}:build", "--recipe", RECIPE, "--input-shape", "2,3,4,4",
               "--diff", "--html", str(html), "--json", str(js)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "graph diff:" in out and "[dropit]" in out and f"HTML report written to {html}" in out
    data = json.loads(js.read_text())
    assert [s["pass_name"] for s in data["pass_summaries"]] == ["dropit", "actmem"]
    _assert_self_contained(html.read_text())


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is not None, reason="matplotlib is installed")
def test_inspect_plot_without_matplotlib_is_a_clear_error(model_file, tmp_path, capsys):
    png = tmp_path / "p.png"
    rc = main(["inspect", f"{model_file}:build", "--recipe", RECIPE, "--plot", str(png)])
    assert rc == 2 and not png.exists()
    assert "--plot needs matplotlib" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib is not installed")
def test_inspect_plot_png(model_file, tmp_path):
    png = tmp_path / "p.png"
    assert main(["inspect", f"{model_file}:build", "--recipe", RECIPE, "--input-shape", "2,3,4,4",
                 "--plot", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "model,recipe,message",
    [
        ("{dir}/missing.py:build", "dropit", "does not exist"),
        ("{file}:nosuchfactory", "dropit", "has no attribute 'nosuchfactory'"),
        ("{file}", "dropit", "is not of the form"),
        ("{file}:build", "dropit:keep=", "DropIT.keep"),
        ("{file}:build", "dropit:nosuchfield=1", "nosuchfield"),
        ("{file}:build", "nosuchpass", "unknown pass 'nosuchpass'"),
    ],
)
def test_inspect_bad_model_or_recipe_exit_2(model, recipe, message, model_file, tmp_path, capsys):
    html = tmp_path / "r.html"
    spec = model.format(dir=tmp_path, file=model_file)
    assert main(["inspect", spec, "--recipe", recipe, "--html", str(html), "--diff"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparsify-fx inspect: error:") and message in err
    assert not html.exists()


# ------------------------------------------------------------------ the honest headline


class _ResBlockNet(nn.Module):
    """ResNet-style: conv -> BN -> ReLU, a residual block, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        h = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.bn2(self.conv2(h)))
        x = torch.relu(self.conv3(x))
        return self.head(x.mean((2, 3)))


def _sparsify_recording(recipe: str):
    import warnings

    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = sfx.sparsify(_ResBlockNet(), recipe, example_inputs=(torch.randn(2, 3, 8, 8),))
    return fast, [str(w.message) for w in caught if issubclass(w.category, UserWarning)
                  and "sparsify:" in str(w.message)]


def test_dropit_alone_on_conv_relu_warns_naming_holder_and_fix():
    _, messages = _sparsify_recording("dropit:keep=0.1")
    assert len(messages) == 1, messages
    msg = messages[0]
    assert re.search(r"kept by (relu|.*bn)\w* backward", msg), msg
    assert "add actmem" in msg and "'dropit+actmem'" in msg


def test_dropit_with_actmem_does_not_warn():
    _, messages = _sparsify_recording("dropit:keep=0.1+actmem")
    assert messages == []


class _ResMLP(nn.Module):
    """Residual pre-norm MLP blocks: the GELU keeps its 4x-wide input dense for backward."""

    def __init__(self, d: int = 64):
        super().__init__()
        self.stem = nn.Linear(32, d)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)) for _ in range(3))
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


@pytest.mark.parametrize("recipe", ["bsr", "bsr+actmem"])
def test_bsr_alone_on_a_residual_mlp_says_it_needs_actmem(recipe):
    import warnings

    from sparsify_fx.bench import saved_tensor_bytes

    torch.manual_seed(0)
    model, x = _ResMLP(), torch.randn(32, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = sfx.sparsify(model, recipe, example_inputs=(x,))
    messages = [str(w.message) for w in caught if "sparsify:" in str(w.message)]
    measured = saved_tensor_bytes(fast, (x,)) / saved_tensor_bytes(model, (x,))
    if recipe == "bsr":
        assert len(messages) == 1, messages
        assert "gelu" in messages[0] and "'bsr+actmem'" in messages[0], messages[0]
        assert measured > 0.7  # what the warning is about: most of the bytes stay
    else:
        assert messages == [] and measured < 0.6, (messages, measured)


def test_headline_is_the_memory_plan_and_matches_measured():
    from sparsify_fx.bench import saved_tensor_bytes

    x = torch.randn(2, 3, 8, 8)
    torch.manual_seed(0)
    model = _ResBlockNet()
    dense = saved_tensor_bytes(model, (x,))
    ratios = {}
    for recipe in ("dropit:keep=0.1", "dropit:keep=0.1+actmem"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fast = sfx.sparsify(model, recipe, example_inputs=(x,))
        report = sfx.explain(fast)
        b0, b1 = report.held_bytes_before, report.held_bytes_after
        assert b0 and b1
        measured = saved_tensor_bytes(fast, (x,)) / dense
        assert abs(b1 / b0 - measured) < 0.05, (recipe, b1 / b0, measured)
        ratios[recipe] = b1 / b0
        text = report.render(width=100)
        # the whole model's held bytes come first, before any per-layer figure
        assert text.splitlines()[2].startswith("held for backward after the forward:")
        assert text.index("held for backward") < text.index("per layer")
        assert report.to_dict()["headline"] == report.headline
    # the per-rewrite sum says ~0.1x for DropIT alone; the whole model holds about as much
    assert ratios["dropit:keep=0.1"] > 0.95
    assert ratios["dropit:keep=0.1+actmem"] < 0.7
    report.measured_bytes_before, report.measured_bytes_after = dense, dense // 2
    assert "measured" in report.headline and "(0.500x)" in report.headline


def test_report_lists_compressed_copies_still_held_dense():
    fast, _ = _sparsify_recording("dropit:keep=0.1")
    report = sfx.explain(fast)
    doubled = report.false_savings()
    assert doubled and all(f.holders and f.compressed_by for f in doubled)
    assert report.to_dict()["memory_plan"]["compressed_but_kept_dense"]
    assert "add actmem" in report.render(width=120)


def test_html_leads_with_headline_and_has_memory_plan():
    fast, _ = _sparsify_recording("dropit:keep=0.1")
    page = render_html(fast)
    assert page.index("held for backward after the forward") < page.index("<h2>Passes</h2>")
    assert "<h2>Memory plan</h2>" in page and "kept by" in page and "add actmem" in page


def test_tables_show_only_non_default_fields():
    from sparsify_fx.infra.describe import short_description, short_recipe

    assert short_description(sfx.DropIT(keep=0.3)) == "dropit:keep=0.3"
    assert short_description(sfx.ActivationMemory()) == "actmem"
    assert short_recipe(sfx.DropIT(keep=0.3).describe()) == "dropit:keep=0.3"
    fast, _ = _sparsify_recording("dropit:keep=0.3+actmem")
    text = sfx.explain(fast).render(width=80)
    assert "recipe: dropit:keep=0.3 + actmem" in text
    assert "block_size" not in text and "weight_grad" not in text  # actmem's defaults


def test_meta_model_verify_skips_and_to_empty_works():
    with torch.device("meta"):
        model = SmallCNN()
    x = torch.randn(2, 3, 8, 8, device="meta")
    fast = sfx.sparsify(model, "dropit:keep=0.5+actmem", example_inputs=(x,))
    summary = sfx.explain(fast).verification
    assert summary.startswith("skipped:") and "meta device" in summary and "to_empty" in summary
    report = sfx.verify(model, fast, (x,))
    assert report.ok and report.skipped
    real = fast.to_empty(device="cpu")
    real.train()
    real(torch.randn(2, 3, 8, 8)).sum().backward()
