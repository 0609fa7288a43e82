#!/usr/bin/env bash
# The GPU checks in one go: build pycfg (with its C++ extension), run the gpu / multigpu test tiers, then the
# benchmarks. Every step's log and JSON goes into OUTDIR; summary.txt lists each step's exit code.
#
#   benchmarks/gpu_suite.sh OUTDIR
#   PYCFG_GPU_TESTS="tests/test_nccl_ext.py" benchmarks/gpu_suite.sh OUTDIR    # only some test files
#
# To add a benchmark, append a `step NAME COMMAND...` line below; write its JSON/PNG into "$OUTDIR".
set -u
OUTDIR=${1:?usage: benchmarks/gpu_suite.sh OUTDIR}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
failed=0

step() {
  local name=$1
  shift
  echo "== $name: $*"
  local start=$SECONDS
  "$@" >"$OUTDIR/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$OUTDIR/summary.txt"
  tail -n 40 "$OUTDIR/$name.log"
  [ "$rc" -eq 0 ] || failed=1
}

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  "$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "nccl", torch.cuda.nccl.version() if torch.cuda.is_available() else None)'
} >"$OUTDIR/environment.txt" 2>&1
cat "$OUTDIR/environment.txt"

step build "$PYTHON" -m pip install -q --no-build-isolation --no-deps -e .
step extension "$PYTHON" -c 'import torch, pycfg._nccl; from pycfg.parallel import nccl; print("nccl", nccl.version(), nccl.unavailable_reason())'
# other test files may need packages a GPU box lacks (diffusers): their collection errors must not stop the tiers
step tests "$PYTHON" -m pytest -q -rs -m "gpu or multigpu" --continue-on-collection-errors \
  --junitxml="$OUTDIR/pytest_gpu.xml" ${PYCFG_GPU_TESTS:-tests/}
step bench_comm "$PYTHON" benchmarks/bench_comm.py --out "$OUTDIR"
# the fused update: kernel vs reference (compiled), plans vs step(), then bandwidth and speed vs eager
step kernel_tests "$PYTHON" -m pytest -q tests/test_kernels.py tests/test_scheduler_plans.py
step bench_kernels "$PYTHON" benchmarks/bench_kernels.py --out "$OUTDIR"
# compiled forwards + whole-step CUDA graphs (tiny pipeline), then stock / stock+torch.compile / pycfg P=1 on a
# realistic-size random-weight transformer (PYCFG_BENCH_MODEL_ARGS to change model, size or layer count)
step graphs_tests "$PYTHON" -m pytest -q -rs tests/test_graphs_gpu.py
step bench_pipeline_gpu "$PYTHON" benchmarks/bench_pipeline.py ${PYCFG_BENCH_MODEL_ARGS:---model qwen-image --height 1024 --width 1024 --steps 6} \
  --out "$OUTDIR"
# batched CFG matters most where one forward does not fill the GPU: the same model at 512x512
step bench_pipeline_gpu_512 "$PYTHON" benchmarks/bench_pipeline.py --model qwen-image --height 512 --width 512 \
  --steps 6 --out "$OUTDIR"
# the other families at their published sizes, kept short (few steps, 2 repeats): Wan 2.1 1.3B at 480x832 with
# 33 frames (14040 video tokens per forward), SD3-medium at 1024x1024
step bench_pipeline_gpu_wan "$PYTHON" benchmarks/bench_pipeline.py --model wan2.1-1.3b --height 480 --width 832 \
  --frames 33 --steps 3 --repeats 2 --out "$OUTDIR"
step bench_pipeline_gpu_sd3 "$PYTHON" benchmarks/bench_pipeline.py --model sd3-medium --height 1024 --width 1024 \
  --steps 4 --repeats 2 --out "$OUTDIR"

exit $failed
