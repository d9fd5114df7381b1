"""Attention heatmaps: where on the picture each region of the encoder's grid looks, and one map per word drawn there.

Reading order: `words_with_attention` (a caption's attention weights per printed word), `RegionCentres` (where each
region sits on the model input), `measure_region_centres` (found from the encoder itself), `attention_heat` (one
word's weights as a map over the part of the picture the model saw), `attention_overlays` (what the demo shows),
`peak_position` (the hottest point, back on the original picture).

Why the centres are measured rather than taken to be the centres of the grid's cells: a strided CNN with symmetric
padding (`padding = kernel // 2`, as in ResNet) centres its output position `f` on input pixel `S * f` for a total
stride `S`, not on the middle of the cell `[S * f, S * (f + 1))`. For ResNet's stride 16 on a 64-pixel input that is
(S - 1) / 2 = 7.5 pixels, about half a cell, up and to the left of the cell's centre, so a heatmap drawn on the cells
puts every peak half a cell below and to the right of what the model looked at. Patchifying stems (ConvNeXt's 4x4
stride-4 convolution, ViT's patches) do centre their outputs on the cells. Measuring the receptive field covers every
backbone without a table of architectures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .models.imgcap.processing_imgcap import IGNORE_INDEX

# Heatmaps are drawn on a copy of the image whose long side is this many pixels.
DISPLAY_SIDE = 320
HEATMAP_OPACITY = 0.5
OUTSIDE_CROP_BRIGHTNESS = 0.35  # parts of the picture the model never saw (cut off by the centre crop) are dimmed
# A blue-green-yellow-red ramp (close to matplotlib's "turbo"): low attention is cool, high attention is hot.
COLORMAP_ANCHORS = np.array(
    [[48, 18, 59], [40, 120, 240], [30, 210, 150], [250, 200, 40], [190, 20, 10]], dtype=np.float32
)
# Random pictures whose receptive fields are united: one picture can leave an edge pixel of a receptive field
# without influence (a max-pool that picks its neighbour in every channel, a ReLU that is off).
_PROBE_PICTURES = 4
_LARGEST_PROBE_SIDE = 8192


def words_with_attention(weights: torch.Tensor, labels: torch.LongTensor, tokenizer) -> list[tuple[str, np.ndarray]]:
    """The attention of each printed word of one caption: the mean of `weights` `(steps, regions)` over the word's
    tokens, with the words exactly as decoding prints them (`ImgCapTokenizer.words_with_positions`), so a spelled
    word is one word and the final `<eos>` none. `labels` are the caption's (`caption_labels`)."""
    tokens = tokenizer.convert_ids_to_tokens(labels[labels != IGNORE_INDEX].tolist())
    return [
        (word, weights[positions].float().mean(dim=0).numpy())
        for word, positions in tokenizer.words_with_positions(tokens, skip_special_tokens=True)
    ]


@dataclass(frozen=True)
class RegionCentres:
    """Where the encoder's regions are centred on the model input (`pixel_values`), in input pixels measured from its
    top-left corner (pixel `i` covers `[i, i + 1)`): region `(row, column)` of the row-major grid is centred at
    `(columns[column], rows[row])`."""

    rows: tuple[float, ...]
    columns: tuple[float, ...]
    input_height: int
    input_width: int

    @classmethod
    def grid_cells(cls, grid_height: int, grid_width: int, input_height: int, input_width: int) -> RegionCentres:
        """Regions centred on the cells of an even grid (patch tokens, patchifying stems)."""
        return cls(
            rows=tuple((row + 0.5) * input_height / grid_height for row in range(grid_height)),
            columns=tuple((column + 0.5) * input_width / grid_width for column in range(grid_width)),
            input_height=input_height,
            input_width=input_width,
        )


def measure_region_centres(encoder: torch.nn.Module, input_height: int, input_width: int) -> RegionCentres:
    """The receptive-field centres of the regions `encoder` (an `ImgCapVisionEncoder`) gives for an
    `input_height` x `input_width` input.

    For a feature map, the centre of feature `f` along an axis is `S * f + offset` whatever the input's size (the
    padding sits at the top-left corner for every size); `S` and `offset` come from the receptive fields of two
    neighbouring features in the middle of a probe large enough that neither field reaches its border. Each region
    is then the mean of the features `adaptive_avg_pool2d` averages into it. Patch tokens are centred on their patches.
    """
    backbone, grid = encoder.backbone, encoder.config.region_grid_size
    if backbone.training:
        raise ValueError(
            "Measure region centres in eval mode (`model.eval()`): batch statistics tie every pixel to every region."
        )
    parameter = next(backbone.parameters())
    with torch.no_grad():
        shape_probe = torch.zeros(1, 3, input_height, input_width, dtype=parameter.dtype, device=parameter.device)
        features = backbone(pixel_values=shape_probe).last_hidden_state
    if features.dim() != 4:  # (batch, special + patches, hidden): patch tokens on an even grid
        side = math.isqrt(encoder.config.num_regions)
        return RegionCentres.grid_cells(side, side, input_height, input_width)
    feature_height, feature_width = features.shape[-2:]  # (batch, channels, feature_height, feature_width)
    # A strip two features wide is enough across the measured axis, and much cheaper than a square probe.
    strip_side = 2 * max(-(-input_height // feature_height), -(-input_width // feature_width))
    rows = _feature_centre_map(backbone, 2, 2 * input_height, strip_side)
    columns = _feature_centre_map(backbone, 3, 2 * input_width, strip_side)
    return RegionCentres(
        rows=_pooled_centres(*rows, feature_height, grid),
        columns=_pooled_centres(*columns, feature_width, grid),
        input_height=input_height,
        input_width=input_width,
    )


def _feature_centre_map(backbone: torch.nn.Module, axis: int, probe_side: int, strip_side: int) -> tuple[float, float]:
    """(stride, offset) along `axis` (2: rows, 3: columns): feature `f` is centred on input `stride * f + offset`.

    The probe is a strip of random pictures, `probe_side` long along `axis` (doubled until the receptive fields of its
    two middle features lie inside it), and the receptive field of a feature is the span of probe pixels whose
    gradient is not zero."""
    parameter = next(backbone.parameters())
    generator = torch.Generator().manual_seed(0)
    while probe_side <= _LARGEST_PROBE_SIDE:
        shape = [_PROBE_PICTURES, 3, strip_side, strip_side]
        shape[axis] = probe_side
        probe = torch.randn(shape, generator=generator).to(dtype=parameter.dtype, device=parameter.device)
        probe.requires_grad_()
        with torch.enable_grad():
            features = backbone(pixel_values=probe).last_hidden_state  # (pictures, channels, height, width)
            middle = features.shape[axis] // 2
            fields = [_receptive_field(features.select(axis, f).sum(), probe, axis) for f in (middle - 1, middle)]
        if all(start > 0 and end < probe_side for start, end in fields):
            stride = _middle(fields[1]) - _middle(fields[0])
            return stride, _middle(fields[1]) - stride * middle
        probe_side *= 2  # a receptive field reached an end of the strip: it may be cut off there
    raise ValueError(
        f"The encoder's receptive field is wider than {_LARGEST_PROBE_SIDE} pixels: cannot place regions."
    )


def _receptive_field(output: torch.Tensor, probe: torch.Tensor, axis: int) -> tuple[int, int]:
    """(first, end) along `axis` of the probe pixels that `output` depends on."""
    (gradient,) = torch.autograd.grad(output, probe, retain_graph=True)
    other_axes = tuple(dim for dim in range(4) if dim != axis)
    influenced = (gradient.abs().sum(dim=other_axes) > 0).nonzero().squeeze(1)  # (pixels,) indices along `axis`
    return int(influenced[0]), int(influenced[-1]) + 1


def _middle(span: tuple[int, int]) -> float:
    """The middle of the pixels `[start, end)`."""
    return (span[0] + span[1]) / 2


def _pooled_centres(stride: float, offset: float, features: int, grid: int) -> tuple[float, ...]:
    """The centres of `adaptive_avg_pool2d`'s `grid` bins over `features` features centred at `stride * f + offset`:
    bin `i` averages features `floor(i * features / grid)` to `ceil((i + 1) * features / grid) - 1`."""
    bins = [range((i * features) // grid, -(-(i + 1) * features // grid)) for i in range(grid)]
    return tuple(float(np.mean([stride * f + offset for f in bin_features])) for bin_features in bins)


# ---------------------------------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------------------------------


def attention_heat(weights: np.ndarray, centres: RegionCentres, width: int, height: int) -> np.ndarray:
    """One word's attention `(regions,)` as a `(height, width)` map over the model input drawn at that size, scaled to
    its maximum (1 at the most attended region's centre).

    Each region's weight sits at its centre and is interpolated between centres with a cubic (Keys) kernel, held
    constant from the outermost centres to the borders (as an edge region's receptive field covers them), so an
    interior region peaks at its centre and an edge region from its centre to the border. Bicubic's overshoot is
    left in (clip it for colours, not for peaks)."""
    grid = weights.reshape(len(centres.rows), len(centres.columns)).astype(np.float64)  # row-major, as encoded
    grid = grid / max(float(grid.max()), 1e-12)
    row_sampling = _cubic_sampling(centres.rows, centres.input_height, height)  # (height, grid rows)
    column_sampling = _cubic_sampling(centres.columns, centres.input_width, width)  # (width, grid columns)
    return row_sampling @ grid @ column_sampling.T  # (height, width)


def _cubic_sampling(centres: tuple[float, ...], input_side: int, output_side: int) -> np.ndarray:
    """(output_side, regions) weights that interpolate values at `centres` (input pixels) onto `output_side` evenly
    spaced pixels spanning the input, holding the outermost values beyond the outermost centres."""
    positions = (np.arange(output_side) + 0.5) * input_side / output_side  # (output_side,) input pixels
    grid_positions = np.interp(positions, centres, np.arange(len(centres)))  # clamped to [0, regions - 1]
    base = np.floor(grid_positions).astype(int)
    sampling = np.zeros((output_side, len(centres)))
    for step in (-1, 0, 1, 2):
        neighbour = base + step
        distance = np.abs(grid_positions - neighbour)
        weight = np.where(
            distance <= 1,
            1.5 * distance**3 - 2.5 * distance**2 + 1,
            np.where(distance < 2, -0.5 * distance**3 + 2.5 * distance**2 - 4 * distance + 2, 0.0),
        )  # Keys' cubic convolution kernel, a = -0.5 (what Pillow's BICUBIC uses)
        np.add.at(sampling, (np.arange(output_side), np.clip(neighbour, 0, len(centres) - 1)), weight)
    return sampling


def colormap(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) float RGB, interpolated linearly between `COLORMAP_ANCHORS`."""
    positions = values * (len(COLORMAP_ANCHORS) - 1)
    lower = np.clip(np.floor(positions).astype(int), 0, len(COLORMAP_ANCHORS) - 2)
    fraction = (positions - lower)[..., None]
    return COLORMAP_ANCHORS[lower] * (1 - fraction) + COLORMAP_ANCHORS[lower + 1] * fraction


@dataclass(frozen=True)
class _DisplayLayout:
    """The picture as shown (long side `DISPLAY_SIDE`) and, in its pixels, the box the model saw."""

    display: Image.Image
    scale: tuple[float, float]  # display pixels per picture pixel, across and down
    box: tuple[int, int, int, int]  # left, top, right, bottom


def _display_layout(image: Image.Image, image_processor) -> _DisplayLayout:
    scale = DISPLAY_SIDE / max(image.size)
    display = image.resize(
        (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.BICUBIC
    )
    left, top, right, bottom = image_processor.crop_box(image.width, image.height)
    box = (
        round(left * display.width),
        round(top * display.height),
        max(round(left * display.width) + 1, round(right * display.width)),
        max(round(top * display.height) + 1, round(bottom * display.height)),
    )
    return _DisplayLayout(display, (display.width / image.width, display.height / image.height), box)


def _centres_or_grid_cells(weights: np.ndarray, centres: RegionCentres | None) -> RegionCentres | None:
    """`centres`, else the cells of a square grid (None when the weights do not form one)."""
    if centres is not None:
        return centres
    side = math.isqrt(weights.size)
    return RegionCentres.grid_cells(side, side, side, side) if side * side == weights.size else None


def attention_overlays(
    image: Image.Image,
    word_attention: list[tuple[str, np.ndarray]],
    image_processor,
    centres: RegionCentres | None = None,
) -> list[tuple[Image.Image, str]]:
    """One picture per word: its attention (`attention_heat`, regions at `centres`) on the part of the (upright)
    picture the model saw (the processor's `crop_box`), colour-mapped and blended over it, the margins the crop cut
    off dimmed. Each map is scaled to its own maximum, as in Show, Attend and Tell's figures, so every word shows
    where it looked most.

    `centres` come from `measure_region_centres`; without them the regions are taken to be centred on the cells of a
    square grid, which is right for patch tokens only. Weights that fit no grid give no pictures."""
    layout = _display_layout(image, image_processor)
    base = np.asarray(layout.display, dtype=np.float32)  # (H, W, 3)
    left, top, right, bottom = layout.box
    overlays = []
    for word, weights in word_attention:
        word_centres = _centres_or_grid_cells(weights, centres)
        if word_centres is None:
            return []
        heat = np.clip(attention_heat(weights, word_centres, right - left, bottom - top), 0.0, 1.0)
        blended = base * OUTSIDE_CROP_BRIGHTNESS
        inside = base[top:bottom, left:right]
        blended[top:bottom, left:right] = (1 - HEATMAP_OPACITY) * inside + HEATMAP_OPACITY * colormap(heat)
        overlays.append((Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8)), word))
    return overlays


def peak_position(
    image: Image.Image, weights: np.ndarray, image_processor, centres: RegionCentres | None = None
) -> tuple[float, float]:
    """(x, y) in `image`'s pixels of the hottest point of the heatmap `attention_overlays` draws for `weights`: the
    centre of the hottest display pixel (the first in reading order where an edge region holds its value to the
    border), mapped back through the display's scale."""
    layout = _display_layout(image, image_processor)
    left, top, right, bottom = layout.box
    heat = attention_heat(weights, _centres_or_grid_cells(weights, centres), right - left, bottom - top)
    row, column = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return (left + column + 0.5) / layout.scale[0], (top + row + 0.5) / layout.scale[1]
