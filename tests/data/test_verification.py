"""Tests of imgcap_hf.data.verification: exactly the images that fail to decode are dropped, and reported."""

import io

import datasets
from datasets import Dataset
from fixture_files import truncate, write_image
from PIL import Image

from imgcap_hf.data import CAPTION_FEATURES, UNREADABLE_IMAGE, DataReport, filter_unreadable_images


def test_filter_unreadable_images_drops_exactly_the_images_that_fail_to_decode(tmp_path):
    good = write_image(tmp_path / "good.jpg", seed=1)
    truncated = write_image(tmp_path / "truncated.jpg", seed=2)
    truncate(truncated)
    png = io.BytesIO()
    Image.new("RGBA", (4, 4)).save(png, format="PNG")
    dataset = Dataset.from_dict(
        {
            "image_id": ["good", "truncated", "in-memory-png", "garbage-bytes"],
            "image": [
                str(good),
                str(truncated),
                {"bytes": png.getvalue(), "path": None},
                {"bytes": b"\x89PNG junk", "path": None},
            ],
            "captions": [["a"], ["b"], ["c", "d"], ["e"]],
        },
        features=CAPTION_FEATURES,
    )
    report = DataReport(source="test", layout="test")

    filtered = filter_unreadable_images(
        datasets.DatasetDict({"train": dataset, "validation": dataset.select([])}), report, num_proc=2
    )

    assert filtered["train"]["image_id"][:] == ["good", "in-memory-png"]
    assert filtered["train"].features == CAPTION_FEATURES
    assert [example.split()[1] for example in report.skipped[UNREADABLE_IMAGE].examples] == [
        "truncated",
        "garbage-bytes",
    ]
    assert report.images_per_split == {"train": 2, "validation": 0}
    assert report.captions_per_split == {"train": 3, "validation": 0}
