"""The columns every source returns, one row per image, and how the folder readers build them from file paths.

- `image_id` (string, unique per image): the file name (Flickr30k) or the path relative to the folder (imagefolder),
- `image` (`datasets.Image()`): decoded lazily to PIL by datasets; the training code turns it into RGB with
  `imgcap_hf.models.imgcap.image_processing_imgcap.to_rgb_image`, so nothing in this package converts pixels,
- `captions` (`List(Value("string"))`): every caption of that image.
"""

from __future__ import annotations

from collections.abc import Mapping

import datasets
from datasets import Dataset, DatasetDict, Features, List, Value

from .splits import SPLITS

CAPTION_FEATURES = Features(
    {"image_id": Value("string"), "image": datasets.Image(), "captions": List(Value("string"))}
)


def caption_splits_from_files(images_by_split: Mapping[str, Mapping[str, tuple[str, list[str]]]]) -> DatasetDict:
    """`{split: {image_id: (image_path, captions)}}` -> DatasetDict with lazily decoded images (paths, no copies).

    Every split of `SPLITS` is present, empty where no image went to it, so that callers never test for one.
    """
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
