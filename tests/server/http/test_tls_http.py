"""HTTP uses the gRPC server's certificate: HTTPS for clients that trust its CA, nothing in plaintext, and with
--tls-client-ca only clients with a certificate from that CA."""

from __future__ import annotations

import http.client
import ssl
from pathlib import Path

import pytest

from tests.models import write_version
from tests.server.http.serving import Answer, running_server
from tests.server.test_tls import Pem, pki  # noqa: F401  (the fixture)


def https_get(port: int, pki: dict[str, Pem], path: str, client: str | None = None) -> Answer:  # noqa: F811
    context = ssl.create_default_context(cafile=str(pki["ca"].cert))
    if client is not None:
        context.load_cert_chain(str(pki[client].cert), str(pki[client].key))
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        connection.request("GET", path)
        return Answer(connection.getresponse())
    finally:
        connection.close()


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    write_version(tmp_path / "models", "tiny", 1)
    return tmp_path / "models"


def test_https_with_the_servers_certificate_and_no_plaintext(repository, pki):  # noqa: F811
    with running_server(repository, tls_cert=pki["server"].cert, tls_key=pki["server"].key) as server:
        answer = https_get(server.port, pki, "/v2/models/tiny")
        assert answer.status == 200 and answer.json()["name"] == "tiny"
        plain = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            plain.request("GET", "/v2/health/live")
            plain.getresponse()
        plain.close()


def test_mutual_tls_admits_only_clients_with_a_certificate_from_its_ca(repository, pki):  # noqa: F811
    with running_server(repository, tls_cert=pki["server"].cert, tls_key=pki["server"].key,
                        tls_client_ca=pki["ca"].cert) as server:
        assert https_get(server.port, pki, "/v2/health/ready", client="client").status == 200
        for client in (None, "stranger"):
            with pytest.raises((ssl.SSLError, ConnectionError)):
                https_get(server.port, pki, "/v2/health/ready", client=client)
