"""Tests of imgcap_hf.data.shapes: the synthetic set is deterministic, its splits disjoint, its captions true."""

import hashlib
import json
import re
import subprocess
import sys

import datasets
import numpy as np
import pytest
from datasets import Dataset
from PIL import Image

from imgcap_hf.data import CAPTION_FEATURES, SPLITS, generate_shapes_scenes, make_shapes_dataset, write_shapes_examples
from imgcap_hf.data.shapes import BACKGROUND_COLOURS

SHAPES_ARGS = {"num_train": 60, "num_validation": 12, "num_test": 12, "image_size": 64, "seed": 3}


def image_bytes(dataset: Dataset) -> list[bytes]:
    return [image["bytes"] for image in dataset.cast_column("image", datasets.Image(decode=False))["image"]]


@pytest.fixture(scope="module")
def shapes() -> datasets.DatasetDict:
    return make_shapes_dataset(**SHAPES_ARGS)


def test_shapes_are_identical_to_the_byte_for_a_seed_and_differ_across_seeds(shapes):
    again = make_shapes_dataset(**SHAPES_ARGS)
    for split in SPLITS:
        assert image_bytes(again[split]) == image_bytes(shapes[split])
        assert again[split]["captions"][:] == shapes[split]["captions"][:]
        assert again[split]["image_id"][:] == shapes[split]["image_id"][:]
    other_seed = make_shapes_dataset(**{**SHAPES_ARGS, "seed": 4})
    assert image_bytes(other_seed["test"]) != image_bytes(shapes["test"])


def test_shapes_pixels_and_captions_match_the_pinned_digest():
    """Same seed, same data in every process and on every machine: no Python hash order, clock or global RNG.

    If the generator is changed on purpose, update the digest (models trained on the old shapes stay valid).
    """
    scenes = generate_shapes_scenes(num_train=5, num_validation=5, num_test=5, image_size=64, seed=0)
    digest = hashlib.sha1()
    for split in SPLITS:
        for scene in scenes[split]:
            digest.update(scene.image.tobytes())
            digest.update("|".join(scene.captions).encode())
    assert digest.hexdigest() == "8400b84ba1478712a51774ef069f09d7ddad395a"


def test_shapes_splits_have_the_asked_sizes_five_distinct_captions_and_the_shared_schema(shapes):
    assert {split: shapes[split].num_rows for split in SPLITS} == {"train": 60, "validation": 12, "test": 12}
    for split in SPLITS:
        assert shapes[split].features == CAPTION_FEATURES
        for captions in shapes[split]["captions"]:
            assert len(set(captions)) == 5
            assert all(caption == caption.lower() and caption.endswith(" .") for caption in captions)
    image = shapes["train"][0]["image"]
    assert isinstance(image, Image.Image) and image.size == (64, 64) and image.mode == "RGB"


def test_shapes_splits_share_no_image(shapes):
    fingerprints = [hashlib.sha1(content).hexdigest() for split in SPLITS for content in image_bytes(shapes[split])]
    assert len(set(fingerprints)) == len(fingerprints) == 84
    ids = [image_id for split in SPLITS for image_id in shapes[split]["image_id"]]
    assert len(set(ids)) == len(ids)


# What caption words mean, written here independently of the generator's tables. Positions are the shape centre
# as fractions of the image side, sizes the radius as a fraction of the side.
COLOUR_MEANING = {
    "red": lambda r, g, b: r > 150 and g < 100 and b < 100,
    "green": lambda r, g, b: g > 120 and r < 100 and b < 100,
    "blue": lambda r, g, b: b > 150 and r < 100 and g < 100,
    "yellow": lambda r, g, b: r > 200 and g > 150 and b < 100,
    "purple": lambda r, g, b: r > 100 and b > 100 and g < 100,
    "orange": lambda r, g, b: r > 200 and 80 < g < 180 and b < 80,
}
POSITION_MEANING = {
    "left": lambda x, y: x < 0.35,
    "right": lambda x, y: x > 0.65,
    "top": lambda x, y: y < 0.35,
    "bottom": lambda x, y: y > 0.65,
    "center": lambda x, y: 0.4 < x < 0.6 and 0.4 < y < 0.6,
    "middle": lambda x, y: 0.4 < x < 0.6 and 0.4 < y < 0.6,
}
SIZE_MEANING = {
    "small": lambda radius: radius < 0.11,
    "little": lambda radius: radius < 0.11,
    "large": lambda radius: radius > 0.15,
    "big": lambda radius: radius > 0.15,
}
RELATION_MEANING = {
    "to the left of": lambda subject, other: subject[0] < other[0],
    "to the right of": lambda subject, other: subject[0] > other[0],
    "above": lambda subject, other: subject[1] < other[1],
    "below": lambda subject, other: subject[1] > other[1],
}
RELATION_CAPTION = re.compile(
    r"(?:(\w+) )?(\w+) (\w+)(?: is)? (" + "|".join(RELATION_MEANING) + r") (?:a|an|the) (?:(\w+) )?(\w+) (\w+) \."
)


def kind_seen_in_pixels(image: Image.Image, background: str) -> str:
    """Tell the kind of a lone shape from its mask: how much of its bounding box it fills, and its outline."""
    pixels = np.asarray(image).astype(int)
    mask = np.any(pixels != BACKGROUND_COLOURS[background], axis=-1)
    rows, columns = np.nonzero(mask)
    box = mask[rows.min() : rows.max() + 1, columns.min() : columns.max() + 1]
    row_widths = box.sum(axis=1)
    if box.mean() > 0.9:
        return "square"
    if row_widths[0] < 0.5 * row_widths[-1]:
        return "triangle"
    return "cross" if box.mean() < 0.7 else "circle"


def test_shapes_captions_say_what_the_pixels_show(shapes):
    size = SHAPES_ARGS["image_size"]
    scenes = generate_shapes_scenes(**SHAPES_ARGS)
    counts = {"single": 0, "pair": 0, "relation captions": 0}
    for split in SPLITS:
        assert [list(scene.captions) for scene in scenes[split]] == shapes[split]["captions"][:]
        for scene in scenes[split]:
            pixels = np.asarray(scene.image)
            for shape in scene.shapes:
                x, y = (round(coordinate) for coordinate in shape.center)
                assert COLOUR_MEANING[shape.colour](*pixels[y, x].tolist()), (shape, pixels[y, x])
                assert SIZE_MEANING[shape.size](shape.radius / size), shape
                for caption in scene.captions:
                    assert f"{shape.colour} {shape.kind}" in caption, caption
            if len(scene.shapes) == 1:
                counts["single"] += 1
                (shape,) = scene.shapes
                assert kind_seen_in_pixels(scene.image, scene.background) == shape.kind
                centre = (shape.center[0] / size, shape.center[1] / size)
                for caption in scene.captions:
                    words = caption.split()
                    assert [word for word in words if word in POSITION_MEANING], caption
                    assert all(POSITION_MEANING[word](*centre) for word in words if word in POSITION_MEANING)
                    assert all(SIZE_MEANING[word](shape.radius / size) for word in words if word in SIZE_MEANING)
                continue
            counts["pair"] += 1
            first, second = scene.shapes
            axis = 0 if first.position == "left" else 1
            assert first.center[axis] + first.radius < second.center[axis] - second.radius  # apart, in this order
            by_name = {(shape.colour, shape.kind): shape for shape in scene.shapes}
            for caption in scene.captions:
                match = RELATION_CAPTION.search(caption)
                if match is None:
                    continue
                counts["relation captions"] += 1
                subject, other = by_name[match[2], match[3]], by_name[match[6], match[7]]
                assert subject is not other
                assert RELATION_MEANING[match[4]](subject.center, other.center), caption
                for size_word, shape in [(match[1], subject), (match[5], other)]:
                    assert size_word not in SIZE_MEANING or SIZE_MEANING[size_word](shape.radius / size), caption
    assert counts["single"] > 10 and counts["pair"] > 10 and counts["relation captions"] > 40


def test_write_shapes_examples_writes_the_first_test_images(tmp_path, shapes):
    paths = write_shapes_examples(tmp_path / "examples", count=3, image_size=64, seed=SHAPES_ARGS["seed"])
    assert [path.name for path in paths] == ["shapes_test_00.png", "shapes_test_01.png", "shapes_test_02.png"]
    assert [path.read_bytes() for path in paths] == image_bytes(shapes["test"])[:3]


def test_shapes_reject_impossible_arguments():
    with pytest.raises(ValueError, match="image_size"):
        make_shapes_dataset(image_size=16)
    with pytest.raises(ValueError, match="non-negative"):
        make_shapes_dataset(num_train=-1)


def test_writing_the_example_images_loads_neither_datasets_nor_the_other_sources(tmp_path):
    """The demo app imports `imgcap_hf.data.shapes` for its example images; that must not load the data stack."""
    script = (
        "import json, sys\n"
        "from imgcap_hf.data.shapes import write_shapes_examples\n"
        "from imgcap_hf.data import write_shapes_examples as through_the_package\n"
        f"through_the_package({str(tmp_path)!r}, count=1)\n"
        "print(json.dumps(sorted(name for name in sys.modules if name.split('.')[0] == 'datasets'\n"
        "                        or name.startswith('imgcap_hf.data.'))))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(result.stdout.splitlines()[-1]) == ["imgcap_hf.data.shapes", "imgcap_hf.data.splits"]
    assert [path.name for path in tmp_path.iterdir()] == ["shapes_test_00.png"]
