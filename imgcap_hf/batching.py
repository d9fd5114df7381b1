"""From caption datasets (one row per image) to model inputs, for training and evaluation alike.

A batch holds whole images with all their captions: the encoder runs once per image and `image_indices` tells the
decoder which image each caption belongs to, so Flickr30k's five captions share one encoder pass. With a frozen
encoder and no augmentation, the encoder's output never changes, so `encode_images` computes it once per image
(`imgcap_hf.feature_cache` keeps it on disk, shared by processes and runs) and `ImageCaptionCollator` serves it from
there: training and evaluation then cost only the decoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import datasets
import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers.modeling_outputs import BaseModelOutput

from .models.imgcap.image_processing_imgcap import load_image
from .models.imgcap.processing_imgcap import caption_labels

if TYPE_CHECKING:
    from .feature_cache import CachedFeatures


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

    Returns `dataset_rows` (the rows of `split`, to find references and ids again), then either `encoder_features`
    (from `features`: a tensor or a `feature_cache.CachedFeatures`, indexed by a list of rows) or `pixel_values`
    (images run through `image_processor`), and when `caption_ids` are given, `labels` (each caption without `<sos>`,
    padded with -100) with `image_indices` (for each caption, the position of its image in this batch: the model's
    `image_indices` argument).

    Image files are opened with `load_image(file, min_side=image_processor.load_min_side)`, exactly as the CLI and
    the pipeline open them: the same EXIF rotation, first frame of an animation and RGB conversion, and a large JPEG
    decoded at a reduced scale (memory bounded by `load_image`'s pixel limit), so training and serving see the same
    pixels. Unreadable files should have been dropped by `load_caption_dataset` (`verify_images=True`, its default);
    one that is still there stops the batch with a `ValueError` naming its row, id and what is wrong.
    """

    def __init__(
        self,
        split: Dataset,
        image_processor,
        caption_ids: Sequence[Sequence[Sequence[int]]] | None = None,
        features: torch.Tensor | CachedFeatures | None = None,
    ):
        self.split = split
        self.image_processor = image_processor
        self.caption_ids = caption_ids
        self.features = features
        self.min_side = getattr(image_processor, "load_min_side", None)
        # The same rows with the image column undecoded (`{"bytes", "path"}`), for `load_image`; a column of
        # anything else (e.g. PIL images from `Dataset.from_dict` without features) goes to the processor as it is.
        self._files = None
        if features is None and isinstance(split.features.get("image"), datasets.Image):
            self._files = split.cast_column("image", datasets.Image(decode=False))

    def __call__(self, rows: list[int]) -> dict[str, torch.Tensor]:
        batch = {"dataset_rows": torch.tensor(rows, dtype=torch.long)}
        if self.features is not None:
            batch["encoder_features"] = self.features[rows].float()  # (images, regions, feature_size)
        else:
            batch["pixel_values"] = self.image_processor(self.load_images(rows), return_tensors="pt")["pixel_values"]
        if self.caption_ids is not None:
            captions, image_indices = [], []
            for position, row in enumerate(rows):
                for ids in self.caption_ids[row]:
                    captions.append(ids)
                    image_indices.append(position)
            labels = caption_labels(captions, pad_to_longest=True)  # (captions, steps), padded with -100
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
            batch["image_indices"] = torch.tensor(image_indices, dtype=torch.long)
        return batch

    def load_images(self, rows: list[int]) -> list:
        """The images of `rows`, opened like serving opens them (see the class docstring)."""
        if self._files is None:
            return self.split[rows]["image"]  # PIL images in any mode: the processor converts them to RGB
        files = self._files[rows]
        images = []
        for row, image_id, file in zip(rows, files.get("image_id", [None] * len(rows)), files["image"]):
            try:
                images.append(
                    load_image(file["bytes"] if file["bytes"] is not None else file["path"], min_side=self.min_side)
                )
            except ValueError as error:
                name = f"row {row}" if image_id is None else f"row {row} ({image_id})"
                raise ValueError(
                    f"Image {name} cannot be used: {error} Load the dataset with verify_images=True to drop such "
                    "files."
                ) from error
        return images


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
