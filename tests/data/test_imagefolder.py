"""Tests of imgcap_hf.data.imagefolder: caption lists and rows merged, bad lines reported, missing splits carved."""

import json
from pathlib import Path

import pytest
from fixture_files import WIDE_SPLIT, truncate, write_image

from imgcap_hf.data import (
    EMPTY_CAPTION,
    MISSING_IMAGE,
    SPLITS,
    UNPARSEABLE_ROW,
    UNREADABLE_IMAGE,
    load_caption_dataset,
    stable_split,
)


def write_metadata(split_dir: Path, rows: list[dict | str]) -> None:
    split_dir.mkdir(parents=True, exist_ok=True)
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    (split_dir / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_imagefolder_with_caption_lists_and_a_val_folder(tmp_path):
    for split_folder, count in [("train", 3), ("val", 2), ("test", 2)]:
        for index in range(count):
            write_image(tmp_path / split_folder / "images" / f"{index}.png", seed=index, image_format="PNG")
        write_metadata(
            tmp_path / split_folder,
            [
                {
                    "file_name": f"images/{index}.png",
                    "captions": [f"{split_folder} {index} a", f"{split_folder} {index} b"],
                }
                for index in range(count)
            ],
        )

    dataset_dict, report = load_caption_dataset(str(tmp_path))

    assert dataset_dict["validation"]["image_id"][:] == ["val/images/0.png", "val/images/1.png"]
    assert dataset_dict["train"]["captions"][2] == ["train 2 a", "train 2 b"]
    assert report.images_per_split == {"train": 3, "validation": 2, "test": 2}
    assert report.captions_per_split == {"train": 6, "validation": 4, "test": 4}
    assert not report.skipped and report.layout == "imagefolder"
    assert dataset_dict["test"][1]["image"].size == (48, 48)


def test_imagefolder_merges_caption_rows_and_skips_bad_lines(tmp_path):
    for name in ["a.jpg", "b.jpg", "c.jpg"]:
        write_image(tmp_path / "train" / name, seed=len(name))
    truncate(tmp_path / "train" / "c.jpg")
    for split_folder in ["validation", "test"]:
        write_image(tmp_path / split_folder / "d.jpg", seed=9)
        write_metadata(tmp_path / split_folder, [{"file_name": "d.jpg", "text": "a picture"}])
    write_metadata(
        tmp_path / "train",
        [
            {"file_name": "a.jpg", "caption": "A dog ."},
            {"file_name": "b.jpg", "caption": "A cat ."},
            {"file_name": "a.jpg", "caption": "A brown dog ."},
            {"file_name": "a.jpg", "text": "A dog on grass ."},
            {"file_name": "b.jpg", "caption": "   "},
            {"file_name": "gone.jpg", "caption": "Never downloaded ."},
            '{"file_name": "a.jpg", "caption": ',
            {"file_name": "b.jpg", "captions": "not a list"},
            {"file_name": "c.jpg", "caption": "A truncated file ."},
        ],
    )

    dataset_dict, report = load_caption_dataset(str(tmp_path))

    train = dict(zip(dataset_dict["train"]["image_id"], dataset_dict["train"]["captions"]))
    assert train == {"train/a.jpg": ["A dog .", "A brown dog .", "A dog on grass ."], "train/b.jpg": ["A cat ."]}
    assert report.skipped[EMPTY_CAPTION].examples == ["train/metadata.jsonl:5"]
    assert report.skipped[MISSING_IMAGE].examples == ["train/metadata.jsonl:6 gone.jpg"]
    unparseable = report.skipped[UNPARSEABLE_ROW].examples
    assert unparseable[0].startswith("train/metadata.jsonl:7 (invalid JSON")
    assert unparseable[1] == "train/metadata.jsonl:8 ('captions' is not a list of strings)"
    assert (
        report.skipped[UNREADABLE_IMAGE].examples[0].startswith("train: train/c.jpg (OSError: image file is truncated")
    )
    assert report.images_per_split == {"train": 2, "validation": 1, "test": 1}


def test_imagefolder_with_only_train_carves_stable_validation_and_test_splits(tmp_path):
    names = [f"{index:03d}.jpg" for index in range(24)]
    for index, name in enumerate(names):
        write_image(tmp_path / "train" / name, seed=index, size=8)
    write_metadata(tmp_path / "train", [{"file_name": name, "captions": [f"caption of {name}"]} for name in names])

    dataset_dict, report = load_caption_dataset(str(tmp_path), split_seed=7, **WIDE_SPLIT)

    split_of = {image_id: split for split in SPLITS for image_id in dataset_dict[split]["image_id"]}
    assert sorted(split_of) == [f"train/{name}" for name in names]
    assert split_of == {f"train/{name}": stable_split(name, seed=7, **WIDE_SPLIT) for name in names}
    assert all(report.images_per_split[split] > 0 for split in SPLITS)
    assert any("no validation or test folder: carved out of train/" in note for note in report.notes)


def test_imagefolder_with_only_test_missing_keeps_its_validation_folder(tmp_path):
    names = [f"{index:03d}.jpg" for index in range(16)]
    for split_folder, split_names in [("train", names), ("validation", ["v.jpg"])]:
        for index, name in enumerate(split_names):
            write_image(tmp_path / split_folder / name, seed=index, size=8)
        write_metadata(tmp_path / split_folder, [{"file_name": name, "caption": "x"} for name in split_names])

    dataset_dict, report = load_caption_dataset(str(tmp_path), verify_images=False, **WIDE_SPLIT)

    assert dataset_dict["validation"]["image_id"][:] == ["validation/v.jpg"]
    carved_to_test = [
        name for name in names if stable_split(name, validation_fraction=0, test_fraction=0.25) == "test"
    ]
    assert dataset_dict["test"]["image_id"][:] == [f"train/{name}" for name in carved_to_test]
    assert any("no test folder" in note for note in report.notes)


def test_imagefolder_with_both_val_and_validation_folders_is_refused(tmp_path):
    for split_folder in ["train", "val", "validation"]:
        write_metadata(tmp_path / split_folder, [])
    with pytest.raises(ValueError, match="both validation/ and val/ exist"):
        load_caption_dataset(str(tmp_path))
