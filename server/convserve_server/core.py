"""The serving core: loaded models, their batchers, readiness, and the inference calls.

Nothing here knows gRPC; the servicers translate protobuf to these calls.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from convserve_protocol.preprocessing_spec import PreprocessingSpec
from convserve_protocol.repository import (
    VersionPath, folders_with_odd_names, is_version_name, links_out_of, scan_repository,
)
from convserve_server.shutdown_gate import ShutdownGate
from convserve_server.batcher import BatchObserver, DynamicBatcher
from convserve_server.config import ServerConfig
from convserve_server.errors import (
    InvalidInput, ModelLoadFailed, ModelNotFound, ModelNotReady, StartupError, quoted,
)
from convserve_server.limits import ConcurrencyLimit
from convserve_server.runtime import CPU, DeviceRequest, OnnxModel
from convserve_server.shutdown_gate import ShutdownGate
from convserve_server.statistics import VersionStatistics
from convserve_server.verification import Verification, VerificationFailed, verify

log = logging.getLogger(__name__)

ObserverFactory = Callable[[str], BatchObserver | None]
ReadinessListener = Callable[[bool], None]
"""Called with the new value of :attr:`InferenceCore.ready` each time it changes."""



class ServedVersion:
    """One loaded model version with its own batcher (and so its worker threads, one per model instance)."""

    def __init__(self, source: VersionPath, model: OnnxModel, config: ServerConfig, observer: BatchObserver | None):
        self.name = source.name
        self.version = source.version
        self.model = model
        self.statistics = VersionStatistics(forward_to=observer)
        self.batcher = DynamicBatcher(
            model.run,
            max_batch_size=config.max_batch_size,
            instances=config.model_instances,
            max_queue_delay_s=config.max_queue_delay_s,
            max_queue_size=config.max_queue_size,
            observer=self.statistics,
            name=f"model-{source.name}-{source.version}",
        )
        self._config = config
        self.verification = Verification(verified=False)

    @property
    def preprocessing(self) -> PreprocessingSpec:
        """How this version's images are preprocessed (its model card's spec)."""
        return self.model.card.preprocessing

    @property
    def ready(self) -> bool:
        """Warmed up, and its batcher takes requests (it is not closing and none of its workers died)."""
        return self.batcher.running

    async def warm_up(self) -> None:
        """Warm the model off the event loop, verify it on its provider (VerificationFailed), then open its
        batcher."""
        await asyncio.to_thread(self.model.warm_up, self._config.max_batch_size)
        self.verification = await asyncio.to_thread(verify, self.model, self.name, self.version,
                                                    self._config.allow_unverified)
        self.batcher.start()
        try:
            await self.batcher.calibrate(np.zeros((self._config.max_batch_size, *self.model.input_shape),
                                                  np.float32))
        except BaseException:
            await self.batcher.close()  # its instance threads stop with it
            raise
        log.info("model %s v%d ready on %s (%d instances), %s", self.name, self.version, self.model.provider,
                 self._config.model_instances, self.verification.summary())

    async def retire(self) -> None:
        """Answer what is queued, then stop the model's worker threads."""
        await self.batcher.close()


@dataclass(frozen=True)
class ModelConfiguration:
    """How a served version is set up: its tensors, and the batching and instances that serve it."""

    name: str
    version: int
    input_name: str
    input_shape: tuple[int, int, int]
    output_name: str
    num_classes: int
    on_gpu: bool
    max_batch_size: int
    max_queue_delay_us: int
    max_queue_size: int
    instances: int
    versions_kept: int


@dataclass(frozen=True)
class RepositoryEntry:
    """One model of the repository folder: a loaded version, or the newest on disk when none is loaded."""

    name: str
    version: int
    ready: bool
    reason: str


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
        # The model calls naming none get: --default-model, else the only model at startup, for good.
        self.default_model = config.default_model
        self._refused: dict[Path, FileSignature] = {}  # refused versions' files, as they were then
        self.load_failures: dict[tuple[str, str], int] = {}  # (model, "verification" or "load") -> versions refused
        self._unloaded: set[str] = set()  # unloaded on request: the poller leaves them alone until loaded again
        self._odd_names_reported: set[str] = set()  # folders not served for their name, each logged once
        self._changing = asyncio.Lock()  # one load, unload or poll at a time
        self.shutting_down = False  # not ready from here on; requests are still answered until the drain
        self.draining = False
        self.shutdown_gate = ShutdownGate()  # which calls may start work; the server closes it to drain
        self.admission = ConcurrencyLimit(config.max_concurrent_rpcs)  # calls in progress, of every front end
        self._readiness_listeners: list[ReadinessListener] = []
        self._reported_ready = False

    # --- loading -----------------------------------------------------------------------------

    def _load(self, source: VersionPath) -> ServedVersion:
        config = self._config
        model = OnnxModel.load(source.path, self._device, config.intra_op_threads, config.inter_op_threads,
                               config.model_instances)
        if model.card.model_name != source.name:
            log.warning("%s: card names model %r; serving it as %r", source.path, model.card.model_name, source.name)
        return ServedVersion(source, model, self._config, self._observer_factory(source.name))

    def load_all(self) -> None:
        """Load the newest versions of every model; StartupError if there is none or one is bad."""
        for link in links_out_of(self._config.model_repository):
            log.warning("%s is a link out of the model repository; ignored", link)
        found = self._read_repository()
        if not found:
            raise StartupError(f"model repository {self._config.model_repository}: no <name>/<version>/model.onnx in it")
        default = self._config.default_model or self._only_model(found)
        if default not in found:
            raise StartupError(f"--default-model {default}: no such model in {self._config.model_repository} "
                               f"(found {', '.join(found)})")
        for name, versions in found.items():
            keep = versions[-self._config.versions_per_model :]
            self._models[name] = {source.version: self._load(source) for source in keep}
        self.default_model = default

    def _only_model(self, found: dict[str, list[VersionPath]]) -> str:
        """The default model when none is named: the only one.  With several, which one would depend on the
        folders present at the moment of a restart, so the server refuses to start instead."""
        if len(found) > 1:
            raise StartupError(f"{len(found)} models in {self._config.model_repository} ({', '.join(found)}): name "
                               "the one calls naming none get with --default-model (CONVSERVE_DEFAULT_MODEL)")
        return next(iter(found))

    async def warm_up(self) -> None:
        """Warm every loaded version and open it for requests."""
        for versions in self._models.values():
            for served in versions.values():
                await served.warm_up()
        self._check_readiness()

    def on_readiness_change(self, listener: ReadinessListener) -> None:
        """Call ``listener(ready)`` on the event loop each time :attr:`ready` changes: after warm-up, a load,
        an unload, a poll or a rescan, and when shutdown begins (after which it never turns true again)."""
        self._readiness_listeners.append(listener)

    def _check_readiness(self) -> None:
        """Tell the listeners if :attr:`ready` is not what they were last told."""
        ready = self.ready
        if ready == self._reported_ready:
            return
        self._reported_ready = ready
        for listener in self._readiness_listeners:
            listener(ready)

    async def refresh(self) -> None:
        """Follow the repository: load new versions off to the side and swap them in, refuse bad ones (until
        their file changes), and stop serving versions deleted from disk.

        A deleted version is replaced before it is retired: if it was the newest, the newest version still on
        disk is loaded first, so that unversioned calls never find the model gone.  Models unloaded by
        :meth:`unload_model` are skipped until :meth:`load_model` names them again.
        """
        async with self._changing:
            found = await self._scan()
            if found is None:
                log.error("model repository %s is missing; serving what is loaded", self._config.model_repository)
                return
            for name, versions in found.items():
                if name in self._unloaded:
                    continue
                on_disk = {source.version for source in versions}
                for source in self._newer_than_served(name, versions):
                    if self._still_refused(source):
                        continue
                    try:
                        await self._load_and_swap_in(source, on_disk)
                    except ModelLoadFailed:  # a bad new version must never stop the old one serving (logged)
                        pass
            await self._retire_deleted(found)
            self._check_readiness()

    async def load_model(self, name: str) -> None:
        """Serve ``name`` from the repository, or pick up its new versions, without a restart.

        Like a poll, each new version is loaded and warmed off to the side before it is swapped in,
        so a bad one (ModelLoadFailed) leaves what is served untouched.  An explicit load retries a
        version the poller refused.  ModelNotFound if the repository has no such model.  A caller
        that gives up does not stop the load halfway.
        """
        if not name:
            raise InvalidInput("name the model to load")
        await asyncio.shield(self._load_model(name))

    async def _load_model(self, name: str) -> None:
        async with self._changing:
            if self.draining:
                raise ModelNotReady("server is draining; not loading models")
            versions = (await self._scan() or {}).get(name)
            if not versions:  # the caller's name quoted and cut short; the server's paths are not theirs to see
                raise ModelNotFound(f"no model {quoted(name)} in the model repository (expected "
                                    "<name>/<version>/model.onnx, the name letters, digits, _ . -)")
            self._unloaded.discard(name)
            on_disk = {source.version for source in versions}
            for source in self._newer_than_served(name, versions):
                self._refused.pop(source.path, None)
                await self._load_and_swap_in(source, on_disk)
                self._check_readiness()

    async def unload_model(self, name: str) -> None:
        """Stop serving ``name``: it answers NOT_FOUND at once, and queued requests are still answered.

        The poller leaves it alone until :meth:`load_model`.  Unloading a model of the repository
        that is not served is allowed (and keeps the poller off it); an unknown name is ModelNotFound.
        """
        if not name:
            raise InvalidInput("name the model to unload")
        await asyncio.shield(self._unload_model(name))

    async def _unload_model(self, name: str) -> None:
        async with self._changing:
            versions = self._models.pop(name, None)
            if versions is None and name not in (await self._scan() or {}):
                raise ModelNotFound(f"unknown model {quoted(name)}; served: {', '.join(self.model_names()) or 'none'}")
            self._unloaded.add(name)
            log.info("unloaded %s", name)
            self._check_readiness()  # before the queue is answered: balancers stop sending new calls now
            if versions:
                await asyncio.gather(*(served.retire() for served in versions.values()))

    async def _load_and_swap_in(self, source: VersionPath, on_disk: set[int]) -> None:
        """Load and warm one version beside what is served, then swap it in; ModelLoadFailed (and the
        version is refused by later polls) if it cannot be."""
        try:
            served = await asyncio.get_running_loop().run_in_executor(None, self._load, source)
            await served.warm_up()
        except Exception as exc:
            self._refused[source.path] = file_signature(source.path)
            reason = (source.name, "verification" if isinstance(exc, VerificationFailed) else "load")
            self.load_failures[reason] = self.load_failures.get(reason, 0) + 1
            log.error("refused %s v%d (%s): %s", source.name, source.version, source.path, exc)
            raise ModelLoadFailed(f"refused {source.name} v{source.version}: {self._without_paths(exc, source)}") from exc
        await self._swap_in(source.name, served, on_disk)

    def _without_paths(self, error: Exception, source: VersionPath) -> str:
        """An error's message for a caller: the model file named inside the repository, not where the
        repository is on the server."""
        text = str(error).replace(str(source.path), f"{source.name}/{source.version}/{source.path.name}")
        repository = self._config.model_repository
        for prefix in sorted({str(repository.resolve()), str(repository.absolute())}, key=len, reverse=True):
            text = text.replace(prefix, "<repository>")
        return text

    def _newer_than_served(self, name: str, versions: list[VersionPath]) -> list[VersionPath]:
        """Of the newest ``versions_per_model`` versions on disk, those newer than every served one still on disk
        (a served version deleted from disk does not count, so the newest one left gets loaded)."""
        on_disk = {source.version for source in versions}
        newest_served = max((version for version in self._models.get(name, {}) if version in on_disk), default=0)
        return [source for source in versions[-self._config.versions_per_model :] if source.version > newest_served]

    def _still_refused(self, source: VersionPath) -> bool:
        """Whether a version was refused and its file has not changed since (a half-written file is retried
        once it is complete)."""
        return source.path in self._refused and self._refused[source.path] == file_signature(source.path)

    async def _retire_deleted(self, found: dict[str, list[VersionPath]]) -> None:
        """Stop serving versions whose folder or file is gone, and models left with none."""
        for name in list(self._models):
            on_disk = {source.version for source in found.get(name, [])}
            for version in [version for version in self._models[name] if version not in on_disk]:
                retired = self._models[name].pop(version)
                log.warning("%s v%d was deleted from the repository; no longer serving it", name, version)
                await retired.retire()
            if not self._models[name]:
                del self._models[name]
                log.warning("model %s has no version left in the repository; no longer serving it", name)

    async def _swap_in(self, name: str, served: ServedVersion, on_disk: set[int]) -> None:
        versions = {**self._models.get(name, {}), served.version: served}
        keep = sorted(version for version in versions if version in on_disk)[-self._config.versions_per_model :]
        self._models[name] = {version: versions[version] for version in keep}
        log.info("now serving %s v%d (versions %s)", name, served.version, keep)
        for version, old in versions.items():
            if version not in keep:
                await old.retire()

    async def _scan(self) -> dict[str, list[VersionPath]] | None:
        """The repository's models and versions (None if its folder is missing), read on a worker thread: with
        many models, or on a network volume, a scan takes long enough to stall every request on the loop."""
        return await asyncio.to_thread(self._read_repository)

    def _read_repository(self) -> dict[str, list[VersionPath]] | None:
        """:func:`_scan_if_present`, logging each folder not served for its name once (escaped: a name may
        hold a newline or a NUL)."""
        for name in folders_with_odd_names(self._config.model_repository):
            if name not in self._odd_names_reported:
                self._odd_names_reported.add(name)
                log.warning("model folder %s is not a model name (letters, digits, _ . -, starting with a letter "
                            "or digit); not serving it", quoted(name))
        return _scan_if_present(self._config.model_repository)

    async def watch(self, interval_s: float) -> None:
        """Look for new versions every ``interval_s`` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.refresh()
            except Exception:
                log.exception("model repository poll failed")

    def begin_shutdown(self) -> None:
        """Report not ready from now on (ServerReady, ModelReady, the repository index), still answering
        requests until :meth:`drain`."""
        self.shutting_down = True
        self._check_readiness()

    async def drain(self) -> None:
        """Refuse new requests and answer every accepted one."""
        self.shutting_down = True
        self.draining = True
        await asyncio.gather(*(served.retire() for versions in self._models.values() for served in versions.values()))

    # --- lookup ------------------------------------------------------------------------------

    @property
    def max_batch_size(self) -> int:
        """Most images one model call takes; larger requests are split."""
        return self._config.max_batch_size

    @property
    def ready(self) -> bool:
        """Every model's newest version, the one unversioned calls get, is warmed, and the server is not
        shutting down."""
        return not self.shutting_down and bool(self._models) and all(
            versions[max(versions)].ready for versions in self._models.values()
        )

    def version_ready(self, served: ServedVersion) -> bool:
        """Whether a served version takes requests and the server is not shutting down."""
        return served.ready and not self.shutting_down

    def model_names(self) -> list[str]:
        """Names of the served models."""
        return sorted(self._models)

    def served_states(self) -> list[tuple[str, int, bool, bool]]:
        """(model, version, ready, verified) of each served version; read by the metrics endpoint's thread."""
        return [(name, version, self.version_ready(served), served.verification.verified)
                for name, versions in list(self._models.items()) for version, served in list(versions.items())]

    def serves(self, name: str) -> bool:
        """Whether ``name`` is a served model."""
        return name in self._models

    def versions(self, name: str) -> list[int]:
        """Loaded versions of one model, ascending."""
        return sorted(self._versions_of(name))

    def _versions_of(self, name: str) -> dict[int, ServedVersion]:
        if not name:
            if self.default_model not in self._models:
                raise ModelNotFound(f"the default model {self.default_model} is no longer served; name one of "
                                    f"{', '.join(self.model_names())}")
            return self._models[self.default_model]
        try:
            return self._models[name]
        except KeyError:
            raise ModelNotFound(f"unknown model {quoted(name)}; served: {', '.join(self.model_names()) or 'none'}") from None

    def loaded(self, name: str = "", version: str = "") -> list[ServedVersion]:
        """Every loaded version of every model (no name), of one model (no version), or one version."""
        if not name:
            return [served for model in self.model_names() for _, served in sorted(self._models[model].items())]
        if version:
            return [self.resolve(name, version)]
        return [served for _, served in sorted(self._versions_of(name).items())]

    def configuration(self, name: str, version: str = "") -> ModelConfiguration:
        """The setup of the named (or only) model at the named (or newest) version."""
        served = self.resolve(name, version)
        config = self._config
        return ModelConfiguration(
            name=served.name, version=served.version, input_name=served.model.card.input_name,
            input_shape=served.model.input_shape, output_name=served.model.card.output_name,
            num_classes=served.model.num_classes, on_gpu=served.model.provider != CPU,
            max_batch_size=config.max_batch_size, max_queue_delay_us=config.max_queue_delay_us,
            max_queue_size=config.max_queue_size, instances=config.model_instances,
            versions_kept=config.versions_per_model,
        )

    async def repository_index(self) -> list[RepositoryEntry]:
        """Each model in the repository folder (and any served one no longer there), by name: one entry per
        loaded version, or one for the newest version on disk saying why it is not served."""
        on_disk = await self._scan() or {}
        entries = []
        for name in sorted(set(on_disk) | set(self._models)):
            if name in self._models:
                for version, served in sorted(self._models[name].items()):
                    ready = self.version_ready(served)
                    reason = "" if ready else ("shutting down" if self.shutting_down else "warming up")
                    entries.append(RepositoryEntry(name, version, ready, reason))
                continue
            newest = on_disk[name][-1]
            if name in self._unloaded:
                reason = "unloaded"
            elif newest.path in self._refused:
                reason = "failed to load; see the server log"
            else:
                reason = "not loaded yet"
            entries.append(RepositoryEntry(name, newest.version, False, reason))
        return entries

    def resolve(self, name: str, version: str = "") -> ServedVersion:
        """The named (or default) model at the named (or newest) version."""
        versions = self._versions_of(name)
        if not version:
            return versions[max(versions)]
        if not is_version_name(version) or int(version) not in versions:
            raise ModelNotFound(f"model {name or 'default'} has no loaded version {quoted(version)}; "
                                f"loaded: {', '.join(map(str, sorted(versions)))}")
        return versions[int(version)]

    # --- inference ---------------------------------------------------------------------------

    async def infer(self, served: ServedVersion, images: np.ndarray, deadline: float | None) -> np.ndarray:
        """The model's output for a batch of preprocessed images, through its batcher: the tensor API.

        As in Triton, the values are the caller's business: NaN, infinity or huge pixels reach the model, and its
        output comes back as it is, non-finite values included (perf_analyzer's default random bytes are such).
        """
        return await self._run(served, images, deadline, require_finite=False)

    async def classify(
        self, served: ServedVersion, images: np.ndarray, top_k: int, deadline: float | None
    ) -> Classification:
        """Top-k labels per image from a resolved version (pinned, so a hot swap cannot change the class count).

        Labels ranked from NaN would be wrong answers, so here non-finite inputs and outputs are INVALID_ARGUMENT.
        """
        if not 1 <= top_k <= served.model.num_classes:
            raise InvalidInput(f"top_k must be between 1 and {served.model.num_classes}, got {top_k}")
        probabilities = await self._run(served, images, deadline, require_finite=True)
        top = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
        return Classification(top, np.take_along_axis(probabilities, top, axis=1), probabilities)

    async def _run(
        self, served: ServedVersion, images: np.ndarray, deadline: float | None, *, require_finite: bool
    ) -> np.ndarray:
        """Check, batch and run one request, counting it in the version's statistics as a success or a failure."""
        if self.draining:
            raise ModelNotReady("server is draining; not accepting new requests")
        if not served.ready:
            raise ModelNotReady(f"model {served.name} v{served.version} is not ready")
        started = time.monotonic()
        try:
            check_images(images, served.model.input_shape)
            if require_finite:
                check_finite_input(images)
            probabilities = await served.batcher.submit(images, deadline)
            if require_finite:
                check_finite_output(probabilities, images)
        except Exception:
            served.statistics.record_failure(time.monotonic() - started)
            raise
        served.statistics.record_success(time.monotonic() - started)
        return probabilities


def _scan_if_present(repository: Path) -> dict[str, list[VersionPath]] | None:
    """:func:`scan_repository`, or None if the repository folder is missing."""
    return scan_repository(repository) if repository.is_dir() else None


FileSignature = tuple[int, int, int] | None


def file_signature(path: Path) -> FileSignature:
    """What changes when a file is rewritten or replaced: inode, size, modification time (None if unreadable)."""
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_ino, status.st_size, status.st_mtime_ns


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


def check_finite_input(images: np.ndarray) -> None:
    """Refuse NaN and infinity, which no preprocessing produces; InvalidInput names the images."""
    if not np.isfinite(images).all():
        bad_rows = np.flatnonzero(~np.isfinite(images.reshape(len(images), -1)).all(axis=1))
        raise InvalidInput(f"images contain NaN or infinity: image(s) {_listed(bad_rows)}")


def _listed(rows: np.ndarray, most: int = 8) -> str:
    """Row indices for a message: the first ``most``, then an ellipsis."""
    return ", ".join(map(str, rows[:most])) + (", ..." if len(rows) > most else "")


def check_finite_output(probabilities: np.ndarray, images: np.ndarray) -> None:
    """Refuse to answer NaN: finite but huge inputs (3e38, say) overflow inside the model."""
    bad_rows = np.flatnonzero(~np.isfinite(probabilities).all(axis=1))
    if len(bad_rows):
        raise InvalidInput(f"the model's output is not finite for image(s) {_listed(bad_rows)}: their values (largest "
                           f"|x| {float(np.max(np.abs(images[bad_rows]))):.3g}) are far outside the range "
                           "preprocessing produces")


def element_count(shape: list[int] | tuple[int, ...]) -> int:
    """Number of elements a shape claims, after checking every dimension is positive."""
    if shape and min(shape) <= 0:
        raise InvalidInput(f"every dimension must be positive, got shape {list(shape)}")
    return math.prod(shape)
