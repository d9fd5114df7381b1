"""Image files and split fractions shared by the tests of the folder readers and the image check."""

from pathlib import Path

import numpy as np
from PIL import Image

# Large fractions so that a dozen images land in every split.
WIDE_SPLIT = {"validation_fraction": 0.25, "test_fraction": 0.25}


def write_image(path: Path, seed: int, size: int = 48, image_format: str = "JPEG") -> Path:
    """A small noise image (noise, so that JPEG data is long enough to be cut mid-scan)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=image_format)
    return path


def truncate(path: Path) -> None:
    """Cut a JPEG inside its pixel data: the header still opens, only a full decode fails."""
    content = path.read_bytes()
    path.write_bytes(content[: len(content) * 3 // 4])
