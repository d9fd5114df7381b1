"""Caption scores as coco-caption computes them, the two caption tokenizers they can run on, and the SCST reward.

- ``coco_metrics``: ``compute_caption_metrics`` (BLEU-1..4, CIDEr-D, ROUGE-L, METEOR) and the tokenizer choice.
- ``java_tokenizer``: coco-caption's own PTB tokenizer jar, run as a separate process (the default with Java).
- ``python_tokenizer``: our tokenizer of the same conventions, for machines without Java.
- ``cider_reward``: ``CaptionReward``, CIDEr-D (plus an optional BLEU-4 weight) of sampled token ids against their
  image's references, with document frequencies fixed from the training references.
"""

from .cider_reward import CaptionReward
from .coco_metrics import (
    CAPTION_TOKENIZERS,
    compute_caption_metrics,
    resolve_caption_tokenizer,
    tokenize_captions_for_scoring,
)
from .java_tokenizer import java_available, java_tokenize
from .python_tokenizer import python_tokenize

__all__ = [
    "CAPTION_TOKENIZERS",
    "CaptionReward",
    "compute_caption_metrics",
    "java_available",
    "java_tokenize",
    "python_tokenize",
    "resolve_caption_tokenizer",
    "tokenize_captions_for_scoring",
]
