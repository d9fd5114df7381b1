"""The Kaggle Flickr30k download: `results.csv` and the images it names, repaired where the file is malformed.

`results.csv` is `|`-delimited with the header `image_name| comment_number| comment`, values carrying leading
spaces, and one row of the real file lacks its second `|`. The download has no split: `karpathy_json` (the standard
`dataset_flickr30k.json`) gives one, or else `stable_split` does.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from datasets import DatasetDict

from .report import EMPTY_CAPTION, MISSING_IMAGE, NOT_IN_KARPATHY_SPLIT, UNPARSEABLE_ROW, DataReport
from .schema import caption_splits_from_files
from .splits import DEFAULT_TEST_FRACTION, DEFAULT_VALIDATION_FRACTION, stable_split, stable_split_note

KAGGLE_CAPTIONS_FILE = "results.csv"
KAGGLE_IMAGES_SUBFOLDER = "flickr30k_images"
KAGGLE_HEADER = ("image_name", "comment_number", "comment")
# A well-formed row: `1000092795.jpg| 0| Two young guys ...` (the comment itself may contain `|`).
_KAGGLE_ROW = re.compile(r"^\s*(?P<image_name>[^|\s][^|]*?)\s*\|\s*(?P<comment_number>\d+)\s*\|(?P<comment>.*)$")
# The row shape with the second `|` missing, as in the real file: `2199200615.jpg| 4   A dog runs across the grass .`
_KAGGLE_ROW_WITHOUT_SECOND_BAR = re.compile(
    r"^\s*(?P<image_name>[^|\s][^|]*?)\s*\|\s*(?P<comment_number>\d+)\s+(?P<comment>\S.*)$"
)

KARPATHY_SPLIT_NAMES = {"train": "train", "restval": "train", "val": "validation", "test": "test"}


def is_kaggle_flickr30k(root: Path) -> bool:
    """Whether `root` holds the Kaggle layout (`load_caption_dataset` asks before trying the imagefolder layout)."""
    return (root / KAGGLE_CAPTIONS_FILE).is_file()


def load_kaggle_flickr30k(
    root: str | Path,
    *,
    karpathy_json: str | Path | None = None,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    split_seed: int = 0,
) -> tuple[DatasetDict, DataReport]:
    """Read the Kaggle Flickr30k download: `root/results.csv` and its images (not yet checked for decoding errors).

    Rows missing their second `|` (the real file has one) are repaired; rows that still do not parse, have an empty
    comment or name an image that does not exist are skipped and counted in the report. Images are looked for in
    `root/flickr30k_images/` (the Kaggle archive) and then beside the csv. Captions always come from `results.csv`;
    `karpathy_json` only decides the split.
    """
    root = Path(root).absolute()  # the dataset keeps image paths: make them independent of the working directory
    csv_path = root / KAGGLE_CAPTIONS_FILE
    report = DataReport(source=str(root), layout="kaggle-flickr30k")
    rows = list(_parse_kaggle_rows(csv_path, report))
    images_dir, present = _find_kaggle_images(root, csv_path, {image_name for image_name, _, _ in rows})

    captions_by_image: dict[str, list[str]] = {}
    for image_name, caption, line_number in rows:
        if image_name not in present:
            report.record_skip(MISSING_IMAGE, f"{csv_path.name}:{line_number} {image_name}")
            continue
        captions_by_image.setdefault(image_name, []).append(caption)

    if karpathy_json:
        split_of = _karpathy_splits(Path(karpathy_json), captions_by_image, report)
    else:
        report.notes.append(stable_split_note(validation_fraction, test_fraction, split_seed))
        split_of = {
            image_name: stable_split(
                image_name, validation_fraction=validation_fraction, test_fraction=test_fraction, seed=split_seed
            )
            for image_name in captions_by_image
        }
    images_by_split: dict[str, dict[str, tuple[str, list[str]]]] = defaultdict(dict)
    for image_name, captions in captions_by_image.items():
        if image_name not in split_of:
            report.record_skip(NOT_IN_KARPATHY_SPLIT, image_name)
            continue
        images_by_split[split_of[image_name]][image_name] = (str(images_dir / image_name), captions)
    dataset_dict = caption_splits_from_files(images_by_split)
    report.record_split_sizes(dataset_dict)
    return dataset_dict, report


def _parse_kaggle_rows(csv_path: Path, report: DataReport) -> Iterable[tuple[str, str, int]]:
    """Yield `(image_name, caption, line_number)` for each usable row, recording repairs and skips."""
    with csv_path.open(encoding="utf-8-sig") as handle:
        header = handle.readline()
        if tuple(part.strip() for part in header.split("|")) != KAGGLE_HEADER:
            raise ValueError(
                f"{csv_path}: expected the header 'image_name| comment_number| comment', found {header.strip()!r}"
            )
        for line_number, line in enumerate(handle, start=2):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            where = f"{csv_path.name}:{line_number}"
            match = _KAGGLE_ROW.match(line)
            if match is None:
                match = _KAGGLE_ROW_WITHOUT_SECOND_BAR.match(line)
                if match is None:
                    report.record_skip(UNPARSEABLE_ROW, where)
                    continue
                report.repaired_rows.add(where)
            caption = match["comment"].strip()
            if not caption:
                report.record_skip(EMPTY_CAPTION, where)
                continue
            yield match["image_name"], caption, line_number


def _find_kaggle_images(root: Path, csv_path: Path, image_names: set[str]) -> tuple[Path, set[str]]:
    """The folder holding the images that `results.csv` names (`flickr30k_images/` first), and its file names."""
    candidates = [root / KAGGLE_IMAGES_SUBFOLDER, root]
    for candidate in candidates:
        if candidate.is_dir():
            present = {entry.name for entry in os.scandir(candidate) if entry.is_file()}
            if not present.isdisjoint(image_names):
                return candidate, present
    raise ValueError(
        f"{csv_path} names {len(image_names)} images, but none of them is in {candidates[0]} or {candidates[1]}"
    )


def _karpathy_splits(path: Path, wanted: Iterable[str], report: DataReport) -> dict[str, str]:
    """`{file name: our split}` from `dataset_flickr30k.json`; `restval` joins train."""
    with path.open(encoding="utf-8") as handle:
        content = json.load(handle)
    if not isinstance(content, dict) or not isinstance(content.get("images"), list):
        raise ValueError(f"{path}: expected a JSON object with an 'images' list (the Karpathy dataset_flickr30k.json)")
    split_of = {}
    for position, image in enumerate(content["images"]):
        split = image.get("split") if isinstance(image, dict) else None
        if split not in KARPATHY_SPLIT_NAMES or not isinstance(image.get("filename"), str):
            raise ValueError(
                f"{path}: images[{position}] needs a 'filename' and a 'split' among {list(KARPATHY_SPLIT_NAMES)}, "
                f"found {image!r:.200}"
            )
        split_of[image["filename"]] = KARPATHY_SPLIT_NAMES[split]
    absent = len(split_of.keys() - set(wanted))
    report.notes.append(f"split from {path.name} (restval joins train)")
    if absent:
        report.notes.append(f"{absent} images of {path.name} have no captions or image file here")
    return split_of
