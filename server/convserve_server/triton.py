"""Triton's forms of what the core knows, shared by the gRPC and HTTP front ends: the server's name and version,
the model configuration, statistics and repository index entries (as the protocol's messages, which HTTP writes
as JSON), classification strings and BYTES tensors, and the checks of a repository request."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version

import numpy as np

from convserve_protocol.protos import grpc_predict_v2_pb2 as pb
from convserve_protocol.repository import MODEL_FILENAME
from convserve_server.core import ModelConfiguration, RepositoryEntry, ServedVersion
from convserve_server.errors import InvalidInput, quoted
from convserve_server.statistics import Duration, VersionStatistics

SERVER_NAME = "convserve"
PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
FP32 = "FP32"
BYTES = "BYTES"
UINT32_MAX = 2**32 - 1
_MOST_PARAMETERS_NAMED = 4  # of a caller's unsupported repository parameters, in an error message


@functools.cache  # reading the installed distribution's metadata takes about half a millisecond
def server_version() -> str:
    """The installed convserve's version (``0+unknown`` when run from a source tree that is not installed)."""
    try:
        return version("convserve")
    except PackageNotFoundError:
        return "0+unknown"


def classifications(probabilities: np.ndarray, count: int, labels: Sequence[str]) -> list[bytes]:
    """Triton's classification strings, ``<value>:<index>:<label>``, the ``count`` highest per image, row by row."""
    top = np.argsort(-probabilities, axis=1, kind="stable")[:, :count]
    strings = []
    for row, indices in zip(probabilities, top):
        for index in indices:
            text = f"{row[index]:f}:{index}"
            strings.append((f"{text}:{labels[index]}" if index < len(labels) else text).encode())
    return strings


def bytes_tensor(elements: list[bytes]) -> bytes:
    """A BYTES tensor's raw contents: each element as a 4-byte little-endian length, then its bytes."""
    return b"".join(len(element).to_bytes(4, "little") + element for element in elements)


def model_config(setup: ModelConfiguration) -> pb.ModelConfig:
    """Triton's model configuration of a served model."""
    kind = pb.ModelInstanceGroup.KIND_GPU if setup.on_gpu else pb.ModelInstanceGroup.KIND_CPU
    return pb.ModelConfig(
        name=setup.name,
        platform=PLATFORM,
        backend=BACKEND,
        version_policy=pb.ModelVersionPolicy(latest=pb.ModelVersionPolicy.Latest(num_versions=setup.versions_kept)),
        max_batch_size=setup.max_batch_size,
        input=[pb.ModelInput(name=setup.input_name, data_type=pb.TYPE_FP32, format=pb.ModelInput.FORMAT_NHWC,
                             dims=list(setup.input_shape))],
        output=[pb.ModelOutput(name=setup.output_name, data_type=pb.TYPE_FP32, dims=[setup.num_classes])],
        dynamic_batching=pb.ModelDynamicBatching(
            max_queue_delay_microseconds=setup.max_queue_delay_us,
            default_queue_policy=pb.ModelQueuePolicy(max_queue_size=min(setup.max_queue_size, UINT32_MAX)),
        ),
        instance_group=[pb.ModelInstanceGroup(name=setup.name, kind=kind, count=setup.instances)],
        default_model_filename=MODEL_FILENAME,
    )


def _duration(duration: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=duration.count, ns=duration.ns)


def model_statistics(served: ServedVersion) -> pb.ModelStatistics:
    """Triton's statistics of one served version."""
    stats: VersionStatistics = served.statistics
    # No separate input or output copy step: the model call (compute_infer) holds both, so they take no time.
    nothing = pb.StatisticDuration(count=stats.compute_infer.count)
    return pb.ModelStatistics(
        name=served.name,
        version=str(served.version),
        last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(stats.success), fail=_duration(stats.fail), queue=_duration(stats.queue),
            compute_input=nothing, compute_infer=_duration(stats.compute_infer), compute_output=nothing,
        ),
        batch_stats=[
            pb.InferBatchStatistics(batch_size=rows, compute_input=pb.StatisticDuration(count=calls.count),
                                    compute_infer=_duration(calls),
                                    compute_output=pb.StatisticDuration(count=calls.count))
            for rows, calls in sorted(stats.batch_compute.items())
        ],
    )


def index_entry(entry: RepositoryEntry) -> pb.RepositoryIndexResponse.ModelIndex:
    """One model version of the repository index, with its state."""
    return pb.RepositoryIndexResponse.ModelIndex(name=entry.name, version=str(entry.version),
                                                 state="READY" if entry.ready else "UNAVAILABLE", reason=entry.reason)


def check_repository_request(repository_name: str, parameters: Mapping[str, object] | None = None,
                             accepted: frozenset[str] = frozenset()) -> None:
    """InvalidInput for a repository name (there is one repository) or a parameter not in ``accepted``."""
    if repository_name:
        raise InvalidInput(f"this server has one model repository; leave repository_name empty, "
                           f"got {quoted(repository_name)}")
    unsupported = sorted(set(parameters or ()) - accepted)
    if unsupported:
        shown = unsupported[:_MOST_PARAMETERS_NAMED]
        more = len(unsupported) - len(shown)
        named = ", ".join(map(quoted, shown)) + (f" and {more} more" if more else "")
        raise InvalidInput(f"repository parameters {named} are not supported: "
                           "a model's files and configuration come from the repository folder")
