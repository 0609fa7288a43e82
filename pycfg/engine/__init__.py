"""A driver-worker engine for long-lived callers (web servers) that cannot be launched by torchrun.

The caller's process is the driver: it starts one worker process per rank, each of which builds the pipeline,
joins a private torch.distributed world of the workers (rendezvous through a file in a 0700 directory, data on
the loopback interface) and compiles the pipeline once with :func:`pycfg.compile`. Requests go through one queue
and run in order on every worker; the driver returns rank 0's output.

    engine = pycfg.Engine(functools.partial(load_pipeline, "Qwen/Qwen-Image"), cfg_parallel_size=2)
    image = engine.generate(prompt="...", negative_prompt="...", true_cfg_scale=4.0,
                            generator=torch.Generator().manual_seed(0)).images[0]

Modules: :mod:`.driver` (:class:`Engine`: the public API, its states, the request queue and what a failure does
to the engine), :mod:`.world` (one start of the workers: spawning, messaging, judging their replies),
:mod:`.worker` (the worker process), :mod:`.wire` (messages, error kinds, payloads), :mod:`.validation`
(:class:`Limits`, request and compile-option checks), :mod:`.errors`.
"""

from .driver import Engine, EngineHealth, EngineState
from .errors import (
                     EngineClosedError,
                     EngineError,
                     EngineUnhealthyError,
                     InvalidRequestError,
                     RequestFailedError,
                     WorkerFailureError,
)
from .validation import Limits
from .wire import ErrorKind, GeneratorState, output_digest

__all__ = [
    "Engine",
    "EngineHealth",
    "EngineState",
    "Limits",
    "EngineError",
    "EngineClosedError",
    "EngineUnhealthyError",
    "InvalidRequestError",
    "RequestFailedError",
    "WorkerFailureError",
    "ErrorKind",
    "GeneratorState",
    "output_digest",
]
