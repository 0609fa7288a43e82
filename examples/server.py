"""A small HTTP image-generation server on pycfg.Engine (standard library only), bound to 127.0.0.1.

    python examples/server.py [--port 8000] [--cfg-parallel-size 2] [--config tiny]

The web server is one long-lived process (the driver); the engine runs the pipeline on one worker process per
rank. Handler threads call ``engine.generate`` concurrently; the engine queues the requests and runs them in order.

Endpoints:
    GET  /health     the engine's describe() as JSON; 200 when healthy, 503 when not
    POST /generate   JSON in:  {"seed": 0, "prompt_seed": 0, "num_inference_steps": 4, "true_cfg_scale": 4.0,
                                "negative": true, "format": "json" | "png"}
                     JSON out: {"id": .., "seed": .., "width": .., "height": .., "seconds": .., "png_base64": ..}
                     ("format": "png" answers with the image/png bytes instead)
    POST /restart    bring a failed engine back

The built-in pipelines have random weights and no text encoder: ``prompt_seed`` picks the random prompt
embeddings that stand in for an encoded prompt. Errors come back as {"error": "..."} with 400 (bad request),
503 (engine unhealthy) or 500 (a worker failed).
"""

from __future__ import annotations

import argparse
import base64
import functools
import io
import itertools
import json
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

import pycfg
from pycfg.tiny import qwenimage_inputs, qwenimage_pipeline

MAX_BODY = 1 << 20
MAX_STEPS = 200


class BadRequest(ValueError):
    pass


def pipeline_request(body: dict, config: str) -> dict:
    """The pipeline's keyword arguments for one JSON request body."""
    known = {"seed", "prompt_seed", "num_inference_steps", "true_cfg_scale", "negative", "format"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")

    def integer(name: str, default: int, low: int, high: int) -> int:
        value = body.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise BadRequest(f"{name} must be an integer in [{low}, {high}], got {value!r}")
        return value

    seed = integer("seed", 0, 0, 2**63 - 1)
    prompt_seed = integer("prompt_seed", 0, 0, 2**31 - 1)
    steps = integer("num_inference_steps", 4, 1, MAX_STEPS)
    scale = body.get("true_cfg_scale", 4.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise BadRequest(f"true_cfg_scale must be a number, got {scale!r}")
    kwargs = dict(qwenimage_inputs(config, seed=prompt_seed), num_inference_steps=steps,
                  true_cfg_scale=float(scale), output_type="pil", generator=torch.Generator().manual_seed(seed))
    if not body.get("negative", True):
        del kwargs["negative_prompt_embeds"], kwargs["negative_prompt_embeds_mask"]
    return kwargs


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class Handler(BaseHTTPRequestHandler):
    engine: pycfg.Engine
    config: str
    ids = itertools.count(1)
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        if self.server.verbose:
            super().log_message(format, *args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, value: dict) -> None:
        self._send(status, json.dumps(value).encode(), "application/json")

    def do_GET(self) -> None:
        if self.path != "/health":
            self._json(404, {"error": f"no such path {self.path}"})
            return
        info = self.engine.describe()
        self._json(200 if info["healthy"] else 503, info)

    def do_POST(self) -> None:
        if self.path == "/restart":
            try:
                self.engine.restart()
            except pycfg.PycfgError as err:
                self._json(500, {"error": str(err)})
                return
            self._json(200, {"healthy": self.engine.healthy})
            return
        if self.path != "/generate":
            self._json(404, {"error": f"no such path {self.path}"})
            return
        request_id = next(self.ids)
        try:
            length = int(self.headers.get("Content-Length", "0"))
            if length > MAX_BODY:
                raise BadRequest(f"request body larger than {MAX_BODY} bytes")
            body = json.loads(self.rfile.read(length) or b"{}")
            if not isinstance(body, dict):
                raise BadRequest("the request body must be a JSON object")
            kwargs = pipeline_request(body, self.config)
            started = time.perf_counter()
            image = self.engine.generate(**kwargs).images[0]
            seconds = time.perf_counter() - started
        except (BadRequest, json.JSONDecodeError, ValueError, TypeError) as err:
            # InvalidRequestError is a ValueError: rejected before any worker ran it
            self._json(400, {"id": request_id, "error": str(err)})
            return
        except pycfg.EngineUnhealthyError as err:
            self._json(503, {"id": request_id, "error": str(err)})
            return
        except pycfg.PycfgError as err:
            self._json(500, {"id": request_id, "error": str(err)})
            return
        data = png_bytes(image)
        if body.get("format") == "png":
            self._send(200, data, "image/png")
            return
        self._json(200, {"id": request_id, "seed": body.get("seed", 0), "width": image.width,
                         "height": image.height, "seconds": seconds,
                         "png_base64": base64.b64encode(data).decode("ascii")})


def make_server(engine: pycfg.Engine, port: int = 8000, config: str = "tiny",
                verbose: bool = False) -> ThreadingHTTPServer:
    """An HTTP server on 127.0.0.1:``port`` (0: any free port) answering with ``engine``."""
    handler = type("BoundHandler", (Handler,), {"engine": engine, "config": config})
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    server.verbose = verbose
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--cfg-parallel-size", type=int, default=2, help="worker processes (ranks)")
    parser.add_argument("--config", default="tiny", choices=["tiny", "demo", "small"], help="pipeline size")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a dead peer is given up on")
    parser.add_argument("--auto-restart", action="store_true", help="restart the workers after a failure")
    parser.add_argument("--verbose", action="store_true", help="log every HTTP request")
    args = parser.parse_args(argv)

    engine = pycfg.Engine(functools.partial(qwenimage_pipeline, args.config),
                          cfg_parallel_size=args.cfg_parallel_size, timeout=args.timeout,
                          auto_restart=args.auto_restart)
    with engine:
        engine.warmup()
        server = make_server(engine, args.port, args.config, args.verbose)

        def stop(signum, frame):
            # shutdown() waits for serve_forever to return: it must not run on the serving thread
            threading.Thread(target=server.shutdown, daemon=True).start()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        host, port = server.server_address[:2]
        print(f"pycfg example server listening on http://{host}:{port} "
              f"(cfg_parallel_size={args.cfg_parallel_size}, {args.config} pipeline)", flush=True)
        try:
            server.serve_forever()
        finally:
            server.server_close()
    print("pycfg example server stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
