"""The server's configuration: one typed object fed by flags and ``CONVSERVE_*`` variables.

A flag wins over its environment variable, which wins over the default.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from convserve_protocol.preprocessing import DEFAULT_MAX_IMAGE_PIXELS
from convserve_server.runtime import DeviceRequest


class ServerConfig(BaseSettings):
    """Settings of ``convserve-serve``; each field is also ``--field-name`` and ``CONVSERVE_FIELD_NAME``."""

    model_config = SettingsConfigDict(env_prefix="CONVSERVE_", frozen=True, protected_namespaces=())

    model_repository: Path = Field(Path("models"), description="model repository: <repo>/<name>/<version>/model.onnx")
    host: str = Field("0.0.0.0", description="address to listen on")
    port: int = Field(8500, ge=0, le=65535, description="gRPC port (0 picks a free one)")
    default_model: str = Field("", description="model that calls naming none get (empty: the only model at startup; "
                               "with several, naming none is a startup error; a model added later never changes it)")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N; cuda never falls back to the CPU")
    max_batch_size: int = Field(64, ge=1, le=4096, description="most images the model runs at once")
    max_queue_delay_us: int = Field(0, ge=0, le=10_000_000, description="how long after the oldest queued request "
                                    "arrived the batcher may wait for a full batch (0: take what is queued at the end "
                                    "of each event-loop turn)")
    max_queue_size: int = Field(1024, ge=1, description="queued requests per model before RESOURCE_EXHAUSTED (a "
                                "request larger than max_batch_size counts once per chunk)")
    max_concurrent_rpcs: int = Field(4096, ge=1, description="model calls in progress (counted once their request "
                                     "has arrived, a unary one with an answer of 16 KiB or more until it is sent; "
                                     "health and calls still sending do not count) before new ones get "
                                     "RESOURCE_EXHAUSTED at once")
    receive_timeout_s: float = Field(10.0, gt=0, le=3600, description="time a call has, from its headers, to send its "
                                     "whole request message; past it, DEADLINE_EXCEEDED")
    max_concurrent_streams: int = Field(256, ge=1, description="HTTP/2 streams (calls) open at once on one connection; "
                                        "a client queues further calls until one ends")
    max_watch_streams: int = Field(4096, ge=0, description="health Watch streams open at once, in all; beyond, "
                                   "UNIMPLEMENTED, which gRPC's client-side health checking takes as healthy")
    max_watch_streams_per_peer: int = Field(1024, ge=0, description="health Watch streams open at once from one peer "
                                            "address (a host, a NAT gateway or a node of a pod network)")
    max_inference_streams: int = Field(1024, ge=0, description="ModelStreamInfer streams open at once, in all; "
                                       "beyond, RESOURCE_EXHAUSTED")
    max_inference_streams_per_peer: int = Field(256, ge=0, description="ModelStreamInfer streams open at once from "
                                                "one peer address")
    stream_idle_timeout_s: float = Field(300.0, ge=0, le=86400, description="ModelStreamInfer: a stream that "
                                         "sends no request message for this long is ended with DEADLINE_EXCEEDED, "
                                         "and a message it left half-sent freed (0: never; Envoy's and so Istio's "
                                         "default stream idle timeout is also 300 s)")
    max_unsent_bytes_per_connection: int = Field(64 * 1024 * 1024, ge=1, description="bytes of answers (each of 16 "
                                                 "KiB or more) handed to gRPC on one client connection and not yet "
                                                 "read by the client; beyond, new calls on that connection get "
                                                 "RESOURCE_EXHAUSTED at once")
    write_timeout_s: float = Field(30.0, gt=0, le=3600, description="a connection whose unread answers have made no "
                                   "progress for this long gets RESOURCE_EXHAUSTED for new calls until it reads them "
                                   "(gRPC cannot end a unary call whose answer is written but not read; "
                                   "max_connection_age_s closes such connections); a ModelStreamInfer stream whose "
                                   "answer has waited this long is ended")
    model_instances: int = Field(2, ge=1, le=64, description="batches of one model that may compute at once, each "
                                 "on its own worker thread (like Triton's instance count; a batch cheaper than a "
                                 "hand-off to a thread runs on the event loop instead); on the CPU, with "
                                 "intra-op threads 0, each gets an equal share of the physical cores")
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads of each model instance (0: "
                                  "the physical cores shared out among the instances)")
    inter_op_threads: int = Field(0, ge=0, description="ONNX Runtime inter-op threads (0: its default)")
    metrics_host: str = Field("0.0.0.0", description="address of the Prometheus metrics endpoint")
    metrics_port: int = Field(8501, ge=-1, le=65535, description="Prometheus metrics port (0 picks a free one, -1 "
                              "disables); with several workers, worker i serves its own on this port + i")
    http_host: str = Field("0.0.0.0", description="address of the HTTP/REST endpoint (Open Inference Protocol, "
                           "classify, the page at /)")
    http_port: int = Field(8000, ge=-1, le=65535, description="HTTP/REST port, Triton's (0 picks a free one, -1 "
                           "disables); with several workers, they share it as they share the gRPC port")
    cors_origins: str = Field("", description="HTTP: comma-separated origins whose pages may call the API from a "
                              "browser (* for any; empty: CORS off)")
    http_max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="HTTP: largest request body, as sent "
                                     "(gRPC's max_message_bytes by default); a larger declared one gets 413 before it "
                                     "is read")
    http_max_decompressed_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="HTTP: largest request body "
                                             "after gzip or deflate Content-Encoding is undone; beyond, 413")
    http_header_timeout_s: float = Field(10.0, gt=0, le=3600, description="HTTP: time a connection has to send a "
                                         "request's headers once it is open or has sent its first byte; past it, "
                                         "the connection is closed (the body has receive_timeout_s)")
    http_keepalive_timeout_s: float = Field(75.0, gt=0, le=3600, description="HTTP: how long an idle connection "
                                            "is kept open between requests")
    http_max_connections: int = Field(1024, ge=1, description="HTTP: connections open at once; a connection "
                                      "beyond gets 503 for its request and is closed")
    versions_per_model: int = Field(1, ge=1, description="newest versions of each model kept loaded")
    poll_interval_s: float = Field(2.0, ge=0, description="how often to look for new model versions (0: never)")
    grace_period_s: float = Field(10.0, gt=0, description="on SIGTERM, after the drain delay: time allowed to answer "
                                  "accepted requests")
    drain_delay_s: float = Field(0.0, ge=0, description="on SIGTERM, how long to go on answering new requests while "
                                 "health says NOT_SERVING, so that load balancers and Kubernetes endpoints stop sending "
                                 "first; then new requests get UNAVAILABLE and accepted ones have grace_period_s")
    max_connection_age_s: float = Field(0.0, ge=0, description="close each client connection (HTTP/2 GOAWAY) after "
                                        "about this long, so that clients resolve the name again and reach replicas "
                                        "added since (0: never)")
    max_connection_age_grace_s: float = Field(5.0, ge=0, description="with max_connection_age_s: time that calls in "
                                              "progress on a connection past its age get to finish")
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="largest gRPC message accepted or sent")
    max_image_bytes: int = Field(16 * 1024 * 1024, ge=1, description="Classify encoded_images: most bytes of one "
                                 "encoded image")
    max_encoded_request_bytes: int = Field(16 * 1024 * 1024, ge=1, description="Classify encoded_images: most "
                                           "encoded bytes of one request, all its images together")
    max_image_pixels: int = Field(DEFAULT_MAX_IMAGE_PIXELS, ge=1, description="Classify encoded_images: most pixels "
                                  "(width × height, read from the file's header before decoding) of one image; "
                                  "decoding costs up to 4 bytes a pixel")
    decode_threads: int = Field(2, ge=1, le=64, description="threads decoding the Classify encoded_images of small plain "
                                "PNGs, off the event loop (each request's images decode together on one of them)")
    decode_processes: int = Field(2, ge=1, le=64, description="processes decoding Classify encoded_images (all but "
                                  "small plain PNGs, which decode on the threads); a decode past its time is "
                                  "stopped by killing its process, which is then replaced")
    decode_timeout_s: float = Field(10.0, gt=0, le=3600, description="Classify encoded_images: most time one "
                                    "request's images may take to decode (the caller's deadline, if sooner, wins); "
                                    "past it, the decode is killed and the call is INVALID_ARGUMENT")
    max_request_pixels: int = Field(500_000_000, ge=1, description="Classify encoded_images: most pixels (width × "
                                    "height, read from the headers before decoding) of one request, all its images "
                                    "together")
    workers: int = Field(1, ge=1, le=64, description="server processes sharing the port (SO_REUSEPORT)")
    tls_cert: Path | None = Field(None, description="server certificate PEM (turns on TLS)")
    tls_key: Path | None = Field(None, description="server private key PEM")
    tls_client_ca: Path | None = Field(None, description="CA PEM that client certificates must chain to (mutual TLS)")
    auth_token: SecretStr | None = Field(None, description="bearer token callers must send (health stays open)")
    allow_unverified: bool = Field(False, description="serve a model whose golden vectors do not match on this "
                                   "execution provider, with a warning, reported unverified")
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR")

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        DeviceRequest.parse(value)
        return value

    @field_validator("auth_token")
    @classmethod
    def _check_auth_token(cls, value: SecretStr | None) -> SecretStr | None:
        # Refused, not stripped: a token that callers could never send would start a server nobody can use.
        if value is not None:
            _check_token_characters(value.get_secret_value())
        return value

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        if value.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("log_level must be DEBUG, INFO, WARNING or ERROR")
        return value.upper()

    @model_validator(mode="after")
    def _check_worker_metrics_ports(self) -> ServerConfig:
        if self.metrics_port > 0 and self.metrics_port + self.workers - 1 > 65535:
            raise ValueError(f"{self.workers} workers need metrics ports {self.metrics_port}.."
                             f"{self.metrics_port + self.workers - 1}, past 65535")
        return self

    def for_worker(self, index: int) -> ServerConfig:
        """The configuration of worker ``index`` of several: its own metrics port, so that each can be scraped."""
        if self.metrics_port <= 0:
            return self
        return self.model_copy(update={"metrics_port": self.metrics_port + index})

    @model_validator(mode="after")
    def _check_tls(self) -> ServerConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca needs tls_cert and tls_key")
        return self

    @property
    def max_queue_delay_s(self) -> float:
        """The queue delay in seconds."""
        return self.max_queue_delay_us / 1e6


def _check_token_characters(token: str) -> None:
    """``ValueError`` unless a caller can send ``token`` as it is after ``Bearer``: not empty, no whitespace at
    either end (gRPC and HTTP/2 peers trim it, so it never arrives), only printable ASCII (what a gRPC metadata
    value can carry). The message names the position, never the token."""
    if not token.strip():
        raise ValueError("the auth token is empty; unset it to turn authentication off")
    if token != token.strip():
        raise ValueError("the auth token starts or ends with whitespace (a newline left by echo or a file?), which "
                         "no caller can send; remove it")
    for position, character in enumerate(token, 1):
        if not " " <= character <= "~":
            raise ValueError(f"the auth token holds U+{ord(character):04X} at character {position}; a gRPC "
                             "metadata value carries only printable ASCII, so no caller could send it")


def build_parser() -> argparse.ArgumentParser:
    """Flags for every config field; an unset flag leaves the field to its variable or default."""
    parser = argparse.ArgumentParser(
        prog="convserve-serve",
        description="Serve the models of a model repository over gRPC (Open Inference Protocol and "
        "convserve.v1.Classifier). Every flag can also be set as CONVSERVE_<NAME>.",
    )
    for name, field in ServerConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = "CONVSERVE_" + name.upper()
        default = field.default.get_secret_value() if isinstance(field.default, SecretStr) else field.default
        switch = {"nargs": "?", "const": "true"} if field.annotation is bool else {}  # bare --flag means true
        parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, metavar=name.upper(),
                            help=f"{field.description} [{env}; default {default}]", **switch)
    return parser


def load_config(argv: Sequence[str] | None = None, **overrides: Any) -> ServerConfig:
    """Parse flags over the environment; ``ValueError`` with one line per problem."""
    values = vars(build_parser().parse_args(argv))
    try:
        return ServerConfig(**{**values, **overrides})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
        raise ValueError(problems) from None
