"""The synthetic shapes set: one or two coloured shapes on a plain background, with captions that say what is drawn.

Its captions can only be produced by looking at the image, yet it trains in minutes on a CPU: it is how the tests
and `make demo` reach a visible result without downloads. `write_shapes_examples` writes test images for demos.

This module imports numpy and Pillow only (datasets loads when `make_shapes_dataset` runs), so that the demo app
can write its example images without loading the data stack.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

from .splits import SPLITS

if TYPE_CHECKING:
    from datasets import DatasetDict

SHAPE_COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (40, 70, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 50, 170),
    "orange": (245, 130, 20),
}
BACKGROUND_COLOURS = {"white": (255, 255, 255), "grey": (200, 200, 200), "cream": (250, 240, 205)}
SHAPE_KINDS = ("circle", "square", "triangle", "cross")
# Radius as a fraction of the image side; each drawn radius varies by up to 8% so the two sizes never overlap.
SHAPE_RADII = {"small": 0.09, "large": 0.18}
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
# Centres (as fractions of the side) of a lone shape, each moved by up to 3% so images differ in more than colour.
SINGLE_POSITIONS = {
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "center": (0.5, 0.5),
}
POSITION_PHRASES = {
    "left": ("on the left", "on the left side"),
    "right": ("on the right", "on the right side"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "center": ("in the center", "in the middle"),
}
# For two shapes, the relation of the first-named shape to the second, by where the first one is drawn.
RELATION_PHRASES = {"left": "to the left of", "right": "to the right of", "top": "above", "bottom": "below"}
SINGLE_TEMPLATES = (
    "a {colour} {shape} {where} .",
    "a {size} {colour} {shape} {where} .",
    "there is a {size} {colour} {shape} {where} .",
    "a {size} {colour} {shape} {where} on a {background} background .",
    "the image shows a {size} {colour} {shape} {where} .",
    "{where} there is a {colour} {shape} .",
    "a picture of a {size} {colour} {shape} {where} .",
)
PAIR_TEMPLATES = (
    "a {colour} {shape} {relation} a {other_colour} {other_shape} .",
    "a {size} {colour} {shape} {relation} a {other_size} {other_colour} {other_shape} .",
    "there is a {colour} {shape} {relation} a {other_colour} {other_shape} .",
    "the {colour} {shape} is {relation} the {other_colour} {other_shape} .",
    "a {colour} {shape} and a {other_colour} {other_shape} on a {background} background .",
    "two shapes : a {size} {colour} {shape} {relation} a {other_size} {other_colour} {other_shape} .",
)
CAPTIONS_PER_SHAPES_IMAGE = 5
_ARTICLE_BEFORE_VOWEL = re.compile(r"\ba (?=[aeiou])")  # "a orange circle" -> "an orange circle"
_POSITION_JITTER = 0.03
_RADIUS_JITTER = 0.08
_PAIR_CROSS_AXIS_JITTER = 0.1
# A square of the circle's area would look bigger: its half side is this fraction of the radius.
_SQUARE_HALF_SIDE = 0.85
# Splits are generated in this order, each rejecting images already drawn for an earlier one, so that the test
# images (and `write_shapes_examples`) do not depend on how many training images are asked for.
_SHAPES_GENERATION_ORDER = ("test", "validation", "train")


@dataclass(frozen=True)
class DrawnShape:
    """One shape as drawn: what the captions must say (kind, colour, size, position) and where the pixels are."""

    kind: str
    colour: str
    size: str
    position: str  # left/right/top/bottom/center for a lone shape; left/right or top/bottom within a pair
    center: tuple[float, float]  # pixels
    radius: float  # pixels

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) in pixels: the box the shape is drawn in, where a word naming it should look."""
        half_side = _SQUARE_HALF_SIDE * self.radius if self.kind == "square" else self.radius
        x, y = self.center
        return x - half_side, y - half_side, x + half_side, y + half_side


@dataclass(frozen=True)
class ShapesScene:
    """One synthetic image with the ground truth its captions were written from."""

    image: Image.Image
    background: str
    shapes: tuple[DrawnShape, ...]
    captions: tuple[str, ...]


def generate_shapes_scenes(
    num_train: int = 3000, num_validation: int = 300, num_test: int = 300, image_size: int = 64, seed: int = 0
) -> dict[str, list[ShapesScene]]:
    """Draw the scenes of `make_shapes_dataset`, with their ground truth (for tests and analysis).

    Each split draws from its own numpy generator, derived from `seed` and the split; no image appears twice
    (a repeated image is redrawn), so the splits share none.
    """
    counts = {"train": num_train, "validation": num_validation, "test": num_test}
    if any(count < 0 for count in counts.values()):
        raise ValueError(f"Split sizes must be non-negative, got {counts}")
    if image_size < 32:
        raise ValueError(
            f"image_size must be at least 32 pixels for small shapes to stay recognisable, got {image_size}"
        )
    return _draw_distinct_splits(counts, seed, lambda rng: _draw_shapes_scene(rng, image_size))


def _draw_distinct_splits(counts: dict[str, int], seed: int, draw: Callable[[np.random.Generator], Any]) -> dict:
    """`counts[split]` scenes per split from `draw`, each split with its own generator derived from `seed` and the
    split, no image twice (a repeat is redrawn), in `_SHAPES_GENERATION_ORDER`. Shared by the synthetic sets
    (shapes, scenes)."""
    seen_pixels: set[bytes] = set()
    scenes = {}
    for split in _SHAPES_GENERATION_ORDER:
        rng = np.random.default_rng([seed, SPLITS.index(split)])
        scenes[split] = []
        while len(scenes[split]) < counts[split]:
            scene = draw(rng)
            fingerprint = hashlib.sha1(scene.image.tobytes()).digest()
            if fingerprint not in seen_pixels:
                seen_pixels.add(fingerprint)
                scenes[split].append(scene)
    return {split: scenes[split] for split in SPLITS}


def make_shapes_dataset(
    num_train: int = 3000, num_validation: int = 300, num_test: int = 300, image_size: int = 64, seed: int = 0
) -> DatasetDict:
    """A synthetic captioning set: one or two coloured shapes on a plain background, five captions per image.

    Captions name the colour, kind (circle, square, triangle, cross), size (small/large) and position (left, right,
    top, bottom, center, or one shape relative to the other) of what is drawn, in varied phrasings over a vocabulary
    of about 50 words, so a model has to look at the image to caption it, yet the task is small enough for a CPU.
    Deterministic: the same arguments give identical pixels and captions in every process and on every machine
    (numpy's `default_rng` and Pillow's `ImageDraw` only; the PNG bytes also match wherever zlib is the same), and
    cheap enough to draw again on every run instead of being cached.
    """
    return _caption_dataset("shapes", generate_shapes_scenes(num_train, num_validation, num_test, image_size, seed))


def _caption_dataset(name: str, scenes: dict) -> DatasetDict:
    """The drawn scenes of each split as rows of `schema.CAPTION_FEATURES` (ids `NAME-SPLIT-00000`, PNG images)."""
    # datasets loads here rather than at the top: the demo app imports this module for `write_shapes_examples` only.
    from datasets import Dataset, DatasetDict

    from .schema import CAPTION_FEATURES

    return DatasetDict(
        {
            split: Dataset.from_dict(
                {
                    "image_id": [f"{name}-{split}-{index:05d}" for index in range(len(split_scenes))],
                    "image": [{"bytes": _png_bytes(scene.image), "path": None} for scene in split_scenes],
                    "captions": [list(scene.captions) for scene in split_scenes],
                },
                features=CAPTION_FEATURES,
            )
            for split, split_scenes in scenes.items()
        }
    )


def write_shapes_examples(directory: str | Path, count: int = 6, image_size: int = 64, seed: int = 0) -> list[Path]:
    """Write the first `count` test images of `make_shapes_dataset(image_size=..., seed=...)` as PNGs.

    These are images a shapes model never trained on, for captioning demos.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    scenes = generate_shapes_scenes(num_train=0, num_validation=0, num_test=count, image_size=image_size, seed=seed)
    paths = []
    for index, scene in enumerate(scenes["test"]):
        path = directory / f"shapes_test_{index:02d}.png"
        path.write_bytes(_png_bytes(scene.image))
        paths.append(path)
    return paths


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _draw_shapes_scene(rng: np.random.Generator, image_size: int) -> ShapesScene:
    background = str(rng.choice(list(BACKGROUND_COLOURS)))
    if rng.random() < 0.5:
        position = str(rng.choice(list(SINGLE_POSITIONS)))
        shapes = (_place_shape(rng, image_size, position, jitter=(_POSITION_JITTER, _POSITION_JITTER)),)
    else:
        shapes = _place_pair(rng, image_size)
    image = Image.new("RGB", (image_size, image_size), BACKGROUND_COLOURS[background])
    draw = ImageDraw.Draw(image)
    for shape in shapes:
        _draw_shape(draw, shape)
    return ShapesScene(image=image, background=background, shapes=shapes, captions=_caption(rng, background, shapes))


def _place_shape(
    rng: np.random.Generator,
    image_size: int,
    position: str,
    jitter: tuple[float, float],
    exclude: tuple[str, str] | None = None,
) -> DrawnShape:
    """Pick the kind, colour and size of a shape centred within `jitter` of its position (fractions of the side)."""
    while True:
        kind, colour = str(rng.choice(SHAPE_KINDS)), str(rng.choice(list(SHAPE_COLOURS)))
        if (kind, colour) != exclude:  # two identical shapes would make "the red circle" ambiguous
            break
    size = str(rng.choice(list(SHAPE_RADII)))
    radius = SHAPE_RADII[size] * (1 + rng.uniform(-_RADIUS_JITTER, _RADIUS_JITTER)) * image_size
    anchor = SINGLE_POSITIONS[position]
    center = (
        (anchor[0] + rng.uniform(-jitter[0], jitter[0])) * image_size,
        (anchor[1] + rng.uniform(-jitter[1], jitter[1])) * image_size,
    )
    return DrawnShape(kind=kind, colour=colour, size=size, position=position, center=center, radius=radius)


def _place_pair(rng: np.random.Generator, image_size: int) -> tuple[DrawnShape, DrawnShape]:
    # A pair lies along one axis; across it the shapes may wander further without changing their relation.
    if rng.random() < 0.5:
        positions, jitter = ("left", "right"), (_POSITION_JITTER, _PAIR_CROSS_AXIS_JITTER)
    else:
        positions, jitter = ("top", "bottom"), (_PAIR_CROSS_AXIS_JITTER, _POSITION_JITTER)
    first = _place_shape(rng, image_size, positions[0], jitter)
    second = _place_shape(rng, image_size, positions[1], jitter, exclude=(first.kind, first.colour))
    return first, second


def _draw_shape(draw: ImageDraw.ImageDraw, shape: DrawnShape) -> None:
    x, y, radius, fill = *shape.center, shape.radius, SHAPE_COLOURS[shape.colour]
    if shape.kind == "circle":
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=fill)
    elif shape.kind == "square":
        half_side = _SQUARE_HALF_SIDE * radius
        draw.rectangle((x - half_side, y - half_side, x + half_side, y + half_side), fill=fill)
    elif shape.kind == "triangle":  # pointing up, filling the same box as the circle
        draw.polygon([(x, y - radius), (x + radius, y + radius), (x - radius, y + radius)], fill=fill)
    else:  # cross: a plus sign
        half_width = 0.35 * radius
        draw.rectangle((x - radius, y - half_width, x + radius, y + half_width), fill=fill)
        draw.rectangle((x - half_width, y - radius, x + half_width, y + radius), fill=fill)


def _caption(rng: np.random.Generator, background: str, shapes: tuple[DrawnShape, ...]) -> tuple[str, ...]:
    """Five captions from distinct templates.

    The wording inside a template is fixed by the template (which synonym, and for pairs which shape is named
    first), so the five captions of an image differ in phrasing while every word still follows from the pixels and
    the template. Synonyms drawn at random per caption would be label noise that no model can learn from an image:
    they would cap the BLEU-4 of even a perfect recogniser well below 1.
    """
    templates = SINGLE_TEMPLATES if len(shapes) == 1 else PAIR_TEMPLATES
    chosen = rng.choice(len(templates), size=CAPTIONS_PER_SHAPES_IMAGE, replace=False)
    captions = []
    for template_index in chosen:
        variant = int(template_index) % 2  # alternate templates use the alternate wording
        words = {"background": background}
        if len(shapes) == 1:
            words |= _shape_words(shapes[0], prefix="", variant=variant)
            words["where"] = POSITION_PHRASES[shapes[0].position][variant]
        else:
            named_first, named_second = shapes if variant == 0 else shapes[::-1]
            words |= _shape_words(named_first, prefix="", variant=variant)
            words |= _shape_words(named_second, prefix="other_", variant=variant)
            words["relation"] = RELATION_PHRASES[named_first.position]
        captions.append(_ARTICLE_BEFORE_VOWEL.sub("an ", templates[template_index].format(**words)))
    return tuple(captions)


def _shape_words(shape: DrawnShape, prefix: str, variant: int) -> dict[str, str]:
    return {
        f"{prefix}colour": shape.colour,
        f"{prefix}shape": shape.kind,
        f"{prefix}size": SIZE_WORDS[shape.size][variant],
    }
