"""The three splits every source returns, and the stable hash split for folders that bring none of their own.

A folder without a split file gets one from `stable_split`: each image's split follows from its name alone, so
adding images never moves existing ones between train and test, and the split is the same on every machine.
"""

from __future__ import annotations

import hashlib

SPLITS = ("train", "validation", "test")

# Fractions of the Karpathy split of Flickr30k (1,014 validation and 1,000 test images out of 31,783), used when a
# folder brings no split of its own.
DEFAULT_VALIDATION_FRACTION = 1014 / 31783
DEFAULT_TEST_FRACTION = 1000 / 31783


def check_split_fractions(validation_fraction: float, test_fraction: float) -> None:
    """Refuse fractions that `stable_split` cannot honour or that would leave no image for training."""
    if not (0 <= validation_fraction < 1 and 0 <= test_fraction < 1 and validation_fraction + test_fraction < 1):
        raise ValueError(
            "validation_fraction and test_fraction must lie in [0, 1) and leave images for training, got "
            f"{validation_fraction} and {test_fraction}"
        )


def stable_split(name: str, *, validation_fraction: float, test_fraction: float, seed: int = 0) -> str:
    """The split of an image, from the SHA-1 of `seed` and its name only.

    The digest maps the name to a number u in [0, 1): u < test_fraction goes to test, the next validation_fraction
    to validation, the rest to train. Nothing depends on the other files or their order, so adding or removing
    images never moves an existing image between splits, and the split is identical on every machine.
    """
    digest = hashlib.sha1(f"{seed}:{name}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    if position < test_fraction:
        return "test"
    if position < test_fraction + validation_fraction:
        return "validation"
    return "train"


def stable_split_note(validation_fraction: float, test_fraction: float, seed: int) -> str:
    """The `DataReport` note saying that, and with which fractions, a split was made by `stable_split`."""
    return (
        f"split by stable_split (sha1 of '{seed}:<file name>'): validation fraction {validation_fraction:.4f}, "
        f"test fraction {test_fraction:.4f}"
    )
