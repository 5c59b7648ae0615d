"""deploy/grafana's dashboard and deploy/prometheus's alert rules: well-formed, and every metric they query is one
that a real server exports (scraped from its /metrics after it has answered, refused and failed to load)."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from convserve_protocol.protos import grpc_predict_v2_pb2 as pb
from convserve_protocol.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from convserve_server.errors import ModelLoadFailed
from tests.deploy.manifests import ROOT
from tests.models import tiny_model, with_golden, with_one_weight_changed, write_version

OPERATIONS = ROOT / "docs" / "operations.md"
TABLE_START = "<!-- metrics table: tests/deploy/test_observability.py checks it against a real server's /metrics -->"
DASHBOARD = ROOT / "deploy" / "grafana" / "convserve-dashboard.json"
RULES = ROOT / "deploy" / "prometheus" / "convserve-rules.yaml"
SCRAPE_LABELS = {"job", "instance", "namespace", "pod", "container", "service", "endpoint"}
"""Labels Prometheus's scrape (the kubernetes-pods job, a ServiceMonitor) adds to every series."""
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right",
            "inf", "nan"}
SAMPLE_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                   "gauge": ("",), "summary": ("", "_sum", "_count", "_created")}


# --- reading PromQL ---------------------------------------------------------------------------------

def selectors(expression: str) -> Iterator[tuple[str, set[str]]]:
    """(metric name, label names matched) of every series selector in a PromQL expression."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expression)  # label values may hold anything
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range durations, $__rate_interval included
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\boffset\s+\w+", " ", text)
    for match in re.finditer(r"(?<![\w:$.])([a-zA-Z_:][\w:]*)\s*(\{[^}]*\})?\s*(\()?", text):
        name, matchers, call = match.groups()
        if call or name.lower() in KEYWORDS:
            continue  # a function or an aggregation, or an operator word
        labels = set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", matchers or ""))
        yield name, labels


def dashboard_expressions(dashboard: dict) -> list[str]:
    """Every PromQL expression of the dashboard: its panels' targets and its query variables."""
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            (metric,) = re.fullmatch(r"label_values\((\w+),\s*\w+\)", variable["query"]["query"]).groups()
            expressions.append(metric)
    return expressions


def rule_expressions(rules: dict) -> list[str]:
    """Every alert's expression."""
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def balanced(expression: str) -> bool:
    """Whether the expression's brackets pair up (outside strings)."""
    stack, pairs = [], {")": "(", "]": "[", "}": "{"}
    for character in re.sub(r'"(?:[^"\\]|\\.)*"', '""', expression):
        if character in "([{":
            stack.append(character)
        elif character in pairs and (not stack or stack.pop() != pairs[character]):
            return False
    return not stack


def test_selectors_are_read_from_promql():
    expression = ('histogram_quantile(0.99, sum by (le, model) (rate(convserve_queue_seconds_bucket{model=~"$m", '
                  'code!="OK"}[$__rate_interval]))) / on(model) group_left up offset 1h and bool process_x')
    assert dict(selectors(expression)) == {"convserve_queue_seconds_bucket": {"model", "code"}, "up": set(),
                                           "process_x": set()}
    assert balanced(expression) and not balanced("sum(rate(x[5m])")


# --- what a real server exports -----------------------------------------------------------------------

@pytest.fixture
async def scraped(tmp_path, start_server) -> str:
    """What a real server's /metrics says once it has answered a request, refused an unknown model and refused a
    version that fails verification (so that every family of convserve's has samples)."""
    repository = tmp_path / "models"
    write_version(repository, "tiny", 1, with_golden(tiny_model()))
    server = await start_server(repository)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        image = pb.ModelInferRequest.InferInputTensor(name="image", datatype="FP32", shape=[1, 8, 8, 3])
        raw = [np.zeros((1, 8, 8, 3), "<f4").tobytes()]
        await stub.ModelInfer(pb.ModelInferRequest(model_name="tiny", inputs=[image], raw_input_contents=raw))
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.ModelInfer(pb.ModelInferRequest(model_name="absent", inputs=[image], raw_input_contents=raw))
    write_version(repository, "tiny", 2, with_one_weight_changed(with_golden(tiny_model())))
    with pytest.raises(ModelLoadFailed, match="fails verification"):
        await server.core.load_model("tiny")
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    return await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())


@pytest.fixture
def exported(scraped: str) -> dict[str, set[str]]:
    """Sample names the server exports, each with the label names seen on it."""
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(scraped):
        for suffix in SAMPLE_SUFFIXES[family.type]:
            names.setdefault(family.name + suffix, set())
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


async def test_the_model_state_metrics_say_what_was_served_and_what_was_refused(exported):
    assert {"model", "version"} <= exported["convserve_model_ready"]
    assert {"model", "version"} <= exported["convserve_model_verified"]
    assert {"model", "reason"} <= exported["convserve_model_load_failures_total"]


def metrics_table(scraped: str) -> str:
    """The Markdown table of convserve's own metrics: name as queried, type, labels, help text."""
    rows = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for family in sorted(text_string_to_metric_families(scraped), key=lambda f: f.name):
        if not family.name.startswith("convserve_"):
            continue
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = sorted({label for sample in family.samples for label in sample.labels} - {"le"})
        shown = f"`{name}`" + (" (`_bucket`, `_sum`, `_count`)" if family.type == "histogram" else "")
        rows.append(f"| {shown} | {family.type} | {', '.join(f'`{label}`' for label in labels)} | "
                    f"{family.documentation} |")
    return "\n".join(rows)


def test_the_metrics_table_in_operations_md_is_what_the_server_exports(scraped):
    text = OPERATIONS.read_text()
    assert TABLE_START in text
    table = text.split(TABLE_START, 1)[1].strip().split("\n\n", 1)[0]
    expected = metrics_table(scraped)
    assert table == expected, f"docs/operations.md's metrics table differs from /metrics; it should read:\n{expected}"


def unknown_metrics(expressions: list[str], exported: dict[str, set[str]]) -> list[str]:
    """Each metric an expression names that the server does not export, or a label it does not carry."""
    problems = []
    for expression in expressions:
        for name, labels in selectors(expression):
            if name not in exported:
                problems.append(f"{name} (in {expression[:80]}...)")
            elif labels - exported[name] - SCRAPE_LABELS:
                problems.append(f"{name} has no label {sorted(labels - exported[name] - SCRAPE_LABELS)}")
    return problems


async def test_every_metric_the_dashboard_queries_is_exported(exported):
    expressions = dashboard_expressions(json.loads(DASHBOARD.read_text()))
    assert len(expressions) >= 10
    assert unknown_metrics(expressions, exported) == []
    queried = {name for expression in expressions for name, _ in selectors(expression)}
    for needed in ("convserve_requests_total", "convserve_request_latency_seconds_bucket", "convserve_queue_depth",
                   "convserve_batch_size_bucket", "convserve_model_ready", "convserve_model_verified",
                   "convserve_model_load_failures_total"):
        assert needed in queried, needed


async def test_every_metric_the_alert_rules_query_is_exported(exported):
    assert unknown_metrics(rule_expressions(yaml.safe_load(RULES.read_text())), exported) == []


async def test_a_misspelt_metric_or_label_is_caught(exported):
    assert unknown_metrics(["sum(rate(convserve_request_total[5m]))"], exported)
    assert unknown_metrics(['convserve_queue_depth{modle="digits"}'], exported)
    assert not unknown_metrics(['convserve_queue_depth{model="digits", pod="p"}'], exported)


# --- their shape ------------------------------------------------------------------------------------------

def test_the_dashboard_is_well_formed_and_its_variables_are_defined():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    for panel in dashboard["panels"]:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]) and panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert balanced(target["expr"]), target["expr"]
            used = set(re.findall(r"\$(?!__)(\w+)", target["expr"]))
            assert used <= variables, (panel["title"], used - variables)


def test_the_alert_rules_are_well_formed_and_cover_verification_queue_and_errors():
    rules = [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"} and rule["annotations"]["summary"]
        assert balanced(rule["expr"]), rule["alert"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
    assert {"ConvserveModelVerificationFailed", "ConvserveQueueFull", "ConvserveErrorRateRising"} <= set(names)
