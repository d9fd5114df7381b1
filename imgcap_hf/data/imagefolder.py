"""Captioned images in split folders (`train/`, `validation/` or `val/`, `test/`), each with a `metadata.jsonl`.

This is the layout of datasets' `imagefolder` builder, with one caption list per image. We read `metadata.jsonl`
ourselves rather than through `load_dataset("imagefolder")`: datasets keeps one row per metadata line (no merging
of `caption` rows), keeps lines naming missing files (which then fail when decoded, mid-epoch), gives bad lines no
line numbers, also takes `dev/`, `eval/` or `training/` as split folders, and writes an Arrow copy of the data into
its cache. Building the Dataset from paths stores no image bytes at all.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from datasets import DatasetDict

from .report import EMPTY_CAPTION, MISSING_IMAGE, UNPARSEABLE_ROW, DataReport
from .schema import caption_splits_from_files
from .splits import DEFAULT_TEST_FRACTION, DEFAULT_VALIDATION_FRACTION, SPLITS, stable_split, stable_split_note

METADATA_FILE = "metadata.jsonl"
# Split folder names of the imagefolder layout; `val/` is accepted as an alias of `validation/`.
IMAGEFOLDER_SPLIT_DIRS = {"train": ("train",), "validation": ("validation", "val"), "test": ("test",)}


def is_imagefolder(root: Path) -> bool:
    """Whether any split folder of `root` has a `metadata.jsonl` (`load_caption_imagefolder` checks the rest)."""
    return any((root / name / METADATA_FILE).is_file() for names in IMAGEFOLDER_SPLIT_DIRS.values() for name in names)


def load_caption_imagefolder(
    root: str | Path,
    *,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    split_seed: int = 0,
) -> tuple[DatasetDict, DataReport]:
    """Read split folders, each with a `metadata.jsonl` (not yet checked for decoding errors).

    Each line holds `file_name` (relative to its split folder) and either `captions` (a list of strings) or
    `caption`/`text` (one string); lines naming the same file are merged into one image with all their captions.
    `image_id` is the image path relative to `root`. Splits missing beside `train/` are carved out of it by
    `stable_split` of the file name, and the report says so.
    """
    root = Path(root).absolute()  # the dataset keeps image paths: make them independent of the working directory
    report = DataReport(source=str(root), layout="imagefolder")
    split_dirs = {split: _imagefolder_split_dir(root, split) for split in SPLITS}
    if split_dirs["train"] is None:
        raise ValueError(f"{root}: the imagefolder layout needs train/{METADATA_FILE}")

    images_by_split: dict[str, dict[str, tuple[str, list[str]]]] = defaultdict(dict)
    missing_splits = [split for split, split_dir in split_dirs.items() if split_dir is None]
    carve_fractions = {
        "validation_fraction": validation_fraction if "validation" in missing_splits else 0.0,
        "test_fraction": test_fraction if "test" in missing_splits else 0.0,
    }
    for split, split_dir in split_dirs.items():
        if split_dir is None:
            continue
        for file_name, captions in _read_metadata(split_dir, root, report).items():
            target = split
            if split == "train" and missing_splits:
                target = stable_split(file_name, seed=split_seed, **carve_fractions)
            image_path = split_dir / file_name
            images_by_split[target][image_path.relative_to(root).as_posix()] = (str(image_path), captions)
    if missing_splits:
        report.notes.append(
            f"no {' or '.join(missing_splits)} folder: carved out of train/, "
            + stable_split_note(carve_fractions["validation_fraction"], carve_fractions["test_fraction"], split_seed)
        )
    dataset_dict = caption_splits_from_files(images_by_split)
    report.record_split_sizes(dataset_dict)
    return dataset_dict, report


def _imagefolder_split_dir(root: Path, split: str) -> Path | None:
    present = [root / name for name in IMAGEFOLDER_SPLIT_DIRS[split] if (root / name).is_dir()]
    if len(present) > 1:
        raise ValueError(f"{root}: both {present[0].name}/ and {present[1].name}/ exist; keep one {split} folder")
    if not present:
        return None
    if not (present[0] / METADATA_FILE).is_file():
        raise ValueError(f"{present[0]} has no {METADATA_FILE}: each split folder needs one naming its captions")
    return present[0]


def _read_metadata(split_dir: Path, root: Path, report: DataReport) -> dict[str, list[str]]:
    """`{file_name: captions}` of one split folder, merging lines that name the same file."""
    metadata_path = split_dir / METADATA_FILE
    where_prefix = metadata_path.relative_to(root).as_posix()
    captions_by_file: dict[str, list[str]] = {}
    with metadata_path.open(encoding="utf-8-sig") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{where_prefix}:{line_number}"
            try:
                file_name, captions = _parse_metadata_line(line)
            except ValueError as problem:
                report.record_skip(UNPARSEABLE_ROW, f"{where} ({problem})")
                continue
            if not (split_dir / file_name).is_file():
                report.record_skip(MISSING_IMAGE, f"{where} {file_name}")
                continue
            for caption in captions:
                if caption.strip():
                    captions_by_file.setdefault(file_name, []).append(caption.strip())
                else:
                    report.record_skip(EMPTY_CAPTION, where)
    return captions_by_file


def _parse_metadata_line(line: str) -> tuple[str, list[str]]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"invalid JSON: {error.msg}") from error
    if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
        raise ValueError("no 'file_name' string")
    captions = row.get("captions", [])
    if not isinstance(captions, list) or not all(isinstance(caption, str) for caption in captions):
        raise ValueError("'captions' is not a list of strings")
    for key in ("caption", "text"):
        if key in row:
            if not isinstance(row[key], str):
                raise ValueError(f"{key!r} is not a string")
            captions = [*captions, row[key]]
    if "captions" not in row and "caption" not in row and "text" not in row:
        raise ValueError("no 'captions', 'caption' or 'text'")
    return row["file_name"], captions
