"""Building, starting and stopping the gRPC server around the core.

    server = await create_server(config)      # models loaded and checked, port bound
    await server.start()                      # listening; health NOT_SERVING until warmed, then SERVING
    ...
    await server.shutdown()                   # NOT_SERVING, answer for the drain delay, refuse new work,
                                              # answer accepted work, stop

Health service names: ``liveness`` is SERVING from the moment the server listens until it stops;
``readiness`` (and ``""`` and the two API services' names) follows ServerReady: SERVING once every model
is warm, NOT_SERVING while no model is served (the only one unloaded) and again SERVING when one is
loaded, and NOT_SERVING for good once shutdown begins.  Any other name is NOT_FOUND.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection

from convserve_protocol.protos import classifier_pb2, grpc_predict_v2_pb2
from convserve_server.admission import CallGuards, StreamDeadlines, UnsentAnswers
from convserve_server.auth import BearerTokenInterceptor
from convserve_server.config import ServerConfig
from convserve_server.core import InferenceCore
from convserve_server.errors import StartupError
from convserve_server.http.server import HttpFrontEnd
from convserve_server.exposure import warn_if_exposed
from convserve_server.images import ImageDecoder
from convserve_server.limits import PeerLimit
from convserve_server.memory import MemoryReleaser
from convserve_server.metrics import ServerMetrics
from convserve_server.ports import check_port_free
from convserve_server.servicers.classifier import ClassifierServicer
from convserve_server.servicers.inference import InferenceServicer
from convserve_server.servicers.registration import HEALTH_SERVICE, add_health_service, add_service

log = logging.getLogger(__name__)

INFERENCE_SERVICE = grpc_predict_v2_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
CLASSIFIER_SERVICE = classifier_pb2.DESCRIPTOR.services_by_name["Classifier"]
SERVICE_NAMES = (INFERENCE_SERVICE.full_name, CLASSIFIER_SERVICE.full_name)
LIVENESS = "liveness"
READINESS = "readiness"
READINESS_NAMES = ("", READINESS, *SERVICE_NAMES)
"""Health names that answer "warm and not draining"."""

# Clients of several replicas ping every second to notice a frozen one (convserve_client sends one a
# second); accepting a ping every 0.5 s leaves room for timer jitter before a ping counts as a strike.
MIN_CLIENT_PING_INTERVAL_MS = 500
MAX_PING_STRIKES = 2

# Shutdown (see ConvserveServer._stop_transport): how long no new call may arrive before the transport is
# stopped, the most time spent waiting for that, how long the GOAWAY gets to reach clients before held
# calls are refused, and the least time gRPC gets to flush the last replies.
SETTLE_QUIET_S = 0.2
MAX_SETTLE_S = 2.0
GOAWAY_PAUSE_S = 0.1
FLUSH_GRACE_S = 1.0


def _channel_options(config: ServerConfig) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_concurrent_streams", config.max_concurrent_streams),
    ]
    if config.workers > 1:
        options.append(("grpc.so_reuseport", 1))
    else:
        options.append(("grpc.so_reuseport", 0))  # a second server on a busy port must fail, not share it
    return options + _keepalive_options() + _connection_age_options(config)


def _keepalive_options() -> list[tuple[str, Any]]:
    """Let clients ping idle connections as often as once a second without being told to go away."""
    return [
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", MAX_PING_STRIKES),
    ]


def _connection_age_options(config: ServerConfig) -> list[tuple[str, Any]]:
    if config.max_connection_age_s <= 0:
        return []
    return [
        ("grpc.max_connection_age_ms", max(1, round(config.max_connection_age_s * 1000))),
        ("grpc.max_connection_age_grace_ms", round(config.max_connection_age_grace_s * 1000)),
    ]


def _call_guards(config: ServerConfig, releaser: MemoryReleaser) -> CallGuards:
    """Our own admission in place of gRPC's maximum_concurrent_rpcs, which open streams of any kind would fill."""
    return CallGuards(config.receive_timeout_s,
                      PeerLimit(config.max_watch_streams, config.max_watch_streams_per_peer),
                      PeerLimit(config.max_inference_streams, config.max_inference_streams_per_peer), releaser,
                      unsent=UnsentAnswers(config.max_unsent_bytes_per_connection, config.write_timeout_s),
                      stream_deadlines=StreamDeadlines(config.stream_idle_timeout_s, config.write_timeout_s))


def _server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    return grpc.ssl_server_credentials(
        [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())],
        root_certificates=config.tls_client_ca.read_bytes() if config.tls_client_ca else None,
        require_client_auth=config.tls_client_ca is not None,
    )


class ConvserveServer:
    """A gRPC server, its core, health and metrics; see the module docstring for its lifecycle."""

    def __init__(self, config: ServerConfig, core: InferenceCore, metrics: ServerMetrics | None) -> None:
        self.config = config
        self.core = core
        self.metrics = metrics
        self.health = health.aio.HealthServicer()
        releaser = MemoryReleaser()
        # No interceptor without a token: grpc.aio pays for one on every call, whatever it does.
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if config.auth_token is not None:
            interceptors.append(BearerTokenInterceptor(config.auth_token.get_secret_value(), releaser))
        guards = _call_guards(config, releaser)
        self._server = grpc.aio.server(options=_channel_options(config), interceptors=interceptors)
        add_service(self._server, INFERENCE_SERVICE, InferenceServicer(core, metrics), guards)
        self.decoder = ImageDecoder(config)
        add_service(self._server, CLASSIFIER_SERVICE, ClassifierServicer(core, metrics, self.decoder), guards)
        add_health_service(self._server, self.health, guards)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, HEALTH_SERVICE, reflection.SERVICE_NAME),
            self._server,
        )
        address = f"{config.host}:{config.port}"
        if config.workers == 1:  # workers bind beside their siblings; the parent checked the port for them
            check_port_free(config.host, config.port)
        credentials = _server_credentials(config)
        try:
            if credentials is None:
                self.port = self._server.add_insecure_port(address)
            else:
                self.port = self._server.add_secure_port(address, credentials)
        except RuntimeError as exc:  # grpcio's only word for a failed bind
            raise StartupError(f"cannot listen on {address}: port busy or host not this machine's") from exc
        self.metrics_port: int | None = None
        # HTTP/REST beside gRPC (docs/http.md): the same core, batcher, admission, gate, token and certificate.
        self.http = (HttpFrontEnd(config, core, metrics, self.decoder, core.admission)
                     if config.http_port >= 0 else None)
        self.http_port: int | None = self.http.port if self.http is not None else None
        self._watcher: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self._hurry = asyncio.Event()
        self._readiness_lock = asyncio.Lock()
        self._readiness_updates: set[asyncio.Task[None]] = set()
        core.on_readiness_change(self._on_readiness_change)

    def _on_readiness_change(self, ready: bool) -> None:
        task = asyncio.get_running_loop().create_task(self._publish_readiness())
        self._readiness_updates.add(task)
        task.add_done_callback(self._readiness_updates.discard)

    async def _publish_readiness(self) -> None:
        """Set the readiness names to what the core says now: SERVING if and only if ServerReady is true.

        Read under the lock rather than passed in, so that of several quick changes the last one is what
        stays; once shutdown has begun the core is never ready again, so NOT_SERVING wins.
        """
        async with self._readiness_lock:
            ready = self.core.ready
            for service in READINESS_NAMES:
                await self.health.set(service, health_pb2.HealthCheckResponse.SERVING if ready
                                      else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def start_listening(self) -> None:
        """Accept connections; ``liveness`` says SERVING, the rest NOT_SERVING until :meth:`warm_up` is done."""
        await self._publish_readiness()  # not warm yet: NOT_SERVING
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        await self._server.start()
        if self.http is not None:
            await self.http.start()
        if self.metrics is not None and self.config.metrics_port >= 0:
            self.metrics_port = self.metrics.serve_http(self.config.metrics_host, self.config.metrics_port)
        log.info("listening on %s:%d (%s)", self.config.host, self.port,
                 "metrics off" if self.metrics_port is None else f"metrics port {self.metrics_port}")
        warn_if_exposed(self.config, self.port, log, self.http_port)

    async def warm_up(self) -> None:
        """Warm every model, then report SERVING and start watching the repository."""
        await self.core.warm_up()
        await self._publish_readiness()
        if self.config.poll_interval_s > 0:
            self._watcher = asyncio.get_running_loop().create_task(self.core.watch(self.config.poll_interval_s))
        log.info("ready: serving %s", ", ".join(self.core.model_names()))

    async def start(self) -> None:
        """:meth:`start_listening`, then :meth:`warm_up`."""
        await self.start_listening()
        await self.warm_up()

    async def shutdown(self, grace_s: float | None = None, drain_delay_s: float | None = None) -> None:
        """Readiness NOT_SERVING; answer as before for the drain delay; then refuse new requests
        (UNAVAILABLE), answer accepted ones within the grace period, and stop.

        ``grace_s`` and ``drain_delay_s`` default to the config's; :meth:`hurry` ends the delay early.
        No call ends CANCELLED: each is answered, or refused with UNAVAILABLE before it did any work.
        """
        grace = self.config.grace_period_s if grace_s is None else grace_s
        delay = self.config.drain_delay_s if drain_delay_s is None else drain_delay_s
        self.core.begin_shutdown()
        await self._publish_readiness()  # NOT_SERVING from now on
        if self._watcher is not None:
            self._watcher.cancel()
        if delay > 0:
            log.info("not ready; still answering for the drain delay (%.1f s)", delay)
            await self._wait_for_hurry(delay)
        log.info("draining (grace %.1f s)", grace)
        deadline = asyncio.get_running_loop().time() + grace  # the process exits by then
        stop_time = min(GOAWAY_PAUSE_S + FLUSH_GRACE_S, grace / 2)  # kept for stopping gRPC
        await self._drain_accepted(deadline - stop_time)
        self.decoder.close()  # decodes still running now cannot end in time: killed, their callers get UNAVAILABLE
        await self._stop_transport(deadline - stop_time, deadline)
        if self.http is not None:  # its held calls were refused with gRPC's; answers in progress get what is left
            await self.http.stop(deadline - asyncio.get_running_loop().time())
        if self.metrics is not None:
            self.metrics.close()
        self._stopped.set()
        log.info("stopped")

    async def _drain_accepted(self, deadline: float) -> None:
        """Hold new calls, answer every queued request, and wait until every admitted handler has returned
        (its reply handed to gRPC), all by ``deadline``."""
        gate = self.core.shutdown_gate
        gate.close()
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(self.core.drain(), max(deadline - loop.time(), 0))
            await asyncio.wait_for(gate.wait_idle(), max(deadline - loop.time(), 0))
        except TimeoutError:
            log.error("grace period over with %d requests still in progress; they will be cancelled",
                      gate.in_flight)

    async def _stop_transport(self, settle_by: float, deadline: float) -> None:
        """Stop gRPC so that no caller sees CANCELLED (see :mod:`convserve_server.shutdown_gate`).

        gRPC cancels calls that reach it while it shuts down, before they reach a handler.  So: wait until
        new calls stop arriving (closed-loop callers are then all waiting on a held call and send no
        other), stop gRPC (it sends GOAWAY: clients open no new call on these connections), give the
        GOAWAY time to reach them, then refuse the held calls and let gRPC flush those replies.
        """
        gate = self.core.shutdown_gate
        loop = asyncio.get_running_loop()
        settle_by = min(settle_by, loop.time() + MAX_SETTLE_S)
        try:
            await asyncio.wait_for(gate.wait_settled(SETTLE_QUIET_S), max(settle_by - loop.time(), 0))
        except TimeoutError:
            log.warning("calls still arriving; stopping anyway")
        await self.health.enter_graceful_shutdown()
        held = gate.held
        remaining = max(deadline - loop.time(), 0)
        pause = min(GOAWAY_PAUSE_S, remaining / 2)
        # Long-lived calls (health Watch streams) are cancelled once the flush grace is over.
        stopping = loop.create_task(self._server.stop(grace=min(FLUSH_GRACE_S, remaining - pause)))
        await asyncio.sleep(pause)
        gate.release()
        log.info("refused %d calls held while draining", held)
        await stopping

    def hurry(self) -> None:
        """End a drain delay in progress now (a second stop signal)."""
        self._hurry.set()

    async def _wait_for_hurry(self, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self._hurry.wait(), timeout_s)
        except TimeoutError:
            pass

    @property
    def stopped(self) -> bool:
        """Whether :meth:`shutdown` has finished."""
        return self._stopped.is_set()

    async def wait_for_termination(self) -> None:
        """Return once :meth:`shutdown` has finished."""
        await self._stopped.wait()


async def create_server(config: ServerConfig) -> ConvserveServer:
    """Load and check every model (StartupError if one is bad), build the server and bind its port.

    With ``port=0`` a free port is chosen; read it from ``server.port``.
    """
    metrics = ServerMetrics(config.max_batch_size) if config.metrics_port >= 0 else None
    core = InferenceCore(config, metrics.batch_observer if metrics is not None else lambda name: None)
    if metrics is not None:
        metrics.watch_models(core.served_states, lambda: dict(core.load_failures))
    await asyncio.get_running_loop().run_in_executor(None, core.load_all)
    return ConvserveServer(config, core, metrics)
