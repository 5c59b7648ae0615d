"""Prometheus metrics: requests, latency, queue and compute time, batch sizes, queue depth.

Every update happens on the event loop's thread (the servicers' wrapper and the
batcher's callbacks), so the values are plain counters in lists and dicts,
exported by a collector when ``/metrics`` is scraped.  ``prometheus_client``'s
own metric objects take a lock for each of the dozen updates a request makes:
7.7 µs of the loop's time per request on a slow host (1.7 µs with these), and the
loop's time is what bounds the requests per second.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from convserve_server.errors import StartupError
from convserve_server.metrics_http import MetricsHTTPServer

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class Histogram:
    """Observations counted into buckets (``le`` bounds, then +Inf) and summed; not thread-safe."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        """Count one observation (a value equal to a bound falls in that bound's bucket, as ``le`` says)."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus buckets: (``le``, observations at or below it), ending with +Inf."""
        running = 0
        buckets = []
        for bound, count in zip((*(floatToGoString(bound) for bound in self.bounds), "+Inf"), self.counts):
            running += count
            buckets.append((bound, running))
        return buckets


class ServerMetrics:
    """The server's metrics, in a registry of their own (no global state); update from the loop's thread only."""

    def __init__(self, max_batch_size: int) -> None:
        self._batch_buckets = sorted({2**i for i in range(max_batch_size.bit_length())} | {max_batch_size})
        self._requests: dict[tuple[str, str, str], int] = {}
        self._request_latency: dict[tuple[str, str], Histogram] = {}
        self._models: dict[str, _ModelObserver] = {}
        self._served_states: Callable[[], list[tuple[str, int, bool, bool]]] = list
        self._load_failures: Callable[[], dict[tuple[str, str], int]] = dict
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(self))
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        self._http: MetricsHTTPServer | None = None

    def record_request(self, model: str, method: str, code: str, seconds: float) -> None:
        """Count one answered request and its latency."""
        key = (model, method, code)
        self._requests[key] = self._requests.get(key, 0) + 1
        latency = self._request_latency.get((model, method))
        if latency is None:
            latency = self._request_latency[(model, method)] = Histogram(_LATENCY_BUCKETS)
        latency.observe(seconds)

    def batch_observer(self, model: str) -> _ModelObserver:
        """A :class:`~convserve_server.batcher.BatchObserver` for one model's batcher (one per model name)."""
        observer = self._models.get(model)
        if observer is None:
            observer = self._models[model] = _ModelObserver(self._batch_buckets)
        return observer

    def watch_models(self, served_states: Callable[[], list[tuple[str, int, bool, bool]]],
                     load_failures: Callable[[], dict[tuple[str, str], int]]) -> None:
        """Export the models' state at each scrape: (model, version, ready, verified) of each served version, and
        versions refused by (model, reason)."""
        self._served_states = served_states
        self._load_failures = load_failures

    def serve_http(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on a background thread; returns the bound port (StartupError if it cannot bind)."""
        try:
            self._http = MetricsHTTPServer(host, port, self.registry)
        except OSError as exc:
            raise StartupError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from exc
        return self._http.port

    def close(self) -> None:
        """Stop the HTTP endpoint."""
        if self._http is not None:
            self._http.close()
            self._http = None

    def families(self) -> Iterator[Metric]:
        """The metrics as Prometheus families, read on the scraping thread."""
        requests = CounterMetricFamily("convserve_requests", "Requests answered, by model, method and gRPC status code.",
                                       labels=["model", "method", "code"])
        for labels, count in list(self._requests.items()):
            requests.add_metric(labels, count)
        yield requests
        yield _histogram_family("convserve_request_latency_seconds", "Time from receiving a request to answering it.",
                                ["model", "method"], list(self._request_latency.items()))
        models = list(self._models.items())
        yield _histogram_family("convserve_queue_seconds", "Time a request waited in the batcher's queue.",
                                ["model"], [((name,), observer.queue_time) for name, observer in models])
        yield _histogram_family("convserve_compute_seconds", "Time one model call took.",
                                ["model"], [((name,), observer.compute_time) for name, observer in models])
        yield _histogram_family("convserve_batch_size", "Images per model call.",
                                ["model"], [((name,), observer.batch_size) for name, observer in models])
        depth = GaugeMetricFamily("convserve_queue_depth", "Requests waiting in the batcher's queue.", labels=["model"])
        for name, observer in models:
            depth.add_metric([name], observer.queue_depth)
        yield depth
        yield from self._model_families()

    def _model_families(self) -> Iterator[Metric]:
        states = self._served_states()
        ready = GaugeMetricFamily("convserve_model_ready", "1 while a loaded model version takes requests, else 0.",
                                  labels=["model", "version"])
        verified = GaugeMetricFamily("convserve_model_verified", "1 if a served version's golden vectors matched on "
                                     "its execution provider, 0 if it is served unverified.", labels=["model", "version"])
        for name, version, is_ready, is_verified in states:
            ready.add_metric([name, str(version)], float(is_ready))
            verified.add_metric([name, str(version)], float(is_verified))
        failures = CounterMetricFamily("convserve_model_load_failures", "Model versions refused when loaded, by "
                                       "model and reason (verification: golden vectors did not match; load: any "
                                       "other error).", labels=["model", "reason"])
        for (name, reason), count in list(self._load_failures().items()):
            failures.add_metric([name, reason], count)
        yield from (ready, verified, failures)


def _histogram_family(name: str, documentation: str, label_names: list[str],
                      histograms: list[tuple[tuple[str, ...], Histogram]]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=label_names)
    for labels, histogram in histograms:
        family.add_metric(list(labels), histogram.cumulative(), histogram.total)
    return family


class _Collector:
    """Hands the registry the server's current values at each scrape."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self._metrics.families()


class _ModelObserver:
    """One model's batch measurements (the batcher's :class:`~convserve_server.batcher.BatchObserver`)."""

    def __init__(self, batch_buckets: Sequence[float]) -> None:
        self.queue_time = Histogram(_LATENCY_BUCKETS)
        self.compute_time = Histogram(_LATENCY_BUCKETS)
        self.batch_size = Histogram(batch_buckets)
        self.queue_depth = 0

    def observe_batch(self, rows: int, queue_seconds: list[float], compute_seconds: float) -> None:
        for seconds in queue_seconds:
            self.queue_time.observe(seconds)
        self.compute_time.observe(compute_seconds)
        self.batch_size.observe(rows)

    def observe_queue_depth(self, requests: int) -> None:
        self.queue_depth = requests
