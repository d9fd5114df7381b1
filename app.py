"""Gradio demo: caption a picture, list the n best captions with their scores and, for attention models, show where
the model looked for each word (the Show, Attend and Tell view).

    python app.py                                        # outputs/shapes-attention, what `make demo` trains
    python app.py --model DIR_OR_HUB_ID [--model ANOTHER] [--host 127.0.0.1] [--port 7860] [--precision auto]

The same settings come from the environment for Hugging Face Spaces: `IMGCAP_MODELS` (comma-separated model folders or
Hub ids), `GRADIO_SERVER_NAME`, `GRADIO_SERVER_PORT`, `IMGCAP_PRECISION`.

`--precision auto` (the default) serves each model on CPU in the fastest setting of `imgcap_hf.inference` whose
captions of `PRECISION_CHECK_IMAGES` shapes test scenes equal fp32's, chosen at start-up; the page and the log say
which one it uses. `fp32`, `int8` or `bf16` sets it for every model.

Serving defaults, chosen for a public demo: bound to 127.0.0.1 unless told otherwise, never a share link, no
analytics, no flagging (Blocks has none), uploads capped at 10 MB, images at `DEFAULT_MAX_PIXELS`, a bounded queue,
bounded concurrency, a time limit per caption, decoding parameters clamped to the UI's ranges (API callers can send
anything), a full queue answered with one "busy" sentence, images opened only from Gradio's upload folder (an API
caller cannot name a file on the server, nor a URL for the server to download), and unusable input answered with one
sentence (`gr.Error`) while other errors stay in the server log.

API (`gradio_client`):

    Client(url).predict(handle_file("photo.jpg"), api_name="/caption")   # -> (caption, n-best table, heatmaps)
    Client(url).predict(handle_file("photo.jpg"), api_name="/caption_batch")  # -> (caption, error), batched
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import errno
import functools
import hashlib
import io
import math
import os
import secrets
import socket
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from fastapi.responses import JSONResponse
from gradio.utils import get_upload_folder
from gradio_client.utils import is_http_url_like
from PIL import Image

from imgcap_hf import ImgCapForConditionalGeneration, ImgCapProcessor, load_image
from imgcap_hf.data.shapes import generate_shapes_scenes, write_shapes_examples
from imgcap_hf.heatmaps import (  # noqa: F401 (DISPLAY_SIDE, OUTSIDE_CROP_BRIGHTNESS: the drawing's settings, read here by tests)
    DISPLAY_SIDE,
    OUTSIDE_CROP_BRIGHTNESS,
    RegionCentres,
    attention_overlays,
    measure_region_centres,
    words_with_attention,
)
from imgcap_hf.inference import PRECISIONS, choose_precision, optimize_for_cpu
from imgcap_hf.loading import check_model_folder, load_captioner, local_model_folder
from imgcap_hf.models.imgcap.processing_imgcap import IGNORE_INDEX, caption_labels

# The folder `make demo` trains into; used when no model is named.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "outputs" / "shapes-attention"

# Serving limits.
MAX_FILE_SIZE = 10 * 1024 * 1024  # bytes per upload; Gradio answers larger uploads with HTTP 413
QUEUE_MAX_SIZE = 32  # waiting requests beyond this are turned away at once instead of piling up
CONCURRENCY_LIMIT = 2  # captions computed at the same time (the demo targets a 2-core CPU Space)
MAX_BATCH_SIZE = 8  # images one call of the batched endpoint may gather from the queue
PRECISION_CHECK_IMAGES = 16  # shapes test scenes whose captions decide `--precision auto` at start-up
TIME_LIMIT_SECONDS = 20.0  # generation stops after this long and returns what it has (transformers' `max_time`)
RETRY_AFTER_SECONDS = 30  # what a caller turned away by a full queue is told to wait (the Retry-After header)
CACHE_MAX_AGE_SECONDS = 3600  # uploads and results are deleted from Gradio's cache after about an hour
# Gradio keeps a record per session (a copy of every component's config), and each API call without a session is a new
# session: with Gradio's default of 10,000 records, memory grows with every call until that many are held (README,
# "The app under load"). The records hold nothing this app needs (it has no gr.State), so a forgotten session only
# starts a fresh one.
STATE_SESSION_CAPACITY = 100

# Decoding ranges: the UI's sliders, and the clamps applied to every request.
MAX_BEAMS = 10
MAX_NEW_TOKENS = 64
LENGTH_PENALTY_RANGE = (0.0, 2.0)
TEMPERATURE_RANGE = (0.05, 2.0)
TOP_P_RANGE = (0.05, 1.0)
MAX_SEED = 2**32 - 1

HEATMAPS_TITLE = "Where the model looked, word by word (attention models only)"
BUSY_MESSAGE = "The server is busy with other captions; please try again in a minute."
NOT_UPLOADED_MESSAGE = "The image must be uploaded with the request; the server does not open files by path."
URL_MESSAGE = "The image must be uploaded with the request; the server does not download images from URLs."
NO_MODEL_MESSAGE = (
    "**No captioning model is loaded.** Train the demo model with `make demo` (a few minutes on a CPU; it writes "
    "`outputs/shapes-attention`), or start the app with `python app.py --model DIR_OR_HUB_ID`."
)


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Captioner:
    """One loaded model, its processor, and the label the model selector shows."""

    label: str
    model: ImgCapForConditionalGeneration
    processor: ImgCapProcessor
    precision: str = "fp32"  # the CPU inference setting it runs in (`imgcap_hf.inference`), and why
    _region_centres: dict[tuple[int, int], RegionCentres] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def has_attention(self) -> bool:
        return self.model.config.decoder_type == "attention"

    def region_centres(self, input_height: int, input_width: int) -> RegionCentres:
        """Where the encoder's regions lie on an input of this size (`measure_region_centres`), measured once per size;
        the heatmaps place each region's weight there."""
        size = (input_height, input_width)
        if size not in self._region_centres:
            self._region_centres[size] = measure_region_centres(self.model.get_encoder(), *size)
        return self._region_centres[size]


def load_captioners(model_paths: Sequence[str], precision: str = "fp32") -> dict[str, Captioner]:
    """Load every model once, in eval mode, keyed by a label such as `"attention (shapes-attention)"`, prepared for
    CPU inference in `precision` (`serving_precision`); for attention models, measure where their regions lie
    (`Captioner.region_centres`) for the processor's usual input size.

    Raises `load_captioner`'s one-sentence `ValueError` for a folder or Hub id that holds no usable ImgCap model
    (missing or mismatched files, pickle-only weights, a tokenizer of another model): a model the operator named
    explicitly should stop the start-up, not fail on the first request.
    """
    captioners = {}
    for path in model_paths:
        model, processor = load_captioner(path)
        model, setting = serving_precision(model, processor, precision)
        label = f"{model.config.decoder_type} ({Path(str(path).rstrip('/')).name})"
        if label in captioners:
            label = f"{label} #{len(captioners) + 1}"
        print(f"* {label}: inference in {setting}", flush=True)
        captioners[label] = Captioner(label, model, processor, setting)
        if captioners[label].has_attention:
            # Now rather than on the first request: no request waits for it.
            usual_input = processor(images=Image.new("RGB", (256, 256)), return_tensors="pt")["pixel_values"]
            captioners[label].region_centres(*usual_input.shape[-2:])  # (1, 3, height, width)
    return captioners


def serving_precision(
    model: ImgCapForConditionalGeneration, processor: ImgCapProcessor, precision: str
) -> tuple[ImgCapForConditionalGeneration, str]:
    """The model prepared for CPU inference in `precision`, and a line saying which setting it runs in. `"auto"`
    chooses the fastest setting whose captions of `PRECISION_CHECK_IMAGES` shapes test scenes (beam search with the
    app's defaults) equal fp32's (`choose_precision`). A model on a GPU runs as loaded."""
    if model.device.type != "cpu":
        return model, f"{model.dtype} on {model.device} (as loaded)"
    if precision != "auto":
        return optimize_for_cpu(model, precision), f"{precision} (set by --precision)"
    scenes = generate_shapes_scenes(num_train=0, num_validation=0, num_test=PRECISION_CHECK_IMAGES, seed=1)
    images = [scene.image for scene in scenes["test"]]
    defaults = DecodingSettings()
    model, choice = choose_precision(
        model, processor, images, num_beams=defaults.num_beams, max_new_tokens=defaults.max_new_tokens
    )
    return model, choice.describe()


# ---------------------------------------------------------------------------------------------------------------------
# Decoding settings: defaults from the model, every value clamped
# ---------------------------------------------------------------------------------------------------------------------


def _clamp(value: object, low: float, high: float, default: float) -> float:
    """`value` as a float within [low, high]; anything that is not a finite number gives `default`."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default
    if not math.isfinite(number):
        return default
    return min(max(number, low), high)


@dataclasses.dataclass(frozen=True)
class DecodingSettings:
    num_beams: int = 5
    max_new_tokens: int = 20
    length_penalty: float = 1.0
    num_captions: int = 3
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 0.9
    seed: int = 0

    @classmethod
    def clamped(cls, **values: object) -> DecodingSettings:
        """Settings from untrusted values (an API call can send beams=500): each is forced into the UI's range.

        With beam search at most `num_beams` captions exist; sampling (one beam) draws up to `MAX_BEAMS` of them.
        """
        defaults = cls()
        num_beams = round(_clamp(values.get("num_beams"), 1, MAX_BEAMS, defaults.num_beams))
        do_sample = bool(values.get("do_sample", defaults.do_sample))
        most_captions = MAX_BEAMS if do_sample and num_beams == 1 else num_beams
        return cls(
            num_beams=num_beams,
            max_new_tokens=round(_clamp(values.get("max_new_tokens"), 1, MAX_NEW_TOKENS, defaults.max_new_tokens)),
            length_penalty=_clamp(values.get("length_penalty"), *LENGTH_PENALTY_RANGE, defaults.length_penalty),
            num_captions=round(_clamp(values.get("num_captions"), 1, most_captions, defaults.num_captions)),
            do_sample=do_sample,
            temperature=_clamp(values.get("temperature"), *TEMPERATURE_RANGE, defaults.temperature),
            top_p=_clamp(values.get("top_p"), *TOP_P_RANGE, defaults.top_p),
            seed=round(_clamp(values.get("seed"), 0, MAX_SEED, defaults.seed)),
        )

    def generate_kwargs(self) -> dict[str, object]:
        kwargs = {
            "num_beams": self.num_beams,
            "max_new_tokens": self.max_new_tokens,
            "num_return_sequences": self.num_captions,
            "do_sample": self.do_sample,
        }
        if self.num_beams > 1:  # the length penalty only exists in beam search
            kwargs["length_penalty"] = self.length_penalty
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=0)  # top_k=0: only top-p filters
        return kwargs


def model_defaults(captioner: Captioner | None) -> DecodingSettings:
    """The UI's starting values: the model's saved generation config where it has one, clamped to the UI's ranges.

    A saved beam width counts only when it asks for beam search: train.py saves greedy defaults (so that a user's
    `generate(do_sample=True)` samples), and the app's n-best table needs beams, so greedy leaves the app's own."""
    if captioner is None:
        return DecodingSettings()
    config = captioner.model.generation_config
    num_beams = config.num_beams if (config.num_beams or 1) > 1 else DecodingSettings.num_beams
    return DecodingSettings.clamped(
        num_beams=num_beams,
        max_new_tokens=config.max_new_tokens or DecodingSettings.max_new_tokens,
        length_penalty=config.length_penalty,
        num_captions=min(DecodingSettings.num_captions, num_beams),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Captioning: n-best captions, their scores, and the attention of the best one
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CaptionResult:
    captions: list[tuple[str, float]]  # (caption, score), best first
    word_attention: list[tuple[str, np.ndarray]]  # best caption: (word, (regions,) weights); empty for pooled models
    region_centres: RegionCentres | None = None  # where the weights' regions lie on the model input (attention models)


def caption_image(
    captioner: Captioner, image: Image.Image, settings: DecodingSettings, time_limit: float = TIME_LIMIT_SECONDS
) -> CaptionResult:
    """Generate captions for one upright RGB image, then score them and read their attention in one teacher-forced
    pass.

    The score is the caption's log-probability under the model (temperature 1, no top-p), divided by
    `length ** length_penalty` where length counts the generated words and `<eos>`: the number beam search ranks by,
    so beam search's own order is kept, and sampled captions get comparable scores. The same pass gives the attention
    weights of every word of the chosen caption exactly (no need to follow beams through `generate`'s outputs).
    """
    model, processor = captioner.model, captioner.processor
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]  # (1, 3, height, width)
    with torch.inference_mode():
        sequences = model.generate(
            pixel_values=pixel_values, max_time=time_limit, **settings.generate_kwargs()
        )  # (captions, 1 + steps): <sos> words <eos> <pad>...
        labels = _labels_from_sequences(sequences, model.config)  # (captions, steps), ignored after <eos>
        output = model(
            pixel_values=pixel_values,
            decoder_input_ids=model.prepare_decoder_input_ids_from_labels(labels),
            image_indices=torch.zeros(len(labels), dtype=torch.long),  # one encoder pass serves every caption
            output_attentions=captioner.has_attention,
        )
    scores = _caption_scores(output.logits, labels, settings.length_penalty)  # (captions,)
    texts = processor.batch_decode(sequences, skip_special_tokens=True)
    captions, best = _rank_captions(texts, scores.tolist())

    if output.cross_attentions is None:
        return CaptionResult(captions, [])
    weights = output.cross_attentions[0][best, 0]  # (steps, regions)
    word_attention = words_with_attention(weights, labels[best], processor.tokenizer)
    return CaptionResult(captions, word_attention, captioner.region_centres(*pixel_values.shape[-2:]))


def _labels_from_sequences(sequences: torch.LongTensor, config) -> torch.LongTensor:
    """`generate`'s output as labels (`caption_labels`): without `<sos>`, everything after the first `<eos>` set to
    -100 (ignored).

    Beam search pads finished captions with `pad_token_id` (or `<eos>` when that is 0): neither may count as a word.
    """
    is_eos = sequences[:, 1:] == config.eos_token_id  # (captions, steps)
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0  # strictly after the first <eos>
    attention_mask = torch.cat([torch.ones_like(is_eos[:, :1]), ~after_eos], dim=1)  # (captions, 1 + steps)
    return torch.tensor(caption_labels(sequences.tolist(), attention_mask.tolist()), dtype=torch.long)


def _caption_scores(logits: torch.Tensor, labels: torch.LongTensor, length_penalty: float) -> torch.Tensor:
    """(captions,) log-probability of each caption's labels, divided by `length ** length_penalty`."""
    log_probs = logits.float().log_softmax(dim=-1)  # (captions, steps, vocab)
    kept = labels != IGNORE_INDEX  # (captions, steps)
    token_log_probs = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * kept
    return token_log_probs.sum(dim=-1) / kept.sum(dim=-1).float() ** length_penalty


def _rank_captions(texts: list[str], scores: list[float]) -> tuple[list[tuple[str, float]], int]:
    """The distinct captions with their scores, best first (sampling can draw the same caption twice), and the row of
    the best one."""
    order = sorted(range(len(texts)), key=lambda row: -scores[row])
    captions, seen = [], set()
    for row in order:
        if texts[row] not in seen:
            seen.add(texts[row])
            captions.append((texts[row], scores[row]))
    return captions, order[0]


# ---------------------------------------------------------------------------------------------------------------------
# Request handlers: what the UI and the API call
# ---------------------------------------------------------------------------------------------------------------------


def save_heatmap_files(
    overlays: list[tuple[Image.Image, str]], folder: str | Path, key: bytes
) -> list[tuple[str, str]]:
    """Each (heatmap, word) as (PNG file, word): the files Gradio serves for the gallery.

    Handed PIL images, Gradio writes each one to a path named by its content with a plain write, so two requests with
    the same answer (the same example clicked twice at once) rewrite one file while the other's response is sending
    it, and that client gets a truncated file. Handed paths inside its cache folder, Gradio serves the files where
    they lie. Here each file is named by a keyed hash of its bytes (identical answers share one file, so the disk
    holds each distinct heatmap once, and nobody who lacks `key` can name someone else's heatmap), written under a
    unique temporary name and renamed into place: a response that is sending the file keeps the copy it opened,
    and every copy holds the same bytes. Each request renames its own copy, whose fresh ctime keeps Gradio's hourly
    cache clean-up from deleting a file that was just handed out again.
    """
    files = []
    for overlay, word in overlays:
        buffer = io.BytesIO()
        overlay.save(buffer, format="PNG")
        data = buffer.getvalue()
        target = Path(folder) / hashlib.blake2b(data, key=key, digest_size=32).hexdigest() / "heatmap.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        descriptor, staging = tempfile.mkstemp(dir=target.parent, prefix=".heatmap-", suffix=".png")
        try:
            with os.fdopen(descriptor, "wb") as staged:
                staged.write(data)
            os.replace(staging, target)
        except BaseException:
            Path(staging).unlink(missing_ok=True)
            raise
        files.append((str(target), word))
    return files


def upload_only(image: gr.Image) -> gr.Image:
    """`image`, made never to download: Gradio fetches a file payload whose path is an `http(s)` URL into its cache
    before the handler runs (with no size or time limit of ours, and for `/caption_batch` a refusal there would fail
    every request of the batch). Here the URL reaches the handler as it came, and `CaptionService._load` refuses it
    with one sentence (`URL_MESSAGE`).

    Gradio moves each input file through the component's `(async_)move_resource_to_block_cache`; these are replaced
    on this one component, not in a subclass: Gradio writes a `.pyi` stub next to the source of every Component
    subclass it sees defined.
    """
    move_to_cache, async_move_to_cache = image.move_resource_to_block_cache, image.async_move_resource_to_block_cache

    def move_unless_url(url_or_file_path: str | Path | None) -> str | None:
        return url_or_file_path if is_http_url_like(url_or_file_path) else move_to_cache(url_or_file_path)

    async def async_move_unless_url(url_or_file_path: str | Path | None) -> str | None:
        if is_http_url_like(url_or_file_path):
            return url_or_file_path
        return await async_move_to_cache(url_or_file_path)

    image.move_resource_to_block_cache = move_unless_url
    image.async_move_resource_to_block_cache = async_move_unless_url
    return image


def _glibc_function(name: str):
    """A function of glibc (`malloc_trim`, `mallopt`), or None where the C library is another one (macOS, Windows,
    musl)."""
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _glibc_function("malloc_trim")
_MALLOPT = _glibc_function("mallopt")
M_ARENA_MAX = -8  # glibc's mallopt parameter number for the most arenas it creates
MALLOC_ARENAS = 2  # one per core of the 2-core Space the demo targets, against glibc's default of 8 per core


def limit_malloc_arenas(count: int = MALLOC_ARENAS) -> bool:
    """Cap the arenas glibc's allocator creates for new threads at `count`; True where that took effect.

    Each arena keeps the peak of the requests that ran on its threads, so with glibc's default (8 per core) the
    server's resident memory climbs for minutes as requests reach more of Gradio's worker threads (README, "A soak of
    the app"). Called before the server starts its threads; the same as `MALLOC_ARENA_MAX=2` in the environment.
    """
    return _MALLOPT is not None and _MALLOPT(M_ARENA_MAX, count) == 1


def _release_free_memory() -> None:
    """Hand the memory the C allocator holds free back to the system, as each request ends.

    Gradio runs handlers in a pool of worker threads, and glibc gives threads separate arenas (up to 8 per core),
    each of which keeps the memory a request freed (decoded images, tensors, heatmaps) for later use by its own
    threads. As requests land on more threads, more arenas reach their peak, and the server's resident memory climbs
    for many minutes without the program holding more (README, "A soak of the app"). `malloc_trim(0)` returns the
    free pages of every arena; elsewhere this does nothing.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def releases_free_memory(handler):
    """`handler`, followed by `_release_free_memory` however it ends (Gradio still reads `handler`'s signature)."""

    @functools.wraps(handler)
    def releasing(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        finally:
            _release_free_memory()

    return releasing


def _user_error(message: str) -> gr.Error:
    """An error whose one-sentence message is shown to the user; the server log gets no traceback for it."""
    return gr.Error(message, print_exception=False)


class CaptionService:
    """The request handlers, bound to the models loaded at start-up.

    Generation runs under `torch.inference_mode()` in Gradio's worker threads. Sampling seeds torch's global random
    generator (`generate` has no per-call generator), so seeded sampling runs one request at a time to stay
    reproducible while other requests run.

    Heatmaps are written as PNG files into `heatmap_folder` (`save_heatmap_files`), by default Gradio's cache folder,
    where Gradio serves them without copying and deletes them with its other cached files.

    `upload_folder`, when given (the served app gives Gradio's), is the only folder images are opened from. Gradio
    checks that a file payload names an uploaded file only when the payload carries its `meta` marker: an API caller
    who sends `{"path": "/any/file.png"}` without it reaches the handler with that path, and would otherwise get any
    image the server can read captioned and drawn back as heatmaps, and learn which other files exist.
    """

    def __init__(
        self,
        captioners: dict[str, Captioner],
        time_limit: float = TIME_LIMIT_SECONDS,
        upload_folder: str | Path | None = None,
        heatmap_folder: str | Path | None = None,
    ):
        self.captioners = captioners
        self.time_limit = time_limit
        self.upload_folder = Path(upload_folder).resolve() if upload_folder is not None else None
        self.heatmap_folder = Path(heatmap_folder if heatmap_folder is not None else get_upload_folder()).resolve()
        self._heatmap_key = secrets.token_bytes(32)
        self._sampling_lock = threading.Lock()

    def _captioner(self, label: object) -> Captioner:
        if not self.captioners:
            raise _user_error("No captioning model is loaded: run `make demo` or start the app with --model.")
        if label is None and len(self.captioners) == 1:
            return next(iter(self.captioners.values()))
        if not isinstance(label, str) or label not in self.captioners:  # an API caller may send a list or a dict
            raise _user_error(f"Unknown model; choose one of: {', '.join(self.captioners)}.")
        return self.captioners[label]

    def _load(self, image: str | dict | None, captioner: Captioner) -> Image.Image:
        """Open the request's image with `load_image`, whose one-sentence `ValueError` becomes the user's message.

        `image` is a path, or Gradio's raw file payload (a dict with the uploaded file's `path` in Gradio's cache): the
        events skip Gradio's preprocessing, which opens every upload with Pillow before the handler runs, so that
        random bytes or a decompression bomb would fail there with an error the user never sees explained. A URL is
        refused (`upload_only` keeps Gradio from downloading it), and a path outside `upload_folder` is refused
        before the file is touched, with the same message whether it exists or not.
        """
        path = image.get("path") if isinstance(image, dict) else image
        if path is None:
            raise _user_error(
                "No image was given: upload one, take one with the webcam, paste one or pick an example."
            )
        if is_http_url_like(path):  # what `upload_only` left undownloaded
            raise _user_error(URL_MESSAGE)
        if self.upload_folder is not None and not (
            isinstance(path, str) and Path(path).resolve().is_relative_to(self.upload_folder)
        ):  # resolve() first: `..` and symbolic links cannot lead out of the folder
            raise _user_error(NOT_UPLOADED_MESSAGE)
        try:
            # The same reduced JPEG decode as training, the CLI and the pipeline: same pixels, bounded memory.
            return load_image(path, min_side=captioner.processor.image_processor.load_min_side)
        except ValueError as error:  # one sentence naming the file (not its folder) and what is wrong
            raise _user_error(str(error)) from None

    @releases_free_memory
    def caption(
        self,
        image: str | dict | None,
        model_label: str | None = None,
        num_beams: float = DecodingSettings.num_beams,
        max_new_tokens: float = DecodingSettings.max_new_tokens,
        length_penalty: float = DecodingSettings.length_penalty,
        num_captions: float = DecodingSettings.num_captions,
        do_sample: bool = DecodingSettings.do_sample,
        temperature: float = DecodingSettings.temperature,
        top_p: float = DecodingSettings.top_p,
        seed: float = DecodingSettings.seed,
    ) -> tuple[str, list[list[object]], list[tuple[str, str]]]:
        """The `/caption` endpoint: (best caption, n-best table rows [caption, score], one heatmap file per word)."""
        captioner = self._captioner(model_label)
        picture = self._load(image, captioner)
        settings = DecodingSettings.clamped(
            num_beams=num_beams, max_new_tokens=max_new_tokens, length_penalty=length_penalty,
            num_captions=num_captions, do_sample=do_sample, temperature=temperature, top_p=top_p, seed=seed,
        )  # fmt: skip
        if settings.do_sample:
            with self._sampling_lock:
                torch.manual_seed(settings.seed)
                result = caption_image(captioner, picture, settings, self.time_limit)
        else:
            result = caption_image(captioner, picture, settings, self.time_limit)
        table = [[text, round(score, 4)] for text, score in result.captions]
        overlays = attention_overlays(
            picture, result.word_attention, captioner.processor.image_processor, result.region_centres
        )
        return result.captions[0][0], table, save_heatmap_files(overlays, self.heatmap_folder, self._heatmap_key)

    @releases_free_memory
    def caption_batch(self, images: list[str | dict | None]) -> tuple[list[str], list[str]]:
        """The `/caption_batch` endpoint, which Gradio calls with up to `MAX_BATCH_SIZE` queued requests at once.

        One `generate` call captions all of them with the first model's saved settings. Each request gets
        (caption, error) with exactly one of them empty: raising `gr.Error` would fail every request of the batch,
        including the good ones.
        """
        captioner = self._captioner(next(iter(self.captioners), None))
        captions, errors, pictures, rows = [""] * len(images), [""] * len(images), [], []
        for row, image in enumerate(images):
            try:
                pictures.append(self._load(image, captioner))
                rows.append(row)
            except gr.Error as error:
                errors[row] = error.message
        if pictures:
            settings = dataclasses.replace(model_defaults(captioner), num_captions=1)
            inputs = captioner.processor(images=pictures, return_tensors="pt")  # (images, 3, height, width)
            with torch.inference_mode():
                sequences = captioner.model.generate(
                    **inputs, max_time=self.time_limit, **settings.generate_kwargs()
                )  # (images, 1 + steps)
            for row, text in zip(rows, captioner.processor.batch_decode(sequences, skip_special_tokens=True)):
                captions[row] = text
        return captions, errors


# ---------------------------------------------------------------------------------------------------------------------
# Example images, generated at start-up (no copied photos)
# ---------------------------------------------------------------------------------------------------------------------


def write_examples(directory: str | Path) -> list[tuple[Path, str]]:
    """Write example images into `directory`: shapes test scenes (never trained on), and the same kind of scene as an
    RGBA PNG with a transparent background, a grayscale PNG and a JPEG stored sideways with EXIF orientation 6.

    Returns (path, label) pairs.
    """
    directory = Path(directory)
    scenes = write_shapes_examples(directory, count=6)
    examples = [(path, f"shapes {index + 1}") for index, path in enumerate(scenes[:3])]

    scene = Image.open(scenes[3]).convert("RGB")
    background = scene.getpixel((0, 0))
    alpha = Image.fromarray(np.where(np.all(np.asarray(scene) == background, axis=-1), 0, 255).astype(np.uint8))
    rgba = scene.copy()
    rgba.putalpha(alpha)  # transparent background: the model sees it composited on white
    rgba.save(directory / "rgba_transparent.png")
    examples.append((directory / "rgba_transparent.png", "RGBA, transparent background"))

    Image.open(scenes[4]).convert("L").save(directory / "grayscale.png")
    examples.append((directory / "grayscale.png", "grayscale"))

    # Orientation 6 tells viewers to turn the stored pixels 90 degrees clockwise: store them turned the other way.
    upright = Image.open(scenes[5]).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    sideways = upright.transpose(Image.Transpose.ROTATE_90)  # counter-clockwise
    sideways.save(directory / "exif_rotated.jpg", quality=95, exif=exif)
    examples.append((directory / "exif_rotated.jpg", "JPEG with EXIF rotation"))
    return examples


# ---------------------------------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------------------------------


def build_demo(
    model_paths: Sequence[str],
    examples_dir: str | Path | None = None,
    time_limit: float = TIME_LIMIT_SECONDS,
    precision: str = "fp32",
) -> gr.Blocks:
    """Load the models and build the Blocks app, queue configured; `launch_demo` serves it with the safe settings.

    With no model paths the app still starts and explains how to get a model. `examples_dir` defaults to a new
    temporary folder. `precision` is the CPU inference setting (`serving_precision`).
    """
    captioners = load_captioners(model_paths, precision)
    # Gradio keeps uploads and its copies of the examples in its upload folder ($GRADIO_TEMP_DIR, else <temp>/gradio).
    service = CaptionService(captioners, time_limit=time_limit, upload_folder=get_upload_folder())
    if examples_dir is None:
        examples_dir = tempfile.mkdtemp(prefix="imgcap-examples-")
    examples = write_examples(examples_dir)

    with gr.Blocks(
        title="ImgCap-HF image captioning",
        analytics_enabled=False,
        delete_cache=(CACHE_MAX_AGE_SECONDS, CACHE_MAX_AGE_SECONDS),
    ) as demo:
        model = _add_header_and_model_choice(captioners)
        with gr.Row():
            with gr.Column():
                image, button = _add_image_input(examples)
                upload_only(image)
            with gr.Column():
                results = _add_results()
        first_model = next(iter(captioners.values()), None)
        settings = _add_decoding_settings(model_defaults(first_model), time_limit)
        _add_caption_endpoint(service, button, [image, model, *settings], results)
        _add_batch_endpoint(service)

    demo.queue(max_size=QUEUE_MAX_SIZE, default_concurrency_limit=CONCURRENCY_LIMIT)
    return demo


def _add_header_and_model_choice(captioners: dict[str, Captioner]) -> gr.Dropdown:
    """The title, the how-to-get-a-model notice when no model is loaded, and the model selector (shown only when
    there is more than one model to choose from)."""
    gr.Markdown(
        "# ImgCap-HF: image captioning\n"
        "A CNN encoder with an LSTM decoder, with soft attention (Show, Attend and Tell) or without (Show and "
        "Tell). Upload a picture, take one with the webcam or paste one, then press **Caption**."
    )
    if not captioners:
        gr.Markdown(NO_MODEL_MESSAGE)
    else:
        settings = [f"- Inference setting of {label}: {entry.precision}" for label, entry in captioners.items()]
        gr.Markdown("\n".join(settings), elem_id="inference-setting")
    return gr.Dropdown(
        choices=list(captioners), value=next(iter(captioners), None), label="Model",
        visible=len(captioners) > 1, interactive=True,
    )  # fmt: skip


def _add_image_input(examples: list[tuple[Path, str]]) -> tuple[gr.Image, gr.Button]:
    """The image input (upload, webcam, clipboard), the Caption button and the example images."""
    image = gr.Image(
        type="filepath",
        image_mode=None,
        sources=["upload", "webcam", "clipboard"],
        label="Image",
        height=320,
        elem_id="image-input",
    )
    button = gr.Button("Caption", variant="primary", elem_id="caption-button")
    gr.Examples(
        examples=[[str(path)] for path, _ in examples], inputs=[image],
        label=f"Examples drawn by the app at start-up: {', '.join(label for _, label in examples)}",
    )  # fmt: skip
    return image, button


def _add_results() -> list[gr.components.Component]:
    """The outputs of `/caption`, in its return order: the best caption, the n-best table and the heatmaps."""
    caption = gr.Textbox(label="Caption", interactive=False, elem_id="caption")
    table = gr.Dataframe(
        headers=["caption", "score"], datatype=["str", "number"], column_widths=["82%", "18%"],
        label="Best captions", interactive=False, wrap=True, elem_id="captions-table",
    )  # fmt: skip
    # The gallery's own label floats over its first row of pictures: a heading above it instead.
    gr.Markdown(f"**{HEATMAPS_TITLE}**", elem_id="heatmaps-title")
    heatmaps = gr.Gallery(
        label=HEATMAPS_TITLE, show_label=False, columns=5, object_fit="contain", height="auto", format="png",
        interactive=False, elem_id="heatmaps",
    )  # fmt: skip
    return [caption, table, heatmaps]


def _add_decoding_settings(defaults: DecodingSettings, time_limit: float) -> list[gr.components.Component]:
    """The "Advanced" accordion; returns its controls in the order of `CaptionService.caption`'s decoding
    parameters (beams, max new tokens, length penalty, captions, sampling, temperature, top-p, seed)."""
    with gr.Accordion("Advanced", open=False):
        gr.Markdown(
            "Scores are log-probabilities divided by length<sup>length penalty</sup>, which is what beam "
            f"search ranks by. Captioning stops after {time_limit:g} seconds and returns what it has."
        )
        with gr.Row():
            num_beams = gr.Slider(1, MAX_BEAMS, value=defaults.num_beams, step=1, label="Beam width")
            max_new_tokens = gr.Slider(
                1, MAX_NEW_TOKENS, value=defaults.max_new_tokens, step=1, label="Max new tokens"
            )
            length_penalty = gr.Slider(
                *LENGTH_PENALTY_RANGE, value=defaults.length_penalty, step=0.1, label="Length penalty"
            )
            num_captions = gr.Slider(
                1, MAX_BEAMS, value=defaults.num_captions, step=1,
                label="Captions to show",
                info=f"at most the beam width; up to {MAX_BEAMS} when sampling with one beam",
            )  # fmt: skip
        with gr.Row():
            do_sample = gr.Checkbox(value=defaults.do_sample, label="Sample instead of searching")
            temperature = gr.Slider(
                *TEMPERATURE_RANGE, value=defaults.temperature, step=0.05, label="Temperature",
                interactive=defaults.do_sample,
            )  # fmt: skip
            top_p = gr.Slider(
                *TOP_P_RANGE, value=defaults.top_p, step=0.05, label="Top-p", interactive=defaults.do_sample
            )
            seed = gr.Number(value=defaults.seed, precision=0, label="Seed")
    # Temperature and top-p only act when sampling: they can be moved only then.
    do_sample.change(
        _sampling_controls, inputs=do_sample, outputs=[temperature, top_p], queue=False, show_progress="hidden",
        api_visibility="private",
    )  # fmt: skip
    return [num_beams, max_new_tokens, length_penalty, num_captions, do_sample, temperature, top_p, seed]


def _sampling_controls(do_sample: bool) -> tuple[dict, dict]:
    """Temperature and top-p made interactive exactly when sampling is on."""
    return gr.update(interactive=do_sample), gr.update(interactive=do_sample)


def _add_caption_endpoint(
    service: CaptionService,
    button: gr.Button,
    inputs: list[gr.components.Component],
    outputs: list[gr.components.Component],
) -> None:
    """The Caption button, which is also the `/caption` API endpoint.

    The event skips Gradio's preprocessing (`preprocess=False`): the handler gets the raw upload, which `load_image`
    opens and checks (see `CaptionService._load`), and the raw numbers, which it clamps. Gradio's sliders would
    refuse an out-of-range value instead, and its image input would open the file itself.
    """
    event = button.click(service.caption, inputs=inputs, outputs=outputs, api_name="caption", preprocess=False)
    # A failed request marks every output with a red "Error" badge that outlives the message's toast. Clearing the
    # outputs, which still show the previous picture's results, clears the badges too.
    event.failure(_cleared_results, outputs=outputs, queue=False, show_progress="hidden", api_visibility="private")


def _cleared_results() -> tuple[str, list, list]:
    """Empty `/caption` outputs: no caption, no rows, no heatmaps."""
    return "", [], []


def _add_batch_endpoint(service: CaptionService) -> None:
    """A second, API-only endpoint that Gradio batches: queued requests are captioned by one `generate` call. Its
    hidden components exist only to carry the API's input and outputs; it skips preprocessing like `/caption`."""
    batch_image = upload_only(gr.Image(type="filepath", image_mode=None, visible=False))
    batch_caption = gr.Textbox(visible=False)
    batch_error = gr.Textbox(visible=False)
    gr.Button(visible=False).click(
        service.caption_batch, inputs=[batch_image], outputs=[batch_caption, batch_error],
        api_name="caption_batch", batch=True, max_batch_size=MAX_BATCH_SIZE, preprocess=False,
    )  # fmt: skip


def _busy_response(request, error) -> JSONResponse:
    """The answer to a request that finds the queue full (Gradio raises HTTP 503 "Queue is full. Max size is 32 and
    size is 32.", or "Queue is stopped." while shutting down): one sentence saying what to do, and when, for callers
    of the HTTP API. The browser and `gradio_client` show their own busy message and ignore this body."""
    return JSONResponse({"detail": BUSY_MESSAGE}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def launch_demo(demo: gr.Blocks, host: str, port: int | None, prevent_thread_lock: bool = False) -> None:
    """Serve `demo` with the safe settings: no share link, tracebacks kept in the server log (only `gr.Error`
    messages reach users), uploads capped, no monitoring endpoint, no run history (Gradio 6 can record every call,
    the successor of flagging), no MCP server, client-side rendering, a full queue answered by `_busy_response`, and
    at most `STATE_SESSION_CAPACITY` session records.

    Gradio's own start-up lines are silenced (`quiet`): they end by suggesting `share=True`, a public link this app
    never makes. `startup_banner` says where the app is instead."""
    demo.launch(
        server_name=host,
        server_port=port,
        share=False,
        show_error=False,
        max_file_size=MAX_FILE_SIZE,
        enable_monitoring=False,
        run_history=False,
        mcp_server=False,
        ssr_mode=False,
        app_kwargs={"exception_handlers": {503: _busy_response}},  # FastAPI's handler for every HTTP 503
        state_session_capacity=STATE_SESSION_CAPACITY,
        quiet=True,
        prevent_thread_lock=True,
    )
    print(startup_banner(demo.local_url, host), flush=True)
    if not prevent_thread_lock:
        demo.block_thread()


def startup_banner(local_url: str, host: str) -> str:
    """The line printed once the app serves: its address, and who can reach it."""
    reach = "this machine only" if host in ("127.0.0.1", "localhost", "::1") else f"every address of {host}"
    return f"* Running on {local_url} ({reach}; no public share link). Press Ctrl+C to stop."


def serving_threads(available: int) -> int:
    """torch's intra-op threads per caption: the `available` threads shared out between the `CONCURRENCY_LIMIT`
    captions that run at once. Each caption using every core would put more busy threads than cores on the machine,
    and torch's threads then wait for each other at every operation."""
    return max(1, available // CONCURRENCY_LIMIT)


def _port_number(text: str) -> int:
    """argparse type of `--port`: a TCP port number."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 1 to 65535, not {port}")
    return port


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="app.py", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", action="append", default=None, metavar="DIR_OR_HUB_ID",
        help="A model folder or Hub id; repeat for several. Default: $IMGCAP_MODELS (comma-separated), else "
        "outputs/shapes-attention if it exists.",
    )  # fmt: skip
    parser.add_argument(
        "--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        help="Interface to listen on. Default: $GRADIO_SERVER_NAME, else 127.0.0.1 (this machine only).",
    )  # fmt: skip
    parser.add_argument(
        "--port", type=_port_number, default=None,
        help="Default: $GRADIO_SERVER_PORT, else the first free port from 7860.",
    )  # fmt: skip
    parser.add_argument(
        "--precision", choices=("auto", *PRECISIONS), default=os.environ.get("IMGCAP_PRECISION", "auto"),
        help="CPU inference setting: auto (the fastest whose captions of shapes test scenes equal fp32's, chosen at "
        "start-up), fp32, int8 or bf16. Default: $IMGCAP_PRECISION, else auto.",
    )  # fmt: skip
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The arguments, checked before anything is loaded: a bad one stops the app with argparse's one-line error and
    exit status 2 (a port out of range or in use, an address this machine cannot listen on, a model folder that does
    not exist or lacks a model's files)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    source = "argument --model" if args.model else "IMGCAP_MODELS"
    for name in resolve_model_paths(args):
        problem = _model_argument_problem(name)
        if problem:
            parser.error(f"{source}: {problem}")
    problem = _listen_problem(args.host, args.port)
    if problem:
        parser.error(problem)
    return args


def _model_argument_problem(name: str) -> str | None:
    """What is wrong with a `--model` value, found without loading it: a local folder (by `local_model_folder`'s
    rule, so a path typo is not taken for a Hub id) must exist and hold a model's files (`check_model_folder`).
    A Hub id is left to the loader."""
    try:
        folder = local_model_folder(name)
        if folder is not None:
            check_model_folder(folder)
    except ValueError as error:
        return str(error)
    return None


def _listen_problem(host: str, port: int | None) -> str | None:
    """Why the server could not listen on `host` (at `port`, when one is given), found by binding a socket there
    now: an address of no interface of this machine, or a port that another program holds."""
    try:
        addresses = socket.getaddrinfo(host, port or 0, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        return f"argument --host: cannot listen on {host!r} ({error.strerror})"
    family, kind, protocol, _, address = addresses[0]
    with socket.socket(family, kind, protocol) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server sets it
        try:
            probe.bind(address)
        except OSError as error:
            if port is not None and error.errno == errno.EADDRINUSE:
                return f"argument --port: port {port} is in use on {host}"
            return f"argument --host: cannot listen on {host!r} ({error.strerror})"
    return None


def resolve_model_paths(args: argparse.Namespace) -> list[str]:
    """`--model` flags, else `IMGCAP_MODELS`, else the demo model if `make demo` has made it, else none."""
    if args.model:
        return args.model
    from_environment = [name.strip() for name in os.environ.get("IMGCAP_MODELS", "").split(",") if name.strip()]
    if from_environment:
        return from_environment
    return [str(DEFAULT_MODEL_DIR)] if (DEFAULT_MODEL_DIR / "config.json").is_file() else []


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    limit_malloc_arenas()  # before the model's and the server's threads exist
    model_paths = resolve_model_paths(args)
    try:
        demo = build_demo(model_paths, precision=args.precision)
    except (OSError, ValueError) as error:
        build_parser().exit(2, f"app.py: error: cannot load the model(s) {', '.join(model_paths)}: {error}\n")
    torch.set_num_threads(serving_threads(torch.get_num_threads()))
    launch_demo(demo, args.host, args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
