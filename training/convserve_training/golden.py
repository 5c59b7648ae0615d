"""``convserve-golden``: add golden vectors to an existing ONNX model file (no TensorFlow needed).

    convserve-golden model.onnx images/ [--output new.onnx] [--count 8] [--tolerance 1e-4]

The images are preprocessed with the file's own card (its preprocessing spec,
through :mod:`convserve_client.preprocessing`), run through the file in ONNX
Runtime on the CPU, and a few of them, chosen to cover as many predicted
classes as possible, are recorded with those probabilities in the file's
metadata.  The file is replaced atomically (or a new one written), so a
server watching the repository never reads half of it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort

from convserve_client.errors import ImageError
from convserve_protocol.golden import DEFAULT_COUNT, DEFAULT_TOLERANCE, GOLDEN_KEY, GoldenVectors
from convserve_protocol.model_card import ModelCard
from convserve_client.preprocessing import ImageInput, preprocess_batch
from convserve_training.errors import TrainingError

log = logging.getLogger(__name__)

_PROG = "convserve-golden"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
"""File name endings read from the image folder (case-insensitive)."""


class GoldenError(TrainingError):
    """The model file or the images cannot give golden vectors."""


def select_covering(classes: np.ndarray, count: int) -> np.ndarray:
    """Indices of up to ``count`` items that cover as many classes as possible: round-robin over the classes.

    ``classes`` holds one class per item (true or predicted); within a class, items keep their order,
    so the choice is the same every time.
    """
    by_class = [np.flatnonzero(classes == value) for value in np.unique(classes)]
    chosen: list[int] = []
    for rank in range(max((len(items) for items in by_class), default=0)):
        for items in by_class:
            if rank < len(items) and len(chosen) < count:
                chosen.append(int(items[rank]))
    return np.asarray(sorted(chosen), dtype=np.int64)


def card_of(model: onnx.ModelProto, source: str) -> ModelCard:
    """The convserve model card in a loaded ONNX model; :class:`GoldenError` if it has none."""
    try:
        return ModelCard.from_metadata({prop.key: prop.value for prop in model.metadata_props})
    except ValueError as exc:
        raise GoldenError(f"{source}: no usable convserve model card ({exc})") from exc


def cpu_probabilities(model_bytes: bytes, card: ModelCard, inputs: np.ndarray) -> np.ndarray:
    """What the serialized model gives for preprocessed ``inputs`` in ONNX Runtime on the CPU."""
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return np.asarray(session.run([card.output_name], {card.input_name: inputs})[0], dtype=np.float32)


def golden_vectors_for(
    model: onnx.ModelProto, images: Sequence[ImageInput], count: int = DEFAULT_COUNT,
    tolerance: float = DEFAULT_TOLERANCE, source: str = "model",
) -> GoldenVectors:
    """Golden vectors for ``model`` from raw images: preprocessed by its card, probabilities from ONNX Runtime (CPU)."""
    if count < 1:
        raise GoldenError(f"count must be at least 1, got {count}")
    if not images:
        raise GoldenError("no images to make golden vectors from")
    card = card_of(model, source)
    try:
        inputs = preprocess_batch(list(images), card.preprocessing)
    except ImageError as exc:
        raise GoldenError(str(exc)) from exc
    probabilities = cpu_probabilities(model.SerializeToString(), card, inputs)
    chosen = select_covering(probabilities.argmax(axis=1), count)
    try:
        return GoldenVectors(inputs[chosen], probabilities[chosen], tolerance)
    except ValueError as exc:
        raise GoldenError(f"{source}: {exc}") from exc


def with_golden_vectors(model: onnx.ModelProto, golden: GoldenVectors) -> onnx.ModelProto:
    """A copy of ``model`` whose metadata holds ``golden`` (replacing any it held); the card is checked against it."""
    updated = onnx.ModelProto()
    updated.CopyFrom(model)
    kept = [prop for prop in updated.metadata_props if prop.key != GOLDEN_KEY]
    del updated.metadata_props[:]
    updated.metadata_props.extend(kept)
    for key, value in golden.to_metadata().items():
        updated.metadata_props.add(key=key, value=value)
    card_of(updated, "the updated model")  # the vectors must fit the card's input size and labels
    return updated


def image_files(folder: Path) -> list[Path]:
    """JPEG and PNG files in ``folder`` and its sub-folders, sorted; :class:`GoldenError` if there are none."""
    if not folder.is_dir():
        raise GoldenError(f"{folder}: no such directory")
    files = sorted(path for path in folder.rglob("*") if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise GoldenError(f"{folder}: no JPEG or PNG images in it")
    return files


def write_atomically(model: onnx.ModelProto, path: Path) -> None:
    """Write ``model`` to ``path`` through a temporary file in the same folder and one rename."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(model.SerializeToString())
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def add_golden_vectors(
    model_path: Path, images_dir: Path, output: Path | None = None, count: int = DEFAULT_COUNT,
    tolerance: float = DEFAULT_TOLERANCE,
) -> GoldenVectors:
    """Add golden vectors made from the images in ``images_dir`` to ``model_path`` (in place unless ``output``)."""
    if not model_path.is_file():
        raise GoldenError(f"{model_path}: no such model file")
    try:
        model = onnx.load(str(model_path))
    except Exception as exc:  # protobuf and onnx raise several unrelated types for a file that is not a model
        raise GoldenError(f"{model_path}: not a readable ONNX model ({type(exc).__name__})") from exc
    golden = golden_vectors_for(model, image_files(images_dir), count, tolerance, str(model_path))
    write_atomically(with_golden_vectors(model, golden), output or model_path)
    return golden


def build_parser() -> argparse.ArgumentParser:
    """The command line's arguments."""
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Add golden vectors to a convserve ONNX model file: a few of the given images, preprocessed "
        "with the file's own card, and the probabilities the file gives for them in ONNX Runtime on the CPU. "
        "A server then checks the file on its own execution provider before serving it.",
    )
    parser.add_argument("model", type=Path, help="the ONNX model file (it must carry a convserve model card)")
    parser.add_argument("images", type=Path, help="folder of JPEG/PNG images (sub-folders included)")
    parser.add_argument("--output", type=Path, help="write a new file here instead of replacing MODEL")
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT,
                        help="golden inputs to record, chosen to cover several classes (default %(default)s)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="largest absolute probability difference a server accepts (default %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        golden = add_golden_vectors(args.model, args.images, args.output, args.count, args.tolerance)
    except (TrainingError, OSError) as exc:
        print(f"{_PROG}: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {golden.count} golden vectors (tolerance {golden.tolerance:g}) to {args.output or args.model}")
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
