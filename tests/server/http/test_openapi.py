"""The OpenAPI document describes every endpoint the server has and no other, its references resolve, and it and
its Swagger UI page are served from the server's own files, with nothing from elsewhere."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from importlib import resources
from typing import Any

import pytest

from tests.models import write_version
from tests.server.http.serving import ServerThread, running_server

ASSET_PATHS = {"/v2/docs/{file}", "/static/{file}"}
"""Routes of the pages' own files, which the document does not list."""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    repository = tmp_path_factory.mktemp("http-openapi") / "models"
    write_version(repository, "tiny", 1)
    with running_server(repository) as server:
        yield server


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return json.loads((resources.files("convserve_server.http") / "static" / "openapi.json").read_text())


def references(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "$ref":
                yield item
            else:
                yield from references(item)
    elif isinstance(value, list):
        for item in value:
            yield from references(item)


def route_template(pattern: str) -> str:
    """A route's regular expression as an OpenAPI path template (the optional version part as two paths)."""
    text = pattern.removesuffix(r"\Z")
    text = text.replace(r"(?:/versions/(?P<version>[^/]+))?", "{versions}")
    return re.sub(r"\(\?P<(\w+)>\[\^/\]\+\)", lambda found: "{" + {"name": "model_name"}.get(found[1], found[1]) + "}",
                  text)


def served_operations(served: ServerThread) -> set[tuple[str, str]]:
    operations = set()
    for route in served.server.http.app.routes:
        template = route_template(route.pattern.pattern)
        for path in ({template.replace("{versions}", ""), template.replace("{versions}", "/versions/{model_version}")}
                     if "{versions}" in template else {template}):
            if path not in ASSET_PATHS:
                operations.add((route.method.lower(), path))
    return operations


def test_the_document_lists_exactly_the_served_endpoints(served, document):
    documented = {(method, path) for path, item in document["paths"].items() for method in item}
    assert documented == served_operations(served)


def test_every_reference_resolves_and_every_operation_is_described(document):
    assert document["openapi"].startswith("3.")
    for reference in set(references(document)):
        assert reference.startswith("#/components/schemas/") and \
            reference.rsplit("/", 1)[1] in document["components"]["schemas"], reference
    operation_ids = [operation["operationId"] for item in document["paths"].values() for operation in item.values()]
    assert len(operation_ids) == len(set(operation_ids))
    for item in document["paths"].values():
        for operation in item.values():
            assert operation["summary"] and "200" in operation["responses"]


def test_the_document_and_its_swagger_ui_are_served_from_the_servers_own_files(served, document):
    answer = served.request("GET", "/v2/openapi.json")
    assert answer.status == 200 and answer.json() == document
    page = served.request("GET", "/v2/docs")
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    linked = re.findall(rb'(?:src|href)="([^"]+)"', page.body)
    assert linked and all(link.startswith(b"/") for link in linked), linked  # nothing from a CDN
    for link in linked:
        assert served.request("GET", link.decode()).status == 200, link
    assert b"SwaggerUIBundle" in served.request("GET", "/v2/docs/swagger-ui-bundle.js").body
    assert served.request("GET", "/v2/docs/../../etc/passwd").status == 404
    assert served.request("GET", "/v2/docs/index.html").status == 404  # only the files the page needs


def test_the_page_links_only_its_own_files(served):
    page = served.request("GET", "/")
    assert page.status == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    for link in re.findall(rb'(?:src|href)="([^"]+)"', page.body):
        assert link.startswith(b"/"), link
        assert served.request("GET", link.decode()).status == 200, link
    assert served.request("GET", "/static/openapi.json").status == 404  # only the page's own files there
