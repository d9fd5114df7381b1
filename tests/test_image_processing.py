"""Image loading, RGB conversion, the image processor and the processor: real images written by the tests, no mocks."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_utils import PILImageResampling

from imgcap_hf.models.imgcap.image_processing_imgcap import ImgCapImageProcessor, load_image, to_rgb_image
from imgcap_hf.models.imgcap.processing_imgcap import ImgCapProcessor
from imgcap_hf.models.imgcap.tokenization_imgcap import ImgCapTokenizer

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)
MID_GREY = (128, 128, 128)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])
TINY_SIDE = 32
SIZE = (48, 40)  # (width, height) of the test images: not square, so the resize and crop both act
HEIGHT_WIDTH = (SIZE[1], SIZE[0])

CAPTIONS = [
    "A dog runs on the grass .",
    "A black dog jumps over a log .",
    "Two children play in the snow .",
    "A man rides a red bike down the street .",
]


@pytest.fixture(scope="module")
def tiny_image_processor() -> ImgCapImageProcessor:
    return ImgCapImageProcessor(crop_size=TINY_SIDE)


@pytest.fixture(scope="module")
def tokenizer() -> ImgCapTokenizer:
    return ImgCapTokenizer.from_captions(CAPTIONS, min_frequency=1)


@pytest.fixture(scope="module")
def processor(tiny_image_processor, tokenizer) -> ImgCapProcessor:
    return ImgCapProcessor(tiny_image_processor, tokenizer)


def centre_colour(pixel_values: torch.Tensor | np.ndarray) -> tuple[int, ...]:
    """The 0-255 RGB colour of the centre pixel of a normalised (3, H, W) image: undoes the ImageNet normalisation."""
    pixel_values = np.asarray(pixel_values)
    _, height, width = pixel_values.shape
    normalised = pixel_values[:, height // 2, width // 2]
    return tuple(int(value) for value in np.round((normalised * IMAGENET_STD + IMAGENET_MEAN) * 255))


def assert_colour_close(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 1) -> None:
    assert np.abs(np.subtract(actual, expected)).max() <= tolerance, f"got {actual}, expected {expected}"


def palette_image(transparent_index: int | None) -> Image.Image:
    """A uniform palette image of colour index 1 (green), with that index marked transparent when asked."""
    image = Image.new("P", SIZE, 1)
    image.putpalette([*RED, *GREEN] + [0] * (256 - 2) * 3)
    if transparent_index is not None:
        image.info["transparency"] = transparent_index
    return image


def jpeg_bytes(image: Image.Image, **save_kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **save_kwargs)
    return buffer.getvalue()


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG signature, an IHDR chunk declaring `width` x `height` RGB pixels, and IEND: a few dozen bytes."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # bit depth 8, colour type 2 (RGB)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def half_red_half_blue(width: int, height: int) -> Image.Image:
    """Left half red, right half blue."""
    image = Image.new("RGB", (width, height), BLUE)
    image.paste(RED, (0, 0, width // 2, height))
    return image


# ---------------------------------------------------------------------------------------------------------------------
# Colour conversion: every PIL mode, array layout and dtype gives the colour a viewer would show
# ---------------------------------------------------------------------------------------------------------------------

PIL_MODE_CASES = [
    pytest.param(lambda: Image.new("RGB", SIZE, (10, 120, 250)), (10, 120, 250), id="RGB"),
    pytest.param(lambda: Image.new("RGBA", SIZE, (*RED, 255)), RED, id="RGBA-opaque-red"),
    pytest.param(lambda: Image.new("RGBA", SIZE, (0, 0, 0, 0)), WHITE, id="RGBA-transparent-is-white"),
    pytest.param(lambda: Image.new("RGBA", SIZE, (0, 0, 0, 128)), (127, 127, 127), id="RGBA-half-transparent"),
    pytest.param(lambda: Image.new("LA", SIZE, (60, 255)), (60, 60, 60), id="LA-opaque"),
    pytest.param(lambda: Image.new("LA", SIZE, (0, 0)), WHITE, id="LA-transparent-is-white"),
    pytest.param(lambda: palette_image(transparent_index=None), GREEN, id="P"),
    pytest.param(lambda: palette_image(transparent_index=1), WHITE, id="P-transparent-index"),
    pytest.param(lambda: palette_image(transparent_index=0), GREEN, id="P-other-index-transparent"),
    pytest.param(lambda: Image.new("L", SIZE, 77), (77, 77, 77), id="L"),
    pytest.param(lambda: Image.new("1", SIZE, 1), WHITE, id="1-white"),
    pytest.param(lambda: Image.new("1", SIZE, 0), BLACK, id="1-black"),
    pytest.param(lambda: Image.new("CMYK", SIZE, (0, 255, 255, 0)), RED, id="CMYK-red"),
    pytest.param(lambda: Image.fromarray(np.full(HEIGHT_WIDTH, 32768, np.uint16)), MID_GREY, id="I;16-mid-grey"),
    pytest.param(lambda: Image.fromarray(np.full(HEIGHT_WIDTH, 32768, np.int32)), MID_GREY, id="I-16-bit-data"),
    pytest.param(lambda: Image.fromarray(np.full(HEIGHT_WIDTH, 0.5, np.float32)), MID_GREY, id="F-unit-range"),
]


@pytest.mark.parametrize(("make_image", "expected"), PIL_MODE_CASES)
def test_every_pil_mode_gives_normalised_rgb_of_the_right_colour(tiny_image_processor, make_image, expected):
    image = make_image()
    pixel_values = tiny_image_processor(image, return_tensors="pt")["pixel_values"]

    assert pixel_values.shape == (1, 3, TINY_SIDE, TINY_SIDE)
    assert pixel_values.dtype == torch.float32
    assert_colour_close(centre_colour(pixel_values[0]), expected)


def test_sixteen_bit_images_are_scaled_not_clipped():
    # Pillow's own convert("RGB") turns a 16-bit mid-grey white: the scaling must keep dark, mid and bright apart.
    levels = np.array([[0, 16384, 32768, 65535]], np.uint16)
    rgb = np.asarray(to_rgb_image(Image.fromarray(levels)))

    assert rgb[0, :, 0].tolist() == [0, 64, 128, 255]


ARRAY_CASES = [
    pytest.param(np.full(HEIGHT_WIDTH, 77, np.uint8), (77, 77, 77), id="HxW"),
    pytest.param(np.full((*HEIGHT_WIDTH, 1), 77, np.uint8), (77, 77, 77), id="HxWx1"),
    pytest.param(np.ones(HEIGHT_WIDTH, bool), WHITE, id="HxW-bool"),
    pytest.param(np.full((*HEIGHT_WIDTH, 3), (10, 120, 250), np.uint8), (10, 120, 250), id="HxWx3-uint8"),
    pytest.param(np.full((*HEIGHT_WIDTH, 4), (*RED, 255), np.uint8), RED, id="HxWx4-opaque"),
    pytest.param(np.full((*HEIGHT_WIDTH, 4), (*RED, 0), np.uint8), WHITE, id="HxWx4-transparent-is-white"),
    pytest.param(np.full((*HEIGHT_WIDTH, 3), (1.0, 0.5, 0.25), np.float32), (255, 128, 64), id="HxWx3-float-unit"),
    pytest.param(np.full((*HEIGHT_WIDTH, 3), (65535, 32768, 0), np.uint16), (255, 128, 0), id="HxWx3-uint16"),
    pytest.param(
        np.stack([np.full(HEIGHT_WIDTH, value, np.uint8) for value in (200, 0, 0)]),
        (200, 0, 0),
        id="3xHxW-unambiguous-channels-first",
    ),
    pytest.param(
        torch.tensor(BLUE, dtype=torch.float32)[:, None, None].expand(3, *HEIGHT_WIDTH) / 255,
        BLUE,
        id="torch-CxHxW-float",
    ),
    pytest.param(torch.full((1, *HEIGHT_WIDTH), 77, dtype=torch.uint8), (77, 77, 77), id="torch-1xHxW-uint8"),
]


@pytest.mark.parametrize(("array", "expected"), ARRAY_CASES)
def test_array_layouts_and_dtypes_give_the_right_colour(tiny_image_processor, array, expected):
    pixel_values = tiny_image_processor(array, return_tensors="pt")["pixel_values"]

    assert pixel_values.shape == (1, 3, TINY_SIDE, TINY_SIDE)
    assert_colour_close(centre_colour(pixel_values[0]), expected)


def test_to_rgb_image_keeps_pixel_positions_for_arrays_and_tensors():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)

    assert np.array_equal(np.asarray(to_rgb_image(pixels)), pixels)
    assert np.array_equal(np.asarray(to_rgb_image(torch.from_numpy(pixels).permute(2, 0, 1))), pixels)


def test_to_rgb_image_returns_a_new_image_and_leaves_the_input_alone():
    original = Image.new("RGBA", SIZE, (0, 0, 0, 0))
    converted = to_rgb_image(original)

    assert converted is not original
    assert original.mode == "RGBA" and original.getpixel((0, 0)) == (0, 0, 0, 0)


@pytest.mark.parametrize(
    ("bad_input", "error", "message"),
    [
        pytest.param("photo.jpg", TypeError, "load_image", id="path-string"),
        pytest.param(b"\xff\xd8", TypeError, "load_image", id="bytes"),
        pytest.param([Image.new("RGB", SIZE), 3], TypeError, "Image 1 of the batch is a int", id="list-with-int"),
        pytest.param([], ValueError, "empty list", id="empty-list"),
        pytest.param(np.zeros((10, 10, 5), np.uint8), ValueError, r"shape \(10, 10, 5\)", id="five-channels"),
        pytest.param(np.zeros(10, np.uint8), ValueError, r"shape \(10,\)", id="one-dimensional"),
        pytest.param(np.full((4, 4, 3), np.nan, np.float32), ValueError, "NaN", id="nan"),
        pytest.param(np.zeros((4, 4, 3), np.complex64), ValueError, "complex64", id="complex"),
    ],
)
def test_invalid_inputs_raise_clear_errors(tiny_image_processor, bad_input, error, message):
    with pytest.raises(error, match=message):
        tiny_image_processor(bad_input)


def test_to_rgb_image_rejects_other_types():
    with pytest.raises(TypeError, match="got str"):
        to_rgb_image("photo.jpg")


# ---------------------------------------------------------------------------------------------------------------------
# EXIF orientation and animated images
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("orientation", "top_colour", "bottom_colour"),
    [(6, RED, BLUE), (8, BLUE, RED)],  # 6: turn 90 degrees clockwise to view; 8: counter-clockwise
)
def test_exif_orientation_is_applied(tmp_path, tiny_image_processor, orientation, top_colour, bottom_colour):
    exif = Image.Exif()
    exif[0x0112] = orientation  # the Orientation tag
    path = tmp_path / "sideways.jpg"
    path.write_bytes(jpeg_bytes(half_red_half_blue(80, 40), exif=exif.tobytes(), quality=95))

    loaded = load_image(path)
    assert loaded.size == (40, 80)  # landscape as stored, portrait as shown
    assert_colour_close(loaded.getpixel((20, 10)), top_colour, tolerance=8)
    assert_colour_close(loaded.getpixel((20, 70)), bottom_colour, tolerance=8)

    # The processor applies the same rotation to an image opened without load_image.
    with Image.open(path) as opened:
        pixel_values = tiny_image_processor(opened, return_tensors="pt")["pixel_values"][0]
    top_row, bottom_row = pixel_values[:, :1, :], pixel_values[:, -1:, :]
    assert_colour_close(centre_colour(top_row), top_colour, tolerance=8)
    assert_colour_close(centre_colour(bottom_row), bottom_colour, tolerance=8)


def test_animated_gif_gives_its_first_frame(tmp_path):
    path = tmp_path / "animated.gif"
    first, second = Image.new("RGB", SIZE, RED), Image.new("RGB", SIZE, BLUE)
    first.save(path, save_all=True, append_images=[second], duration=100, loop=0)

    assert load_image(path).getpixel((5, 5)) == RED
    with Image.open(path) as opened:
        opened.seek(1)  # even when the caller left the animation on another frame
        assert to_rgb_image(opened).getpixel((5, 5)) == RED


# ---------------------------------------------------------------------------------------------------------------------
# load_image: good files load, every bad file gives one clear ValueError
# ---------------------------------------------------------------------------------------------------------------------


def test_load_image_reads_paths_bytes_and_file_objects(tmp_path):
    path = tmp_path / "good.png"
    Image.new("RGBA", SIZE, (*GREEN, 255)).save(path)

    from_path = load_image(path)
    from_str = load_image(str(path))
    from_bytes = load_image(path.read_bytes())
    with path.open("rb") as handle:
        from_file = load_image(handle)

    for image in (from_path, from_str, from_bytes, from_file):
        assert image.mode == "RGB" and image.size == SIZE and image.getpixel((0, 0)) == GREEN


def bad_file_cases() -> list:
    rng = np.random.default_rng(0)
    noise_jpeg = jpeg_bytes(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'
    return [
        pytest.param(b"", "empty", id="zero-bytes"),
        pytest.param(rng.bytes(512), "not in an image format", id="random-bytes"),
        pytest.param(svg, "not in an image format", id="svg-text"),
        pytest.param(noise_jpeg[: len(noise_jpeg) // 2], "truncated or corrupt", id="truncated-jpeg"),
        # Pillow warns above about 89.5 million pixels and refuses above twice that; both are errors here.
        pytest.param(png_header_claiming(10_000, 10_000), "decompression bomb", id="bomb-over-warning-limit"),
        pytest.param(png_header_claiming(100_000, 100_000), "decompression bomb", id="bomb-over-error-limit"),
    ]


@pytest.mark.parametrize(("content", "message"), bad_file_cases())
def test_load_image_turns_bad_files_into_one_clear_sentence(tmp_path, content, message):
    path = tmp_path / "upload.jpg"
    path.write_bytes(content)

    with pytest.raises(ValueError, match=message) as raised:
        load_image(path)

    text = str(raised.value)
    assert "'upload.jpg'" in text  # names the file ...
    assert str(tmp_path) not in text  # ... but not the directory it lives in
    assert "\n" not in text and "Traceback" not in text


def test_load_image_rejects_missing_paths_and_directories(tmp_path):
    with pytest.raises(ValueError, match="'missing.png': the file does not exist"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="directory"):
        load_image(tmp_path)


def test_load_image_rejects_images_above_max_pixels_before_decoding():
    # The header claims 5000 x 5000 but no pixel data follows: the check must fire before any decoding is tried.
    with pytest.raises(ValueError, match="5000x5000 pixels is more than the 1,000,000 allowed"):
        load_image(png_header_claiming(5_000, 5_000), max_pixels=1_000_000)


def test_load_image_rejects_bad_source_types(tmp_path):
    with pytest.raises(TypeError, match="got int"):
        load_image(42)
    path = tmp_path / "text_mode.png"
    Image.new("RGB", SIZE).save(path)
    with path.open(encoding="latin-1") as handle, pytest.raises(TypeError, match="binary mode"):
        load_image(handle)


def test_min_side_decodes_large_jpegs_at_a_reduced_scale():
    data = jpeg_bytes(Image.new("RGB", (800, 600), RED))

    assert load_image(data).size == (800, 600)
    # 1/4 scale keeps both sides >= 100 (200 x 150); 1/8 would not (100 x 75).
    reduced = load_image(data, min_side=100)
    assert reduced.size == (200, 150)
    assert_colour_close(reduced.getpixel((100, 75)), RED, tolerance=4)


# ---------------------------------------------------------------------------------------------------------------------
# ImgCapImageProcessor: the ImageNet evaluation transform, settings, batching
# ---------------------------------------------------------------------------------------------------------------------


def reference_imagenet_eval(image: Image.Image, resize_short_side: int, crop_side: int) -> np.ndarray:
    """microsoft/resnet-50's evaluation transform written out with plain PIL and numpy: the expected output."""
    width, height = image.size
    scale = resize_short_side / min(width, height)
    new_width, new_height = (
        (resize_short_side, int(height * scale)) if width <= height else (int(width * scale), resize_short_side)
    )
    resized = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    left, top = (new_width - crop_side) // 2, (new_height - crop_side) // 2
    cropped = np.asarray(resized.crop((left, top, left + crop_side, top + crop_side)), np.float64) / 255
    return ((cropped - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)


def random_rgb_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_default_settings_match_the_resnet50_evaluation_transform():
    image = random_rgb_image(320, 240)
    pixel_values = ImgCapImageProcessor()(image, return_tensors="np")["pixel_values"]

    # 224 / 0.875 = 256: the short side goes to 256, then the centre 224 x 224 is kept.
    assert pixel_values.shape == (1, 3, 224, 224) and pixel_values.dtype == np.float32
    np.testing.assert_allclose(pixel_values[0], reference_imagenet_eval(image, 256, 224), atol=1e-5)


def test_tiny_crop_size_resizes_by_crop_pct(tiny_image_processor):
    image = random_rgb_image(60, 90)
    pixel_values = tiny_image_processor(image, return_tensors="np")["pixel_values"]

    # int(32 / 0.875) = 36
    np.testing.assert_allclose(pixel_values[0], reference_imagenet_eval(image, 36, TINY_SIDE), atol=1e-5)


def test_explicit_size_overrides_crop_pct():
    image = random_rgb_image(60, 90)
    image_processor = ImgCapImageProcessor(crop_size=TINY_SIDE, size={"shortest_edge": TINY_SIDE})
    pixel_values = image_processor(image, return_tensors="np")["pixel_values"]

    np.testing.assert_allclose(pixel_values[0], reference_imagenet_eval(image, TINY_SIDE, TINY_SIDE), atol=1e-5)


def test_call_time_settings_override_saved_ones(tiny_image_processor):
    pixel_values = tiny_image_processor(random_rgb_image(60, 90), crop_size=16, return_tensors="pt")["pixel_values"]

    assert pixel_values.shape == (1, 3, 16, 16)
    assert tiny_image_processor.crop_size.height == TINY_SIDE  # the call did not change the processor


def test_batches_match_single_images(tiny_image_processor):
    images = [random_rgb_image(60, 90, seed=1), Image.new("LA", (30, 50), (90, 255)), np.zeros((40, 40), np.uint8)]

    batch = tiny_image_processor(images, return_tensors="pt")["pixel_values"]
    singles = [tiny_image_processor(image, return_tensors="pt")["pixel_values"][0] for image in images]

    assert batch.shape == (3, 3, TINY_SIDE, TINY_SIDE)
    for in_batch, alone in zip(batch, singles):
        assert torch.equal(in_batch, alone)


def test_four_dimensional_arrays_are_batches(tiny_image_processor):
    stacked = np.stack([np.full((40, 40, 3), colour, np.uint8) for colour in (RED, GREEN)])

    pixel_values = tiny_image_processor(stacked, return_tensors="pt")["pixel_values"]

    assert pixel_values.shape == (2, 3, TINY_SIDE, TINY_SIDE)
    assert [centre_colour(image) for image in pixel_values] == [RED, GREEN]


def test_without_return_tensors_gives_float32_arrays(tiny_image_processor):
    pixel_values = tiny_image_processor([Image.new("RGB", SIZE)] * 2)["pixel_values"]

    assert len(pixel_values) == 2
    assert all(array.dtype == np.float32 and array.shape == (3, TINY_SIDE, TINY_SIDE) for array in pixel_values)


def coordinate_image(width: int, height: int) -> np.ndarray:
    """An (height, width, 3) image whose red value is each pixel's x, green its y, and blue 255 (padding is black)."""
    x, y = np.meshgrid(np.arange(width, dtype=np.uint8), np.arange(height, dtype=np.uint8))
    return np.stack([x, y, np.full_like(x, 255)], axis=-1)


@pytest.mark.parametrize(
    ("settings", "size"),
    [
        ({"crop_size": TINY_SIDE}, (250, 70)),  # downsampled, crop cuts both sides of the width
        ({"crop_size": TINY_SIDE}, (70, 250)),
        ({"crop_size": TINY_SIDE}, (250, 20)),  # longer than MAX_ASPECT_RATIO: trimmed before the resize
        ({"crop_size": TINY_SIDE}, (255, 3)),  # so thin that the trim's rounding moves the box
        ({"crop_size": TINY_SIDE, "crop_pct": 1.0}, (20, 12)),  # upsampled
        ({}, (250, 100)),  # the default 256 / 224
        ({"crop_size": TINY_SIDE, "size": {"height": 30, "width": 50}}, (100, 60)),  # crop taller than the resize
        ({"crop_size": TINY_SIDE, "size": {"shortest_edge": 40, "longest_edge": 60}}, (200, 50)),
        ({"crop_size": TINY_SIDE, "do_resize": False}, (60, 20)),
        ({"crop_size": TINY_SIDE, "do_center_crop": False}, (90, 40)),
    ],
)
def test_crop_box_is_where_the_pixel_values_come_from(settings, size):
    """Nearest-neighbour resampling of an image that carries its own coordinates shows which source pixels reach
    `pixel_values`: the first and last of them in each direction sit half an output pixel inside `crop_box`'s edges
    (to within the half pixel that nearest-neighbour rounding moves them)."""
    width, height = size
    image_processor = ImgCapImageProcessor(
        resample=PILImageResampling.NEAREST, do_rescale=False, do_normalize=False, **settings
    )
    pixels = image_processor(coordinate_image(width, height), return_tensors="np")["pixel_values"][0]
    from_image = pixels[2] == 255  # (rows, columns): not padding
    rows, columns = np.flatnonzero(from_image.any(axis=1)), np.flatnonzero(from_image.any(axis=0))
    seen_x, seen_y = pixels[0][from_image], pixels[1][from_image]

    left, top, right, bottom = image_processor.crop_box(width, height)
    for low, high, seen, side, count in (
        (left, right, seen_x, width, len(columns)),
        (top, bottom, seen_y, height, len(rows)),
    ):
        step = (high - low) * side / count  # source pixels per output pixel
        assert abs(seen.min() + 0.5 - (low * side + step / 2)) <= 0.5 + 1e-6
        assert abs(seen.max() + 0.5 - (high * side - step / 2)) <= 0.5 + 1e-6


def test_image_processor_settings_survive_save_and_load(tmp_path):
    original = ImgCapImageProcessor(
        crop_size={"height": 24, "width": 32},
        crop_pct=0.5,
        resample=Image.Resampling.BILINEAR,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.25, 0.25, 0.25],
    )
    original.save_pretrained(tmp_path)
    reloaded = ImgCapImageProcessor.from_pretrained(tmp_path)

    assert reloaded.to_dict() == original.to_dict()
    assert reloaded.crop_pct == 0.5 and dict(reloaded.crop_size) == {"height": 24, "width": 32}
    image = random_rgb_image(70, 50)
    expected = original(image, return_tensors="pt")["pixel_values"]
    assert expected.shape == (1, 3, 24, 32)
    assert torch.equal(reloaded(image, return_tensors="pt")["pixel_values"], expected)


@pytest.mark.parametrize("crop_pct", [0.0, 1.5])
def test_crop_pct_outside_zero_one_is_rejected(crop_pct):
    with pytest.raises(ValueError, match="crop_pct"):
        ImgCapImageProcessor(crop_pct=crop_pct)(Image.new("RGB", SIZE))


# ---------------------------------------------------------------------------------------------------------------------
# ImgCapProcessor: images + captions -> pixel_values + labels, decoding, save/load
# ---------------------------------------------------------------------------------------------------------------------


def shift_right(labels: torch.Tensor, sos_id: int = 2, pad_id: int = 1) -> torch.Tensor:
    """The model's documented rule for building decoder inputs from labels: prepend <sos>, -100 becomes <pad>."""
    decoder_input_ids = torch.cat([torch.full_like(labels[:, :1], sos_id), labels[:, :-1]], dim=1)
    return decoder_input_ids.masked_fill(decoder_input_ids == -100, pad_id)


def test_labels_are_captions_without_sos_padded_with_minus_100(processor, tokenizer):
    captions = [CAPTIONS[3], CAPTIONS[0]]  # longest first, so the second one is padded
    unpadded = [tokenizer(caption)["input_ids"] for caption in captions]
    assert all(ids[0] == 2 and ids[-1] == 3 for ids in unpadded)  # <sos> ... <eos>, the tokenizer's contract

    labels = processor(text=captions, return_tensors="pt")["labels"]

    assert labels.dtype == torch.int64
    assert labels.shape == (2, max(len(ids) for ids in unpadded) - 1)
    for row, ids in zip(labels.tolist(), unpadded):
        targets = ids[1:]  # w1 ... wn <eos>
        assert row == targets + [-100] * (labels.shape[1] - len(targets))
    # The model's shift-right turns the labels back into <sos> w1 ... wn wherever a label is trained.
    decoder_input_ids = shift_right(labels)
    for row, ids, trained in zip(decoder_input_ids.tolist(), unpadded, (labels != -100).tolist()):
        assert [token for token, keep in zip(row, trained) if keep] == ids[:-1]


def test_images_and_text_together(processor):
    images = [random_rgb_image(60, 40, seed=seed) for seed in range(2)]
    batch = processor(images=images, text=CAPTIONS[:2], return_tensors="pt")

    assert set(batch) == {"pixel_values", "labels"}
    assert batch["pixel_values"].shape == (2, 3, TINY_SIDE, TINY_SIDE)
    assert batch["labels"].shape[0] == 2
    assert torch.equal(batch["pixel_values"], processor.image_processor(images, return_tensors="pt")["pixel_values"])


def test_images_alone_give_only_pixel_values(processor):
    batch = processor(images=Image.new("RGB", SIZE), return_tensors="pt")

    assert list(batch) == ["pixel_values"]
    assert processor.model_input_names == ["pixel_values"]


def test_max_length_counts_sos_and_eos_and_keeps_eos(processor):
    labels = processor(text=CAPTIONS[3], max_length=5, return_tensors="pt")["labels"]

    assert labels.shape == (1, 4)  # 5 tokens with <sos>; the labels drop it
    assert labels[0, -1].item() == 3  # a truncated caption still ends with <eos>


def test_padding_to_max_length(processor):
    labels = processor(text=["A dog ."], padding="max_length", max_length=8, return_tensors="pt")["labels"]

    assert labels.shape == (1, 7)
    assert labels[0, 4:].tolist() == [-100] * 3  # a dog . <eos>, then padding


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({}, "needs `images`, `text` or both", id="nothing"),
        pytest.param({"text": [1, 2]}, "string or a list of strings", id="text-not-strings"),
        pytest.param(
            {"images": [Image.new("RGB", SIZE)], "text": CAPTIONS[:2]}, "1 images but 2 captions", id="count-mismatch"
        ),
    ],
)
def test_processor_rejects_bad_calls(processor, kwargs, message):
    with pytest.raises(ValueError, match=message):
        processor(**kwargs)


def test_batch_decode_and_decode_give_captions_back(processor, tokenizer):
    generated = [tokenizer(caption)["input_ids"] for caption in CAPTIONS[:2]]
    generated[1] += [tokenizer.pad_token_id] * (len(generated[0]) - len(generated[1]))  # padded like generate()

    decoded = processor.batch_decode(generated, skip_special_tokens=True)

    assert decoded == ["a dog runs on the grass .", "a black dog jumps over a log ."]
    assert processor.decode(generated[0], skip_special_tokens=True) == decoded[0]


def test_processor_survives_save_and_load(tmp_path, processor):
    processor.save_pretrained(tmp_path)
    assert {"processor_config.json", "tokenizer_config.json", "vocab.json"} <= {
        path.name for path in tmp_path.iterdir()
    }

    reloaded = ImgCapProcessor.from_pretrained(tmp_path)

    assert isinstance(reloaded.image_processor, ImgCapImageProcessor)
    assert isinstance(reloaded.tokenizer, ImgCapTokenizer)
    assert reloaded.image_processor.to_dict() == processor.image_processor.to_dict()
    assert reloaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    inputs = {"images": [random_rgb_image(50, 70)] * 2, "text": CAPTIONS[2:], "return_tensors": "pt"}
    expected, actual = processor(**inputs), reloaded(**inputs)
    assert torch.equal(actual["pixel_values"], expected["pixel_values"])
    assert torch.equal(actual["labels"], expected["labels"])


def test_a_datasets_column_of_images_is_a_batch():
    from datasets import Dataset
    from datasets import Image as ImageFeature

    images = [Image.new("RGB", (40, 30), (255, 0, 0)), Image.new("L", (30, 40), 128)]
    column = Dataset.from_dict({"image": images}).cast_column("image", ImageFeature())["image"]
    assert not isinstance(column, list)
    pixel_values = ImgCapImageProcessor(crop_size=32)(column, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (2, 3, 32, 32)
