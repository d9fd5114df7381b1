"""Tests of imgcap_hf.data: the synthetic shapes set, the Kaggle and imagefolder layouts, and the Hub conversion.

Every fixture is written here into tmp_path; nothing needs the network.
"""

import hashlib
import io
import json
import re
from pathlib import Path

import datasets
import huggingface_hub
import numpy as np
import pytest
from datasets import Dataset
from PIL import Image

from imgcap_hf.data import (
    BACKGROUND_COLOURS,
    CAPTION_FEATURES,
    EMPTY_CAPTION,
    MISSING_IMAGE,
    NOT_IN_KARPATHY_SPLIT,
    SPLITS,
    UNPARSEABLE_ROW,
    UNREADABLE_IMAGE,
    DataReport,
    convert_hub_flickr30k,
    filter_unreadable_images,
    generate_shapes_scenes,
    load_caption_dataset,
    make_shapes_dataset,
    stable_split,
    write_shapes_examples,
)

SHAPES_ARGS = {"num_train": 60, "num_validation": 12, "num_test": 12, "image_size": 64, "seed": 3}
# Large fractions so that a dozen images land in every split.
WIDE_SPLIT = {"validation_fraction": 0.25, "test_fraction": 0.25}


def image_bytes(dataset: Dataset) -> list[bytes]:
    return [image["bytes"] for image in dataset.cast_column("image", datasets.Image(decode=False))["image"]]


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


# --------------------------------------------------------------------------------------------------------------------
# Synthetic shapes
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes() -> datasets.DatasetDict:
    return make_shapes_dataset(**SHAPES_ARGS)


def test_shapes_are_identical_to_the_byte_for_a_seed_and_differ_across_seeds(shapes):
    again = make_shapes_dataset(**SHAPES_ARGS)
    for split in SPLITS:
        assert image_bytes(again[split]) == image_bytes(shapes[split])
        assert again[split]["captions"][:] == shapes[split]["captions"][:]
        assert again[split]["image_id"][:] == shapes[split]["image_id"][:]
    other_seed = make_shapes_dataset(**{**SHAPES_ARGS, "seed": 4})
    assert image_bytes(other_seed["test"]) != image_bytes(shapes["test"])


def test_shapes_pixels_and_captions_match_the_pinned_digest():
    """Same seed, same data in every process and on every machine: no Python hash order, clock or global RNG.

    If the generator is changed on purpose, update the digest (models trained on the old shapes stay valid).
    """
    scenes = generate_shapes_scenes(num_train=5, num_validation=5, num_test=5, image_size=64, seed=0)
    digest = hashlib.sha1()
    for split in SPLITS:
        for scene in scenes[split]:
            digest.update(scene.image.tobytes())
            digest.update("|".join(scene.captions).encode())
    assert digest.hexdigest() == "8400b84ba1478712a51774ef069f09d7ddad395a"


def test_shapes_splits_have_the_asked_sizes_five_distinct_captions_and_the_shared_schema(shapes):
    assert {split: shapes[split].num_rows for split in SPLITS} == {"train": 60, "validation": 12, "test": 12}
    for split in SPLITS:
        assert shapes[split].features == CAPTION_FEATURES
        for captions in shapes[split]["captions"]:
            assert len(set(captions)) == 5
            assert all(caption == caption.lower() and caption.endswith(" .") for caption in captions)
    image = shapes["train"][0]["image"]
    assert isinstance(image, Image.Image) and image.size == (64, 64) and image.mode == "RGB"


def test_shapes_splits_share_no_image(shapes):
    fingerprints = [hashlib.sha1(content).hexdigest() for split in SPLITS for content in image_bytes(shapes[split])]
    assert len(set(fingerprints)) == len(fingerprints) == 84
    ids = [image_id for split in SPLITS for image_id in shapes[split]["image_id"]]
    assert len(set(ids)) == len(ids)


# What caption words mean, written here independently of the generator's tables. Positions are the shape centre
# as fractions of the image side, sizes the radius as a fraction of the side.
COLOUR_MEANING = {
    "red": lambda r, g, b: r > 150 and g < 100 and b < 100,
    "green": lambda r, g, b: g > 120 and r < 100 and b < 100,
    "blue": lambda r, g, b: b > 150 and r < 100 and g < 100,
    "yellow": lambda r, g, b: r > 200 and g > 150 and b < 100,
    "purple": lambda r, g, b: r > 100 and b > 100 and g < 100,
    "orange": lambda r, g, b: r > 200 and 80 < g < 180 and b < 80,
}
POSITION_MEANING = {
    "left": lambda x, y: x < 0.35,
    "right": lambda x, y: x > 0.65,
    "top": lambda x, y: y < 0.35,
    "bottom": lambda x, y: y > 0.65,
    "center": lambda x, y: 0.4 < x < 0.6 and 0.4 < y < 0.6,
    "middle": lambda x, y: 0.4 < x < 0.6 and 0.4 < y < 0.6,
}
SIZE_MEANING = {
    "small": lambda radius: radius < 0.11,
    "little": lambda radius: radius < 0.11,
    "large": lambda radius: radius > 0.15,
    "big": lambda radius: radius > 0.15,
}
RELATION_MEANING = {
    "to the left of": lambda subject, other: subject[0] < other[0],
    "to the right of": lambda subject, other: subject[0] > other[0],
    "above": lambda subject, other: subject[1] < other[1],
    "below": lambda subject, other: subject[1] > other[1],
}
RELATION_CAPTION = re.compile(
    r"(?:(\w+) )?(\w+) (\w+)(?: is)? (" + "|".join(RELATION_MEANING) + r") (?:a|an|the) (?:(\w+) )?(\w+) (\w+) \."
)


def kind_seen_in_pixels(image: Image.Image, background: str) -> str:
    """Tell the kind of a lone shape from its mask: how much of its bounding box it fills, and its outline."""
    pixels = np.asarray(image).astype(int)
    mask = np.any(pixels != BACKGROUND_COLOURS[background], axis=-1)
    rows, columns = np.nonzero(mask)
    box = mask[rows.min() : rows.max() + 1, columns.min() : columns.max() + 1]
    row_widths = box.sum(axis=1)
    if box.mean() > 0.9:
        return "square"
    if row_widths[0] < 0.5 * row_widths[-1]:
        return "triangle"
    return "cross" if box.mean() < 0.7 else "circle"


def test_shapes_captions_say_what_the_pixels_show(shapes):
    size = SHAPES_ARGS["image_size"]
    scenes = generate_shapes_scenes(**SHAPES_ARGS)
    counts = {"single": 0, "pair": 0, "relation captions": 0}
    for split in SPLITS:
        assert [list(scene.captions) for scene in scenes[split]] == shapes[split]["captions"][:]
        for scene in scenes[split]:
            pixels = np.asarray(scene.image)
            for shape in scene.shapes:
                x, y = (round(coordinate) for coordinate in shape.center)
                assert COLOUR_MEANING[shape.colour](*pixels[y, x].tolist()), (shape, pixels[y, x])
                assert SIZE_MEANING[shape.size](shape.radius / size), shape
                for caption in scene.captions:
                    assert f"{shape.colour} {shape.kind}" in caption, caption
            if len(scene.shapes) == 1:
                counts["single"] += 1
                (shape,) = scene.shapes
                assert kind_seen_in_pixels(scene.image, scene.background) == shape.kind
                centre = (shape.center[0] / size, shape.center[1] / size)
                for caption in scene.captions:
                    words = caption.split()
                    assert [word for word in words if word in POSITION_MEANING], caption
                    assert all(POSITION_MEANING[word](*centre) for word in words if word in POSITION_MEANING)
                    assert all(SIZE_MEANING[word](shape.radius / size) for word in words if word in SIZE_MEANING)
                continue
            counts["pair"] += 1
            first, second = scene.shapes
            axis = 0 if first.position == "left" else 1
            assert first.center[axis] + first.radius < second.center[axis] - second.radius  # apart, in this order
            by_name = {(shape.colour, shape.kind): shape for shape in scene.shapes}
            for caption in scene.captions:
                match = RELATION_CAPTION.search(caption)
                if match is None:
                    continue
                counts["relation captions"] += 1
                subject, other = by_name[match[2], match[3]], by_name[match[6], match[7]]
                assert subject is not other
                assert RELATION_MEANING[match[4]](subject.center, other.center), caption
                for size_word, shape in [(match[1], subject), (match[5], other)]:
                    assert size_word not in SIZE_MEANING or SIZE_MEANING[size_word](shape.radius / size), caption
    assert counts["single"] > 10 and counts["pair"] > 10 and counts["relation captions"] > 40


def test_write_shapes_examples_writes_the_first_test_images(tmp_path, shapes):
    paths = write_shapes_examples(tmp_path / "examples", count=3, image_size=64, seed=SHAPES_ARGS["seed"])
    assert [path.name for path in paths] == ["shapes_test_00.png", "shapes_test_01.png", "shapes_test_02.png"]
    assert [path.read_bytes() for path in paths] == image_bytes(shapes["test"])[:3]


def test_load_caption_dataset_makes_shapes_with_the_given_arguments():
    dataset_dict, report = load_caption_dataset(
        "shapes", shapes_kwargs={"num_train": 4, "num_validation": 2, "num_test": 3}
    )
    assert report.images_per_split == {"train": 4, "validation": 2, "test": 3}
    assert report.captions_per_split == {"train": 20, "validation": 10, "test": 15}
    assert dataset_dict["test"].num_rows == 3


def test_shapes_reject_impossible_arguments():
    with pytest.raises(ValueError, match="image_size"):
        make_shapes_dataset(image_size=16)
    with pytest.raises(ValueError, match="non-negative"):
        make_shapes_dataset(num_train=-1)


# --------------------------------------------------------------------------------------------------------------------
# Kaggle Flickr30k layout
# --------------------------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------------------------
# imagefolder layout
# --------------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------------
# Unreadable images, on any DatasetDict
# --------------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------------
# Hub copy of Flickr30k, and what is not a dataset
# --------------------------------------------------------------------------------------------------------------------


def hub_like_flickr30k(splits: list[str]) -> Dataset:
    """A tiny stand-in with the columns and types of nlphuji/flickr30k (refs/convert/parquet)."""
    return Dataset.from_dict(
        {
            "image": [Image.new("RGB", (6, 4), (index * 40, 0, 0)) for index in range(len(splits))],
            "caption": [
                [f"caption {sentence} of image {index}" for sentence in range(5)] for index in range(len(splits))
            ],
            "sentids": [[str(index * 5 + sentence) for sentence in range(5)] for index in range(len(splits))],
            "split": splits,
            "img_id": [str(index) for index in range(len(splits))],
            "filename": [f"{1000 + index}.jpg" for index in range(len(splits))],
        },
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "caption": datasets.List(datasets.Value("string")),
                "sentids": datasets.List(datasets.Value("string")),
                "split": datasets.Value("string"),
                "img_id": datasets.Value("string"),
                "filename": datasets.Value("string"),
            }
        ),
    )


def test_hub_flickr30k_is_resplit_by_its_split_column():
    dataset_dict = convert_hub_flickr30k(hub_like_flickr30k(["train", "val", "test", "train", "val"]))

    assert {split: dataset_dict[split]["image_id"][:] for split in SPLITS} == {
        "train": ["1000.jpg", "1003.jpg"],
        "validation": ["1001.jpg", "1004.jpg"],
        "test": ["1002.jpg"],
    }
    assert all(dataset_dict[split].features == CAPTION_FEATURES for split in SPLITS)
    third = dataset_dict["test"][0]
    assert third["captions"] == [f"caption {sentence} of image 2" for sentence in range(5)]
    assert third["image"].getpixel((0, 0)) == (80, 0, 0)


def test_hub_flickr30k_copies_with_other_columns_or_splits_are_refused():
    with pytest.raises(ValueError, match=r"lacks the columns \['caption'\]"):
        convert_hub_flickr30k(hub_like_flickr30k(["train"]).rename_column("caption", "alt_text"))
    with pytest.raises(ValueError, match="Row 1 .* 'dev'"):
        convert_hub_flickr30k(hub_like_flickr30k(["train", "dev"]))


@pytest.mark.skipif(not huggingface_hub.constants.HF_HUB_OFFLINE, reason="would download Flickr30k from the Hub")
def test_flickr30k_offline_names_the_local_alternatives(tmp_path):
    with pytest.raises(ConnectionError, match="Hub is unreachable") as raised:
        load_caption_dataset("flickr30k", cache_dir=str(tmp_path))
    assert "Kaggle" in str(raised.value) and "imagefolder" in str(raised.value)


def test_unknown_folders_and_names_say_what_was_expected(tmp_path):
    (tmp_path / "captions.txt").write_text("1000.jpg A dog .\n")
    with pytest.raises(ValueError) as raised:
        load_caption_dataset(str(tmp_path))
    message = str(raised.value)
    assert str(tmp_path) in message and "captions.txt" in message
    assert "results.csv" in message and "train/metadata.jsonl" in message and "'shapes'" in message
    with pytest.raises(ValueError, match="'coco'.*does not exist"):
        load_caption_dataset("coco")
    with pytest.raises(ValueError, match="karpathy_json applies to the Kaggle"):
        load_caption_dataset("shapes", karpathy_json="dataset_flickr30k.json")
    with pytest.raises(ValueError, match="validation_fraction and test_fraction"):
        load_caption_dataset(str(tmp_path), validation_fraction=0.6, test_fraction=0.5)
