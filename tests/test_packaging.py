"""The built-in passes install as ``sparsify_fx.passes``: a user's own ``passes`` folder on
``sys.path`` cannot shadow them, and pyproject.toml ships every package of the tree."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_a_foreign_passes_folder_on_sys_path_changes_nothing(tmp_path):
    foreign = tmp_path / "passes"
    foreign.mkdir()
    (foreign / "__init__.py").write_text("raise ImportError('the user project\\'s own passes')\n")
    script = textwrap.dedent("""
        import sys
        sys.path.insert(0, {path!r})
        import torch
        import sparsify_fx as sfx
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        fast = sfx.sparsify(model, "dropit:keep=0.5", example_inputs=(torch.randn(4, 8),))
        print(sfx.DropIT.__module__, sorted(sfx.registered())[:2], "passes" in sys.modules)
    """).format(path=str(tmp_path))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    module, names, foreign_imported = out.stdout.split(" ", 1)[0], out.stdout, out.stdout.split()[-1]
    assert module == "sparsify_fx.passes.dropit"
    assert "'actmem'" in names and "'bsr'" in names
    assert foreign_imported == "False"  # nothing asked for a top-level `passes`


def _packages_on_disk() -> set[str]:
    found = set()
    for base, prefix in ((ROOT / "sparsify_fx", "sparsify_fx"), (ROOT / "passes", "sparsify_fx.passes")):
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base).parts
            found.add(".".join((prefix, *rel)))
    return found


def test_pyproject_lists_every_package():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(config["packages"]) == _packages_on_disk()
    assert config["package-dir"] == {"sparsify_fx.passes": "passes"}


def test_kernel_sources_ship_as_package_data():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = config["package-data"]["sparsify_fx.passes.kernels"]
    sources = [p for p in (ROOT / "passes" / "kernels").iterdir() if p.suffix in (".cpp", ".h")]
    assert sources, "the CPU kernels' C++ sources live in passes/kernels/"
    assert all(any(p.match(pattern) for pattern in patterns) for p in sources)
