"""``convserve-train``: train the seed CNN and export it into a model repository.

The flags are generated from :class:`~convserve_training.config.TrainingConfig`.
TensorFlow is imported only once training really starts, so ``--help``,
argument errors and ``--skip-if-present`` answer in well under a second.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing
from pathlib import Path
from typing import Any, Sequence

from convserve_training.config import TrainingConfig
from convserve_training.tf_logging import quiet_tensorflow_cpp_logs

_PROG = "convserve-train"
_FLAG_TYPES: dict[Any, type] = {Path: Path, str: str, int: int, float: float}


def _flag_type(annotation: Any) -> type:
    """The argparse type of a config field: its own type, or the one non-None type of an ``X | None``."""
    if annotation in _FLAG_TYPES:
        return _FLAG_TYPES[annotation]
    choices = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if len(choices) == 1 and choices[0] in _FLAG_TYPES:
        return _FLAG_TYPES[choices[0]]
    raise TypeError(f"TrainingConfig field type {annotation!r} has no flag type")


def _shown(default: object) -> str:
    """A default as ``--help`` prints it."""
    if default is None:
        return "unset"
    return repr(default) if default == "" else str(default)


def build_parser() -> argparse.ArgumentParser:
    """A flag for every TrainingConfig field, plus ``--quiet`` and ``--skip-if-present``."""
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Train the convserve CNN and export it to ONNX. With no arguments it trains "
        "on scikit-learn's bundled digits.",
    )
    hints = typing.get_type_hints(TrainingConfig)
    for field in dataclasses.fields(TrainingConfig):
        flag_type = _flag_type(hints[field.name])
        parser.add_argument(
            "--" + field.name.replace("_", "-"), dest=field.name, type=flag_type, default=field.default,
            choices=field.metadata.get("choices"), metavar=None if "choices" in field.metadata else field.name.upper(),
            help=f"{field.metadata['help']} (default {_shown(field.default)})",
        )
    parser.add_argument("--quiet", action="store_true", help="no per-epoch progress (the same as --verbose 0)")
    parser.add_argument("--skip-if-present", action="store_true",
                        help="do nothing if the repository already holds a version of this model")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainingConfig:
    """The config the parsed flags describe; ``ValueError`` names a bad value."""
    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(TrainingConfig)}
    if args.quiet:
        values["verbose"] = 0
    return TrainingConfig(**values)


def present_model(config: TrainingConfig) -> Path | None:
    """The newest model file this run would add a version to, if any (staging folders do not count)."""
    from convserve_protocol.repository import model_versions

    versions = model_versions(config.model_repository / config.resolved_model_name())
    return versions[-1].path if versions else None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"{_PROG}: error: {exc}", file=sys.stderr)
        return 2
    if config.data_dir is not None and not config.data_dir.is_dir():  # answered before TensorFlow loads
        print(f"{_PROG}: error: --data-dir {config.data_dir}: no such directory", file=sys.stderr)
        return 1
    if args.skip_if_present:
        existing = present_model(config)
        if existing is not None:
            print(f"{existing} exists; not training (--skip-if-present)")
            return 0
    quiet_tensorflow_cpp_logs()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Imported here, not at the top: these load TensorFlow, which takes many seconds.
    from convserve_training.errors import TrainingError
    from convserve_training.train import run_training

    try:
        run_training(config)
    except TrainingError as exc:
        print(f"{_PROG}: error: {exc}", file=sys.stderr)
        return 1
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
