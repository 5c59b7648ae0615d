"""TLS and mutual TLS between the real server and the client SDK and CLI, with certificates made here."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from PIL import Image

from convserve_client import AsyncClient
from convserve_client.cli import main as classify_main
from convserve_client.errors import ConvserveError


@dataclass(frozen=True)
class Pem:
    """A certificate and its key, as PEM files."""

    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Pem:
    pem = Pem(directory / f"{stem}.crt", directory / f"{stem}.key")
    pem.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return pem


class CertificateAuthority:
    """A throwaway CA that signs server and client certificates."""

    def __init__(self, directory: Path, name: str) -> None:
        self._directory = directory
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self._cert = (
            x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.pem = _write(directory, name, self._cert, self._key)

    def issue(self, stem: str, *, server: bool) -> Pem:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder().subject_name(_name(stem)).issuer_name(self._cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return _write(self._directory, stem, builder.sign(self._key, hashes.SHA256()), key)


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Pem]:
    ca = CertificateAuthority(tmp_path, "convserve-test-ca")
    stranger = CertificateAuthority(tmp_path, "some-other-ca")
    return {"ca": ca.pem, "server": ca.issue("server", server=True), "client": ca.issue("client", server=False),
            "stranger": stranger.issue("stranger", server=False)}


def credentials(pki: dict[str, Pem], client: str | None = None) -> grpc.ChannelCredentials:
    pem = pki[client] if client else None
    return grpc.ssl_channel_credentials(
        root_certificates=pki["ca"].cert.read_bytes(),
        private_key=pem.key.read_bytes() if pem else None,
        certificate_chain=pem.cert.read_bytes() if pem else None,
    )


def picture() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)


async def test_tls_serves_clients_that_trust_its_ca_and_nobody_in_plaintext(tiny_repo, start_server, pki):
    server = await start_server(tiny_repo, tls_cert=pki["server"].cert, tls_key=pki["server"].key)
    address = f"127.0.0.1:{server.port}"
    async with AsyncClient(address, credentials=credentials(pki)) as client:
        assert len(await client.classify([picture()])) == 1
    async with AsyncClient(address, timeout=2) as plaintext:
        with pytest.raises(ConvserveError) as caught:
            await plaintext.model_info()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    wrong_trust = grpc.ssl_channel_credentials(root_certificates=pki["stranger"].cert.read_bytes())
    async with AsyncClient(address, credentials=wrong_trust, timeout=2) as untrusting:
        with pytest.raises(ConvserveError):
            await untrusting.model_info()


async def test_mutual_tls_admits_only_clients_with_a_certificate_from_its_ca(tiny_repo, start_server, pki):
    server = await start_server(tiny_repo, tls_cert=pki["server"].cert, tls_key=pki["server"].key,
                                tls_client_ca=pki["ca"].cert)
    address = f"127.0.0.1:{server.port}"
    async with AsyncClient(address, credentials=credentials(pki, "client")) as client:
        assert len(await client.classify([picture(), picture()])) == 2
    for who in (None, "stranger"):
        async with AsyncClient(address, credentials=credentials(pki, who), timeout=2) as refused:
            with pytest.raises(ConvserveError) as caught:
                await refused.model_info()
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE


async def test_cli_speaks_mutual_tls(tiny_repo, start_server, pki, tmp_path, capsys):
    server = await start_server(tiny_repo, tls_cert=pki["server"].cert, tls_key=pki["server"].key,
                                tls_client_ca=pki["ca"].cert)
    path = tmp_path / "photo.png"
    Image.fromarray(picture()).save(path)
    server_flag = ["--server", f"127.0.0.1:{server.port}"]
    tls = ["--tls-ca", str(pki["ca"].cert), "--tls-cert", str(pki["client"].cert), "--tls-key", str(pki["client"].key)]
    code = await _run_cli([str(path), *server_flag, *tls])
    out = capsys.readouterr().out
    assert code == 0 and str(path) in out
    assert await _run_cli([str(path), *server_flag, "--tls-ca", str(pki["ca"].cert), "--timeout", "2"]) == 1
    assert capsys.readouterr().err.startswith("convserve-classify: error:")


async def _run_cli(argv: list[str]) -> int:
    """The CLI is blocking; run it off the loop that serves the test's server."""
    return await asyncio.get_running_loop().run_in_executor(None, classify_main, argv)
