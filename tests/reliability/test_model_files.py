"""Model folders with missing, mismatched or dangerous files: every loading path (`load_captioner`, the CLI, the
pipeline, the app) fails with one clear error instead of producing wrong captions, and a pickle is never unpickled.
The folders are real `save_pretrained` output edited on disk; nothing is mocked."""

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
from conftest import build_tiny_captioner
from transformers import pipeline

from imgcap_hf import ImgCapConfig, ImgCapForConditionalGeneration, ImgCapTokenizer
from imgcap_hf.cli import main as cli_main
from imgcap_hf.loading import check_processor_matches_model, load_captioner

pytestmark = [
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    model, processor = build_tiny_captioner("pooled")
    directory = tmp_path_factory.mktemp("model-files") / "good"
    model.generation_config.update(max_new_tokens=4, num_beams=1)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def broken_copy(saved_model: Path, tmp_path: Path, breakage) -> Path:
    directory = tmp_path / "broken"
    shutil.copytree(saved_model, directory)
    breakage(directory)
    return directory


def edit_json(name: str, **changes):
    def breakage(directory: Path) -> None:
        content = json.loads((directory / name).read_text())
        content.update(changes)
        (directory / name).write_text(json.dumps(content))

    return breakage


def remove(name: str):
    return lambda directory: (directory / name).unlink()


def truncate_weights(directory: Path) -> None:
    content = (directory / "model.safetensors").read_bytes()
    (directory / "model.safetensors").write_bytes(content[: len(content) // 2])


def add_words_to_vocab(directory: Path) -> None:
    vocab = json.loads((directory / "vocab.json").read_text())
    vocab.update({f"extra{index}": len(vocab) + index for index in range(10)})
    (directory / "vocab.json").write_text(json.dumps(vocab))


BROKEN_FOLDERS = [
    pytest.param(remove("config.json"), "config.json (the model configuration) is missing", id="no-config"),
    pytest.param(remove("model.safetensors"), "model.safetensors is missing", id="no-weights"),
    pytest.param(truncate_weights, "model.safetensors is truncated or corrupt", id="truncated-weights"),
    pytest.param(remove("vocab.json"), "vocab.json (the tokenizer's vocabulary) is missing", id="no-vocab"),
    pytest.param(
        edit_json("config.json", vocab_size=10), "says vocab_size=10 but the weights", id="config-vocab-smaller"
    ),
    pytest.param(
        edit_json("config.json", vocab_size=999), "says vocab_size=999 but the weights", id="config-vocab-larger"
    ),
    pytest.param(add_words_to_vocab, "tokens but the model only", id="tokenizer-larger-than-model"),
    pytest.param(
        edit_json("config.json", eos_token_id=7),
        "gives <eos> the id 3 but the model expects 7",
        id="special-ids-differ",
    ),
    pytest.param(
        edit_json("config.json", decoder_type="transformer"), "decoder_type must be one of", id="decoder-type"
    ),
    pytest.param(edit_json("config.json", image_pooling="median"), "image_pooling must be one of", id="image-pooling"),
    pytest.param(edit_json("config.json", hidden_size=0), "hidden_size must be a positive integer", id="zero-size"),
]


@pytest.mark.parametrize(("breakage", "message"), BROKEN_FOLDERS)
def test_load_captioner_gives_one_clear_sentence(saved_model, tmp_path, breakage, message):
    directory = broken_copy(saved_model, tmp_path, breakage)
    with pytest.raises(ValueError, match=re.escape(message)) as raised:
        load_captioner(directory)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(("breakage", "message"), BROKEN_FOLDERS[:3] + BROKEN_FOLDERS[6:7])
def test_cli_stops_before_captioning_with_one_error_line(saved_model, tmp_path, capsys, breakage, message):
    directory = broken_copy(saved_model, tmp_path, breakage)
    image = tmp_path / "image.png"
    image.write_bytes(_tiny_png())

    status = cli_main(["caption", "--model", str(directory), "--device", "cpu", str(image)])

    output = capsys.readouterr()
    assert status == 2 and output.out == ""
    error_lines = [line for line in output.err.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and message in error_lines[0]  # (transformers may draw a progress bar too)


def test_the_pipeline_refuses_a_tokenizer_that_does_not_belong_to_the_model(saved_model, tmp_path):
    directory = broken_copy(saved_model, tmp_path, add_words_to_vocab)
    with pytest.raises(ValueError, match="tokens but the model only"):
        pipeline("image-captioning", model=str(directory))


def test_check_processor_matches_model_accepts_a_matching_pair(saved_model):
    tokenizer = ImgCapTokenizer.from_pretrained(saved_model)
    config = ImgCapConfig.from_pretrained(saved_model)
    check_processor_matches_model(tokenizer, config)
    config.vocab_size = len(tokenizer) + 8  # a model may have spare rows (vocabulary padded for speed)
    check_processor_matches_model(tokenizer, config)


def _tiny_png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------------------
# Pickled weights are never unpickled, by any loading path
# ---------------------------------------------------------------------------------------------------------------------


class _PlantMarker:
    """Unpickling this object runs `os.system`: it creates the marker file. It must never happen."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def pickle_instead_of_safetensors(marker: Path):
    def breakage(directory: Path) -> None:
        (directory / "model.safetensors").unlink()
        with open(directory / "pytorch_model.bin", "wb") as handle:
            pickle.dump({"decoder.embedding.weight": _PlantMarker(marker)}, handle)

    return breakage


def test_the_malicious_pickle_really_runs_code_when_unpickled(tmp_path):
    """Guards the guard: the file the other tests refuse does create the marker when someone unpickles it."""
    marker = tmp_path / "marker"
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "model.safetensors").write_bytes(b"")
    pickle_instead_of_safetensors(marker)(directory)
    with open(directory / "pytorch_model.bin", "rb") as handle:
        pickle.load(handle)  # noqa: S301 - on purpose, on the test's own file
    assert marker.exists()


def test_no_loading_path_unpickles_a_pytorch_model_bin(saved_model, tmp_path, capsys):
    import app

    marker = tmp_path / "marker"
    directory = broken_copy(saved_model, tmp_path, pickle_instead_of_safetensors(marker))

    with pytest.raises(ValueError, match="only pickle-based weights \\(pytorch_model.bin\\), which are never loaded"):
        load_captioner(directory)
    assert cli_main(["caption", "--model", str(directory), "--device", "cpu", str(tmp_path / "x.png")]) == 2
    assert "pickle-based weights" in capsys.readouterr().err
    with pytest.raises(Exception):  # noqa: B017 - transformers' own error; what matters is that nothing ran
        ImgCapForConditionalGeneration.from_pretrained(directory)
    with pytest.raises(Exception):  # noqa: B017
        ImgCapForConditionalGeneration.from_pretrained(directory, use_safetensors=True)
    with pytest.raises(Exception):  # noqa: B017
        pipeline("image-captioning", model=str(directory))
    with pytest.raises(ValueError, match="only pickle-based weights"):
        app.load_captioners([str(directory)])

    assert not marker.exists()


def test_a_pickled_vision_backbone_is_refused_and_never_unpickled(tmp_path):
    """`from_vision_pretrained` reads safetensors only: a backbone folder with just a `pytorch_model.bin` fails."""
    from transformers import ResNetConfig

    marker = tmp_path / "marker"
    backbone = tmp_path / "backbone"
    backbone.mkdir()
    ResNetConfig(depths=[1, 1], hidden_sizes=[8, 16], embedding_size=8).save_pretrained(backbone)
    with open(backbone / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"embedder.embedder.convolution.weight": _PlantMarker(marker)}, handle)
    with pytest.raises(OSError, match="safetensors"):
        ImgCapForConditionalGeneration.from_vision_pretrained(str(backbone), decoder_type="pooled")
    assert not marker.exists()
