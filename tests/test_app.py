"""The Gradio demo (`app.py`): the caption handler in-process, then a live server driven by `gradio_client` with good
and bad input, then a real browser.

Everything runs on tiny random models saved by the tests (never on a trained model) and on images the tests draw.
"""

import dataclasses
import io
import platform
import re
import socket
import struct
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_tiny_captioner
from datasets import Dataset
from PIL import Image, ImageOps

import app
from imgcap_hf.batching import ImageCaptionCollator, tokenize_captions
from imgcap_hf.loading import check_model_folder

# Gradio's queue calls pandas in ways pandas 3 deprecates; nothing this project can change.
pytestmark = [
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]

# ---------------------------------------------------------------------------------------------------------------------
# Test images
# ---------------------------------------------------------------------------------------------------------------------


def _scene(width: int = 48, height: int = 40) -> Image.Image:
    """An RGB picture with some structure: a red square on the left and a blue band at the bottom."""
    pixels = np.full((height, width, 3), 230, np.uint8)
    pixels[5:20, 4:20] = (220, 30, 30)
    pixels[-8:, :] = (30, 40, 200)
    return Image.fromarray(pixels)


def write_mode_images(directory: Path) -> dict[str, Path]:
    """One file per PIL mode a user may send, plus a JPEG stored sideways with EXIF orientation 6."""
    directory.mkdir(parents=True, exist_ok=True)
    scene = _scene()
    rgba = scene.copy()
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, scene.width, dtype=np.uint8), (scene.height, 1))))
    images = {
        "RGB": (scene, "rgb.png"),
        "RGBA": (rgba, "rgba.png"),
        "L": (scene.convert("L"), "grey.png"),
        "P": (scene.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "palette.png"),
        "CMYK": (scene.convert("CMYK"), "cmyk.jpg"),
        "I;16": (Image.fromarray(np.asarray(scene.convert("L"), np.uint16) * 257), "sixteen_bit.png"),
    }
    paths = {}
    for mode, (image, name) in images.items():
        assert image.mode == mode
        image.save(directory / name)
        paths[mode] = directory / name
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: turn 90 degrees clockwise to display
    scene.transpose(Image.Transpose.ROTATE_90).save(directory / "exif6.jpg", exif=exif, quality=95)
    paths["EXIF-6"] = directory / "exif6.jpg"
    return paths


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_bad_files(directory: Path) -> dict[str, Path]:
    """A truncated JPEG, random bytes named .png, and a tiny PNG whose header claims 100000 x 100000 pixels."""
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    _scene(200, 150).save(buffer, format="JPEG", quality=90)
    (directory / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (directory / "noise.png").write_bytes(np.random.default_rng(0).bytes(2048))
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)  # width, height, 8-bit RGB
    bomb = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
    (directory / "bomb.png").write_bytes(bomb + _png_chunk(b"IEND", b""))
    return {"truncated": directory / "truncated.jpg", "noise": directory / "noise.png", "bomb": directory / "bomb.png"}


BAD_FILE_MESSAGES = {
    "truncated": "Cannot read image 'truncated.jpg': it is truncated or corrupt",
    "noise": "Cannot read image 'noise.png': it is not in an image format",
    "bomb": "Cannot read image 'bomb.png': it declares more than Pillow's limit",
}


def assert_no_leak(message: str) -> None:
    """A user-facing message names at most a file, never a folder or a traceback."""
    assert "Traceback" not in message and 'File "' not in message
    assert not re.search(r"(/|\\)(tmp|home|work|pytest|gradio)\b", message), message


# ---------------------------------------------------------------------------------------------------------------------
# The caption handler, in-process
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mode_images(tmp_path_factory) -> dict[str, Path]:
    return write_mode_images(tmp_path_factory.mktemp("modes"))


def test_caption_handler_on_every_image_mode(saved_tiny_captioner, mode_images):
    captioners = app.load_captioners([str(saved_tiny_captioner)])
    (label,) = captioners
    decoder_type = captioners[label].model.config.decoder_type
    assert label == f"{decoder_type} ({saved_tiny_captioner.name})"
    service = app.CaptionService(captioners)
    for mode, path in mode_images.items():
        caption, table, overlays = service.caption(str(path), label, num_beams=3, max_new_tokens=8, num_captions=3)
        assert isinstance(caption, str) and caption, mode
        assert caption == table[0][0]
        scores = [score for _, score in table]
        assert len(table) == 3 and scores == sorted(scores, reverse=True), mode
        assert len({text for text, _ in table}) == len(table)
        if decoder_type == "attention":
            # One overlay per printed word, labelled with it (spelled out-of-vocabulary words count as one word).
            assert [word for _, word in overlays] == caption.split(), mode
            upright = ImageOps.exif_transpose(Image.open(path))
            for heatmap_file, _ in overlays:
                overlay = Image.open(heatmap_file)
                assert overlay.mode == "RGB" and max(overlay.size) == app.DISPLAY_SIDE
                assert (overlay.width > overlay.height) == (upright.width > upright.height), mode
        else:
            assert overlays == []


def test_beam_scores_are_generates_own_scores():
    """Recomputed scores equal what beam search ranked by (log-probability / length ** length_penalty)."""
    model, processor = build_tiny_captioner("attention")
    captioner = app.Captioner("attention (tiny)", model, processor)
    settings = app.DecodingSettings(num_beams=4, max_new_tokens=8, length_penalty=0.7, num_captions=4)
    result = app.caption_image(captioner, _scene(), settings)

    pixel_values = processor(images=_scene(), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        output = model.generate(
            pixel_values=pixel_values, num_beams=4, num_return_sequences=4, max_new_tokens=8, length_penalty=0.7,
            output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
    expected = sorted(
        zip(processor.batch_decode(output.sequences, skip_special_tokens=True), output.sequences_scores.tolist()),
        key=lambda pair: -pair[1],
    )
    assert [text for text, _ in result.captions] == [text for text, _ in expected]
    assert [score for _, score in result.captions] == pytest.approx([score for _, score in expected], abs=1e-5)


def test_seeded_sampling_is_reproducible(saved_tiny_captioner):
    """The same seed draws the same captions, which are what `caption_image` samples after seeding torch with it;
    another seed draws others (so the seed and the sampling settings are not ignored)."""
    captioners = app.load_captioners([str(saved_tiny_captioner)])
    service = app.CaptionService(captioners)
    path = str(write_mode_images(saved_tiny_captioner.parent / "sampling")["RGB"])
    settings = {"num_beams": 1, "num_captions": 5, "do_sample": True, "temperature": 1.5, "top_p": 1.0}
    first = service.caption(path, None, seed=7, **settings)
    again = service.caption(path, None, seed=7, **settings)
    other = service.caption(path, None, seed=8, **settings)
    assert first[:2] == again[:2]
    assert 1 <= len(first[1]) <= 5
    assert other[1] != first[1]
    torch.manual_seed(7)
    (captioner,) = captioners.values()
    expected = app.caption_image(captioner, app.load_image(path), app.DecodingSettings.clamped(seed=7, **settings))
    assert first[1] == [[text, round(score, 4)] for text, score in expected.captions]


def test_words_group_spelled_tokens_like_decoding():
    _, processor = build_tiny_captioner("attention")
    tokenizer = processor.tokenizer
    tokens = tokenizer.tokenize("A zebu grazes on the snow .")  # "zebu" and "grazes" are outside the vocabulary
    assert tokens.count(" ") == 4
    # The grouping the app's heatmaps use: the tokenizer's, skipping the final <eos> as decoding does.
    words = tokenizer.words_with_positions([*tokens, tokenizer.eos_token], skip_special_tokens=True)
    assert [word for word, _ in words] == tokenizer.convert_tokens_to_string(tokens).split()
    assert [word for word, _ in words] == ["a", "zebu", "grazes", "on", "the", "snow", "."]
    assert words[1][1] == [1, 2, 3, 4, 5, 6]  # the space, z, e, b, u and the closing space
    assert sorted(position for _, positions in words for position in positions) == list(range(len(tokens)))


def test_heatmap_words_are_the_decoded_words_and_a_spelled_word_gets_the_mean_of_its_tokens(monkeypatch):
    """Through `caption_image`, with `generate` made to return a caption that spells two words: one heatmap per
    decoded word, and the spelled word's map averages the attention of its six tokens."""
    model, processor = build_tiny_captioner("attention")
    tokenizer = processor.tokenizer
    ids = tokenizer("A zebu grazes on the snow .")["input_ids"]  # <sos> a " " z e b u " " ... <eos>
    sequences = torch.tensor([ids + [tokenizer.pad_token_id] * 2])  # beam search pads finished captions
    monkeypatch.setattr(model, "generate", lambda **kwargs: sequences)
    captioner = app.Captioner("attention (tiny)", model, processor)
    result = app.caption_image(captioner, _scene(), app.DecodingSettings(num_beams=1, num_captions=1))

    ((caption, _),) = result.captions
    assert caption == tokenizer.decode(ids, skip_special_tokens=True) == "a zebu grazes on the snow ."
    assert [word for word, _ in result.word_attention] == caption.split()
    labels = torch.tensor([ids[1:] + [-100, -100]])
    with torch.no_grad():
        pixel_values = processor(images=_scene(), return_tensors="pt")["pixel_values"]
        weights = model(pixel_values=pixel_values, labels=labels, output_attentions=True).cross_attentions[0][0, 0]
    np.testing.assert_allclose(result.word_attention[1][1], weights[1:7].mean(dim=0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(result.word_attention[0][1], weights[0].numpy(), rtol=1e-6)


def test_app_labels_are_the_processors_and_the_training_batches():
    """The labels the app rescores generated captions with, the processor's and the training collator's are one
    thing: the same captions give the same tensor, whether padded by beam search, the tokenizer or the collator."""
    model, processor = build_tiny_captioner("attention")
    tokenizer = processor.tokenizer
    captions = ["A dog runs .", "A zebu grazes on the snow .", "Two children play in the snow ."]
    expected = processor(text=captions, return_tensors="pt")["labels"]

    split = Dataset.from_dict({"captions": [captions[:2], captions[2:]]})
    caption_ids = tokenize_captions(tokenizer, split, max_length=40)
    collator = ImageCaptionCollator(split, processor.image_processor, caption_ids, features=torch.zeros(2, 4, 8))
    assert torch.equal(collator([0, 1])["labels"], expected)

    generated = tokenizer(captions, padding=True)["input_ids"]  # <sos> words <eos> <pad>..., as `generate` pads
    assert torch.equal(app._labels_from_sequences(torch.tensor(generated), model.config), expected)
    eos_padded = [
        [tokenizer.eos_token_id if token == tokenizer.pad_token_id else token for token in row] for row in generated
    ]
    assert torch.equal(app._labels_from_sequences(torch.tensor(eos_padded), model.config), expected)


def test_the_app_opens_at_beam_search_unless_the_model_saved_a_beam_width(saved_tiny_attention_captioner):
    """train.py saves greedy generation defaults (num_beams=1) so that users' `generate()` calls do what they ask;
    the app still opens with beam search and its n-best table, and honours a saved beam width above one."""
    (captioner,) = app.load_captioners([str(saved_tiny_attention_captioner)]).values()
    captioner.model.generation_config.update(num_beams=1)
    greedy_saved = app.model_defaults(captioner)
    assert (greedy_saved.num_beams, greedy_saved.num_captions) == (app.DecodingSettings.num_beams, 3)
    captioner.model.generation_config.update(num_beams=2)
    assert (app.model_defaults(captioner).num_beams, app.model_defaults(captioner).num_captions) == (2, 2)


def test_out_of_range_settings_are_clamped():
    settings = app.DecodingSettings.clamped(
        num_beams=500, max_new_tokens=10**6, length_penalty="long", num_captions=99, do_sample=False,
        temperature=float("nan"), top_p=-1, seed=-5,
    )  # fmt: skip
    assert settings == app.DecodingSettings(
        num_beams=app.MAX_BEAMS, max_new_tokens=app.MAX_NEW_TOKENS, length_penalty=1.0, num_captions=app.MAX_BEAMS,
        temperature=1.0, top_p=app.TOP_P_RANGE[0], seed=0,
    )  # fmt: skip
    assert app.DecodingSettings.clamped(num_beams=1, num_captions=4).num_captions == 1  # greedy: one caption
    assert app.DecodingSettings.clamped(num_beams=1, num_captions=40, do_sample=True).num_captions == app.MAX_BEAMS
    assert app.DecodingSettings.clamped(num_beams=2.6, seed=1e30).generate_kwargs()["num_beams"] == 3


def test_time_limit_stops_generation_early(saved_tiny_captioner):
    captioners = app.load_captioners([str(saved_tiny_captioner)])
    path = str(write_mode_images(saved_tiny_captioner.parent / "timing")["RGB"])
    unlimited = app.CaptionService(captioners).caption(path, None, num_beams=1, max_new_tokens=8, num_captions=1)
    limited = app.CaptionService(captioners, time_limit=1e-9).caption(path, None, num_beams=1, max_new_tokens=8)
    assert len(unlimited[0].split()) > 1
    assert len(limited[0].split()) <= 1


def test_every_request_ends_by_handing_the_allocators_free_memory_back(
    saved_tiny_attention_captioner, mode_images, monkeypatch
):
    """Each `/caption` and `/caption_batch` call, answered or refused, ends with one `malloc_trim(0)`."""
    trims = []
    monkeypatch.setattr(app, "_MALLOC_TRIM", trims.append)
    service = app.CaptionService(app.load_captioners([str(saved_tiny_attention_captioner)]))
    service.caption(str(mode_images["RGB"]), None, num_beams=1, max_new_tokens=4)
    assert trims == [0]
    with pytest.raises(app.gr.Error):
        service.caption(None)
    assert trims == [0, 0]
    assert service.caption_batch([str(mode_images["RGB"]), None])[1][1]  # one caption, one error
    assert trims == [0, 0, 0]


ARENA_COUNT_SCRIPT = """
import ctypes, os, sys, tempfile, threading
sys.path.insert(0, sys.argv[1])
if sys.argv[2] == "capped":
    import app
    assert app.limit_malloc_arenas(2)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.fopen.restype = ctypes.c_void_p, ctypes.c_void_p
libc.free.argtypes = libc.fclose.argtypes = [ctypes.c_void_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
started, release = threading.Barrier(9), threading.Event()
def allocate():
    block = libc.malloc(1 << 16)  # a thread's first malloc takes (or creates) its arena
    started.wait()
    release.wait()
    libc.free(block)
threads = [threading.Thread(target=allocate) for _ in range(8)]
for thread in threads:
    thread.start()
started.wait()
path = os.path.join(tempfile.mkdtemp(), "malloc_info.xml")
handle = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, handle)
libc.fclose(handle)
release.set()
for thread in threads:
    thread.join()
print(open(path).read().count("<heap nr="))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator")
def test_the_app_caps_the_allocators_arenas_so_worker_threads_share_them(tmp_path):
    """Eight threads allocating at once get arenas of their own by default, at most two after `limit_malloc_arenas`
    (what `main` calls first), in a fresh interpreter each."""
    script = tmp_path / "arenas.py"
    script.write_text(ARENA_COUNT_SCRIPT)
    repo_root = str(Path(app.__file__).parent)
    counts = {
        mode: int(subprocess.run([sys.executable, str(script), repo_root, mode], capture_output=True, text=True,
                                 check=True).stdout)
        for mode in ("default", "capped")
    }  # fmt: skip
    assert counts["default"] > 2 and counts["capped"] <= 2, counts


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not Path("/proc/self/status").is_file(), reason="glibc")
def test_releasing_free_memory_returns_freed_pages_to_the_system():
    """With glibc, memory freed between blocks still in use stays resident until `_release_free_memory` runs:
    64 MB freed of 128 MB allocated in 64 KB blocks (below glibc's threshold for a mapping of their own)."""

    def resident_megabytes() -> float:
        return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024

    blocks = [b"x" * 65536 for _ in range(2048)]  # written, hence resident
    del blocks[::2]
    before = resident_megabytes()
    app._release_free_memory()
    after = resident_megabytes()
    del blocks
    assert before - after > 40, (before, after)


def test_heatmap_lies_on_the_part_of_the_picture_the_model_saw():
    """A 200x100 picture through a 32 px centre crop at crop_pct 0.875: resized to 72x36, cropped to the middle 32x32,
    so the model sees x in [20/72, 52/72] and y in [2/36, 34/36]. All attention on the top-left region makes that
    corner of the box hot and the opposite corner cold; the margins the crop cut off are only dimmed."""
    _, processor = build_tiny_captioner("attention")
    image_processor = processor.image_processor
    image_processor.crop_pct = 0.875
    box = image_processor.crop_box(200, 100)
    assert box == pytest.approx((20 / 72, 2 / 36, 52 / 72, 34 / 36))

    white = Image.new("RGB", (200, 100), "white")
    weights = np.array([1.0, 0.0, 0.0, 0.0], np.float32)  # a 2x2 grid, row-major: top-left
    ((overlay, word),) = app.attention_overlays(white, [("red", weights)], image_processor)
    assert word == "red" and overlay.size == (320, 160)
    pixels = np.asarray(overlay).astype(int)  # (160, 320, 3)
    left, top, right, bottom = (round(fraction * side) for fraction, side in zip(box, (320, 160, 320, 160)))
    dimmed = round(255 * app.OUTSIDE_CROP_BRIGHTNESS)
    assert (pixels[:, : left - 1] == dimmed).all() and (pixels[:, right + 1 :] == dimmed).all()
    hot, cold = pixels[top + 5, left + 5], pixels[bottom - 5, right - 5]
    assert hot[0] > hot[2] + 50 and hot[0] > cold[0] + 50  # red where it looked, dark blue where it did not


def test_examples_cover_the_awkward_image_kinds(tmp_path):
    examples = app.write_examples(tmp_path)
    modes = {label: Image.open(path).mode for path, label in examples}
    assert list(modes.values()).count("RGB") == 4 and "RGBA" in modes.values() and "L" in modes.values()
    rgba = next(path for path, label in examples if Image.open(path).mode == "RGBA")
    assert np.asarray(Image.open(rgba))[..., 3].min() == 0  # a transparent background
    jpeg = next(path for path, _ in examples if path.suffix == ".jpg")
    stored = Image.open(jpeg)
    assert stored.getexif()[0x0112] == 6
    upright = app.load_image(jpeg)
    shapes = app.load_image(tmp_path / "shapes_test_05.png")  # the scene the JPEG was made from
    assert np.abs(np.asarray(upright, int) - np.asarray(shapes, int)).mean() < 8  # JPEG noise only: turned upright


def test_no_model_gives_an_app_that_explains_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.setattr(app, "DEFAULT_MODEL_DIR", tmp_path / "absent")
    monkeypatch.delenv("IMGCAP_MODELS", raising=False)
    assert app.resolve_model_paths(app.parse_args([])) == []
    monkeypatch.setenv("IMGCAP_MODELS", "a, b")
    assert app.resolve_model_paths(app.parse_args([])) == ["a", "b"]
    assert app.resolve_model_paths(app.parse_args(["--model", "c", "--model", "d"])) == ["c", "d"]

    demo = app.build_demo([], examples_dir=tmp_path / "examples")
    texts = [block.value for block in demo.blocks.values() if block.get_block_name() == "markdown"]
    assert app.NO_MODEL_MESSAGE in texts and "make demo" in app.NO_MODEL_MESSAGE
    with pytest.raises(app.gr.Error, match="No captioning model is loaded"):
        app.CaptionService({}).caption(str(tmp_path / "examples" / "grayscale.png"))


def _folder_problem(folder: str) -> str:
    """The sentence `check_model_folder` gives for a folder that lacks a model's files."""
    with pytest.raises(ValueError) as problem:
        check_model_folder(folder)
    return str(problem.value)


def test_bad_arguments_stop_the_app_with_one_line_before_anything_is_loaded(tmp_path, capsys, monkeypatch):
    """Each bad argument gets argparse's usage line and one error line, exit status 2, and no model is loaded."""

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(app, "load_captioners", no_loading)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "empty").mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        cases = {
            "--port 0": "argument --port: must be a port number from 1 to 65535, not 0",
            "--port 70000": "argument --port: must be a port number from 1 to 65535, not 70000",
            "--port http": "argument --port: not a port number: 'http'",
            f"--port {busy.getsockname()[1]}": f"argument --port: port {busy.getsockname()[1]} is in use on 127.0.0.1",
            "--host 192.0.2.1": "argument --host: cannot listen on '192.0.2.1' (Cannot assign requested address)",
            f"--model {tmp_path / 'missing'}": f"argument --model: no such folder: {tmp_path / 'missing'}",
            "--model outputs/shapes-atention": "argument --model: no such folder: outputs/shapes-atention",
            "--model ./shapes": "argument --model: no such folder: ./shapes",
            "--model notes.txt": "argument --model: not a folder: notes.txt",
            "--model empty": f"argument --model: {_folder_problem('empty')}",
        }
        for arguments, message in cases.items():
            with pytest.raises(SystemExit) as stopped:
                app.main(arguments.split())
            assert stopped.value.code == 2, arguments
            lines = capsys.readouterr().err.splitlines()
            assert lines[0].startswith("usage: app.py") and lines[-1] == f"app.py: error: {message}", lines
    monkeypatch.setenv("IMGCAP_MODELS", "hub-user/some-model, outputs/typo")
    with pytest.raises(SystemExit):
        app.main([])
    assert capsys.readouterr().err.splitlines()[-1] == "app.py: error: IMGCAP_MODELS: no such folder: outputs/typo"


def test_a_model_that_fails_to_load_stops_the_app_with_one_line(tmp_path, capsys):
    folder = tmp_path / "broken"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "vocab.json"):
        (folder / name).write_text("{not json")
    with pytest.raises(SystemExit) as stopped:
        app.main(["--model", str(folder)])
    assert stopped.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"app.py: error: cannot load the model(s) {folder}: "), line


# ---------------------------------------------------------------------------------------------------------------------
# A live server, driven by gradio_client
# ---------------------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app on 127.0.0.1 with both tiny decoders, launched with the production settings; closed afterwards."""
    directories = []
    # Seed 4 gives the attention model captions that differ from picture to picture (seed 0 says "l" to nearly
    # everything), so that an answer delivered to the wrong request is noticed.
    for decoder_type, seed in (("attention", 4), ("pooled", 0)):
        model, processor = build_tiny_captioner(decoder_type, seed=seed)
        directory = tmp_path_factory.mktemp(f"app-{decoder_type}")
        model.generation_config.update(max_new_tokens=8, num_beams=2)
        model.save_pretrained(directory)
        processor.save_pretrained(directory)
        directories.append(str(directory))
    demo = app.build_demo(directories, examples_dir=tmp_path_factory.mktemp("app-examples"))
    demo.model_labels = [f"{kind} ({Path(path).name})" for kind, path in zip(("attention", "pooled"), directories)]
    demo.model_directories = directories
    app.launch_demo(demo, "127.0.0.1", _free_port(), prevent_thread_lock=True)
    try:
        yield demo
    finally:
        demo.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server.local_url, verbose=False)


def _caption(client, path, *args, **kwargs):
    from gradio_client import handle_file

    return client.predict(handle_file(str(path)) if path is not None else None, *args, api_name="/caption", **kwargs)


def test_server_is_private_and_bounded(server, client):
    assert server.local_url.startswith("http://127.0.0.1:")
    assert server.share is False and server.show_error is False and server.enable_monitoring is False
    assert server.max_file_size == app.MAX_FILE_SIZE
    assert server.analytics_enabled is False and server.run_history is False
    assert server._queue.max_size == app.QUEUE_MAX_SIZE
    parameters = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/caption"]["parameters"]
    assert parameters[0]["component"] == "Image" and not parameters[0]["parameter_has_default"]
    assert all(parameter["parameter_has_default"] for parameter in parameters[1:])


def test_server_captions_every_image_mode(server, client, mode_images):
    for mode, path in mode_images.items():
        caption, table, gallery = _caption(client, path)  # the defaults: the first (attention) model
        assert caption and caption == table["data"][0][0], mode
        assert len(gallery) == len(caption.split()), mode
        assert all(Image.open(item["image"]).size[0] == app.DISPLAY_SIDE for item in gallery)
    caption, table, gallery = _caption(client, mode_images["RGB"], server.model_labels[1], 3, 8, 1.0, 3)
    assert caption and len(table["data"]) == 3 and gallery == []


def test_server_answers_bad_input_with_one_clear_sentence(client, mode_images, tmp_path):
    from gradio_client.exceptions import AppError

    bad_files = write_bad_files(tmp_path)
    for name, path in bad_files.items():
        with pytest.raises(AppError) as caught:
            _caption(client, path)
        assert str(caught.value).startswith(BAD_FILE_MESSAGES[name]), str(caught.value)
        assert_no_leak(str(caught.value))
        assert _caption(client, mode_images["RGB"])[0]  # the server still serves

    with pytest.raises(AppError, match="No image was given"):
        _caption(client, None)
    assert _caption(client, mode_images["L"])[0]


def test_server_refuses_files_over_the_size_limit(server, client, mode_images, tmp_path):
    """gradio_client refuses before sending (it reads the limit from the app's config); a raw upload, as any other
    client could send, gets HTTP 413 from the server, which keeps serving."""
    import httpx

    too_big = b"\0" * (app.MAX_FILE_SIZE + 1)
    (tmp_path / "huge.png").write_bytes(too_big)
    with pytest.raises(ValueError, match=f"exceeds the maximum file size of {app.MAX_FILE_SIZE} bytes"):
        _caption(client, tmp_path / "huge.png")

    response = httpx.post(f"{server.local_url}gradio_api/upload", files={"files": ("huge.png", too_big)}, timeout=30)
    assert response.status_code == 413
    assert response.text == f"File size exceeded maximum allowed size of {app.MAX_FILE_SIZE} bytes."
    assert _caption(client, mode_images["RGB"])[0]


def test_server_clamps_out_of_range_parameters(server, client, mode_images):
    # beams, max new tokens, length penalty, captions, sampling, temperature, top-p, seed: all beyond the sliders
    arguments = (500, 10**6, 99.0, 99, False, 50.0, 5.0, -3)
    caption, table, gallery = _caption(client, mode_images["RGB"], server.model_labels[0], *arguments)
    assert len(table["data"]) == app.MAX_BEAMS  # 500 beams clamped to 10, each returned
    assert caption == table["data"][0][0] and len(gallery) == len(caption.split())
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=re.escape(f"Unknown model; choose one of: {', '.join(server.model_labels)}.")):
        _caption(client, mode_images["RGB"], "no such model")


def _pictures_with_distinct_captions(
    model_dir: str, settings: app.DecodingSettings, count: int, directory: Path
) -> list[tuple[Path, app.CaptionResult]]:
    """`count` picture files whose captions under `settings` differ from each other, each with its `caption_image`
    result: the expected answer, computed in-process."""
    (captioner,) = app.load_captioners([model_dir]).values()
    directory.mkdir(parents=True, exist_ok=True)
    chosen, captions = [], set()
    for seed in range(200):
        rng = np.random.default_rng(seed)
        pixels = np.full((40, 48, 3), rng.integers(0, 256, size=3), np.uint8)
        for _ in range(3):
            top, left = rng.integers(0, 30), rng.integers(0, 38)
            pixels[top : top + rng.integers(4, 16), left : left + rng.integers(4, 16)] = rng.integers(0, 256, size=3)
        path = directory / f"scene_{seed}.png"
        Image.fromarray(pixels).save(path)
        result = app.caption_image(captioner, app.load_image(path), settings)
        if result.captions[0][0] not in captions:
            captions.add(result.captions[0][0])
            chosen.append((path, result))
            if len(chosen) == count:
                return chosen
    raise AssertionError(f"only {len(chosen)} different captions: {captions}")


def test_server_answers_concurrent_requests(server, client, tmp_path):
    """Eight requests at once, six pictures (two sent twice): each answer is its own picture's caption and table,
    and the six pictures have six different captions, so a swapped answer is noticed."""
    from gradio_client import handle_file

    settings = app.DecodingSettings(num_beams=2, max_new_tokens=8, num_captions=2)
    pictures = _pictures_with_distinct_captions(server.model_directories[0], settings, 6, tmp_path)
    requests = pictures + pictures[:2]
    arguments = (server.model_labels[0], settings.num_beams, settings.max_new_tokens, 1.0, settings.num_captions)
    jobs = [client.submit(handle_file(str(path)), *arguments, api_name="/caption") for path, _ in requests]
    results = [job.result(timeout=60) for job in jobs]
    for (path, expected), (caption, table, gallery) in zip(requests, results):
        assert caption == expected.captions[0][0], path.name
        assert table["data"] == [[text, round(score, 4)] for text, score in expected.captions], path.name
        assert len(gallery) == len(caption.split()), path.name


def test_batched_endpoint_answers_each_request(server, client, tmp_path):
    """Four good pictures with four different captions and a truncated file, sent at once: each good one gets the
    caption that the first model's saved settings (beam search, as the main endpoint) give its own picture, the bad
    one its sentence."""
    from gradio_client import handle_file

    (captioner,) = app.load_captioners([server.model_directories[0]]).values()
    settings = dataclasses.replace(app.model_defaults(captioner), num_captions=1)
    good = _pictures_with_distinct_captions(server.model_directories[0], settings, 4, tmp_path / "good")
    truncated = write_bad_files(tmp_path)["truncated"]
    requests = [good[0], (truncated, None), *good[1:]]
    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(
            pool.map(lambda request: client.predict(handle_file(str(request[0])), api_name="/caption_batch"), requests)
        )
    for (path, expected), (caption, error) in zip(requests, results):
        if expected is None:
            assert caption == "" and error.startswith(BAD_FILE_MESSAGES["truncated"])
        else:
            assert (caption, error) == (expected.captions[0][0], ""), path.name
    single = _caption(client, good[0][0], server.model_labels[0], 2, 8, 1.0, 1)[0]
    assert results[0][0] == single  # the same beam search as the main endpoint with the model's settings


# ---------------------------------------------------------------------------------------------------------------------
# A real browser
# ---------------------------------------------------------------------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")


def test_browser_uploads_an_image_and_shows_its_caption(server, mode_images, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not present")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-dev-shm-usage"],
        )  # fmt: skip
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(server.local_url, timeout=20_000)
            page.locator("#image-input input[type=file]").set_input_files(str(mode_images["RGBA"]))
            page.locator("#caption-button").click()
            page.wait_for_function(
                "() => document.querySelector('#caption textarea')?.value.length > 0", timeout=20_000
            )
            caption = page.locator("#caption textarea").input_value()
            screenshot = tmp_path / "app.png"
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    assert caption.strip()
    with Image.open(screenshot) as image:
        assert image.format == "PNG" and image.width >= 1000
