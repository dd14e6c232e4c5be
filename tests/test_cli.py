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
    assert [r["config"] for r in data["rows"]] == ["dense", "dropit:keep=0.1"]
    assert all(r["saved_bytes"] > 0 and r["step_seconds"] > 0 for r in data["rows"])


def test_demo_runs(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sparsify_fx", "demo", "--repeats", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "verification: ok" in proc.stdout
    assert (tmp_path / "demo.json").exists()
