"""Publish a model folder written by train.py on the Hugging Face Hub, with a model card made from the run's results.

    python push_to_hub.py --model_dir outputs/shapes-attention --repo_id you/imgcap-shapes --dry_run --output_dir stage
    python push_to_hub.py --model_dir outputs/flickr30k-attention --repo_id you/imgcap-flickr30k --private
    python push_to_hub.py --model_dir outputs/flickr30k-attention --repo_id you/imgcap-flickr30k --space_id you/imgcap

The model repository gets only what `from_pretrained` needs (safetensors weights, configs, the remote-code files,
tokenizer and processor files), the run's records (`all_results.json`, `training_args.json`, `data_report.json`) and
a README.md model card generated from those records; never checkpoints, pickles or TensorBoard logs. With
`--space_id`, a Gradio Space is published too: the repository's `app.py`, the local modules it imports, pinned
requirements, and the Space variable `IMGCAP_MODELS=<repo_id>` that tells the app which model to serve.

The token comes from huggingface_hub (`HF_TOKEN`, or the cache of `hf auth login`), never from the command line,
where it would end up in shell histories and process lists. `--dry_run --output_dir STAGE` writes exactly what would
be uploaded to `STAGE/model/` (and `STAGE/space/`) and touches no network.
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, HfApi, ModelCardData, get_token
from huggingface_hub.errors import HfHubHTTPError
from safetensors import safe_open

from imgcap_hf.models.imgcap.configuration_imgcap import canonical_decoder_type

REPO_ROOT = Path(__file__).resolve().parent
APP_FILE = REPO_ROOT / "app.py"
SPACE_MODELS_VARIABLE = "IMGCAP_MODELS"  # comma-separated model ids; app.py reads it

# What a model repository holds, by name: everything else in the run folder (checkpoints/, best_model/, runs/,
# test_samples.json, TensorBoard logs) stays home. The remote-code files are the folder's `*.py`.
WEIGHT_PATTERNS = ("*.safetensors", "model.safetensors.index.json")
MODEL_FILES = ("config.json", "generation_config.json", "vocab.json", "tokenizer_config.json", "processor_config.json")
RECORD_FILES = ("all_results.json", "training_args.json", "data_report.json")
# Formats that can run code when loaded (pickle and its wrappers); none may be published.
UNSAFE_SUFFIXES = (".bin", ".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".joblib", ".npy", ".npz")

METRICS = (  # all_results.json key, model-index metric type, display name
    ("test_bleu_1", "bleu", "BLEU-1"),
    ("test_bleu_2", "bleu", "BLEU-2"),
    ("test_bleu_3", "bleu", "BLEU-3"),
    ("test_bleu_4", "bleu", "BLEU-4"),
    ("test_meteor", "meteor", "METEOR"),
    ("test_rouge_l", "rouge", "ROUGE-L"),
    ("test_cider", "cider", "CIDEr"),
)
REQUIRED_RESULTS = ("test_bleu_1", "test_bleu_2", "test_bleu_3", "test_bleu_4", "test_cider", "test_num_images",
                    "generation", "trainable_parameters", "frozen_parameters", "completed_steps")  # fmt: skip

DECODERS = {  # decoder_type: (tag, description)
    "attention": (
        "show-attend-and-tell",
        "a CNN encoder and an LSTM decoder with soft (additive) attention over a grid of image regions, as in "
        "Show, Attend and Tell",
    ),
    "pooled": (
        "show-and-tell",
        "a CNN encoder whose pooled image vector is the first input of an LSTM decoder, as in Show and Tell",
    ),
}


class PublishError(Exception):
    """A problem with the user's input, told in one sentence (main prints it and exits with status 2)."""


# ====================================================================================================================
# The run's records
# ====================================================================================================================


@dataclass
class RunRecords:
    """What train.py wrote about a run: the card is generated from these, never typed by hand."""

    results: dict[str, Any]  # all_results.json
    training_args: dict[str, Any]  # training_args.json
    data_report: dict[str, Any]  # data_report.json
    config: dict[str, Any]  # config.json

    @property
    def layout(self) -> str:
        """How the data was read: shapes, hub-flickr30k, kaggle-flickr30k or imagefolder (see imgcap_hf.data)."""
        dataset = self.training_args.get("dataset")
        return self.data_report.get("layout") or {"shapes": "shapes", "flickr30k": "hub-flickr30k"}.get(
            dataset, "imagefolder"
        )


def read_json(model_dir: Path, name: str) -> dict[str, Any]:
    path = model_dir / name
    if not path.is_file():
        raise PublishError(f"--model_dir has no {name}: publish a folder written by a finished train.py run.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise PublishError(f"{name} in --model_dir is not valid JSON ({error.msg}, line {error.lineno}).") from None


def load_run_records(model_dir: Path) -> RunRecords:
    if not model_dir.is_dir():
        raise PublishError("--model_dir is not a folder: give the output_dir of a train.py run.")
    results = read_json(model_dir, "all_results.json")
    if results.get("stopped_early"):
        raise PublishError(
            f"The run stopped early ({results['stopped_early']}), so it has no tested model to publish."
        )
    missing = [key for key in REQUIRED_RESULTS if key not in results]
    if missing:
        raise PublishError(f"all_results.json lacks {', '.join(missing)}: it does not come from a finished run.")
    data_report = read_json(model_dir, "data_report.json") if (model_dir / "data_report.json").is_file() else {}
    return RunRecords(
        results=results,
        training_args=read_json(model_dir, "training_args.json"),
        data_report=data_report,
        config=read_json(model_dir, "config.json"),
    )


def without_local_paths(value: Any) -> Any:
    """Absolute paths reduced to their last part: published records must not reveal the machine's folders."""
    if isinstance(value, dict):
        return {key: without_local_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_local_paths(item) for item in value]
    if isinstance(value, str) and Path(value).is_absolute():
        return Path(value).name
    return value


# ====================================================================================================================
# Model repository: staging and verification
# ====================================================================================================================


def stage_model_repo(model_dir: Path, target: Path, card: str) -> list[str]:
    """Copy what belongs in the model repository into `target` (flat, as `from_pretrained` expects it)."""
    target.mkdir(parents=True)
    sources = [path for pattern in WEIGHT_PATTERNS for path in model_dir.glob(pattern)]
    sources += [model_dir / name for name in MODEL_FILES if (model_dir / name).is_file()]
    sources += sorted(model_dir.glob("*.py"))  # the remote code written by save_pretrained
    for source in sources:
        shutil.copyfile(source, target / source.name)
    for name in RECORD_FILES:
        if (model_dir / name).is_file():
            record = without_local_paths(json.loads((model_dir / name).read_text(encoding="utf-8")))
            (target / name).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    (target / "README.md").write_text(card, encoding="utf-8")
    verify_model_repo(target)
    return sorted(path.name for path in target.iterdir())


def auto_map_modules(value: Any) -> set[str]:
    """Module names referenced by an `auto_map` entry ("module.Class", lists of those, "repo--module.Class")."""
    if isinstance(value, dict):
        return set().union(*(auto_map_modules(item) for item in value.values()))
    if isinstance(value, list):
        return set().union(*(auto_map_modules(item) for item in value))
    if isinstance(value, str):
        return {value.split("--")[-1].rsplit(".", 1)[0]}
    return set()  # None: no class for that slot


def find_auto_maps(value: Any) -> list[Any]:
    """Every `auto_map` in a JSON document (processor configs nest one per sub-processor)."""
    if isinstance(value, dict):
        found = [value["auto_map"]] if "auto_map" in value else []
        return found + [item for key, child in value.items() if key != "auto_map" for item in find_auto_maps(child)]
    if isinstance(value, list):
        return [item for child in value for item in find_auto_maps(child)]
    return []


def verify_model_repo(folder: Path) -> None:
    """Refuse a staged model repository that would not load, or that holds a file able to run code on load."""
    unsafe = sorted(path.name for path in folder.rglob("*") if path.suffix.lower() in UNSAFE_SUFFIXES)
    if unsafe:
        raise PublishError(f"Refusing to publish pickle-based files ({', '.join(unsafe)}): only safetensors weights.")
    subfolders = sorted(path.name for path in folder.iterdir() if path.is_dir())
    if subfolders:
        raise PublishError(f"Refusing to publish subfolders ({', '.join(subfolders)}): a model repository is flat.")
    weights = sorted(folder.glob("*.safetensors"))
    if not (folder / "config.json").is_file() or not weights:
        raise PublishError("The model folder needs config.json and model.safetensors (written by save_pretrained).")
    for path in weights:
        try:
            with safe_open(path, framework="numpy") as handle:
                handle.keys()
        except Exception:  # safetensors raises its own error types for a bad header
            raise PublishError(f"{path.name} is not a readable safetensors file.") from None
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if "auto_map" not in config:
        raise PublishError("config.json has no auto_map: the model would not load without the imgcap_hf package.")
    modules = set()
    for path in folder.glob("*.json"):
        for auto_map in find_auto_maps(json.loads(path.read_text(encoding="utf-8"))):
            modules |= auto_map_modules(auto_map)
    missing = sorted(f"{module}.py" for module in modules if not (folder / f"{module}.py").is_file())
    if missing:
        raise PublishError(f"The remote code named in auto_map is missing ({', '.join(missing)}).")


# ====================================================================================================================
# Model card
# ====================================================================================================================


def dataset_facts(records: RunRecords) -> dict[str, Any]:
    """Dataset id for the card (None when not on the Hub), its model-index name/type, and what it implies."""
    flickr_limits = (
        "Flickr30k holds about 31,000 Flickr photographs of everyday scenes, most of them showing people, captioned "
        "by English-speaking crowd workers. The model learned the dataset's demographics and stereotypes along with "
        "its language: it may guess gender, age or ethnicity from appearance, use the gendered words the annotators "
        "favoured, and describe people and places unlike those photographs less accurately."
    )
    if records.layout == "shapes":
        return {
            "hub_id": None,
            "name": "ImgCap synthetic shapes",
            "type": "imgcap-shapes",
            "description": "the built-in synthetic shapes set: coloured circles, squares, triangles and crosses at "
            "positions, alone or in pairs, drawn by `imgcap_hf.data`",
            "limits": "It has only seen synthetic pictures of coloured shapes on a plain background: it captions "
            "those and nothing else, and describes any photograph as shapes. Its scores are not comparable with "
            "Flickr30k or COCO results.",
        }
    if records.layout == "hub-flickr30k":
        return {
            "hub_id": "nlphuji/flickr30k",
            "name": "Flickr30k (Karpathy split)",
            "type": "nlphuji/flickr30k",
            "description": "Flickr30k ([nlphuji/flickr30k](https://huggingface.co/datasets/nlphuji/flickr30k)) in "
            "the Karpathy split, all five captions per image",
            "limits": flickr_limits,
        }
    if records.layout == "kaggle-flickr30k":
        split = "the Karpathy split" if records.training_args.get("karpathy_json") else "a stable hash split"
        return {
            "hub_id": None,
            "name": f"Flickr30k (Kaggle download, {split.removeprefix('the ').removeprefix('a ')})",
            "type": "flickr30k",
            "description": f"Flickr30k (the Kaggle download) in {split}, all five captions per image",
            "limits": flickr_limits,
        }
    return {
        "hub_id": None,
        "name": "Custom image folder",
        "type": "imagefolder",
        "description": "a private folder of captioned images",
        "limits": "It was trained on a private image folder: it knows only what those images and captions show, "
        "and carries whatever biases their selection and wording have.",
    }


def build_model_card(records: RunRecords, repo_id: str, license_id: str) -> str:
    """README.md of the model repository: YAML front matter (Hub metadata, model-index) and a body, both from the
    run's records."""
    results, args, config = records.results, records.training_args, records.config
    generation = results["generation"]
    decoder_type = canonical_decoder_type(config["decoder_type"])  # older folders say "lstm"
    decoder_tag, decoder_description = DECODERS[decoder_type]
    data = dataset_facts(records)
    lang = args.get("lang", "en")
    reported = [(key, kind, name) for key, kind, name in METRICS if results.get(key) is not None]

    eval_results = [
        EvalResult(
            task_type="image-to-text",
            task_name="Image captioning",
            dataset_type=data["type"],
            dataset_name=data["name"],
            dataset_split="test",
            metric_type=kind,
            metric_name=name,
            metric_value=results[key],
            metric_args={**({"max_order": int(name[-1])} if kind == "bleu" else {}), **generation},
        )
        for key, kind, name in reported
    ]
    tags = ["custom_code", "image-captioning", "imgcap", decoder_tag, f"{decoder_type}-decoder"]
    if records.layout == "shapes":
        tags.append("synthetic-data")
    card_data = ModelCardData(
        language=[lang],
        license=license_id,
        library_name="transformers",
        pipeline_tag="image-to-text",
        tags=tags,
        datasets=[data["hub_id"]] if data["hub_id"] else None,
        metrics=sorted({kind for _, kind, _ in reported}),
        model_name=repo_id,
        eval_results=eval_results,
    )
    front_matter = yaml.safe_dump(card_data.to_dict(), sort_keys=False, allow_unicode=True)

    vision = config.get("vision_config", {})
    pretrained = args.get("vision_model_name_or_path")
    encoder = f"`{pretrained}` weights" if pretrained else "randomly initialised"
    if config.get("freeze_encoder"):
        encoder += ", frozen"
    else:
        encoder += ", fine-tuned with the decoder" if pretrained else ", trained with the decoder"
    grid = config.get("region_grid_size")
    if decoder_type == "attention":
        decoder = (f"attention over {grid}x{grid} = {grid * grid} image regions (attention size "
                   f"{config.get('attention_size')})")  # fmt: skip
    else:
        decoder = f"the image fed through a {config.get('image_head_size')}-wide head before the first word"
    trainable, frozen = results["trainable_parameters"], results["frozen_parameters"]
    generate_args = ", ".join(f"{key}={value}" for key, value in generation.items())
    metric_rows = "\n".join(f"| {name} | {results[key]:.4f} |" for key, _, name in reported)
    meteor_note = "" if results.get("test_meteor") is not None else " METEOR was not computed (it needs Java)."
    images = records.data_report.get("images_per_split", {})
    captions = records.data_report.get("captions_per_split", {})
    split_sizes = ", ".join(
        f"{split} {images[split]:,} images / {captions.get(split, 0):,} captions" for split in images
    )
    epochs_run = len(results.get("history", []))
    best_cider = results.get("best_validation_cider")
    kept_model = (
        f"the best by validation CIDEr ({best_cider:.4f}, step {results.get('best_step')})"
        if best_cider is not None
        else "the final weights"
    )
    language_note = (
        "It writes English captions only."
        if lang == "en"
        else f"It writes captions in the language of its training captions (`{lang}`) only."
    )
    training_rows = [
        ("Dataset", data["name"] + (f": {split_sizes}" if split_sizes else "")),
        ("Epochs / optimizer steps", f"{epochs_run} / {results['completed_steps']:,}"),
        ("Images per device batch", f"{args.get('per_device_train_batch_size')} (each with all its captions)"),
        ("Gradient accumulation", args.get("gradient_accumulation_steps")),
        ("Optimizer", f"AdamW, learning rate {args.get('learning_rate')}, weight decay {args.get('weight_decay')}"),
        ("Schedule", f"{args.get('lr_scheduler_type')}, {args.get('num_warmup_steps')} warm-up steps"),
        ("Gradient clipping (norm)", args.get("max_grad_norm")),
        ("Mixed precision", args.get("mixed_precision")),
        ("Teacher forcing ratio", args.get("teacher_forcing_ratio")),
        ("Dropout", config.get("dropout")),
        ("Image size", f"{args.get('image_size')} px"),
        ("Seed", args.get("seed")),
        ("Run time", f"{results.get('train_runtime_seconds')} s (whole run: data, training, validation, test)"),
        ("Kept model", kept_model),
    ]  # fmt: skip
    training_table = "\n".join(f"| {name} | {value} |" for name, value in training_rows)

    body = f"""
# {repo_id.split("/")[-1]}

An image captioner built on {decoder_description}, trained with ImgCap-HF on {data["description"]}.

## Model

- Encoder: `{vision.get("model_type")}` backbone ({encoder}).
- Decoder: {config.get("num_hidden_layers")}-layer LSTM (hidden size {config.get("hidden_size")}, word embeddings \
{config.get("embedding_size")}) with {decoder}.
- Vocabulary: {config.get("vocab_size"):,} tokens: words from the training captions (spaCy's `{lang}` rules, \
lower-cased), plus single letters that spell any other word letter by letter.
- Parameters: {trainable:,} trainable, {frozen:,} frozen, {trainable + frozen:,} in all.

## How to use

The repository carries its own code, so the Auto classes load it with `trust_remote_code=True`:

```python
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

revision = "COMMIT_HASH"  # the commit whose code you read: see "Files and versions"
model = AutoModelForImageTextToText.from_pretrained("{repo_id}", trust_remote_code=True, revision=revision)
processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True, revision=revision)

inputs = processor(images=[Image.open("photo.jpg")], return_tensors="pt")
ids = model.generate(**inputs, {generate_args})
print(processor.batch_decode(ids, skip_special_tokens=True))
```

`trust_remote_code=True` runs this repository's Python files (`configuration_imgcap.py`, `modeling_imgcap.py`, \
`tokenization_imgcap.py`, `image_processing_imgcap.py`, `processing_imgcap.py`) on your machine. Read them, then pin \
`revision` to the hash of the commit you read, so that a later push cannot change the code you run.

With the `imgcap_hf` package installed, its own classes load the weights and no remote code runs; importing it \
also registers an `image-captioning` pipeline:

```python
import imgcap_hf
from transformers import pipeline

model = imgcap_hf.ImgCapForConditionalGeneration.from_pretrained("{repo_id}", revision="COMMIT_HASH")
captioner = pipeline("image-captioning", model="{repo_id}", revision="COMMIT_HASH")
captioner("photo.jpg")  # [{{'generated_text': '...'}}]
```

The saved generation settings are the ones evaluated below ({generate_args}).

## Training

| setting | value |
|---|---|
{training_table}

`training_args.json`, `data_report.json` and `all_results.json` in this repository are the run's own records \
(this card is generated from them by ImgCap-HF's `push_to_hub.py`).

## Evaluation

Test split, {results["test_num_images"]:,} images. Captions are generated by the model itself ({generate_args}) and \
scored as coco-caption (pycocoevalcap) scores them: PTB tokenization, corpus-level scores over the whole split, all \
references of every image, CIDEr-D with document frequencies from the test references.{meteor_note}

| metric | score |
|---|---|
{metric_rows}

## Limitations and biases

- {data["limits"]}
- {language_note}
- The vocabulary holds the words of the training captions; the model seldom writes a word it rarely saw, and words \
outside the vocabulary come out spelled letter by letter.
- Captions can be wrong, and are written as confidently when they are. Do not rely on them where a wrong \
description matters (for example as the only description of an image for a blind reader) without a person checking.
"""
    return f"---\n{front_matter}---\n{body}"


# ====================================================================================================================
# Space repository
# ====================================================================================================================


def local_module_files(dotted: str, root: Path) -> list[Path] | None:
    """Files under `root` that importing `dotted` runs (package `__init__`s and the module), or None when the module
    is not local."""
    files, folder = [], root
    for position, part in enumerate(dotted.split(".")):
        if (folder / part / "__init__.py").is_file():
            folder = folder / part
            files.append(folder / "__init__.py")
        elif (folder / f"{part}.py").is_file():
            files.append(folder / f"{part}.py")
            break
        elif position == 0:
            return None
        else:
            break  # `from package import name`: a name defined in the package, not a submodule
    return files


def import_closure(entry: Path, root: Path) -> tuple[list[Path], set[str]]:
    """The local files `entry` imports, directly or not, and the top-level names of the other modules they import.

    Imports are read from the source (every `import` statement, indented ones too, as transformers' `check_imports`
    does), so what the Space gets is decided by the code it runs rather than by a hand-kept list.
    """
    todo, seen, external = [entry], set(), set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        parts = list(path.relative_to(root).with_suffix("").parts)
        package = parts[:-1]  # for an __init__.py, its own package (parts ends with "__init__")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=path.name)):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                base += node.module.split(".") if node.module else []
                names = [".".join([*base, alias.name]) for alias in node.names]
            else:
                continue
            for name in names:
                files = local_module_files(name, root)
                if files is None:
                    external.add(name.split(".")[0])
                else:
                    todo.extend(files)
    return sorted(seen), external - set(sys.stdlib_module_names) - {"__future__"}


def pinned_requirements(modules: set[str]) -> list[str]:
    """`dist==version` for the distributions providing `modules`, at the versions installed here (the ones tested).

    Local version labels are dropped (`2.13.0+cpu` -> `2.13.0`): PyPI has no such files, and `==2.13.0` still matches
    the local build.
    """
    providers = importlib.metadata.packages_distributions()
    unknown = sorted(module for module in modules if module not in providers)
    if unknown:
        raise PublishError(f"app.py imports {', '.join(unknown)}, not installed here: install it so it can be pinned.")
    distributions = {dist for module in modules for dist in providers[module]}
    return sorted(
        (f"{dist}=={importlib.metadata.version(dist).split('+')[0]}" for dist in distributions), key=str.lower
    )


def stage_space_repo(target: Path, space_id: str, repo_id: str, license_id: str) -> list[str]:
    """The Gradio Space: app.py, the local modules it imports (our package, so it needs nothing else from this
    repository), pinned requirements and a README whose front matter configures the Space."""
    if not APP_FILE.is_file():
        raise PublishError("There is no app.py beside push_to_hub.py, and the Space needs it.")
    files, external = import_closure(APP_FILE, REPO_ROOT)
    requirements = pinned_requirements(external)
    target.mkdir(parents=True)
    for source in files:
        destination = target / source.relative_to(REPO_ROOT)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, destination)
    (target / "requirements.txt").write_text("\n".join(requirements) + "\n", encoding="utf-8")
    front_matter = {
        "title": space_id.split("/")[-1],
        "sdk": "gradio",
        "sdk_version": importlib.metadata.version("gradio"),
        "python_version": f"{sys.version_info.major}.{sys.version_info.minor}",
        "app_file": "app.py",
        "models": [repo_id],
        "license": license_id,
    }
    readme = f"""---
{yaml.safe_dump(front_matter, sort_keys=False)}---

# {space_id.split("/")[-1]}

Captions images with [{repo_id}](https://huggingface.co/{repo_id}). The model to serve comes from the Space \
variable `{SPACE_MODELS_VARIABLE}` (comma-separated model ids), set to `{repo_id}` by ImgCap-HF's `push_to_hub.py`.
Run it locally with `pip install -r requirements.txt` and `{SPACE_MODELS_VARIABLE}={repo_id} python app.py`.
"""
    (target / "README.md").write_text(readme, encoding="utf-8")
    return sorted(str(path.relative_to(target)) for path in target.rglob("*") if path.is_file())


# ====================================================================================================================
# Upload
# ====================================================================================================================


def upload(args: argparse.Namespace, stage: Path) -> None:
    """Create the repositories (if needed) and upload the staged folders. HfApi finds the token itself."""
    api = HfApi()
    api.create_repo(args.repo_id, repo_type="model", private=args.private, exist_ok=True)
    if args.revision:
        api.create_branch(args.repo_id, branch=args.revision, repo_type="model", exist_ok=True)
    commit = api.upload_folder(
        repo_id=args.repo_id,
        folder_path=stage / "model",
        repo_type="model",
        revision=args.revision,
        commit_message="Upload ImgCap captioner and its model card",
    )
    print(f"Model: {commit.commit_url}")
    print(f'Users who trust its remote code should pin revision="{commit.oid}".')
    if args.space_id:
        api.create_repo(args.space_id, repo_type="space", space_sdk="gradio", private=args.private, exist_ok=True)
        api.add_space_variable(args.space_id, SPACE_MODELS_VARIABLE, args.repo_id)
        space_commit = api.upload_folder(
            repo_id=args.space_id,
            folder_path=stage / "space",
            repo_type="space",
            commit_message=f"Serve {args.repo_id}",
        )
        print(f"Space: {space_commit.commit_url}")


# ====================================================================================================================
# Main
# ====================================================================================================================


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True, help="Output folder of a finished train.py run.")
    parser.add_argument("--repo_id", required=True, help="Model repository, USER/NAME.")
    parser.add_argument("--private", action="store_true", help="Create the repositories private.")
    parser.add_argument("--space_id", default=None, help="Also publish a Gradio Space serving the model, USER/NAME.")
    parser.add_argument("--revision", default=None, help="Branch of the model repository to push to (default main).")
    parser.add_argument("--license", default="apache-2.0", help="License id for the cards (Hub license list).")
    parser.add_argument("--dry_run", action="store_true", help="Write what would be uploaded; no network at all.")
    parser.add_argument("--output_dir", default=None, help="Where --dry_run writes model/ and space/.")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dry_run and not args.output_dir:
        parser.error("--dry_run needs --output_dir")
    for flag, repo in (("--repo_id", args.repo_id), ("--space_id", args.space_id)):
        if repo is not None and (repo.count("/") != 1 or not all(repo.split("/"))):
            parser.error(f"{flag} must look like USER/NAME, got {repo!r}")

    output_dir = Path(args.output_dir) if args.dry_run else None
    try:
        if not args.dry_run and get_token() is None:
            raise PublishError("Not logged in to the Hugging Face Hub: run `hf auth login` or set HF_TOKEN.")
        if output_dir is not None and any((output_dir / folder).exists() for folder in ("model", "space")):
            raise PublishError("--output_dir already holds model/ or space/: choose an empty folder.")
        model_dir = Path(args.model_dir)
        records = load_run_records(model_dir)
        card = build_model_card(records, args.repo_id, args.license)
        # Everything is staged in a scratch folder first, so that a refused folder leaves nothing half-written.
        with tempfile.TemporaryDirectory(prefix="imgcap-push-") as scratch:
            stage = Path(scratch)
            staged = stage_model_repo(model_dir, stage / "model", card)
            print(f"Model repository {args.repo_id}: {', '.join(staged)}")
            if args.space_id:
                staged = stage_space_repo(stage / "space", args.space_id, args.repo_id, args.license)
                print(f"Space {args.space_id}: {', '.join(staged)}")
                if args.private:
                    print(
                        "Note: the model is private; the Space needs a read token as its HF_TOKEN secret to load it."
                    )
                if args.revision:
                    print(f"Note: the Space serves the main branch of {args.repo_id}, not {args.revision}.")
            if output_dir is not None:
                output_dir.mkdir(parents=True, exist_ok=True)
                for folder in stage.iterdir():
                    shutil.copytree(folder, output_dir / folder.name)
                print(f"Dry run: nothing uploaded; the files are in {output_dir}.")
            else:
                upload(args, stage)
    except PublishError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except HfHubHTTPError as error:
        reason = error.server_message or str(error).splitlines()[0]
        print(f"error: The Hub refused the request: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
