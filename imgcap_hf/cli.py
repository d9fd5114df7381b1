"""Command line: caption images, or score a model on a dataset split.

    python -m imgcap_hf caption --model DIR_OR_ID [--num_beams N] [--max_new_tokens N] [--precision int8] IMAGE...
    python -m imgcap_hf evaluate --model DIR_OR_ID --dataset NAME_OR_PATH [--split test] [--num_beams N]
    python -m imgcap_hf clear-feature-cache [--feature_cache_dir DIR]

`--precision` (CPU only) is `imgcap_hf.inference.optimize_for_cpu`'s setting: `fp32` (default, the model's own
arithmetic), `int8` (int8 decoder, faster; captions may differ from fp32's) or `bf16` (fast on CPUs with bf16 units).

`caption` prints one JSON object per image, in the order given: `{"image": PATH, "caption": TEXT}`, or
`{"image": PATH, "error": TEXT}` for a file that is not a usable image (missing, empty, not an image, truncated,
a decompression bomb...), whose one-sentence error names the file. The other images are still captioned, and the exit
status is then 1. A model folder that cannot be used (missing or mismatched files, pickle-only weights) stops the
command before any image is read: one `error: ...` line on stderr and exit status 2. Bad arguments (a `--model` or
`--dataset` path that does not exist, `--num_beams 0`, `--device cuda` without a usable GPU) are refused by the
argument parser before anything is loaded: a usage line, one `error:` line, exit status 2.
`evaluate` prints one JSON object with `bleu_1`..`bleu_4`, `cider`, `rouge_l` (and `meteor` where Java is available),
`num_images`, `tokenizer`, the caption tokenizer the scores were computed with (`ptb-java` or `python`), and
`mean_caption_length`, the captions' mean number of words (PTB tokens without punctuation).
`clear-feature-cache` empties train.py's feature cache folder (default `HF_HOME/imgcap_hf/feature_cache`, see
`imgcap_hf/feature_cache.py`) and prints `{"feature_cache_dir": DIR, "removed": [NAME, ...]}`; the next run with a
frozen encoder encodes its images again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .data import NAMED_DATASETS, load_caption_dataset
from .feature_cache import clear_feature_cache, default_cache_dir
from .inference import PRECISIONS, optimize_for_cpu
from .loading import load_captioner, local_model_folder
from .models.imgcap.image_processing_imgcap import load_image
from .scoring import CAPTION_TOKENIZERS, resolve_caption_tokenizer

# Argument types: each turns a bad value into argparse's one-line usage error (exit status 2) before anything loads.


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def model_name_or_path(text: str) -> str:
    """A model folder or Hub id; a path that does not exist is refused here, before any Hub request."""
    try:
        local_model_folder(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def dataset_name_or_path(text: str) -> str:
    if text not in NAMED_DATASETS and not Path(text).expanduser().is_dir():
        raise argparse.ArgumentTypeError(
            f"no such folder: {text} (the dataset is 'shapes', 'scenes', 'flickr30k' or a folder of captioned images)"
        )
    return text


def existing_file(text: str) -> str:
    if not Path(text).expanduser().is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return text


def usable_device(text: str) -> str:
    """A torch device this PyTorch build can use: `cpu`, or `cuda`/`cuda:N`/`mps`/... where such a device exists."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if device.type == "cpu":
        return text
    backend = torch.backends.mps if device.type == "mps" else getattr(torch, device.type, None)
    available = backend is not None and backend.is_available()
    count = getattr(backend, "device_count", lambda: 1)() if available else 0
    if count == 0:
        raise argparse.ArgumentTypeError(
            f"{text}: this PyTorch ({torch.__version__}) has no usable {device.type} device; use --device cpu"
        )
    if device.index is not None and device.index >= count:
        raise argparse.ArgumentTypeError(f"{text}: there are only {count} {device.type} device(s)")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m imgcap_hf", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def add_common(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--model", required=True, type=model_name_or_path, help="Folder written by train.py, or a Hub id."
        )
        command.add_argument(
            "--num_beams", type=positive_int, default=None, help="Default: the model's generation config."
        )
        command.add_argument("--max_new_tokens", type=positive_int, default=None)
        command.add_argument("--batch_size", type=positive_int, default=16)
        command.add_argument("--device", type=usable_device, default="cuda" if torch.cuda.is_available() else "cpu")
        command.add_argument(
            "--precision",
            choices=PRECISIONS,
            default="fp32",
            help="CPU inference setting: fp32 (the model as trained), int8 (int8 decoder layers: faster, captions may "
            "differ from fp32's), bf16 (fast only on CPUs with bf16 units). See the README's Performance section.",
        )

    caption = commands.add_parser("caption", help="Caption image files.")
    add_common(caption)
    caption.add_argument("images", nargs="+", metavar="IMAGE")

    evaluate = commands.add_parser("evaluate", help="coco-caption metrics on a dataset split.")
    add_common(evaluate)
    evaluate.add_argument(
        "--dataset",
        required=True,
        type=dataset_name_or_path,
        help="'shapes', 'scenes', 'flickr30k', or a Kaggle/imagefolder path.",
    )
    evaluate.add_argument("--split", choices=["train", "validation", "test"], default="test")
    evaluate.add_argument("--karpathy_json", type=existing_file, default=None)
    evaluate.add_argument("--max_samples", type=positive_int, default=None, help="Score only the first N images.")
    evaluate.add_argument(
        "--caption_tokenizer",
        choices=CAPTION_TOKENIZERS,
        default="auto",
        help="How captions are tokenized for scoring: 'auto' (coco-caption's Java tokenizer where `java` is on the "
        "PATH, else ours), 'ptb-java' or 'python'. The output's 'tokenizer' names the one used.",
    )
    clear = commands.add_parser("clear-feature-cache", help="Remove train.py's cached encoder features.")
    clear.add_argument("--feature_cache_dir", default=None, help="Default: HF_HOME/imgcap_hf/feature_cache.")
    return parser


def generation_kwargs(args: argparse.Namespace) -> dict[str, int]:
    """Only what the user set: the rest comes from the model's saved generation config."""
    return {
        name: value
        for name, value in (("num_beams", args.num_beams), ("max_new_tokens", args.max_new_tokens))
        if value is not None
    }


def load_for_inference(args: argparse.Namespace):
    """`load_captioner`, then on CPU `optimize_for_cpu` with `--precision`; a GPU runs the model as loaded."""
    model, processor = load_captioner(args.model, args.device)
    if torch.device(args.device).type == "cpu":
        optimize_for_cpu(model, args.precision)
    return model, processor


def run_caption(args: argparse.Namespace) -> int:
    model, processor = load_for_inference(args)
    min_side = processor.image_processor.load_min_side  # the reduced JPEG decode that training uses too
    failures = 0
    for start in range(0, len(args.images), args.batch_size):
        paths = args.images[start : start + args.batch_size]
        images, errors = {}, {}
        for path in paths:
            try:
                images[path] = load_image(path, min_side=min_side)
            except ValueError as error:  # one sentence naming the file; the other images go on
                errors[path] = str(error)
        captions = {}
        if images:
            inputs = processor(images=list(images.values()), return_tensors="pt").to(args.device)
            with torch.no_grad():
                sequences = model.generate(**inputs, **generation_kwargs(args))
            captions = dict(zip(images, processor.batch_decode(sequences, skip_special_tokens=True)))
        for path in paths:
            result = {"image": path, "caption": captions[path]} if path in captions else {"image": path}
            if path in errors:
                failures += 1
                result["error"] = errors[path]
            print(json.dumps(result, ensure_ascii=False), flush=True)
    return 1 if failures else 0


def run_evaluate(args: argparse.Namespace) -> int:
    from accelerate import Accelerator

    from .evaluation import evaluate_split

    try:  # a missing Java for --caption_tokenizer ptb-java stops the command before any captioning
        resolve_caption_tokenizer(args.caption_tokenizer)
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    model, processor = load_for_inference(args)
    crop = processor.image_processor.crop_size
    # The synthetic sets are drawn at the size the model was trained on.
    shapes_kwargs = {"num_train": 0, "image_size": crop["height"] if isinstance(crop, dict) else crop.height}
    splits, report = load_caption_dataset(args.dataset, karpathy_json=args.karpathy_json, shapes_kwargs=shapes_kwargs)
    split = splits[args.split]
    if args.max_samples is not None:
        split = split.select(range(min(args.max_samples, len(split))))
    if len(split) == 0:
        print(f"error: the {args.split} split of {args.dataset!r} has no images ({report})", file=sys.stderr)
        return 2
    accelerator = Accelerator(cpu=args.device == "cpu")
    kwargs = {**model.generation_config.to_diff_dict(), **generation_kwargs(args)}
    kwargs = {k: v for k, v in kwargs.items() if k in ("num_beams", "max_new_tokens", "length_penalty")}
    metrics, _ = evaluate_split(
        accelerator, model, processor.tokenizer, processor.image_processor, split,
        batch_size=args.batch_size, generation_kwargs=kwargs, caption_tokenizer=args.caption_tokenizer,
    )  # fmt: skip
    print(json.dumps(metrics))
    return 0


def run_clear_feature_cache(args: argparse.Namespace) -> int:
    folder = Path(args.feature_cache_dir) if args.feature_cache_dir else default_cache_dir()
    removed = clear_feature_cache(folder)
    print(json.dumps({"feature_cache_dir": str(folder), "removed": removed}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "precision", "fp32") != "fp32" and torch.device(args.device).type != "cpu":
        parser.error(f"--precision {args.precision} is a CPU setting: use it with --device cpu")
    try:
        if args.command == "caption":
            return run_caption(args)
        if args.command == "clear-feature-cache":
            return run_clear_feature_cache(args)
        return run_evaluate(args)
    except ValueError as error:  # an unusable model folder or dataset: one sentence, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
