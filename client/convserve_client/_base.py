"""What both clients share: their arguments, channel, stubs and settings."""

from __future__ import annotations

from types import ModuleType
from typing import Any, ClassVar, Literal, Sequence

import grpc

from convserve_client import _core, _wire
from convserve_client._inputs import DEFAULT_MAX_IMAGE_BYTES
from convserve_client.errors import ImageError
from convserve_client.preprocessing import ImageInput
from convserve_client.targets import channel_target
from convserve_client.types import Classification, ModelInfo, RetryPolicy

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024


class BaseClient:
    """The arguments, channel and settings of :class:`~convserve_client.Client` and
    :class:`~convserve_client.AsyncClient`, which add the I/O."""

    _grpc: ClassVar[ModuleType] = grpc
    """The module whose channels the client opens: ``grpc`` or ``grpc.aio``."""

    def __init__(
        self,
        address: str,
        *,
        model_name: str = "",
        model_version: str = "",
        timeout: float = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy = RetryPolicy(),
        max_in_flight: int = 4,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        preprocess: Literal["client", "server"] = "client",
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be an integer >= 1")
        if preprocess not in ("client", "server"):
            raise ValueError(f'preprocess must be "client" or "server", got {preprocess!r}')
        target = channel_target(address, channel_options)
        if credentials is None:
            self._channel = self._grpc.insecure_channel(target.target, options=list(target.options))
        else:
            self._channel = self._grpc.secure_channel(target.target, credentials, options=list(target.options))
        self._stubs = _core.stubs(self._channel)
        self._settings = _core.Settings(model_name, model_version, timeout, retry, max_request_bytes,
                                        max_image_bytes, preprocess)
        self._metadata = _wire.auth_metadata(token)
        self._max_in_flight = max_in_flight
        # With several replicas a call waits (within its deadline) for one to be ready rather than failing
        # at once while none is: during a rollout, the replicas it knows may all be draining before the
        # name resolves to the new ones.
        self._wait_for_ready = True if target.replicas else None
        self._state = _core.State()
        self._start_workers()

    def _start_workers(self) -> None:
        """Set up what runs a classify call's requests concurrently (a client with threads needs a pool)."""

    def _classify_plan(self, images: ImageInput | Sequence[ImageInput], top_k: int, include_probabilities: bool,
                       errors: Literal["raise", "return"], model_name: str | None,
                       model_version: str | None) -> _core.Plan[list[Classification | ImageError]]:
        return _core.classify(images, self._settings, self._state, self._settings.target(model_name, model_version),
                              _core.ClassifyOptions(top_k, include_probabilities, errors))

    def _model_info_plan(self, model_name: str | None, model_version: str | None,
                         refresh: bool) -> _core.Plan[ModelInfo]:
        if not isinstance(refresh, bool):
            raise TypeError(f"refresh must be True or False, got {refresh!r}")
        return _core.model_info(self._settings, self._state, self._settings.target(model_name, model_version), refresh)

    def _ready_plan(self, timeout: float, model_name: str | None, model_version: str | None) -> _core.Plan[None]:
        return _core.wait_until_ready(self._settings, self._settings.target(model_name, model_version), timeout)

    def _invoke(self, rpc: _core.Rpc) -> Any:
        """Start one call: its response (or, for ``grpc.aio``, an awaitable of it)."""
        return self._stubs[rpc.method](rpc.request, timeout=rpc.timeout, metadata=self._metadata,
                                       wait_for_ready=self._wait_for_ready)
