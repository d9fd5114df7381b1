"""From caption datasets (one row per image) to model inputs, for training and evaluation alike.

A batch holds whole images with all their captions: the encoder runs once per image and `image_indices` tells the
decoder which image each caption belongs to, so Flickr30k's five captions share one encoder pass. With a frozen
encoder and no augmentation, the encoder's output never changes, so `encode_images` computes it once per image and
`ImageCaptionCollator` serves it from memory: epochs after the first then cost only the decoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers.modeling_outputs import BaseModelOutput


def tokenize_captions(tokenizer, split: Dataset, max_length: int) -> list[list[list[int]]]:
    """Token ids (`<sos> ... <eos>`, at most `max_length` tokens) of every caption of every image in `split`."""
    captions = split["captions"]
    flat = [caption for image_captions in captions for caption in image_captions]
    flat_ids = tokenizer(flat, truncation=True, max_length=max_length)["input_ids"] if flat else []
    grouped, start = [], 0
    for image_captions in captions:
        grouped.append(flat_ids[start : start + len(image_captions)])
        start += len(image_captions)
    return grouped


class ImageCaptionCollator:
    """Builds a batch from a list of image rows of `split`.

    Returns `image_rows` (the rows, to find references and ids again), then either `encoder_features` (from
    `features`, a tensor indexed by row) or `pixel_values` (images run through `image_processor`), and when
    `caption_ids` are given, `labels` (each caption without `<sos>`, padded with -100) with `image_indices`.
    """

    def __init__(
        self,
        split: Dataset,
        image_processor,
        caption_ids: Sequence[Sequence[Sequence[int]]] | None = None,
        features: torch.Tensor | None = None,
    ):
        self.split = split
        self.image_processor = image_processor
        self.caption_ids = caption_ids
        self.features = features

    def __call__(self, rows: list[int]) -> dict[str, torch.Tensor]:
        batch = {"image_rows": torch.tensor(rows, dtype=torch.long)}
        if self.features is not None:
            batch["encoder_features"] = self.features[rows].float()  # (images, regions, feature_size)
        else:
            images = self.split[rows]["image"]  # PIL images in any mode: the processor converts them to RGB
            batch["pixel_values"] = self.image_processor(images, return_tensors="pt")["pixel_values"]
        if self.caption_ids is not None:
            labels, image_indices = [], []
            for position, row in enumerate(rows):
                for ids in self.caption_ids[row]:
                    labels.append(ids[1:])  # the model predicts every token after <sos>
                    image_indices.append(position)
            longest = max(len(ids) for ids in labels)
            batch["labels"] = torch.tensor([ids + [-100] * (longest - len(ids)) for ids in labels])
            batch["image_indices"] = torch.tensor(image_indices, dtype=torch.long)
        return batch


def image_inputs(batch: dict[str, torch.Tensor]) -> dict[str, object]:
    """The image part of a batch as model keyword arguments (`pixel_values` or cached `encoder_outputs`)."""
    if "encoder_features" in batch:
        return {"encoder_outputs": BaseModelOutput(last_hidden_state=batch["encoder_features"])}
    return {"pixel_values": batch["pixel_values"]}


@torch.no_grad()
def encode_images(
    model, split: Dataset, image_processor, batch_size: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Region features `(images, regions, feature_size)` of every image in `split`, kept on the CPU in `dtype`."""
    encoder = model.get_encoder()
    was_training = model.training
    model.eval()
    loader = DataLoader(
        list(range(len(split))),
        batch_size=batch_size,
        collate_fn=ImageCaptionCollator(split, image_processor),
        generator=torch.Generator(),  # encoding must not draw from (and so shift) the training RNG
    )
    chunks = []
    for batch in loader:
        regions = encoder(batch["pixel_values"].to(device)).last_hidden_state
        chunks.append(regions.to("cpu", dtype))
    model.train(was_training)
    return torch.cat(chunks)
