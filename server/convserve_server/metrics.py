"""Prometheus metrics: requests, latency, queue and compute time, batch sizes, queue depth."""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from convserve_server.errors import StartupError

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class ServerMetrics:
    """The server's metrics, in a registry of their own (no global state)."""

    def __init__(self, max_batch_size: int) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "convserve_requests", "Requests answered, by model, method and gRPC status code.",
            ["model", "method", "code"], registry=self.registry,
        )
        self.request_latency = Histogram(
            "convserve_request_latency_seconds", "Time from receiving a request to answering it.",
            ["model", "method"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.queue_time = Histogram(
            "convserve_queue_seconds", "Time a request waited in the batcher's queue.",
            ["model"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.compute_time = Histogram(
            "convserve_compute_seconds", "Time one model call took.",
            ["model"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        batch_buckets = sorted({2**i for i in range(max_batch_size.bit_length())} | {max_batch_size})
        self.batch_size = Histogram(
            "convserve_batch_size", "Images per model call.",
            ["model"], buckets=batch_buckets, registry=self.registry,
        )
        self.queue_depth = Gauge(
            "convserve_queue_depth", "Requests waiting in the batcher's queue.", ["model"], registry=self.registry,
        )
        self._http: tuple[WSGIServer, threading.Thread] | None = None
        # Looking up labelled children takes a lock and builds a key; the label sets are few, so keep them.
        self._request_children: dict[tuple[str, str, str], tuple[Counter, Histogram]] = {}

    def record_request(self, model: str, method: str, code: str, seconds: float) -> None:
        """Count one answered request and its latency."""
        key = (model, method, code)
        children = self._request_children.get(key)
        if children is None:
            children = (self.requests.labels(model, method, code), self.request_latency.labels(model, method))
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def batch_observer(self, model: str) -> _ModelObserver:
        """A :class:`~convserve_server.batcher.BatchObserver` for one model's batcher."""
        return _ModelObserver(self, model)

    def serve_http(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on a background thread; returns the bound port (StartupError if it cannot bind)."""
        try:
            self._http = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise StartupError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from exc
        return int(self._http[0].server_port)

    def close(self) -> None:
        """Stop the HTTP endpoint."""
        if self._http is not None:
            server, thread = self._http
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
            self._http = None


class _ModelObserver:
    def __init__(self, metrics: ServerMetrics, model: str) -> None:
        self._queue_time = metrics.queue_time.labels(model)
        self._compute_time = metrics.compute_time.labels(model)
        self._batch_size = metrics.batch_size.labels(model)
        self._queue_depth = metrics.queue_depth.labels(model)

    def observe_batch(self, rows: int, queue_seconds: list[float], compute_seconds: float) -> None:
        for seconds in queue_seconds:
            self._queue_time.observe(seconds)
        self._compute_time.observe(compute_seconds)
        self._batch_size.observe(rows)

    def observe_queue_depth(self, requests: int) -> None:
        self._queue_depth.set(requests)
