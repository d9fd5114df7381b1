"""train.py end to end on tiny models and tiny data: learning, outputs, resume, non-finite losses, DDP, CLI."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Literal

import pytest
import torch
from conftest import TINY_TRAIN_VISION, tiny_args, train_in_two_processes, without_java
from safetensors.torch import load_file

import push_to_hub
import train
from imgcap_hf import ImgCapConfig, ImgCapForConditionalGeneration, ImgCapProcessor, checkpointing
from imgcap_hf.checkpointing import CheckpointError, PreflightError

REPO_ROOT = Path(__file__).resolve().parents[1]
# The smallest complete run: 32 training images (4 steps an epoch), 4 evaluation images, greedy, no Java.
QUICK_RUN = ["--shapes_num_train", "32", "--max_eval_samples", "4", "--num_beams", "1",
             "--caption_tokenizer", "python"]  # fmt: skip


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("decoder_type", ["attention", "pooled"])
def test_training_lowers_the_loss_and_leaves_a_loadable_model(
    decoder_type, tmp_path, tmp_path_factory, monkeypatch, scores_without_java
):
    from huggingface_hub import CommitInfo, HfApi

    uploads = []  # the network edge: record what would be sent to the Hub instead of sending it

    def upload_folder(self, **kwargs):
        uploads.append(("upload", {**kwargs, "uploaded": files_under(Path(kwargs["folder_path"]))}))
        return CommitInfo(commit_url="https://huggingface.co/someone/tiny-captioner/commit/abc123",
                          commit_message="", commit_description="", oid="abc123", pr_url=None)  # fmt: skip

    monkeypatch.setenv("HF_TOKEN", "hf_dummy")
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: uploads.append(("create", repo_id)))
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    # The pooled run keeps its encoder frozen, so it trains and evaluates from the feature cache.
    encoder = ["--freeze_encoder"] if decoder_type == "pooled" else ["--no-freeze_encoder"]
    results = train.main(
        tiny_args(tmp_path, decoder_type, *encoder, "--num_train_epochs", "3", "--with_tracking", "--push_to_hub",
                  "--hub_model_id", "someone/tiny-captioner")
    )  # fmt: skip
    losses = [entry["train_loss"] for entry in results["history"]]
    assert len(losses) == 3 and losses[-1] < losses[0] * 0.8, losses
    for key in ("test_bleu_1", "test_bleu_4", "test_cider", "test_num_images"):
        assert key in results
    assert results["test_num_images"] == 16
    saved = json.loads((tmp_path / "all_results.json").read_text())
    assert saved["test_cider"] == pytest.approx(results["test_cider"])
    assert json.loads((tmp_path / "training_args.json").read_text())["decoder_type"] == decoder_type

    model = ImgCapForConditionalGeneration.from_pretrained(tmp_path)
    processor = ImgCapProcessor.from_pretrained(tmp_path)
    assert model.config.decoder_type == decoder_type
    # Saved defaults: greedy up to the evaluation's length, not its beam search (a user's do_sample=True must sample).
    assert (model.generation_config.num_beams, model.generation_config.max_new_tokens) == (1, 12)
    examples = train.load_data(train.parse_args(tiny_args(tmp_path)))[0]["test"]
    ids = model.generate(**processor(images=examples[:2]["image"], return_tensors="pt"))
    assert all(caption.strip() for caption in processor.batch_decode(ids, skip_special_tokens=True))

    assert list(tmp_path.rglob("events.out.tfevents.*"))  # TensorBoard logs were written
    assert uploads[0] == ("create", "someone/tiny-captioner")
    upload = uploads[1][1]
    assert upload["repo_id"] == "someone/tiny-captioner" and Path(upload["folder_path"]) != tmp_path
    # What was uploaded is exactly what push_to_hub.py stages from the same folder: card, checks and all.
    stage = tmp_path_factory.mktemp("stage")
    dry_run = ["--model_dir", str(tmp_path), "--repo_id", "someone/tiny-captioner", "--dry_run", "--output_dir"]
    assert push_to_hub.main([*dry_run, str(stage)]) == 0
    assert upload["uploaded"] == files_under(stage / "model")
    assert {"README.md", "model.safetensors", "modeling_imgcap.py"} <= set(upload["uploaded"])
    assert (tmp_path / "checkpoints").is_dir() and (tmp_path / "best_model").is_dir()
    assert all("/" not in name for name in upload["uploaded"])  # no checkpoints, best model or logs


@pytest.mark.slow
def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path, scores_without_java):
    """A run resumed from its step-4 checkpoint ends bit-identical to the run that never stopped (on CPU)."""
    common = ["--max_train_steps", "10", "--checkpointing_steps", "2", "--checkpoints_total_limit", "10",
              "--teacher_forcing_ratio", "0.8", "--dropout", "0.3"]  # fmt: skip
    straight = tmp_path / "straight"
    train.main(tiny_args(straight, "attention", *common))

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "checkpoint-4", resumed / "checkpoints" / "checkpoint-4")
    # A file the manifest does not list: it survives only if checkpoint-4 is resumed from, not written again.
    (resumed / "checkpoints" / "checkpoint-4" / "untouched").write_text("")
    train.main(tiny_args(resumed, "attention", *common, "--resume_from_checkpoint", "latest"))

    # It resumed: its log starts at step 5, its checkpoints after step 4, and checkpoint-4 is the copy it was given.
    straight_log = (straight / "train_log.jsonl").read_text().splitlines()
    resumed_log = (resumed / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in resumed_log] == [5, 6, 7, 8, 9, 10]
    assert resumed_log == straight_log[4:]
    checkpoints = (resumed / "checkpoints").glob("checkpoint-*")
    assert sorted(int(path.name.removeprefix("checkpoint-")) for path in checkpoints) == [4, 6, 8, 10]
    assert (resumed / "checkpoints" / "checkpoint-4" / "untouched").exists()

    final_straight = load_file(straight / "checkpoints" / "checkpoint-10" / "model.safetensors")
    final_resumed = load_file(resumed / "checkpoints" / "checkpoint-10" / "model.safetensors")
    assert final_straight.keys() == final_resumed.keys()
    for key in final_straight:
        assert torch.equal(final_straight[key], final_resumed[key]), key
    straight_results = json.loads((straight / "all_results.json").read_text())
    resumed_results = json.loads((resumed / "all_results.json").read_text())
    assert straight_results["test_cider"] == pytest.approx(resumed_results["test_cider"])
    assert straight_results["history"] == resumed_results["history"]  # the resumed epoch's mean loss included


def test_latest_checkpoint_ignores_interrupted_writes(tmp_path):
    """Only folders with a manifest count; `.tmp` staging folders and manifest-less folders are skipped (more cases:
    tests/reliability/test_training_faults.py)."""
    checkpoints = tmp_path / "checkpoints"
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-12.tmp", "checkpoint-14", "checkpoint-x"):
        (checkpoints / name).mkdir(parents=True)
    assert train.resolve_resume_dir(tmp_path, "latest") is None  # none of them has a checkpoint.json
    with pytest.raises(CheckpointError, match="no such folder"):
        train.resolve_resume_dir(tmp_path, str(tmp_path / "missing"))
    with pytest.raises(CheckpointError, match="no checkpoint.json"):
        train.resolve_resume_dir(tmp_path, str(checkpoints / "checkpoint-14"))


def test_non_finite_losses_are_skipped_counted_and_stop_training(tmp_path):
    """A corrupted pretrained backbone (NaN weights) makes every loss NaN: skipped, counted, stopped, nothing saved."""
    from transformers import ResNetConfig, ResNetModel

    backbone = ResNetModel(
        ResNetConfig(**{k: v for k, v in json.loads(TINY_TRAIN_VISION).items() if k != "model_type"})
    )
    with torch.no_grad():
        next(backbone.parameters()).fill_(float("nan"))
    backbone.save_pretrained(tmp_path / "broken-backbone")

    output = tmp_path / "run"
    results = train.main(
        tiny_args(output, "attention", "--vision_model_name_or_path", str(tmp_path / "broken-backbone"),
                  "--max_consecutive_nonfinite", "3", "--num_train_epochs", "1")
    )  # fmt: skip
    assert results["stopped_early"] == "3 non-finite losses in a row"
    assert results["nonfinite_losses"] == 3 and results["completed_steps"] == 0
    assert not (output / "model.safetensors").exists()
    assert json.loads((output / "all_results.json").read_text())["stopped_early"]


def test_recipes_parse_and_unknown_keys_are_rejected(tmp_path):
    for recipe in sorted((REPO_ROOT / "configs").glob("*.yaml")):
        args = train.parse_args(["--config", str(recipe)])
        assert args.decoder_type in recipe.stem
    flickr = train.parse_args(["--config", str(REPO_ROOT / "configs" / "flickr30k_attention.yaml")])
    assert (flickr.hidden_size, flickr.num_hidden_layers, flickr.teacher_forcing_ratio) == (1024, 2, 0.9)
    assert flickr.vision_model_name_or_path == "microsoft/resnet-50" and flickr.mixed_precision == "fp16"
    assert train.parse_args(["--learning_rate", "0.5"]).learning_rate == 0.5  # flags override the recipe
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rat: 0.1\n")
    with pytest.raises(SystemExit):
        train.parse_args(["--config", str(bad)])


def test_the_older_decoder_name_lstm_is_read_as_pooled(tmp_path):
    """Recipes and command lines written before the rename say `decoder_type: lstm`."""
    assert train.parse_args(["--decoder_type", "lstm"]).decoder_type == "pooled"
    older_recipe = tmp_path / "older.yaml"
    older_recipe.write_text("decoder_type: lstm\n")
    assert train.parse_args(["--config", str(older_recipe)]).decoder_type == "pooled"
    with pytest.raises(SystemExit):
        train.parse_args(["--decoder_type", "transformer"])


def test_push_to_hub_is_checked_before_training(tmp_path, monkeypatch, capsys):
    """A malformed repository id or a missing Hub login stops train.py at start-up, not once training is over."""
    import huggingface_hub.constants

    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    for extra, message in (
        ([], "--push_to_hub needs --hub_model_id USER/NAME, got None"),
        (["--hub_model_id", "no-owner"], "got 'no-owner'"),
        (["--hub_model_id", "someone/tiny-captioner"], "Not logged in to the Hugging Face Hub"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            train.parse_args(tiny_args(tmp_path, "attention", "--push_to_hub", *extra))
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    monkeypatch.setenv("HF_TOKEN", "hf_dummy")
    args = train.parse_args(tiny_args(tmp_path, "attention", "--push_to_hub", "--hub_model_id", "someone/x"))
    assert args.push_to_hub and args.hub_model_id == "someone/x"


def test_a_new_config_field_is_a_flag_with_its_default_and_help_and_reaches_the_model(tmp_path, monkeypatch):
    """The model flags are derived from ImgCapConfig: fields added to it become flags (typed, with the field's default
    and its docstring entry as help) that recipes may set and whose values reach the built model's config."""

    class ConfigWithNewFields(ImgCapConfig):
        r"""
        Args:
            word_dropout (`float`, *optional*, defaults to 0.05):
                Share of the input words replaced by
                the unknown word.
            tie_embeddings (`bool`, *optional*, defaults to `False`):
                Share the word embeddings with the output layer.
            cell_type (`str`, *optional*, defaults to `"lstm"`):
                The recurrent cell.
        """

        word_dropout: float = 0.05
        tie_embeddings: bool = False
        cell_type: Literal["lstm", "gru"] = "lstm"

    monkeypatch.setattr(train, "ImgCapConfig", ConfigWithNewFields)
    flags = {action.dest: action for action in train.build_parser()._actions}
    assert flags["word_dropout"].default == 0.05 and flags["word_dropout"].type is float
    assert flags["word_dropout"].help == "Share of the input words replaced by the unknown word."
    assert flags["tie_embeddings"].default is False and flags["tie_embeddings"].help.startswith("Share the word")
    assert list(flags["cell_type"].choices) == ["lstm", "gru"] and flags["cell_type"].default == "lstm"
    assert flags["hidden_size"].help == "Size of the LSTM hidden state."  # the base class's entries still count

    args = train.parse_args(
        tiny_args(tmp_path, "attention", "--word_dropout", "0.2", "--tie_embeddings", "--cell_type", "gru")
    )
    config = train.build_model(args, vocab_size=40).config
    assert isinstance(config, ConfigWithNewFields)
    assert (config.word_dropout, config.tie_embeddings, config.cell_type) == (0.2, True, "gru")
    assert (config.hidden_size, config.vocab_size, config.decoder_type) == (32, 40, "attention")

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("word_dropout: 0.3\nhidden_size: 48\n")
    from_recipe = train.parse_args(["--config", str(recipe)])
    assert (from_recipe.word_dropout, from_recipe.hidden_size) == (0.3, 48)
    with pytest.raises(SystemExit):
        train.parse_args(["--cell_type", "rnn"])


def test_model_flags_are_the_config_fields_and_the_config_validates_them(capsys):
    """Every flag derived from ImgCapConfig has its docstring entry as help; what PreTrainedConfig declares for every
    model and what the tokenizer decides are not flags; a value the config refuses stops parsing with its reason."""
    flags = {action.dest: action for action in train.build_parser()._actions}
    derived = [field.name for field in train.model_config_fields()]
    assert {"decoder_type", "hidden_size", "dropout", "teacher_forcing_ratio", "vision_config"} <= set(derived)
    for name in derived:
        assert flags[name].help, f"--{name} has no help: is it in ImgCapConfig's Args: docstring section?"
        assert flags[name].default == getattr(ImgCapConfig(), name) or name == "vision_config"
    for name in ("pad_token_id", "eos_token_id", "is_encoder_decoder", "return_dict"):
        assert name not in flags
    assert flags["vocab_size"].help == "Largest vocabulary the tokenizer may build."  # the data flag, not the field
    assert train.parse_args(["--vision_config", '{"model_type": "vit"}']).vision_config == {"model_type": "vit"}

    for bad in (["--decoder_type", "transformer"], ["--hidden_size", "0"], ["--dropout", "1.5"]):
        with pytest.raises(SystemExit):
            train.parse_args(bad)
    errors = capsys.readouterr().err
    assert "decoder_type must be one of" in errors and "hidden_size must be a positive integer" in errors
    assert "dropout must be in [0, 1)" in errors


@pytest.mark.slow
def test_two_process_ddp_run_with_accelerate_launch(tmp_path):
    train_in_two_processes(tiny_args(tmp_path / "ddp", "pooled", "--num_train_epochs", "1"), java=False)
    results = json.loads((tmp_path / "ddp" / "all_results.json").read_text())
    assert results["test_num_images"] == 16  # every test image scored exactly once across the two processes
    assert results["completed_steps"] == 6  # 96 images / (8 per device x 2 processes)
    assert ImgCapForConditionalGeneration.from_pretrained(tmp_path / "ddp").config.decoder_type == "pooled"


def test_cli_caption_and_evaluate(saved_tiny_captioner, tmp_path):
    from PIL import Image

    good = tmp_path / "good.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(good)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    command = [sys.executable, "-m", "imgcap_hf", "caption", "--model", str(saved_tiny_captioner), "--num_beams", "2"]
    result = subprocess.run([*command, str(good), str(broken)], capture_output=True, text=True, timeout=300)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.returncode == 1  # one image failed; the other was still captioned
    by_image = {line["image"]: line for line in lines}
    assert isinstance(by_image[str(good)]["caption"], str)
    assert "error" in by_image[str(broken)] and "Traceback" not in result.stdout

    evaluation = subprocess.run(
        [sys.executable, "-m", "imgcap_hf", "evaluate", "--model", str(saved_tiny_captioner), "--dataset", "shapes",
         "--max_samples", "12", "--max_new_tokens", "5"],
        capture_output=True, text=True, timeout=300, env=without_java(os.environ),
    )  # fmt: skip
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    metrics = json.loads(evaluation.stdout.strip().splitlines()[-1])
    assert metrics["num_images"] == 12
    assert {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "cider"} <= metrics.keys()


# ====================================================================================================================
# Arguments and output folders: checked before anything is loaded or written
# ====================================================================================================================


def test_bad_flags_stop_with_one_argparse_line_before_any_work(tmp_path, monkeypatch, capsys):
    """Each bad value ends the run in parse_args with exit status 2 and one `train.py: error:` line naming the flag;
    nothing is loaded (load_data would fail the test). The script itself prints no traceback."""
    monkeypatch.setattr(train, "load_data", lambda args: pytest.fail("the data was loaded"))
    not_a_dataset = tmp_path / "empty-folder"
    not_a_dataset.mkdir()
    for bad, message in [
        (["--dataset", "/nonexistent"], "--dataset /nonexistent: no such folder"),
        (["--dataset", str(not_a_dataset)], "the folder holds neither results.csv"),
        (["--karpathy_json", "split.json"], "--karpathy_json applies to a Kaggle Flickr30k folder, not to --dataset"),
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be a positive integer, got 0"),
        (["--per_device_eval_batch_size", "-1"], "--per_device_eval_batch_size must be a positive integer"),
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be a positive integer"),
        (["--num_train_epochs", "0"], "--num_train_epochs must be a positive integer"),
        (["--max_train_steps", "-5"], "--max_train_steps must be a positive integer"),
        (["--num_warmup_steps", "-1"], "--num_warmup_steps must be an integer >= 0"),
        (["--dataloader_num_workers", "-2"], "--dataloader_num_workers must be an integer >= 0"),
        (["--shapes_num_train", "0"], "--shapes_num_train must be a positive integer"),
        (["--max_eval_samples", "0"], "--max_eval_samples must be a positive integer"),
        (["--max_caption_length", "1"], "--max_caption_length must be an integer >= 2"),
        (["--num_beams", "0"], "--num_beams must be a positive integer"),
        (["--max_new_tokens", "0"], "--max_new_tokens must be a positive integer"),
        (["--logging_steps", "0"], "--logging_steps must be a positive integer"),
        (["--seed", "-1"], "--seed must be an integer from 0 to 4294967295"),
        (["--learning_rate", "0"], "--learning_rate must be a finite number > 0"),
        (["--learning_rate", "nan"], "--learning_rate must be a finite number > 0, got nan"),
        (["--weight_decay", "-0.1"], "--weight_decay must be a finite number >= 0"),
        (["--max_grad_norm", "inf"], "--max_grad_norm must be a finite number > 0"),
        (["--crop_pct", "1.5"], "--crop_pct must be a finite number > 0 and <= 1"),
        (["--checkpointing_steps", "0"], "--checkpointing_steps must be a positive integer, 'epoch' or 'no'"),
        (["--checkpointing_steps", "often"], "--checkpointing_steps must be a positive integer, 'epoch' or 'no'"),
        (["--lr_scheduler_type", "cosyne"], "argument --lr_scheduler_type: invalid choice: 'cosyne'"),
        (["--vocab_size", "5"], "--vocab_size, --min_word_frequency or --lang: vocab_size=5 is too small"),
        (["--vision_model_name_or_path", "./no-backbone"], "--vision_model_name_or_path: no such folder: ./no-"),
        (["--resume_from_checkpoint", str(tmp_path / "none")], f"--resume_from_checkpoint {tmp_path / 'none'}: no"),
        (["--feature_cache", "on", "--no-freeze_encoder"], "--feature_cache on needs --freeze_encoder"),
        (["--overwrite_output_dir", "--resume_from_checkpoint", "latest"], "give only one"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            train.main(tiny_args(tmp_path / "run", "attention", *bad))
        usage, error = capsys.readouterr().err.strip().splitlines()  # argparse's usage line, then the error
        assert exit_info.value.code == 2 and usage.startswith("usage: "), bad
        assert ": error: " in error and message in error, (bad, error)
    assert not (tmp_path / "run").exists()

    result = subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), "--dataset", "/nonexistent"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == "train.py: error: --dataset /nonexistent: no such folder (expected " \
        "'shapes', 'scenes', 'flickr30k' or a folder)"  # fmt: skip
    for name in ("shapes", "scenes"):  # the built-in sets are names, not folders
        assert train.parse_args(tiny_args(tmp_path / "run", "attention", "--dataset", name)).dataset == name


def earlier_run(folder: Path) -> dict[str, bytes]:
    """What a finished run leaves (by hand: its files' content does not matter here), as `files_under` sees it."""
    (folder / "checkpoints" / "checkpoint-4").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"the earlier run's weights")
    for name in ("training_args.json", "data_report.json", "test_samples.json", "all_results.json"):
        (folder / name).write_text(json.dumps({"per_device_train_batch_size": 32}))
    (folder / "checkpoints" / "checkpoint-4" / "checkpoint.json").write_text("{}")
    return files_under(folder)


def test_a_failed_run_leaves_an_earlier_runs_folder_as_it_was(tmp_path, monkeypatch, capsys):
    """Bad flags, a folder that holds an earlier run, and a disk too small (the free-space preflight) stop the run
    before it writes anything into the folder, even with --overwrite_output_dir: the earlier model's records still
    describe it."""
    folder = tmp_path / "run"
    before = earlier_run(folder)
    for bad in (["--dataset", "/nonexistent"], ["--per_device_train_batch_size", "0"]):
        with pytest.raises(SystemExit):
            train.main(tiny_args(folder, "attention", *bad))
        assert files_under(folder) == before, bad

    with pytest.raises(PreflightError, match=re.escape(f"{folder} holds an earlier run (model.safetensors, ")):
        train.main(tiny_args(folder, "attention"))
    assert files_under(folder) == before

    disk = shutil.disk_usage(tmp_path)
    small_disk = types.ModuleType("shutil")  # the shutil that checkpointing sees, with 1 MiB free
    vars(small_disk).update(vars(shutil), disk_usage=lambda path: disk._replace(free=2**20))
    monkeypatch.setattr(checkpointing, "shutil", small_disk)
    with pytest.raises(PreflightError, match="Not enough disk space in .*only 1 MiB"):
        train.main(tiny_args(folder, "attention", "--overwrite_output_dir"))
    assert files_under(folder) == before


def test_a_new_run_into_an_earlier_runs_folder_is_refused_unless_it_overwrites(tmp_path, scores_without_java):
    """A 4-step run, then a 2-step run into the same folder: refused with one sentence; with --overwrite_output_dir
    the earlier run's checkpoints and records are gone, and `latest` never takes a checkpoint of the earlier run,
    even one put back beside the new run's."""
    folder = tmp_path / "run"
    common = ["--checkpointing_steps", "1", *QUICK_RUN]
    train.main(tiny_args(folder, "attention", *common, "--max_train_steps", "4"))
    earlier_checkpoint = shutil.copytree(folder / "checkpoints" / "checkpoint-4", tmp_path / "kept-checkpoint-4")
    before = files_under(folder)

    with pytest.raises(PreflightError) as refusal:
        train.main(tiny_args(folder, "attention", *common, "--max_train_steps", "2"))
    assert str(refusal.value) == (
        f"{folder} holds an earlier run (model.safetensors, training_args.json, data_report.json, ...): add "
        "--overwrite_output_dir to replace it, --resume_from_checkpoint latest to continue it, or choose another "
        "--output_dir."
    )
    assert files_under(folder) == before

    results = train.main(tiny_args(folder, "attention", *common, "--max_train_steps", "2", "--overwrite_output_dir"))
    assert sorted(p.name for p in (folder / "checkpoints").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert [json.loads(line)["step"] for line in (folder / "train_log.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((folder / "training_args.json").read_text())["max_train_steps"] == 2
    assert json.loads((folder / "all_results.json").read_text())["completed_steps"] == results["completed_steps"] == 2
    assert not list(folder.glob(".*"))  # no staging or trash folder left

    # An earlier run's checkpoint put back (e.g. by an older train.py that did not refuse): `latest` skips it.
    shutil.copytree(earlier_checkpoint, folder / "checkpoints" / "checkpoint-4")
    assert train.resolve_resume_dir(folder, "latest") == folder / "checkpoints" / "checkpoint-2"


# The evaluation settings train.py passes to its saves (the saved defaults take the caption length from them).
GENERATION = {"num_beams": 2, "max_new_tokens": 12, "length_penalty": 1.0}


def test_the_final_save_never_leaves_weights_beside_another_runs_records(tmp_path, monkeypatch):
    """The final model and its records replace an earlier one weights last: if the save stops at any of its renames
    (a kill, a full disk), the folder holds the earlier model with its records, or no weights at all."""
    from conftest import build_tiny_captioner

    old_model, processor = build_tiny_captioner(seed=0)
    new_model, _ = build_tiny_captioner(seed=1)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    train.save_final_model(old_model, processor, GENERATION, {"all_results.json": {"run": "old"}}, earlier)
    old_weights = (earlier / "model.safetensors").read_bytes()
    real_replace = os.replace
    for failing_call in range(1, 40):
        folder = shutil.copytree(earlier, tmp_path / f"run-{failing_call}")
        calls = []

        def replace_or_fail(source, target, calls=calls, failing_call=failing_call):
            calls.append(target)
            if len(calls) == failing_call:
                raise OSError(28, "No space left on device")
            real_replace(source, target)

        monkeypatch.setattr(train.os, "replace", replace_or_fail)
        try:
            train.save_final_model(new_model, processor, GENERATION, {"all_results.json": {"run": "new"}}, folder)
            finished = True
        except OSError:
            finished = False
        monkeypatch.setattr(train.os, "replace", real_replace)
        record = json.loads((folder / "all_results.json").read_text())["run"]
        if (folder / "model.safetensors").exists():
            expected = "old" if (folder / "model.safetensors").read_bytes() == old_weights else "new"
            assert record == expected, failing_call
        if finished:
            assert record == "new" and failing_call > len(calls)
            break
    else:
        pytest.fail("the save never finished")


def test_saved_files_get_the_umasks_permissions(tmp_path):
    """safetensors writes its files 0600; the final model, the best model and checkpoints get what the umask gives
    every other file (0644 under the usual 022), like their sibling JSON files."""
    from conftest import build_tiny_captioner

    model, processor = build_tiny_captioner()
    old_umask = os.umask(0o022)
    try:
        train.save_final_model(model, processor, GENERATION, {"all_results.json": {}}, tmp_path)
        train.save_model_atomically(model, processor, GENERATION, tmp_path / "best_model")
        os.umask(0o077)  # a stricter umask is respected too
        train.save_model_atomically(model, processor, GENERATION, tmp_path / "private")
    finally:
        os.umask(old_umask)
    for path in (tmp_path / "model.safetensors", tmp_path / "all_results.json", tmp_path / "config.json",
                 tmp_path / "best_model" / "model.safetensors"):  # fmt: skip
        assert path.stat().st_mode & 0o777 == 0o644, path
    assert (tmp_path / "private" / "model.safetensors").stat().st_mode & 0o777 == 0o600


def test_output_that_is_not_a_terminal_gets_log_lines_not_progress_bars(tmp_path, capfd, caplog, scores_without_java):
    """With stdout and stderr captured (not a TTY), no carriage-return progress bar: a log line per --logging_steps
    steps and at the last step."""
    caplog.set_level(logging.INFO, logger="train")
    train.main(tiny_args(tmp_path, "attention", "--max_train_steps", "4", "--logging_steps", "3", *QUICK_RUN))
    assert "\r" not in "".join(capfd.readouterr())
    assert [int(step) for step in re.findall(r"step (\d+)/4: loss", caplog.text)] == [3, 4]
