"""The fused Triton update against its PyTorch reference: compiled on CUDA, in Triton's interpreter on CPU.

The interpreter must be on before triton is first imported. When this process already imported triton for
compilation (other test modules import it through diffusers), the cases run in a fresh process instead.
"""

import os
import subprocess
import sys

import torch

_CASES = os.path.join(os.path.dirname(__file__), "kernel_cases.py")

if torch.cuda.is_available() or "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1":
    os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
    from kernel_cases import *  # noqa: F401,F403
else:
    def test_kernel_cases_in_interpreter_process():
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore", _CASES],
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
