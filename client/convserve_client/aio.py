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
        """The served model's labels, input size and preprocessing spec (cached)."""
        if self._info is None or refresh:
            self._info = await self._run(_core.model_info(self._settings))
        return self._info

    async def classify(self, images: ImageInput | Sequence[ImageInput], *, top_k: int = 1,
                       include_probabilities: bool = False,
                       errors: Literal["raise", "return"] = "raise") -> list[Classification | ImageError]:
        """Classify images of any supported kind; see :meth:`convserve_client.Client.classify`."""
        info = await self.model_info()
        job = _core.classify_job(info, images, self._settings, top_k, include_probabilities, errors)
        in_flight = asyncio.Semaphore(self._max_in_flight)

        async def run_chunk(plan: _core.Plan[list[Classification]]) -> list[Classification]:
            async with in_flight:
                return await self._run(plan)

        return job.results(await asyncio.gather(*(run_chunk(plan) for plan in job.chunk_plans())))

    async def _run(self, plan: _core.Plan[T]) -> T:
        run = _core.PlanRun(plan)
        for step in run:
            run.reply = await (asyncio.sleep(step.seconds) if isinstance(step, _core.Pause) else self._awaited_call(step))
        return run.result

    async def _awaited_call(self, rpc: _core.Rpc) -> Any:
        try:
            return await self._invoke(rpc)
        except grpc.RpcError as exc:
            return exc
