"""Collective latency and host cost: pycfg's NCCL extension against torch.distributed (c10d NCCL).

For each message size (4 KiB - 64 MiB, fp32) it times the sum all-reduce and the all-gather of both, eagerly
(back-to-back calls between CUDA events) and inside a CUDA graph (a captured chain of calls, replayed), plus the
extension's weighted all-reduce. Host cost is the wall time of issuing one call, measured on a 4 KiB message with
the GPU idle: the raw extension call, the NcclComm method, the torch custom op, and c10d's all_reduce.

With one GPU both sides use a 1-rank communicator (the JSON says so): that measures per-call overheads and
launch costs, not link bandwidth. With N GPUs, launch with `torchrun --nproc-per-node N`.

    python benchmarks/bench_comm.py [--out DIR | --save-results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from results_dir import add_output_arguments, output_dir

SIZES = [4 << 10 << (2 * k) for k in range(8)]  # 4 KiB, 16 KiB, ..., 64 MiB


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def time_eager(fn, iters: int, repeats: int = 5) -> float:
    """Microseconds per call of back-to-back ``fn()`` calls, timed on the GPU."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    per = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        per.append(start.elapsed_time(end) * 1e3 / iters)
    return _median(per)


def time_graph(fn, chain: int, replays: int = 20) -> float:
    """Microseconds per call when ``chain`` calls are captured in one CUDA graph and replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # warm-up before capture: NCCL connects lazily
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(chain):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    per = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        per.append(start.elapsed_time(end) * 1e3 / chain)
    del graph
    return _median(per)


def host_cost(fn, calls: int = 200, repeats: int = 7) -> float:
    """Microseconds of host time per call, the GPU drained before each batch (far below any queue limit)."""
    for _ in range(10):
        fn()
    per = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        per.append((time.perf_counter() - t0) * 1e6 / calls)
    torch.cuda.synchronize()
    return _median(per)


def _versions() -> dict:
    from pycfg.parallel import nccl

    torch_nccl = None
    try:
        torch_nccl = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception:
        pass
    return {
        "device": torch.cuda.get_device_name(),
        "gpus_visible": torch.cuda.device_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl_extension": ".".join(map(str, nccl.version())) if nccl.version() else None,
        "nccl_torch": torch_nccl,
        "python": platform.python_version(),
        "host": platform.machine(),
    }


def _init_world():
    if dist.is_initialized():
        return
    if "RANK" in os.environ:
        dist.init_process_group("nccl", device_id=torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))))
        return
    store = dist.HashStore()
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=torch.device("cuda", 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_arguments(parser)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--chain", type=int, default=20)
    parser.add_argument("--max-bytes", type=int, default=SIZES[-1])
    args = parser.parse_args()

    from pycfg.parallel import nccl

    if not torch.cuda.is_available():
        sys.exit("bench_comm needs CUDA")
    reason = nccl.unavailable_reason()
    if reason:
        sys.exit(reason)
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    _init_world()
    world = dist.get_world_size()
    rank = dist.get_rank()
    group = dist.group.WORLD if world > 1 else None
    comm = nccl.NcclComm(group, device=f"cuda:{local}", timeout=120.0)

    rows = []
    for nbytes in [s for s in SIZES if s <= args.max_bytes]:
        n = nbytes // 4
        x = torch.randn(n, device="cuda")
        gathered = torch.empty((world, n), device="cuda")
        w = torch.full((1,), 0.5, device="cuda")
        cases = {
            "all_reduce": (partial(comm.all_reduce_, x), partial(dist.all_reduce, x)),
            "weighted_all_reduce": (partial(comm.weighted_all_reduce_, x, w), None),
            "all_gather": (partial(comm.all_gather_into, gathered, x),
                           partial(dist.all_gather_into_tensor, gathered, x)),
        }
        iters = args.iters if nbytes <= (1 << 22) else max(5, args.iters // 5)
        for op, (ext_fn, torch_fn) in cases.items():
            for name, fn in (("nccl-ext", ext_fn), ("torch", torch_fn)):
                if fn is None:
                    continue
                row = {"op": op, "comm": name, "bytes": nbytes}
                chain = args.chain if nbytes <= (1 << 22) else 5
                timers = (("eager", partial(time_eager, fn, iters)), ("graph", partial(time_graph, fn, chain)))
                for mode, timer in timers:
                    try:
                        row[f"{mode}_us"] = timer()
                    except Exception as err:  # keep the other measurements; the JSON says what failed
                        row[f"{mode}_us"] = None
                        row[f"{mode}_error"] = f"{type(err).__name__}: {err}"[:500]
                        torch.cuda.synchronize()
                rows.append(row)
                if rank == 0:
                    print(f"{op:>20} {name:>8} {nbytes:>10} B  eager {row['eager_us']} us  graph {row['graph_us']} us "
                          f"{row.get('eager_error', '')} {row.get('graph_error', '')}", flush=True)
        del x, gathered

    small = torch.randn(1024, device="cuda")
    w = torch.full((1,), 0.5, device="cuda")
    ptr, stream = small.data_ptr(), torch.cuda.current_stream().cuda_stream
    raw = comm._comm
    host = {}
    for key, fn in (
        ("extension_raw_call", lambda: raw.all_reduce(ptr, ptr, 1024, 7, 0, stream)),
        ("ncclcomm_all_reduce_", lambda: comm.all_reduce_(small)),
        ("ncclcomm_weighted_all_reduce_", lambda: comm.weighted_all_reduce_(small, w)),
        ("custom_op_all_reduce_", lambda: torch.ops.pycfg_nccl.all_reduce_(small, comm.handle)),
        ("c10d_all_reduce", lambda: dist.all_reduce(small)),
    ):
        try:
            host[key] = host_cost(fn)
        except Exception as err:
            host[key] = f"{type(err).__name__}: {err}"[:300]
    if rank == 0:
        for k, v in host.items():
            print(f"host cost {k:>32}: {v} us/call", flush=True)
    comm.close()

    if rank == 0:
        out = output_dir(args, "bench_comm")
        result = {
            "benchmark": "bench_comm",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name] + sys.argv),
            "ranks": world,
            "note": ("1-rank communicators on one GPU: per-call overhead and launch cost, not link bandwidth"
                     if world == 1 else f"{world} ranks, one per GPU"),
            "dtype": "float32",
            "versions": _versions(),
            "host_cost_us_per_call": host,
            "host_cost_target_us": 10.0,
            "latency": rows,
        }
        (out / "bench_comm.json").write_text(json.dumps(result, indent=1))
        plot(result, out / "bench_comm.png")
        print(f"wrote {out / 'bench_comm.json'}")
    dist.destroy_process_group()


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    ops = sorted({r["op"] for r in result["latency"]})
    fig, axes = plt.subplots(1, len(ops), figsize=(5 * len(ops), 4), squeeze=False)
    for ax, op in zip(axes[0], ops):
        for comm in ("nccl-ext", "torch"):
            for mode, style in (("eager", "-"), ("graph", "--")):
                pts = [(r["bytes"], r[f"{mode}_us"]) for r in result["latency"]
                       if r["op"] == op and r["comm"] == comm and r.get(f"{mode}_us") is not None]
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", label=f"{comm} {mode}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("message bytes")
        ax.set_ylabel("us per call")
        ax.set_title(op)
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['versions']['device']}, {result['ranks']} rank(s): {result['note']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
