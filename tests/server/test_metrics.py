"""The metrics' values as Prometheus exposes them, without a server."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from convserve_server.metrics import Histogram, ServerMetrics


def samples(metrics: ServerMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every exposed sample, by name and sorted labels, parsed back from the text format."""
    text = generate_latest(metrics.registry).decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_a_value_on_a_bound_counts_in_that_bucket_and_buckets_are_cumulative() -> None:
    histogram = Histogram([1, 2, 4])
    for value in (0.5, 1, 1.5, 4, 9):
        histogram.observe(value)
    assert histogram.cumulative() == [("1.0", 2), ("2.0", 3), ("4.0", 4), ("+Inf", 5)]
    assert histogram.total == 16.0


def test_requests_and_latencies_are_exposed_by_model_method_and_code() -> None:
    metrics = ServerMetrics(max_batch_size=8)
    metrics.record_request("digits", "ModelInfer", "OK", 0.0003)
    metrics.record_request("digits", "ModelInfer", "OK", 0.002)
    metrics.record_request("unknown", "ModelInfer", "NOT_FOUND", 0.0001)
    found = samples(metrics)
    ok = (("code", "OK"), ("method", "ModelInfer"), ("model", "digits"))
    assert found[("convserve_requests_total", ok)] == 2
    not_found = (("code", "NOT_FOUND"), ("method", "ModelInfer"), ("model", "unknown"))
    assert found[("convserve_requests_total", not_found)] == 1
    latency = (("method", "ModelInfer"), ("model", "digits"))
    assert found[("convserve_request_latency_seconds_count", latency)] == 2
    assert found[("convserve_request_latency_seconds_sum", latency)] == pytest.approx(0.0023)
    assert found[("convserve_request_latency_seconds_bucket", (("le", "0.0005"), *latency))] == 1
    assert found[("convserve_request_latency_seconds_bucket", (("le", "0.0025"), *latency))] == 2


def test_batches_and_queue_depth_are_exposed_per_model_and_shared_by_its_versions() -> None:
    metrics = ServerMetrics(max_batch_size=8)
    first_version, second_version = metrics.batch_observer("digits"), metrics.batch_observer("digits")
    first_version.observe_batch(3, [0.001, 0.002, 0.0], 0.0004)
    second_version.observe_batch(8, [0.0] * 8, 0.003)
    second_version.observe_queue_depth(5)
    found = samples(metrics)
    model = (("model", "digits"),)
    assert found[("convserve_batch_size_count", model)] == 2
    assert found[("convserve_batch_size_sum", model)] == 11
    assert found[("convserve_batch_size_bucket", (("le", "4.0"), *model))] == 1
    assert found[("convserve_batch_size_bucket", (("le", "8.0"), *model))] == 2
    assert found[("convserve_queue_seconds_count", model)] == 11
    assert found[("convserve_compute_seconds_count", model)] == 2
    assert found[("convserve_queue_depth", model)] == 5
