"""Prometheus metrics of one server, in their own registry (the official ``prometheus_client`` library).

- ``pycfg_requests_total{endpoint, outcome}``: answered requests by outcome (ok, invalid, unauthorized,
  too_large, rate_limited, unavailable, failed, disconnected);
- ``pycfg_queue_depth``: requests admitted and not yet answered (running or waiting in the engine);
- ``pycfg_request_seconds{endpoint}``: latency of answered requests, queueing included;
- ``pycfg_step_seconds``: engine time per denoising step (see :meth:`ServerMetrics.engine_finished`);
- ``pycfg_engine_healthy`` and ``pycfg_engine_restarts_total``: read from ``Engine.health()`` at scrape time.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_STEP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class _EngineCollector:
    """Engine state at scrape time, from ``Engine.health()``."""

    def __init__(self, health: Callable[[], Any]) -> None:
        self._health = health

    def collect(self):
        health = self._health()
        healthy = GaugeMetricFamily("pycfg_engine_healthy", "1 while every engine worker is up and in step")
        healthy.add_metric([], 1.0 if health.healthy else 0.0)
        yield healthy
        restarts = CounterMetricFamily("pycfg_engine_restarts", "Times the engine replaced its workers")
        restarts.add_metric([], float(health.restarts))
        yield restarts


class ServerMetrics:
    def __init__(self, engine_health: Callable[[], Any], queue_depth: Callable[[], int]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("pycfg_requests", "Answered requests by endpoint and outcome",
                                ["endpoint", "outcome"], registry=self.registry)
        self.latency = Histogram("pycfg_request_seconds", "Seconds from arrival to answer, queueing included",
                                 ["endpoint"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.step_seconds = Histogram("pycfg_step_seconds", "Engine seconds per denoising step",
                                      buckets=_STEP_BUCKETS, registry=self.registry)
        depth = Gauge("pycfg_queue_depth", "Requests admitted and not yet answered (running or queued)",
                      registry=self.registry)
        depth.set_function(queue_depth)
        self.registry.register(_EngineCollector(engine_health))
        self._lock = threading.Lock()
        self._engine_free_since = time.monotonic()

    def engine_finished(self, submitted: float, steps: int | None) -> None:
        """Record a request the engine just finished (called from the engine's thread, in finishing order).

        The engine runs one request at a time, in order, so a request ran from the later of its submission and
        the previous request's end until now; divided by its steps, that is the time per step.
        """
        now = time.monotonic()
        with self._lock:
            started = max(submitted, self._engine_free_since)
            self._engine_free_since = now
        if steps:
            self.step_seconds.observe((now - started) / steps)

    def render(self) -> bytes:
        return generate_latest(self.registry)
