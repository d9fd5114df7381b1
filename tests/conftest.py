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


TINY_RESNET = {"model_type": "resnet", "depths": [1, 1, 1, 1], "hidden_sizes": [8, 16, 24, 32], "embedding_size": 8}
TINY_CAPTIONS = [
    "A man rides a bike down a street .",
    "A dog runs across the grass .",
    "Two children play in the snow .",
    "A woman in a red dress sings on a stage .",
]


def build_tiny_captioner(decoder_type: str = "attention", seed: int = 0):
    """A random tiny model and its processor (32 px images), consistent with each other."""
    import torch

    from imgcap_hf import (
        ImgCapConfig,
        ImgCapForConditionalGeneration,
        ImgCapImageProcessor,
        ImgCapProcessor,
        ImgCapTokenizer,
    )

    tokenizer = ImgCapTokenizer.from_captions(TINY_CAPTIONS, min_frequency=1)
    processor = ImgCapProcessor(ImgCapImageProcessor(crop_size=32, crop_pct=1.0), tokenizer)
    torch.manual_seed(seed)
    config = ImgCapConfig(
        vision_config=dict(TINY_RESNET), decoder_type=decoder_type, vocab_size=len(tokenizer), embedding_size=16,
        hidden_size=32, attention_size=16, image_head_size=24, region_grid_size=2, use_region_positions=True,
        dropout=0.0,
    )  # fmt: skip
    return ImgCapForConditionalGeneration(config).eval(), processor


@pytest.fixture(scope="session", params=["attention", "lstm"])
def saved_tiny_captioner(request, tmp_path_factory) -> Path:
    """A tiny captioner saved with `save_pretrained` (model + processor), one per decoder type."""
    model, processor = build_tiny_captioner(request.param)
    directory = tmp_path_factory.mktemp(f"tiny-{request.param}")
    model.generation_config.update(max_new_tokens=8, num_beams=2)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
