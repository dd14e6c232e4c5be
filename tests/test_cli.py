"""The command line: exit codes and messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sparsify_fx.cli.main import main

ROOT = Path(__file__).parent.parent


def test_inspect_small_model(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["inspect", "torchvision:resnet18", "--recipe", "dropit:keep=0.1",
               "--input-shape", "2,3,32,32", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert len(data["rewrites"]) == 19 and data["capture_method"] == "symbolic_trace"
    assert "layer1.0.conv1" in capsys.readouterr().out


def test_verify_command_ok(capsys):
    assert main(["verify", "torchvision:squeezenet1_0", "--recipe", "dropit:keep=0.1",
                 "--input-shape", "2,3,64,64"]) == 0
    assert "ok" in capsys.readouterr().out


def test_model_from_file(tmp_path, capsys):
    f = tmp_path / "mymodel.py"
    f.write_text("import torch.nn as nn\n"
                 "def build():\n    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(),"
                 " nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))\n")
    assert main(["inspect", f"{f}:build", "--recipe", "dropit:keep=0.5", "--input-shape", "2,3,2,2"]) == 0


@pytest.mark.parametrize(
    "argv,message",
    [
        (["inspect", "resnet18", "--recipe", "dropit"], "is not of the form"),
        (["inspect", "torchvision:nosuchnet", "--recipe", "dropit"], "torchvision has no model"),
        (["inspect", "torchvision:resnet18", "--recipe", "bogus:x=1"], "unknown pass 'bogus'"),
        (["inspect", "torchvision:resnet18", "--recipe", "dropit:keep=7"], "DropIT.keep"),
        (["inspect", "no_such_pkg_xyz:f", "--recipe", "dropit"], "cannot import"),
    ],
)
def test_bad_model_or_recipe_exit_2_with_message(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err


def test_python_dash_m_and_bench(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sparsify_fx", "bench", "torchvision:resnet18", "--recipe",
         "dropit:keep=0.1", "--input-shape", "2,3,32,32", "--repeats", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "bench_torchvision_resnet18.json").read_text())
    # tables name a recipe by its non-default fields (keep=0.1 is DropIT's default)
    assert [r["config"] for r in data["rows"]] == ["dense", "dropit"]
    assert data["headline"].startswith("held for backward after the forward:") and "measured" in data["headline"]
    assert "add actmem" in proc.stdout
    assert all(r["saved_bytes"] > 0 and r["step_seconds"] > 0 for r in data["rows"])


def test_demo_runs(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sparsify_fx", "demo", "--repeats", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "verification: ok" in proc.stdout
    assert "held for backward after the forward" in proc.stdout and "measured" in proc.stdout
    assert (tmp_path / "demo.json").exists()


TOKEN_MODEL = (
    "import torch, torch.nn as nn\n"
    "class Tok(nn.Module):\n"
    "    def __init__(self):\n"
    "        super().__init__()\n"
    "        self.emb = nn.Embedding(100, 16)\n"
    "        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)\n"
    "    def forward(self, ids, mask=None):\n"
    "        h = self.emb(ids)\n"
    "        if mask is not None:\n"
    "            h = h * mask.unsqueeze(-1)\n"
    "        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(h)))))\n"
    "def build():\n"
    "    return Tok()\n"
)


def test_input_specs_token_ids_and_keyword(tmp_path, capsys):
    f = tmp_path / "tok.py"
    f.write_text(TOKEN_MODEL)
    assert main(["inspect", f"{f}:build", "--recipe", "dropit:keep=0.5+actmem",
                 "--input", "int64[2,16]:0-100", "--input", "mask=float32[2,16]:1",
                 "--json", str(tmp_path)]) == 0  # a folder: FOLDER/report.json
    out = capsys.readouterr().out
    assert "held for backward after the forward" in out
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["rewrites"] and data["headline"]
    assert main(["verify", f"{f}:build", "--recipe", "dropit:keep=0.5",
                 "--input", "int64[2,16]:0-100", "--input", "mask=float32[2,16]:1"]) == 0


def test_parse_input_specs():
    import torch

    from sparsify_fx.cli.models import make_inputs, parse_input

    (ids,), kw = make_inputs([parse_input("int64[2,16]:0-1000"), parse_input("attention_mask=int64[2,16]:1")])
    assert ids.dtype == torch.int64 and ids.shape == (2, 16) and 0 <= ids.min() and ids.max() < 1000
    assert kw["attention_mask"].eq(1).all()
    assert parse_input("[2,3]").dtype == torch.float32
    assert parse_input("bfloat16[4]:-1..1").low == -1.0


@pytest.mark.parametrize(
    "spec,message",
    [("int64(2,16)", "is not of the form"), ("float99[2]", "is not a torch dtype"),
     ("int64[2,16]:9-1", "is empty"), ("int64[2]:a-b", "neither LOW-HIGH")],
)
def test_bad_input_spec_exit_2(spec, message, capsys):
    assert main(["inspect", "torchvision:resnet18", "--recipe", "dropit", "--input", spec]) == 2
    assert message in capsys.readouterr().err


def test_json_path_under_a_file_fails_before_the_run(tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("")
    # the model is never built: the error comes at once
    assert main(["inspect", "no_such_pkg_xyz:f", "--recipe", "dropit",
                 "--json", str(blocker / "r.json")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["bench", "torchvision:resnet18", "--recipe", "dropit"], ["demo"]])
def test_repeats_zero_is_rejected(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command, "--repeats", "0"])
    assert e.value.code == 2
    assert "--repeats: must be at least 1" in capsys.readouterr().err


def test_help_lists_passes_recipe_syntax_and_inputs(capsys):
    with pytest.raises(SystemExit):
        main(["inspect", "--help"])
    out = capsys.readouterr().out
    for word in ("recipes:", "PASS[:FIELD=VALUE", "dropit", "actmem", "budget", "sliceout", "isoflop", "bsr",
                 "[NAME=]DTYPE[SHAPE][:RANGE]", "int64[2,16]:0-1000"):
        assert word in out, word
