"""`ImgCapProcessor`: the image processor and the caption tokenizer behind one object, saved and loaded together.

Shipped to Hub users as remote code: imports only transformers and the sibling image processing and tokenization
files (which `save_pretrained` then copies next to this one).
"""

from transformers.image_processing_base import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .image_processing_imgcap import ImgCapImageProcessor
from .tokenization_imgcap import ImgCapTokenizer

# Label value that the loss ignores (PyTorch's `CrossEntropyLoss` default and the transformers convention).
IGNORE_INDEX = -100

# Tokens per caption, `<sos>` and `<eos>` included, when the caller sets no `max_length` and the tokenizer no
# `model_max_length`: train.py's `--max_caption_length` default, longer than 99.9% of Flickr30k's captions. A longer
# caption is cut to this length, keeping its `<eos>`, so a 10,000-character caption cannot blow up a batch.
DEFAULT_MAX_CAPTION_LENGTH = 40

# Tokenizers without a `model_max_length` report a huge sentinel (transformers' VERY_LARGE_INTEGER, about 1e30).
_NO_MODEL_MAX_LENGTH = 10**9


def caption_labels(
    input_ids: list[list[int]],
    attention_mask: list[list[int]] | None = None,
    pad_to_longest: bool = False,
) -> list[list[int]]:
    """Training labels for tokenized captions `<sos> w1 ... wn <eos>`: each caption without its `<sos>`, since the
    model predicts every token after it, with `IGNORE_INDEX` where `attention_mask` is 0 and, with `pad_to_longest`,
    after the end of each caption shorter than the longest.

    The one definition of labels: the processor, the training batches and the app's rescoring of generated captions
    all build theirs here.
    """
    labels = []
    for row, ids in enumerate(input_ids):
        mask = attention_mask[row] if attention_mask is not None else [1] * len(ids)
        labels.append([token if real else IGNORE_INDEX for token, real in zip(ids[1:], mask[1:])])
    if pad_to_longest:
        longest = max(len(caption) for caption in labels)
        labels = [caption + [IGNORE_INDEX] * (longest - len(caption)) for caption in labels]
    return labels


class ImgCapProcessor(ProcessorMixin):
    r"""
    Turns images into `pixel_values` and captions into training `labels` for `ImgCapForConditionalGeneration`, and
    decodes generated ids back into captions.

    Output contract of `__call__`:

    - `pixel_values`: `(batch, 3, height, width)` float32, from [`ImgCapImageProcessor`].
    - `labels`: the tokenized captions *without* their leading `<sos>`, i.e. `w1 ... wn <eos>`, right-padded with
      -100 (ignored by the loss). The model builds its decoder inputs by shifting the labels right: it prepends
      `<sos>` and turns -100 into `<pad>`, giving `<sos> w1 ... wn` aligned with the targets `w1 ... wn <eos>`, so
      each position is trained to predict the next word. No `decoder_input_ids` or attention mask is returned: the
      labels alone determine them, and an LSTM reads right-padded sequences without a mask. With
      `return_decoder_input_ids=True` the shifted ids come too, for Trainer's `label_smoothing_factor`, which takes
      the labels away from the model's inputs.
    - with `prefix` (caption prompts, instead of `text`): `decoder_input_ids` `<sos> w1 ... wk` without `<eos>`,
      left-padded with `<pad>`, and `decoder_attention_mask` (0 at padding), for `generate()` to continue each
      caption from its prefix; `""` gives just `<sos>`.

    Args:
        image_processor ([`ImgCapImageProcessor`]):
            Resizes, crops and normalises images.
        tokenizer ([`ImgCapTokenizer`]):
            Encodes captions as `<sos> w1 ... wn <eos>` and decodes ids.

    Example:

    ```python
    >>> from PIL import Image
    >>> from imgcap_hf import ImgCapImageProcessor, ImgCapProcessor, ImgCapTokenizer
    >>> tokenizer = ImgCapTokenizer.from_captions(["A dog runs .", "A cat sleeps ."], min_frequency=1)
    >>> processor = ImgCapProcessor(ImgCapImageProcessor(crop_size=32), tokenizer)
    >>> images = [Image.new("RGB", (64, 48)), Image.new("RGBA", (48, 64))]
    >>> batch = processor(images=images, text=["A dog runs .", "A cat ."], return_tensors="pt")
    >>> batch["pixel_values"].shape
    torch.Size([2, 3, 32, 32])
    >>> batch["labels"]  # a dog runs . <eos> / a cat . <eos> <ignored>
    tensor([[   4,   33,   34,   31,    3],
            [   4,   32,   31,    3, -100]])

    ```
    """

    def __init__(self, image_processor: ImgCapImageProcessor, tokenizer: ImgCapTokenizer):
        super().__init__(image_processor, tokenizer)

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs) -> list:
        """Load both parts with their own classes rather than through `AutoImageProcessor`/`AutoTokenizer`.

        The Auto classes only know custom classes that were registered in this Python process (or loaded as remote
        code); loading directly makes `ImgCapProcessor.from_pretrained` work without either.
        """
        return [
            ImgCapImageProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs),
            ImgCapTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs),
        ]

    def __call__(
        self,
        images=None,
        text: str | list[str] | None = None,
        return_tensors: str | None = None,
        padding: bool | str = True,
        truncation: bool | None = None,
        max_length: int | None = None,
        prefix: str | list[str] | None = None,
        return_decoder_input_ids: bool = False,
        **image_kwargs,
    ) -> BatchFeature:
        """
        Prepare model inputs: `pixel_values` from `images`, `labels` from `text` (see the class docstring).

        Args:
            images (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them, *optional*):
                Images in any mode or layout that [`to_rgb_image`] accepts.
            text (`str` or `list[str]`, *optional*):
                One caption per image (training targets).
            return_tensors (`str`, *optional*):
                `"pt"` for torch tensors, `"np"` for numpy arrays, `None` for lists.
            padding (`bool` or `str`, *optional*, defaults to `True`):
                Tokenizer padding: `True`/`"longest"` pads to the longest caption of the batch, `"max_length"` to
                `max_length`. Padded label positions are -100. Padding is always on the right, where the shift-right
                contract needs it.
            truncation (`bool`, *optional*, defaults to `True`):
                Cut captions longer than `max_length` (keeping `<eos>`). `False` keeps every caption whole.
            max_length (`int`, *optional*):
                Maximum tokenized caption length counting `<sos>` and `<eos>`, as for the tokenizer; the labels are
                one position shorter, since they drop `<sos>`. Defaults to the tokenizer's `model_max_length` when it
                has one, else `DEFAULT_MAX_CAPTION_LENGTH` (40, train.py's `--max_caption_length` default).
            prefix (`str` or `list[str]`, *optional*):
                One caption beginning per image, for `generate()` to continue (see the class docstring). Not together
                with `text`.
            return_decoder_input_ids (`bool`, *optional*, defaults to `False`):
                With `text`: also return the decoder inputs the model would build from the labels (`<sos> w1 ... wn`,
                `<pad>` where the labels are -100).
            image_kwargs:
                Passed to the image processor (e.g. `crop_size`).

        Raises:
            ValueError: neither images nor text nor prefix, both text and prefix, text that is not strings, or image
                and caption counts that differ.
        """
        if images is None and text is None and prefix is None:
            raise ValueError("ImgCapProcessor needs `images`, `text` or both, or caption prompts in `prefix`.")
        if text is not None and prefix is not None:
            raise ValueError(
                "Pass `text` (training captions) or `prefix` (caption prompts) to ImgCapProcessor, not both."
            )
        data = {}
        if images is not None:
            data.update(self.image_processor(images, **image_kwargs))
        if text is not None:
            data["labels"] = self._caption_labels(text, padding, truncation, max_length)
            if return_decoder_input_ids:
                data["decoder_input_ids"] = [
                    [self.tokenizer.bos_token_id]
                    + [self.tokenizer.pad_token_id if token == IGNORE_INDEX else token for token in labels[:-1]]
                    for labels in data["labels"]
                ]
        if prefix is not None:
            data.update(self._prompts(prefix))
        captions = data.get("labels", data.get("decoder_input_ids"))
        if images is not None and captions is not None and len(data["pixel_values"]) != len(captions):
            raise ValueError(
                f"Got {len(data['pixel_values'])} images but {len(captions)} captions or prefixes: pass one per image."
            )
        return BatchFeature(data, tensor_type=return_tensors)

    def _prompts(self, prefix: str | list[str]) -> dict[str, list[list[int]]]:
        """`<sos>` and each prefix's words (never `<eos>`), left-padded to the longest, with the mask that tells the
        model which positions are padding."""
        prefixes = [prefix] if isinstance(prefix, str) else prefix
        if not isinstance(prefixes, (list, tuple)) or not all(isinstance(item, str) for item in prefixes):
            raise ValueError(f"`prefix` must be a string or a list of strings, got {type(prefix).__name__}.")
        words = self.tokenizer(list(prefixes), add_special_tokens=False)["input_ids"] if prefixes else []
        prompts = [[self.tokenizer.bos_token_id, *ids] for ids in words]
        longest = max((len(ids) for ids in prompts), default=0)
        return {
            "decoder_input_ids": [[self.tokenizer.pad_token_id] * (longest - len(ids)) + ids for ids in prompts],
            "decoder_attention_mask": [[0] * (longest - len(ids)) + [1] * len(ids) for ids in prompts],
        }

    def _caption_labels(
        self, text: str | list[str], padding: bool | str, truncation: bool | None, max_length: int | None
    ) -> list[list[int]]:
        """`w1 ... wn <eos>` per caption, pad positions set to -100."""
        captions = [text] if isinstance(text, str) else text
        if not isinstance(captions, (list, tuple)) or not all(isinstance(caption, str) for caption in captions):
            raise ValueError(f"`text` must be a string or a list of strings, got {type(text).__name__}.")
        if max_length is None:
            model_max_length = getattr(self.tokenizer, "model_max_length", None) or _NO_MODEL_MAX_LENGTH
            max_length = model_max_length if model_max_length < _NO_MODEL_MAX_LENGTH else DEFAULT_MAX_CAPTION_LENGTH
        encoded = self.tokenizer(
            list(captions),
            padding=padding,
            truncation=True if truncation is None else truncation,
            max_length=max_length,
            padding_side="right",
            return_attention_mask=True,
        )
        for ids in encoded["input_ids"]:
            if ids[0] != self.tokenizer.bos_token_id:
                raise ValueError(
                    f"The tokenizer must start every caption with {self.tokenizer.bos_token}, got id {ids[0]} first."
                )
        return caption_labels(encoded["input_ids"], encoded["attention_mask"])

    @property
    def model_input_names(self) -> list[str]:
        """Inputs of the model's forward that this processor produces (`labels` are targets, not inputs)."""
        return ["pixel_values"]


__all__ = ["DEFAULT_MAX_CAPTION_LENGTH", "IGNORE_INDEX", "ImgCapProcessor", "caption_labels"]
