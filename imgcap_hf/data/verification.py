"""Decode every image of a loaded dataset once, and drop (and report) the ones that fail.

datasets decodes images only when a row is read, so without this check a truncated JPEG or a text file named `.jpg`
would crash training in the middle of an epoch, hours after loading succeeded.
"""

from __future__ import annotations

from typing import Any

import datasets
from datasets import DatasetDict

from ..models.imgcap.image_processing_imgcap import load_image
from .report import UNREADABLE_IMAGE, DataReport


def filter_unreadable_images(
    dataset_dict: DatasetDict, report: DataReport, num_proc: int | None = None
) -> DatasetDict:
    """Decode every image once and drop the rows whose image fails, recording them in `report`.

    The check is `load_image`'s, the one serving applies: empty files, non-images (SVG, text, random bytes),
    truncated or corrupt files, decompression bombs (more pixels than Pillow's limit) and images over
    `DEFAULT_MAX_PIXELS` are all dropped, each reported with its id and the reason. Every pixel of every image is
    decoded, so on Flickr30k this takes a while: `num_proc` processes share the work.
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
            # Pillow's own error where it raised one (it names the defect, e.g. "image file is truncated"), else
            # load_image's sentence (an empty file, or more pixels than allowed).
            cause = error.__cause__
            problems.append((f"{type(cause).__name__}: {cause}" if cause is not None else str(error))[:200])
        except Exception as error:  # anything else still means unusable, and must not stop the check
            problems.append(f"{type(error).__name__}: {error}"[:200])
    return {"problem": problems}
