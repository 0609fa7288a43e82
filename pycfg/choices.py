"""Every option value pycfg accepts by name, in one place, and the one check that names what is allowed.

A leaf module (it imports nothing from pycfg): the options object, the communicators and the scheduler updates
all read their allowed values here.
"""

from __future__ import annotations

from typing import Any

EXCHANGES: tuple[str, ...] = ("gather", "reduce")
COMMS: tuple[str, ...] = ("auto", "torch", "nccl-ext")
NOISE_SOURCES: tuple[str, ...] = ("philox", "diffusers")
#: what ``compile_transformer`` accepts (True means "full")
COMPILE_CHOICES: tuple[Any, ...] = (False, True, "full", "regional")
#: what ``batch_branches`` accepts (None: "auto" when the transformer is compiled, else False)
BATCH_CHOICES: tuple[Any, ...] = (True, False, "auto", None)


def is_one_of(value: Any, allowed: tuple[Any, ...]) -> bool:
    """``value in allowed``, except that a bool or None matches only itself (``1`` is not ``True``)."""
    for a in allowed:
        if isinstance(a, bool) or a is None or isinstance(value, bool) or value is None:
            if value is a:
                return True
        elif type(value) is type(a) and value == a:
            return True
    return False


def check_choice(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    """Raise ``ValueError`` naming ``name`` and every allowed value unless ``value`` is one of them."""
    if not is_one_of(value, allowed):
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
