"""The serving core: loaded models, their batchers, readiness, and the inference calls.

Nothing here knows gRPC; the servicers translate protobuf to these calls.
"""

from __future__ import annotations

import asyncio
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from convserve_server.batcher import BatchObserver, DynamicBatcher
from convserve_server.config import ServerConfig
from convserve_server.errors import InvalidInput, ModelNotFound, ModelNotReady, StartupError
from convserve_server.repository import VersionPath, scan_repository
from convserve_server.runtime import CPU, DeviceRequest, OnnxModel
from convserve_server.verification import Verification, verify

log = logging.getLogger(__name__)

ObserverFactory = Callable[[str], BatchObserver | None]


class ServedVersion:
    """One loaded model version with its own batcher and worker threads (one per model instance)."""

    def __init__(self, source: VersionPath, model: OnnxModel, config: ServerConfig, observer: BatchObserver | None):
        self.name = source.name
        self.version = source.version
        self.model = model
        self.ready = False
        self._executor = ThreadPoolExecutor(max_workers=config.model_instances,
                                            thread_name_prefix=f"model-{source.name}-{source.version}")
        self.batcher = DynamicBatcher(
            model.run,
            self._executor,
            run_under_load=model.run_under_load,
            max_batch_size=config.max_batch_size,
            instances=config.model_instances,
            max_queue_delay_s=config.max_queue_delay_s,
            max_queue_size=config.max_queue_size,
            inline_budget_s=config.inline_budget_s if model.provider == CPU else 0.0,
            hold_under_load_s=config.hold_under_load_s,
            observer=observer,
        )
        self._config = config
        self.verification = Verification(verified=False)

    async def warm_up(self) -> None:
        """Warm the model on its worker thread, verify it there (VerificationFailed), then open its batcher."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.model.warm_up, self._config.max_batch_size)
        self.verification = await loop.run_in_executor(self._executor, verify, self.model, self.name, self.version,
                                                       self._config.allow_unverified)
        self.batcher.start()
        self.ready = True
        log.info("model %s v%d ready on %s (%d instances), %s", self.name, self.version, self.model.provider,
                 self._config.model_instances, self.verification.summary())

    async def retire(self) -> None:
        """Answer what is queued, then free the worker threads."""
        self.ready = False
        await self.batcher.close()
        self._executor.shutdown(wait=False)


@dataclass(frozen=True)
class Classification:
    """Top-k classes per image, and optionally every probability."""

    top_indices: np.ndarray
    top_scores: np.ndarray
    probabilities: np.ndarray


class InferenceCore:
    """All served models, by name and version."""

    def __init__(self, config: ServerConfig, observer_factory: ObserverFactory = lambda name: None) -> None:
        self._config = config
        self._device = DeviceRequest.parse(config.device)
        self._observer_factory = observer_factory
        self._models: dict[str, dict[int, ServedVersion]] = {}
        self._refused: set[Path] = set()
        self.draining = False

    # --- loading -----------------------------------------------------------------------------

    def _load(self, source: VersionPath) -> ServedVersion:
        config = self._config
        model = OnnxModel.load(source.path, self._device, config.intra_op_threads, config.inter_op_threads,
                               config.small_batch_rows, config.model_instances)
        if model.card.model_name != source.name:
            log.warning("%s: card names model %r; serving it as %r", source.path, model.card.model_name, source.name)
        return ServedVersion(source, model, self._config, self._observer_factory(source.name))

    def load_all(self) -> None:
        """Load the newest versions of every model; StartupError if there is none or one is bad."""
        found = scan_repository(self._config.model_repository)
        if not found:
            raise StartupError(f"model repository {self._config.model_repository}: no <name>/<version>/model.onnx in it")
        for name, versions in found.items():
            keep = versions[-self._config.versions_per_model :]
            self._models[name] = {source.version: self._load(source) for source in keep}

    async def warm_up(self) -> None:
        """Warm every loaded version and open it for requests."""
        for versions in self._models.values():
            for served in versions.values():
                await served.warm_up()

    async def refresh(self) -> None:
        """Load new versions found on disk off to the side, then swap them in; refuse bad ones."""
        loop = asyncio.get_running_loop()
        for name, versions in scan_repository(self._config.model_repository).items():
            current = self._models.get(name, {})
            newest_loaded = max(current, default=0)
            for source in versions:
                if source.version <= newest_loaded or source.path in self._refused:
                    continue
                try:
                    served = await loop.run_in_executor(None, self._load, source)
                    await served.warm_up()
                except Exception as exc:  # a bad new version must never stop the old one serving
                    self._refused.add(source.path)
                    log.error("refused %s v%d: %s", name, source.version, exc)
                    continue
                await self._swap_in(name, served)

    async def _swap_in(self, name: str, served: ServedVersion) -> None:
        versions = {**self._models.get(name, {}), served.version: served}
        keep = sorted(versions)[-self._config.versions_per_model :]
        self._models[name] = {version: versions[version] for version in keep}
        log.info("now serving %s v%d (versions %s)", name, served.version, keep)
        for version, old in versions.items():
            if version not in keep:
                await old.retire()

    async def watch(self, interval_s: float) -> None:
        """Look for new versions every ``interval_s`` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.refresh()
            except Exception:
                log.exception("model repository poll failed")

    async def drain(self) -> None:
        """Refuse new requests and answer every accepted one."""
        self.draining = True
        await asyncio.gather(*(served.retire() for versions in self._models.values() for served in versions.values()))

    # --- lookup ------------------------------------------------------------------------------

    @property
    def max_batch_size(self) -> int:
        """Most images one model call takes; larger requests are split."""
        return self._config.max_batch_size

    @property
    def ready(self) -> bool:
        """Every model has a warmed version and the server is not draining."""
        return not self.draining and bool(self._models) and all(
            any(served.ready for served in versions.values()) for versions in self._models.values()
        )

    def model_names(self) -> list[str]:
        """Names of the served models."""
        return sorted(self._models)

    def serves(self, name: str) -> bool:
        """Whether ``name`` is a served model."""
        return name in self._models

    @property
    def only_model(self) -> str | None:
        """The model's name when exactly one is served."""
        return next(iter(self._models)) if len(self._models) == 1 else None

    def versions(self, name: str) -> list[int]:
        """Loaded versions of one model, ascending."""
        return sorted(self._versions_of(name))

    def _versions_of(self, name: str) -> dict[int, ServedVersion]:
        if not name:
            if len(self._models) != 1:
                raise ModelNotFound(f"name a model; this server serves {', '.join(self.model_names())}")
            return next(iter(self._models.values()))
        try:
            return self._models[name]
        except KeyError:
            raise ModelNotFound(f"unknown model {name!r}; served: {', '.join(self.model_names())}") from None

    def resolve(self, name: str, version: str = "") -> ServedVersion:
        """The named (or only) model at the named (or newest) version."""
        versions = self._versions_of(name)
        if not version:
            return versions[max(versions)]
        if not (version.isascii() and version.isdigit()) or int(version) not in versions:
            raise ModelNotFound(f"model {name or 'default'} has no loaded version {version!r}; "
                                f"loaded: {', '.join(map(str, sorted(versions)))}")
        return versions[int(version)]

    # --- inference ---------------------------------------------------------------------------

    async def infer(self, served: ServedVersion, images: np.ndarray, deadline: float | None) -> np.ndarray:
        """Probabilities of a resolved version for a batch of preprocessed images, through its batcher."""
        if self.draining:
            raise ModelNotReady("server is draining; not accepting new requests")
        if not served.ready:
            raise ModelNotReady(f"model {served.name} v{served.version} is not ready")
        check_images(images, served.model.input_shape)
        return await served.batcher.submit(images, deadline)

    async def classify(
        self, served: ServedVersion, images: np.ndarray, top_k: int, deadline: float | None
    ) -> Classification:
        """Top-k labels per image from a resolved version (pinned, so a hot swap cannot change the class count)."""
        if not 1 <= top_k <= served.model.num_classes:
            raise InvalidInput(f"top_k must be between 1 and {served.model.num_classes}, got {top_k}")
        probabilities = await self.infer(served, images, deadline)
        top = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
        return Classification(top, np.take_along_axis(probabilities, top, axis=1), probabilities)


def check_images(images: np.ndarray, input_shape: tuple[int, int, int]) -> None:
    """Reject a batch the model cannot take: InvalidInput names the problem."""
    if images.ndim != 4 or tuple(images.shape[1:]) != input_shape:
        expected = "x".join(map(str, input_shape))
        raise InvalidInput(f"images must have shape (N, {', '.join(map(str, input_shape))}) [N×{expected}], "
                           f"got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise InvalidInput("empty batch: send at least one image")
    if images.dtype != np.float32:
        raise InvalidInput(f"images must be float32, got {images.dtype}")
    if not np.isfinite(images).all():
        raise InvalidInput("images contain NaN or infinity")


def element_count(shape: list[int] | tuple[int, ...]) -> int:
    """Number of elements a shape claims, after checking every dimension is positive."""
    if any(dim <= 0 for dim in shape):
        raise InvalidInput(f"every dimension must be positive, got shape {list(shape)}")
    return math.prod(shape)
