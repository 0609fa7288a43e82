"""`pycfg serve`: parse the command line, start the Engine, serve the app with uvicorn until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from ..engine import Limits
from .models import DEFAULT_MODEL, TINY_MODELS, load_model_spec
from .schemas import RequestLimits  # needs the 'serve' extra (pydantic, through FastAPI)

logger = logging.getLogger("pycfg.serve")

API_KEY_ENV = "PYCFG_API_KEY"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pycfg serve",
        description="Serve a diffusers pipeline, CFG-parallel, behind OpenAI's Images API "
                    "(/v1/images/generations, /v1/images/edits), /v1/videos, /v1/models, /health and /metrics.",
    )
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL",
                   help=f"a local diffusers model folder (loaded offline), or a built-in tiny random-weight model: "
                        f"{', '.join(TINY_MODELS)} (default: {DEFAULT_MODEL})")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="torch dtype of a model folder's weights (default: as saved)")
    p.add_argument("--cfg-parallel-size", type=int, default=2, help="worker processes (ranks) in the CFG group")
    p.add_argument("--devices", nargs="+", default=None, metavar="DEVICE",
                   help="one device per rank, e.g. cuda:0 cuda:1 (default: one GPU per rank when there are "
                        "enough, else the CPU)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 exposes the server to the network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require 'Authorization: Bearer KEY' on /v1 and /metrics (default: ${API_KEY_ENV})")
    p.add_argument("--max-queue", type=int, default=16,
                   help="requests that may wait behind the running one; more get 429 (default 16)")
    p.add_argument("--max-connections", type=int, default=1024,
                   help="open connections past which new requests get 503 (default 1024)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a connection may take to send a request's head before it is closed (default 10)")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a request body may stall before 408 (default 30)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])

    limits = p.add_argument_group("request limits (400 past them; see pycfg.Limits)")
    engine_limits, defaults = Limits(), RequestLimits()
    limits.add_argument("--max-pixels", type=int, default=engine_limits.max_pixels,
                        help=f"width*height per image or frame (default {engine_limits.max_pixels})")
    limits.add_argument("--max-images", type=int, default=engine_limits.max_images_per_request,
                        help=f"n per request (default {engine_limits.max_images_per_request})")
    limits.add_argument("--max-steps", type=int, default=engine_limits.max_steps,
                        help=f"num_inference_steps (default {engine_limits.max_steps})")
    limits.add_argument("--max-frames", type=int, default=engine_limits.max_frames,
                        help=f"num_frames of a video (default {engine_limits.max_frames})")
    limits.add_argument("--max-prompt-chars", type=int, default=defaults.max_prompt_chars,
                        help=f"characters of prompt and negative_prompt (default {defaults.max_prompt_chars})")
    limits.add_argument("--max-body-bytes", type=int, default=16 * 1024 * 1024,
                        help="request body size (413 past it; default 16 MiB)")
    limits.add_argument("--request-timeout", type=float, default=600.0,
                        help="seconds one request may run before its workers are restarted (default 600)")

    engine = p.add_argument_group("engine and compile options")
    engine.add_argument("--timeout", type=float, default=60.0,
                        help="seconds a collective waits for a failed peer (default 60)")
    engine.add_argument("--startup-timeout", type=float, default=600.0,
                        help="seconds for the workers to load and compile (default 600)")
    engine.add_argument("--worker-threads", type=int, default=1, help="torch threads per worker (default 1)")
    engine.add_argument("--exchange", choices=["gather", "reduce"], default="gather")
    engine.add_argument("--fused", choices=["auto", "on", "off"], default="auto",
                        help="the fused combine + scheduler kernel (auto: on CUDA only)")
    engine.add_argument("--comm", choices=["auto", "nccl-ext", "torch"], default="auto")
    engine.add_argument("--compile-transformer", choices=["off", "full", "regional"], default="off",
                        help="torch.compile the transformer: the whole model or each repeated block")
    engine.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto")
    engine.add_argument("--batch-branches", choices=["auto", "on", "off"], default="auto",
                        help="same-shape branches on one rank as one batched forward (auto: when compiled)")
    engine.add_argument("--text-bucket", type=int, default=None,
                        help="pad text inputs to a multiple of this many tokens (fewer compiled shapes)")
    engine.add_argument("--noise", choices=["philox", "diffusers"], default="philox",
                        help="noise of stochastic solvers on the fused path")
    engine.add_argument("--check-finite", action="store_true", help="refuse NaN/Inf inputs and results")
    return p


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The warning printed when the server listens beyond loopback with no API key."""
    if host in ("127.0.0.1", "localhost", "::1") or api_key:
        return None
    return (f"listening on {host} with no --api-key: anyone who reaches this address can use the server and its "
            f"devices; set --api-key (or ${API_KEY_ENV})")


def _stopped(signum, frame) -> None:
    logger.info("stopping on %s", signal.Signals(signum).name)


def _tristate(value: str) -> bool | None:
    return {"auto": None, "on": True, "off": False}[value]


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    import uvicorn
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:%(name)s: %(message)s")

    import pycfg

    from .app import ServeSettings, create_app
    from .transport import HeaderTimeoutH11Protocol

    try:
        spec = load_model_spec(args.model, args.dtype)
        engine_limits = Limits(max_pixels=args.max_pixels, max_images_per_request=args.max_images,
                               max_steps=args.max_steps, max_frames=args.max_frames)
        limits = RequestLimits(max_prompt_chars=args.max_prompt_chars)
        settings = ServeSettings(api_key=args.api_key or None, max_queue=args.max_queue,
                                 max_body_bytes=args.max_body_bytes, body_timeout=args.body_timeout, limits=limits)
    except ValueError as err:
        print(f"pycfg serve: {err}", file=sys.stderr)
        return 2
    warning = exposure_warning(args.host, settings.api_key)
    if warning:
        logger.warning(warning)

    compile_options = {
        "exchange": args.exchange, "fused": _tristate(args.fused), "comm": args.comm,
        "compile_transformer": False if args.compile_transformer == "off" else args.compile_transformer,
        "cuda_graphs": _tristate(args.cuda_graphs), "batch_branches": _tristate(args.batch_branches),
        "text_bucket": args.text_bucket, "noise": args.noise, "check_finite": args.check_finite,
    }
    logger.info("starting %d worker(s) for %s (%s)", args.cfg_parallel_size, spec.name, spec.pipeline_class)
    try:
        engine = pycfg.Engine(spec.factory, cfg_parallel_size=args.cfg_parallel_size, devices=args.devices,
                              timeout=args.timeout, auto_restart=True, request_timeout=args.request_timeout,
                              startup_timeout=args.startup_timeout, worker_threads=args.worker_threads,
                              limits=engine_limits, **compile_options)
    except (ValueError, TypeError) as err:
        print(f"pycfg serve: {err}", file=sys.stderr)
        return 2
    except pycfg.PycfgError as err:
        print(f"pycfg serve: the engine did not start: {err}", file=sys.stderr)
        return 1
    try:
        engine.warmup()
        config = uvicorn.Config(
            create_app(engine, spec, settings), host=args.host, port=args.port, lifespan="off",
            http=HeaderTimeoutH11Protocol.with_timeout(args.header_timeout), log_level=args.log_level,
            limit_concurrency=args.max_connections, timeout_keep_alive=5, timeout_graceful_shutdown=5,
            server_header=False,
        )
        # uvicorn stops on SIGINT/SIGTERM, then raises the signal again for the handler it found: make that one
        # return, so the engine below closes its workers and the command exits 0
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _stopped)
        uvicorn.Server(config).run()
    finally:
        engine.close(wait=False)
    return 0
