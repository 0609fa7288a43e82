"""Exceptions pycfg raises on purpose, so callers can tell them from bugs."""


class PycfgError(RuntimeError):
    """Base class of pycfg's own errors."""


class RankFailureError(PycfgError):
    """A peer rank failed, died or stopped answering: the collective did not complete within the timeout."""


class ArgumentMismatchError(PycfgError):
    """Ranks of one CFG group were called with different arguments."""


class ConsistencyError(PycfgError):
    """Ranks hold different latents or solver/guidance state (``check_consistency=True``)."""
