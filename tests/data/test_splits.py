"""stable_split pinned to fixed answers: a change of hash, seed format or threshold order moves images between splits
(and so changes every published score of a folder without a split file), which must fail here, not go unnoticed."""

import pytest
from fixture_files import WIDE_SPLIT

from imgcap_hf.data import stable_split
from imgcap_hf.data.splits import DEFAULT_TEST_FRACTION, DEFAULT_VALIDATION_FRACTION

NAMES = [
    "1000092795.jpg", "10002456.jpg", "1000268201.jpg", "1000344755.jpg", "1000366164.jpg", "1000523639.jpg",
    "1000919630.jpg", "10010052.jpg", "1001465944.jpg", "1001545525.jpg", "1001573224.jpg", "1001633352.jpg",
]  # fmt: skip

# Computed once with the SHA-1 rule of imgcap_hf/data/splits.py and written down here.
PINNED = {
    0: ["validation", "validation", "test", "train", "validation", "train", "test", "train", "test", "validation",
        "validation", "test"],
    1: ["train", "validation", "test", "train", "test", "test", "test", "validation", "train", "test", "validation",
        "train"],
}  # fmt: skip


@pytest.mark.parametrize("seed", sorted(PINNED))
def test_stable_split_gives_the_pinned_split_of_each_name(seed):
    assert [stable_split(name, seed=seed, **WIDE_SPLIT) for name in NAMES] == PINNED[seed]


def test_stable_split_at_the_karpathy_fractions_is_pinned_too():
    fractions = {"validation_fraction": DEFAULT_VALIDATION_FRACTION, "test_fraction": DEFAULT_TEST_FRACTION}
    assert stable_split("1000022.jpg", **fractions) == "test"
    assert stable_split("1000034.jpg", **fractions) == "validation"
    assert [stable_split(name, **fractions) for name in NAMES] == ["train"] * len(NAMES)
