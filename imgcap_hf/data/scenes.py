"""The synthetic scenes set: groups of objects on textured backgrounds, captioned by five simulated annotators.

`shapes` (shapes.py) has five fixed phrasings per template, so a model that recognises the picture can reproduce
its references word for word and scores near a ceiling that real data never allows. `scenes` is built to behave
like Flickr30k instead: more object kinds, colours, sizes and places, textured backgrounds, repeated objects to
count ("three small stars"), relations between two groups ("a red circle above two blue squares"), and captions
from five annotators who differ as crowd workers do: what each mentions (sizes, the background, the relation), in
which order, which synonym each picks for this image ("box" or "square"), whether they name the kind at all ("two
black shapes"), terse or detailed, and the asides each adds ("very simple art"). Their agreement was set to that of
real captions: scored pairwise (one caption against one other of its image) they agree as much as Flickr30k's
annotators (README, "The scenes set"). No caption is "the" answer, so the annotators' agreement with each other
(benchmarks/human_agreement.py) is the yardstick a model's scores are read against, as COCO reports human agreement.

Every object's pixel box is kept with the scene (`SceneObject.box`, `Scene.object_records`), for grounding figures
and for tests that check the captions against the pixels.

Deterministic like shapes: numpy's `default_rng` seeded by (seed, split), Pillow's `ImageDraw`, and tables that are
tuples or insertion-ordered dicts, never sets, so the same arguments give identical pixels and captions in every
process and on every machine. This module imports numpy and Pillow only (datasets loads in `make_scenes_dataset`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

from .shapes import _caption_dataset, _draw_distinct_splits

if TYPE_CHECKING:
    from datasets import DatasetDict

# ---------------------------------------------------------------------------------------------------------------------
# What can be drawn
# ---------------------------------------------------------------------------------------------------------------------

OBJECT_KINDS = ("circle", "square", "triangle", "diamond", "cross", "star")
OBJECT_COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 150, 50),
    "blue": (40, 70, 220),
    "yellow": (235, 195, 0),
    "purple": (130, 40, 170),
    "orange": (245, 125, 10),
    "pink": (240, 100, 180),
    "black": (25, 25, 25),
}
# Light tones, so that every object colour stands out; a texture repeats the tone darkened by TEXTURE_SHADE.
BACKGROUND_TONES = {
    "white": (250, 250, 250),
    "grey": (205, 205, 205),
    "cream": (245, 235, 200),
    "blue": (200, 220, 245),
}
BACKGROUND_TEXTURES = ("plain", "striped", "dotted", "checkered")
TEXTURE_SHADE = 28
# Radius as a fraction of the image side, each drawn radius varying by up to 8%: the two sizes never overlap.
OBJECT_RADII = {"small": 0.07, "large": 0.115}
_RADIUS_JITTER = 0.08
# A lone group lies inside one of these boxes (fractions of the side: left, top, right, bottom); two groups lie in
# opposite halves, so that "above" or "to the left of" holds for every pair of their boxes.
LONE_GROUP_REGIONS = {
    "left": (0.03, 0.12, 0.47, 0.88),
    "right": (0.53, 0.12, 0.97, 0.88),
    "top": (0.12, 0.03, 0.88, 0.47),
    "bottom": (0.12, 0.53, 0.88, 0.97),
    "center": (0.22, 0.22, 0.78, 0.78),
}
PAIR_REGIONS = {
    "above": ((0.03, 0.03, 0.97, 0.47), (0.03, 0.53, 0.97, 0.97)),
    "left of": ((0.03, 0.03, 0.47, 0.97), (0.53, 0.03, 0.97, 0.97)),
}
MAX_LONE_COUNT = 4
MAX_PAIR_COUNT = 3
_OBJECT_GAP_PX = 2  # between the boxes of two objects, so that counting them never needs to split touching shapes
_PLACEMENT_TRIES = 40

# ---------------------------------------------------------------------------------------------------------------------
# The words annotators choose from: the first entry of each tuple is the plain word, the others its synonyms
# ---------------------------------------------------------------------------------------------------------------------

KIND_WORDS = {  # (singular, plural)
    "circle": (("circle", "circles"), ("dot", "dots"), ("disc", "discs"), ("ball", "balls")),
    "square": (("square", "squares"), ("box", "boxes"), ("block", "blocks")),
    "triangle": (("triangle", "triangles"), ("triangular shape", "triangular shapes")),
    "diamond": (("diamond", "diamonds"), ("rhombus", "rhombuses")),
    "cross": (("cross", "crosses"), ("plus sign", "plus signs"), ("plus", "pluses")),
    "star": (("star", "stars"),),
}
COLOUR_WORDS = {
    "red": ("red", "bright red"),
    "green": ("green", "dark green"),
    "blue": ("blue", "dark blue"),
    "yellow": ("yellow", "golden"),
    "purple": ("purple", "violet"),
    "orange": ("orange",),
    "pink": ("pink", "magenta"),
    "black": ("black",),
}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
# What an annotator says instead of the kind when they do not name it ("two black shapes").
GENERIC_KIND_WORDS = (("shape", "shapes"), ("object", "objects"), ("figure", "figures"))
COUNT_WORDS = {1: ("a", "one", "a single"), 2: ("two", "a pair of", "2"), 3: ("three", "3"), 4: ("four", "4")}
VAGUE_COUNT_WORDS = ("some", "several", "a few")  # for two or more
TOTAL_COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
TONE_WORDS = {
    "white": ("white",),
    "grey": ("grey", "gray"),
    "cream": ("cream", "beige"),
    "blue": ("light blue", "pale blue"),
}
TEXTURE_WORDS = {
    "striped": ("striped", "stripy", "lined"),
    "dotted": ("dotted", "spotted"),
    "checkered": ("checkered", "checked"),
}
BACKGROUND_WORDS = (("on", "background"), ("against", "background"), ("with", "background"), ("on", "backdrop"))
# The relation of the first-named group to the second. "next to" and "beside" hold either way round.
RELATION_WORDS = {
    "above": ("above", "over", "on top of"),
    "below": ("below", "under", "beneath"),
    "left of": ("to the left of", "left of", "next to", "beside"),
    "right of": ("to the right of", "right of", "next to", "beside"),
}
INVERSE_RELATION = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
VERB_WORDS = {"singular": ("is", "sits", "is placed", "appears"), "plural": ("are", "sit", "are placed", "appear")}
REGION_WORDS = {
    "left": ("on the left", "on the left side", "at the left", "toward the left", "in the left half"),
    "right": ("on the right", "on the right side", "at the right", "toward the right", "in the right half"),
    "top": ("at the top", "near the top", "in the upper part", "at the top of the image", "in the top half"),
    "bottom": ("at the bottom", "near the bottom", "in the lower part", "at the bottom of the image", "down below"),
    "center": ("in the center", "in the middle", "in the centre", "in the middle of the image", "centered"),
}
_ARTICLE_BEFORE_VOWEL = re.compile(r"\ba (?=[aeiou])")


@dataclass(frozen=True)
class Annotator:
    """How one simulated annotator writes: what they mention, in what order, how plainly, and what they add.

    Every field is a probability (or a choice) drawn anew for each image, so an annotator is consistent in habit but
    not in wording, like a crowd worker.

    Args:
        name: what the benchmark and the tests call this annotator.
        plain_word: chance of the plain word (`"square"`) over a synonym (`"box"`), per word.
        generic: chance of a generic noun ("shapes", "objects") instead of the kind, per group.
        colour: chance of naming a group's colour.
        one_group: with two groups, chance of mentioning only the first-named one (annotators skip things).
        size: chance of saying the objects' size.
        background: chance of describing the background.
        texture: given the background is mentioned and textured, chance of saying its texture.
        where: chance of saying where things are (the relation of two groups, the place of a lone group).
        vague_count: chance of "some" or "several" instead of the number, for two or more objects.
        total_first: chance of opening with the number of shapes ("three shapes : ...").
        order: which group comes first: "reading" (the top or left one), "larger" (the more numerous one), "random".
        openings: ways to start a caption, "" for none; one is picked per image.
        verb: chance of a verb ("is", "sits") between a group and its relation.
        with_clause: chance of "A with B below it" instead of "B below A".
        remark: chance of ending with one of `remarks`, an aside of this annotator's own ("evenly spaced").
        remarks: the asides this annotator makes; others rarely share them, as with real annotators' impressions.
    """

    name: str
    plain_word: float
    generic: float
    colour: float
    one_group: float
    size: float
    background: float
    texture: float
    where: float
    vague_count: float
    total_first: float
    order: str
    openings: tuple[str, ...]
    verb: float
    with_clause: float
    remark: float
    remarks: tuple[str, ...]


ANNOTATORS = (
    Annotator(
        "terse",
        one_group=0.35,
        plain_word=0.4,
        generic=0.05,
        colour=0.75,
        size=0.1,
        background=0.05,
        texture=0.5,
        where=0.4,
        vague_count=0.2,
        total_first=0.0,
        order="larger",
        openings=("",),
        verb=0.0,
        with_clause=0.0,
        remark=0.0,
        remarks=(),
    ),
    Annotator(
        "thorough",
        one_group=0.0,
        plain_word=0.5,
        generic=0.0,
        colour=1.0,
        size=0.9,
        background=0.8,
        texture=0.9,
        where=0.95,
        vague_count=0.0,
        total_first=0.1,
        order="reading",
        openings=("", "a picture of", "there is", "an illustration of"),
        verb=0.5,
        with_clause=0.2,
        remark=0.25,
        remarks=(
            "all drawn with sharp edges",
            "each one neatly spaced from the others",
            "drawn in flat colours",
            "with a thin gap between them",
        ),
    ),
    Annotator(
        "spatial",
        one_group=0.0,
        plain_word=0.4,
        generic=0.0,
        colour=0.9,
        size=0.4,
        background=0.2,
        texture=0.6,
        where=1.0,
        vague_count=0.05,
        total_first=0.0,
        order="random",
        openings=("", "there is", "we see", "in this picture there is"),
        verb=0.6,
        with_clause=0.3,
        remark=0.2,
        remarks=(
            "leaving the rest of the picture empty",
            "with plenty of space around them",
            "not touching each other",
        ),
    ),
    Annotator(
        "counter",
        one_group=0.1,
        plain_word=0.4,
        generic=0.1,
        colour=0.85,
        size=0.5,
        background=0.3,
        texture=0.7,
        where=0.6,
        vague_count=0.0,
        total_first=0.6,
        order="larger",
        openings=("", "an image of", "a picture showing", "a graphic with"),
        verb=0.3,
        with_clause=0.1,
        remark=0.2,
        remarks=("nothing else is in the image", "that is all there is", "i count them easily"),
    ),
    Annotator(
        "casual",
        one_group=0.25,
        plain_word=0.2,
        generic=0.15,
        colour=0.8,
        size=0.6,
        background=0.5,
        texture=0.8,
        where=0.7,
        vague_count=0.3,
        total_first=0.0,
        order="random",
        openings=("", "a drawing of", "this image shows", "here we see", "some art with"),
        verb=0.3,
        with_clause=0.3,
        remark=0.35,
        remarks=("looks like a kids puzzle", "very simple art", "kind of cute", "pretty colourful", "like a logo"),
    ),
)


# ---------------------------------------------------------------------------------------------------------------------
# Scenes as drawn
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: its centre and radius as placed, and `box`, the bounding box of its drawn pixels."""

    center: tuple[float, float]  # pixels
    radius: float  # pixels
    box: tuple[int, int, int, int]  # left, top, right, bottom in pixels, right and bottom exclusive (PIL's getbbox)


@dataclass(frozen=True)
class ObjectGroup:
    """Identical objects (same kind, colour and size) that the captions count and name together."""

    kind: str
    colour: str
    size: str
    objects: tuple[SceneObject, ...]


@dataclass(frozen=True)
class Scene:
    """One image with the ground truth its captions were written from.

    `relation` is how `groups[0]` lies relative to `groups[1]` ("above" or "left of") when there are two groups;
    `region` is where a lone group lies (a key of LONE_GROUP_REGIONS). `captions[i]` is written by `ANNOTATORS[i]`.
    """

    image: Image.Image
    tone: str
    texture: str
    groups: tuple[ObjectGroup, ...]
    relation: str | None
    region: str | None
    captions: tuple[str, ...]

    def object_records(self) -> list[dict[str, Any]]:
        """The objects as JSON-ready dicts: kind, colour, size and `box` [left, top, right, bottom) in pixels."""
        return [
            {"kind": group.kind, "colour": group.colour, "size": group.size, "box": list(item.box)}
            for group in self.groups
            for item in group.objects
        ]


def generate_scenes(
    num_train: int = 3000, num_validation: int = 300, num_test: int = 300, image_size: int = 64, seed: int = 0
) -> dict[str, list[Scene]]:
    """Draw the scenes of `make_scenes_dataset`, with their ground truth (for tests, benchmarks and figures).

    Each split draws from its own numpy generator, derived from `seed` and the split; no image appears twice
    (a repeated image is redrawn), so the splits share none.
    """
    counts = {"train": num_train, "validation": num_validation, "test": num_test}
    if any(count < 0 for count in counts.values()):
        raise ValueError(f"Split sizes must be non-negative, got {counts}")
    if image_size < 48:
        raise ValueError(
            f"image_size must be at least 48 pixels for small objects to stay recognisable, got {image_size}"
        )
    return _draw_distinct_splits(counts, seed, lambda rng: _draw_scene(rng, image_size))


def make_scenes_dataset(
    num_train: int = 3000, num_validation: int = 300, num_test: int = 300, image_size: int = 64, seed: int = 0
) -> DatasetDict:
    """A synthetic captioning set with human-like references: object groups on textured backgrounds, 5 annotators.

    One or two groups of one to four identical objects (6 kinds, 8 colours, 2 sizes) on a plain, striped, dotted or
    checkered background; a lone group sits at one of five places, two groups one above or beside the other. Each
    image has five captions, one per simulated annotator of `ANNOTATORS`, who differ in what they mention, in
    order and in word choice (see `Annotator`). Same columns as every source (`schema.CAPTION_FEATURES`); the
    objects' boxes are in `generate_scenes`, which draws the same scenes. Deterministic like `make_shapes_dataset`.
    """
    return _caption_dataset("scenes", generate_scenes(num_train, num_validation, num_test, image_size, seed))


# ---------------------------------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------------------------------


def _draw_scene(rng: np.random.Generator, image_size: int) -> Scene:
    tone = tuple(BACKGROUND_TONES)[int(rng.integers(len(BACKGROUND_TONES)))]
    texture = BACKGROUND_TEXTURES[int(rng.integers(len(BACKGROUND_TEXTURES)))]
    image = Image.fromarray(_background_pixels(rng, image_size, tone, texture))
    while True:  # a layout whose objects do not fit their region is drawn again
        layout = _place_groups(rng, image_size)
        if layout is not None:
            break
    groups, relation, region = layout
    drawn_groups = tuple(
        ObjectGroup(
            group.kind,
            group.colour,
            group.size,
            tuple(_draw_object(image, group.kind, OBJECT_COLOURS[group.colour], item) for item in group.objects),
        )
        for group in groups
    )
    captions = _captions(rng, tone, texture, drawn_groups, relation, region)
    return Scene(image, tone, texture, drawn_groups, relation, region, captions)


def _background_pixels(rng: np.random.Generator, image_size: int, tone: str, texture: str) -> np.ndarray:
    """(image_size, image_size, 3) uint8: the tone, with the texture's pattern in a darker shade of it."""
    base = np.array(BACKGROUND_TONES[tone], dtype=np.int16)
    pixels = np.empty((image_size, image_size, 3), dtype=np.int16)
    pixels[:] = base
    if texture == "plain":
        return pixels.astype(np.uint8)
    rows, columns = np.arange(image_size)[:, None], np.arange(image_size)[None, :]  # broadcast to (side, side)
    period = int(rng.integers(4, 8)) * max(1, image_size // 64)
    row_phase, column_phase = (int(phase) for phase in rng.integers(0, period, size=2))
    rows, columns = rows + row_phase, columns + column_phase
    if texture == "striped":
        direction = int(rng.integers(3))  # horizontal, vertical, diagonal
        coordinate = (rows, columns, rows + columns)[direction]
        pattern = (coordinate % period) < period // 2
    elif texture == "dotted":
        dot = max(1, period // 3)
        pattern = ((rows % period) < dot) & ((columns % period) < dot)
    else:  # checkered
        pattern = ((rows // period + columns // period) % 2) == 0
    pixels[np.broadcast_to(pattern, (image_size, image_size))] = base - TEXTURE_SHADE
    return pixels.astype(np.uint8)


def _place_groups(
    rng: np.random.Generator, image_size: int
) -> tuple[tuple[ObjectGroup, ...], str | None, str | None] | None:
    """One or two groups placed in their regions, or None when their objects could not be fitted without touching."""
    if rng.random() < 0.4:
        region = tuple(LONE_GROUP_REGIONS)[int(rng.integers(len(LONE_GROUP_REGIONS)))]
        group = _place_group(rng, image_size, LONE_GROUP_REGIONS[region], MAX_LONE_COUNT, exclude_kind=None)
        return None if group is None else ((group,), None, region)
    relation = tuple(PAIR_REGIONS)[int(rng.integers(len(PAIR_REGIONS)))]
    first_region, second_region = PAIR_REGIONS[relation]
    first = _place_group(rng, image_size, first_region, MAX_PAIR_COUNT, exclude_kind=None)
    if first is None:
        return None
    # Two groups of one kind would make "the circles" ambiguous: the kind alone tells which group a caption means.
    second = _place_group(rng, image_size, second_region, MAX_PAIR_COUNT, exclude_kind=first.kind)
    if second is None:
        return None
    return (first, second), relation, None


def _place_group(
    rng: np.random.Generator,
    image_size: int,
    region: tuple[float, float, float, float],
    max_count: int,
    exclude_kind: str | None,
) -> ObjectGroup | None:
    kinds = tuple(kind for kind in OBJECT_KINDS if kind != exclude_kind)
    kind = kinds[int(rng.integers(len(kinds)))]
    colour = tuple(OBJECT_COLOURS)[int(rng.integers(len(OBJECT_COLOURS)))]
    size = tuple(OBJECT_RADII)[int(rng.integers(len(OBJECT_RADII)))]
    count = int(rng.integers(1, max_count + 1))
    left, top, right, bottom = (fraction * image_size for fraction in region)
    placed: list[SceneObject] = []
    for _ in range(count):
        radius = OBJECT_RADII[size] * (1 + rng.uniform(-_RADIUS_JITTER, _RADIUS_JITTER)) * image_size
        for _ in range(_PLACEMENT_TRIES):
            center = (rng.uniform(left + radius, right - radius), rng.uniform(top + radius, bottom - radius))
            if all(_apart(center, radius, other) for other in placed):
                placed.append(SceneObject(center, radius, _outer_box(center, radius)))
                break
        else:
            return None
    return ObjectGroup(kind, colour, size, tuple(placed))


def _outer_box(center: tuple[float, float], radius: float) -> tuple[int, int, int, int]:
    """The pixels an object may cover (its drawn box lies inside), before it is drawn."""
    x, y = center
    return (math.floor(x - radius), math.floor(y - radius), math.ceil(x + radius) + 1, math.ceil(y + radius) + 1)


def _apart(center: tuple[float, float], radius: float, other: SceneObject) -> bool:
    left, top, right, bottom = _outer_box(center, radius)
    other_left, other_top, other_right, other_bottom = other.box
    gap = _OBJECT_GAP_PX
    return (
        right + gap <= other_left
        or other_right + gap <= left
        or bottom + gap <= other_top
        or other_bottom + gap <= top
    )


def _draw_object(image: Image.Image, kind: str, colour: tuple[int, int, int], item: SceneObject) -> SceneObject:
    """Paint one object into `image` and return it with `box` shrunk to the pixels actually painted.

    The object is drawn as a mask over its outer box only (Pillow's `ImageDraw`, no antialiasing), which is much
    cheaper than a mask of the whole image and gives the exact box of the painted pixels from `getbbox`.
    """
    left, top, right, bottom = item.box
    mask = Image.new("L", (right - left, bottom - top), 0)
    draw = ImageDraw.Draw(mask)
    x, y, radius = item.center[0] - left, item.center[1] - top, item.radius  # in the mask's coordinates
    if kind == "circle":
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=255)
    elif kind == "square":
        half_side = 0.85 * radius  # a square of the circle's box would look bigger: keep the kinds comparable
        draw.rectangle((x - half_side, y - half_side, x + half_side, y + half_side), fill=255)
    elif kind == "triangle":  # pointing up
        draw.polygon([(x, y - radius), (x + radius, y + radius), (x - radius, y + radius)], fill=255)
    elif kind == "diamond":
        draw.polygon([(x, y - radius), (x + 0.8 * radius, y), (x, y + radius), (x - 0.8 * radius, y)], fill=255)
    elif kind == "cross":  # a plus sign
        half_width = 0.35 * radius
        draw.rectangle((x - radius, y - half_width, x + radius, y + half_width), fill=255)
        draw.rectangle((x - half_width, y - radius, x + half_width, y + radius), fill=255)
    else:  # a five-pointed star, one point up
        points = []
        for corner in range(10):
            distance = radius if corner % 2 == 0 else 0.45 * radius
            angle = math.pi * corner / 5 - math.pi / 2
            points.append((x + distance * math.cos(angle), y + distance * math.sin(angle)))
        draw.polygon(points, fill=255)
    image.paste(colour, item.box, mask=mask)
    mask_left, mask_top, mask_right, mask_bottom = mask.getbbox()
    return SceneObject(
        item.center, item.radius, (left + mask_left, top + mask_top, left + mask_right, top + mask_bottom)
    )


# ---------------------------------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------------------------------


def _captions(
    rng: np.random.Generator,
    tone: str,
    texture: str,
    groups: tuple[ObjectGroup, ...],
    relation: str | None,
    region: str | None,
) -> tuple[str, ...]:
    """One caption per annotator, all five distinct: an annotator whose caption repeats an earlier one writes again."""
    captions: list[str] = []
    for annotator in ANNOTATORS:
        while True:
            caption = _annotate(rng, annotator, tone, texture, groups, relation, region)
            if caption not in captions:
                captions.append(caption)
                break
    return tuple(captions)


def _chance(rng: np.random.Generator, probability: float) -> bool:
    return bool(rng.random() < probability)


def _pick(rng: np.random.Generator, options: tuple, plain_word: float):
    """The first (plain) option with probability `plain_word`, otherwise one of the others, uniformly."""
    if len(options) == 1 or _chance(rng, plain_word):
        return options[0]
    return options[int(rng.integers(1, len(options)))]


def _annotate(
    rng: np.random.Generator,
    annotator: Annotator,
    tone: str,
    texture: str,
    groups: tuple[ObjectGroup, ...],
    relation: str | None,
    region: str | None,
) -> str:
    """One annotator's caption of one image: the words follow from the scene and the annotator's habits only."""
    ordered, ordered_relation = groups, relation
    if len(groups) == 2:
        first_named = {
            "reading": 0,
            "larger": int(len(groups[1].objects) > len(groups[0].objects)),
            "random": int(rng.integers(2)),
        }[annotator.order]
        if first_named == 1:
            ordered, ordered_relation = groups[::-1], INVERSE_RELATION[relation]
        if _chance(rng, annotator.one_group):
            ordered = ordered[:1]
    with_size = _chance(rng, annotator.size)
    phrases = [_noun_phrase(rng, annotator, group, with_size) for group in ordered]

    total = sum(len(group.objects) for group in groups)
    opening = annotator.openings[int(rng.integers(len(annotator.openings)))]
    if total > 1 and _chance(rng, annotator.total_first):
        noun = ("shapes", "objects")[int(rng.integers(2))]
        opening = f"{TOTAL_COUNT_WORDS[total]} {noun} :"
    elif opening.endswith("there is"):  # "there is" or "in this picture there is", agreeing with the first group
        opening = f"{opening.removesuffix('is')}{_be(ordered[0])}"
    elif opening == "we see" or opening == "here we see":
        opening = opening.replace("see", ("see", "can see")[int(rng.integers(2))])

    if len(ordered) == 1:
        caption = f"{opening} {phrases[0]}"
        if region is not None and _chance(rng, annotator.where):
            where = _pick(rng, REGION_WORDS[region], annotator.plain_word)
            if opening == "" and _chance(rng, 0.2):
                caption = f"{where} there {_be(ordered[0])} {phrases[0]}"
            else:
                caption = f"{caption} {where}"
    elif _chance(rng, annotator.where):
        if _chance(rng, annotator.with_clause):  # "a red circle with two blue squares below it"
            relation_words = _pick(rng, RELATION_WORDS[INVERSE_RELATION[ordered_relation]], annotator.plain_word)
            pronoun = "it" if len(ordered[0].objects) == 1 else "them"
            caption = f"{opening} {phrases[0]} with {phrases[1]} {relation_words} {pronoun}"
        else:
            verb = ""
            if opening == "" and _chance(rng, annotator.verb):
                verbs = VERB_WORDS["singular" if len(ordered[0].objects) == 1 else "plural"]
                verb = f" {_pick(rng, verbs, annotator.plain_word)}"
            relation_words = _pick(rng, RELATION_WORDS[ordered_relation], annotator.plain_word)
            caption = f"{opening} {phrases[0]}{verb} {relation_words} {phrases[1]}"
    else:
        caption = f"{opening} {phrases[0]} and {phrases[1]}"
    caption = caption.strip()

    if _chance(rng, annotator.background):
        caption = f"{caption} {_background_phrase(rng, annotator, tone, texture)}"
    if _chance(rng, annotator.remark):
        caption = f"{caption} , {annotator.remarks[int(rng.integers(len(annotator.remarks)))]}"
    return _ARTICLE_BEFORE_VOWEL.sub("an ", caption) + " ."


def _be(group: ObjectGroup) -> str:
    return "is" if len(group.objects) == 1 else "are"


def _noun_phrase(rng: np.random.Generator, annotator: Annotator, group: ObjectGroup, with_size: bool) -> str:
    count = len(group.objects)
    if count > 1 and _chance(rng, annotator.vague_count):
        count_word = VAGUE_COUNT_WORDS[int(rng.integers(len(VAGUE_COUNT_WORDS)))]
    else:
        count_word = _pick(rng, COUNT_WORDS[count], annotator.plain_word)
    words = [count_word]
    if with_size:
        words.append(_pick(rng, SIZE_WORDS[group.size], annotator.plain_word))
    if _chance(rng, annotator.colour):
        words.append(_pick(rng, COLOUR_WORDS[group.colour], annotator.plain_word))
    if _chance(rng, annotator.generic):
        singular, plural = GENERIC_KIND_WORDS[int(rng.integers(len(GENERIC_KIND_WORDS)))]
    else:
        singular, plural = _pick(rng, KIND_WORDS[group.kind], annotator.plain_word)
    words.append(singular if count == 1 else plural)
    return " ".join(words)


def _background_phrase(rng: np.random.Generator, annotator: Annotator, tone: str, texture: str) -> str:
    tone_word = _pick(rng, TONE_WORDS[tone], annotator.plain_word)
    if texture != "plain" and _chance(rng, annotator.texture):
        texture_word = _pick(rng, TEXTURE_WORDS[texture], annotator.plain_word)
        adjectives = f"{tone_word} {texture_word}" if _chance(rng, 0.5) else f"{texture_word} {tone_word}"
    else:
        adjectives = tone_word
    preposition, noun = _pick(rng, BACKGROUND_WORDS, annotator.plain_word)
    return f"{preposition} a {adjectives} {noun}"
