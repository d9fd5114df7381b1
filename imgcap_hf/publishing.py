"""Publish a train.py output folder as a Hugging Face model repository: stage, verify, write the model card, upload.

    from imgcap_hf.publishing import push_model_dir
    commit = push_model_dir("outputs/shapes-attention", "you/imgcap-shapes")  # the token comes from huggingface_hub

`push_to_hub.py` (which can also publish a Space, push to a branch and do a dry run) and `train.py --push_to_hub`
both publish through `stage_model_repo` and `upload_model_repo`, so a model reaches the Hub one way only.

The model repository gets only what `from_pretrained` needs (safetensors weights, configs, the remote-code files,
tokenizer and processor files), the run's records (`all_results.json`, `training_args.json`, `data_report.json`) and
a README.md model card rendered from `templates/model_card.md` with the facts those records hold; never checkpoints,
pickles or TensorBoard logs. Files are copied into a staging folder and that copy is verified, so what is checked is
exactly what is uploaded.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, EvalResult, HfApi, ModelCard, ModelCardData, get_token
from safetensors import safe_open

from .models.imgcap.configuration_imgcap import canonical_decoder_type
from .models.imgcap.pipeline_imgcap import DEFAULT_DOWNLOAD_TIMEOUT, DEFAULT_MAX_DOWNLOAD_BYTES
from .pickles import is_pickle_based

DEFAULT_LICENSE = "apache-2.0"
# The Hub task of the card: transformers' own task that the shipped pipelines make work (`pipeline_imgcap.py`); the
# model-index keeps "image-to-text", the task its captioning scores belong to.
PIPELINE_TAG = "image-text-to-text"
MODEL_CARD_TEMPLATE = "templates/model_card.md"  # package data of imgcap_hf
NOT_LOGGED_IN = "Not logged in to the Hugging Face Hub: run `hf auth login` or set HF_TOKEN."

# What a model repository holds, by name: everything else in the run folder (checkpoints/, best_model/, runs/,
# test_samples.json, TensorBoard logs) stays home. The remote-code files are the folder's `*.py`.
WEIGHT_PATTERNS = ("*.safetensors", "model.safetensors.index.json")
MODEL_FILES = ("config.json", "generation_config.json", "vocab.json", "tokenizer_config.json", "processor_config.json")
RECORD_FILES = ("all_results.json", "training_args.json", "data_report.json")

METRICS = (  # all_results.json key, model-index metric type, display name
    ("test_bleu_1", "bleu", "BLEU-1"),
    ("test_bleu_2", "bleu", "BLEU-2"),
    ("test_bleu_3", "bleu", "BLEU-3"),
    ("test_bleu_4", "bleu", "BLEU-4"),
    ("test_meteor", "meteor", "METEOR"),
    ("test_rouge_l", "rouge", "ROUGE-L"),
    ("test_cider", "cider", "CIDEr"),
)
TOKENIZER_RESULT = "test_tokenizer"  # the caption tokenizer the metrics used; runs before it existed lack it
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
    """A folder or a request that cannot be published, told in one sentence."""


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
        """How the data was read: shapes, scenes, hub-flickr30k, kaggle-flickr30k or imagefolder (imgcap_hf.data)."""
        dataset = self.training_args.get("dataset")
        return self.data_report.get("layout") or {
            "shapes": "shapes",
            "scenes": "scenes",
            "flickr30k": "hub-flickr30k",
        }.get(dataset, "imagefolder")


def read_json(model_dir: Path, name: str) -> dict[str, Any]:
    path = model_dir / name
    if not path.is_file():
        raise PublishError(f"{model_dir} has no {name}: publish a folder written by a finished train.py run.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise PublishError(f"{name} in {model_dir} is not valid JSON ({error.msg}, line {error.lineno}).") from None


def with_current_decoder_name(config: dict[str, Any]) -> dict[str, Any]:
    """The config with `decoder_type` under its current name: folders saved before the rename say "lstm"."""
    return {**config, "decoder_type": canonical_decoder_type(config.get("decoder_type", "attention"))}


def load_run_records(model_dir: Path) -> RunRecords:
    if not model_dir.is_dir():
        raise PublishError(f"{model_dir} is not a folder: give the output_dir of a train.py run.")
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
        config=with_current_decoder_name(read_json(model_dir, "config.json")),
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


def stage_model_repo(
    model_dir: str | os.PathLike, target: Path, repo_id: str, license_id: str = DEFAULT_LICENSE
) -> list[str]:
    """Write into the new folder `target` what the model repository `repo_id` gets (flat, as `from_pretrained`
    expects it), card included, and verify it; return the staged file names.

    Raises:
        PublishError: the run folder is not a finished run, or the staged copy would not load or holds a pickle.
    """
    model_dir = Path(model_dir)
    card = build_model_card(load_run_records(model_dir), repo_id, license_id)
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
    unsafe = sorted(path.name for path in folder.rglob("*") if is_pickle_based(path))
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
    modules |= {spec["impl"].rsplit(".", 1)[0] for spec in config.get("custom_pipelines", {}).values()}
    missing = sorted(f"{module}.py" for module in modules if not (folder / f"{module}.py").is_file())
    if missing:
        raise PublishError(f"The remote code named in auto_map or custom_pipelines is missing ({', '.join(missing)}).")


# ====================================================================================================================
# Model card: Hub metadata from the records, prose from templates/model_card.md
# ====================================================================================================================


def build_model_card(records: RunRecords, repo_id: str, license_id: str) -> str:
    """README.md of the model repository: YAML front matter (Hub metadata, model-index) and a body, both from the
    run's records."""
    dataset = dataset_facts(records)
    metrics = reported_metrics(records.results)
    template = resources.files(__package__).joinpath(MODEL_CARD_TEMPLATE).read_text(encoding="utf-8")
    card = ModelCard.from_template(
        card_metadata(records, dataset, metrics, repo_id, license_id),
        template_str=template,
        title=repo_id.split("/")[-1],
        repo_id=repo_id,
        lang=records.training_args.get("lang", "en"),
        dataset=dataset,
        model=model_facts(records),
        generate_args=", ".join(f"{key}={value}" for key, value in records.results["generation"].items()),
        max_new_tokens=records.results["generation"].get("max_new_tokens"),
        download={"timeout": f"{DEFAULT_DOWNLOAD_TIMEOUT:g}", "mib": DEFAULT_MAX_DOWNLOAD_BYTES // 2**20},
        training_rows=training_rows(records, dataset),
        evaluation=evaluation_facts(records.results, metrics),
    )
    return f"{card}\n"  # Jinja drops the template's final newline


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
    if records.layout == "scenes":
        return {
            "hub_id": None,
            "name": "ImgCap synthetic scenes",
            "type": "imgcap-scenes",
            "description": "the built-in synthetic scenes set: groups of coloured objects on textured backgrounds, "
            "captioned by five simulated annotators, drawn by `imgcap_hf.data`",
            "limits": "It has only seen synthetic pictures of coloured objects on patterned backgrounds: it captions "
            "those and nothing else, and describes any photograph as such objects. Its scores are not comparable "
            "with Flickr30k or COCO results.",
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


def reported_metrics(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The `METRICS` rows whose score the run holds as a number (METEOR is None where Java was missing)."""
    return [
        (key, kind, name)
        for key, kind, name in METRICS
        if isinstance(results.get(key), int | float) and not isinstance(results[key], bool)
    ]


def card_metadata(
    records: RunRecords, dataset: dict[str, Any], metrics: list[tuple[str, str, str]], repo_id: str, license_id: str
) -> ModelCardData:
    """The front matter the Hub indexes: task, library, tags, dataset, license, and a model-index entry per score
    (with the decoding settings, and the caption tokenizer where the run names it, as the metric's arguments)."""
    results, decoder_type = records.results, records.config["decoder_type"]
    scoring = dict(results["generation"])
    if results.get(TOKENIZER_RESULT):
        scoring["tokenizer"] = results[TOKENIZER_RESULT]
    eval_results = [
        EvalResult(
            task_type="image-to-text",
            task_name="Image captioning",
            dataset_type=dataset["type"],
            dataset_name=dataset["name"],
            dataset_split="test",
            metric_type=kind,
            metric_name=name,
            metric_value=results[key],
            metric_args={**({"max_order": int(name[-1])} if kind == "bleu" else {}), **scoring},
        )
        for key, kind, name in metrics
    ]
    tags = ["custom_code", "image-captioning", "imgcap", DECODERS[decoder_type][0], f"{decoder_type}-decoder"]
    if records.layout in ("shapes", "scenes"):
        tags.append("synthetic-data")
    return ModelCardData(
        language=[records.training_args.get("lang", "en")],
        license=license_id,
        library_name="transformers",
        pipeline_tag=PIPELINE_TAG,
        tags=tags,
        datasets=[dataset["hub_id"]] if dataset["hub_id"] else None,
        metrics=sorted({kind for _, kind, _ in metrics}),
        model_name=repo_id,
        eval_results=eval_results,
    )


def model_facts(records: RunRecords) -> dict[str, Any]:
    """The architecture in words and numbers: backbone and how it was trained, decoder, vocabulary, parameters."""
    args, config, results = records.training_args, records.config, records.results
    pretrained = args.get("vision_model_name_or_path")
    encoder = f"`{pretrained}` weights" if pretrained else "randomly initialised"
    trained_stages = config.get("trainable_encoder_stages", 0)
    if config.get("freeze_encoder") and trained_stages:
        encoder += f", frozen except its last {trained_stages} stage{'s' if trained_stages > 1 else ''} (fine-tuned)"
    elif config.get("freeze_encoder"):
        encoder += ", frozen"
    else:
        encoder += ", fine-tuned with the decoder" if pretrained else ", trained with the decoder"
    grid = config.get("region_grid_size")
    if config["decoder_type"] == "attention":
        decoder = (f"attention over {grid}x{grid} = {grid * grid} image regions (attention size "
                   f"{config.get('attention_size')})")  # fmt: skip
    else:
        decoder = f"the image fed through a {config.get('image_head_size')}-wide head before the first word"
    trainable, frozen = results["trainable_parameters"], results["frozen_parameters"]
    return {
        "summary": DECODERS[config["decoder_type"]][1],
        "backbone": config.get("vision_config", {}).get("model_type"),
        "encoder": encoder,
        "num_layers": config.get("num_hidden_layers"),
        "hidden_size": config.get("hidden_size"),
        "embedding_size": config.get("embedding_size"),
        "decoder": decoder,
        "vocab_size": f"{config.get('vocab_size'):,}",
        "parameters": f"{trainable:,} trainable, {frozen:,} frozen, {trainable + frozen:,} in all",
    }


def training_rows(records: RunRecords, dataset: dict[str, Any]) -> list[tuple[str, Any]]:
    """(setting, value) rows of the card's training table."""
    args, config, results = records.training_args, records.config, records.results
    images = records.data_report.get("images_per_split", {})
    captions = records.data_report.get("captions_per_split", {})
    split_sizes = ", ".join(
        f"{split} {images[split]:,} images / {captions.get(split, 0):,} captions" for split in images
    )
    best_cider = results.get("best_validation_cider")
    kept_model = (
        f"the best by validation CIDEr ({best_cider:.4f}, step {results.get('best_step')})"
        if best_cider is not None
        else "the final weights"
    )
    return [
        ("Dataset", dataset["name"] + (f": {split_sizes}" if split_sizes else "")),
        ("Epochs / optimizer steps", f"{len(results.get('history', []))} / {results['completed_steps']:,}"),
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


def evaluation_facts(results: dict[str, Any], metrics: list[tuple[str, str, str]]) -> dict[str, Any]:
    """The test split's size, the score table's rows, the caption tokenizer (None for runs that did not record
    it), and whether METEOR was computed."""
    return {
        "num_images": f"{results['test_num_images']:,}",
        "rows": [(name, f"{results[key]:.4f}") for key, _, name in metrics],
        "tokenizer": results.get(TOKENIZER_RESULT),
        "meteor": any(kind == "meteor" for _, kind, _ in metrics),
    }


# ====================================================================================================================
# Upload
# ====================================================================================================================


def is_repo_id(value: str | None) -> bool:
    """Whether `value` has the USER/NAME form of a Hub repository id."""
    return value is not None and value.count("/") == 1 and all(value.split("/"))


def check_logged_in() -> None:
    """Refuse to go on without a Hub token (HF_TOKEN or `hf auth login`'s cache), found by huggingface_hub itself:
    a token is never a flag, where it would end up in shell histories and process lists."""
    if get_token() is None:
        raise PublishError(NOT_LOGGED_IN)


def upload_model_repo(
    api: HfApi, folder: Path, repo_id: str, private: bool = False, revision: str | None = None
) -> CommitInfo:
    """Create the model repository (and branch) if needed and upload the staged `folder` as one commit."""
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if revision:
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        repo_type="model",
        revision=revision,
        commit_message="Upload ImgCap captioner and its model card",
    )


def push_model_dir(
    model_dir: str | os.PathLike, repo_id: str, private: bool = False, license_id: str = DEFAULT_LICENSE
) -> CommitInfo:
    """Stage, verify and upload a run folder to the main branch of `repo_id`, as `push_to_hub.py --model_dir
    MODEL_DIR --repo_id REPO_ID` does.

    Raises:
        PublishError: not logged in, or the folder cannot be published (nothing is uploaded then).
        huggingface_hub.errors.HfHubHTTPError: the Hub refused a request.
    """
    check_logged_in()
    with tempfile.TemporaryDirectory(prefix="imgcap-push-") as scratch:
        folder = Path(scratch) / "model"
        stage_model_repo(model_dir, folder, repo_id, license_id)
        return upload_model_repo(HfApi(), folder, repo_id, private=private)


__all__ = [
    "PublishError",
    "RunRecords",
    "build_model_card",
    "check_logged_in",
    "is_repo_id",
    "load_run_records",
    "push_model_dir",
    "stage_model_repo",
    "upload_model_repo",
    "verify_model_repo",
]
