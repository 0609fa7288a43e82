"""pycfg: exact, fast classifier-free-guidance parallelism for diffusers pipelines.

>>> fast = pycfg.compile(pipe, cfg_parallel_size=2)      # under torchrun --nproc-per-node 2
>>> image = fast(prompt="...", negative_prompt="...", true_cfg_scale=4.0).images[0]
"""

from . import guidance
from .adapters import register_adapter, supported_pipelines
from .adapters.base import Adapter, AdapterCapabilities
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
from .options import CompileOptions

__version__ = "0.1.0"

__all__ = [
    "compile",
    "CompiledPipeline",
    "CompileOptions",
    "Adapter",
    "AdapterCapabilities",
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
    "register_adapter",
    "PycfgError",
    "RankFailureError",
    "ArgumentMismatchError",
    "InvalidArgumentError",
    "PreparationError",
    "ConsistencyError",
]
