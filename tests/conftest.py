"""Shared test set-up: everything offline, seeded, and tiny."""

import os
from pathlib import Path

# Set before transformers/datasets/evaluate are imported by any test module.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_CAPTIONS = REPO_ROOT.parent / "shared" / "data" / "flickr30k_captions_sample.csv"


@pytest.fixture(scope="session")
def flickr_captions() -> list[str]:
    """Real Flickr30k captions from ../shared (absent for users: the tests that need it skip)."""
    if not SHARED_CAPTIONS.is_file():
        pytest.skip(f"{SHARED_CAPTIONS} not present")
    import csv

    with SHARED_CAPTIONS.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, skipinitialspace=True))
    return [row["comment"].strip() for row in rows if row.get("comment")]
