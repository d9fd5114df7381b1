"""The attention heatmaps (`imgcap_hf.heatmaps`): regions placed at their receptive-field centres, drawn through the
processor's resize and crop onto the original picture; and the shapes boxes the grounding check compares them with."""

import hashlib
import json

import numpy as np
import pytest
from conftest import TINY_TRAIN_VISION
from PIL import Image

from imgcap_hf import ImgCapConfig, ImgCapForConditionalGeneration, ImgCapImageProcessor
from imgcap_hf.data.shapes import generate_shapes_scenes
from imgcap_hf.heatmaps import (
    OUTSIDE_CROP_BRIGHTNESS,
    RegionCentres,
    attention_overlays,
    colormap,
    measure_region_centres,
    peak_position,
)

# Tiny encoders: a 3-stage ResNet (stride 16; every convolution pads kernel // 2) and a 2-stage ConvNeXt (stride 8;
# a 4x4 stride-4 stem and 2x2 stride-2 downsampling, no padding).
TINY_CONVNEXT = {"model_type": "convnext", "depths": [1, 1], "hidden_sizes": [8, 16], "num_stages": 2}


def _encoder(vision_config: dict, region_grid_size: int):
    config = ImgCapConfig(
        vision_config=vision_config, decoder_type="attention", vocab_size=20, region_grid_size=region_grid_size
    )
    return ImgCapForConditionalGeneration(config).eval().get_encoder()


def test_resnet_regions_are_centred_on_their_receptive_fields_not_their_cells():
    """A 64x96 input gives a 4x6 feature map; ResNet centres feature f on input pixel 16 f, i.e. at 16 f + 0.5 in
    pixel-edge coordinates. A grid of 2 averages pairs of rows and triples of columns."""
    centres = measure_region_centres(_encoder(json.loads(TINY_TRAIN_VISION), 2), 64, 96)
    assert centres.rows == pytest.approx(((0.5 + 16.5) / 2, (32.5 + 48.5) / 2))
    assert centres.columns == pytest.approx(((0.5 + 16.5 + 32.5) / 3, (48.5 + 64.5 + 80.5) / 3))
    cells = RegionCentres.grid_cells(2, 2, 64, 96)
    assert cells.rows == (16.0, 48.0) and cells.columns == (24.0, 72.0)  # 7.5 px further down and right


def test_convnext_regions_are_centred_on_their_cells():
    centres = measure_region_centres(_encoder(TINY_CONVNEXT, 2), 32, 32)
    assert centres == RegionCentres.grid_cells(2, 2, 32, 32)


def test_measuring_needs_eval_mode():
    encoder = _encoder(json.loads(TINY_TRAIN_VISION), 2)
    encoder.train()
    with pytest.raises(ValueError, match="eval mode"):
        measure_region_centres(encoder, 32, 32)


def _hottest_point(overlay, scale: float) -> tuple[float, float]:
    """The centroid of the overlay pixels closest in colour to the colour map's top, in original-picture pixels (the
    overlay of a white picture is half white, half colour map)."""
    colours = np.asarray(overlay, np.float64) * 2 - 255  # (height, width, 3): the colour map's share
    distance = np.linalg.norm(colours - colormap(np.ones((1, 1)))[0, 0], axis=-1)
    rows, columns = np.nonzero(distance <= distance.min() + 1e-9)
    return (columns.mean() + 0.5) / scale, (rows.mean() + 0.5) / scale


def test_one_region_peaks_at_its_receptive_field_centre_on_the_original_picture():
    """All attention on the middle region (row 1, column 1) of a 3x3 grid, for a 200x120 picture: its shortest edge
    resized to 73 (64 / crop_pct 0.875), hence 121x73, and centre-cropped to 64x64. The hottest point of the drawn
    overlay is that region's receptive-field centre carried back through the crop and the resize: not its cell
    centre, 7.5 input pixels (12 picture pixels) further down and to the right."""
    encoder = _encoder(json.loads(TINY_TRAIN_VISION), 3)
    image_processor = ImgCapImageProcessor(crop_size=64, crop_pct=0.875)
    centres = measure_region_centres(encoder, 64, 64)
    picture = Image.new("RGB", (200, 120), "white")
    weights = np.eye(1, 9, 4, dtype=np.float32)[0]  # row-major: row 1, column 1

    left, top, right, bottom = image_processor.crop_box(200, 120)
    assert (round(left * 121), round(right * 121), round(top * 73), round(bottom * 73)) == (28, 92, 4, 68)
    expected = (
        (left + centres.columns[1] / 64 * (right - left)) * 200,
        (top + centres.rows[1] / 64 * (bottom - top)) * 120,
    )
    ((overlay, word),) = attention_overlays(picture, [("circle", weights)], image_processor, centres)
    assert word == "circle" and overlay.size == (320, 192)
    display_pixel = 200 / 320  # picture pixels per display pixel
    assert _hottest_point(overlay, 320 / 200) == pytest.approx(expected, abs=1.5 * display_pixel)
    assert peak_position(picture, weights, image_processor, centres) == pytest.approx(expected, abs=display_pixel)
    assert np.asarray(overlay)[0, 0].tolist() == [round(255 * OUTSIDE_CROP_BRIGHTNESS)] * 3  # cropped off: dimmed

    cells = RegionCentres.grid_cells(3, 3, 64, 64)
    cell_peak = peak_position(picture, weights, image_processor, cells)
    assert cell_peak[0] - expected[0] > 10 and cell_peak[1] - expected[1] > 10  # the shift the centres remove


def test_shape_boxes_hold_the_drawn_pixels():
    """Each lone shape's box (`DrawnShape.box`) holds every pixel that differs from the background and is touched by
    them on all four sides (within Pillow's rounding of the outline)."""
    scenes = [scene for scene in generate_shapes_scenes(0, 0, 40)["test"] if len(scene.shapes) == 1]
    assert {scene.shapes[0].kind for scene in scenes} == {"circle", "square", "triangle", "cross"}
    for scene in scenes:
        pixels = np.asarray(scene.image).astype(int)
        rows, columns = np.nonzero(np.any(pixels != pixels[0, 0], axis=-1))
        left, top, right, bottom = scene.shapes[0].box
        drawn = (columns.min(), rows.min(), columns.max() + 1, rows.max() + 1)
        assert drawn == pytest.approx((left, top, right, bottom), abs=1.5), scene.shapes[0]


def test_shapes_images_and_captions_stay_the_same():
    """The boxes are read from the shapes' ground truth; the pixels and captions the set draws do not change."""
    digest = hashlib.sha256()
    for scenes in generate_shapes_scenes(num_train=20, num_validation=5, num_test=20).values():
        for scene in scenes:
            digest.update(scene.image.tobytes())
            digest.update("\n".join(scene.captions).encode())
    assert digest.hexdigest() == "3dc94196ec052784e46b48588ca63f4465d2341adfa7d897d2ffbe784be54656"
