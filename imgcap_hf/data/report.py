"""What a loader read, repaired and skipped: the `DataReport` that comes with every loaded dataset.

A dirty download should be visible in the logs (and in `data_report.json` beside the training results) instead of
silently shrinking the data, so every source counts its repairs and skips here, under the reasons below.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasets import DatasetDict

# Reasons under which `DataReport.skipped` counts what it dropped.
UNPARSEABLE_ROW = "unparseable_row"  # rows (csv or jsonl lines)
EMPTY_CAPTION = "empty_caption"  # captions
MISSING_IMAGE = "missing_image"  # rows naming an image file that does not exist
NOT_IN_KARPATHY_SPLIT = "not_in_karpathy_split"  # images absent from the split file
UNREADABLE_IMAGE = "unreadable_image"  # images that Pillow cannot decode

# Occurrences kept per tally: enough to find the culprits, few enough to keep a 30,000-row report short.
_MAX_EXAMPLES = 5


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
        source: what was loaded (`"shapes"`, `"scenes"`, `"flickr30k"` or the folder path).
        layout: how it was read: `shapes`, `scenes`, `hub-flickr30k`, `kaggle-flickr30k` or `imagefolder`.
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
