"""Load a saved captioner (model + processor) so that a broken or mismatched folder fails with one clear sentence.

`from_pretrained` alone lets several broken folders through or fails with a long, unclear message: without
config.json it builds a default (ResNet-50, 4,096 words) model and then reports a size mismatch; a tokenizer whose
vocabulary does not belong to the model loads fine and turns every caption into the wrong words. `load_captioner`
checks the folder first and compares the processor with the model, and it only ever reads safetensors weights:
a `pytorch_model.bin`, `.pth` or `.pkl` is a pickle, which can run any code when it is loaded, so it is refused
without being opened.

The CLI and the app's `load_captioners` load through `load_captioner`; the captioning pipeline, which gets its model
and processor from transformers, checks them with `check_processor_matches_model`.

A name is a local folder or a Hub id (`local_model_folder` decides). A mistyped local path must not be sent to the
Hub, where it costs several network retries and ends in a message about the Hub; so a name that can only be meant as
a path and does not exist fails at once with "no such folder".
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError, safe_open

from .models.imgcap.configuration_imgcap import ImgCapConfig
from .models.imgcap.modeling_imgcap import ImgCapForConditionalGeneration
from .models.imgcap.processing_imgcap import ImgCapProcessor
from .pickles import pickle_files

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"  # sharded safetensors
VOCAB_FILE = "vocab.json"

# Weights whose first dimension is the vocabulary: they must agree with config.vocab_size.
VOCABULARY_WEIGHTS = ("decoder.embedding.weight", "decoder.output.weight")

SPECIAL_TOKENS = ("unk", "pad", "bos", "eos")


def load_captioner(
    name_or_path: str | os.PathLike, device: str = "cpu"
) -> tuple[ImgCapForConditionalGeneration, ImgCapProcessor]:
    """The model (in eval mode, on `device`) and processor saved in a folder or a Hub repository.

    A local folder is checked before anything is built (`check_model_folder`); then the weights are loaded from
    safetensors only (`use_safetensors=True`), and the processor is compared with the model
    (`check_processor_matches_model`).

    Raises:
        ValueError: one sentence naming the folder and what is wrong with it.
    """
    label = repr(str(name_or_path))
    folder = local_model_folder(name_or_path)
    local = folder is not None
    if local:
        name_or_path = folder
        check_model_folder(folder)
    try:
        config = ImgCapConfig.from_pretrained(name_or_path)
    except Exception as error:  # noqa: BLE001 - any failure here means the config cannot be used
        reason = _reason(error)
        raise ValueError(f"Cannot load the model from {label}: its {CONFIG_FILE} is invalid ({reason}).") from error
    if local:
        check_weight_shapes(name_or_path, config)
    try:
        model = ImgCapForConditionalGeneration.from_pretrained(name_or_path, config=config, use_safetensors=True)
    except Exception as error:  # noqa: BLE001
        raise ValueError(f"Cannot load the model weights from {label}: {_reason(error)}.") from error
    try:
        processor = ImgCapProcessor.from_pretrained(name_or_path)
    except Exception as error:  # noqa: BLE001
        raise ValueError(f"Cannot load the processor from {label}: {_reason(error)}.") from error
    check_processor_matches_model(processor, model.config, label)
    return model.to(device).eval(), processor


def local_model_folder(name_or_path: str | os.PathLike) -> Path | None:
    """The local folder that `name_or_path` names, or None for a Hub id; no network is used.

    The rule: a name is local when a folder of that name exists (`~` expanded), or a file (refused: not a folder), or
    when it cannot be a Hub id: it is an `os.PathLike`, starts with `.`, `~` or `/`, holds a backslash, more than one
    `/` or a trailing `/`, is not `NAME` or `OWNER/NAME` of letters, digits, `-`, `_` and `.` (huggingface_hub's
    rule), or its `OWNER` part is an existing local folder (`outputs/shapes-atention` beside the `outputs/` that
    `make demo` writes). Anything else (`you/imgcap-shapes`) is a Hub id.

    Raises:
        ValueError: "no such folder: NAME" for a local folder that does not exist ("not a folder: NAME" for a file).
    """
    text = os.fspath(name_or_path)
    folder = Path(text).expanduser()
    if folder.is_dir():
        return folder
    if folder.exists():  # a file here is what the user meant, even where its name could be a Hub id
        raise ValueError(f"not a folder: {text}")
    if not isinstance(name_or_path, os.PathLike) and not _is_path_spelling(text) and _is_hub_id(text):
        return None
    raise ValueError(f"no such folder: {text}")


def _is_hub_id(text: str) -> bool:
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _is_path_spelling(text: str) -> bool:
    """Whether `text` is spelled as a file-system path rather than as a Hub id (see `local_model_folder`)."""
    owner = text.split("/")[0] if text.count("/") == 1 else ""
    return (
        text.startswith((".", "~", "/"))
        or "\\" in text
        or text.count("/") > 1
        or text.endswith("/")
        or (bool(owner) and Path(owner).is_dir())
    )


def check_model_folder(path: str | os.PathLike) -> None:
    """Check that a local model folder holds the files a captioner needs, before any of them is read.

    Raises:
        ValueError: config.json, the safetensors weights or vocab.json is missing (naming
            pickle-based weights, which are never loaded, when those are all the folder has).
    """
    folder = Path(path)
    label = repr(str(path))
    if not folder.is_dir():
        raise ValueError(f"Cannot load the model from {label}: it is not a folder.")
    if not (folder / WEIGHTS_FILE).is_file() and not (folder / WEIGHTS_INDEX_FILE).is_file():
        pickles = pickle_files(folder)
        if pickles:
            raise ValueError(
                f"Cannot load the model from {label}: it has no {WEIGHTS_FILE}, only pickle-based weights "
                f"({', '.join(pickles)}), which are never loaded because unpickling a file can run arbitrary code; "
                "convert them to safetensors with a trusted copy of the code that wrote them."
            )
        raise ValueError(f"Cannot load the model from {label}: {WEIGHTS_FILE} is missing.")
    for name, what in ((CONFIG_FILE, "the model configuration"), (VOCAB_FILE, "the tokenizer's vocabulary")):
        if not (folder / name).is_file():
            raise ValueError(
                f"Cannot load the model from {label}: {name} ({what}) is missing; save the model and its processor "
                "with `save_pretrained`."
            )


def check_weight_shapes(path: str | os.PathLike, config: ImgCapConfig) -> None:
    """Read the safetensors header of a local folder (no tensor data) and check it against `config`.

    Raises:
        ValueError: the file is truncated or corrupt, or its vocabulary size differs from `config.vocab_size`.
    """
    folder = Path(path)
    label = repr(str(path))
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        return  # sharded: transformers checks each shard as it loads it
    try:
        with safe_open(weights, framework="pt") as handle:
            names = [name for name in handle.keys() if name in VOCABULARY_WEIGHTS]  # noqa: SIM118 - not a dict
            shapes = {name: handle.get_slice(name).get_shape() for name in names}
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"Cannot load the model from {label}: {WEIGHTS_FILE} is truncated or corrupt ({_reason(error)})."
        ) from error
    for name, shape in shapes.items():
        if shape and shape[0] != config.vocab_size:
            raise ValueError(
                f"Cannot load the model from {label}: {CONFIG_FILE} says vocab_size={config.vocab_size} but the "
                f"weights in {WEIGHTS_FILE} have {shape[0]} words ({name}); the two files do not belong together."
            )


def check_processor_matches_model(processor, config: ImgCapConfig, label: str = "the model") -> None:
    """Check that the processor's tokenizer (or a bare tokenizer) can decode what the model generates.

    Every id the tokenizer can produce must exist in the model (`len(tokenizer) <= config.vocab_size`), and the
    special tokens must have the ids the model starts and stops generating with; otherwise captions would come out as
    the wrong words, or training would index past the embedding.

    Raises:
        ValueError: naming the first disagreement.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    if len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"The tokenizer of {label} has {len(tokenizer)} tokens but the model only {config.vocab_size}: the "
            "tokenizer does not belong to this model."
        )
    for name in SPECIAL_TOKENS:
        token_id, model_id = getattr(tokenizer, f"{name}_token_id"), getattr(config, f"{name}_token_id")
        if token_id != model_id:
            raise ValueError(
                f"The tokenizer of {label} gives {getattr(tokenizer, f'{name}_token')} the id {token_id} but the "
                f"model expects {model_id} ({name}_token_id): the tokenizer does not belong to this model."
            )


def _reason(error: BaseException) -> str:
    """One line saying what went wrong: the innermost cause's message, first line, without a final full stop."""
    while error.__cause__ is not None and str(error.__cause__):
        error = error.__cause__
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text.rstrip(".")


__all__ = [
    "check_model_folder",
    "check_processor_matches_model",
    "check_weight_shapes",
    "load_captioner",
    "local_model_folder",
]
