"""The errors an :class:`~pycfg.Engine` raises on purpose.

Which one a caller gets says what happened to the engine, not only to the request:

- :class:`InvalidRequestError`: the request was refused before it ran (the driver's checks, the limits, or any
  worker's own checks); nothing ran and the engine stays healthy.
- :class:`RequestFailedError`: the request raised inside the workers (on every rank, at the same point: a
  callback's error, a recovered out-of-memory error); the workers stayed in step and the engine stays healthy.
- :class:`WorkerFailureError` (the base of the previous one): a worker died, stopped answering or drifted out of
  step; the request fails with that cause and the engine is unhealthy until it restarts.
- :class:`EngineUnhealthyError`: the engine has no working world of workers (after a failure, or while a restart
  failed); :class:`EngineClosedError`: it was closed.
"""

from __future__ import annotations

from ..errors import PycfgError, RankFailureError


class EngineError(PycfgError):
    """Base class of the errors an :class:`~pycfg.Engine` raises on purpose."""


class InvalidRequestError(EngineError, ValueError, TypeError):
    """A request was rejected before it ran (unknown argument, bad value, over a limit, not transferable,
    rejected by a worker's checks); the engine stays healthy. Also a ``ValueError`` and ``TypeError``, as the
    stock pipeline would raise one of those."""


class WorkerFailureError(RankFailureError, EngineError):
    """A worker raised while running a request, died, or stopped answering. ``rank`` and ``worker_text`` (the
    worker's own error and traceback, or how it died) say which and why."""

    def __init__(self, message: str, rank: int | None = None, worker_text: str = "") -> None:
        super().__init__(message)
        self.rank = rank
        self.worker_text = worker_text


class RequestFailedError(WorkerFailureError):
    """The request raised on the workers, every rank at the same point, and the workers are still in step: the
    request fails alone and the engine stays healthy. ``out_of_memory`` tells an out-of-memory error (which
    the workers recovered from) from other errors."""

    def __init__(self, message: str, rank: int | None = None, worker_text: str = "",
                 out_of_memory: bool = False) -> None:
        super().__init__(message, rank, worker_text)
        self.out_of_memory = out_of_memory


class EngineUnhealthyError(EngineError):
    """The engine has no working workers after an earlier failure; call :meth:`~pycfg.Engine.restart` (or wait
    for the automatic restart with ``auto_restart=True``)."""


class EngineClosedError(EngineError):
    """The engine was closed."""
