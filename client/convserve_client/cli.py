"""``convserve-classify``: classify image files from the shell.

Prints one line per image, after a ``# model NAME version V`` line naming the
model and version that answered (again before any line another version
answered), or one JSON document with ``--json`` (each result with its
``model_name`` and ``model_version``).  A folder stands for the image files in it
(by extension; ``--recursive`` for its subfolders too).  An image that cannot
be read (a damaged file, a FIFO, a device) is reported on stderr and the rest
are still classified; the exit status is 1 if any image failed or the server
cannot be reached, 2 for a bad command line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import grpc

from convserve_client._base import DEFAULT_TIMEOUT_S
from convserve_client.client import Client
from convserve_client._inputs import DEFAULT_MAX_IMAGE_BYTES
from convserve_client.errors import PLAINTEXT_TO_TLS_HINT, TLS_TO_PLAINTEXT_HINT, ConvserveError, ImageError
from convserve_client.types import Classification

_PROG = "convserve-classify"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
                            ".pbm", ".pnm", ".ico"})
"""The file name extensions a folder's images are found by; other files in a folder are skipped."""
LOCAL_MAX_IMAGE_BYTES = 1024 * 1024 * 1024
"""Most bytes read from one image file that is decoded here (the decode itself is bounded by its pixel count)."""


def build_parser() -> argparse.ArgumentParser:
    """The command line's arguments."""
    parser = argparse.ArgumentParser(prog=_PROG, description="Classify images with a convserve server.")
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="image files (JPEG, PNG, ...) or folders of them")
    parser.add_argument("--recursive", action="store_true", help="classify the images in a folder's subfolders too")
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="wait up to SECONDS for the server to be ready before sending (default: do not wait)")
    parser.add_argument("--server-preprocess", action="store_true",
                        help="send the files as they are and let the server decode and preprocess them")
    parser.add_argument("--server", default="localhost:8500",
                        help="server address HOST:PORT; several replicas as HOST:PORT,HOST:PORT or dns:///NAME:PORT "
                        "(balanced round-robin over the ready ones) (default %(default)s)")
    parser.add_argument("--model", default="", help="model name (default: the server's default model)")
    parser.add_argument("--model-version", default="", help="model version (default: the newest)")
    parser.add_argument("--top-k", type=int, default=1, help="labels to print per image (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of lines")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per call (default %(default)s)")
    parser.add_argument("--tls-ca", type=Path, help="PEM file of the CA that signed the server's certificate (turns on TLS)")
    parser.add_argument("--tls-cert", type=Path, help="client certificate PEM, for mutual TLS")
    parser.add_argument("--tls-key", type=Path, help="client private key PEM, for mutual TLS")
    parser.add_argument("--token", help="bearer token, when the server requires one")
    parser.add_argument("--max-image-bytes", type=int, metavar="BYTES",
                        help=f"most bytes of one image file (default: {DEFAULT_MAX_IMAGE_BYTES:,} with "
                        "--server-preprocess, the server's default --max-image-bytes; "
                        f"{LOCAL_MAX_IMAGE_BYTES:,} when images are decoded here)")
    return parser


def _credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    if args.tls_ca is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=args.tls_ca.read_bytes(),
        private_key=args.tls_key.read_bytes() if args.tls_key else None,
        certificate_chain=args.tls_cert.read_bytes() if args.tls_cert else None,
    )


def _as_json(path: str, result: Classification | ImageError) -> dict[str, object]:
    if isinstance(result, ImageError):
        return {"image": path, "error": result.message}
    return {
        "image": path,
        "model_name": result.model_name,
        "model_version": result.model_version,
        "label": result.label,
        "score": result.score,
        "top_k": [{"label": p.label, "score": p.score} for p in result.top_k],
    }


def _as_line(path: str, result: Classification) -> str:
    return f"{path}\t" + "\t".join(f"{p.label} {p.score:.4f}" for p in result.top_k)


def _header(result: Classification) -> str:
    """The line that names the model and version that gave the result lines below it."""
    return f"# model {result.model_name} version {result.model_version}"


def image_paths(arguments: Sequence[str], recursive: bool) -> list[str]:
    """The files named, with each folder replaced by its image files (sorted; subfolders too if ``recursive``)."""
    paths: list[str] = []
    for argument in arguments:
        folder = Path(argument)
        if not folder.is_dir():
            paths.append(argument)
            continue
        found = folder.rglob("*") if recursive else folder.iterdir()
        paths += sorted(str(path) for path in found if path.suffix.lower() in IMAGE_SUFFIXES and not path.is_dir())
    return paths


def _max_image_bytes(args: argparse.Namespace) -> int:
    if args.max_image_bytes is not None:
        return int(args.max_image_bytes)
    return DEFAULT_MAX_IMAGE_BYTES if args.server_preprocess else LOCAL_MAX_IMAGE_BYTES


def _classify(args: argparse.Namespace, paths: list[str]) -> list[Classification | ImageError]:
    with Client(
        args.server, model_name=args.model, model_version=args.model_version, timeout=args.timeout,
        credentials=_credentials(args), token=args.token, max_image_bytes=_max_image_bytes(args),
        preprocess="server" if args.server_preprocess else "client",
    ) as client:
        if args.wait > 0:
            client.wait_until_ready(args.wait)
        return client.classify(paths, top_k=args.top_k, errors="return")


def _one_line(error: Exception, args: argparse.Namespace) -> str:
    message = str(error)
    if PLAINTEXT_TO_TLS_HINT in message:
        advice = " (give --tls-ca)" if args.tls_ca is None else ""
        return f"cannot talk to the server at {args.server}: {PLAINTEXT_TO_TLS_HINT}{advice}"
    if TLS_TO_PLAINTEXT_HINT in message:
        return f"cannot talk to the server at {args.server}: {TLS_TO_PLAINTEXT_HINT} (leave out --tls-ca)"
    if "failed to connect" in message.lower():  # refused, or never answered within --wait
        return f"cannot reach the server at {args.server} (is it running?)"
    return " ".join(message.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.top_k < 1:
        print(f"{_PROG}: error: --top-k must be >= 1", file=sys.stderr)
        return 2
    if args.max_image_bytes is not None and args.max_image_bytes < 1:
        print(f"{_PROG}: error: --max-image-bytes must be >= 1", file=sys.stderr)
        return 2
    paths = image_paths(args.images, args.recursive)
    if not paths:
        print(f"{_PROG}: error: no image files in {' '.join(args.images)}", file=sys.stderr)
        return 1
    try:
        results = _classify(args, paths)
    except (ConvserveError, ValueError, OSError) as exc:
        print(f"{_PROG}: error: {_one_line(exc, args)}", file=sys.stderr)
        return 1
    failed = 0
    header = ""
    for path, result in zip(paths, results):
        if isinstance(result, ImageError):
            failed += 1
            if not args.json:
                print(f"{_PROG}: {result.message}", file=sys.stderr)
        elif not args.json:
            if _header(result) != header:
                header = _header(result)
                print(header)
            print(_as_line(path, result))
    if args.json:
        print(json.dumps([_as_json(path, result) for path, result in zip(paths, results)], indent=2))
    return 1 if failed else 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
