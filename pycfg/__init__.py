"""pycfg: exact, fast classifier-free-guidance parallelism for diffusers pipelines.

>>> fast = pycfg.compile(pipe, cfg_parallel_size=2)      # under torchrun --nproc-per-node 2
>>> image = fast(prompt="...", negative_prompt="...", true_cfg_scale=4.0).images[0]
"""

from . import guidance
from .adapters import supported_pipelines
from .api import CompiledPipeline, compile
from .engine import (
                     Engine,
                     EngineError,
                     EngineHealth,
                     EngineState,
                     EngineUnhealthyError,
                     InvalidRequestError,
                     Limits,
                     RequestFailedError,
                     WorkerFailureError,
)
from .errors import (
                     ArgumentMismatchError,
                     ConsistencyError,
                     InvalidArgumentError,
                     PreparationError,
                     PycfgError,
                     RankFailureError,
)

__version__ = "0.1.0"

__all__ = [
    "compile",
    "CompiledPipeline",
    "Engine",
    "EngineError",
    "EngineHealth",
    "EngineState",
    "EngineUnhealthyError",
    "InvalidRequestError",
    "Limits",
    "RequestFailedError",
    "WorkerFailureError",
    "guidance",
    "supported_pipelines",
    "PycfgError",
    "RankFailureError",
    "ArgumentMismatchError",
    "InvalidArgumentError",
    "PreparationError",
    "ConsistencyError",
]
