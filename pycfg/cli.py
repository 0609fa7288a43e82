"""The ``pycfg`` command line: ``pycfg demo``, ``pycfg serve``, ``pycfg bench``, ``pycfg env``.

    pycfg demo [--steps 20] [--config tiny|demo|small]   the embedded default job (what `make demo` runs)
    pycfg serve [MODEL] [--cfg-parallel-size N] ...      an OpenAI-compatible image server (the 'serve' extra)
    pycfg bench [pipeline|kernels|comm] [ARGS...]        the benchmarks of a source checkout
    pycfg env [--json]                                   versions, devices, NCCL and the extension
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

BENCH_ENV = "PYCFG_BENCHMARKS"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pycfg",
        description="Exact, fast classifier-free-guidance parallelism for diffusers pipelines.",
        epilog="Run `pycfg COMMAND --help` for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("demo", add_help=False,
                   help="run the embedded default job: a tiny Qwen-Image pipeline, stock vs CFG-parallel on 2 "
                        "local processes")
    sub.add_parser("serve", add_help=False,
                   help="serve a pipeline behind OpenAI's Images API, CFG-parallel (pip install 'pycfg[serve]')")
    sub.add_parser("bench", add_help=False, help="run a benchmark of a source checkout (pipeline, kernels, comm)")
    env = sub.add_parser("env", help="print Python, torch, diffusers and triton versions, devices, NCCL and "
                                     "the NCCL extension's state",
                         description="Print what pycfg will run on: versions, devices, NCCL, the extension.")
    env.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return parser


# -- pycfg demo -----------------------------------------------------------------------------------------------


def _demo(argv: list[str]) -> int:
    from . import demo

    return demo.main(argv)


# -- pycfg serve ----------------------------------------------------------------------------------------------


def _serve(argv: list[str]) -> int:
    try:
        from .serve import server
    except ImportError as err:
        print(f"pycfg serve needs the 'serve' extra: pip install 'pycfg[serve]' ({err})", file=sys.stderr)
        return 2
    return server.main(argv)


# -- pycfg bench ----------------------------------------------------------------------------------------------


def find_benchmarks() -> Path | None:
    """The source checkout's ``benchmarks/`` directory, or None in an installed wheel (which ships none).

    ``$PYCFG_BENCHMARKS``, when set, is the only place looked at; otherwise the directory beside the package
    (an editable or in-tree install).
    """
    if os.environ.get(BENCH_ENV):
        path = Path(os.environ[BENCH_ENV])
    else:
        path = Path(__file__).resolve().parent.parent / "benchmarks"
    if path.is_dir() and any(path.glob("bench_*.py")):
        return path
    return None


def _bench_names(directory: Path) -> list[str]:
    return sorted(p.stem[len("bench_"):] for p in directory.glob("bench_*.py"))


_BENCH_USAGE = """usage: pycfg bench [NAME] [ARGS...]

Run benchmarks/bench_NAME.py of the source checkout with this Python (default NAME: pipeline).
ARGS go to the benchmark; `pycfg bench NAME --help` shows its options.
"""


def _bench(argv: list[str]) -> int:
    directory = find_benchmarks()
    if argv and argv[0] in ("-h", "--help"):
        print(_BENCH_USAGE)
        if directory is None:
            print(_no_benchmarks_text())
        else:
            print(f"benchmarks in {directory}: {', '.join(_bench_names(directory))}")
        return 0
    if directory is None:
        print(_no_benchmarks_text(), file=sys.stderr)
        return 2
    names = _bench_names(directory)
    name = "pipeline"
    if argv and not argv[0].startswith("-"):
        name, argv = argv[0], argv[1:]
    if name not in names:
        print(f"pycfg bench: no benchmark {name!r}; available: {', '.join(names)}", file=sys.stderr)
        return 2
    script = directory / f"bench_{name}.py"
    # a separate interpreter: the benchmarks spawn their own ranks and parse their own arguments
    return subprocess.call([sys.executable, str(script), *argv])


def _no_benchmarks_text() -> str:
    return (
        "pycfg bench: the benchmarks are not part of an installed pycfg wheel; they live in the benchmarks/ "
        "directory of the source repository. Run `pycfg bench` from an editable install of a checkout "
        f"(pip install -e .), or point {BENCH_ENV} at a checkout's benchmarks/ directory."
    )


# -- pycfg env ------------------------------------------------------------------------------------------------


def _version(module: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """What pycfg runs on: versions, devices, torch's and the extension's NCCL."""
    import torch

    import pycfg

    from .parallel import nccl

    info: dict = {
        "pycfg": pycfg.__version__,
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "diffusers": _version("diffusers"),
        "triton": _version("triton"),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            devices.append({"device": f"cuda:{i}", "name": props.name,
                            "memory_gib": round(props.total_memory / 2**30, 1),
                            "capability": f"{props.major}.{props.minor}"})
    info["cuda_available"] = torch.cuda.is_available()
    info["devices"] = devices
    torch_nccl = None
    if torch.cuda.is_available() and hasattr(torch.cuda, "nccl"):
        try:
            v = torch.cuda.nccl.version()
            torch_nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except Exception:
            pass
    info["torch_nccl"] = torch_nccl
    info["torch_distributed"] = {"available": torch.distributed.is_available(),
                                 "gloo": torch.distributed.is_available() and torch.distributed.is_gloo_available(),
                                 "nccl": torch.distributed.is_available() and torch.distributed.is_nccl_available()}
    try:
        from . import _nccl  # noqa: F401

        info["extension_built"] = True
    except ImportError:
        info["extension_built"] = False
    reason = nccl.unavailable_reason()
    loaded = nccl.version()
    info["nccl_library"] = nccl.library_path()
    info["nccl_found"] = loaded is not None
    info["nccl_version"] = ".".join(map(str, loaded)) if loaded else None
    info["extension"] = "ready" if reason is None else "unavailable"
    info["extension_reason"] = reason
    return info


def _env(argv: list[str], parser: argparse.ArgumentParser) -> int:
    args = parser.parse_args(["env", *argv])
    info = environment()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"pycfg       {info['pycfg']}")
    print(f"python      {info['python']}")
    print(f"platform    {info['platform']}")
    print(f"torch       {info['torch']} (CUDA {info['torch_cuda'] or 'none'})")
    print(f"diffusers   {info['diffusers'] or 'not installed'}")
    print(f"triton      {info['triton'] or 'not installed'}")
    print(f"cpu         {info['cpu_count']} cores, torch uses {info['cpu_threads']} threads")
    if info["devices"]:
        for d in info["devices"]:
            print(f"device      {d['device']}: {d['name']}, {d['memory_gib']} GiB, sm {d['capability']}")
    else:
        print("device      no CUDA device: CPU only (gloo collectives, PyTorch reference path)")
    dist = info["torch_distributed"]
    print(f"distributed available={dist['available']} gloo={dist['gloo']} nccl={dist['nccl']}")
    print(f"torch NCCL  {info['torch_nccl'] or 'none'}")
    if info["nccl_found"]:
        print(f"NCCL        found: {info['nccl_version']} ({info['nccl_library']})")
    else:
        print(f"NCCL        not found ({info['nccl_library']})")
    built = "built" if info["extension_built"] else "not built"
    if info["extension"] == "ready":
        print(f"extension   pycfg._nccl {built}, ready")
    else:
        print(f"extension   pycfg._nccl {built}, unavailable: {info['extension_reason']}")
    return 0


# -- entry point ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pycfg`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    # demo, serve and bench own their arguments (including --help): hand them over untouched
    if argv and argv[0] == "demo":
        return _demo(argv[1:])
    if argv and argv[0] == "serve":
        return _serve(argv[1:])
    if argv and argv[0] == "bench":
        return _bench(argv[1:])
    if argv and argv[0] == "env":
        return _env(argv[1:], parser)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
