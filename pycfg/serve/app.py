"""The FastAPI application of `pycfg serve`: OpenAI's Images API (and a video endpoint) on a :class:`pycfg.Engine`.

Each request is parsed and bounded here (400 naming the field), admitted if the engine is healthy (else 503)
and fewer than ``max_queue`` requests wait (else 429), then queued in the engine. The handler awaits the
engine's future; a client that disconnects meanwhile has its request dropped if it has not started, and the
handler returns at once either way. Engine errors map to OpenAI-shaped errors: a rejected request to 400, a
failed worker to 500 (the engine restarts itself), an unhealthy or restarting engine to 503.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import hmac
import io
import json
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

import pycfg

from .errors import APIError, api_error_handler, http_error_handler, invalid, unexpected_error_handler
from .metrics import ServerMetrics
from .models import ModelSpec, Task
from .schemas import (
    API_FIELD,
    ImageEditRequest,
    ImageGenerationRequest,
    RequestLimits,
    VideoRequest,
    parse,
    pipeline_arguments,
    seed_of,
)
from .transport import BodyLimit

logger = logging.getLogger("pycfg.serve")

_OUTCOMES = {400: "invalid", 401: "unauthorized", 404: "invalid", 408: "invalid", 413: "too_large",
             429: "rate_limited", 499: "disconnected", 500: "failed", 503: "unavailable"}
_CLIENT_GONE = 499  # nginx's status for a client that closed the connection; nobody receives it
_ABSOLUTE_PATH = re.compile(r"(?:/[\w.@+-]+){2,}")


@dataclass(frozen=True)
class ServeSettings:
    """How the server admits requests. ``max_queue``: requests that may wait behind the running one (429 past
    it); ``api_key``: when set, every ``/v1`` endpoint and ``/metrics`` want ``Authorization: Bearer KEY``."""

    api_key: str | None = None
    max_queue: int = 16
    max_body_bytes: int = 16 * 1024 * 1024
    body_timeout: float = 30.0
    limits: RequestLimits = field(default_factory=RequestLimits)  # beside the engine's own pycfg.Limits

    def __post_init__(self) -> None:
        if isinstance(self.max_queue, bool) or not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise ValueError(f"max_queue must be an integer >= 0, got {self.max_queue!r}")
        if isinstance(self.max_body_bytes, bool) or not isinstance(self.max_body_bytes, int) or \
                self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be an integer >= 1024, got {self.max_body_bytes!r}")
        if isinstance(self.body_timeout, bool) or not isinstance(self.body_timeout, (int, float)) or \
                not self.body_timeout > 0:
            raise ValueError(f"body_timeout must be a positive number of seconds, got {self.body_timeout!r}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be a non-empty string or None")


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def _client_message(err: BaseException) -> str:
    """A request error's text as a client may see it: one line, no paths, bounded."""
    text = str(err).split("\n", 1)[0]
    text = re.sub(r"^request \d+ rejected by the pipeline: ", "", text)
    return _ABSOLUTE_PATH.sub("<path>", text)[:1000]


def _param_named_in(message: str, kwargs: dict[str, Any]) -> str | None:
    """The request field an engine error is about: the argument it names (quoted first), as the client calls it."""
    head = message.split("allowed:", 1)[0]  # past it, a list of every argument the pipeline takes
    for pattern in ("'{}'", r"\b{}\b"):
        found = [(match.start(), name) for name in kwargs
                 if (match := re.search(pattern.format(re.escape(name)), head))]
        if found:
            return API_FIELD.get(min(found)[1], min(found)[1])
    return None


def _png(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _mp4(frames, fps: int) -> str:
    """H.264 in MP4 through PyAV (FFmpeg's libraries, bundled in its wheels)."""
    import av
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(frame.convert("RGB")),
                                                                   format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def create_app(engine: pycfg.Engine, spec: ModelSpec, settings: ServeSettings | None = None) -> FastAPI:
    """The ASGI app serving ``engine`` (already started, running ``spec``'s pipeline).

    The app does not own the engine: whoever created the engine closes it. Serve it with uvicorn's h11 protocol
    and :class:`pycfg.serve.transport.HeaderTimeoutH11Protocol` (as `pycfg serve` does) to bound request heads.
    """
    settings = settings or ServeSettings()
    app = FastAPI(title="pycfg", version=pycfg.__version__, docs_url=None, redoc_url=None, openapi_url=None)
    admitted = 0  # requests admitted and not yet answered; only touched on the event loop
    unfinished: set[concurrent.futures.Future] = set()  # submitted to the engine, not done (abandoned ones too)
    metrics = ServerMetrics(engine.health, lambda: admitted)
    app.state.metrics = metrics
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(HTTPException, http_error_handler)
    app.add_exception_handler(Exception, unexpected_error_handler)

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise APIError(401, "Missing API key: send it as 'Authorization: Bearer KEY'.", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(key.strip().encode(), settings.api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    def unavailable_reason() -> str | None:
        state = engine.health().state
        return None if state is pycfg.EngineState.READY else _REASONS[state]

    async def run(request: Request, endpoint: str, kwargs: dict[str, Any]) -> Any:
        """Admit, queue and await one request on the engine; the pipeline's output."""
        nonlocal admitted
        reason = unavailable_reason()
        if reason is not None:
            raise APIError(503, f"The server is not ready: {reason}. Retry later.", headers={"Retry-After": "5"})
        if admitted > settings.max_queue:
            raise APIError(429, f"Too many requests: {admitted} are already queued or running "
                                f"(max_queue={settings.max_queue}). Retry later.", headers={"Retry-After": "1"})
        submitted = time.monotonic()
        try:
            future = engine.submit(**kwargs)
        except pycfg.InvalidRequestError as err:
            message = _client_message(err)
            raise invalid(message, _param_named_in(message, kwargs)) from None
        except pycfg.EngineError as err:  # closed meanwhile
            logger.warning("%s refused by the engine: %s", endpoint, err)
            raise APIError(503, "The server is not ready: the engine is shut down.") from None
        admitted += 1
        unfinished.add(future)

        def finished(f: concurrent.futures.Future) -> None:  # runs in the engine's thread
            unfinished.discard(f)
            if not f.cancelled():  # a dropped request never ran
                metrics.engine_finished(submitted, kwargs.get("num_inference_steps"))

        future.add_done_callback(finished)
        try:
            return await _await_or_drop(request, future)
        except (APIError, ClientGone):
            raise
        except pycfg.InvalidRequestError as err:
            message = _client_message(err)
            raise invalid(message, _param_named_in(message, kwargs)) from None
        except pycfg.RequestFailedError as err:
            logger.error("%s failed on the workers: %s\n%s", endpoint, err, err.worker_text)
            if err.out_of_memory:
                raise APIError(503, "The request ran out of device memory; retry later or ask for less.",
                               code="out_of_memory", headers={"Retry-After": "5"}) from None
            raise APIError(500, "The request failed while it ran.", code="request_failed") from None
        except pycfg.WorkerFailureError as err:
            logger.error("%s failed on the engine: %s\n%s", endpoint, err, err.worker_text)
            raise APIError(500, "The engine failed while running this request; it restarts by itself. "
                                "Retry the request.", code="engine_failure") from None
        except pycfg.EngineError as err:
            logger.warning("%s refused by the engine: %s", endpoint, err)
            raise APIError(503, "The server is not ready: the engine is unhealthy or restarting. Retry later.",
                           headers={"Retry-After": "5"}) from None
        finally:
            admitted -= 1

    async def client_gone(request: Request, err: Exception) -> Response:
        return Response(status_code=_CLIENT_GONE)

    app.add_exception_handler(ClientGone, client_gone)
    app.add_exception_handler(ClientDisconnect, client_gone)  # gone while its body was being read
    # the last one added runs first: every answer is counted, a body's 413 and 408 too
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, read_timeout=settings.body_timeout)
    app.add_middleware(_CountRequests, metrics=metrics, routes=_ROUTES)

    async def json_body(request: Request) -> Any:
        body = await request.body()
        if not body:
            raise invalid("The request body is empty; send a JSON object.")
        try:
            return json.loads(body)
        except RecursionError:
            raise invalid("The request body is nested too deeply.") from None
        except ValueError as err:  # JSONDecodeError and bad UTF-8
            raise invalid(f"The request body is not valid JSON: {str(err)[:200]}") from None

    def require(task: Task, endpoint: str) -> None:
        if spec.task is not task:
            raise invalid(f"{endpoint} is not available for {spec.name} ({spec.pipeline_class}); it answers "
                          f"{_ENDPOINT_OF[spec.task]}.", "model")

    @app.post("/v1/images/generations")
    async def generations(request: Request) -> JSONResponse:
        authorize(request)
        req = parse(ImageGenerationRequest, await json_body(request))
        require(Task.IMAGE, "/v1/images/generations")
        _check_response_format(req.response_format, ("b64_json",))
        kwargs = pipeline_arguments(spec, req, settings.limits, engine.limits)
        output = await run(request, "generations", kwargs)
        data = await run_in_threadpool(lambda: [{"b64_json": _png(image)} for image in output.images])
        return JSONResponse(_images_response(data, output.images, seed_of(kwargs)))

    @app.post("/v1/images/edits")
    async def edits(request: Request) -> JSONResponse:
        authorize(request)
        try:
            form = await request.form(max_files=settings.limits.max_input_images + 1, max_fields=64)
        except HTTPException:
            raise
        except Exception:
            raise invalid("The request body must be multipart/form-data with an 'image' file and a 'prompt'.") \
                from None
        try:
            fields = {k: v for k, v in form.multi_items() if not isinstance(v, UploadFile)}
            images = [v for k, v in form.multi_items() if k in ("image", "image[]") and isinstance(v, UploadFile)]
            masks = [v for k, v in form.multi_items() if k == "mask" and isinstance(v, UploadFile)]
            stray = [k for k, v in form.multi_items() if isinstance(v, UploadFile) and k not in
                     ("image", "image[]", "mask")]
            if stray:
                raise invalid(f"Unknown file field {stray[0]!r}; allowed: image, mask.", stray[0])
            req = parse(ImageEditRequest, fields)
            require(Task.EDIT, "/v1/images/edits")
            _check_response_format(req.response_format, ("b64_json",))
            if not images:
                raise invalid("Missing required file 'image'.", "image")
            if len(images) > settings.limits.max_input_images:
                raise invalid(f"At most {settings.limits.max_input_images} images per request.", "image")
            if len(masks) > 1:
                raise invalid("At most one mask.", "mask")
            kwargs = pipeline_arguments(spec, req, settings.limits, engine.limits)
            pictures = [await _read_image(upload, "image", engine.limits) for upload in images]
            kwargs["image"] = pictures[0] if len(pictures) == 1 else pictures
            if masks:
                kwargs["mask_image"] = _inpaint_mask(await _read_image(masks[0], "mask", engine.limits,
                                                                        keep_alpha=True))
        finally:
            await form.close()
        output = await run(request, "edits", kwargs)
        data = await run_in_threadpool(lambda: [{"b64_json": _png(image)} for image in output.images])
        return JSONResponse(_images_response(data, output.images, seed_of(kwargs)))

    @app.post("/v1/videos")
    async def videos(request: Request) -> JSONResponse:
        authorize(request)
        req = parse(VideoRequest, await json_body(request))
        require(Task.VIDEO, "/v1/videos")
        _check_response_format(req.response_format, ("mp4", "png_frames"))
        kwargs = pipeline_arguments(spec, req, settings.limits, engine.limits)
        output = await run(request, "videos", kwargs)
        fps = req.fps or spec.fps
        as_frames = req.response_format == "png_frames"

        def encode() -> list[dict]:
            data = []
            for frames in output.frames:
                item: dict[str, Any] = {"num_frames": len(frames), "fps": fps, "size": "{}x{}".format(*frames[0].size)}
                if as_frames:
                    item["frames"] = [_png(frame) for frame in frames]
                else:
                    item["b64_json"] = _mp4(frames, fps)
                    item["output_format"] = "mp4"
                data.append(item)
            return data

        return JSONResponse({"created": int(time.time()), "data": await run_in_threadpool(encode),
                             "seed": seed_of(kwargs)})

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorize(request)
        return JSONResponse({"object": "list", "data": [_model_card(spec)]})

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> JSONResponse:
        authorize(request)
        if model_id != spec.name:
            raise APIError(404, f"The model {model_id!r} does not exist.", param="model", code="model_not_found")
        return JSONResponse(_model_card(spec))

    @app.get("/health")
    async def health() -> JSONResponse:
        state = engine.health()
        body = {"status": state.state.value, "model": spec.name, "cfg_parallel_size": engine.cfg_parallel_size,
                "restarts": state.restarts, "queue_depth": admitted, "engine_pending": len(unfinished)}
        if not state.healthy:
            body["reason"] = _REASONS[state.state]  # the error itself (with worker tracebacks) stays in the log
        return JSONResponse(body, status_code=200 if state.healthy else 503)

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        authorize(request)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


_REASONS = {
    pycfg.EngineState.STARTING: "the engine is starting",
    pycfg.EngineState.RESTARTING: "an engine worker failed; the engine is restarting",
    pycfg.EngineState.UNHEALTHY: "an engine worker failed and the engine could not restart",
    pycfg.EngineState.CLOSED: "the engine is shut down",
}
_ENDPOINT_OF = {Task.IMAGE: "/v1/images/generations", Task.EDIT: "/v1/images/edits", Task.VIDEO: "/v1/videos"}
_ROUTES = (*_ENDPOINT_OF.values(), "/v1/models")


class _CountRequests:
    """ASGI middleware: outcome and latency of every answered ``/v1`` request (other paths go to one label, so
    scanning clients cannot grow the metric's label set)."""

    def __init__(self, app, metrics: ServerMetrics, routes: tuple[str, ...]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in self.routes else "other"
        started = time.monotonic()
        status = 500

        async def watch(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            outcome = "ok" if status < 400 else _OUTCOMES.get(status, "invalid")
            self.metrics.requests.labels(endpoint, outcome).inc()
            self.metrics.latency.labels(endpoint).observe(time.monotonic() - started)


async def _await_or_drop(request: Request, future: concurrent.futures.Future) -> Any:
    """The engine's answer; if the client goes away first, drop the request (when it has not started) and stop
    waiting, so no handler outlives its client."""
    waiting = asyncio.wrap_future(future)
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=0.25)
        if done:
            return waiting.result()
        if await request.is_disconnected():
            future.cancel()  # a no-op once running: the engine finishes it and the result is dropped
            waiting.cancel()
            raise ClientGone()


def _check_response_format(value: str | None, allowed: tuple[str, ...]) -> None:
    if value is None or value in allowed:
        return
    if value == "url":
        raise invalid("response_format 'url' is not supported: this server keeps no files and returns results "
                      f"inline; use {' or '.join(map(repr, allowed))}.", "response_format")
    raise invalid(f"Invalid response_format {value!r}; allowed: {', '.join(allowed)}.", "response_format")


def _images_response(data: list[dict], images, seed: int) -> dict:
    width, height = images[0].size
    return {"created": int(time.time()), "data": data, "output_format": "png", "size": f"{width}x{height}",
            "seed": seed}


def _model_card(spec: ModelSpec) -> dict:
    return {"id": spec.name, "object": "model", "created": 0, "owned_by": "pycfg", **spec.describe()}


async def _read_image(upload: UploadFile, param: str, bounds: pycfg.Limits, keep_alpha: bool = False):
    """An uploaded image file as a PIL image; 400 naming ``param`` if it is no image or too large."""
    from PIL import Image, UnidentifiedImageError

    data = await upload.read()
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size  # read from the header: nothing decoded yet
        max_pixels = 4 * (bounds.max_pixels or 2048 * 2048)  # inputs are resized; bound the decoding
        if width * height > max_pixels:
            raise invalid(f"The {param} is {width}x{height}: at most {max_pixels} pixels.", param)
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise invalid(f"The {param} file is not an image PIL can read (PNG, JPEG, WebP, ...).", param) from None
    if keep_alpha and image.mode in ("RGBA", "LA", "PA"):
        return image.convert("RGBA")
    return image.convert("RGB")


def _inpaint_mask(mask):
    """OpenAI masks mark the area to edit with transparent pixels; diffusers masks with white ones. A mask with
    no alpha channel is taken as diffusers takes it (white: repaint)."""
    from PIL import ImageOps

    if mask.mode == "RGBA":
        return ImageOps.invert(mask.getchannel("A"))
    return mask.convert("L")
