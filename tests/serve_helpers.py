"""Start and probe a real `pycfg serve` process on 127.0.0.1 (shared by the server test modules)."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

API_KEY = "test-key"


@dataclass
class Server:
    url: str
    port: int
    proc: subprocess.Popen
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, path: str, key: str | None = API_KEY, timeout: float = 30) -> tuple[int, bytes]:
    req = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as res:
            return res.status, res.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def health(server: Server) -> dict:
    return json.loads(get(server.url, "/health", key=None)[1])


def start_server(tmp_dir: Path, model: str, *options: str, startup: float = 240) -> Server:
    port = free_port()
    log = tmp_dir / "server.log"
    cmd = [sys.executable, "-m", "pycfg.cli", "serve", model, "--port", str(port), "--api-key", API_KEY,
           "--log-level", "warning", *options]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    server = Server(f"http://127.0.0.1:{port}", port, proc, log)
    deadline = time.monotonic() + startup
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{server.log_text()}")
        try:
            if get(server.url, "/health", key=None, timeout=5)[0] == 200:
                return server
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop_server(server)
            pytest.fail(f"the server did not become healthy:\n{server.log_text()}")
        time.sleep(0.3)


def stop_server(server: Server) -> None:
    workers = worker_pids(server)
    server.proc.terminate()
    try:
        server.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()
        pytest.fail("the server did not stop on SIGTERM:\n" + server.log_text())
    assert server.proc.returncode == 0, server.log_text()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() and _state(pid) != "Z" for pid in workers):
        if time.monotonic() > deadline:
            pytest.fail(f"workers {workers} outlived the server")
        time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def worker_pids(server: Server) -> list[int]:
    """The engine's worker processes: the server's children started by multiprocessing's spawn."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == server.proc.pid and b"spawn_main" in cmdline:
            pids.append(int(entry.name))
    return sorted(pids)


def proc_status(pid: int) -> dict[str, int]:
    """Threads and resident memory (KiB) of a process."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Threads", "VmRSS"):
            fields[key] = int(value.split()[0])
    return fields


def raw_request(port: int, data: bytes, read_timeout: float = 60) -> tuple[int, dict, bytes]:
    """Send raw bytes to 127.0.0.1:port and read one response until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as sock:
        sock.sendall(data)
        return read_response(sock)


def read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        head, sep, body = b"".join(chunks).partition(b"\r\n\r\n")
        if sep:
            headers = {k.strip().lower(): v.strip() for k, _, v in
                       (line.decode("latin-1").partition(":") for line in head.split(b"\r\n")[1:])}
            if "content-length" in headers and len(body) >= int(headers["content-length"]):
                break
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    if not head:
        return 0, {}, b""
    lines = head.split(b"\r\n")
    headers = {k.strip().lower(): v.strip()
               for k, _, v in (line.decode("latin-1").partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def http_post(path: str, body: bytes, headers: dict[str, str] | None = None, key: str = API_KEY) -> bytes:
    """A POST request's bytes, with Content-Length unless a header says otherwise."""
    head = {"Host": "127.0.0.1", "Authorization": f"Bearer {key}", "Content-Type": "application/json",
            "Connection": "close", **(headers or {})}
    if "Transfer-Encoding" not in head and "Content-Length" not in head:
        head["Content-Length"] = str(len(body))
    lines = [f"POST {path} HTTP/1.1", *(f"{k}: {v}" for k, v in head.items() if v is not None)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def chunked(body: bytes, size: int = 7) -> bytes:
    parts = [body[i:i + size] for i in range(0, len(body), size)]
    return b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in parts) + b"0\r\n\r\n"


def png_array(b64: str) -> np.ndarray:
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return np.array(image)


def assert_clean_error(body: bytes | dict, status: int | None = None) -> dict:
    """An OpenAI-shaped error body with no traceback, path or process id in it."""
    data = json.loads(body) if isinstance(body, bytes) else body
    error = data["error"]
    assert set(error) == {"message", "type", "param", "code"}, data
    text = json.dumps(data)
    for leak in ("Traceback", "File \"", "site-packages", "/tmp", "/work", "pid ", ".py"):
        assert leak not in text, text
    return error
