"""Free-running captioning of a whole split and its coco-caption scores, on one process or many.

Scores are corpus-level over the whole split with all references of every image, from captions the model generated
itself (never teacher-forced), which is what coco-caption reports and what older captioning code got wrong.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from datasets import Dataset
from torch.utils.data import DataLoader

from .batching import ImageCaptionCollator, image_inputs
from .scoring import compute_caption_metrics, python_tokenize

if TYPE_CHECKING:
    from .feature_cache import CachedFeatures


@torch.no_grad()
def generate_split_captions(
    accelerator: Accelerator, model, tokenizer, dataloader: DataLoader, generation_kwargs: dict[str, Any]
) -> dict[int, str]:
    """Caption every image the (prepared) `dataloader` yields; returns `{image row: caption}` on every process.

    Each process captions its shard; generated ids are padded to a common length and gathered, and
    `gather_for_metrics` drops the samples that the last uneven batch duplicated.
    """
    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()
    captions: dict[int, str] = {}
    for batch in dataloader:
        sequences = unwrapped.generate(**image_inputs(batch), **generation_kwargs)
        sequences = accelerator.pad_across_processes(sequences, dim=1, pad_index=tokenizer.pad_token_id)
        rows, sequences = accelerator.gather_for_metrics((batch["dataset_rows"], sequences))
        texts = tokenizer.batch_decode(sequences, skip_special_tokens=True)
        captions.update(zip(rows.tolist(), texts))
    unwrapped.train(was_training)
    return captions


def score_captions(captions: dict[int, str], split: Dataset, caption_tokenizer: str = "auto") -> dict[str, Any]:
    """coco-caption metrics of `{row: caption}` against all reference captions of those rows of `split`; the result
    names the caption tokenizer that produced it (`"tokenizer"`) and holds the captions' mean length in words
    (`"mean_caption_length"`), since self-critical training is known to lengthen or shorten them."""
    rows = sorted(captions)
    references = split.select(rows)["captions"]
    predictions = [captions[row] for row in rows]
    metrics = compute_caption_metrics(predictions, references, tokenizer=caption_tokenizer)
    return {**metrics, "mean_caption_length": mean_caption_length(predictions)}


def mean_caption_length(captions: list[str]) -> float:
    """The mean number of words of `captions` as coco-caption's scoring counts them: PTB tokens without punctuation
    (our Python tokenizer, so the count does not depend on which tokenizer scored, nor start a JVM)."""
    return sum(len(python_tokenize(caption).split()) for caption in captions) / len(captions)


def evaluate_split(
    accelerator: Accelerator,
    model,
    tokenizer,
    image_processor,
    split: Dataset,
    *,
    batch_size: int,
    generation_kwargs: dict[str, Any],
    features: torch.Tensor | CachedFeatures | None = None,
    caption_tokenizer: str = "auto",
) -> tuple[dict[str, Any], dict[int, str]]:
    """Caption `split` (from cached `features` when given) and score it with `caption_tokenizer` (see
    `imgcap_hf.scoring.compute_caption_metrics`); returns the metrics and the captions."""
    loader = DataLoader(
        list(range(len(split))),
        batch_size=batch_size,
        collate_fn=ImageCaptionCollator(split, image_processor, features=features),
        generator=torch.Generator(),  # evaluating must not draw from (and so shift) the training RNG
    )
    # Sharded without `accelerator.prepare`, which would register the loader and put it in every checkpoint.
    loader = prepare_data_loader(
        loader, accelerator.device, accelerator.num_processes, accelerator.process_index, put_on_device=True
    )
    captions = generate_split_captions(accelerator, model, tokenizer, loader, generation_kwargs)
    return score_captions(captions, split, caption_tokenizer), captions
