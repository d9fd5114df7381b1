"""push_to_hub.py (and imgcap_hf.publishing under it) on a real (tiny) train.py run: what is staged, that it loads
without our package, the card's numbers, the Space, the login check, and the upload with only the Hub's HTTP edge
faked."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx2
import pytest
import yaml
from conftest import TINY_TRAIN_VISION, run_without_imgcap, shipped_files
from huggingface_hub import CommitInfo, HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError
from PIL import Image, ImageDraw

import push_to_hub
import train
from imgcap_hf import publishing

REPO_ROOT = Path(__file__).resolve().parents[1]
HAS_APP = (REPO_ROOT / "app.py").is_file()
REPO_ID = "someone/tiny-captioner"
SPACE_ID = "someone/tiny-captioner-demo"
PICKLE_SUFFIXES = (".bin", ".pkl", ".pickle", ".pt", ".pth")


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def split_card(text: str) -> tuple[dict, str]:
    """YAML front matter (parsed) and body of a README.md."""
    assert text.startswith("---\n")
    front_matter, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(front_matter), body


def forbid_http(monkeypatch: pytest.MonkeyPatch) -> None:
    """The network edge itself: any HTTP request huggingface_hub tries fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a network call was made")

    monkeypatch.setattr(httpx2.Client, "send", refuse)  # the HTTP client huggingface_hub 2.x uses
    monkeypatch.setattr(httpx2.AsyncClient, "send", refuse)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A real train.py run, shrunk (96 shapes images, one epoch): checkpoints, best model and TensorBoard logs too."""
    output_dir = tmp_path_factory.mktemp("run") / "tiny-attention"
    train.main(
        ["--output_dir", str(output_dir), "--decoder_type", "attention", "--shapes_num_train", "96",
         "--shapes_num_eval", "16", "--image_size", "32", "--vision_config", TINY_TRAIN_VISION,
         "--region_grid_size", "2",
         "--hidden_size", "32", "--embedding_size", "16", "--attention_size", "16", "--per_device_train_batch_size",
         "8", "--num_beams", "2", "--max_new_tokens", "12", "--learning_rate", "1e-2", "--num_train_epochs", "1",
         "--with_tracking"]
    )  # fmt: skip
    return output_dir


@pytest.fixture(scope="module")
def dry_run(trained_run, tmp_path_factory) -> Path:
    """`--dry_run` staging (with the Space when app.py exists), made with every HTTP request forbidden."""
    stage = tmp_path_factory.mktemp("stage")
    argv = ["--model_dir", str(trained_run), "--repo_id", REPO_ID, "--dry_run", "--output_dir", str(stage)]
    with pytest.MonkeyPatch.context() as monkeypatch:
        forbid_http(monkeypatch)
        assert push_to_hub.main(argv + (["--space_id", SPACE_ID] if HAS_APP else [])) == 0
    return stage


def test_model_repo_holds_only_what_from_pretrained_needs(trained_run, dry_run):
    run_files = {str(path.relative_to(trained_run)) for path in trained_run.rglob("*") if path.is_file()}
    # What the run folder holds and must stay home: training checkpoints, the best model, TensorBoard.
    assert any(name.startswith("checkpoints/") and name.endswith("optimizer.safetensors") for name in run_files)
    assert any(name.startswith("best_model/") for name in run_files)
    assert any("tfevents" in name for name in run_files)

    staged = set(files_under(dry_run / "model"))
    assert staged == {
        "README.md", "config.json", "generation_config.json", "model.safetensors", "vocab.json",
        "tokenizer_config.json", "processor_config.json", "configuration_imgcap.py", "modeling_imgcap.py",
        "tokenization_imgcap.py", "image_processing_imgcap.py", "processing_imgcap.py", "pipeline_imgcap.py",
        "all_results.json",
        "training_args.json", "data_report.json",
    }  # fmt: skip
    assert (dry_run / "model" / "model.safetensors").read_bytes() == (trained_run / "model.safetensors").read_bytes()
    # The run's records are published without the machine's folders (train.py saved absolute paths).
    training_args = (dry_run / "model" / "training_args.json").read_text()
    assert str(trained_run) in (trained_run / "training_args.json").read_text()
    assert str(trained_run.parent) not in training_args and str(REPO_ROOT) not in training_args
    assert json.loads(training_args)["output_dir"] == trained_run.name


def test_model_repo_code_is_exactly_the_shipped_folder(dry_run):
    staged = files_under(dry_run / "model")
    assert {name: content for name, content in staged.items() if name.endswith(".py")} == shipped_files()


def test_staged_model_captions_without_our_package(trained_run, dry_run, tmp_path):
    """A fresh interpreter where `import imgcap_hf` fails loads the staged folder with the Auto classes, and captions
    an image exactly as our package does with the run's own folder."""
    from imgcap_hf import ImgCapForConditionalGeneration, ImgCapProcessor

    image_path = tmp_path / "shapes.png"
    image = Image.new("RGB", (32, 32), "white")
    ImageDraw.Draw(image).ellipse((4, 8, 16, 20), fill="red")
    image.save(image_path)
    model = ImgCapForConditionalGeneration.from_pretrained(trained_run)
    processor = ImgCapProcessor.from_pretrained(trained_run)
    generation = json.loads((trained_run / "all_results.json").read_text())["generation"]  # the evaluated settings
    expected = processor.batch_decode(
        model.generate(**processor(images=[image], return_tensors="pt"), **generation), skip_special_tokens=True
    )[0]

    script = textwrap.dedent(
        f"""
        import json
        from PIL import Image
        from transformers import AutoModelForImageTextToText, AutoProcessor
        folder = {str(dry_run / "model")!r}
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        inputs = processor(images=[Image.open({str(image_path)!r})], return_tensors="pt")
        ids = model.generate(**inputs, **{generation!r})
        print(json.dumps({{"module": type(model).__module__,
                           "caption": processor.batch_decode(ids, skip_special_tokens=True)[0]}}))
        """
    )
    output = run_without_imgcap(script, tmp_path)
    assert output["module"].startswith("transformers_modules.")
    assert output["caption"] == expected and expected.strip()


def test_model_card_carries_the_runs_real_results(trained_run, dry_run):
    results = json.loads((trained_run / "all_results.json").read_text())
    text = (dry_run / "model" / "README.md").read_text()
    metadata, body = split_card(text)

    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "image-text-to-text"
    assert {"custom_code", "image-captioning", "show-attend-and-tell", "synthetic-data"} <= set(metadata["tags"])
    assert metadata["license"] == "apache-2.0" and metadata["language"] == ["en"]
    assert "datasets" not in metadata  # the shapes set is not a Hub dataset
    assert {"bleu", "cider", "rouge"} <= set(metadata["metrics"])
    (entry,) = metadata["model-index"]
    assert entry["name"] == REPO_ID
    (result,) = entry["results"]
    assert result["task"]["type"] == "image-to-text" and result["dataset"]["split"] == "test"
    scores = {metric["name"]: metric for metric in result["metrics"]}
    for name, key in (("BLEU-1", "test_bleu_1"), ("BLEU-4", "test_bleu_4"), ("CIDEr", "test_cider"),
                      ("ROUGE-L", "test_rouge_l")):  # fmt: skip
        assert scores[name]["value"] == results[key]  # the run's numbers, unrounded
        assert scores[name]["args"]["num_beams"] == results["generation"]["num_beams"] == 2
        assert scores[name]["args"]["max_new_tokens"] == 12
        assert f"| {name} | {results[key]:.4f} |" in body
    assert scores["BLEU-4"]["args"]["max_order"] == 4
    assert ("METEOR" in scores) == (results.get("test_meteor") is not None)

    # huggingface_hub reads the same metadata back, model-index included.
    card = ModelCard(text)
    assert {(r.metric_name, r.metric_value) for r in card.data.eval_results} >= {("CIDEr", results["test_cider"])}
    assert f"{results['trainable_parameters']:,} trainable" in body
    assert "trust_remote_code=True, revision=revision" in body and "pin" in body
    assert f"Test split, {results['test_num_images']} images" in body and "num_beams=2, max_new_tokens=12" in body
    assert "only seen synthetic pictures of coloured shapes" in body


def test_a_staged_repo_without_its_pipeline_code_is_refused(dry_run, tmp_path):
    """config.json names the shipped pipelines (`custom_pipelines`): their file must be in the repository."""
    folder = tmp_path / "model"
    shutil.copytree(dry_run / "model", folder)
    publishing.verify_model_repo(folder)
    (folder / "pipeline_imgcap.py").unlink()
    with pytest.raises(publishing.PublishError, match=r"custom_pipelines is missing \(pipeline_imgcap\.py\)"):
        publishing.verify_model_repo(folder)


def python_blocks(markdown: str) -> list[str]:
    return [block.split("\n", 1)[1] for block in markdown.split("```")[1::2] if block.startswith("python\n")]


def test_model_card_usage_runs_as_written_without_our_package(trained_run, dry_run, tmp_path):
    """The card's first snippet (pipelines as remote code), run as written on the staged repository in an interpreter
    where `import imgcap_hf` fails: the task its front matter names is one the repository really ships, and both
    pipelines caption. Only the repository id, the commit and the picture are filled in."""
    text = (dry_run / "model" / "README.md").read_text()
    metadata, body = split_card(text)
    staged_tasks = set(json.loads((dry_run / "model" / "config.json").read_text())["custom_pipelines"])
    snippet = python_blocks(body)[0]
    assert metadata["pipeline_tag"] in staged_tasks
    assert {f'pipeline("{task}"' in snippet for task in staged_tasks} == {True}

    image_path = tmp_path / "photo.png"
    image = Image.new("RGB", (32, 32), "white")
    ImageDraw.Draw(image).ellipse((4, 8, 16, 20), fill="red")
    image.save(image_path)
    runnable = snippet.replace(f'"{REPO_ID}"', repr(str(dry_run / "model"))).replace('"COMMIT_HASH"', "None")
    script = runnable.replace('"photo.jpg"', repr(str(image_path)))
    generation = json.loads((trained_run / "all_results.json").read_text())["generation"]
    script += textwrap.dedent(
        f"""
        import json
        print(json.dumps([captioner({str(image_path)!r}, **{generation!r}),
                          continuer({str(image_path)!r}, text="", **{generation!r})]))
        """
    )
    captioned, continued = run_without_imgcap(script, tmp_path)
    assert captioned[0]["generated_text"].strip() and continued[0]["generated_text"] == captioned[0]["generated_text"]


@pytest.mark.parametrize(
    ("layout", "dataset", "hub_id", "expected"),
    [
        ("hub-flickr30k", "flickr30k", "nlphuji/flickr30k", "stereotypes"),
        ("kaggle-flickr30k", "/home/alice/flickr30k_images", None, "stereotypes"),
        ("imagefolder", "/home/alice/holiday-photos", None, "private image folder"),
    ],
)
def test_model_card_names_the_dataset_without_local_paths(trained_run, layout, dataset, hub_id, expected):
    records = publishing.load_run_records(trained_run)
    records.data_report["layout"] = layout
    records.training_args["dataset"] = dataset
    metadata, body = split_card(publishing.build_model_card(records, REPO_ID, "mit"))
    assert metadata.get("datasets") == ([hub_id] if hub_id else None)
    assert metadata["license"] == "mit" and "synthetic-data" not in metadata["tags"]
    assert expected in body and "alice" not in body


def test_model_card_names_the_caption_tokenizer_beside_the_scores(trained_run):
    """The tokenizer the metrics used (`test_tokenizer`) is printed under the score table and kept in every metric's
    args; the scores stay numbers, and a run that did not record the tokenizer gets a card without it."""
    records = publishing.load_run_records(trained_run)
    records.results.pop("test_tokenizer", None)
    metadata, body = split_card(publishing.build_model_card(records, REPO_ID, "mit"))
    assert "caption tokenizer" not in body
    assert not any("tokenizer" in metric["args"] for metric in metadata["model-index"][0]["results"][0]["metrics"])

    records.results["test_tokenizer"] = "ptb-java"
    text = publishing.build_model_card(records, REPO_ID, "mit")
    metadata, body = split_card(text)
    table_end = body.index(f"| CIDEr | {records.results['test_cider']:.4f} |\n")
    sentence = "Scores computed by the coco-caption metrics with the `ptb-java` caption tokenizer."
    assert body.index(sentence) == body.index("\n\n", table_end) + 2  # the paragraph right after the table
    metrics = metadata["model-index"][0]["results"][0]["metrics"]
    assert metrics and all(metric["args"]["tokenizer"] == "ptb-java" for metric in metrics)
    assert all(type(metric["value"]) in (int, float) for metric in metrics)
    assert ModelCard(text).data.eval_results[0].metric_args["tokenizer"] == "ptb-java"


def test_a_score_that_is_not_a_number_is_left_out_of_the_card(trained_run):
    records = publishing.load_run_records(trained_run)
    records.results["test_meteor"] = "unavailable"
    metadata, body = split_card(publishing.build_model_card(records, REPO_ID, "mit"))
    names = {metric["name"] for metric in metadata["model-index"][0]["results"][0]["metrics"]}
    assert "METEOR" not in names and {"BLEU-4", "CIDEr"} <= names and "meteor" not in metadata["metrics"]
    assert "| METEOR |" not in body and "METEOR was not computed" in body


@pytest.mark.skipif(not HAS_APP, reason="app.py (written by the app's author) is not in the repository yet")
def test_space_imports_its_app_from_its_own_folder(dry_run, tmp_path):
    space = dry_run / "space"
    shipped_model_file = "imgcap_hf/models/imgcap/modeling_imgcap.py"
    assert {"app.py", "requirements.txt", "README.md", "imgcap_hf/__init__.py", shipped_model_file} <= set(
        files_under(space)
    )
    assert not list(space.rglob("test*")) and not list(space.rglob("__pycache__"))

    requirements = (space / "requirements.txt").read_text().splitlines()
    assert requirements and all(line.count("==") == 1 for line in requirements)
    pins = dict(line.split("==") for line in requirements)
    for distribution in ("gradio", "torch", "transformers"):
        assert pins[distribution] == push_to_hub.importlib.metadata.version(distribution).split("+")[0]

    metadata, body = split_card((space / "README.md").read_text())
    assert metadata["sdk"] == "gradio" and metadata["app_file"] == "app.py" and metadata["models"] == [REPO_ID]
    assert metadata["sdk_version"] == pins["gradio"]
    assert f"IMGCAP_MODELS={REPO_ID}" in body

    # The Space's own copy of the package is what the app imports (a Space has nothing else); no server starts.
    script = "import app, imgcap_hf; print(imgcap_hf.__file__)"
    environment = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "IMGCAP_MODELS": REPO_ID}
    environment.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=space, env=environment, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert Path(result.stdout.strip().splitlines()[-1]).resolve().is_relative_to(space.resolve())


def test_space_files_follow_the_apps_imports(tmp_path):
    """Local modules reached through absolute, relative and indented imports are copied; unused ones are not."""
    package = tmp_path / "pkg"
    package.mkdir()
    (tmp_path / "app.py").write_text("import os\nimport numpy as np\nfrom pkg import thing\nfrom pkg.sub import x\n")
    (package / "__init__.py").write_text("from .mod import thing\n\ndef later():\n    import yaml\n")
    (package / "mod.py").write_text("from . import helper\nthing = 1\n")
    (package / "helper.py").write_text("")
    (package / "sub.py").write_text("x = 2\n")
    (package / "unused.py").write_text("import torch\n")

    files, external = push_to_hub.import_closure(tmp_path / "app.py", tmp_path)
    assert {str(path.relative_to(tmp_path)) for path in files} == {
        "app.py", "pkg/__init__.py", "pkg/mod.py", "pkg/helper.py", "pkg/sub.py"
    }  # fmt: skip
    assert external == {"numpy", "yaml"}
    assert push_to_hub.pinned_requirements(external) == [
        f"numpy=={push_to_hub.importlib.metadata.version('numpy')}",
        f"PyYAML=={push_to_hub.importlib.metadata.version('PyYAML')}",
    ]
    with pytest.raises(publishing.PublishError, match="not_a_real_module"):
        push_to_hub.pinned_requirements({"not_a_real_module"})


def test_not_logged_in_is_one_clear_error_without_network(trained_run, tmp_path):
    environment = {**os.environ, "HF_HOME": str(tmp_path / "empty-hf-home"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    environment.pop("HF_TOKEN", None)
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "push_to_hub.py"), "--model_dir", str(trained_run), "--repo_id", REPO_ID],
        env=environment, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: Not logged in to the Hugging Face Hub: run `hf auth login` or set HF_TOKEN."
    ]
    assert not (tmp_path / "empty-hf-home").exists()


def test_upload_sends_the_dry_run_staging(trained_run, dry_run, monkeypatch, capsys, caplog):
    token = "hf_dummy_token_that_must_stay_secret"
    monkeypatch.setenv("HF_TOKEN", token)
    calls = []  # the Hub's API methods are the network edge: record them instead of sending requests

    def record(name):
        def method(self, *args, **kwargs):
            calls.append((name, args, kwargs))
            if name != "upload_folder":
                return None
            kwargs["uploaded"] = files_under(Path(kwargs["folder_path"]))  # the folder is deleted after main
            return CommitInfo(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/abc123",
                              commit_message="", commit_description="", oid="abc123", pr_url=None)  # fmt: skip

        return method

    for name in ("create_repo", "create_branch", "upload_folder", "add_space_variable"):
        monkeypatch.setattr(HfApi, name, record(name))
    forbid_http(monkeypatch)
    argv = ["--model_dir", str(trained_run), "--repo_id", REPO_ID, "--private", "--revision", "v1"]
    assert push_to_hub.main(argv + (["--space_id", SPACE_ID] if HAS_APP else [])) == 0

    by_name = {}
    for name, args, kwargs in calls:
        by_name.setdefault(name, []).append((args, kwargs))
    model_repo = by_name["create_repo"][0]
    assert model_repo[0] == (REPO_ID,) and model_repo[1]["private"] is True and model_repo[1]["repo_type"] == "model"
    assert by_name["create_branch"] == [((REPO_ID,), {"branch": "v1", "repo_type": "model", "exist_ok": True})]
    model_upload = by_name["upload_folder"][0][1]
    assert model_upload["repo_id"] == REPO_ID and model_upload["revision"] == "v1"
    assert model_upload["uploaded"] == files_under(dry_run / "model")
    assert not [name for name in model_upload["uploaded"] if name.endswith(PICKLE_SUFFIXES)]
    output = capsys.readouterr()
    assert 'revision="abc123"' in output.out
    if HAS_APP:
        space_repo = by_name["create_repo"][1]
        assert space_repo[0] == (SPACE_ID,) and space_repo[1]["repo_type"] == "space"
        assert space_repo[1]["space_sdk"] == "gradio" and space_repo[1]["private"] is True
        assert by_name["add_space_variable"] == [((SPACE_ID, "IMGCAP_MODELS", REPO_ID), {})]
        space_upload = by_name["upload_folder"][1][1]
        assert space_upload["repo_type"] == "space" and space_upload["uploaded"] == files_under(dry_run / "space")
        assert "HF_TOKEN secret" in output.out  # a private model needs a token in the Space
    # The token is found by huggingface_hub itself: never passed, printed or logged by us.
    assert all("token" not in kwargs for _, _, kwargs in calls)
    assert token not in repr(calls) + output.out + output.err + caplog.text + " ".join(argv)


def copy_run(trained_run: Path, target: Path) -> Path:
    """The run folder's top-level files (what publishing reads), to break one of them."""
    target.mkdir()
    for path in trained_run.iterdir():
        if path.is_file():
            shutil.copyfile(path, target / path.name)
    return target


def break_weights(folder: Path) -> None:
    import torch

    torch.save({"weights": torch.zeros(2)}, folder / "model.safetensors")  # a pickle under a safe name


def stop_early(folder: Path) -> None:
    (folder / "all_results.json").write_text(json.dumps({"stopped_early": "3 non-finite losses in a row"}))


def drop_auto_map(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    del config["auto_map"]
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda folder: (folder / "model.safetensors").unlink(), "needs config.json and model.safetensors"),
        (break_weights, "model.safetensors is not a readable safetensors file"),
        (lambda folder: (folder / "modeling_imgcap.py").unlink(), "missing (modeling_imgcap.py)"),
        (drop_auto_map, "config.json has no auto_map"),
        (stop_early, "stopped early (3 non-finite losses in a row)"),
        (lambda folder: (folder / "training_args.json").unlink(), "has no training_args.json"),
    ],
)
def test_unpublishable_folders_are_refused(trained_run, tmp_path, capsys, damage, message):
    model_dir = copy_run(trained_run, tmp_path / "run")
    damage(model_dir)
    stage = tmp_path / "stage"
    argv = ["--model_dir", str(model_dir), "--repo_id", REPO_ID, "--dry_run", "--output_dir", str(stage)]
    assert push_to_hub.main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and message in error and len(error.splitlines()) == 1
    assert not (stage / "model").exists()  # nothing half-staged is left behind


def test_pickles_and_subfolders_never_pass_verification(trained_run, dry_run, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(dry_run / "model", folder)
    publishing.verify_model_repo(folder)
    (folder / "optimizer.bin").write_bytes(b"\x80\x04")
    with pytest.raises(publishing.PublishError, match=r"pickle-based files \(optimizer.bin\)"):
        publishing.verify_model_repo(folder)
    (folder / "optimizer.bin").unlink()
    (folder / "checkpoints").mkdir()
    with pytest.raises(publishing.PublishError, match="subfolders"):
        publishing.verify_model_repo(folder)


def test_an_existing_staging_folder_is_not_overwritten(trained_run, dry_run, capsys):
    argv = ["--model_dir", str(trained_run), "--repo_id", REPO_ID, "--dry_run", "--output_dir", str(dry_run)]
    assert push_to_hub.main(argv) == 2
    assert "already holds model/ or space/" in capsys.readouterr().err


def test_bad_repo_ids_and_a_token_flag_are_usage_errors(trained_run, capsys):
    for argv in (
        ["--repo_id", "no-owner"],
        ["--repo_id", REPO_ID, "--token", "hf_x"],
        ["--repo_id", REPO_ID, "--dry_run"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            push_to_hub.main(["--model_dir", str(trained_run), *argv])
        assert exit_info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_a_refusal_from_the_hub_is_one_sentence(trained_run, monkeypatch, capsys):
    def refuse(self, repo_id, **kwargs):
        response = httpx2.Response(403, request=httpx2.Request("POST", "https://huggingface.co/api/repos/create"))
        raise HfHubHTTPError(
            "403 Forbidden", response=response, server_message="You cannot create repos in 'someone'."
        )

    monkeypatch.setenv("HF_TOKEN", "hf_dummy")
    monkeypatch.setattr(HfApi, "create_repo", refuse)
    forbid_http(monkeypatch)
    assert push_to_hub.main(["--model_dir", str(trained_run), "--repo_id", REPO_ID]) == 1
    error = capsys.readouterr().err.strip()
    assert error == "error: The Hub refused the request: You cannot create repos in 'someone'."


def test_a_missing_model_dir_is_a_usage_error_before_the_login_check(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(push_to_hub, "check_logged_in", lambda: pytest.fail("the login is checked after arguments"))
    forbid_http(monkeypatch)
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "a-file").write_text("")
    for argv, message in (
        (["--model_dir", "outputs/shapes-atention"], "argument --model_dir: no such folder: outputs/shapes-atention"),
        (["--model_dir", "outputs/a-file"], "argument --model_dir: not a folder: outputs/a-file"),
        (
            ["--model_dir", "outputs", "--dry_run", "--output_dir", "outputs/a-file"],
            "--output_dir: not a folder: outputs/a-file",
        ),
    ):
        with pytest.raises(SystemExit) as exit_info:
            push_to_hub.main([*argv, "--repo_id", REPO_ID])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert "Traceback" not in error and error.strip().splitlines()[-1].endswith(message)


@pytest.mark.parametrize("dataset", ["shapes", "scenes"])
def test_a_synthetic_set_is_named_as_itself_on_the_card(dataset):
    """A model trained on a built-in synthetic set is described as that set (not as a private image folder), with
    the synthetic-data limits, whether its layout comes from data_report.json or only from the --dataset name."""
    from imgcap_hf.publishing import RunRecords, dataset_facts

    for data_report in ({"layout": dataset}, {}):
        records = RunRecords(results={}, training_args={"dataset": dataset}, data_report=data_report, config={})
        facts = dataset_facts(records)
        assert (facts["name"], facts["type"]) == (f"ImgCap synthetic {dataset}", f"imgcap-{dataset}")
        assert "not comparable with" in facts["limits"]
