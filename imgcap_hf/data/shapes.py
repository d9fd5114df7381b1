"""Caption data for training and evaluation, from the Hub, from local folders, or synthesised.

Every loader returns a `datasets.DatasetDict` with the splits `train`, `validation` and `test`, one row per IMAGE:

- `image_id` (string, unique per image): the file name (Flickr30k) or the path relative to the folder (imagefolder),
- `image` (`datasets.Image()`): decoded lazily to PIL by datasets; the training code turns it into RGB with
  `imgcap_hf.image_processing_imgcap.to_rgb_image`, so nothing here converts pixels,
- `captions` (`List(Value("string"))`): every caption of that image.

Alongside comes a `DataReport` saying what was repaired or skipped and why, so that a dirty download is visible
in the logs instead of silently shrinking the data.

Sources (`load_caption_dataset`):

- `"shapes"`: a synthetic set of coloured shapes whose captions can only be produced by looking at the image; it
  trains in minutes on a CPU and is how the tests and `make demo` reach a visible result without downloads.
- `"flickr30k"`: the Hub copy `nlphuji/flickr30k` (its parquet conversion), already in the Karpathy split.
- a folder holding the Kaggle Flickr30k download (`results.csv`), or an imagefolder layout
  (`train/metadata.jsonl`, ...).

When a folder has no split of its own, images are assigned by a stable hash of their name (`stable_split`), so
adding images never moves existing ones between train and test.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from datasets import Dataset, DatasetDict, Features, List, Value
from PIL import Image, ImageDraw

from ..image_processing_imgcap import load_image

SPLITS = ("train", "validation", "test")
CAPTION_FEATURES = Features(
    {"image_id": Value("string"), "image": datasets.Image(), "captions": List(Value("string"))}
)

# Fractions of the Karpathy split of Flickr30k (1,014 validation and 1,000 test images out of 31,783), used when a
# folder brings no split of its own.
DEFAULT_VALIDATION_FRACTION = 1014 / 31783
DEFAULT_TEST_FRACTION = 1000 / 31783

HUB_FLICKR30K_REPO = "nlphuji/flickr30k"
HUB_FLICKR30K_REVISION = "refs/convert/parquet"
HUB_FLICKR30K_COLUMNS = ("image", "caption", "split", "filename")
HUB_SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test"}

KARPATHY_SPLIT_NAMES = {"train": "train", "restval": "train", "val": "validation", "test": "test"}

KAGGLE_CAPTIONS_FILE = "results.csv"
KAGGLE_IMAGES_SUBFOLDER = "flickr30k_images"
KAGGLE_HEADER = ("image_name", "comment_number", "comment")
# A well-formed row: `1000092795.jpg| 0| Two young guys ...` (the comment itself may contain `|`).
_KAGGLE_ROW = re.compile(r"^\s*(?P<image_name>[^|\s][^|]*?)\s*\|\s*(?P<comment_number>\d+)\s*\|(?P<comment>.*)$")
# The row shape with the second `|` missing, as in the real file: `2199200615.jpg| 4   A dog runs across the grass .`
_KAGGLE_ROW_WITHOUT_SECOND_BAR = re.compile(
    r"^\s*(?P<image_name>[^|\s][^|]*?)\s*\|\s*(?P<comment_number>\d+)\s+(?P<comment>\S.*)$"
)

METADATA_FILE = "metadata.jsonl"
# Split folder names of the imagefolder layout; `val/` is accepted as an alias of `validation/`.
IMAGEFOLDER_SPLIT_DIRS = {"train": ("train",), "validation": ("validation", "val"), "test": ("test",)}

# Reasons under which `DataReport.skipped` counts what it dropped.
UNPARSEABLE_ROW = "unparseable_row"  # rows (csv or jsonl lines)
EMPTY_CAPTION = "empty_caption"  # captions
MISSING_IMAGE = "missing_image"  # rows naming an image file that does not exist
NOT_IN_KARPATHY_SPLIT = "not_in_karpathy_split"  # images absent from the split file
UNREADABLE_IMAGE = "unreadable_image"  # images that Pillow cannot decode

_MAX_EXAMPLES = 5


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class IssueTally:
    """How many times one kind of problem occurred, with the first few occurrences (`file:line` or image names)."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, example: str) -> None:
        self.count += 1
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(example)


@dataclass
class DataReport:
    """What a loader read, repaired and skipped.

    Args:
        source: what was loaded (`"shapes"`, `"flickr30k"` or the folder path).
        layout: how it was read: `shapes`, `hub-flickr30k`, `kaggle-flickr30k` or `imagefolder`.
        repaired_rows: rows fixed up instead of dropped (the Kaggle row missing its second `|`).
        skipped: what was dropped, by reason (see the `*_ROW`, `*_CAPTION`, `*_IMAGE` constants of this module).
        images_per_split: images in each split of the returned data.
        captions_per_split: captions in each split of the returned data.
        notes: decisions worth knowing about, e.g. how a missing split was made.
    """

    source: str
    layout: str
    repaired_rows: IssueTally = field(default_factory=IssueTally)
    skipped: dict[str, IssueTally] = field(default_factory=dict)
    images_per_split: dict[str, int] = field(default_factory=dict)
    captions_per_split: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def record_skip(self, reason: str, example: str) -> None:
        self.skipped.setdefault(reason, IssueTally()).add(example)

    def record_split_sizes(self, dataset_dict: DatasetDict) -> None:
        """Count images and captions per split (called again whenever rows are dropped)."""
        self.images_per_split = {name: split.num_rows for name, split in dataset_dict.items()}
        self.captions_per_split = {
            name: sum(len(captions) for captions in split["captions"]) for name, split in dataset_dict.items()
        }

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy, to store beside training results."""
        return asdict(self)

    def __str__(self) -> str:
        sizes = ", ".join(
            f"{name} {self.images_per_split[name]} images / {self.captions_per_split.get(name, 0)} captions"
            for name in self.images_per_split
        )
        lines = [f"{self.layout} data from {self.source}: {sizes}"]
        if self.repaired_rows.count:
            lines.append(f"  repaired {self.repaired_rows.count} malformed rows, e.g. {_join(self.repaired_rows)}")
        for reason, tally in self.skipped.items():
            lines.append(f"  skipped {tally.count} x {reason}, e.g. {_join(tally)}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def _join(tally: IssueTally) -> str:
    more = ", ..." if tally.count > len(tally.examples) else ""
    return ", ".join(tally.examples) + more


# --------------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------------


def load_caption_dataset(
    name_or_path: str,
    *,
    karpathy_json: str | None = None,
    cache_dir: str | None = None,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    split_seed: int = 0,
    shapes_kwargs: dict[str, Any] | None = None,
    verify_images: bool = True,
    num_proc: int | None = None,
) -> tuple[DatasetDict, DataReport]:
    """Load captioned images as train/validation/test splits, one row per image.

    Args:
        name_or_path: `"shapes"` (synthetic, see `make_shapes_dataset`), `"flickr30k"` (the Hub copy
            `nlphuji/flickr30k`), or a folder: the Kaggle Flickr30k download (`results.csv`, images in
            `flickr30k_images/` or beside it) or an imagefolder layout (`train/`, `validation/` or `val/`, `test/`,
            each with a `metadata.jsonl`). The two names win over folders of the same name; write `./shapes` to
            mean the folder.
        karpathy_json: for the Kaggle layout, the standard `dataset_flickr30k.json` whose split to use (`restval`
            joins train). Without it, images are split by `stable_split`.
        cache_dir: datasets' cache for the Hub download.
        validation_fraction, test_fraction, split_seed: the hash split of folders that bring no split of their own.
        shapes_kwargs: keyword arguments of `make_shapes_dataset`.
        verify_images: decode every image of a folder once and drop the unreadable ones (`filter_unreadable_images`),
            so that a corrupt file cannot crash training hours later. This costs about 1.4 ms per Flickr30k-sized
            JPEG on one core (about 45 s for all 31,783 images); `num_proc` spreads it over processes.
        num_proc: processes for the image check.

    Returns:
        The splits and a `DataReport` of what was repaired or skipped.
    """
    _check_fractions(validation_fraction, test_fraction)
    if karpathy_json is not None and name_or_path in ("shapes", "flickr30k"):
        raise ValueError(f"karpathy_json applies to the Kaggle Flickr30k folder only, not to {name_or_path!r}")
    if name_or_path == "shapes":
        report = DataReport(source="shapes", layout="shapes", notes=["synthetic coloured shapes"])
        dataset_dict = make_shapes_dataset(**(shapes_kwargs or {}))
        report.record_split_sizes(dataset_dict)
        return dataset_dict, report
    if name_or_path == "flickr30k":
        report = DataReport(source="flickr30k", layout="hub-flickr30k", notes=["Karpathy split of the Hub copy"])
        dataset_dict = convert_hub_flickr30k(_download_hub_flickr30k(cache_dir))
        report.record_split_sizes(dataset_dict)
        return dataset_dict, report

    root = Path(name_or_path)
    split_options = {
        "validation_fraction": validation_fraction,
        "test_fraction": test_fraction,
        "split_seed": split_seed,
    }
    if (root / KAGGLE_CAPTIONS_FILE).is_file():
        dataset_dict, report = load_kaggle_flickr30k(root, karpathy_json=karpathy_json, **split_options)
    elif _is_imagefolder(root):
        if karpathy_json is not None:
            raise ValueError(
                f"karpathy_json applies to the Kaggle Flickr30k folder only, but {root} is an imagefolder"
            )
        dataset_dict, report = load_caption_imagefolder(root, **split_options)
    else:
        found = "it does not exist" if not root.exists() else f"it holds {_describe_contents(root)}"
        raise ValueError(
            f"Cannot load captions from {str(root)!r}: {found}. Expected the name 'shapes' or 'flickr30k', or a "
            f"folder holding either {KAGGLE_CAPTIONS_FILE} (the Kaggle Flickr30k layout) or train/{METADATA_FILE} "
            f"(the imagefolder layout, optionally with validation/ or val/ and test/)."
        )
    if verify_images:
        dataset_dict = filter_unreadable_images(dataset_dict, report, num_proc=num_proc)
    else:
        report.notes.append("images were not checked for decoding errors (verify_images=False)")
    report.record_split_sizes(dataset_dict)
    return dataset_dict, report


def _check_fractions(validation_fraction: float, test_fraction: float) -> None:
    if not (0 <= validation_fraction < 1 and 0 <= test_fraction < 1 and validation_fraction + test_fraction < 1):
        raise ValueError(
            "validation_fraction and test_fraction must lie in [0, 1) and leave images for training, got "
            f"{validation_fraction} and {test_fraction}"
        )


def _describe_contents(root: Path) -> str:
    if not root.is_dir():
        return "no folder (it is a file)"
    names = sorted(entry.name for entry in os.scandir(root))
    if not names:
        return "nothing"
    return ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")


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


def _hash_split_note(validation_fraction: float, test_fraction: float, seed: int) -> str:
    return (
        f"split by stable_split (sha1 of '{seed}:<file name>'): validation fraction {validation_fraction:.4f}, "
        f"test fraction {test_fraction:.4f}"
    )


def _build_splits(images_by_split: Mapping[str, Mapping[str, tuple[str, list[str]]]]) -> DatasetDict:
    """`{split: {image_id: (image_path, captions)}}` -> DatasetDict with lazily decoded images (paths, no copies)."""
    splits = {}
    for split in SPLITS:
        images = images_by_split.get(split, {})
        splits[split] = Dataset.from_dict(
            {
                "image_id": list(images),
                "image": [path for path, _ in images.values()],
                "captions": [captions for _, captions in images.values()],
            },
            features=CAPTION_FEATURES,
        )
    return DatasetDict(splits)


# --------------------------------------------------------------------------------------------------------------------
# Hub: nlphuji/flickr30k
# --------------------------------------------------------------------------------------------------------------------


def _download_hub_flickr30k(cache_dir: str | None) -> Dataset:
    try:
        downloaded = datasets.load_dataset(HUB_FLICKR30K_REPO, revision=HUB_FLICKR30K_REVISION, cache_dir=cache_dir)
    except ConnectionError as error:
        raise ConnectionError(
            f"Could not load {HUB_FLICKR30K_REPO} ({HUB_FLICKR30K_REVISION}): the Hugging Face Hub is unreachable "
            f"({error}). Without the Hub, download Flickr30k yourself and pass its folder instead: the Kaggle layout "
            f"({KAGGLE_CAPTIONS_FILE} with the images in {KAGGLE_IMAGES_SUBFOLDER}/), or an imagefolder layout "
            f"(train/, validation/, test/ each with a {METADATA_FILE} of file_name and captions)."
        ) from error
    # The parquet conversion puts all 31,783 rows in one split; the Karpathy split is in the `split` column.
    return datasets.concatenate_datasets(list(downloaded.values()))


def convert_hub_flickr30k(dataset: Dataset) -> DatasetDict:
    """Re-split the Hub copy of Flickr30k (`nlphuji/flickr30k`) by its `split` column into our columns.

    Its rows already hold one image with its five captions (`caption`) and the Karpathy split (`split`:
    train/val/test). `image_id` is the `filename` (e.g. `1000092795.jpg`), the same id as the Kaggle layout.
    """
    missing = [column for column in HUB_FLICKR30K_COLUMNS if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"This Flickr30k copy lacks the columns {missing} (it has {dataset.column_names}); expected the "
            f"{HUB_FLICKR30K_REPO} parquet conversion with {list(HUB_FLICKR30K_COLUMNS)}"
        )
    indices_by_split: dict[str, list[int]] = defaultdict(list)
    for index, hub_split in enumerate(dataset["split"]):
        if hub_split not in HUB_SPLIT_NAMES:
            raise ValueError(
                f"Row {index} of the Flickr30k copy has split {hub_split!r}; expected one of {list(HUB_SPLIT_NAMES)}"
            )
        indices_by_split[HUB_SPLIT_NAMES[hub_split]].append(index)
    ours = dataset.select_columns(["filename", "image", "caption"]).rename_columns(
        {"filename": "image_id", "caption": "captions"}
    )
    if ours.features != CAPTION_FEATURES:  # `cast` rewrites every image, so only when the types really differ
        ours = ours.cast(CAPTION_FEATURES)
    return DatasetDict({split: ours.select(indices_by_split[split]) for split in SPLITS})


# --------------------------------------------------------------------------------------------------------------------
# Kaggle Flickr30k: results.csv
# --------------------------------------------------------------------------------------------------------------------


def load_kaggle_flickr30k(
    root: str | Path,
    *,
    karpathy_json: str | Path | None = None,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    split_seed: int = 0,
) -> tuple[DatasetDict, DataReport]:
    """Read the Kaggle Flickr30k download: `root/results.csv` and its images (not yet checked for decoding errors).

    `results.csv` is `|`-delimited with the header `image_name| comment_number| comment`, values carrying leading
    spaces. Rows missing their second `|` (the real file has one) are repaired; rows that still do not parse, have
    an empty comment or name an image that does not exist are skipped and counted in the report. Images are looked
    for in `root/flickr30k_images/` (the Kaggle archive) and then beside the csv. Captions always come from
    `results.csv`; `karpathy_json` only decides the split.
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
        report.notes.append(_hash_split_note(validation_fraction, test_fraction, split_seed))
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
    dataset_dict = _build_splits(images_by_split)
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


# --------------------------------------------------------------------------------------------------------------------
# imagefolder: train/metadata.jsonl, ...
# --------------------------------------------------------------------------------------------------------------------


def _is_imagefolder(root: Path) -> bool:
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

    We read `metadata.jsonl` ourselves rather than through `load_dataset("imagefolder")`: datasets keeps one row per
    metadata line (no merging of `caption` rows), keeps lines naming missing files (which then fail when decoded,
    mid-epoch), gives bad lines no line numbers, also takes `dev/`, `eval/` or `training/` as split folders, and writes
    an Arrow copy of the data into its cache. Building the Dataset from paths stores no image bytes at all.
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
            + _hash_split_note(carve_fractions["validation_fraction"], carve_fractions["test_fraction"], split_seed)
        )
    dataset_dict = _build_splits(images_by_split)
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


# --------------------------------------------------------------------------------------------------------------------
# Unreadable images
# --------------------------------------------------------------------------------------------------------------------


def filter_unreadable_images(
    dataset_dict: DatasetDict, report: DataReport, num_proc: int | None = None
) -> DatasetDict:
    """Decode every image once and drop the rows whose image fails, recording them in `report`.

    datasets decodes images only when a row is read, so a truncated JPEG or a text file named `.jpg` would
    otherwise crash training in the middle of an epoch. The check is `load_image`'s, the one serving applies: empty
    files, non-images (SVG, text, random bytes), truncated or corrupt files, decompression bombs (more pixels than
    Pillow's limit) and images over `DEFAULT_MAX_PIXELS` are all dropped, each reported with its id and the reason.
    Cost: about 1.4 ms per Flickr30k-sized JPEG on one core (about 45 s for the 31,783 images of Flickr30k);
    `num_proc` processes share the work.
    """
    kept = {}
    for split, dataset in dataset_dict.items():
        if dataset.num_rows == 0:  # `map` over no rows returns no `problem` column at all
            kept[split] = dataset
            continue
        undecoded = dataset.cast_column("image", datasets.Image(decode=False))
        problems = undecoded.map(
            _decoding_problems,
            batched=True,
            input_columns="image",
            remove_columns=undecoded.column_names,
            num_proc=min(num_proc, dataset.num_rows) if num_proc else None,
            desc=f"Checking {split} images",
        )
        problem_per_row = list(problems["problem"])
        readable = [index for index, problem in enumerate(problem_per_row) if not problem]
        if len(readable) < dataset.num_rows:
            for image_id, problem in zip(dataset["image_id"], problem_per_row):
                if problem:
                    report.record_skip(UNREADABLE_IMAGE, f"{split}: {image_id} ({problem})")
            dataset = dataset.select(readable)
        kept[split] = dataset
    filtered = DatasetDict(kept)
    report.record_split_sizes(filtered)
    return filtered


def _decoding_problems(images: list[dict[str, Any]]) -> dict[str, list[str]]:
    """For a batch of undecoded images (`{"bytes", "path"}`), "" when one decodes fully, else what went wrong."""
    problems = []
    for image in images:
        try:
            # `load_image` decodes every pixel (`open` reads only the header: truncation shows when decoding) and
            # applies the same size limits as serving.
            load_image(image["bytes"] if image["bytes"] is not None else image["path"])
            problems.append("")
        except ValueError as error:
            # Pillow's own error where it raised one (what the report always showed), else load_image's sentence
            # (an empty file, or more pixels than allowed).
            cause = error.__cause__
            problems.append((f"{type(cause).__name__}: {cause}" if cause is not None else str(error))[:200])
        except Exception as error:  # anything else still means unusable, and must not stop the check
            problems.append(f"{type(error).__name__}: {error}"[:200])
    return {"problem": problems}


# --------------------------------------------------------------------------------------------------------------------
# Synthetic shapes
# --------------------------------------------------------------------------------------------------------------------

SHAPE_COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (40, 70, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 50, 170),
    "orange": (245, 130, 20),
}
BACKGROUND_COLOURS = {"white": (255, 255, 255), "grey": (200, 200, 200), "cream": (250, 240, 205)}
SHAPE_KINDS = ("circle", "square", "triangle", "cross")
# Radius as a fraction of the image side; each drawn radius varies by up to 8% so the two sizes never overlap.
SHAPE_RADII = {"small": 0.09, "large": 0.18}
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
# Centres (as fractions of the side) of a lone shape, each moved by up to 3% so images differ in more than colour.
SINGLE_POSITIONS = {
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "center": (0.5, 0.5),
}
POSITION_PHRASES = {
    "left": ("on the left", "on the left side"),
    "right": ("on the right", "on the right side"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "center": ("in the center", "in the middle"),
}
# For two shapes, the relation of the first-named shape to the second, by where the first one is drawn.
RELATION_PHRASES = {"left": "to the left of", "right": "to the right of", "top": "above", "bottom": "below"}
SINGLE_TEMPLATES = (
    "a {colour} {shape} {where} .",
    "a {size} {colour} {shape} {where} .",
    "there is a {size} {colour} {shape} {where} .",
    "a {size} {colour} {shape} {where} on a {background} background .",
    "the image shows a {size} {colour} {shape} {where} .",
    "{where} there is a {colour} {shape} .",
    "a picture of a {size} {colour} {shape} {where} .",
)
PAIR_TEMPLATES = (
    "a {colour} {shape} {relation} a {other_colour} {other_shape} .",
    "a {size} {colour} {shape} {relation} a {other_size} {other_colour} {other_shape} .",
    "there is a {colour} {shape} {relation} a {other_colour} {other_shape} .",
    "the {colour} {shape} is {relation} the {other_colour} {other_shape} .",
    "a {colour} {shape} and a {other_colour} {other_shape} on a {background} background .",
    "two shapes : a {size} {colour} {shape} {relation} a {other_size} {other_colour} {other_shape} .",
)
CAPTIONS_PER_SHAPES_IMAGE = 5
_ARTICLE_BEFORE_VOWEL = re.compile(r"\ba (?=[aeiou])")  # "a orange circle" -> "an orange circle"
_POSITION_JITTER = 0.03
_RADIUS_JITTER = 0.08
_PAIR_CROSS_AXIS_JITTER = 0.1
# Splits are generated in this order, each rejecting images already drawn for an earlier one, so that the test
# images (and `write_shapes_examples`) do not depend on how many training images are asked for.
_SHAPES_GENERATION_ORDER = ("test", "validation", "train")


@dataclass(frozen=True)
class DrawnShape:
    """One shape as drawn: what the captions must say (kind, colour, size, position) and where the pixels are."""

    kind: str
    colour: str
    size: str
    position: str  # left/right/top/bottom/center for a lone shape; left/right or top/bottom within a pair
    center: tuple[float, float]  # pixels
    radius: float  # pixels


@dataclass(frozen=True)
class ShapesScene:
    """One synthetic image with the ground truth its captions were written from."""

    image: Image.Image
    background: str
    shapes: tuple[DrawnShape, ...]
    captions: tuple[str, ...]


def generate_shapes_scenes(
    num_train: int = 3000, num_validation: int = 300, num_test: int = 300, image_size: int = 64, seed: int = 0
) -> dict[str, list[ShapesScene]]:
    """Draw the scenes of `make_shapes_dataset`, with their ground truth (for tests and analysis).

    Each split draws from its own numpy generator, derived from `seed` and the split; no image appears twice
    (a repeated image is redrawn), so the splits share none.
    """
    counts = {"train": num_train, "validation": num_validation, "test": num_test}
    if any(count < 0 for count in counts.values()):
        raise ValueError(f"Split sizes must be non-negative, got {counts}")
    if image_size < 32:
        raise ValueError(
            f"image_size must be at least 32 pixels for small shapes to stay recognisable, got {image_size}"
        )
    seen_pixels: set[bytes] = set()
    scenes = {}
    for split in _SHAPES_GENERATION_ORDER:
        rng = np.random.default_rng([seed, SPLITS.index(split)])
        scenes[split] = []
        while len(scenes[split]) < counts[split]:
            scene = _draw_shapes_scene(rng, image_size)
            fingerprint = hashlib.sha1(scene.image.tobytes()).digest()
            if fingerprint not in seen_pixels:
                seen_pixels.add(fingerprint)
                scenes[split].append(scene)
    return {split: scenes[split] for split in SPLITS}


def make_shapes_dataset(
    num_train: int = 3000, num_validation: int = 300, num_test: int = 300, image_size: int = 64, seed: int = 0
) -> DatasetDict:
    """A synthetic captioning set: one or two coloured shapes on a plain background, five captions per image.

    Captions name the colour, kind (circle, square, triangle, cross), size (small/large) and position (left, right,
    top, bottom, center, or one shape relative to the other) of what is drawn, in varied phrasings over a vocabulary
    of about 50 words, so a model has to look at the image to caption it, yet the task is small enough for a CPU.
    Deterministic: the same arguments give identical pixels and captions in every process and on every machine
    (numpy's `default_rng` and Pillow's `ImageDraw` only; the PNG bytes also match wherever zlib is the same).
    3,600 images of 64x64 take about a second.
    """
    scenes = generate_shapes_scenes(num_train, num_validation, num_test, image_size, seed)
    return DatasetDict(
        {
            split: Dataset.from_dict(
                {
                    "image_id": [f"shapes-{split}-{index:05d}" for index in range(len(split_scenes))],
                    "image": [{"bytes": _png_bytes(scene.image), "path": None} for scene in split_scenes],
                    "captions": [list(scene.captions) for scene in split_scenes],
                },
                features=CAPTION_FEATURES,
            )
            for split, split_scenes in scenes.items()
        }
    )


def write_shapes_examples(directory: str | Path, count: int = 6, image_size: int = 64, seed: int = 0) -> list[Path]:
    """Write the first `count` test images of `make_shapes_dataset(image_size=..., seed=...)` as PNGs.

    These are images a shapes model never trained on, for captioning demos.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    scenes = generate_shapes_scenes(num_train=0, num_validation=0, num_test=count, image_size=image_size, seed=seed)
    paths = []
    for index, scene in enumerate(scenes["test"]):
        path = directory / f"shapes_test_{index:02d}.png"
        path.write_bytes(_png_bytes(scene.image))
        paths.append(path)
    return paths


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _draw_shapes_scene(rng: np.random.Generator, image_size: int) -> ShapesScene:
    background = str(rng.choice(list(BACKGROUND_COLOURS)))
    if rng.random() < 0.5:
        position = str(rng.choice(list(SINGLE_POSITIONS)))
        shapes = (_place_shape(rng, image_size, position, jitter=(_POSITION_JITTER, _POSITION_JITTER)),)
    else:
        shapes = _place_pair(rng, image_size)
    image = Image.new("RGB", (image_size, image_size), BACKGROUND_COLOURS[background])
    draw = ImageDraw.Draw(image)
    for shape in shapes:
        _draw_shape(draw, shape)
    return ShapesScene(image=image, background=background, shapes=shapes, captions=_caption(rng, background, shapes))


def _place_shape(
    rng: np.random.Generator,
    image_size: int,
    position: str,
    jitter: tuple[float, float],
    exclude: tuple[str, str] | None = None,
) -> DrawnShape:
    """Pick the kind, colour and size of a shape centred within `jitter` of its position (fractions of the side)."""
    while True:
        kind, colour = str(rng.choice(SHAPE_KINDS)), str(rng.choice(list(SHAPE_COLOURS)))
        if (kind, colour) != exclude:  # two identical shapes would make "the red circle" ambiguous
            break
    size = str(rng.choice(list(SHAPE_RADII)))
    radius = SHAPE_RADII[size] * (1 + rng.uniform(-_RADIUS_JITTER, _RADIUS_JITTER)) * image_size
    anchor = SINGLE_POSITIONS[position]
    center = (
        (anchor[0] + rng.uniform(-jitter[0], jitter[0])) * image_size,
        (anchor[1] + rng.uniform(-jitter[1], jitter[1])) * image_size,
    )
    return DrawnShape(kind=kind, colour=colour, size=size, position=position, center=center, radius=radius)


def _place_pair(rng: np.random.Generator, image_size: int) -> tuple[DrawnShape, DrawnShape]:
    # A pair lies along one axis; across it the shapes may wander further without changing their relation.
    if rng.random() < 0.5:
        positions, jitter = ("left", "right"), (_POSITION_JITTER, _PAIR_CROSS_AXIS_JITTER)
    else:
        positions, jitter = ("top", "bottom"), (_PAIR_CROSS_AXIS_JITTER, _POSITION_JITTER)
    first = _place_shape(rng, image_size, positions[0], jitter)
    second = _place_shape(rng, image_size, positions[1], jitter, exclude=(first.kind, first.colour))
    return first, second


def _draw_shape(draw: ImageDraw.ImageDraw, shape: DrawnShape) -> None:
    x, y, radius, fill = *shape.center, shape.radius, SHAPE_COLOURS[shape.colour]
    if shape.kind == "circle":
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=fill)
    elif shape.kind == "square":
        half_side = 0.85 * radius  # a square of the circle's area would look bigger: keep them comparable
        draw.rectangle((x - half_side, y - half_side, x + half_side, y + half_side), fill=fill)
    elif shape.kind == "triangle":  # pointing up, filling the same box as the circle
        draw.polygon([(x, y - radius), (x + radius, y + radius), (x - radius, y + radius)], fill=fill)
    else:  # cross: a plus sign
        half_width = 0.35 * radius
        draw.rectangle((x - radius, y - half_width, x + radius, y + half_width), fill=fill)
        draw.rectangle((x - half_width, y - radius, x + half_width, y + radius), fill=fill)


def _caption(rng: np.random.Generator, background: str, shapes: tuple[DrawnShape, ...]) -> tuple[str, ...]:
    """Five captions from distinct templates.

    The wording inside a template is fixed by the template (which synonym, and for pairs which shape is named
    first), so the five captions of an image differ in phrasing while every word still follows from the pixels and
    the template. Synonyms drawn at random per caption would be label noise that no model can learn from an image:
    they capped the BLEU-4 of even a perfect recogniser well below 1.
    """
    templates = SINGLE_TEMPLATES if len(shapes) == 1 else PAIR_TEMPLATES
    chosen = rng.choice(len(templates), size=CAPTIONS_PER_SHAPES_IMAGE, replace=False)
    captions = []
    for template_index in chosen:
        variant = int(template_index) % 2  # alternate templates use the alternate wording
        words = {"background": background}
        if len(shapes) == 1:
            words |= _shape_words(shapes[0], prefix="", variant=variant)
            words["where"] = POSITION_PHRASES[shapes[0].position][variant]
        else:
            named_first, named_second = shapes if variant == 0 else shapes[::-1]
            words |= _shape_words(named_first, prefix="", variant=variant)
            words |= _shape_words(named_second, prefix="other_", variant=variant)
            words["relation"] = RELATION_PHRASES[named_first.position]
        captions.append(_ARTICLE_BEFORE_VOWEL.sub("an ", templates[template_index].format(**words)))
    return tuple(captions)


def _shape_words(shape: DrawnShape, prefix: str, variant: int) -> dict[str, str]:
    return {
        f"{prefix}colour": shape.colour,
        f"{prefix}shape": shape.kind,
        f"{prefix}size": SIZE_WORDS[shape.size][variant],
    }
