"""The README's Python snippets run as pasted, and its versions table names the versions this suite runs on.

A snippet preceded by ``<!-- readme-test: python -->`` is saved to a file and run with this Python; one preceded
by ``<!-- readme-test: torchrun N -->`` runs under torchrun with N local processes. Both run in a scratch folder
on the CPU (they use pycfg's tiny built-in pipelines) and must exit 0 and write the image they save. Every other
Python snippet (real checkpoints, CUDA) must at least parse.
"""

from __future__ import annotations

import ast
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPET = re.compile(r"(?:<!-- readme-test: (?P<how>[^>]*?) -->\n)?```python\n(?P<code>.*?)```", re.S)


def _snippets() -> list[tuple[str | None, str]]:
    return [(m["how"], m["code"]) for m in SNIPPET.finditer(README.read_text())]


def _runnable() -> list[tuple[str, str]]:
    return [(how, code) for how, code in _snippets() if how]


def test_every_python_snippet_parses():
    snippets = _snippets()
    assert len(snippets) >= 4
    for _, code in snippets:
        ast.parse(code)


@pytest.mark.parametrize("how,code", _runnable(), ids=[f"{how}-{i}" for i, (how, _) in enumerate(_runnable())])
def test_runnable_snippet_runs_as_pasted(how, code, tmp_path):
    script = tmp_path / "snippet.py"
    script.write_text(code)
    kind, *rest = how.split()
    if kind == "python":
        command = [sys.executable, str(script)]
    elif kind == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", rest[0], str(script)]
    else:
        raise AssertionError(f"unknown readme-test kind {how!r}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "RANK", "WORLD_SIZE", "LOCAL_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    saved = re.findall(r"\.save\(\"([^\"]+)\"\)", code)
    assert saved and all((tmp_path / name).is_file() for name in saved), sorted(p.name for p in tmp_path.iterdir())


def _cpu_column() -> dict[str, str]:
    rows = {}
    for line in README.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] in ("Python", "torch", "diffusers", "transformers", "triton"):
            rows[cells[0]] = cells[1]
    return rows


def test_versions_table_names_this_environment():
    """When CI moves to other versions, this fails until the README's table says what was tested."""
    import diffusers
    import torch
    import transformers

    here = {"Python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}
    try:
        import triton

        here["triton"] = triton.__version__
    except ImportError:
        pass
    table = _cpu_column()
    for name, version in here.items():
        assert table.get(name, "").split()[0] == version, f"README versions table: {name} {version} not listed"
