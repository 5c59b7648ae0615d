"""``convserve-train``: train the seed CNN and export it into a model repository."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

_PROG = "convserve-train"


def build_parser() -> argparse.ArgumentParser:
    """The command line's arguments; defaults come from TrainingConfig."""
    from convserve_training.train import TrainingConfig

    defaults = TrainingConfig()
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Train the convserve CNN and export it to ONNX. With no arguments it trains "
        "on scikit-learn's bundled digits.",
    )
    parser.add_argument("--data-dir", type=Path, help="folder with one sub-folder of JPEG/PNG images per class")
    parser.add_argument("--model-repository", type=Path, default=defaults.model_repository,
                        help="model repository to write into (default %(default)s)")
    parser.add_argument("--model-name", default="",
                        help="model name (default: 'digits', or the --data-dir folder's name)")
    parser.add_argument("--height", type=int, default=defaults.height, help="input height (default %(default)s)")
    parser.add_argument("--width", type=int, default=defaults.width, help="input width (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="training epochs (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="default %(default)s")
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate, help="default %(default)s")
    parser.add_argument("--validation-fraction", type=float, default=defaults.validation_fraction,
                        help="default %(default)s")
    parser.add_argument("--test-fraction", type=float, default=defaults.test_fraction, help="default %(default)s")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="default %(default)s")
    parser.add_argument("--opset", type=int, default=defaults.opset, help="ONNX opset (default %(default)s)")
    parser.add_argument("--min-images-per-class", type=int, default=defaults.min_images_per_class,
                        help="default %(default)s")
    parser.add_argument("--golden-count", type=int, default=defaults.golden_count,
                        help="held-out images recorded in the model file as golden vectors (0: none; "
                        "default %(default)s)")
    parser.add_argument("--golden-tolerance", type=float, default=defaults.golden_tolerance,
                        help="largest absolute probability difference a server accepts on the golden vectors "
                        "(default %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no per-epoch progress")
    parser.add_argument("--skip-if-present", action="store_true",
                        help="do nothing if the repository already holds a version of this model")
    return parser


def _check(args: argparse.Namespace) -> str | None:
    if args.height < 8 or args.width < 8:
        return "--height and --width must be at least 8 (two 3x3 convolutions and two poolings)"
    if args.epochs < 1 or args.batch_size < 1:
        return "--epochs and --batch-size must be >= 1"
    if not (0 < args.validation_fraction < 1 and 0 < args.test_fraction < 1
            and args.validation_fraction + args.test_fraction < 1):
        return "--validation-fraction and --test-fraction must be in (0, 1) and sum to less than 1"
    if args.golden_count < 0 or not 0 < args.golden_tolerance < float("inf"):
        return "--golden-count must be >= 0 and --golden-tolerance positive"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status."""
    args = build_parser().parse_args(argv)
    problem = _check(args)
    if problem:
        print(f"{_PROG}: error: {problem}", file=sys.stderr)
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from convserve_training.errors import TrainingError
    from convserve_training.train import TrainingConfig, run_training

    config = TrainingConfig(
        model_repository=args.model_repository, model_name=args.model_name, data_dir=args.data_dir,
        height=args.height, width=args.width, epochs=args.epochs, batch_size=args.batch_size,
        learning_rate=args.learning_rate, validation_fraction=args.validation_fraction,
        test_fraction=args.test_fraction, seed=args.seed, opset=args.opset,
        min_images_per_class=args.min_images_per_class, golden_count=args.golden_count,
        golden_tolerance=args.golden_tolerance, verbose=0 if args.quiet else 2,
    )
    if args.skip_if_present:
        from convserve_training.repository import MODEL_FILENAME

        existing = sorted((args.model_repository / config.resolved_model_name()).glob(f"*/{MODEL_FILENAME}"))
        if existing:
            print(f"{existing[-1]} exists; not training (--skip-if-present)")
            return 0
    try:
        run_training(config)
    except TrainingError as exc:
        print(f"{_PROG}: error: {exc}", file=sys.stderr)
        return 1
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
