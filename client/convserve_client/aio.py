"""The asyncio client: the same calls as :class:`convserve_client.Client`, awaitable."""

from __future__ import annotations

import asyncio
from typing import Any, Literal, Sequence, TypeVar

import grpc
import grpc.aio

from convserve_client import _core
from convserve_client._base import BaseClient
from convserve_client.errors import ImageError
from convserve_client.preprocessing import ImageInput
from convserve_client.types import Classification, ModelInfo

T = TypeVar("T")


class AsyncClient(BaseClient):
    """An asyncio client for a convserve server or its replicas; arguments as for :class:`~convserve_client.Client`."""

    _grpc = grpc.aio

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()

    async def wait_until_ready(self, timeout: float = 30.0, *, model_name: str | None = None,
                               model_version: str | None = None) -> None:
        """Wait until the server says the model is ready; see :meth:`convserve_client.Client.wait_until_ready`."""
        await self._run(self._ready_plan(timeout, model_name, model_version))

    async def model_info(self, model_name: str | None = None, model_version: str | None = None, *,
                         refresh: bool = False) -> ModelInfo:
        """A model's description; see :meth:`convserve_client.Client.model_info`."""
        return await self._run(self._model_info_plan(model_name, model_version, refresh))

    async def classify(self, images: ImageInput | Sequence[ImageInput], *, top_k: int = 1,
                       include_probabilities: bool = False, errors: Literal["raise", "return"] = "raise",
                       model_name: str | None = None,
                       model_version: str | None = None) -> list[Classification | ImageError]:
        """Classify images of any supported kind; see :meth:`convserve_client.Client.classify`."""
        return await self._run(self._classify_plan(images, top_k, include_probabilities, errors, model_name,
                                                   model_version))

    async def _run(self, plan: _core.Plan[T]) -> T:
        run = _core.PlanRun(plan)
        for step in run:
            run.reply = await self._step(step)
        return run.result

    async def _step(self, step: _core.Step) -> Any:
        if isinstance(step, _core.Pause):
            return await asyncio.sleep(step.seconds)
        if isinstance(step, _core.Parallel):
            in_flight = asyncio.Semaphore(self._max_in_flight)
            return await asyncio.gather(*(self._outcome(plan, in_flight) for plan in step.plans))
        try:
            return await self._invoke(step)
        except grpc.RpcError as exc:
            return exc

    async def _outcome(self, plan: _core.Plan[T], in_flight: asyncio.Semaphore) -> T | Exception:
        async with in_flight:
            try:
                return await self._run(plan)
            except Exception as exc:  # handed to the plan that started it, which decides
                return exc
