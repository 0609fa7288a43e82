"""`pycfg serve`: OpenAI's Images API (and a video endpoint) on a :class:`pycfg.Engine`, with FastAPI and uvicorn.

Needs the ``serve`` extra (``pip install 'pycfg[serve]'``). ``create_app(engine, spec, settings)`` builds the
ASGI app for an engine you started; ``pycfg serve MODEL`` (:func:`pycfg.serve.server.main`) does it all.
"""

from .app import ServeSettings, create_app
from .models import DEFAULT_MODEL, TINY_MODELS, ModelSpec, Task, load_model_spec
from .schemas import RequestLimits
from .transport import BodyLimit, HeaderTimeoutH11Protocol

__all__ = [
    "create_app",
    "ServeSettings",
    "RequestLimits",
    "ModelSpec",
    "Task",
    "TINY_MODELS",
    "DEFAULT_MODEL",
    "load_model_spec",
    "BodyLimit",
    "HeaderTimeoutH11Protocol",
]
