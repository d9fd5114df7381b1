"""Images at every entry point (load_image + processor, CLI, pipeline, app, datasets + training collator): each file
either works, the same way everywhere, or fails with one clear sentence naming it; nothing crashes a server or an
epoch. Real files written by the tests, tiny models, no mocks."""

import io
import json
import struct
import threading
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_tiny_captioner
from PIL import Image
from transformers import pipeline

from imgcap_hf import ImgCapImageProcessor, load_image
from imgcap_hf.batching import ImageCaptionCollator, image_inputs, tokenize_captions
from imgcap_hf.cli import main as cli_main
from imgcap_hf.data import UNREADABLE_IMAGE, load_caption_dataset

# Gradio's queue calls pandas in ways pandas 3 deprecates (as in test_app.py).
pytestmark = [
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
    # Pillow still warns about the bombs these tests load on purpose; load_image refuses them.
    pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning"),
]

TINY_SIDE = 32  # the tiny processor's crop: its resize edge (crop_pct 1.0) is 32 too


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    model, processor = build_tiny_captioner("attention")
    directory = tmp_path_factory.mktemp("reliability-model")
    model.generation_config.update(max_new_tokens=6, num_beams=1)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_processor(model_dir):
    from imgcap_hf import ImgCapProcessor

    return ImgCapProcessor.from_pretrained(model_dir)


# ---------------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------------


def scene(width: int = 48, height: int = 40, seed: int = 0) -> Image.Image:
    """Noise with a red block top-left: structure to rotate, and JPEG data long enough to cut mid-scan."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    pixels[: height // 3, : width // 3] = (220, 30, 30)
    return Image.fromarray(pixels)


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG signature, an IHDR declaring `width` x `height` RGB pixels, a scrap of IDAT and IEND: ~100 bytes."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def write_good_files(directory: Path) -> dict[str, Path]:
    """Every kind of file that must work: PIL modes, 16-bit, EXIF-rotated, animated, 1x1, extreme aspect ratios."""
    directory.mkdir(parents=True, exist_ok=True)
    base = scene()
    rgba = base.copy()
    rgba.putalpha(128)
    frames = [Image.new("RGB", (40, 30), (255, 0, 0)), Image.new("RGB", (40, 30), (0, 0, 255))]
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: turn 90 degrees clockwise to display
    files = {
        "rgb.jpg": lambda path: base.save(path, quality=95),
        "rgba.png": lambda path: rgba.save(path),
        "la.png": lambda path: base.convert("LA").save(path),
        "grey.png": lambda path: base.convert("L").save(path),
        "bilevel.png": lambda path: base.convert("1").save(path),
        "palette.gif": lambda path: base.convert("P").save(path),
        "cmyk.jpg": lambda path: base.convert("CMYK").save(path),
        "sixteen_bit.png": lambda path: Image.fromarray(np.asarray(base.convert("L"), np.uint16) * 257).save(path),
        "exif6.jpg": lambda path: base.save(path, exif=exif.tobytes(), quality=95),
        "animated.gif": lambda path: frames[0].save(path, save_all=True, append_images=frames[1:], duration=50),
        "one_pixel.png": lambda path: Image.new("RGB", (1, 1), (0, 200, 0)).save(path),
        "wide_strip.png": lambda path: Image.new("RGB", (20_000, 1), (0, 0, 200)).save(path),
        "tall_strip.webp": lambda path: Image.new("RGB", (2, 3000), (200, 200, 0)).save(path),
    }
    paths = {}
    for name, save in files.items():
        save(directory / name)
        paths[name] = directory / name
    return paths


def write_bad_files(directory: Path) -> dict[str, tuple[Path, str]]:
    """Every kind of file that must be refused, with the words its error must contain."""
    directory.mkdir(parents=True, exist_ok=True)
    jpeg = io.BytesIO()
    scene(96, 96, seed=1).save(jpeg, format="JPEG")
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'
    contents = {
        "empty.jpg": (b"", "empty"),
        "noise.png": (np.random.default_rng(0).bytes(2048), "not in an image format"),
        "drawing.svg": (svg, "not in an image format"),
        "notes.jpg": (b"a caption, not a picture\n", "not in an image format"),
        "truncated.jpg": (jpeg.getvalue()[: len(jpeg.getvalue()) * 3 // 4], "truncated or corrupt"),
        "bomb.png": (png_header_claiming(100_000, 100_000), "decompression bomb"),  # above Pillow's error limit
        "warn_bomb.png": (png_header_claiming(10_000, 10_000), "decompression bomb"),  # where Pillow only warns
    }
    files = {}
    for name, (content, message) in contents.items():
        (directory / name).write_bytes(content)
        files[name] = (directory / name, message)
    return files


def assert_one_sentence_naming(message: str, path: Path) -> None:
    assert repr(path.name) in message, message
    assert str(path.parent) not in message, message  # the file's name, never the folder it lives in
    assert "\n" not in message and "Traceback" not in message, message


# ---------------------------------------------------------------------------------------------------------------------
# load_image: decompression bombs without touching global warning state
# ---------------------------------------------------------------------------------------------------------------------


def test_an_image_over_pillows_warning_limit_is_refused_even_when_max_pixels_allows_it():
    side = int(Image.MAX_IMAGE_PIXELS**0.5) + 1  # just above Pillow's warning limit, far below its error limit
    data = png_header_claiming(side, side)
    assert Image.MAX_IMAGE_PIXELS < side * side < 2 * Image.MAX_IMAGE_PIXELS

    with pytest.raises(ValueError, match="possible decompression bomb"):
        load_image(data, max_pixels=10 * side * side)


def test_bomb_refusal_does_not_depend_on_the_callers_warning_filters():
    data = png_header_claiming(10_000, 10_000)
    for action in ("ignore", "error", "always"):
        with warnings.catch_warnings():
            warnings.simplefilter(action)
            with pytest.raises(ValueError, match="decompression bomb"):
                load_image(data)


def test_load_image_is_thread_safe_and_leaves_warning_filters_alone(tmp_path):
    """Threads loading bombs and good images at once each get the right outcome, and the process-wide warning filters
    never change meanwhile (`warnings.catch_warnings` swaps them, which other threads would see)."""
    good = tmp_path / "good.png"
    scene().save(good)
    bomb = png_header_claiming(10_000, 10_000)
    filters_before = list(warnings.filters)
    seen_changes, stop = [], threading.Event()

    def watch_filters() -> None:
        while not stop.is_set():
            if warnings.filters != filters_before:
                seen_changes.append(list(warnings.filters))

    def load(index: int) -> str:
        try:
            return f"ok {load_image(good if index % 2 else bomb).size}"
        except ValueError as error:
            return f"refused {'decompression bomb' in str(error)}"

    watcher = threading.Thread(target=watch_filters)
    watcher.start()
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            outcomes = list(pool.map(load, range(200)))
    finally:
        stop.set()
        watcher.join()

    assert outcomes == ["refused True", "ok (48, 40)"] * 100
    assert not seen_changes
    assert warnings.filters == filters_before


# ---------------------------------------------------------------------------------------------------------------------
# Good files: the same pixels at every entry point
# ---------------------------------------------------------------------------------------------------------------------


def test_every_good_file_gives_finite_pixel_values_of_the_model_size(tmp_path, tiny_processor):
    for name, path in write_good_files(tmp_path).items():
        image = load_image(path, min_side=tiny_processor.image_processor.load_min_side)
        pixel_values = tiny_processor(images=image, return_tensors="pt")["pixel_values"]
        assert pixel_values.shape == (1, 3, TINY_SIDE, TINY_SIDE), name
        assert torch.isfinite(pixel_values).all(), name


def test_exif_rotation_and_first_frame_are_the_same_in_training_and_serving(tmp_path, model_dir, tiny_processor):
    """The training collator (datasets + load_image), the CLI/pipeline path (load_image with the processor's
    min_side) and the app (`CaptionService._load`) give identical pixel_values for a sideways phone photo."""
    import app

    folder = tmp_path / "dataset"
    paths = write_good_files(folder / "train")
    names = ["exif6.jpg", "animated.gif", "cmyk.jpg", "sixteen_bit.png"]
    rows = [{"file_name": name, "caption": "a picture ."} for name in names]
    (folder / "train" / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    splits, _ = load_caption_dataset(str(folder), validation_fraction=0.0, test_fraction=0.0)
    train = splits["train"]
    order = [train["image_id"].index(next(i for i in train["image_id"] if i.endswith(name))) for name in names]

    image_processor = tiny_processor.image_processor
    training = ImageCaptionCollator(train, image_processor)(order)["pixel_values"]
    serving = torch.cat(
        [
            image_processor(load_image(paths[name], min_side=image_processor.load_min_side), return_tensors="pt")[
                "pixel_values"
            ]
            for name in names
        ]
    )
    captioner = next(iter(app.load_captioners([str(model_dir)]).values()))
    app_pixels = torch.cat(
        [
            image_processor(app.CaptionService({})._load(str(paths[name]), captioner), return_tensors="pt")[
                "pixel_values"
            ]
            for name in names
        ]
    )
    assert torch.equal(training, serving)
    assert torch.equal(training, app_pixels)

    # The rotation really happened: the stored pixels, turned 90 degrees clockwise.
    with Image.open(paths["exif6.jpg"]) as stored:
        expected = stored.convert("RGB").transpose(Image.Transpose.ROTATE_270)
    shown = load_image(paths["exif6.jpg"])
    assert shown.size == (40, 48) and np.array_equal(np.asarray(shown), np.asarray(expected))


def test_huge_legal_jpegs_are_decoded_at_a_reduced_scale_everywhere(tmp_path, model_dir, tiny_processor):
    path = tmp_path / "train" / "camera.jpg"
    path.parent.mkdir()
    Image.new("RGB", (2400, 1600), (30, 120, 200)).save(path, quality=80)
    image_processor = tiny_processor.image_processor

    reduced = load_image(path, min_side=image_processor.load_min_side)
    assert reduced.size == (300, 200)  # 1/8 scale: the JPEG decoder never builds the 3.8-megapixel image

    (path.parent / "metadata.jsonl").write_text(json.dumps({"file_name": "camera.jpg", "caption": "sky ."}) + "\n")
    splits, _ = load_caption_dataset(str(tmp_path), validation_fraction=0.0, test_fraction=0.0)
    training = ImageCaptionCollator(splits["train"], image_processor)([0])["pixel_values"]
    assert torch.equal(training, image_processor(reduced, return_tensors="pt")["pixel_values"])

    captioner = pipeline("image-captioning", model=str(model_dir))
    assert captioner.preprocess(str(path))["pixel_values"].equal(training)

    import app

    app_captioner = next(iter(app.load_captioners([str(model_dir)]).values()))
    assert app.CaptionService({})._load(str(path), app_captioner).size == (300, 200)


def test_extreme_aspect_ratios_are_trimmed_before_the_resize(monkeypatch):
    image_processor = ImgCapImageProcessor()  # resize edge 256: a 1 x 20,000 strip would become 256 x 5,120,000
    strip = Image.new("RGB", (20_000, 1), (200, 10, 10))
    pixel_values = image_processor(strip, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 224, 224)
    uniform = image_processor(Image.new("RGB", (8, 8), (200, 10, 10)), return_tensors="pt")["pixel_values"]
    assert torch.allclose(pixel_values, uniform, atol=1e-5)

    # Trimming changes nothing the centre crop keeps: compare with the untrimmed resize on a smooth gradient (a shift
    # of one resized pixel, from rounding, is all that may differ) and bit-exactly for a ratio within the limit.
    tiny = ImgCapImageProcessor(crop_size=TINY_SIDE, crop_pct=1.0)
    gradient = Image.fromarray(np.tile(np.linspace(0, 255, 1000).astype(np.uint8), (20, 1))).convert("RGB")
    within = scene(4 * 30, 30)
    trimmed = [tiny(image, return_tensors="pt")["pixel_values"] for image in (gradient, within)]
    monkeypatch.setattr("imgcap_hf.models.imgcap.image_processing_imgcap.MAX_ASPECT_RATIO", 10**6)
    untrimmed = [tiny(image, return_tensors="pt")["pixel_values"] for image in (gradient, within)]
    assert (trimmed[0] - untrimmed[0]).abs().max() < 0.05
    assert torch.equal(trimmed[1], untrimmed[1])


# ---------------------------------------------------------------------------------------------------------------------
# Bad files: one sentence per file at every entry point, the good files still served
# ---------------------------------------------------------------------------------------------------------------------


def test_cli_captions_the_good_files_and_names_each_bad_one(tmp_path, model_dir, capsys):
    good = write_good_files(tmp_path / "good")
    bad = write_bad_files(tmp_path / "bad")
    arguments = [str(good["rgb.jpg"]), *(str(path) for path, _ in bad.values()), str(good["exif6.jpg"])]

    status = cli_main(["caption", "--model", str(model_dir), "--device", "cpu", "--batch_size", "3", *arguments])

    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert status == 1  # some images failed
    assert [line["image"] for line in lines] == arguments  # one line per image, in the order given
    assert isinstance(lines[0]["caption"], str) and isinstance(lines[-1]["caption"], str)
    for line, (path, message) in zip(lines[1:-1], bad.values()):
        assert "caption" not in line and message in line["error"]
        assert_one_sentence_naming(line["error"], path)


def test_cli_exit_status_is_zero_when_every_image_is_captioned(tmp_path, model_dir, capsys):
    good = write_good_files(tmp_path)
    status = cli_main(["caption", "--model", str(model_dir), "--device", "cpu", *map(str, good.values())])
    assert status == 0
    assert all("caption" in json.loads(line) for line in capsys.readouterr().out.splitlines())


def test_pipeline_refuses_each_bad_file_with_one_sentence(tmp_path, model_dir):
    captioner = pipeline("image-captioning", model=str(model_dir))
    for path, message in write_bad_files(tmp_path).values():
        with pytest.raises(ValueError, match=message) as raised:
            captioner(str(path))
        assert_one_sentence_naming(str(raised.value), path)
    assert isinstance(captioner(str(write_good_files(tmp_path / "good")["one_pixel.png"]))[0]["generated_text"], str)


def test_app_batch_endpoint_answers_every_request(tmp_path, model_dir):
    import app

    service = app.CaptionService(app.load_captioners([str(model_dir)]))
    good = write_good_files(tmp_path / "good")
    bad = write_bad_files(tmp_path / "bad")
    requests = [str(good["palette.gif"]), *({"path": str(path)} for path, _ in bad.values()), str(good["exif6.jpg"])]

    captions, errors = service.caption_batch(requests)

    assert errors[0] == errors[-1] == ""  # captioned (a random tiny model's caption may itself be empty)
    for caption, error, (path, message) in zip(captions[1:-1], errors[1:-1], bad.values()):
        assert caption == "" and message in error
        assert_one_sentence_naming(error, path)


# ---------------------------------------------------------------------------------------------------------------------
# Datasets: bad files are reported and skipped, a training epoch runs over the rest
# ---------------------------------------------------------------------------------------------------------------------


def test_a_training_epoch_over_a_folder_with_bad_files(tmp_path):
    split_dir = tmp_path / "train"
    good = write_good_files(split_dir)
    bad = write_bad_files(split_dir)
    rows = [{"file_name": name, "caption": f"a dog runs {index} ."} for index, name in enumerate([*good, *bad])]
    (split_dir / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")

    splits, report = load_caption_dataset(str(tmp_path), validation_fraction=0.0, test_fraction=0.0)

    train = splits["train"]
    assert sorted(Path(image_id).name for image_id in train["image_id"]) == sorted(good)
    skipped = report.skipped[UNREADABLE_IMAGE]
    assert skipped.count == len(bad)
    assert skipped.examples  # the report keeps the first few: each says which file and why
    reasons = {"empty.jpg": "empty", "truncated.jpg": "truncated", "bomb.png": "decompression bomb"}
    reasons |= {"warn_bomb.png": "decompression bomb", "noise.png": "cannot identify image file"}
    reasons |= {"drawing.svg": "cannot identify image file", "notes.jpg": "cannot identify image file"}
    for example in skipped.examples:
        name = next(name for name in bad if name in example)
        assert reasons[name] in example, example

    model, processor = build_tiny_captioner("attention")
    model.train()
    caption_ids = tokenize_captions(processor.tokenizer, train, max_length=12)
    collator = ImageCaptionCollator(train, processor.image_processor, caption_ids)
    loader = torch.utils.data.DataLoader(list(range(len(train))), batch_size=4, collate_fn=collator)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    steps = 0
    for batch in loader:
        loss = model(**image_inputs(batch), labels=batch["labels"], image_indices=batch["image_indices"]).loss
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        steps += 1
    assert steps == -(-len(good) // 4)


def test_collator_names_a_bad_file_left_in_an_unverified_dataset(tmp_path):
    split_dir = tmp_path / "train"
    split_dir.mkdir()
    scene().save(split_dir / "good.png")
    (split_dir / "cut.jpg").write_bytes(write_bad_files(tmp_path / "bad")["truncated.jpg"][0].read_bytes())
    rows = [{"file_name": "good.png", "caption": "a ."}, {"file_name": "cut.jpg", "caption": "b ."}]
    (split_dir / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    splits, _ = load_caption_dataset(str(tmp_path), validation_fraction=0.0, test_fraction=0.0, verify_images=False)
    train = splits["train"]
    row = next(index for index, image_id in enumerate(train["image_id"]) if image_id.endswith("cut.jpg"))

    with pytest.raises(ValueError, match=r"cannot be used: Cannot read image 'cut.jpg': it is truncated") as raised:
        ImageCaptionCollator(train, ImgCapImageProcessor(crop_size=TINY_SIDE))([row])
    assert "verify_images=True" in str(raised.value)
