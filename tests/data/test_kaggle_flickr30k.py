"""Tests of imgcap_hf.data.kaggle_flickr30k: results.csv repaired, skipped rows reported, both splits honoured.

Every fixture is written here into tmp_path, with one defect of each kind the real download has or could have.
"""

import json
from pathlib import Path

import pytest
from fixture_files import WIDE_SPLIT, truncate, write_image

from imgcap_hf.data import (
    EMPTY_CAPTION,
    MISSING_IMAGE,
    NOT_IN_KARPATHY_SPLIT,
    SPLITS,
    UNPARSEABLE_ROW,
    UNREADABLE_IMAGE,
    load_caption_dataset,
    stable_split,
)

KAGGLE_IMAGES = [f"10{index:02d}.jpg" for index in range(12)]
REPAIRED_IMAGE = KAGGLE_IMAGES[3]  # its last row lacks the second "|", like 2199200615.jpg in the real file
EMPTY_CAPTION_IMAGE = KAGGLE_IMAGES[5]
TRUNCATED_IMAGE = KAGGLE_IMAGES[10]
NOT_AN_IMAGE = KAGGLE_IMAGES[11]


def write_kaggle_folder(root: Path, image_names: list[str], images_in_subfolder: bool = True) -> dict[str, int]:
    """Write results.csv as Kaggle does, with one defect of each kind; return the line numbers of the defects."""
    images_dir = root / "flickr30k_images" if images_in_subfolder else root
    for seed, name in enumerate(image_names):
        write_image(images_dir / name, seed)
    if TRUNCATED_IMAGE in image_names:
        truncate(images_dir / TRUNCATED_IMAGE)
    if NOT_AN_IMAGE in image_names:
        (images_dir / NOT_AN_IMAGE).write_text("this is a text file named .jpg\n")

    lines = ["image_name| comment_number| comment"]
    defects = {}
    for name in image_names:
        for number in range(5):
            if name == REPAIRED_IMAGE and number == 4:
                defects["repaired"] = len(lines) + 1
                lines.append(f"{name}| {number}   A dog runs across the grass .")
            elif name == EMPTY_CAPTION_IMAGE and number == 2:
                defects["empty"] = len(lines) + 1
                lines.append(f"{name}| {number}| ")
            else:
                lines.append(f"{name}| {number}| Caption {number} of picture {name} , with a | inside .")
    defects["missing"] = len(lines) + 1
    lines.append("404.jpg| 0| An image that was never downloaded .")
    defects["unparseable"] = len(lines) + 1
    lines.append("a line without any separator")
    (root / "results.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return defects


@pytest.mark.parametrize("images_in_subfolder", [True, False], ids=["flickr30k_images-subfolder", "beside-csv"])
def test_kaggle_folder_repairs_skips_and_reports_every_defect(tmp_path, images_in_subfolder):
    defects = write_kaggle_folder(tmp_path, KAGGLE_IMAGES, images_in_subfolder)

    dataset_dict, report = load_caption_dataset(str(tmp_path), **WIDE_SPLIT)

    rows = {row["image_id"]: row for split in SPLITS for row in dataset_dict[split]}
    assert sorted(rows) == sorted(set(KAGGLE_IMAGES) - {TRUNCATED_IMAGE, NOT_AN_IMAGE})
    assert rows[REPAIRED_IMAGE]["captions"][4] == "A dog runs across the grass ."
    assert len(rows[EMPTY_CAPTION_IMAGE]["captions"]) == 4
    assert rows[KAGGLE_IMAGES[0]]["captions"][1] == f"Caption 1 of picture {KAGGLE_IMAGES[0]} , with a | inside ."
    assert rows[KAGGLE_IMAGES[0]]["image"].size == (48, 48)

    assert report.layout == "kaggle-flickr30k"
    assert report.repaired_rows.count == 1 and report.repaired_rows.examples == [f"results.csv:{defects['repaired']}"]
    assert report.skipped[EMPTY_CAPTION].examples == [f"results.csv:{defects['empty']}"]
    assert report.skipped[MISSING_IMAGE].examples == [f"results.csv:{defects['missing']} 404.jpg"]
    assert report.skipped[UNPARSEABLE_ROW].examples == [f"results.csv:{defects['unparseable']}"]
    unreadable = report.skipped[UNREADABLE_IMAGE]
    assert unreadable.count == 2
    assert {example.split()[1] for example in unreadable.examples} == {TRUNCATED_IMAGE, NOT_AN_IMAGE}
    assert sum(report.images_per_split.values()) == 10
    assert sum(report.captions_per_split.values()) == 10 * 5 - 1
    assert json.loads(json.dumps(report.to_dict()))["skipped"][MISSING_IMAGE]["count"] == 1
    summary = str(report)
    assert "repaired 1" in summary and "unreadable_image" in summary and str(tmp_path) in summary


def test_kaggle_hash_split_is_stable_when_images_are_added(tmp_path):
    write_kaggle_folder(tmp_path / "small", KAGGLE_IMAGES[:8])
    write_kaggle_folder(tmp_path / "grown", KAGGLE_IMAGES[:8] + [f"20{index:02d}.jpg" for index in range(12)])

    def split_of_each_image(root: Path, **options) -> dict[str, str]:
        dataset_dict, _ = load_caption_dataset(str(root), verify_images=False, **WIDE_SPLIT, **options)
        return {image_id: split for split in SPLITS for image_id in dataset_dict[split]["image_id"]}

    small = split_of_each_image(tmp_path / "small")
    assert split_of_each_image(tmp_path / "small") == small
    assert set(small.values()) == set(SPLITS)
    assert small == {name: stable_split(name, seed=0, **WIDE_SPLIT) for name in small}
    grown = split_of_each_image(tmp_path / "grown")
    assert {name: grown[name] for name in small} == small
    assert split_of_each_image(tmp_path / "grown", split_seed=1) != grown


def test_kaggle_folder_follows_the_karpathy_split_file(tmp_path):
    names = KAGGLE_IMAGES[:8]
    write_kaggle_folder(tmp_path, names)
    karpathy_splits = ["train", "restval", "val", "test", "train", "val", "test"]  # names[7] is left out
    karpathy = {
        "dataset": "flickr30k",
        "images": [
            {"filename": name, "split": split, "sentences": [{"raw": "ignored"}]}
            for name, split in zip(names, karpathy_splits)
        ]
        + [{"filename": "only_in_json.jpg", "split": "test", "sentences": []}],
    }
    karpathy_path = tmp_path / "dataset_flickr30k.json"
    karpathy_path.write_text(json.dumps(karpathy))

    dataset_dict, report = load_caption_dataset(str(tmp_path), karpathy_json=str(karpathy_path))

    assert dataset_dict["train"]["image_id"][:] == [names[0], names[1], names[4]]
    assert dataset_dict["validation"]["image_id"][:] == [names[2], names[5]]
    assert dataset_dict["test"]["image_id"][:] == [names[3], names[6]]
    assert report.skipped[NOT_IN_KARPATHY_SPLIT].examples == [names[7]]
    assert any("1 images of dataset_flickr30k.json" in note for note in report.notes)


def test_kaggle_folder_with_a_wrong_header_or_a_broken_split_file_is_refused(tmp_path):
    write_kaggle_folder(tmp_path, KAGGLE_IMAGES[:2])
    broken_split = tmp_path / "split.json"
    broken_split.write_text(json.dumps({"images": [{"filename": KAGGLE_IMAGES[0], "split": "holdout"}]}))
    with pytest.raises(ValueError, match=r"images\[0\].*'holdout'"):
        load_caption_dataset(str(tmp_path), karpathy_json=str(broken_split))
    (tmp_path / "results.csv").write_text("image,caption\n1000.jpg,A dog .\n")
    with pytest.raises(ValueError, match="expected the header 'image_name\\| comment_number\\| comment'"):
        load_caption_dataset(str(tmp_path))
