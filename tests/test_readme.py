"""The README's torch.compile and distributed-training snippets run as written.

Each section's ```python blocks are joined and run in a fresh interpreter (Dynamo state and
the process group stay out of the test process), from the repository root, on one thread.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the first run compiles Inductor's C++ kernels (about 30 s on 2 CPU cores; cached after)
TIMEOUT_S = {"torch.compile": 240, "Distributed training": 60}


def readme_snippets(heading: str) -> list[str]:
    """The fenced ```python blocks of the README section titled ``## {heading}``."""
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"README has no '## {heading}' section"
    return re.findall(r"^```python\n(.*?)^```", match.group(1), flags=re.M | re.S)


@pytest.mark.parametrize("heading", list(TIMEOUT_S))
def test_readme_section_runs(heading):
    snippets = readme_snippets(heading)
    assert snippets, f"no python snippet under '## {heading}'"
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-c", "\n\n".join(snippets)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S[heading])
    assert done.returncode == 0, f"README '## {heading}' snippet failed:\n{done.stderr[-3000:]}"


def test_snippet_extraction():
    compile_code = "\n".join(readme_snippets("torch.compile"))
    assert 'backend="sparsify_fx"' in compile_code and "sfx.backend(" in compile_code
    distributed = "\n".join(readme_snippets("Distributed training"))
    assert "DistributedDataParallel" in distributed and "fully_shard" in distributed
    assert "extend_optimizer" in distributed
