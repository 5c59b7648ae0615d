"""``convserve-card``: give an ONNX file that convserve-train did not make the model card convserve serves by.

The card (labels, input size, preprocessing, tensor names) goes into the file's
``metadata_props`` under the ``convserve.`` keys that
:class:`~convserve_protocol.model_card.ModelCard` defines; other metadata is kept.
The input size and tensor names default to what the graph declares.  Needs no TensorFlow.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import onnx

from convserve_protocol.model_card import ModelCard
from convserve_protocol.preprocessing_spec import CROP_MODES, PreprocessingSpec

_PROG = "convserve-card"


class CardError(Exception):
    """The file or the flags cannot make a valid card; the message is one line."""


def build_parser() -> argparse.ArgumentParser:
    """The command's flags."""
    parser = argparse.ArgumentParser(prog=_PROG, description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("model", type=Path, help="the ONNX file (float32 input N×H×W×3, probabilities out)")
    parser.add_argument("--labels", required=True,
                        help="class labels in output-column order: comma-separated, or @FILE with one per line")
    parser.add_argument("--name", required=True, help="model name (the repository folder's name)")
    parser.add_argument("--version", default="1", help="model version recorded in the card [1]")
    parser.add_argument("--crop", choices=CROP_MODES, default=PreprocessingSpec.crop,
                        help=f"crop mode of the preprocessing the model was trained with [{PreprocessingSpec.crop}]")
    parser.add_argument("--scale", type=float, default=PreprocessingSpec.scale,
                        help="pixel multiplier after resizing [1/255]")
    parser.add_argument("--offset", type=float, default=PreprocessingSpec.offset, help="added after scaling [0]")
    parser.add_argument("--dataset", default="", help="what the model was trained on (informational)")
    parser.add_argument("--output", "-o", type=Path, help="write here instead of replacing MODEL")
    return parser


def parse_labels(text: str) -> tuple[str, ...]:
    """``a,b,c`` or ``@file`` (one label per line, blank lines skipped)."""
    if text.startswith("@"):
        try:
            lines = Path(text[1:]).read_text().splitlines()
        except OSError as exc:
            raise CardError(f"cannot read labels file {text[1:]}: {exc.strerror or exc}") from exc
        return tuple(line.strip() for line in lines if line.strip())
    return tuple(label.strip() for label in text.split(",") if label.strip())


def _static_dims(value_info: onnx.ValueInfoProto) -> list[int | None]:
    return [dim.dim_value if dim.HasField("dim_value") else None for dim in value_info.type.tensor_type.shape.dim]


def _check_batch_dimension(role: str, tensor: onnx.ValueInfoProto) -> None:
    """CardError if the tensor's first dimension is fixed: the server runs batches of up to --max-batch-size."""
    dims = _static_dims(tensor)
    if dims and dims[0] is not None:
        raise CardError(f"{role} {tensor.name!r} has a fixed batch dimension of {dims[0]} ({dims}); convserve runs "
                        f"batches of any size, so export it with a dynamic first axis (tf2onnx: input_signature "
                        f"with None; torch.onnx.export: dynamic_axes={{{tensor.name!r}: {{0: 'batch'}}}})")


def card_for(model: onnx.ModelProto, args: argparse.Namespace) -> ModelCard:
    """The card the flags describe, with input size and tensor names read from the graph."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    inputs = [tensor for tensor in model.graph.input if tensor.name not in initializers]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise CardError(f"the model must have exactly one input and one output, has {len(inputs)} and "
                        f"{len(model.graph.output)}")
    dims = _static_dims(inputs[0])
    if len(dims) != 4 or dims[1] is None or dims[2] is None or dims[3] != 3:
        raise CardError(f"input {inputs[0].name!r} must be N×H×W×3 with fixed H and W, is {dims}")
    _check_batch_dimension("input", inputs[0])
    _check_batch_dimension("output", model.graph.output[0])
    try:
        spec = PreprocessingSpec(height=dims[1], width=dims[2], crop=args.crop, scale=args.scale, offset=args.offset)
        return ModelCard(model_name=args.name, model_version=args.version, labels=parse_labels(args.labels),
                         preprocessing=spec, input_name=inputs[0].name, output_name=model.graph.output[0].name,
                         dataset=args.dataset)
    except ValueError as exc:
        raise CardError(str(exc)) from exc


def write_card(model: onnx.ModelProto, card: ModelCard, destination: Path) -> None:
    """Replace the file's ``convserve.`` metadata with ``card``, keep the rest, and write it atomically."""
    classes = _static_dims(model.graph.output[0])[-1:]
    if classes and classes[0] is not None and classes[0] != len(card.labels):
        raise CardError(f"the output has {classes[0]} classes but {len(card.labels)} labels were given")
    kept = {prop.key: prop.value for prop in model.metadata_props if prop.key not in card.to_metadata()}
    onnx.helper.set_model_props(model, {**kept, **card.to_metadata()})
    handle, temporary = tempfile.mkstemp(prefix=".card-", suffix=".onnx", dir=destination.parent)
    os.close(handle)
    try:
        onnx.save(model, temporary)
        os.replace(temporary, destination)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _load(path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(path)
    except OSError as exc:
        raise CardError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except Exception as exc:  # protobuf's DecodeError and onnx's own errors for files that are not ONNX
        raise CardError(f"{path} is not an ONNX model: {(str(exc).splitlines() or [type(exc).__name__])[0]}") from exc


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        model = _load(args.model)
        card = card_for(model, args)
        write_card(model, card, args.output or args.model)
    except CardError as exc:
        print(f"{_PROG}: error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.output or args.model}: card for {card.model_name} v{card.model_version}, "
          f"{len(card.labels)} labels, input {card.input_name} "
          f"{card.preprocessing.height}×{card.preprocessing.width}×3")
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
