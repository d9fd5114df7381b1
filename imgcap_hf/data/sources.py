"""`load_caption_dataset`: which source a name or a folder means, loaded, checked and reported on in one call.

`train.py` and `python -m imgcap_hf evaluate` both load data through this one function, so that both get the same
sources, the same split and the same image check.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from datasets import DatasetDict

from .hub_flickr30k import convert_hub_flickr30k, download_hub_flickr30k
from .imagefolder import METADATA_FILE, is_imagefolder, load_caption_imagefolder
from .kaggle_flickr30k import KAGGLE_CAPTIONS_FILE, is_kaggle_flickr30k, load_kaggle_flickr30k
from .report import DataReport
from .scenes import make_scenes_dataset
from .shapes import make_shapes_dataset
from .splits import DEFAULT_TEST_FRACTION, DEFAULT_VALIDATION_FRACTION, check_split_fractions
from .verification import filter_unreadable_images

# The `--dataset` values that are names rather than folders: the two synthetic sets and the Hub copy of Flickr30k.
NAMED_DATASETS = ("shapes", "scenes", "flickr30k")


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
        name_or_path: `"shapes"` (synthetic, see `make_shapes_dataset`), `"scenes"` (synthetic with human-like
            references, see `make_scenes_dataset`), `"flickr30k"` (the Hub copy `nlphuji/flickr30k`), or a folder:
            the Kaggle Flickr30k download (`results.csv`, images in `flickr30k_images/` or beside it) or an
            imagefolder layout (`train/`, `validation/` or `val/`, `test/`, each with a `metadata.jsonl`). The names
            win over folders of the same name; write `./shapes` to mean the folder.
        karpathy_json: for the Kaggle layout, the standard `dataset_flickr30k.json` whose split to use (`restval`
            joins train). Without it, images are split by `stable_split`.
        cache_dir: datasets' cache for the Hub download.
        validation_fraction, test_fraction, split_seed: the hash split of folders that bring no split of their own.
        shapes_kwargs: keyword arguments of `make_shapes_dataset`, or of `make_scenes_dataset` (the same names).
        verify_images: decode every image of a folder once and drop the unreadable ones (`filter_unreadable_images`),
            so that a corrupt file cannot crash training hours later; `num_proc` spreads the decoding over processes.
        num_proc: processes for the image check.

    Returns:
        The splits and a `DataReport` of what was repaired or skipped.
    """
    check_split_fractions(validation_fraction, test_fraction)
    if karpathy_json is not None and name_or_path in NAMED_DATASETS:
        raise ValueError(f"karpathy_json applies to the Kaggle Flickr30k folder only, not to {name_or_path!r}")
    if name_or_path == "shapes":
        report = DataReport(source="shapes", layout="shapes", notes=["synthetic coloured shapes"])
        dataset_dict = make_shapes_dataset(**(shapes_kwargs or {}))
        report.record_split_sizes(dataset_dict)
        return dataset_dict, report
    if name_or_path == "scenes":
        report = DataReport(source="scenes", layout="scenes", notes=["synthetic scenes, five simulated annotators"])
        dataset_dict = make_scenes_dataset(**(shapes_kwargs or {}))
        report.record_split_sizes(dataset_dict)
        return dataset_dict, report
    if name_or_path == "flickr30k":
        report = DataReport(source="flickr30k", layout="hub-flickr30k", notes=["Karpathy split of the Hub copy"])
        dataset_dict = convert_hub_flickr30k(download_hub_flickr30k(cache_dir))
        report.record_split_sizes(dataset_dict)
        return dataset_dict, report

    root = Path(name_or_path)
    split_options = {
        "validation_fraction": validation_fraction,
        "test_fraction": test_fraction,
        "split_seed": split_seed,
    }
    if is_kaggle_flickr30k(root):
        dataset_dict, report = load_kaggle_flickr30k(root, karpathy_json=karpathy_json, **split_options)
    elif is_imagefolder(root):
        if karpathy_json is not None:
            raise ValueError(
                f"karpathy_json applies to the Kaggle Flickr30k folder only, but {root} is an imagefolder"
            )
        dataset_dict, report = load_caption_imagefolder(root, **split_options)
    else:
        found = "it does not exist" if not root.exists() else f"it holds {_describe_contents(root)}"
        raise ValueError(
            f"Cannot load captions from {str(root)!r}: {found}. Expected the name 'shapes', 'scenes' or 'flickr30k', "
            f"or a folder holding either {KAGGLE_CAPTIONS_FILE} (the Kaggle Flickr30k layout) or "
            f"train/{METADATA_FILE} (the imagefolder layout, optionally with validation/ or val/ and test/)."
        )
    if verify_images:
        dataset_dict = filter_unreadable_images(dataset_dict, report, num_proc=num_proc)
    else:
        report.notes.append("images were not checked for decoding errors (verify_images=False)")
    report.record_split_sizes(dataset_dict)
    return dataset_dict, report


def _describe_contents(root: Path) -> str:
    """What a folder that is no dataset holds, for the error message (the first eight names)."""
    if not root.is_dir():
        return "no folder (it is a file)"
    names = sorted(entry.name for entry in os.scandir(root))
    if not names:
        return "nothing"
    return ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
