"""The pipelines Hub users get with the model: `image-captioning`, and transformers' `image-text-to-text` task.

Shipped to Hub users as remote code: imports only torch, transformers, the standard library and the sibling image
processing file. `ImgCapForConditionalGeneration.save_pretrained` names both pipelines in config.json's
`custom_pipelines` (`SHIPPED_PIPELINES`) and copies this file beside it, so that where `imgcap_hf` is not installed

    >>> from transformers import pipeline
    >>> captioner = pipeline("image-captioning", model="you/imgcap-shapes", trust_remote_code=True)
    >>> captioner("photo.jpg", num_beams=5)
    [{'generated_text': 'a large red circle on the left .'}]
    >>> continuer = pipeline("image-text-to-text", model="you/imgcap-shapes", trust_remote_code=True)
    >>> continuer("photo.jpg", text="A large")  # the text starts the caption; "" for none
    [{'input_text': 'A large', 'generated_text': 'A large red circle on the left .'}]

Images may be file paths, http(s) URLs (fetched with a time limit and a size limit), bytes, PIL images or arrays.
Both pipelines return, for every image, one result per returned sequence (`num_return_sequences`), and batching
(`batch_size=N`) never changes which image a caption belongs to or what it says.
"""

import io
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from transformers import GenerationConfig, Pipeline
from transformers.image_utils import valid_images
from transformers.pipelines.image_text_to_text import ImageTextToTextPipeline
from transformers.utils.chat_template_utils import Chat

from .image_processing_imgcap import load_image

# An image URL must answer within this many seconds, in all (connecting, every read): a stalled server cannot hold
# a caller forever. Pass `timeout=` to a pipeline (or to its call) for another limit.
DEFAULT_DOWNLOAD_TIMEOUT = 10.0
# The most bytes read from an image URL: the app's upload limit. Pass `max_download_bytes=` for another limit.
DEFAULT_MAX_DOWNLOAD_BYTES = 10 * 2**20
_DOWNLOAD_CHUNK_BYTES = 2**16

# config.json's `custom_pipelines`: what `pipeline(task, model=..., trust_remote_code=True)` builds for each task.
SHIPPED_PIPELINES = {
    "image-captioning": {
        "impl": "pipeline_imgcap.ImgCapCaptioningPipeline",
        "pt": ["AutoModelForImageTextToText"],
        "type": "multimodal",
    },
    "image-text-to-text": {
        "impl": "pipeline_imgcap.ImgCapImageTextToTextPipeline",
        "pt": ["AutoModelForImageTextToText"],
        "type": "multimodal",
    },
}

# The generation settings a call may pass as keywords: everything `GenerationConfig` knows.
GENERATION_PARAMETERS = frozenset(name for name in vars(GenerationConfig()) if not name.startswith("_"))


# ---------------------------------------------------------------------------------------------------------------------
# Images: files, URLs, bytes, PIL images, arrays
# ---------------------------------------------------------------------------------------------------------------------


def is_url(source: Any) -> bool:
    return isinstance(source, str) and source.startswith(("http://", "https://"))


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to another http(s) URL (urllib would also follow one to ftp://)."""

    def redirect_request(self, request, response, code, message, headers, new_url):
        if not is_url(new_url):
            raise ValueError(f"Cannot download image {request.full_url}: it redirects to {new_url}, not http(s).")
        return super().redirect_request(request, response, code, message, headers, new_url)


def download_image_bytes(
    url: str, timeout: float = DEFAULT_DOWNLOAD_TIMEOUT, max_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES
) -> bytes:
    """The body of an http(s) `url`, read within `timeout` seconds in all and refused beyond `max_bytes`.

    Raises:
        ValueError: one sentence naming the URL: unreachable, an HTTP error, too slow, or too large.
    """
    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url, headers={"User-Agent": "imgcap-pipeline"})
    try:
        with opener.open(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise ValueError(f"Cannot download image {url}: it is {int(declared):,} bytes, over the limit of "
                                 f"{max_bytes:,} (max_download_bytes).")  # fmt: skip
            chunks, size = [], 0
            # read1: what has arrived, so that a server sending a byte at a time still meets the deadline
            while chunk := response.read1(min(_DOWNLOAD_CHUNK_BYTES, max_bytes + 1 - size)):
                chunks.append(chunk)
                size += len(chunk)
                if size > max_bytes:
                    raise ValueError(f"Cannot download image {url}: it is over the limit of {max_bytes:,} bytes "
                                     "(max_download_bytes).")  # fmt: skip
                if time.monotonic() > deadline:
                    raise TimeoutError
    except urllib.error.HTTPError as error:
        raise ValueError(f"Cannot download image {url}: the server answered HTTP {error.code}.") from None
    except (TimeoutError, urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", None)
        if isinstance(error, TimeoutError) or isinstance(reason, TimeoutError):
            message = f"Cannot download image {url}: no complete answer within {timeout:g} s (timeout)."
            raise ValueError(message) from None
        raise ValueError(f"Cannot download image {url}: {reason or error}.") from None
    return b"".join(chunks)


def load_pipeline_image(
    source: Any,
    min_side: int | None = None,
    timeout: float | None = None,
    max_download_bytes: int | None = None,
) -> Any:
    """A PIL image from a path, an http(s) URL or bytes (decoded safely by `load_image`); PIL images and arrays are
    returned as they are, for the image processor to convert."""
    if is_url(source):
        data = download_image_bytes(
            source,
            timeout=DEFAULT_DOWNLOAD_TIMEOUT if timeout is None else timeout,
            max_bytes=DEFAULT_MAX_DOWNLOAD_BYTES if max_download_bytes is None else max_download_bytes,
        )
        named = io.BytesIO(data)
        named.name = source  # load_image's errors then name the URL's file
        return load_image(named, min_side=min_side)
    if isinstance(source, (str, Path, bytes)):
        return load_image(source, min_side=min_side)
    return source


def _image_parameters(timeout: float | None, max_download_bytes: int | None) -> dict[str, Any]:
    parameters = {"timeout": timeout, "max_download_bytes": max_download_bytes}
    return {name: value for name, value in parameters.items() if value is not None}


# ---------------------------------------------------------------------------------------------------------------------
# image-captioning
# ---------------------------------------------------------------------------------------------------------------------


class ImgCapCaptioningPipeline(Pipeline):
    """Caption images with an ImgCap model (or any image-to-text model whose `generate` takes `pixel_values`).

    Returns `[{"generated_text": caption}, ...]` per image, one entry per returned sequence, as transformers'
    former `image-to-text` task did. Generation settings come as keywords (`num_beams=5`, `do_sample=True`, any
    `GenerationConfig` field) or as one `generate_kwargs` mapping, at construction or per call; what is not given
    comes from the model's saved generation config.
    """

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = True
    _pipeline_calls_generate = True

    def _sanitize_parameters(
        self,
        generate_kwargs: dict[str, Any] | None = None,
        timeout: float | None = None,
        max_download_bytes: int | None = None,
        **kwargs,
    ):
        forward_kwargs = dict(generate_kwargs or {})
        for name in GENERATION_PARAMETERS & kwargs.keys():
            forward_kwargs[name] = kwargs.pop(name)
        if kwargs:
            raise TypeError(f"Unexpected arguments for the captioning pipeline: {sorted(kwargs)}.")
        return _image_parameters(timeout, max_download_bytes), {"generate_kwargs": forward_kwargs}, {}

    def preprocess(self, image, **image_parameters) -> dict[str, Any]:
        min_side = getattr(self.image_processor, "load_min_side", None)
        image = load_pipeline_image(image, min_side=min_side, **image_parameters)
        return self.image_processor(image, return_tensors="pt").to(dtype=self.dtype)

    def _forward(self, model_inputs: dict[str, Any], generate_kwargs: dict[str, Any]) -> dict[str, Any]:
        """Generate for a batch of images; the sequences come back grouped by image, so that splitting the batch
        into images (which transformers does by the first dimension) keeps every image's captions together."""
        generate_kwargs = self._prepare_generate_kwargs(generate_kwargs, return_dict_in_generate=False)
        num_images = model_inputs["pixel_values"].shape[0]
        sequences = self.model.generate(**model_inputs, **generate_kwargs)  # (images * returned, length)
        return {"sequences": sequences.reshape(num_images, -1, sequences.shape[-1])}  # (images, returned, length)

    def postprocess(self, model_outputs: dict[str, Any]) -> list[dict[str, str]]:
        sequences = model_outputs["sequences"].flatten(0, 1)  # (returned, length): this image's captions
        texts = self.tokenizer.batch_decode(sequences, skip_special_tokens=True)
        return [{"generated_text": text} for text in texts]


# ---------------------------------------------------------------------------------------------------------------------
# image-text-to-text: transformers' task, the text being the start of the caption
# ---------------------------------------------------------------------------------------------------------------------


def _is_image_input(value: Any) -> bool:
    """One image (a path, URL, bytes or image object) or a list of them, rather than a chat or a list of records."""
    if isinstance(value, (list, tuple)):
        return bool(value) and all(_is_image_input(item) for item in value)
    return isinstance(value, (str, Path, bytes)) or valid_images(value)


def caption_prompt_ids(tokenizer, prefix: str) -> list[int]:
    """`<sos> w1 ... wk`: the decoder input that makes the model continue `prefix` (an empty prefix is `<sos>` alone).
    The tokenizer ends every text with `<eos>`; a prompt must not, or the caption would be over before it starts.
    An empty prefix needs no tokenizing (encoding text needs spaCy, which plain captioning can do without)."""
    if not isinstance(prefix, str):
        raise ValueError(f"The text of an ImgCap image-text-to-text input is a caption prefix (a string), got "
                         f"{type(prefix).__name__}.")  # fmt: skip
    if not prefix.strip():
        return [tokenizer.bos_token_id]
    ids = tokenizer(prefix)["input_ids"]
    return ids[:-1] if ids and ids[-1] == tokenizer.eos_token_id else ids


class ImgCapImageTextToTextPipeline(ImageTextToTextPipeline):
    """transformers' `image-text-to-text` pipeline for ImgCap captioners: the text is the start of the caption
    (`""` for none), which the model continues; results are transformers' own (`input_text`, `generated_text`,
    `return_full_text`, `return_tensors`, `num_return_sequences`). Chats and text without an image are refused:
    a captioner has no dialogue and always needs an image."""

    def __call__(self, images=None, text=None, **kwargs):
        """transformers' call, where `text` may be left out for images given alone: the caption then has no prefix
        (transformers would read a lone string as a text-only prompt)."""
        if text is None and _is_image_input(images):
            text = ""
        return super().__call__(images, text=text, **kwargs)

    def check_model_type(self, supported_models):
        """ImgCap models are remote code, which transformers' list of image-text-to-text models cannot name."""
        if getattr(self.model.config, "model_type", None) != "imgcap":
            super().check_model_type(supported_models)

    def _sanitize_parameters(self, max_download_bytes: int | None = None, generate_kwargs=None, **kwargs):
        """transformers' parameters, plus `max_download_bytes`; generation settings may also come as keywords
        (`num_beams=3`), as in the captioning pipeline. The processor takes no options."""
        keywords = {name: kwargs.pop(name) for name in GENERATION_PARAMETERS - {"max_new_tokens"} & kwargs.keys()}
        if keywords or generate_kwargs:
            generate_kwargs = {**keywords, **(generate_kwargs or {})}
        preprocess_params, forward_params, postprocess_params = super()._sanitize_parameters(
            generate_kwargs=generate_kwargs, **kwargs
        )
        unexpected = sorted(set(preprocess_params) - {"timeout", "continue_final_message"})
        if unexpected:
            raise TypeError(f"Unexpected arguments for the ImgCap image-text-to-text pipeline: {unexpected}.")
        if max_download_bytes is not None:
            preprocess_params["max_download_bytes"] = max_download_bytes
        return preprocess_params, forward_params, postprocess_params

    def preprocess(self, inputs=None, timeout=None, max_download_bytes=None, continue_final_message=None):
        """`pixel_values`, and the prompts as `decoder_input_ids` with a `decoder_attention_mask` (1 on each prompt's
        tokens), for one image and prefix or for lists of them (one prefix may serve every image)."""
        if isinstance(inputs, Chat) or not isinstance(inputs, dict) or inputs.get("images") is None:
            raise ValueError("An ImgCap captioner takes images and an optional caption prefix as `text`, not a chat "
                             "or text alone.")  # fmt: skip
        images, prefixes = inputs["images"], inputs.get("text") or ""
        batched = isinstance(images, (list, tuple))
        images = list(images) if batched else [images]
        prefixes = [prefixes] * len(images) if isinstance(prefixes, str) else list(prefixes)
        if len(prefixes) != len(images):
            raise ValueError(f"Got {len(images)} images but {len(prefixes)} caption prefixes: pass one prefix per "
                             "image, or one string for all of them.")  # fmt: skip
        image_processor, tokenizer = self.processor.image_processor, self.processor.tokenizer
        min_side = getattr(image_processor, "load_min_side", None)
        loaded = [
            load_pipeline_image(image, min_side, **_image_parameters(timeout, max_download_bytes)) for image in images
        ]
        prompts = [caption_prompt_ids(tokenizer, prefix) for prefix in prefixes]
        longest = max(len(prompt) for prompt in prompts)
        pad = [tokenizer.pad_token_id]
        return {
            "pixel_values": image_processor(loaded, return_tensors="pt")["pixel_values"].to(self.dtype),
            "decoder_input_ids": torch.tensor([pad * (longest - len(p)) + p for p in prompts]),  # (images, longest)
            "decoder_attention_mask": torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts]),
            "text": prefixes if batched else prefixes[0],
        }

    def _forward(self, model_inputs, generate_kwargs=None):
        """Generate for every prompt length apart, so that no pad is ever fed to the decoder as a word (batching
        pads prompts, wherever the padding went), then return the sequences grouped by image, padded alike."""
        generate_kwargs = self._prepare_generate_kwargs(generate_kwargs or {}, return_dict_in_generate=False)
        pixel_values, mask = model_inputs["pixel_values"], model_inputs["decoder_attention_mask"].bool()
        prompts = [ids[keep] for ids, keep in zip(model_inputs["decoder_input_ids"], mask)]  # each (length,)
        lengths = torch.tensor([len(prompt) for prompt in prompts])
        by_image = [None] * len(prompts)
        for length in lengths.unique().tolist():
            rows = (lengths == length).nonzero().squeeze(1)  # (group,)
            prompt_ids = torch.stack([prompts[row] for row in rows.tolist()])  # (group, length)
            sequences = self.model.generate(
                pixel_values=pixel_values[rows], decoder_input_ids=prompt_ids, **generate_kwargs
            )  # (group * returned, steps)
            for row, image_sequences in zip(rows.tolist(), sequences.reshape(len(rows), -1, sequences.shape[-1])):
                by_image[row] = image_sequences  # (returned, steps)
        pad_token_id = self.processor.tokenizer.pad_token_id
        steps = max(sequences.shape[-1] for sequences in by_image)
        padded = [F.pad(sequences, (0, steps - sequences.shape[-1]), value=pad_token_id) for sequences in by_image]
        generated = torch.stack(padded)  # (images, returned, steps)
        input_ids = torch.where(mask, model_inputs["decoder_input_ids"], pad_token_id)  # (images, longest)
        return {"generated_sequence": generated, "prompt_text": model_inputs["text"], "input_ids": input_ids}


__all__ = [
    "DEFAULT_DOWNLOAD_TIMEOUT",
    "DEFAULT_MAX_DOWNLOAD_BYTES",
    "SHIPPED_PIPELINES",
    "ImgCapCaptioningPipeline",
    "ImgCapImageTextToTextPipeline",
    "caption_prompt_ids",
    "download_image_bytes",
    "load_pipeline_image",
]
