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

    async def wait_until_ready(self, timeout: float = 30.0) -> None:
        """Wait until the server says its model is ready; ``DeadlineExceededError`` after ``timeout`` s."""
        await self._run(_core.wait_until_ready(self._settings, timeout))

    async def model_info(self, refresh: bool = False) -> ModelInfo:
        """The served model's labels, input size and preprocessing spec (remembered; see :meth:`classify`)."""
        return await self._run(_core.model_info(self._settings, self._state, refresh))

    async def classify(self, images: ImageInput | Sequence[ImageInput], *, top_k: int = 1,
                       include_probabilities: bool = False,
                       errors: Literal["raise", "return"] = "raise") -> list[Classification | ImageError]:
        """Classify images of any supported kind; see :meth:`convserve_client.Client.classify`."""
        return await self._run(self._classify_plan(images, top_k, include_probabilities, errors))

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
