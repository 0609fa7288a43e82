"""The installed ``pycfg`` console script, run as a real command."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def pycfg_command() -> list[str]:
    script = Path(sys.executable).parent / "pycfg"
    if script.exists():
        return [str(script)]
    found = shutil.which("pycfg")
    if found:
        return [found]
    pytest.skip("the pycfg console script is not installed (pip install -e .)")


def run(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*pycfg_command(), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_help_lists_commands():
    res = run("--help")
    assert res.returncode == 0
    for command in ("demo", "bench", "env"):
        assert command in res.stdout
    assert run().returncode == 2  # no command: usage, not success


@pytest.mark.parametrize("command, needle", [("demo", "--steps"), ("bench", "pycfg bench [NAME]"),
                                             ("env", "--json")])
def test_each_command_has_help(command, needle):
    res = run(command, "--help")
    assert res.returncode == 0, res.stderr
    assert needle in res.stdout


def test_env_reports_versions_devices_and_nccl():
    res = run("env")
    assert res.returncode == 0, res.stderr
    assert torch.__version__ in res.stdout
    for label in ("python", "diffusers", "triton", "device", "NCCL", "extension"):
        assert label in res.stdout
    info = json.loads(run("env", "--json").stdout)
    assert info["torch"] == torch.__version__
    assert info["cuda_available"] == torch.cuda.is_available()
    assert info["nccl_found"] == (info["nccl_version"] is not None)
    assert info["extension"] == "ready" or info["extension_reason"]


def test_bench_runs_a_checkout_benchmark(tmp_path):
    (tmp_path / "bench_echo.py").write_text("import sys\nprint('echo', *sys.argv[1:])\nsys.exit(3)\n")
    env = {"PYCFG_BENCHMARKS": str(tmp_path)}
    res = run("bench", "echo", "--steps", "2", env=env)
    assert res.returncode == 3 and res.stdout.strip() == "echo --steps 2"
    res = run("bench", "missing", env=env)
    assert res.returncode == 2 and "available: echo" in res.stderr


def test_bench_without_benchmarks_says_where_they_are(tmp_path):
    res = run("bench", env={"PYCFG_BENCHMARKS": str(tmp_path)})
    assert res.returncode == 2
    assert "not part of an installed pycfg wheel" in res.stderr and "benchmarks/" in res.stderr


def test_bench_finds_the_repository_benchmarks():
    env = {k: v for k, v in os.environ.items() if k != "PYCFG_BENCHMARKS"}
    res = subprocess.run([*pycfg_command(), "bench", "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and "pipeline" in res.stdout


def test_demo_runs_the_embedded_job(tmp_path):
    out = tmp_path / "demo.png"
    res = run("demo", "--config", "tiny", "--steps", "2", "--out", str(out), timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "max |pycfg - stock|" in res.stdout and "ranks identical: True" in res.stdout
    assert "1 thread(s) per rank" in res.stdout
    assert out.exists() and out.stat().st_size > 0


def _git_status(root: Path) -> str | None:
    try:
        res = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        return None
    return res.stdout if res.returncode == 0 else None


def test_benchmarks_leave_the_checkout_clean():
    """A plain benchmark run writes a fresh git-ignored folder; committed results change only on request."""
    root = Path(__file__).resolve().parents[1]
    before = _git_status(root)
    if before is None:
        pytest.skip("not a git checkout")
    committed = {p: p.stat().st_mtime_ns for p in (root / "benchmarks" / "results").glob("*.json")}
    env = {k: v for k, v in os.environ.items() if k != "PYCFG_BENCHMARKS"}
    res = subprocess.run([*pycfg_command(), "bench", "kernels", "--device", "cpu"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert _git_status(root) == before
    assert {p: p.stat().st_mtime_ns for p in committed} == committed
