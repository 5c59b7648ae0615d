"""One ONNX model in ONNX Runtime: loading, device choice, checks, warm-up and runs.

``auto`` tries the CUDA execution provider and keeps it only if the session
really runs on it: ``onnxruntime-gpu`` lists CUDA even where its libraries
cannot load, and then quietly falls back to the CPU; and cuDNN loads only at
the first convolution, so a CUDA session runs the model once at load.  ``cuda``
treats either failure as a startup error naming the missing library; ``auto``
logs one warning and runs on the CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import logging
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

import numpy as np
import onnxruntime as ort

from convserve_protocol.model_card import ModelCard
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
    TF32 is off: it moves probabilities by up to about 2e-3 from the CPU's,
    and a model must answer the same on either device.
    """
    return {
        "device_id": str(device_id),
        "cudnn_conv_algo_search": "HEURISTIC",
        "use_tf32": "0",
        "arena_extend_strategy": "kSameAsRequested",
        "do_copy_in_default_stream": "1",
        "cudnn_conv_use_max_workspace": "1",
    }


# cuDNN 9's libraries, loaded one by one as operators first need them (the CUDA provider links only libcudnn.so.9).
_CUDNN_LIBRARIES = ("libcudnn.so.9", "libcudnn_graph.so.9", "libcudnn_ops.so.9", "libcudnn_cnn.so.9",
                    "libcudnn_engines_precompiled.so.9", "libcudnn_engines_runtime_compiled.so.9",
                    "libcudnn_heuristic.so.9")


@functools.cache
def _preload_cuda_libraries() -> None:
    """Load the CUDA and cuDNN libraries of NVIDIA's pip wheels (onnxruntime-gpu's ``cuda,cudnn`` extras), once.

    The CUDA provider finds those libraries only if they are loaded before its first session.
    ``onnxruntime.preload_dlls`` prints a "Failed to load" line for every one it misses, from Python
    and from C; what it writes goes to the debug log instead (the provider's own check says what matters).
    """
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    failure = ""
    with tempfile.TemporaryFile(mode="w+") as c_output, contextlib.redirect_stdout(io.StringIO()) as py_output, \
            contextlib.redirect_stderr(py_output), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with _file_descriptors_to(c_output):
            try:
                preload()
            except Exception as exc:  # what is missing shows when the provider loads; this only tried to help it
                failure = f"failed: {exc}"
        c_output.seek(0)
        said = "\n".join(text for text in (py_output.getvalue(), c_output.read(), failure) if text).strip()
    if said:
        log.debug("onnxruntime.preload_dlls: %s", " | ".join(said.splitlines()))


@contextlib.contextmanager
def _file_descriptors_to(file: IO[str]) -> Iterator[None]:
    """Point file descriptors 1 and 2 (what C code writes to) at ``file`` for the duration."""
    for stream in (sys.__stdout__, sys.__stderr__):
        if stream is not None:
            stream.flush()
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:  # no such descriptors: nothing to redirect
        yield
        return
    try:
        os.dup2(file.fileno(), 1)
        os.dup2(file.fileno(), 2)
        yield
    finally:
        for fd, copy in ((1, saved[0]), (2, saved[1])):
            os.dup2(copy, fd)
            os.close(copy)


def _missing_cuda_library() -> str | None:
    """Why the CUDA provider or cuDNN cannot load, as the dynamic loader says it (naming the library), or None.

    ONNX Runtime only logs this; asking the loader for the same libraries gets the reason back.
    """
    if not sys.platform.startswith("linux"):
        return None
    provider = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    for library in ([str(provider)] if provider.is_file() else []) + list(_CUDNN_LIBRARIES):
        try:
            ctypes.CDLL(library)
        except OSError as exc:
            return str(exc).splitlines()[0]
    return None


def first_run_error(session: ort.InferenceSession) -> str | None:
    """Run the model once on one input of zeros: None if it ran, else why not, in one line.

    A provider can load and still fail at the first operator that needs a library
    loaded lazily (cuDNN, at the first convolution); this makes that a load-time failure.
    """
    dtypes = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(uint8)": np.uint8}
    feeds = {}
    for tensor in session.get_inputs():
        if tensor.type not in dtypes:
            return None  # nothing sensible to feed; the signature check refuses such a model anyway
        shape = [dim if isinstance(dim, int) and dim > 0 else 1 for dim in tensor.shape]
        feeds[tensor.name] = np.zeros(shape, dtype=dtypes[tensor.type])
    run_options = ort.RunOptions()
    run_options.log_severity_level = 4  # the error comes back as an exception; ORT's own log line would repeat it
    try:
        session.run(None, feeds, run_options)
    except Exception as exc:  # ORT raises several unrelated types
        lines = str(exc).strip().splitlines()
        return lines[0] if lines else type(exc).__name__
    return None


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
            raise StartupError("--device cuda: this onnxruntime build has no CUDA execution provider "
                               "(install onnxruntime-gpu: the gpu extra, see docs/gpu.md)")
        return ort.InferenceSession(str(path), options, providers=[CPU])
    session, problem = _cuda_session(path, device, options)
    if session is not None:
        return session
    if device.kind == "cuda":
        raise StartupError(f"--device cuda:{device.device_id}: {problem}; not falling back to the CPU")
    log.warning("CUDA execution provider unusable, running on the CPU: %s", problem)
    return ort.InferenceSession(str(path), options, providers=[CPU])


def _cuda_session(
    path: Path, device: DeviceRequest, options: ort.SessionOptions,
) -> tuple[ort.InferenceSession | None, str]:
    """A session on the CUDA provider that has run the model once, or None and why not."""
    _preload_cuda_libraries()
    cpu_threads = options.intra_op_num_threads
    # The GPU computes; intra-op threads would only wait for it. (The session keeps its own copy of the options.)
    options.intra_op_num_threads = 1
    # ORT logs missing libraries and its quiet fallback to the CPU as errors; our one line says what happened.
    ort.set_default_logger_severity(4)
    try:
        session = ort.InferenceSession(str(path), options,
                                       providers=[(CUDA, cuda_provider_options(device.device_id)), CPU])
    finally:
        options.intra_op_num_threads = cpu_threads
        ort.set_default_logger_severity(2)
    if session.get_providers()[0] != CUDA:
        missing = _missing_cuda_library()
        return None, ("the CUDA execution provider failed to load: "
                      + (missing or "its libraries load, so no usable GPU? (see nvidia-smi)"))
    problem = first_run_error(session)
    if problem is not None:
        missing = _missing_cuda_library()
        return None, f"the model's first run on CUDA failed: {problem}" + (f" ({missing})" if missing else "")
    return session, ""


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
    for role, checked in (("input", tensor), ("output", output)):
        if checked.shape and isinstance(checked.shape[0], int) and checked.shape[0] > 0:
            raise StartupError(f"{path}: {role} {checked.name} has a fixed batch dimension of {checked.shape[0]} "
                               f"{checked.shape}; the server runs batches of up to --max-batch-size images, so "
                               "export it with a dynamic first axis")
    if output.shape[-1] != len(card.labels):
        raise StartupError(f"{path}: output has {output.shape[-1]} classes but the card lists {len(card.labels)} labels")
