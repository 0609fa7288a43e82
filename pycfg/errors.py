"""Exceptions pycfg raises on purpose, so callers can tell them from bugs."""


class PycfgError(RuntimeError):
    """Base class of pycfg's own errors."""


class RankFailureError(PycfgError):
    """A peer rank failed, died or stopped answering: the collective did not complete within the timeout."""


class ArgumentMismatchError(PycfgError):
    """Ranks of one CFG group were called with different arguments."""


class ConsistencyError(PycfgError):
    """Ranks hold different latents or solver/guidance state (``check_consistency=True``)."""


class InvalidArgumentError(PycfgError, ValueError, TypeError):
    """Another rank of the CFG group rejected the call's arguments before any forward: this rank raises it (the
    rejecting rank raises its own error), naming that rank and its error. Also a ``ValueError`` and ``TypeError``,
    as the stock pipeline would raise one of those."""

    def __init__(self, message: str, rank: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank


class PreparationError(PycfgError):
    """Another rank of the CFG group failed while preparing the call (before any forward) with an error that is
    not a rejection of its arguments, e.g. out of memory while encoding prompts; every rank raises (the failing
    rank its own error). ``out_of_memory`` says whether that was an out-of-memory error."""

    def __init__(self, message: str, rank: int | None = None, out_of_memory: bool = False) -> None:
        super().__init__(message)
        self.rank = rank
        self.out_of_memory = out_of_memory
