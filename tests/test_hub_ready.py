"""Hub-ready serialisation: the README's usage, Auto classes, remote code without our package, the pipeline."""

import ast
import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch
from conftest import SHIPPED_FOLDER, build_tiny_captioner, run_without_imgcap, shipped_files
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, pipeline

from imgcap_hf import ImgCapForConditionalGeneration, ImgCapProcessor
from imgcap_hf.loading import load_captioner


def sample_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 255, (48, 48, 4), dtype=np.uint8), mode="RGBA"),
    ]


def captions_with(model, processor, **generate_kwargs) -> list[str]:
    inputs = processor(images=sample_images(), return_tensors="pt")
    ids = model.generate(**inputs, **generate_kwargs)
    return processor.batch_decode(ids, skip_special_tokens=True)


def test_saved_folder_holds_the_remote_code_and_safetensors_only(saved_tiny_captioner):
    files = {path.name for path in saved_tiny_captioner.iterdir()}
    expected = {
        "config.json", "generation_config.json", "model.safetensors", "vocab.json", "tokenizer_config.json",
        "configuration_imgcap.py", "modeling_imgcap.py", "tokenization_imgcap.py", "image_processing_imgcap.py",
        "processing_imgcap.py",
    }  # fmt: skip
    assert expected <= files
    assert not [name for name in files if name.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))]
    auto_map = json.loads((saved_tiny_captioner / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForImageTextToText"] == "modeling_imgcap.ImgCapForConditionalGeneration"
    assert auto_map["AutoConfig"] == "configuration_imgcap.ImgCapConfig"
    custom_pipelines = json.loads((saved_tiny_captioner / "config.json").read_text())["custom_pipelines"]
    assert {task: spec["impl"] for task, spec in custom_pipelines.items()} == {
        "image-captioning": "pipeline_imgcap.ImgCapCaptioningPipeline",
        "image-text-to-text": "pipeline_imgcap.ImgCapImageTextToTextPipeline",
    }


# What remote code may import besides the standard library: what transformers itself needs (huggingface_hub is its
# dependency, and transformers' own configuration files import `strict` from it).
SHIPPED_THIRD_PARTY_IMPORTS = {"torch", "transformers", "numpy", "PIL", "huggingface_hub"}


def imports_of(path) -> list[tuple[int, str]]:
    """(relative level, dotted name) of every import in `path`, indented ones too (as transformers' `check_imports`
    reads them), one entry per imported name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=path.name)):
        if isinstance(node, ast.Import):
            found += [(0, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.level, node.module))
        elif isinstance(node, ast.ImportFrom):  # `from . import name`: the names are modules
            found += [(node.level, alias.name) for alias in node.names]
    return found


def test_shipped_folder_imports_only_itself_and_the_model_stack():
    """Remote code runs where only the saved folder exists: a shipped file that imports the library around it (data,
    loading, ...) or another package would fail for Hub users (or make them install it)."""
    siblings = {Path(name).stem for name in shipped_files()}
    third_party_or_stdlib = SHIPPED_THIRD_PARTY_IMPORTS | set(sys.stdlib_module_names)

    def allowed(level: int, name: str) -> bool:
        top = name.split(".")[0]
        return top in siblings if level == 1 else level == 0 and top in third_party_or_stdlib

    outside = [
        f"{path.name}: {'.' * level}{name}"
        for path in sorted(SHIPPED_FOLDER.glob("*.py"))
        for level, name in imports_of(path)
        if not allowed(level, name)
    ]
    assert not outside, outside


def test_save_pretrained_ships_exactly_the_shipped_folder(saved_tiny_captioner):
    """The remote code in a saved folder is the shipped folder's files, flat beside config.json, byte for byte."""
    saved = {path.name: path.read_bytes() for path in saved_tiny_captioner.glob("*.py")}
    assert saved == shipped_files()
    assert set(saved) == {
        "configuration_imgcap.py", "modeling_imgcap.py", "tokenization_imgcap.py", "image_processing_imgcap.py",
        "processing_imgcap.py", "pipeline_imgcap.py",
    }  # fmt: skip
    assert not [path for path in saved_tiny_captioner.iterdir() if path.is_dir()]


def test_readme_usage_round_trips(saved_tiny_captioner):
    """The README's example, as written, on a saved model: same captions as the live model, greedy and beam."""
    model = ImgCapForConditionalGeneration.from_pretrained(saved_tiny_captioner)
    processor = ImgCapProcessor.from_pretrained(saved_tiny_captioner)
    inputs = processor(images=sample_images(), return_tensors="pt")
    ids = model.generate(**inputs, num_beams=5, max_new_tokens=30)
    captions = processor.batch_decode(ids, skip_special_tokens=True)
    assert len(captions) == 2 and all(isinstance(caption, str) for caption in captions)

    auto_model = AutoModelForImageTextToText.from_pretrained(saved_tiny_captioner)
    auto_processor = AutoProcessor.from_pretrained(saved_tiny_captioner)
    assert type(auto_model) is ImgCapForConditionalGeneration
    assert type(AutoTokenizer.from_pretrained(saved_tiny_captioner)).__name__ == "ImgCapTokenizer"
    for kwargs in ({"max_new_tokens": 8}, {"num_beams": 3, "max_new_tokens": 8}):
        assert captions_with(auto_model, auto_processor, **kwargs) == captions_with(model, processor, **kwargs)


def test_remote_code_loads_and_captions_without_our_package(saved_tiny_captioner, tmp_path):
    """A fresh interpreter where `import imgcap_hf` fails loads the folder through the Auto classes."""
    model = ImgCapForConditionalGeneration.from_pretrained(saved_tiny_captioner)
    processor = ImgCapProcessor.from_pretrained(saved_tiny_captioner)
    image_path = tmp_path / "image.png"
    sample_images()[0].save(image_path)
    expected = captions_with(model, processor, num_beams=3, max_new_tokens=8)[0]

    script = textwrap.dedent(
        f"""
        import json
        from PIL import Image
        from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
        folder = {str(saved_tiny_captioner)!r}
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        inputs = processor(images=[Image.open({str(image_path)!r})], return_tensors="pt")
        ids = model.generate(**inputs, num_beams=3, max_new_tokens=8)
        print(json.dumps({{
            "module": type(model).__module__,
            "caption": processor.batch_decode(ids, skip_special_tokens=True)[0],
            "tokenizer_caption": tokenizer.decode(ids[0], skip_special_tokens=True),
        }}))
        """
    )
    output = run_without_imgcap(script, tmp_path)
    assert output["module"].startswith("transformers_modules.")
    assert output["caption"] == output["tokenizer_caption"] == expected


def test_captioning_pipeline(saved_tiny_captioner, tmp_path):
    model = ImgCapForConditionalGeneration.from_pretrained(saved_tiny_captioner)
    processor = ImgCapProcessor.from_pretrained(saved_tiny_captioner)
    path = tmp_path / "image.png"
    sample_images()[1].save(path)
    captioner = pipeline("image-captioning", model=str(saved_tiny_captioner))
    expected = processor.batch_decode(
        model.generate(**processor(images=[Image.open(path)], return_tensors="pt"), num_beams=2, max_new_tokens=8),
        skip_special_tokens=True,
    )[0]
    assert captioner(str(path), num_beams=2, max_new_tokens=8) == [{"generated_text": expected}]
    assert captioner([str(path), Image.open(path)], num_beams=2, max_new_tokens=8) == [
        [{"generated_text": expected}],
        [{"generated_text": expected}],
    ]


def test_generation_config_is_saved_and_used(saved_tiny_captioner):
    model = ImgCapForConditionalGeneration.from_pretrained(saved_tiny_captioner)
    assert (model.generation_config.max_new_tokens, model.generation_config.num_beams) == (8, 2)
    assert model.generation_config.decoder_start_token_id == 2
    processor = ImgCapProcessor.from_pretrained(saved_tiny_captioner)
    ids = model.generate(**processor(images=sample_images(), return_tensors="pt"))
    assert ids.shape[1] <= 9
    assert torch.equal(ids, model.generate(**processor(images=sample_images(), return_tensors="pt"), num_beams=2,
                                           max_new_tokens=8))  # fmt: skip


def test_a_saved_config_that_says_lstm_loads_as_the_pooled_decoder(tmp_path):
    """Folders saved before the Show-and-Tell decoder was named "pooled" say `"decoder_type": "lstm"`: they load with
    our package and as remote code without it, caption as before, and are saved again under the current name."""
    model, processor = build_tiny_captioner("pooled")
    folder = tmp_path / "older-folder"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "decoder_type": "lstm"}))
    image_path = tmp_path / "image.png"
    sample_images()[0].save(image_path)
    expected = captions_with(model, processor, num_beams=3, max_new_tokens=8)

    for loaded, loaded_processor in (
        (ImgCapForConditionalGeneration.from_pretrained(folder), ImgCapProcessor.from_pretrained(folder)),
        load_captioner(folder),
        (AutoModelForImageTextToText.from_pretrained(folder), AutoProcessor.from_pretrained(folder)),
    ):
        assert loaded.config.decoder_type == "pooled"
        assert captions_with(loaded, loaded_processor, num_beams=3, max_new_tokens=8) == expected
    loaded.save_pretrained(tmp_path / "saved-again")
    assert json.loads((tmp_path / "saved-again" / "config.json").read_text())["decoder_type"] == "pooled"

    script = textwrap.dedent(
        f"""
        import json
        from PIL import Image
        from transformers import AutoModelForImageTextToText, AutoProcessor
        folder = {str(folder)!r}
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        ids = model.generate(**processor(images=[Image.open({str(image_path)!r})], return_tensors="pt"), num_beams=3,
                             max_new_tokens=8)
        print(json.dumps({{"decoder_type": model.config.decoder_type,
                           "caption": processor.batch_decode(ids, skip_special_tokens=True)[0]}}))
        """
    )
    assert run_without_imgcap(script, tmp_path) == {"decoder_type": "pooled", "caption": expected[0]}
