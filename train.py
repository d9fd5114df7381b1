"""Train an ImgCap captioner with Accelerate, evaluate it with coco-caption metrics, save it for `from_pretrained`.

    python train.py                                   # the CPU demo: attention model on the built-in shapes set
    accelerate launch train.py --config configs/flickr30k_attention.yaml
    python train.py --config configs/shapes_pooled.yaml --num_train_epochs 2 --output_dir outputs/pooled

Settings come from a YAML recipe (`--config`, default `configs/shapes_attention.yaml`); command-line flags override
it, and the resolved settings are saved beside the model. The model flags are the fields of `ImgCapConfig`, with its
defaults and its docstring as their help. `main()` at the bottom reads top to bottom in phases: config, init, data,
model, optimizer, resume, the training loop (each epoch validated, the best model kept, atomic checkpoints),
evaluation on the test split, final save; the functions above it are those phases' pieces, in that order.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import typing
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
import yaml
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from huggingface_hub.errors import StrictDataclassError
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedConfig, SchedulerType, get_scheduler

from imgcap_hf import (
    ImgCapConfig,
    ImgCapForConditionalGeneration,
    ImgCapImageProcessor,
    ImgCapProcessor,
    ImgCapTokenizer,
    checkpointing,
    feature_cache,
    phases,
    publishing,
    scst,
)
from imgcap_hf.batching import ImageCaptionCollator, image_inputs, tokenize_captions
from imgcap_hf.compilation import CompileCounter
from imgcap_hf.data import NAMED_DATASETS, load_caption_dataset
from imgcap_hf.data.imagefolder import METADATA_FILE, is_imagefolder
from imgcap_hf.data.kaggle_flickr30k import KAGGLE_CAPTIONS_FILE, is_kaggle_flickr30k
from imgcap_hf.evaluation import evaluate_split
from imgcap_hf.feature_cache import CachedFeatures
from imgcap_hf.loading import check_model_folder, load_captioner, local_model_folder
from imgcap_hf.scoring import CAPTION_TOKENIZERS, CaptionReward, resolve_caption_tokenizer

logger = get_logger(__name__)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The lines of a recipe of several phases, written between the phases' runs, where accelerate's logger (which needs
# an Accelerator) may have none: on the first process only.
phase_logger = logging.getLogger("train.phases")

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "shapes_attention.yaml"
CHECKPOINTS_DIR = "checkpoints"
TRAIN_LOG = "train_log.jsonl"  # one JSON line per optimizer step: step, epoch, loss, lr (and encoder_lr)
LOGGING_DIR = "runs"  # the trackers' (TensorBoard's) logs
BEST_MODEL_DIR = "best_model"
FINAL_WEIGHTS = "model.safetensors"
# The run's records: written with the final model only, so that they always describe the weights beside them.
RECORD_FILES = ("training_args.json", "data_report.json", "test_samples.json", "all_results.json")
FINAL_STAGING = ".final-model.tmp"  # the final model and its records, before they are moved into the folder
EARLIER_RUN_TRASH = ".earlier-run.deleting"  # an earlier run being removed by --overwrite_output_dir


# ====================================================================================================================
# Arguments
# ====================================================================================================================


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [--config RECIPE.yaml] [--FLAG VALUE ...]   (--help lists the flags)",
    )
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML recipe whose keys are the flags below.")

    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset", default="shapes", help="'shapes', 'scenes', 'flickr30k', or a Kaggle/imagefolder path."
    )
    data.add_argument("--karpathy_json", default=None, help="dataset_flickr30k.json for the Kaggle layout's split.")
    data.add_argument("--shapes_num_train", type=int, default=3000, help="Training images of the shapes set.")
    data.add_argument("--shapes_num_eval", type=int, default=300, help="Validation and test images of shapes.")
    data.add_argument("--max_train_samples", type=int, default=None, help="Use only the first N training images.")
    data.add_argument("--max_eval_samples", type=int, default=None, help="Use only the first N eval/test images.")
    data.add_argument("--image_size", type=int, default=224, help="Side of the square model input, in pixels.")
    data.add_argument("--crop_pct", type=float, default=0.875, help="Resize to image_size/crop_pct, then crop.")
    data.add_argument("--vocab_size", type=int, default=4096, help="Largest vocabulary the tokenizer may build.")
    data.add_argument("--min_word_frequency", type=int, default=5, help="Rarer words are spelled out.")
    data.add_argument("--lang", default="en", help="spaCy language of the captions (en, ar, ...).")
    data.add_argument("--max_caption_length", type=int, default=40, help="Tokens per caption, <sos>/<eos> included.")
    data.add_argument(
        "--feature_cache",
        choices=["auto", "on", "off"],
        default="auto",
        help="Encode each image once and reuse its features ('auto': when the encoder is frozen).",
    )
    data.add_argument("--feature_cache_dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    data.add_argument(
        "--feature_cache_dir",
        default=None,
        help="Where the cached features are kept, shared by all processes and runs (default: "
        "HF_HOME/imgcap_hf/feature_cache); `python -m imgcap_hf clear-feature-cache` empties it.",
    )
    data.add_argument("--dataloader_num_workers", type=int, default=0)

    model = parser.add_argument_group(
        "model", "The fields of ImgCapConfig, its docstring as help (the tokenizer sets vocab_size and token ids)."
    )
    model.add_argument(
        "--vision_model_name_or_path",
        default=None,
        help="Pretrained backbone (e.g. microsoft/resnet-50); its own config replaces --vision_config.",
    )
    add_model_config_flags(model)

    training = parser.add_argument_group("training")
    training.add_argument("--output_dir", default="outputs/shapes-attention")
    training.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Replace the earlier run that --output_dir holds (its model, records, best model and checkpoints); "
        "without it such a folder is refused, unless --resume_from_checkpoint continues that run.",
    )
    training.add_argument("--per_device_train_batch_size", type=int, default=32, help="Images per batch (x captions).")
    training.add_argument("--per_device_eval_batch_size", type=int, default=64)
    training.add_argument("--gradient_accumulation_steps", type=int, default=1)
    training.add_argument("--learning_rate", type=float, default=4e-4)
    training.add_argument(
        "--encoder_learning_rate",
        type=float,
        default=None,
        help="Learning rate of the encoder's trained part, in an AdamW group of its own under the same schedule. "
        "Default: a tenth of --learning_rate for the pretrained stages that --trainable_encoder_stages fine-tunes "
        "(between the ratios of neuraltalk2, 1e-5 beside 4e-4, and of the common Show-Attend-Tell PyTorch tutorial, "
        "1e-4 beside 4e-4); --learning_rate itself for a whole encoder trained with --no-freeze_encoder, as the "
        "built-in recipes train theirs from random weights.",
    )
    training.add_argument(
        "--label_smoothing",
        type=float,
        default=0.0,
        help="Label smoothing of the cross-entropy, in [0, 1): that share of each target word's probability is spread "
        "evenly over the vocabulary (ignored positions stay ignored). 0: plain cross-entropy (and the only value that "
        "--objective scst takes).",
    )
    training.add_argument("--weight_decay", type=float, default=1e-4)
    training.add_argument("--num_train_epochs", type=int, default=10)
    training.add_argument("--max_train_steps", type=int, default=None, help="Overrides num_train_epochs.")
    training.add_argument(
        "--lr_scheduler_type",
        default="cosine",
        choices=[scheduler.value for scheduler in SchedulerType],
        help="transformers' get_scheduler name.",
    )
    training.add_argument("--num_warmup_steps", type=int, default=0)
    training.add_argument("--max_grad_norm", type=float, default=1.0)
    training.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    training.add_argument(
        "--cpu",
        action="store_true",
        help="Train on the CPU even where a GPU exists. Automatic for a multi-process launch on a machine without "
        "GPUs (DDP over gloo).",
    )
    training.add_argument(
        "--torch_compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="torch.compile one decoder step (reused for every word of every caption, and by the validation's "
        "generate) and the vision backbone, not the whole model, whose loop over the words would be a new graph for "
        "every caption length: a run compiles a bounded number of graphs, logged with their compile time and kept "
        "in all_results.json (ImgCapForConditionalGeneration.compile_steps).",
    )
    training.add_argument(
        "--torch_compile_backend",
        default="inductor",
        help="torch.compile's backend for --torch_compile (torch.compiler.list_backends() names them).",
    )
    training.add_argument("--seed", type=int, default=42)
    training.add_argument("--checkpointing_steps", default="epoch", help="An integer, 'epoch', or 'no'.")
    training.add_argument("--checkpoints_total_limit", type=int, default=2, help="Keep the newest N (0: all).")
    training.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder.")
    training.add_argument("--max_consecutive_nonfinite", type=int, default=5, help="Stop after this many in a row.")
    training.add_argument(
        "--logging_steps",
        type=int,
        default=50,
        help="Where the output is not a terminal (a log file, a pipe): one log line every N optimizer steps instead "
        "of a progress bar.",
    )
    training.add_argument("--with_tracking", action="store_true", help="Log to --report_to (TensorBoard).")
    training.add_argument("--report_to", default="tensorboard")

    self_critical = parser.add_argument_group(
        "self-critical training", "SCST (Rennie et al. 2017; Luo 2020's mean-of-others baseline): imgcap_hf/scst.py"
    )
    self_critical.add_argument(
        "--objective",
        choices=["xe", "scst"],
        default="xe",
        help="'xe': cross-entropy on the reference captions; 'scst': REINFORCE on the CIDEr-D of sampled captions "
        "(start it from a cross-entropy model with --init_from).",
    )
    self_critical.add_argument(
        "--init_from",
        default=None,
        help="A trained model folder (train.py's output) to start from: its weights, config and tokenizer replace "
        "the model flags, except --freeze_encoder and --trainable_encoder_stages.",
    )
    self_critical.add_argument("--scst_num_samples", type=int, default=5, help="Captions sampled per image.")
    self_critical.add_argument(
        "--scst_baseline",
        choices=list(scst.BASELINES),
        default="mean_of_others",
        help="What a sample's reward is compared with: the mean reward of the image's other samples, or the reward "
        "of its greedy caption.",
    )
    self_critical.add_argument(
        "--scst_bleu4_weight", type=float, default=0.0, help="Weight of BLEU-4 added to CIDEr-D in the reward."
    )

    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--num_beams", type=int, default=5)
    evaluation.add_argument("--max_new_tokens", type=int, default=30)
    evaluation.add_argument("--length_penalty", type=float, default=1.0)
    evaluation.add_argument(
        "--caption_tokenizer",
        choices=CAPTION_TOKENIZERS,
        default="auto",
        help="Tokenizer of the coco-caption scores: 'auto' (coco-caption's Java tokenizer where `java` is on the "
        "PATH, else ours), 'ptb-java' or 'python'. all_results.json names the one used (test_tokenizer).",
    )

    hub = parser.add_argument_group("hub")
    hub.add_argument(
        "--push_to_hub",
        action="store_true",
        help="Publish the final model as push_to_hub.py does (staged, verified, with a model card); the token comes "
        "from HF_TOKEN or `hf auth login`.",
    )
    hub.add_argument("--hub_model_id", default=None, help="Model repository, USER/NAME.")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags override the YAML recipe, which overrides the parser defaults. Unknown recipe keys are an error."""
    parser = build_parser()
    config_path = parser.parse_known_args(argv)[0].config
    recipe_phases = None  # a recipe of several phases lists them under `phases:` (imgcap_hf/phases.py)
    if config_path:
        path = Path(config_path)
        if not path.is_file():
            parser.error(f"--config {config_path}: no such file")
        recipe = yaml.safe_load(path.read_text()) or {}
        if not isinstance(recipe, dict):
            parser.error(f"--config {config_path}: expected a mapping of flag names to values")
        known = {action.dest for action in parser._actions}
        if "phases" in recipe:
            try:
                recipe_phases = phases.check_phases(recipe.pop("phases"), known)
            except ValueError as error:
                parser.error(f"--config {config_path}: {error}")
        unknown = sorted(set(recipe) - known)
        if unknown:
            parser.error(f"--config {config_path}: unknown keys {unknown}")
        parser.set_defaults(**recipe)
    args = parser.parse_args(argv)
    args.phases = recipe_phases
    check_flag_values(parser, args)
    if args.encoder_learning_rate is None:  # resolved here, so that training_args.json records the rate used
        fine_tunes_stages = args.freeze_encoder and args.trainable_encoder_stages > 0
        args.encoder_learning_rate = args.learning_rate / 10 if fine_tunes_stages else args.learning_rate
    if args.push_to_hub:  # checked now, not when training is over
        if not publishing.is_repo_id(args.hub_model_id):
            parser.error(f"--push_to_hub needs --hub_model_id USER/NAME, got {args.hub_model_id!r}")
        try:
            publishing.check_logged_in()
        except publishing.PublishError as error:
            parser.error(str(error))
    try:  # a missing Java for --caption_tokenizer ptb-java stops the run before training, not after it
        resolve_caption_tokenizer(args.caption_tokenizer)
    except RuntimeError as error:
        parser.error(str(error))
    # The config validates its own fields (enumerations, sizes, ranges): a bad value fails here, not after the data
    # is loaded. Its values go back into the flags, so an older name (decoder_type "lstm") is saved as the current one.
    model_kwargs = model_config_kwargs(args)
    try:
        config = ImgCapConfig(**model_kwargs)
    except (ValueError, StrictDataclassError) as error:
        parser.error(f"model flags: {error.__cause__ or error}")  # the validator's own sentence, on one line
    for name, value in model_kwargs.items():
        if isinstance(value, str | int | float | bool):  # sub-configs stay as the mappings the flags gave
            setattr(args, name, getattr(config, name))
    return args


# The smallest value of each flag that counts something; a flag left unset (None) is not checked. Recipes set values
# without argparse's type conversion, so the checks below also catch a float or a string where a count belongs.
COUNT_MINIMUMS = {
    "shapes_num_train": 1, "shapes_num_eval": 1, "max_train_samples": 1, "max_eval_samples": 1, "image_size": 1,
    "min_word_frequency": 1, "max_caption_length": 2, "dataloader_num_workers": 0, "per_device_train_batch_size": 1,
    "per_device_eval_batch_size": 1, "gradient_accumulation_steps": 1, "num_train_epochs": 1, "max_train_steps": 1,
    "num_warmup_steps": 0, "checkpoints_total_limit": 0, "max_consecutive_nonfinite": 1, "logging_steps": 1,
    "num_beams": 1, "max_new_tokens": 1, "trainable_encoder_stages": 0, "scst_num_samples": 1,
}  # fmt: skip
LARGEST_SEED = 2**32 - 1  # numpy's generator, which set_seed also seeds, takes no more


def check_flag_values(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every numeric and path flag, checked before anything is loaded, written or trained: a bad value stops the run
    with argparse's one-line error (exit status 2) instead of a traceback once the data is generated."""
    for name, smallest in COUNT_MINIMUMS.items():
        value = getattr(args, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < smallest):
            kind = "a positive integer" if smallest == 1 else f"an integer >= {smallest}"
            parser.error(f"--{name} must be {kind}, got {value!r}")
    if not isinstance(args.seed, int) or not 0 <= args.seed <= LARGEST_SEED:
        parser.error(f"--seed must be an integer from 0 to {LARGEST_SEED}, got {args.seed!r}")
    for name, low, high, low_included in (
        ("learning_rate", 0.0, math.inf, False),
        ("weight_decay", 0.0, math.inf, True),
        ("max_grad_norm", 0.0, math.inf, False),
        ("crop_pct", 0.0, 1.0, False),
        ("length_penalty", -math.inf, math.inf, True),
        ("scst_bleu4_weight", 0.0, math.inf, True),
    ):
        value = getattr(args, name)
        above_low = value >= low if low_included else value > low
        if not isinstance(value, int | float) or not math.isfinite(value) or not above_low or value > high:
            bounds = f"{'>=' if low_included else '>'} {low:g}" + (f" and <= {high:g}" if high < math.inf else "")
            parser.error(f"--{name} must be a finite number {bounds}, got {value!r}")
    encoder_rate = args.encoder_learning_rate
    if encoder_rate is not None and (
        not isinstance(encoder_rate, int | float) or not math.isfinite(encoder_rate) or encoder_rate <= 0
    ):
        parser.error(f"--encoder_learning_rate must be a finite number > 0, got {encoder_rate!r}")
    smoothing = args.label_smoothing
    if not isinstance(smoothing, int | float) or not 0.0 <= smoothing < 1.0:  # also refuses nan
        parser.error(f"--label_smoothing must be a number >= 0 and < 1, got {smoothing!r}")
    checkpointing_steps = str(args.checkpointing_steps)
    if checkpointing_steps not in ("epoch", "no") and not (checkpointing_steps.isdigit() and int(checkpointing_steps)):
        parser.error(f"--checkpointing_steps must be a positive integer, 'epoch' or 'no', got {checkpointing_steps!r}")
    if args.objective == "scst" and args.scst_baseline == "mean_of_others" and args.scst_num_samples < 2:
        parser.error(f"--scst_baseline mean_of_others needs --scst_num_samples >= 2, got {args.scst_num_samples}")
    if args.torch_compile and args.torch_compile_backend not in torch.compiler.list_backends(exclude_tags=()):
        parser.error(
            f"--torch_compile_backend {args.torch_compile_backend!r} is not a torch.compile backend "
            "(torch.compiler.list_backends() names them)"
        )
    if args.objective == "scst" and smoothing:
        parser.error(
            f"--label_smoothing {smoothing} smooths the cross-entropy, which --objective scst does not train on: "
            "leave it at 0 (a recipe of phases may set it for its cross-entropy phases)"
        )
    check_path_flags(parser, args)
    if args.feature_cache == "on" and trains_encoder(args):
        parser.error(
            "--feature_cache on needs --freeze_encoder and --trainable_encoder_stages 0: a trained encoder changes "
            "its features"
        )
    if args.overwrite_output_dir and args.resume_from_checkpoint:
        parser.error(
            "--overwrite_output_dir starts a new run and --resume_from_checkpoint continues one: give only one"
        )
    try:  # the tokenizer's own checks of its settings (the vocabulary holds at least the letters; spaCy knows --lang)
        ImgCapTokenizer.from_captions([], vocab_size=args.vocab_size, min_frequency=args.min_word_frequency,
                                      lang=args.lang)  # fmt: skip
    except (TypeError, ValueError) as error:
        parser.error(f"--vocab_size, --min_word_frequency or --lang: {error}")


def check_path_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The folders and files the flags name exist, and are of the kind that the flag wants."""
    if args.dataset not in NAMED_DATASETS:
        root = Path(args.dataset)
        if not root.is_dir():
            expected = ", ".join(repr(name) for name in NAMED_DATASETS)
            parser.error(f"--dataset {args.dataset}: no such folder (expected {expected} or a folder)")
        if not (is_kaggle_flickr30k(root) or is_imagefolder(root)):
            parser.error(
                f"--dataset {args.dataset}: the folder holds neither {KAGGLE_CAPTIONS_FILE} (the Kaggle Flickr30k "
                f"layout) nor train/{METADATA_FILE} (the imagefolder layout)"
            )
    if args.karpathy_json is not None:
        if args.dataset in NAMED_DATASETS:
            parser.error(f"--karpathy_json applies to a Kaggle Flickr30k folder, not to --dataset {args.dataset}")
        if not Path(args.karpathy_json).is_file():
            parser.error(f"--karpathy_json {args.karpathy_json}: no such file")
    if args.vision_model_name_or_path:
        try:  # a folder, or a name spelled as a path (a typo then), is checked here; a Hub id is left to loading
            local_model_folder(args.vision_model_name_or_path)
        except ValueError as error:
            parser.error(f"--vision_model_name_or_path: {error}")
    if args.init_from is not None:
        if not Path(args.init_from).is_dir():
            parser.error(f"--init_from {args.init_from}: no such folder (expected a model folder that train.py wrote)")
        try:
            check_model_folder(args.init_from)
        except ValueError as error:
            parser.error(f"--init_from: {error}")
    if args.resume_from_checkpoint not in (None, "latest") and not Path(args.resume_from_checkpoint).is_dir():
        parser.error(f"--resume_from_checkpoint {args.resume_from_checkpoint}: no such folder (or give 'latest')")
    if not str(args.output_dir).strip():
        parser.error("--output_dir must name a folder")


# The model flags are the fields that ImgCapConfig adds to PreTrainedConfig, with the config's defaults and the
# descriptions of its docstring's `Args:` section, so that a new config field is a flag without an edit here. Fields
# that PreTrainedConfig itself declares (`is_encoder_decoder`, `return_dict`, ...) describe any model and are not
# training choices. The tokenizer that train.py builds from the training captions decides the vocabulary size; the
# special token ids keep the config's defaults, which are that tokenizer's fixed layout.


def set_by_the_tokenizer(field_name: str) -> bool:
    return field_name == "vocab_size" or field_name.endswith("_token_id")


def model_config_fields() -> list[dataclasses.Field]:
    """The ImgCapConfig fields that are train.py flags, in the config's order."""
    common = {field.name for field in dataclasses.fields(PreTrainedConfig)}
    return [
        field
        for field in dataclasses.fields(ImgCapConfig)
        if field.name not in common and not set_by_the_tokenizer(field.name)
    ]


def documented_fields(config_class: type[PreTrainedConfig]) -> dict[str, str]:
    """Each field's description in the `Args:` sections of `config_class` and of its bases below PreTrainedConfig (a
    subclass's entry wins): the lines indented under `name (`type`, ...):` joined into one; an entry may describe
    several fields at once (`first, second (`int`):`)."""
    descriptions: dict[str, list[str]] = {}
    for cls in reversed(config_class.__mro__):
        if not issubclass(cls, PreTrainedConfig) or cls is PreTrainedConfig:
            continue
        lines = inspect.cleandoc(cls.__dict__.get("__doc__") or "").splitlines()
        if "Args:" not in lines:
            continue
        entry_indent, description = None, []
        for line in lines[lines.index("Args:") + 1 :]:
            if not line.strip():
                continue
            indent = len(line) - len(line.lstrip())
            if indent == 0:
                break  # the next section, e.g. "Example:"
            if entry_indent is None or indent == entry_indent:
                entry_indent, description = indent, []
                for name in line.strip().split(" (", 1)[0].split(", "):
                    descriptions[name] = description
            else:
                description.append(line.strip())
    return {name: " ".join(description) for name, description in descriptions.items()}


def add_model_config_flags(group: argparse._ArgumentGroup) -> None:
    """One flag per ImgCapConfig field that is a training choice, typed from the field's annotation."""
    descriptions = documented_fields(ImgCapConfig)
    for field in model_config_fields():
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        # Markdown quotes read as noise in a terminal; argparse formats help with %.
        help_text = descriptions.get(field.name, "").replace("`", "").replace("%", "%%")
        flag = f"--{field.name}"
        value_types = [t for t in typing.get_args(field.type) or (field.type,) if t is not type(None)]
        if typing.get_origin(field.type) is typing.Literal:
            group.add_argument(flag, choices=value_types, default=default, help=help_text)
        elif value_types == [bool]:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif len(value_types) == 1 and value_types[0] in (int, float, str):
            group.add_argument(flag, type=value_types[0], default=default, help=help_text)
        else:  # a sub-config or another mapping
            group.add_argument(flag, type=json.loads, default=default, help=f"{help_text} Given as JSON.")


def model_config_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The ImgCapConfig fields as the flags set them. A pretrained backbone brings its own `vision_config`."""
    kwargs = {field.name: getattr(args, field.name) for field in model_config_fields()}
    if args.vision_model_name_or_path:
        del kwargs["vision_config"]
    return kwargs


# ====================================================================================================================
# Init, data, model, optimizer: the pieces that main() puts together
# ====================================================================================================================


def build_accelerator(args: argparse.Namespace, output_dir: Path) -> Accelerator:
    # accelerate picks DDP over gloo for several processes only when told to use the CPU.
    multi_process_without_gpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    return Accelerator(
        cpu=args.cpu or multi_process_without_gpu,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to if args.with_tracking else None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / LOGGING_DIR)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


def set_up_logging(accelerator: Accelerator) -> None:
    """Our INFO lines everywhere; the libraries' warnings from the local main process only; no progress bars where
    the output is not a terminal (a bar redrawn with carriage returns fills a log file with noise)."""
    logging.basicConfig(format=LOG_FORMAT, level=logging.INFO)
    if not sys.stderr.isatty():
        datasets.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()


def earlier_run_outputs(output_dir: Path) -> list[str]:
    """What an earlier train.py run left in `output_dir` (its final model's weights, its records, its best model, its
    checkpoints), as names relative to the folder; empty for a new or empty folder."""
    found = [name for name in (FINAL_WEIGHTS, *RECORD_FILES, BEST_MODEL_DIR) if (output_dir / name).exists()]
    checkpoints = output_dir / CHECKPOINTS_DIR
    if checkpoints.is_dir():
        found += sorted(f"{CHECKPOINTS_DIR}/{p.name}" for p in checkpoints.glob(f"{checkpointing.CHECKPOINT_PREFIX}*"))
    return found


def check_output_dir(args: argparse.Namespace, output_dir: Path, resume_dir: Path | None) -> None:
    """Refuse, before anything is loaded or written, a folder that holds an earlier run, unless the flags say what
    to do with it: `--overwrite_output_dir` replaces it, `--resume_from_checkpoint` continues it (a checkpoint of
    another run than the one the folder's checkpoints belong to is refused: the two would mix)."""
    earlier = earlier_run_outputs(output_dir)
    if not earlier or args.overwrite_output_dir:
        return
    if args.resume_from_checkpoint:
        folder_run = checkpointing.read_run_id(output_dir / CHECKPOINTS_DIR)
        resumed_run = checkpointing.checkpoint_run_id(resume_dir) if resume_dir is not None else None
        if folder_run is None or resumed_run is None or folder_run == resumed_run:
            return
        raise checkpointing.PreflightError(
            f"{output_dir} holds the checkpoints of run {folder_run}, but {resume_dir} belongs to run {resumed_run}: "
            "resume it into its own folder or into a new --output_dir."
        )
    listed = ", ".join(earlier[:3]) + (", ..." if len(earlier) > 3 else "")
    raise checkpointing.PreflightError(
        f"{output_dir} holds an earlier run ({listed}): add --overwrite_output_dir to replace it, "
        "--resume_from_checkpoint latest to continue it, or choose another --output_dir."
    )


def clear_earlier_run(output_dir: Path) -> list[str]:
    """Remove an earlier run's model weights, records, logs, best model and checkpoints (`--overwrite_output_dir`).
    They are first moved together into one folder outside the run's names, then deleted: a kill midway leaves that
    folder (removed at the next start), never half an old run taken for part of the new one."""
    doomed = output_dir / EARLIER_RUN_TRASH
    doomed.mkdir(exist_ok=True)
    # The weights go first: from then on the folder is no model, so no record can describe the wrong weights.
    names = [name for name in (FINAL_WEIGHTS, *RECORD_FILES, BEST_MODEL_DIR, CHECKPOINTS_DIR, TRAIN_LOG, LOGGING_DIR)
             if (output_dir / name).exists()]  # fmt: skip
    for name in names:
        os.replace(output_dir / name, doomed / name)
    checkpointing.fsync_path(output_dir)
    shutil.rmtree(doomed)
    return names


def prepare_output_dir(output_dir: Path, overwrite: bool) -> None:
    """On the main process, once the arguments, the data and the folder are checked: the leftovers of interrupted
    writes removed, and an earlier run cleared when `--overwrite_output_dir` asks for it."""
    for leftover in (output_dir / EARLIER_RUN_TRASH, output_dir / FINAL_STAGING, output_dir / f"{BEST_MODEL_DIR}.tmp"):
        if leftover.exists():
            shutil.rmtree(leftover)
            logger.info(f"Removed {leftover}, left by an interrupted run")
    for leftover in checkpointing.clean_interrupted(output_dir / CHECKPOINTS_DIR):
        logger.info(f"Removed {leftover}, left by an interrupted checkpoint write or deletion")
    if overwrite:
        cleared = clear_earlier_run(output_dir)
        if cleared:
            logger.info(f"--overwrite_output_dir: removed the earlier run's {', '.join(cleared)}")


class DataError(ValueError):
    """The data cannot be trained on (unreadable, empty split, ...): found before training starts."""


def load_data(args: argparse.Namespace):
    shapes_kwargs = {
        "num_train": args.shapes_num_train,
        "num_validation": args.shapes_num_eval,
        "num_test": args.shapes_num_eval,
        "image_size": args.image_size,
    }
    try:
        splits, report = load_caption_dataset(
            args.dataset, karpathy_json=args.karpathy_json, shapes_kwargs=shapes_kwargs
        )
    except ValueError as error:  # the loaders say in one sentence what is wrong with the data
        raise DataError(str(error)) from error
    for name, limit in (("train", args.max_train_samples), ("validation", args.max_eval_samples)):
        if limit is not None:
            splits[name] = splits[name].select(range(min(limit, len(splits[name]))))
    if args.max_eval_samples is not None:
        splits["test"] = splits["test"].select(range(min(args.max_eval_samples, len(splits["test"]))))
    for name in ("train", "validation", "test"):
        if len(splits[name]) == 0:
            raise DataError(f"The {name} split of {args.dataset!r} is empty after loading: {report}")
    return splits, report


def build_image_processor(args: argparse.Namespace) -> ImgCapImageProcessor:
    return ImgCapImageProcessor(
        crop_size={"height": args.image_size, "width": args.image_size},
        crop_pct=args.crop_pct,
    )


def build_model(args: argparse.Namespace, vocab_size: int) -> ImgCapForConditionalGeneration:
    config_kwargs = {**model_config_kwargs(args), "vocab_size": vocab_size}
    if args.vision_model_name_or_path:
        return ImgCapForConditionalGeneration.from_vision_pretrained(args.vision_model_name_or_path, **config_kwargs)
    return ImgCapForConditionalGeneration(ImgCapConfig(**config_kwargs))


# The model flags that still apply to a model loaded with --init_from: what trains, not what the model is.
INIT_FROM_TRAINING_CHOICES = ("freeze_encoder", "trainable_encoder_stages")


def load_initial_model(args: argparse.Namespace) -> tuple[ImgCapForConditionalGeneration, ImgCapProcessor]:
    """`--init_from`: the trained model and its processor, checked as the CLI checks a model folder. Its config
    decides the architecture, dropout and the rest; of the model flags only `INIT_FROM_TRAINING_CHOICES` apply (a
    recipe may train the encoder in one phase and freeze it in the next). The other model flags take the loaded
    config's values, so that training_args.json describes the model that trains."""
    try:
        model, processor = load_captioner(args.init_from)
    except ValueError as error:
        raise DataError(f"--init_from: {error}") from error
    model.freeze_encoder(args.freeze_encoder, args.trainable_encoder_stages)
    for field in model_config_fields():
        value = getattr(model.config, field.name)
        if field.name not in INIT_FROM_TRAINING_CHOICES and isinstance(value, str | int | float | bool):
            setattr(args, field.name, value)
    return model, processor


def build_self_critical_objective(args, tokenizer, train_caption_ids) -> scst.SelfCriticalObjective:
    """The SCST loss, rewarding with CIDEr-D (plus `--scst_bleu4_weight` x BLEU-4) against each training image's
    references, whose document frequencies the reward computes once, from all of them."""
    references = [[ids[1:] for ids in captions] for captions in train_caption_ids]  # without <sos>, with <eos>
    reward = CaptionReward(
        references, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bleu4_weight=args.scst_bleu4_weight,
    )  # fmt: skip
    return scst.SelfCriticalObjective(
        reward, num_samples=args.scst_num_samples, baseline=args.scst_baseline, max_new_tokens=args.max_new_tokens
    )


def build_progress_bar(accelerator: Accelerator, total_steps: int, completed_steps: int) -> tqdm | None:
    """A progress bar on the local main process when its output is a terminal; None elsewhere (`record_step` then
    logs a line every `--logging_steps`)."""
    if not (accelerator.is_local_main_process and sys.stderr.isatty()):
        return None
    return tqdm(total=total_steps, initial=completed_steps)


def trains_encoder(args: argparse.Namespace) -> bool:
    """Whether any part of the encoder trains (`ImgCapConfig.trains_encoder` for the flags)."""
    return not args.freeze_encoder or args.trainable_encoder_stages > 0


def use_feature_cache(args: argparse.Namespace) -> bool:
    """'auto' caches the features of an encoder that never changes: not when any part of it trains."""
    return args.feature_cache == "on" or (args.feature_cache == "auto" and not trains_encoder(args))


def load_features(args, accelerator: Accelerator, model, splits, image_processor) -> dict[str, CachedFeatures]:
    """The frozen encoder's region features of every image of every split, memory-mapped from the shared on-disk
    cache (encoded there first, each process its share, where it does not hold them yet): training and evaluation
    then run only the decoder."""
    cache_dir = Path(args.feature_cache_dir) if args.feature_cache_dir else feature_cache.default_cache_dir()
    return feature_cache.load_or_encode(
        accelerator, model, {name: splits[name] for name in ("train", "validation", "test")}, image_processor,
        cache_dir=cache_dir, dtype=getattr(torch, args.feature_cache_dtype),
        batch_size=args.per_device_eval_batch_size,
    )  # fmt: skip


def build_optimizer(args: argparse.Namespace, model: ImgCapForConditionalGeneration) -> torch.optim.AdamW:
    """AdamW over the parameters that train. Where --encoder_learning_rate differs from --learning_rate, the encoder's
    trained parameters form a second group with their own rate, after the decoder's group (the logs show both
    rates: `lr` and `encoder_lr`); the schedule scales both alike. With equal rates there is one group, as in runs
    whose checkpoints hold one."""
    trained = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]
    if args.encoder_learning_rate == args.learning_rate:
        groups = [{"params": [parameter for _, parameter in trained]}]
    else:
        groups = [
            {"params": [parameter for name, parameter in trained if not name.startswith("encoder.")]},
            {"params": [parameter for name, parameter in trained if name.startswith("encoder.")],
             "lr": args.encoder_learning_rate},
        ]  # fmt: skip
        groups = [group for group in groups if group["params"]]
    return torch.optim.AdamW(groups, lr=args.learning_rate, weight_decay=args.weight_decay)


def build_train_dataloader(args, train_split, image_processor, caption_ids, features) -> DataLoader:
    """Shuffled batches of training images, each with all its captions (and its cached features, when given)."""
    return DataLoader(
        list(range(len(train_split))),
        batch_size=args.per_device_train_batch_size,
        shuffle=True,
        collate_fn=ImageCaptionCollator(train_split, image_processor, caption_ids, features=features),
        num_workers=args.dataloader_num_workers,
        # Its own generator: creating an iterator must not draw from the global RNG, or a run resumed mid-epoch
        # (which creates one more iterator) would get different dropout and teacher-forcing draws. It also seeds the
        # workers: each epoch's iterator draws their base seed from it (torch seeds `random`, numpy and torch there).
        generator=torch.Generator().manual_seed(args.seed),
    )


def plan_training_steps(args: argparse.Namespace, num_batches: int, num_processes: int) -> tuple[int, int]:
    """The number of optimizer steps (`--max_train_steps`, else `--num_train_epochs` worth) and of epochs."""
    # Each process will see its shard of the batches: count optimizer steps per process.
    batches_per_process = math.ceil(num_batches / num_processes)
    steps_per_epoch = math.ceil(batches_per_process / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps
    if max_train_steps is None:
        max_train_steps = args.num_train_epochs * steps_per_epoch
    return max_train_steps, math.ceil(max_train_steps / steps_per_epoch)


# ====================================================================================================================
# Checkpoints: safetensors and JSON only (imgcap_hf/checkpointing.py), complete or ignored, never unpickled
# ====================================================================================================================


class TrainingProgress:
    """Where training stands; saved as JSON in every checkpoint."""

    def __init__(self):
        self.epoch = 0
        self.step_in_epoch = 0  # optimizer steps' worth of batches consumed in this epoch, skipped ones included
        self.completed_steps = 0
        self.epoch_loss_sum = 0.0  # finite batch losses of the current epoch, so a resumed epoch's mean is the same
        self.epoch_loss_count = 0
        self.best_cider = -math.inf
        self.best_step = None
        self.nonfinite_losses = 0
        self.history = []  # one entry per epoch: train loss and validation metrics

    def mean_epoch_loss(self) -> float:
        return self.epoch_loss_sum / max(self.epoch_loss_count, 1)

    def start_next_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0
        self.epoch_loss_sum, self.epoch_loss_count = 0.0, 0

    def state_dict(self) -> dict[str, Any]:
        state = dict(vars(self))
        state["best_cider"] = None if self.best_step is None else self.best_cider  # standard JSON has no -inf
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        vars(self).update(state)
        if self.best_cider is None:
            self.best_cider = -math.inf


def resolve_resume_dir(output_dir: Path, resume_from_checkpoint: str) -> Path | None:
    """`latest`: the newest complete checkpoint of the run that the folder's checkpoints belong to (None if there is
    none). A folder: verified now, so an incomplete,
    unknown or pickled one is refused with one sentence before anything is loaded."""
    if resume_from_checkpoint == "latest":
        return checkpointing.latest_checkpoint(output_dir / CHECKPOINTS_DIR)
    path = Path(resume_from_checkpoint)
    checkpointing.verify_checkpoint(path)
    return path


def open_train_log(path: Path, resumed_step: int | None):
    """The per-step loss log (JSON lines), opened for appending. A resumed run keeps the lines up to its checkpoint's
    step (the steps after it are trained again); a fresh run starts an empty log."""
    kept = []
    if resumed_step is not None and path.is_file():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                break  # a line cut short by a kill
            if entry["step"] > resumed_step:
                break
            kept.append(line + "\n")
    staging = path.with_name(path.name + ".tmp")
    staging.write_text("".join(kept))
    os.replace(staging, path)
    return path.open("a")


def save_model(model, processor, generation_kwargs: dict[str, Any], folder: Path) -> None:
    """A folder that `from_pretrained` loads: the weights, the configs and the processor.

    The saved generation defaults are greedy decoding up to the evaluation's caption length, so that no default
    changes what a user asks for: a saved `num_beams=5` would turn `do_sample=True` into beam sampling and make
    `TextStreamer` refuse. The evaluation's own settings (beam width, length penalty) are in all_results.json's
    "generation" and the model card, which pass them explicitly. Its files get the permissions of the umask, as any
    other file the run writes (safetensors creates its files readable by their owner only)."""
    model.generation_config.update(num_beams=1, do_sample=False, max_new_tokens=generation_kwargs["max_new_tokens"])
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    for path in folder.iterdir():
        if path.is_file():
            checkpointing.apply_umask(path)


def save_model_atomically(model, processor, generation_kwargs: dict[str, Any], target: Path) -> None:
    staging = target.with_name(target.name + ".tmp")
    if staging.exists():
        shutil.rmtree(staging)
    save_model(model, processor, generation_kwargs, staging)
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)


def write_record(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, default=str) + "\n")
    checkpointing.apply_umask(path)


def is_weights_file(name: str) -> bool:
    """The model's weights: one safetensors file, or the shards of a large model and their index."""
    return name.endswith((".safetensors", ".safetensors.index.json"))


def save_final_model(model, processor, generation_kwargs, records: dict[str, Any], output_dir: Path) -> None:
    """The final model and the run's records (`RECORD_FILES`), written together into a staging folder, then moved
    into `output_dir` weights last, after the earlier weights were removed: whenever the run stops, the folder holds
    the earlier model with its records, no weights at all, or the new model with its records; never weights beside
    the records of another run."""
    staging = output_dir / FINAL_STAGING
    if staging.exists():
        shutil.rmtree(staging)
    save_model(model, processor, generation_kwargs, staging)
    for name, value in records.items():
        write_record(staging / name, value)
    move_staged_final_model(staging, output_dir)


def move_staged_final_model(staging: Path, output_dir: Path) -> None:
    """Move a staged final model and its records into `output_dir`, weights last (see `save_final_model`)."""
    for path in staging.iterdir():
        checkpointing.fsync_path(path)
    for path in output_dir.iterdir():
        if path.is_file() and is_weights_file(path.name):
            path.unlink()
    checkpointing.fsync_path(output_dir)
    staged = sorted(staging.iterdir(), key=lambda path: is_weights_file(path.name))  # the weights at the end
    for path in staged:
        os.replace(path, output_dir / path.name)
    checkpointing.fsync_path(output_dir)
    staging.rmdir()


# ====================================================================================================================
# The training loop: epochs of optimizer steps, each epoch validated
# ====================================================================================================================


@dataclasses.dataclass
class TrainingRun:
    """What the training loop works with: the settings, the objects accelerate prepared, the validation data, and where
    the run stands."""

    args: argparse.Namespace
    output_dir: Path
    accelerator: Accelerator
    model: torch.nn.Module  # as prepared by accelerate (wrapped for DDP on several processes)
    training_forward: Any  # the model, its loss smoothed by --label_smoothing
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_dataloader: DataLoader
    processor: ImgCapProcessor
    validation_split: datasets.Dataset
    validation_features: CachedFeatures | None
    generation_kwargs: dict[str, Any]
    progress: TrainingProgress
    run_id: str  # kept in every checkpoint's manifest, so that `latest` takes this run's checkpoints only
    progress_bar: tqdm | None  # on the local main process, when the output is a terminal
    train_log: typing.TextIO | None  # on the main process only
    objective: scst.SelfCriticalObjective | None = None  # None: cross-entropy on the reference captions
    nonfinite_streak: int = 0  # batches skipped in a row; not checkpointed, so a resumed run counts afresh
    # The SCST statistics of each micro-batch of the current optimizer step, averaged over the processes.
    step_statistics: list[dict[str, float]] = dataclasses.field(default_factory=list)


def train_all_epochs(run: TrainingRun, num_epochs: int) -> str | None:
    """Epoch after epoch until `max_train_steps`: train, validate (keeping the best model), checkpoint when the epoch
    ends (with `--checkpointing_steps epoch`). Returns why training stopped early, or None."""
    while run.progress.epoch < num_epochs and run.progress.completed_steps < run.args.max_train_steps:
        stop_reason = train_one_epoch(run)
        if stop_reason:
            logger.error(f"Training stopped: {stop_reason}. The last good checkpoint is kept.")
            return stop_reason
        validate_and_keep_best(run)
        run.progress.start_next_epoch()
        if run.args.checkpointing_steps == "epoch":
            save_checkpoint(run)
    return None


def train_one_epoch(run: TrainingRun) -> str | None:
    """The epoch's optimizer steps, from where a resumed run stands, each one logged and checkpointed when due.
    Returns why training must stop, or None."""
    args, accelerator, progress = run.args, run.accelerator, run.progress
    run.model.train()
    run.train_dataloader.set_epoch(progress.epoch)  # the same seeded shuffle on every process and on resume
    batches = run.train_dataloader
    if progress.step_in_epoch:
        batches = accelerator.skip_first_batches(
            run.train_dataloader, progress.step_in_epoch * args.gradient_accumulation_steps
        )
    step_losses = []  # mean loss over the processes, per micro-batch of the current optimizer step
    for batch in batches:
        loss = train_on_batch(run, batch)
        if run.nonfinite_streak >= args.max_consecutive_nonfinite:
            return f"{run.nonfinite_streak} non-finite losses in a row"
        if loss is not None:
            step_losses.append(loss)
        if not accelerator.sync_gradients:
            continue  # accumulating: the optimizer step comes with a later micro-batch
        progress.step_in_epoch += 1  # batches consumed in this epoch, to skip them when resuming
        if loss is None:
            step_losses, run.step_statistics = [], []
            continue  # no optimizer update happened: not a completed step
        progress.completed_steps += 1
        record_step(run, sum(step_losses) / len(step_losses))
        step_losses = []
        if str(args.checkpointing_steps).isdigit() and progress.completed_steps % int(args.checkpointing_steps) == 0:
            save_checkpoint(run)
        if progress.completed_steps >= args.max_train_steps:
            break
    return None


def train_on_batch(run: TrainingRun, batch: dict[str, Any]) -> float | None:
    """Forward and backward on one micro-batch, and the optimizer step once the accumulation is complete. Returns the
    loss averaged over the processes, or None when the batch is skipped because a loss is not finite."""
    accelerator, progress = run.accelerator, run.progress
    with accelerator.accumulate(run.model):
        loss, statistics = batch_loss(run, batch)
        # Every process must take the same decision, or DDP would wait forever for the skipped backward.
        losses = accelerator.gather(loss.detach().float().reshape(1))  # (processes,)
        if statistics:
            values = accelerator.gather(torch.stack(list(statistics.values())).float().reshape(1, -1))
            statistics = dict(zip(statistics, values.mean(dim=0).tolist()))  # (processes, statistics) averaged
        mean_loss = None
        if bool(torch.isfinite(losses).all()):
            run.nonfinite_streak = 0
            if statistics:
                run.step_statistics.append(statistics)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                # After unscaling (accelerate does it for fp16) and before the step: clipping that counts.
                accelerator.clip_grad_norm_(run.model.parameters(), run.args.max_grad_norm)
            run.optimizer.step()  # the prepared optimizer and scheduler step only when gradients are synchronised
            run.scheduler.step()
            mean_loss = losses.mean().item()
            progress.epoch_loss_sum += loss.item()
            progress.epoch_loss_count += 1
        else:
            run.nonfinite_streak += 1
            progress.nonfinite_losses += 1
            logger.warning(f"Non-finite loss at step {progress.completed_steps}: batch skipped")
        run.optimizer.zero_grad(set_to_none=True)
    return mean_loss


def batch_loss(run: TrainingRun, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The micro-batch's loss, and the statistics that the objective logs per step (none for cross-entropy)."""
    if run.objective is None:
        loss = run.training_forward(
            **image_inputs(batch), labels=batch["labels"], image_indices=batch["image_indices"]
        ).loss
        return loss, {}
    # Sampling runs on the model itself (generate), under the same mixed precision as the prepared model's forward.
    with run.accelerator.autocast():
        return run.objective(run.training_forward, run.accelerator.unwrap_model(run.model), batch)


def record_step(run: TrainingRun, step_loss: float) -> None:
    """A completed optimizer step on the progress bar (or in the log), in the JSON-lines loss log and the tracker."""
    # The decoder's group first, then the encoder's where its trained part has a rate of its own (build_optimizer).
    learning_rate, *encoder_rate = run.scheduler.get_last_lr()
    learning_rates = {"lr": learning_rate, **({"encoder_lr": encoder_rate[0]} if encoder_rate else {})}
    step, total = run.progress.completed_steps, run.args.max_train_steps
    statistics = {}  # the SCST statistics, averaged over the step's micro-batches
    if run.step_statistics:
        statistics = {name: sum(s[name] for s in run.step_statistics) / len(run.step_statistics)
                      for name in run.step_statistics[0]}  # fmt: skip
        run.step_statistics = []
    if run.progress_bar is not None:
        run.progress_bar.update(1)
        run.progress_bar.set_postfix(loss=f"{step_loss:.3f}", **{k: f"{v:.3f}" for k, v in statistics.items()})
    elif step % run.args.logging_steps == 0 or step == total:
        # A log file or a pipe gets a line now and then instead of a bar redrawn with carriage returns.
        logger.info(
            f"step {step}/{total}: loss {step_loss:.4f}, learning rate {learning_rate:.3g}"
            + "".join(f", encoder learning rate {rate:.3g}" for rate in encoder_rate)
            + "".join(f", {name.replace('_', ' ')} {value:.4f}" for name, value in statistics.items())
        )
    if run.train_log is not None:
        entry = {"step": run.progress.completed_steps, "epoch": run.progress.epoch, "loss": step_loss,
                 **learning_rates, **statistics}  # fmt: skip
        run.train_log.write(json.dumps(entry) + "\n")
        run.train_log.flush()
    if run.args.with_tracking:
        scalars = {"train_loss": step_loss, **learning_rates, **{f"train_{k}": v for k, v in statistics.items()}}
        run.accelerator.log(scalars, run.progress.completed_steps)


def validate_and_keep_best(run: TrainingRun) -> None:
    """Free-running beam search on the validation split, corpus-level metrics, recorded in the history; a new best
    CIDEr saves the model as best_model/."""
    progress = run.progress
    metrics, _ = evaluate_split(
        run.accelerator, run.model, run.processor.tokenizer, run.processor.image_processor, run.validation_split,
        batch_size=run.args.per_device_eval_batch_size, generation_kwargs=run.generation_kwargs,
        features=run.validation_features, caption_tokenizer=run.args.caption_tokenizer,
    )  # fmt: skip
    mean_loss = progress.mean_epoch_loss()
    progress.history.append(
        {"epoch": progress.epoch, "step": progress.completed_steps, "train_loss": mean_loss, **metrics}
    )
    logger.info(
        f"epoch {progress.epoch}: train loss {mean_loss:.4f}, validation "
        + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    )
    if run.args.with_tracking:
        scalars = {f"validation_{k}": v for k, v in metrics.items() if isinstance(v, int | float)}
        run.accelerator.log(scalars, progress.completed_steps)
    if metrics["cider"] > progress.best_cider:
        progress.best_cider, progress.best_step = metrics["cider"], progress.completed_steps
        if run.accelerator.is_main_process:
            save_model_atomically(
                run.accelerator.unwrap_model(run.model), run.processor, run.generation_kwargs,
                run.output_dir / BEST_MODEL_DIR,
            )  # fmt: skip


def save_checkpoint(run: TrainingRun) -> None:
    checkpointing.save_checkpoint(
        run.accelerator, run.output_dir / CHECKPOINTS_DIR, run.progress.completed_steps, run.model, run.optimizer,
        run.scheduler, run.progress.state_dict(), total_limit=run.args.checkpoints_total_limit, run_id=run.run_id,
    )  # fmt: skip


# ====================================================================================================================
# After training: the early-stop report, or the best model's test scores and the final save
# ====================================================================================================================


def report_early_stop(run: TrainingRun, stop_reason: str) -> dict[str, Any]:
    """Neither evaluate nor save a diverged model: the best model and the checkpoints stay as they were. The report
    goes into all_results.json unless the folder holds a final model (a finished run, resumed): its results stay."""
    progress = run.progress
    results = {"stopped_early": stop_reason, "nonfinite_losses": progress.nonfinite_losses,
               "completed_steps": progress.completed_steps, "history": progress.history}  # fmt: skip
    if run.accelerator.is_main_process and not (run.output_dir / FINAL_WEIGHTS).exists():
        write_record(run.output_dir / "all_results.json", results)
    run.accelerator.print(f"Training stopped early: {stop_reason}. Nothing was saved over earlier results.")
    if run.args.with_tracking:
        run.accelerator.end_training()
    return results


def load_best_model(run: TrainingRun) -> ImgCapForConditionalGeneration:
    """The model with the best validation CIDEr (best_model/), or the trained one where there is no such folder."""
    best_dir = run.output_dir / BEST_MODEL_DIR
    if not (best_dir / "model.safetensors").is_file():
        return run.accelerator.unwrap_model(run.model)
    best_model = ImgCapForConditionalGeneration.from_pretrained(best_dir, use_safetensors=True)
    return best_model.to(run.accelerator.device)


# ====================================================================================================================
# Main
# ====================================================================================================================


def main(argv: list[str] | None = None) -> dict[str, Any]:
    # ---- Config: the recipe, then the flags ----------------------------------------------------------------------
    args = parse_args(argv)
    if args.phases:  # a recipe of several phases: each one is a run of this function (see run_phases below)
        return run_phases(args, sys.argv[1:] if argv is None else list(argv))
    output_dir = Path(args.output_dir)
    start_time = time.time()
    # Gradients that fade through the LSTM's steps reach denormal floats (below 1e-38), which x86 CPUs compute many
    # times slower; flushing them to zero changes nothing a float32 model can usefully represent (the README's
    # Performance section has the measurement). Set before any parallel work, so that the CPU thread pool's workers
    # inherit it. GPU kernels are not affected.
    torch.set_flush_denormal(True)

    # ---- Init: processes, logging, the checkpoint to resume from, the output folder checked (nothing written) ----
    accelerator = build_accelerator(args, output_dir)
    set_up_logging(accelerator)
    # Resolved once, before any work: a bad folder is refused now, not after the data is loaded.
    resume_dir = resolve_resume_dir(output_dir, args.resume_from_checkpoint) if args.resume_from_checkpoint else None
    check_output_dir(args, output_dir, resume_dir)
    if accelerator.is_main_process:
        checkpointing.check_output_dir_writable(output_dir)  # fail now, not after an hour of training
    accelerator.wait_for_everyone()
    run_id = checkpointing.checkpoint_run_id(resume_dir) if resume_dir is not None else None
    run_id = run_id or checkpointing.new_run_id()
    set_seed(args.seed)

    # ---- Data: the splits, and a tokenizer built from the training captions --------------------------------------
    splits, data_report = load_data(args)
    logger.info(f"Data: {data_report}")
    train_captions = [caption for captions in splits["train"]["captions"] for caption in captions]
    if args.init_from:  # the trained model's own tokenizer and image processor: its weights need its vocabulary
        initial_model, processor = load_initial_model(args)
        tokenizer, image_processor = processor.tokenizer, processor.image_processor
    else:
        tokenizer = ImgCapTokenizer.from_captions(
            train_captions, vocab_size=args.vocab_size, min_frequency=args.min_word_frequency, lang=args.lang
        )
        image_processor = build_image_processor(args)
        processor = ImgCapProcessor(image_processor=image_processor, tokenizer=tokenizer)
    train_caption_ids = tokenize_captions(tokenizer, splits["train"], args.max_caption_length)
    objective = build_self_critical_objective(args, tokenizer, train_caption_ids) if args.objective == "scst" else None

    # ---- Model ---------------------------------------------------------------------------------------------------
    model = initial_model if args.init_from else build_model(args, vocab_size=len(tokenizer))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    # Before any image is encoded or step taken: is there room for a checkpoint, the best and the final model?
    checkpointing.check_free_space(output_dir, checkpointing.estimate_run_bytes(model))
    # Everything is checked: from here on the run writes into its folder (the records only with the final model).
    if accelerator.is_main_process:
        prepare_output_dir(output_dir, overwrite=args.overwrite_output_dir)
    accelerator.wait_for_everyone()
    generation_kwargs = {
        "num_beams": args.num_beams,
        "max_new_tokens": args.max_new_tokens,
        "length_penalty": args.length_penalty,
    }
    features = load_features(args, accelerator, model, splits, image_processor) if use_feature_cache(args) else {}

    # ---- Optimizer and schedule ----------------------------------------------------------------------------------
    train_dataloader = build_train_dataloader(
        args, splits["train"], image_processor, train_caption_ids, features.get("train")
    )
    optimizer = build_optimizer(args, model)
    args.max_train_steps, num_epochs = plan_training_steps(args, len(train_dataloader), accelerator.num_processes)
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        # accelerate steps a prepared scheduler once per process at every optimizer step
        num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    model, optimizer, train_dataloader, scheduler = accelerator.prepare(model, optimizer, train_dataloader, scheduler)
    compile_counter = None
    if args.torch_compile:  # the parts with fixed shapes, not the whole model (see `compile_steps`)
        accelerator.unwrap_model(model).compile_steps(backend=args.torch_compile_backend)
        compile_counter = CompileCounter()
    # The cross-entropy loss that the model computes from the labels, smoothed by --label_smoothing.
    training_forward = partial(model, label_smoothing=args.label_smoothing)

    # ---- Resume: the model, optimizer, schedule, RNG and progress of the checkpoint -------------------------------
    if args.with_tracking:
        accelerator.init_trackers("imgcap", {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str))})
    progress = TrainingProgress()
    if resume_dir is not None:
        progress.load_state_dict(checkpointing.load_checkpoint(accelerator, resume_dir, model, optimizer, scheduler))
        logger.info(f"Resumed from {resume_dir} at step {progress.completed_steps} (epoch {progress.epoch})")
    elif args.resume_from_checkpoint:
        logger.info("No complete checkpoint to resume from: starting from scratch")
    resumed_step = progress.completed_steps if resume_dir is not None else None
    train_log = open_train_log(output_dir / TRAIN_LOG, resumed_step) if accelerator.is_main_process else None

    # ---- Training loop: epochs of optimizer steps, validation and the best model after each, checkpoints ---------
    logger.info("***** Running training *****")
    logger.info(f"  Images = {len(splits['train'])}, captions = {len(train_captions)}, epochs = {num_epochs}")
    logger.info(
        f"  Images per device batch = {args.per_device_train_batch_size}, processes = {accelerator.num_processes}"
    )
    logger.info(
        f"  Optimization steps = {args.max_train_steps}; parameters: {trainable:,} trainable, {frozen:,} frozen"
    )
    run = TrainingRun(
        args=args, output_dir=output_dir, accelerator=accelerator, model=model, training_forward=training_forward,
        optimizer=optimizer, scheduler=scheduler, train_dataloader=train_dataloader, processor=processor,
        validation_split=splits["validation"], validation_features=features.get("validation"),
        generation_kwargs=generation_kwargs, progress=progress, run_id=run_id, train_log=train_log,
        progress_bar=build_progress_bar(accelerator, args.max_train_steps, progress.completed_steps),
        objective=objective,
    )  # fmt: skip
    stop_reason = train_all_epochs(run, num_epochs)
    if run.progress_bar is not None:
        run.progress_bar.close()
    if train_log is not None:
        train_log.close()
    accelerator.wait_for_everyone()
    if stop_reason:
        return report_early_stop(run, stop_reason)

    # ---- Evaluation: the best model by validation CIDEr, once on the test split ----------------------------------
    final_model = load_best_model(run)
    test_metrics, test_captions = evaluate_split(
        accelerator, final_model, tokenizer, image_processor, splits["test"],
        batch_size=args.per_device_eval_batch_size, generation_kwargs=generation_kwargs,
        features=features.get("test"), caption_tokenizer=args.caption_tokenizer,
    )  # fmt: skip
    if compile_counter is not None:
        logger.info(f"torch.compile: compiled {compile_counter.graphs} graphs in {compile_counter.seconds:.1f} s")
    results = {
        **{f"test_{k}": v for k, v in test_metrics.items()},
        "best_validation_cider": progress.best_cider if progress.best_step is not None else None,
        "best_step": progress.best_step,
        "completed_steps": progress.completed_steps,
        "nonfinite_losses": progress.nonfinite_losses,
        "stopped_early": None,
        "train_runtime_seconds": round(time.time() - start_time, 1),
        "trainable_parameters": trainable,
        "frozen_parameters": frozen,
        "generation": generation_kwargs,
        "torch_compile": compile_counter.summary() if compile_counter is not None else None,
        "history": progress.history,
    }

    # ---- Final save: the model, its results and sample captions; the Hub upload when asked -----------------------
    if accelerator.is_main_process:
        samples = [
            {"image_id": splits["test"][row]["image_id"], "caption": test_captions[row]}
            for row in sorted(test_captions)[:20]
        ]
        records = {"training_args.json": vars(args), "data_report.json": data_report.to_dict(),
                   "test_samples.json": samples, "all_results.json": results}  # fmt: skip
        save_final_model(final_model, processor, generation_kwargs, records, output_dir)
        scores = ", ".join(f"{k} {v:.4f}" for k, v in test_metrics.items() if isinstance(v, float))
        logger.info(f"Test ({test_metrics['tokenizer']} tokenizer): {scores}")
        if args.push_to_hub:
            # The same staging, checks and model card as `push_to_hub.py --model_dir OUTPUT_DIR --repo_id ID`.
            commit = publishing.push_model_dir(output_dir, args.hub_model_id)
            logger.info(f"Published {commit.commit_url}; pin revision={commit.oid!r} to trust its remote code.")
    if args.with_tracking:
        accelerator.end_training()
    return results


# ====================================================================================================================
# Recipes of several phases (imgcap_hf/phases.py): cross-entropy, then self-critical training, ... in one command
# ====================================================================================================================


def phase_recipe_and_argv(
    args, argv: list[str], index: int, name: str, overrides: dict, recipe_file: Path, with_init_from: bool = True
) -> tuple[dict[str, Any], list[str]]:
    """The recipe (the shared keys and the phase's overrides) and the command line of one phase: the user's flags
    (they apply to every phase), then its recipe, output folder and, after the first phase, the previous phase's model
    as `--init_from`. The Hub upload waits for the whole run."""
    shared = yaml.safe_load(Path(args.config).read_text())
    shared.pop("phases")
    recipe = {**phases.phase_recipe(shared, overrides), "push_to_hub": False}
    output_dir = Path(args.output_dir)
    user_flags = [flag for flag in argv if flag != "--push_to_hub"]
    phase_argv = [*user_flags, "--output_dir", str(phases.phase_dir(output_dir, index, name)), "--config",
                  str(recipe_file)]  # fmt: skip
    if index > 0 and with_init_from:
        previous_name = args.phases[index - 1][0]
        phase_argv += ["--init_from", str(phases.phase_dir(output_dir, index - 1, previous_name))]
    return recipe, phase_argv


def check_every_phase(args, argv: list[str]) -> None:
    """Each phase's settings, checked before the first phase trains (a bad value in the last phase stops the run
    now, not after the first phase's hours); `--init_from` of a later phase is left out: it does not exist yet."""
    with tempfile.TemporaryDirectory() as scratch:
        for index, (name, overrides) in enumerate(args.phases):
            recipe_file = Path(scratch) / f"{index}-{name}.yaml"
            recipe, phase_argv = phase_recipe_and_argv(
                args, argv, index, name, overrides, recipe_file, with_init_from=False
            )
            recipe_file.write_text(yaml.safe_dump(recipe))
            parse_args(phase_argv)


def run_phases(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Train the recipe's phases in turn, each in its own folder under OUTPUT_DIR/phases/, then put the last phase's
    model into OUTPUT_DIR with an all_results.json listing every phase's scores. With `--resume_from_checkpoint
    latest`, a phase that ran to its end is not trained again, and the phase that was running resumes."""
    output_dir = Path(args.output_dir)
    logging.basicConfig(format=LOG_FORMAT, level=logging.INFO)
    is_main_process = int(os.environ.get("RANK", "0")) == 0  # no Accelerator exists between the phases
    phase_logger.disabled = not is_main_process
    check_output_dir(args, output_dir, None)  # the folder's own final model is not replaced without being asked
    check_every_phase(args, argv)
    summaries, results = [], {}
    for index, (name, overrides) in enumerate(args.phases):
        folder = phases.phase_dir(output_dir, index, name)
        recipe_file = folder.with_name(folder.name + ".yaml")
        finished = phases.finished_results(folder, FINAL_WEIGHTS) if args.resume_from_checkpoint else None
        if finished is not None:
            phase_logger.info(f"Phase {index} ({name}) finished earlier: {folder}")
            results = finished
        else:
            recipe, phase_argv = phase_recipe_and_argv(args, argv, index, name, overrides, recipe_file)
            recipe_file.parent.mkdir(parents=True, exist_ok=True)
            # Every process writes the same recipe; each through its own staging name, so none reads half a file.
            staging = recipe_file.with_name(f"{recipe_file.name}.{os.getpid()}.tmp")
            staging.write_text(yaml.safe_dump(recipe, sort_keys=False))
            os.replace(staging, recipe_file)
            phase_logger.info(f"***** Phase {index} ({name}) of {len(args.phases)}: {folder} *****")
            results = main(phase_argv)
        summaries.append(phases.phase_summary(name, folder, output_dir, results))
        if results.get("stopped_early"):
            return phases.combined_results(results, summaries)
    combined = phases.combined_results(results, summaries)
    if is_main_process:
        publish_last_phase(folder, output_dir, combined)
        if args.push_to_hub:
            commit = publishing.push_model_dir(output_dir, args.hub_model_id)
            logger.info(f"Published {commit.commit_url}; pin revision={commit.oid!r} to trust its remote code.")
    return combined


def publish_last_phase(phase_folder: Path, output_dir: Path, combined: dict[str, Any]) -> None:
    """The last phase's final model and records, copied into `output_dir` as `save_final_model` writes a model
    there (staged, weights last), with the all_results.json of all phases."""
    staging = output_dir / FINAL_STAGING
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    for path in phase_folder.iterdir():
        if path.is_file() and path.name != TRAIN_LOG:
            shutil.copy2(path, staging / path.name)
    write_record(staging / "all_results.json", combined)
    move_staged_final_model(staging, output_dir)
    scores = ", ".join(f"{s['phase']} CIDEr-D {s.get('test_cider', float('nan')):.4f}" for s in combined["phases"])
    phase_logger.info(f"Final model (phase {combined['phases'][-1]['phase']}) in {output_dir}; test: {scores}")


if __name__ == "__main__":
    try:
        results = main()
    except (checkpointing.CheckpointError, checkpointing.PreflightError, feature_cache.FeatureCacheError,
            DataError) as error:  # fmt: skip
        # Refused before training, like a bad flag: argparse's one line and exit status, not a traceback.
        build_parser().exit(2, f"{Path(sys.argv[0]).name}: error: {error}\n")
    except checkpointing.CheckpointWriteError as error:
        # One clear sentence, not a traceback: the cause is the folder, not the code.
        logging.getLogger("train").error(f"Training stopped: {error}")
        sys.exit(2)
    sys.exit(1 if results["stopped_early"] else 0)
