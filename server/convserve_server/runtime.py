"""One ONNX model in ONNX Runtime: loading, device choice, checks, warm-up and runs.

``auto`` tries the CUDA execution provider and keeps it only if the session
really runs on it: ``onnxruntime-gpu`` lists CUDA even where its libraries
cannot load, and then quietly falls back to the CPU.  ``cuda`` treats that
fallback as a startup error.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from convserve_client.model_card import ModelCard
from convserve_server.errors import StartupError

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class DeviceRequest:
    """What the operator asked for: ``auto``, ``cpu`` or ``cuda`` with a device id."""

    kind: str
    device_id: int = 0

    @classmethod
    def parse(cls, text: str) -> DeviceRequest:
        """``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
        kind, _, index = text.partition(":")
        if kind not in ("auto", "cpu", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {text!r}")
        return cls(kind, int(index or 0))


def cuda_provider_options(device_id: int) -> dict[str, str]:
    """CUDA provider options for a batch size that changes from call to call.

    EXHAUSTIVE cuDNN search would benchmark again for every new batch size
    on the request path; the heuristic choice is made once per shape, cheaply.
    Arena growth by what is asked keeps memory close to the largest batch.
    """
    return {
        "device_id": str(device_id),
        "cudnn_conv_algo_search": "HEURISTIC",
        "arena_extend_strategy": "kSameAsRequested",
        "do_copy_in_default_stream": "1",
        "cudnn_conv_use_max_workspace": "1",
    }


def _session_options(intra_op_threads: int, inter_op_threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.log_severity_level = 3  # ORT's own fallback warnings; we log our own line instead
    # Spinning worker threads would steal the cores gRPC and the event loop need between batches.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _create_session(path: Path, device: DeviceRequest, options: ort.SessionOptions) -> ort.InferenceSession:
    if device.kind == "cpu":
        return ort.InferenceSession(str(path), options, providers=[CPU])
    if CUDA not in ort.get_available_providers():
        if device.kind == "cuda":
            raise StartupError("--device cuda: this onnxruntime build has no CUDA execution provider")
        return ort.InferenceSession(str(path), options, providers=[CPU])
    providers: list[str | tuple[str, dict[str, str]]] = [(CUDA, cuda_provider_options(device.device_id)), CPU]
    if device.kind == "auto":
        # Probing CUDA on a CPU-only machine makes ORT print errors about missing libraries; our one
        # log line below says what happened instead.
        ort.set_default_logger_severity(4)
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    finally:
        ort.set_default_logger_severity(2)
    if session.get_providers()[0] != CUDA:
        if device.kind == "cuda":
            raise StartupError(
                f"--device cuda:{device.device_id}: the CUDA execution provider failed to load "
                "(are the CUDA and cuDNN libraries onnxruntime-gpu needs installed?); not falling back to the CPU"
            )
        log.info("CUDA execution provider unavailable; running on the CPU")
    return session


class OnnxModel:
    """A loaded, checked model version; ``run`` may be called from several threads at once (an ONNX Runtime
    session allows concurrent runs)."""

    def __init__(self, path: Path, session: ort.InferenceSession, card: ModelCard) -> None:
        self.path = path
        self.card = card
        self._session = session
        self.provider: str = session.get_providers()[0]
        self._input_name = card.input_name
        self._output_names = [card.output_name]

    @classmethod
    def load(
        cls, path: Path, device: DeviceRequest, intra_op_threads: int = 0, inter_op_threads: int = 0,
        instances: int = 1,
    ) -> OnnxModel:
        """Load and check a model file; :class:`StartupError` says in one line what is wrong.

        ``instances`` batches may run at once (one per model instance).  With
        ``intra_op_threads`` 0 and several instances, each run gets an equal share
        of the physical cores (see :func:`default_intra_op_threads`), so that
        instances computing at once do not oversubscribe the CPU.
        """
        if not path.is_file():
            raise StartupError(f"{path}: no such model file")
        options = _session_options(intra_op_threads or default_intra_op_threads(instances), inter_op_threads)
        try:
            session = _create_session(path, device, options)
        except StartupError:
            raise
        except Exception as exc:  # ORT raises several unrelated types for unreadable files
            raise StartupError(f"{path}: not a loadable ONNX model: {str(exc).splitlines()[0]}") from exc
        try:
            card = ModelCard.from_metadata(session.get_modelmeta().custom_metadata_map)
        except ValueError as exc:
            raise StartupError(f"{path}: {exc}") from exc
        _check_signature(path, session, card)
        model = cls(path, session, card)
        log.info("loaded %s (%s v%s, %d labels) on %s, %d intra-op threads", path, card.model_name,
                 card.model_version, len(card.labels), model.provider, model.intra_op_threads)
        return model

    @property
    def intra_op_threads(self) -> int:
        """Intra-op threads of each run (0: ONNX Runtime's default, one per physical core)."""
        return self._session.get_session_options().intra_op_num_threads

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(height, width, channels) of one image."""
        spec = self.card.preprocessing
        return spec.height, spec.width, spec.channels

    @property
    def num_classes(self) -> int:
        """Number of output columns."""
        return len(self.card.labels)

    def run(self, images: np.ndarray) -> np.ndarray:
        """Probabilities (N, num_classes) for a float32 (N, H, W, C) batch."""
        return self._session.run(self._output_names, {self._input_name: images})[0]

    def warm_up(self, max_batch_size: int) -> None:
        """Run batches of growing size so first requests pay no allocation or kernel-selection cost."""
        sizes = sorted({1, max_batch_size, *(2**i for i in range(1, max_batch_size.bit_length()) if 2**i < max_batch_size)})
        for size in sizes:
            self.run(np.zeros((size, *self.input_shape), dtype=np.float32))


def default_intra_op_threads(instances: int) -> int:
    """Intra-op threads per run when the operator sets none: ONNX Runtime's default (0, a thread per
    physical core) for one instance; for several, the physical cores shared out equally, one at least.

    Instances compute at once only under load, and then N runs of all cores each would make N times
    as many busy threads as cores, stalling each other at every operator's end whenever one loses its core.
    """
    return 0 if instances <= 1 else max(1, _usable_cores() // instances)


def _usable_cores() -> int:
    """Physical cores this process may run on, as ONNX Runtime counts them for its default thread pool.

    Hyperthread siblings share one core; where the topology is unreadable, every CPU counts.
    """
    cpus = os.sched_getaffinity(0)
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:
            return len(cpus)
    return len(cores)


def _check_signature(path: Path, session: ort.InferenceSession, card: ModelCard) -> None:
    inputs = {tensor.name: tensor for tensor in session.get_inputs()}
    outputs = {tensor.name: tensor for tensor in session.get_outputs()}
    spec = card.preprocessing
    tensor = inputs.get(card.input_name)
    if tensor is None or len(inputs) != 1:
        raise StartupError(f"{path}: expected exactly one input named {card.input_name!r}, found {sorted(inputs)}")
    if tensor.type != "tensor(float)" or list(tensor.shape[1:]) != [spec.height, spec.width, spec.channels]:
        raise StartupError(f"{path}: input {tensor.name} is {tensor.type} {tensor.shape}, "
                           f"expected float (N, {spec.height}, {spec.width}, {spec.channels})")
    output = outputs.get(card.output_name)
    if output is None:
        raise StartupError(f"{path}: no output named {card.output_name!r}, found {sorted(outputs)}")
    if output.shape[-1] != len(card.labels):
        raise StartupError(f"{path}: output has {output.shape[-1]} classes but the card lists {len(card.labels)} labels")
