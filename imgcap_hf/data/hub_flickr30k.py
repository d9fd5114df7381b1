"""Flickr30k from the Hugging Face Hub: `nlphuji/flickr30k`, through its parquet conversion.

That copy is a loading-script dataset, which datasets >= 4 refuses to run; its parquet conversion
(`refs/convert/parquet`) loads, holds one row per image with all five captions, and carries the Karpathy split in a
`split` column. Other Hub copies name their columns differently or have no split column: `convert_hub_flickr30k`
checks the columns and refuses such a copy instead of guessing.
"""

from __future__ import annotations

from collections import defaultdict

import datasets
from datasets import Dataset, DatasetDict

from .imagefolder import METADATA_FILE
from .kaggle_flickr30k import KAGGLE_CAPTIONS_FILE, KAGGLE_IMAGES_SUBFOLDER
from .schema import CAPTION_FEATURES
from .splits import SPLITS

HUB_FLICKR30K_REPO = "nlphuji/flickr30k"
HUB_FLICKR30K_REVISION = "refs/convert/parquet"
HUB_FLICKR30K_COLUMNS = ("image", "caption", "split", "filename")
HUB_SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test"}


def download_hub_flickr30k(cache_dir: str | None) -> Dataset:
    """All 31,783 rows of the Hub copy in one Dataset; offline, an error that names the local alternatives."""
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
