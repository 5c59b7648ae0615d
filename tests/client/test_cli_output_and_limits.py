"""``convserve-classify``: it names the model and version that answered, says when client and server disagree
about TLS, and limits only what it sends to the server's image limit."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from PIL import Image

from convserve_client import AsyncClient, UnavailableError
from convserve_client._inputs import DEFAULT_MAX_IMAGE_BYTES
from convserve_client.cli import main as classify_main
from tests.models import write_version
from tests.server.test_tls import CertificateAuthority


def save_photo(path, seed: int, size: tuple[int, int] = (20, 30)) -> str:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return str(path)


async def run_cli(argv: list[str]) -> int:
    return await asyncio.wait_for(asyncio.to_thread(classify_main, argv), timeout=60)


async def test_a_header_names_each_model_and_version_before_the_lines_it_answered(tmp_path, start_server, capsys):
    repository = tmp_path / "models"
    for version in (1, 2):
        write_version(repository, "tiny", version, seed=version)
    server = await start_server(repository, versions_per_model=2)
    photos = [save_photo(tmp_path / f"photo{index}.png", index) for index in range(2)]
    address = ["--server", f"127.0.0.1:{server.port}"]
    assert await run_cli([*photos, *address]) == 0
    header, *lines = capsys.readouterr().out.strip().splitlines()
    assert header == "# model tiny version 2" and [line.split("\t")[0] for line in lines] == photos
    assert await run_cli([*photos, *address, "--model", "tiny", "--model-version", "1", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert [(entry["image"], entry["model_name"], entry["model_version"]) for entry in document] == \
        [(photo, "tiny", "1") for photo in photos]


async def test_an_image_over_16_mib_is_classified_when_preprocessed_here_and_the_flag_sets_the_limit(
        tiny_server, tmp_path, capsys):
    big = tmp_path / "big.bmp"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (2400, 2400, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > DEFAULT_MAX_IMAGE_BYTES
    address = ["--server", f"127.0.0.1:{tiny_server.port}"]
    assert await run_cli([str(big), *address]) == 0
    assert capsys.readouterr().out.strip().splitlines()[1].startswith(f"{big}\t")
    assert await run_cli([str(big), *address, "--server-preprocess"]) == 1  # the server's default limit
    assert capsys.readouterr().err.strip() == \
        f"convserve-classify: {big}: over the limit of {DEFAULT_MAX_IMAGE_BYTES:,} bytes per image"
    assert await run_cli([str(big), *address, "--max-image-bytes", "1000"]) == 1
    assert capsys.readouterr().err.strip() == f"convserve-classify: {big}: over the limit of 1,000 bytes per image"
    assert await run_cli([str(big), *address, "--max-image-bytes", "0"]) == 2


@pytest.fixture
def pki(tmp_path):
    authority = CertificateAuthority(tmp_path, "test-ca")
    return authority.pem, authority.issue("server", server=True)


async def test_a_plaintext_client_is_told_the_server_expects_tls(tiny_repo, start_server, pki, tmp_path, capsys):
    ca, server_pem = pki
    server = await start_server(tiny_repo, tls_cert=server_pem.cert, tls_key=server_pem.key)
    address = f"127.0.0.1:{server.port}"
    photo = save_photo(tmp_path / "photo.png", 0)
    assert await run_cli([photo, "--server", address, "--timeout", "1"]) == 1
    assert capsys.readouterr().err.strip() == (f"convserve-classify: error: cannot talk to the server at {address}: "
                                               "the server closed the connection before answering: it probably "
                                               "expects TLS (give --tls-ca)")
    async with AsyncClient(address, timeout=1) as client:
        with pytest.raises(UnavailableError, match="it probably expects TLS"):
            await client.model_info()
    assert await run_cli([photo, "--server", address, "--tls-ca", str(ca.cert)]) == 0


async def test_a_tls_client_is_told_the_server_does_not_use_tls(tiny_server, pki, tmp_path, capsys):
    ca, _ = pki
    address = f"127.0.0.1:{tiny_server.port}"
    photo = save_photo(tmp_path / "photo.png", 0)
    assert await run_cli([photo, "--server", address, "--timeout", "1", "--tls-ca", str(ca.cert)]) == 1
    assert capsys.readouterr().err.strip() == (f"convserve-classify: error: cannot talk to the server at {address}: "
                                               "the server did not answer the TLS handshake: it probably does not "
                                               "use TLS (leave out --tls-ca)")
