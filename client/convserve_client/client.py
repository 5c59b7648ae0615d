"""The blocking client: images in, labels out."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, Sequence, TypeVar

import grpc

from convserve_client import _core
from convserve_client._base import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_TIMEOUT_S, BaseClient
from convserve_client.errors import ImageError
from convserve_client.preprocessing import ImageInput
from convserve_client.types import Classification, ModelInfo

__all__ = ["DEFAULT_MAX_REQUEST_BYTES", "DEFAULT_TIMEOUT_S", "Client"]

T = TypeVar("T")


class Client(BaseClient):
    """A blocking client for a convserve server, or for several replicas of it.

    ``address`` is ``host:port``; several replicas as ``host:port,host:port``
    or ``dns:///name:port`` (``dns://DNS-SERVER/name:port``): calls then go
    round-robin to the replicas whose health says ready.
    ``timeout`` is each RPC's deadline in seconds, its retries included.
    ``max_in_flight`` bounds the requests one ``classify`` has open at once.
    ``credentials`` (``grpc.ssl_channel_credentials(...)``) turns on TLS;
    ``token`` sends a bearer token; ``channel_options`` go to the channel
    (over the SDK's own for several replicas).
    ``model_name`` and ``model_version`` choose the model every call gets
    unless it names its own (default: the server's default model, newest
    version).
    """

    _grpc = grpc

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel and the worker threads."""
        self._pool.shutdown(wait=True)
        self._channel.close()

    def wait_until_ready(self, timeout: float = 30.0, *, model_name: str | None = None,
                         model_version: str | None = None) -> None:
        """Block until the server says the model is ready; ``DeadlineExceededError`` after ``timeout`` s.

        ``model_name`` and ``model_version`` choose the model for this call (default: the client's).
        """
        self._run(self._ready_plan(timeout, model_name, model_version))

    def model_info(self, model_name: str | None = None, model_version: str | None = None, *,
                   refresh: bool = False) -> ModelInfo:
        """A model's name, version, labels, input size and preprocessing spec.

        ``model_name`` and ``model_version`` choose the model (default: the client's; ``""`` asks for the
        server's default model or newest version).  The answer is remembered per model and refreshed when
        ``refresh`` is true or when a call finds a newer version (see :meth:`classify`).
        """
        return self._run(self._model_info_plan(model_name, model_version, refresh))

    def classify(self, images: ImageInput | Sequence[ImageInput], *, top_k: int = 1,
                 include_probabilities: bool = False, errors: Literal["raise", "return"] = "raise",
                 model_name: str | None = None, model_version: str | None = None) -> list[Classification | ImageError]:
        """Classify images of any supported kind; results come back in input order.

        A single image (not in a list) is accepted too.  With ``errors="raise"``
        the first unreadable or undecodable image raises :class:`ImageError`;
        with ``"return"`` its slot holds the error and the rest are classified.
        ``model_name`` and ``model_version`` choose the model for this call
        (default: the client's).  Each result names the model and version that
        produced it.  When the model is swapped for a version that preprocesses
        differently, or replicas serve different versions, the images are
        preprocessed for the version that serves them (see docs/client.md).
        """
        return self._run(self._classify_plan(images, top_k, include_probabilities, errors, model_name, model_version))

    def _start_workers(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=self._max_in_flight, thread_name_prefix="convserve-client")

    def _run(self, plan: _core.Plan[T]) -> T:
        run = _core.PlanRun(plan)
        for step in run:
            run.reply = self._step(step)
        return run.result

    def _step(self, step: _core.Step) -> Any:
        if isinstance(step, _core.Pause):
            return time.sleep(step.seconds)
        if isinstance(step, _core.Parallel):
            if len(step.plans) == 1:  # in the caller's thread: threads sharing a client do not queue for its pool
                return [self._outcome(step.plans[0])]
            return list(self._pool.map(self._outcome, step.plans))
        try:
            return self._invoke(step)
        except grpc.RpcError as exc:
            return exc

    def _outcome(self, plan: _core.Plan[T]) -> T | Exception:
        try:
            return self._run(plan)
        except Exception as exc:  # handed to the plan that started it, which decides
            return exc
