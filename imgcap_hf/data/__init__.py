"""Caption data for training and evaluation, from the Hub, from local folders, or synthesised.

`load_caption_dataset` returns a `datasets.DatasetDict` with the splits `train`, `validation` and `test`, one row
per image with the columns `image_id`, `image` and `captions` (`schema.py`), and a `DataReport` (`report.py`) saying
what was repaired or skipped and why, so that a dirty download is visible in the logs instead of silently shrinking
the data. One module per source:

- `shapes.py`: `"shapes"`, a synthetic set of coloured shapes whose captions can only be produced by looking at the
  image; it trains in minutes on a CPU and is how the tests and `make demo` reach a visible result without downloads.
- `scenes.py`: `"scenes"`, a harder synthetic set (object groups to count, relations, textured backgrounds) whose five
  captions come from simulated annotators who differ as real ones do, so that its metrics behave as on Flickr30k.
- `hub_flickr30k.py`: `"flickr30k"`, the Hub copy `nlphuji/flickr30k` (its parquet conversion), already in the
  Karpathy split.
- `kaggle_flickr30k.py`: a folder holding the Kaggle Flickr30k download (`results.csv`).
- `imagefolder.py`: a folder of split folders (`train/metadata.jsonl`, ...).

Images of folders are decoded once before training (`verification.py`). When a folder has no split of its own,
images are assigned by a stable hash of their name (`splits.py`), so adding images never moves existing ones between
train and test.

The names below load on first use (PEP 562), so that importing one module, such as `shapes` for the demo app's
example images, does not import the others and `datasets` with them.
"""

from __future__ import annotations

import importlib
from typing import Any

# Each public name of the package, and the module that defines it.
_MODULE_OF = {
    "load_caption_dataset": "sources",
    "NAMED_DATASETS": "sources",
    "DataReport": "report",
    "IssueTally": "report",
    "UNPARSEABLE_ROW": "report",
    "EMPTY_CAPTION": "report",
    "MISSING_IMAGE": "report",
    "NOT_IN_KARPATHY_SPLIT": "report",
    "UNREADABLE_IMAGE": "report",
    "SPLITS": "splits",
    "DEFAULT_VALIDATION_FRACTION": "splits",
    "DEFAULT_TEST_FRACTION": "splits",
    "stable_split": "splits",
    "CAPTION_FEATURES": "schema",
    "make_shapes_dataset": "shapes",
    "generate_shapes_scenes": "shapes",
    "write_shapes_examples": "shapes",
    "make_scenes_dataset": "scenes",
    "generate_scenes": "scenes",
    "convert_hub_flickr30k": "hub_flickr30k",
    "load_kaggle_flickr30k": "kaggle_flickr30k",
    "load_caption_imagefolder": "imagefolder",
    "filter_unreadable_images": "verification",
}

__all__ = list(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
