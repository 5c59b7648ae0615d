"""``python -m convserve_training.samples DIR``: write sample images to classify.

The seed's two photos from scikit-learn's ``load_sample_images`` (JPEG) and
a few held-in digits (PNG), so a fresh install has something to send.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image
from sklearn.datasets import load_sample_images

from convserve_training.data import digits_as_uint8

DIGIT_SAMPLES = 3


def write_samples(directory: Path) -> list[Path]:
    """Write the sample images into ``directory``; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    samples = load_sample_images()
    for name, image in zip(samples.filenames, samples.images):
        written.append(directory / Path(name).name)
        Image.fromarray(image).save(written[-1])
    images, targets = digits_as_uint8()
    for i in range(DIGIT_SAMPLES):
        written.append(directory / f"digit-{targets[i]}.png")
        Image.fromarray(images[i]).save(written[-1])
    return written


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m convserve_training.samples DIR", file=sys.stderr)
        sys.exit(2)
    for path in write_samples(Path(sys.argv[1])):
        print(path)
