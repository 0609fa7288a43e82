"""The NCCL extension: build and availability on any machine; collectives, graphs and failures on a GPU.

CPU tier: the extension builds and imports, says clearly why NCCL is unusable (the CPU torch build ships no
libnccl), ``make_comm`` falls back to torch.distributed, and ``PYCFG_NO_EXT=1`` installs pure Python.
GPU tier (``gpu``): a 1-rank communicator's collectives against NCCL's definitions, CUDA graph replay with new
weights, NCCL's own error messages, a peer that never arrives, and 2 ranks on one GPU where NCCL allows it.
Multi-GPU tier (``multigpu``): the tiny pipeline at P=2 through the extension equals P=1 bit for bit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from pycfg._launch import run_world
from pycfg.parallel import nccl

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
NCCL_OK = HAS_CUDA and nccl.available()
needs_nccl = pytest.mark.skipif(not NCCL_OK, reason=f"needs CUDA and the NCCL extension ({nccl.unavailable_reason()})")


# ---------------------------------------------------------------------------------------------------------------
# CPU tier
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(os.environ.get("PYCFG_NO_EXT") == "1", reason="installed without the extension on purpose")
def test_extension_is_built_and_imports():
    from pycfg import _nccl

    assert _nccl.built()
    assert issubclass(_nccl.NcclError, RuntimeError)


@pytest.mark.skipif(torch.cuda.is_available() or torch.version.cuda is not None, reason="torch has its own NCCL")
def test_cpu_torch_reports_nccl_unavailable():
    reason = nccl.unavailable_reason()
    assert reason is not None and "NCCL is unavailable" in reason and "libnccl" in reason, reason
    assert not nccl.available() and nccl.version() is None
    with pytest.raises(RuntimeError, match="nccl-ext.*cannot be used"):
        nccl.extension()


def test_library_without_nccl_symbols_is_refused():
    pytest.importorskip("pycfg._nccl")
    libm = "libm.so.6"
    reason = nccl._load(libm)[1]
    assert "lacks ncclGetVersion" in reason or "cannot load" in reason, reason


def test_nccl_older_than_2_11_gets_a_clear_message(tmp_path):
    pytest.importorskip("pycfg._nccl")
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    src = tmp_path / "old_nccl.c"
    src.write_text("int ncclGetVersion(int *v) { *v = 21003; return 0; }\n")
    lib = tmp_path / "libnccl_old.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    ext, reason = nccl._load(str(lib))
    assert ext is None
    assert "NCCL 2.10.3" in reason and "older than 2.11" in reason, reason


def test_custom_ops_declare_mutation_and_have_fakes():
    ops = torch.ops.pycfg_nccl
    for name, mutated in (("all_reduce_", "flat"), ("weighted_all_reduce_", "flat"), ("all_reduce_many_", "flats"),
                          ("all_gather_into_", "out")):
        args = {a.name: a for a in getattr(ops, name).default._schema.arguments}
        assert args[mutated].alias_info is not None and args[mutated].alias_info.is_write, name
    assert not any(a.alias_info and a.alias_info.is_write for a in ops.all_gather.default._schema.arguments)

    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        flat = torch.empty(12, dtype=torch.bfloat16)
        out = ops.all_gather(flat, 12345)  # an unknown handle is a group of one to the fake
        assert out.shape == (1, 12) and out.dtype == torch.bfloat16
        outs = ops.all_gather_many([flat, torch.empty(3)], 12345)
        assert [tuple(o.shape) for o in outs] == [(1, 12), (1, 3)]
        ops.all_reduce_(flat, 12345)


def _choose_comms(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from pycfg.parallel.comm import make_comm

    dist.init_process_group("gloo")
    group = dist.new_group([0, 1], backend="gloo")
    result = {}
    # the CPU torch build cannot load NCCL, so "auto" must fall back, in agreement on every rank
    auto = make_comm(group, device=torch.device("cuda"), timeout=30.0, comm="auto")
    result["auto"] = auto.name
    try:
        make_comm(group, device=torch.device("cuda"), timeout=30.0, comm="nccl-ext")
    except RuntimeError as err:
        result["forced"] = str(err)
    try:
        make_comm(group, device=torch.device("cpu"), timeout=30.0, comm="nccl-ext")
    except ValueError as err:
        result["cpu"] = str(err)
    result["torch"] = make_comm(group, device=torch.device("cpu"), timeout=30.0, comm="torch").name
    return result


@pytest.mark.skipif(torch.cuda.is_available() or torch.version.cuda is not None, reason="torch has its own NCCL")
def test_make_comm_falls_back_to_torch_without_nccl():
    for result in run_world(_choose_comms, 2, timeout=120):
        assert result["auto"] == "torch"
        assert "NCCL is unavailable" in result["forced"] or "C++ extension" in result["forced"]
        assert "needs a CUDA pipeline" in result["cpu"]
        assert result["torch"] == "torch"


def test_unknown_comm_is_rejected():
    from pycfg.parallel.comm import make_comm

    with pytest.raises(ValueError, match="nccl-ext"):
        make_comm(None, device=torch.device("cpu"), timeout=1.0, comm="mpi")


def test_pure_python_install_has_no_extension(tmp_path):
    env = dict(os.environ, PYCFG_NO_EXT="1")
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w", str(tmp_path),
         str(ROOT)],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheels = list(tmp_path.glob("pycfg-*.whl"))
    assert len(wheels) == 1
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "pycfg/parallel/nccl.py" in names
    assert not [n for n in names if n.endswith(".so")], names
    assert time.perf_counter() - start < 120


# ---------------------------------------------------------------------------------------------------------------
# GPU tier
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def comm1():
    comm = nccl.NcclComm(None, device="cuda:0", timeout=60.0)
    yield comm
    comm.close()


@pytest.mark.gpu
@needs_nccl
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_weighted_all_reduce_is_premul_sum_in_the_data_type(comm1, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4099, device="cuda", generator=g).to(dtype)
    for w_value in (0.3, -2.7, 4.0):
        w = torch.tensor([w_value], dtype=dtype, device="cuda")
        flat = x.clone()
        comm1.weighted_all_reduce_(flat, w)
        # one rank: NCCL multiplies by the scalar in the data's type, rounding once
        assert torch.equal(flat, x * w), (dtype, w_value)
    with pytest.raises(ValueError, match="dtype"):
        comm1.weighted_all_reduce_(x.clone(), torch.ones(1, dtype=torch.float64, device="cuda"))


@pytest.mark.gpu
@needs_nccl
def test_sum_all_reduce_and_all_gather(comm1):
    x = torch.arange(1000, dtype=torch.float32, device="cuda")
    flat = x.clone()
    assert comm1.all_reduce_(flat) is flat and torch.equal(flat, x)
    out = comm1.all_gather(x.view(10, 100))
    assert out.shape == (1, 1000) and torch.equal(out[0], x)
    buf = torch.full((1, 1000), -1.0, device="cuda")
    comm1.all_gather_into(buf, x)
    assert torch.equal(buf[0], x)
    u8 = torch.randint(0, 255, (37,), dtype=torch.uint8, device="cuda")
    assert torch.equal(comm1.all_gather(u8)[0], u8)
    assert comm1.calls == 4
    comm1.synchronize()


@pytest.mark.gpu
@needs_nccl
def test_grouped_multi_tensor_calls(comm1):
    tensors = [torch.randn(n, device="cuda").to(dt) for n, dt in ((513, torch.float32), (77, torch.bfloat16),
                                                                   (1024, torch.float16))]
    weights = [torch.tensor([s], dtype=t.dtype, device="cuda") for s, t in zip((0.5, 3.0, -1.25), tensors)]
    flats = [t.clone() for t in tensors]
    comm1.all_reduce_many_(flats, weights)
    for f, t, w in zip(flats, tensors, weights):
        assert torch.equal(f, t * w)
    sums = [t.clone() for t in tensors]
    comm1.all_reduce_many_(sums)
    assert all(torch.equal(s, t) for s, t in zip(sums, tensors))
    outs = comm1.all_gather_many(tensors)
    assert all(o.shape == (1, t.numel()) and torch.equal(o[0], t) for o, t in zip(outs, tensors))
    assert comm1.calls == 3


@pytest.mark.gpu
@needs_nccl
def test_cuda_graph_replays_with_new_weights(comm1):
    src = torch.randn(1 << 16, device="cuda")
    buf = torch.empty_like(src)
    gathered = torch.empty((1, src.numel()), device="cuda")
    w = torch.ones(1, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        # NCCL connects lazily: one collective before capture
        buf.copy_(src)
        comm1.weighted_all_reduce_(buf, w)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        buf.copy_(src)
        comm1.weighted_all_reduce_(buf, w)
        comm1.all_gather_into(gathered, buf)
    for i in range(100):
        value = 0.01 * i - 0.37
        w.fill_(value)
        if i % 7 == 0:
            src.mul_(-1.0)  # new data too, not only new weights
        graph.replay()
        expected = src * torch.tensor([value], device="cuda")
        assert torch.equal(buf, expected), i
        assert torch.equal(gathered[0], expected), i
    torch.cuda.synchronize()


@pytest.mark.gpu
@needs_nccl
def test_torch_compile_sees_the_custom_ops(comm1):
    w = torch.full((1,), 0.5, device="cuda")

    def step(x):
        y = (x * 2).contiguous()
        comm1.weighted_all_reduce_(y, w)
        return comm1.all_gather(y) + 1

    compiled = torch.compile(step, fullgraph=True)
    x = torch.randn(256, device="cuda")
    assert torch.equal(compiled(x), step(x))


@pytest.mark.gpu
@needs_nccl
def test_nccl_error_raises_with_nccl_message():
    comm = nccl.NcclComm(None, device="cuda:0", timeout=30.0)
    x = torch.zeros(16, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    with pytest.raises(nccl.extension().NcclError) as info:
        comm._comm.all_reduce(x.data_ptr(), x.data_ptr(), x.numel(), 97, 0, stream)  # no such ncclDataType_t
    message = str(info.value)
    assert info.value.code == 4 and "invalid argument" in message, message
    assert "aborted" in message
    with pytest.raises(Exception, match="aborted"):
        comm.all_reduce_(x)
    comm.close()


def _lonely_init(rank: int, world: int, timeout: float) -> dict:
    from pycfg.errors import RankFailureError
    from pycfg.parallel import nccl as nccl_mod

    ext = nccl_mod.extension()
    torch.cuda.set_device(0)
    start = time.perf_counter()
    try:
        # a 2-rank communicator whose second rank never comes
        ext.Communicator(ext.unique_id(), 2, 0, False, timeout)
    except ext.NcclError as err:
        return {"elapsed": time.perf_counter() - start, "error": str(err), "code": err.code,
                "rank_failure": err.code == ext.TIMEOUT and issubclass(RankFailureError, RuntimeError)}
    return {"elapsed": time.perf_counter() - start, "error": None}


@pytest.mark.gpu
@needs_nccl
def test_missing_peer_times_out_instead_of_hanging():
    result = run_world(_lonely_worker, 1, timeout=90)[0]
    assert result["error"] is not None, result
    assert result["code"] == nccl.extension().TIMEOUT and "did not complete within 3s" in result["error"], result
    assert result["elapsed"] < 30, result


def _lonely_worker(rank: int, world: int) -> dict:
    return _lonely_init(rank, world, 3.0)


def _two_ranks_one_gpu(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from pycfg.parallel.nccl import NcclComm

    dist.init_process_group("gloo")
    torch.cuda.set_device(0)
    comm = NcclComm(dist.group.WORLD, device="cuda:0", timeout=60.0)
    x = torch.full((1000,), float(rank + 1), device="cuda")
    w = torch.tensor([0.25 if rank == 0 else 2.0], device="cuda")
    comm.weighted_all_reduce_(x, w)
    gathered = comm.all_gather(torch.full((3,), float(rank), device="cuda"))
    comm.synchronize()
    result = {"reduced": x.cpu(), "gathered": gathered.cpu()}
    comm.close()
    return result


@pytest.mark.gpu
@needs_nccl
@pytest.mark.skipif(NCCL_OK and nccl.version() < (2, 30, 0),
                    reason=f"two ranks on one GPU need NCCL >= 2.30 (found {nccl.version() if NCCL_OK else None})")
def test_two_ranks_on_one_gpu(monkeypatch):
    monkeypatch.setenv("NCCL_MULTI_RANK_GPU_ENABLE", "1")
    for result in run_world(_two_ranks_one_gpu, 2, timeout=180):
        assert torch.equal(result["reduced"], torch.full((1000,), 0.25 * 1 + 2.0 * 2))
        assert torch.equal(result["gathered"], torch.tensor([[0.0] * 3, [1.0] * 3]))


# ---------------------------------------------------------------------------------------------------------------
# Multi-GPU tier
# ---------------------------------------------------------------------------------------------------------------


def _tiny_pipeline(rank: int, world: int, parallel: int, comm: str) -> dict:
    import pycfg
    from pycfg.tiny import qwenimage_inputs, qwenimage_pipeline

    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    pipe = qwenimage_pipeline().to(device)
    fast = pycfg.compile(pipe, cfg_parallel_size=parallel, comm=comm, timeout=120.0)
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in qwenimage_inputs().items()}
    latents = fast(**inputs, num_inference_steps=4, true_cfg_scale=4.0, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    return {"latents": latents.cpu(), "communicator": fast.describe()["communicator"],
            "calls": fast.comm.calls}


@pytest.mark.multigpu
@pytest.mark.skipif(torch.cuda.device_count() < 2 or not NCCL_OK, reason="needs 2 CUDA devices and the NCCL extension")
def test_tiny_pipeline_p2_through_extension_equals_p1():
    pytest.importorskip("diffusers")
    (single,) = run_world(_tiny_pipeline, 1, parallel=1, comm="auto", timeout=300)
    pair = run_world(_tiny_pipeline, 2, parallel=2, comm="nccl-ext", timeout=300)
    for result in pair:
        assert result["communicator"] == "nccl-ext"
        assert result["calls"] == 4
        assert torch.equal(result["latents"], single["latents"])
