"""Tests of imgcap_hf.data.scenes: deterministic, boxes true to the pixels, captions true to the boxes, annotators
that differ.

The caption checks read the captions with their own tables of what words mean, written here independently of the
generator's, and compare what they say (counts, colours, sizes, places, relations) with the drawn boxes.
"""

import hashlib
import json
import re
from collections import Counter
from statistics import mean

import datasets
import numpy as np
import pytest

import imgcap_hf.data.scenes as scenes_module
from imgcap_hf.data import CAPTION_FEATURES, SPLITS, generate_scenes, load_caption_dataset, make_scenes_dataset
from imgcap_hf.data.scenes import ANNOTATORS, OBJECT_COLOURS

SCENES_ARGS = {"num_train": 40, "num_validation": 8, "num_test": 60, "image_size": 64, "seed": 5}


@pytest.fixture(scope="module")
def scenes():
    return generate_scenes(**SCENES_ARGS)


def all_scenes(scenes):
    return [scene for split in SPLITS for scene in scenes[split]]


def digest_of(scenes) -> str:
    """SHA-1 of every image, caption and box of the scenes."""
    digest = hashlib.sha1()
    for scene in all_scenes(scenes):
        digest.update(scene.image.tobytes())
        digest.update("|".join(scene.captions).encode())
        digest.update(json.dumps(scene.object_records()).encode())
    return digest.hexdigest()


def test_scenes_are_identical_to_the_byte_for_a_seed_and_differ_across_seeds():
    args = {"num_train": 6, "num_validation": 3, "num_test": 3, "image_size": 64, "seed": 1}
    first, again = make_scenes_dataset(**args), make_scenes_dataset(**args)
    for split in SPLITS:
        assert first[split].features == CAPTION_FEATURES
        as_bytes = [dataset[split].cast_column("image", datasets.Image(decode=False)) for dataset in (first, again)]
        assert [image["bytes"] for image in as_bytes[0]["image"]] == [image["bytes"] for image in as_bytes[1]["image"]]
        assert first[split]["captions"][:] == again[split]["captions"][:]
    other_seed = generate_scenes(**{**args, "seed": 2})
    assert digest_of(other_seed) != digest_of(generate_scenes(**args))


def test_scenes_match_the_pinned_digest():
    """Same seed, same data in every process and on every machine: no hash or set order, clock or global RNG
    decides anything (pytest runs each session under a new PYTHONHASHSEED).

    If the generator is changed on purpose, update the digest and the human-agreement figures in the README.
    """
    scenes = generate_scenes(num_train=4, num_validation=2, num_test=4, image_size=64, seed=0)
    assert digest_of(scenes) == "fcc4ba6824a645825729d08c0ae30d576261f5cb"


def test_scenes_have_the_asked_sizes_five_distinct_captions_and_share_no_image(scenes):
    assert {split: len(scenes[split]) for split in SPLITS} == {"train": 40, "validation": 8, "test": 60}
    fingerprints = [hashlib.sha1(scene.image.tobytes()).digest() for scene in all_scenes(scenes)]
    assert len(set(fingerprints)) == len(fingerprints)
    for scene in all_scenes(scenes):
        assert len(scene.captions) == len(ANNOTATORS) == 5
        assert len(set(scene.captions)) == 5, scene.captions
        assert all(caption == caption.lower() and caption.endswith(" .") for caption in scene.captions)


def test_an_annotator_whose_caption_repeats_an_earlier_one_writes_again(monkeypatch):
    """Five copies of the terse annotator often write the same caption; the five kept must still be distinct."""
    monkeypatch.setattr(scenes_module, "ANNOTATORS", (ANNOTATORS[0],) * 5)
    for scene in generate_scenes(num_train=0, num_validation=0, num_test=30, seed=1)["test"]:
        assert len(set(scene.captions)) == 5, scene.captions


def test_the_loader_knows_scenes_by_name():
    splits, report = load_caption_dataset(
        "scenes", shapes_kwargs={"num_train": 3, "num_validation": 2, "num_test": 2, "seed": 5}
    )
    assert report.layout == "scenes" and {split: splits[split].num_rows for split in SPLITS} == {
        "train": 3,
        "validation": 2,
        "test": 2,
    }
    assert splits["train"]["captions"][:] == [
        list(scene.captions) for scene in generate_scenes(3, 2, 2, seed=5)["train"]
    ]
    with pytest.raises(ValueError, match="karpathy_json"):
        load_caption_dataset("scenes", karpathy_json="dataset_flickr30k.json")


def test_every_box_is_inside_the_image_and_is_the_box_of_its_drawn_pixels(scenes):
    size = SCENES_ARGS["image_size"]
    for scene in all_scenes(scenes):
        pixels = np.asarray(scene.image)
        records = scene.object_records()
        assert len(records) == sum(len(group.objects) for group in scene.groups)
        for colour in {record["colour"] for record in records}:
            painted = np.all(pixels == OBJECT_COLOURS[colour], axis=-1)
            inside_a_box = np.zeros_like(painted)
            for record in records:
                if record["colour"] != colour:
                    continue
                left, top, right, bottom = record["box"]
                assert 0 <= left < right <= size and 0 <= top < bottom <= size, record
                # The box is tight: its painted pixels touch all four edges, and a one-pixel frame around it is bare.
                framed = painted[max(top - 1, 0) : bottom + 1, max(left - 1, 0) : right + 1].copy()
                rows, columns = np.nonzero(framed)
                offset_top, offset_left = top - max(top - 1, 0), left - max(left - 1, 0)
                assert (rows.min(), columns.min()) == (offset_top, offset_left), record
                assert (rows.max() + 1, columns.max() + 1) == (offset_top + bottom - top, offset_left + right - left)
                inside_a_box[top:bottom, left:right] = True
            assert not np.any(painted & ~inside_a_box), f"{colour} pixels outside every {colour} box"


# ---------------------------------------------------------------------------------------------------------------------
# What the captions say, read with this file's own tables
# ---------------------------------------------------------------------------------------------------------------------

NOUN_KIND = {
    "circle": "circle", "dot": "circle", "disc": "circle", "ball": "circle",
    "square": "square", "box": "square", "block": "square",
    "triangle": "triangle", "triangular shape": "triangle",
    "diamond": "diamond", "rhombus": "diamond",
    "cross": "cross", "plus sign": "cross", "plus": "cross",
    "star": "star",
}  # fmt: skip
PLURALS = {"box": "boxes", "cross": "crosses", "rhombus": "rhombuses", "plus": "pluses"}
GENERIC_NOUNS = ("shape", "object", "figure")  # a group named without its kind: "two black shapes"
COLOUR_MEANING = {
    "red": "red", "bright red": "red", "green": "green", "dark green": "green", "blue": "blue", "dark blue": "blue",
    "yellow": "yellow", "golden": "yellow", "purple": "purple", "violet": "purple", "orange": "orange",
    "pink": "pink", "magenta": "pink", "black": "black",
}  # fmt: skip
SIZE_MEANING = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large"}
COUNT_MEANING = {"a": 1, "an": 1, "one": 1, "a single": 1, "two": 2, "2": 2, "a pair of": 2, "three": 3, "3": 3}
COUNT_MEANING |= {"four": 4, "4": 4, "some": "2+", "several": "2+", "a few": "2+"}
TOTAL_MEANING = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6}
ADJECTIVE_WORDS = sorted({*COLOUR_MEANING, *SIZE_MEANING}, key=len, reverse=True)
NOUNS = sorted(
    [*NOUN_KIND, *GENERIC_NOUNS, *(PLURALS.get(noun, noun + "s") for noun in [*NOUN_KIND, *GENERIC_NOUNS])],
    key=len,
    reverse=True,
)


def alternation(words) -> str:
    return "|".join(re.escape(word) for word in sorted(words, key=len, reverse=True))


NOUN_PHRASE = re.compile(
    rf"\b(?P<count>{alternation(COUNT_MEANING)}) (?P<adjectives>(?:(?:{alternation(ADJECTIVE_WORDS)}) )*)"
    rf"(?P<noun>{alternation(NOUNS)})\b"
)
TOTAL_OPENING = re.compile(rf"^(?P<total>{alternation(TOTAL_MEANING)}) (?:shapes|objects) : ")
# Where the subject (the first-named group) lies relative to the object: a test of their boxes.
RELATION_MEANING = {
    "above": "above", "over": "above", "on top of": "above",
    "below": "below", "under": "below", "beneath": "below",
    "to the left of": "left", "left of": "left", "to the right of": "right", "right of": "right",
    "next to": "beside", "beside": "beside",
}  # fmt: skip
VERBS = ("is placed", "are placed", "is", "are", "sits", "sit", "appears", "appear")
BETWEEN_PHRASES = re.compile(rf"^(?:(?:{alternation(VERBS)}) )?(?P<relation>{alternation(RELATION_MEANING)})$")
WITH_CLAUSE = re.compile(rf"^ (?P<relation>{alternation(RELATION_MEANING)}) (?:it|them)\b")
REGION_MEANING = {
    "left": "left", "right": "right", "top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom",
    "below": "bottom", "center": "center", "centre": "center", "middle": "center", "centered": "center",
}  # fmt: skip


def kind_of(noun: str) -> str | None:
    """The kind a noun names, None for a generic noun ("shapes")."""
    singular = {PLURALS.get(word, word + "s"): word for word in NOUN_KIND}.get(noun, noun)
    return None if singular.removesuffix("s") in GENERIC_NOUNS else NOUN_KIND[singular]


def boxes_of(group) -> np.ndarray:
    return np.array([item.box for item in group.objects])  # (objects, 4): left, top, right, bottom


def holds(relation: str, subject, other) -> bool:
    (s_left, s_top, s_right, s_bottom), (o_left, o_top, o_right, o_bottom) = (
        (boxes[:, 0].min(), boxes[:, 1].min(), boxes[:, 2].max(), boxes[:, 3].max())
        for boxes in (boxes_of(subject), boxes_of(other))
    )
    return {
        "above": s_bottom <= o_top,
        "below": o_bottom <= s_top,
        "left": s_right <= o_left,
        "right": o_right <= s_left,
        "beside": s_right <= o_left or o_right <= s_left,
    }[relation]


def region_holds(region: str, group, size: int) -> bool:
    boxes = boxes_of(group)
    left, top, right, bottom = boxes[:, 0].min(), boxes[:, 1].min(), boxes[:, 2].max(), boxes[:, 3].max()
    return {
        "left": right <= size / 2,
        "right": left >= size / 2,
        "top": bottom <= size / 2,
        "bottom": top >= size / 2,
        "center": left >= 0.2 * size and right <= 0.8 * size and top >= 0.2 * size and bottom <= 0.8 * size,
    }[region]


def read_caption(caption: str, scene):
    """The groups a caption names, in order, each checked against its drawn group. A kind word names the group of
    that kind; a generic noun ("two black shapes") one the caption names no other way and whose count, colour and
    size it fits (the first of them, when two fit)."""
    by_kind = {group.kind: group for group in scene.groups}
    phrases = list(
        NOUN_PHRASE.finditer(caption, TOTAL_OPENING.match(caption).end() if TOTAL_OPENING.match(caption) else 0)
    )
    named_kinds = {kind_of(match["noun"]) for match in phrases}
    mentions = []
    for match in phrases:
        kind = kind_of(match["noun"])
        if kind is not None:
            group = by_kind[kind]  # a KeyError: the caption names a kind that is not drawn
            assert fits(match, group), (caption, group)
        else:
            unnamed = [group for group in scene.groups if group.kind not in named_kinds] or list(scene.groups)
            fitting = [group for group in unnamed if fits(match, group)]
            assert fitting, (caption, "a generic noun that fits no drawn group")
            group = fitting[0]
        singular_noun = match["noun"] in NOUN_KIND or match["noun"] in GENERIC_NOUNS
        assert singular_noun == (len(group.objects) == 1), (caption, "singular/plural")
        mentions.append((match, group))
    return mentions


def fits(match: re.Match, group) -> bool:
    """Whether a noun phrase's count, colour and size words are true of a drawn group."""
    count = COUNT_MEANING[match["count"]]
    if not (count == len(group.objects) or (count == "2+" and len(group.objects) >= 2)):
        return False
    adjectives = match["adjectives"]
    for word, colour in COLOUR_MEANING.items():
        if re.search(rf"(?<!bright )(?<!dark )\b{word}\b", adjectives) and colour != group.colour:
            return False
    return not any(re.search(rf"\b{word}\b", adjectives) and size != group.size for word, size in SIZE_MEANING.items())


def test_counts_colours_and_sizes_in_captions_are_those_drawn(scenes):
    tally = Counter()
    for scene in all_scenes(scenes):
        for caption in scene.captions:
            mentions = read_caption(caption, scene)
            assert mentions, caption
            tally["mentions"] += len(mentions)
            tally["counted"] += sum(isinstance(COUNT_MEANING[match["count"]], int) for match, _ in mentions)
            opening = TOTAL_OPENING.match(caption)
            if opening:
                assert TOTAL_MEANING[opening["total"]] == sum(len(group.objects) for group in scene.groups), caption
                tally["totals"] += 1
    assert tally["counted"] > 0.8 * tally["mentions"] and tally["totals"] > 20, tally


def test_relations_and_places_in_captions_are_true_of_the_boxes(scenes):
    size = SCENES_ARGS["image_size"]
    tally = Counter()
    for scene in all_scenes(scenes):
        for caption in scene.captions:
            mentions = read_caption(caption, scene)
            if len(scene.groups) == 1:
                for word, region in REGION_MEANING.items():
                    if re.search(rf"\b{word}\b", caption):
                        assert region_holds(region, scene.groups[0], size), (caption, scene.object_records())
                        tally["places"] += 1
                continue
            if len(mentions) != 2:
                continue
            (first, subject), (second, other) = mentions
            between = caption[first.end() : second.start()].strip()
            relation = BETWEEN_PHRASES.match(between)
            if relation:
                assert holds(RELATION_MEANING[relation["relation"]], subject, other), caption
                tally["relations"] += 1
            elif between == "with":  # "a red circle with two blue squares below it": the second relative to the first
                clause = WITH_CLAUSE.match(caption[second.end() :])
                assert holds(RELATION_MEANING[clause["relation"]], other, subject), caption
                tally["with clauses"] += 1
            else:
                assert between == "and", caption
    assert tally["places"] > 50 and tally["relations"] > 100 and tally["with clauses"] > 5, tally


def test_the_annotators_differ_in_length_order_and_word_choice(scenes):
    test_scenes = scenes["test"]
    words_per_caption = [mean(len(scene.captions[k].split()) for scene in test_scenes) for k in range(5)]
    terse, thorough = words_per_caption[0], words_per_caption[1]
    assert thorough > 1.8 * terse, words_per_caption

    # Word choice: the five captions of an image often name the same drawn kind with different words, and every
    # annotator uses more than one word for some kind over the set (each picks a synonym per image).
    varied_images, nouns_by_annotator = 0, [set() for _ in range(5)]
    for scene in test_scenes:
        nouns = set()
        for k, caption in enumerate(scene.captions):
            for match, group in read_caption(caption, scene):
                if group is scene.groups[0]:
                    nouns.add(match["noun"].removesuffix("s").removesuffix("e"))
                nouns_by_annotator[k].add((group.kind, match["noun"]))
        varied_images += len(nouns) > 1
    assert varied_images > 0.4 * len(test_scenes), varied_images
    for k, nouns in enumerate(nouns_by_annotator):
        kinds = Counter(kind for kind, _ in nouns)
        assert max(kinds.values()) > 1, (ANNOTATORS[k].name, nouns)

    # Order: with two groups, annotators disagree on which one to name first.
    disagreeing = [
        len({read_caption(caption, scene)[0][1].kind for caption in scene.captions}) > 1
        for scene in test_scenes
        if len(scene.groups) == 2
    ]
    assert mean(disagreeing) > 0.4, disagreeing

    # What they mention: the background, sizes and places are said by some annotators only.
    said_background = [
        mean("background" in scene.captions[k] or "backdrop" in scene.captions[k] for scene in test_scenes)
        for k in range(5)
    ]
    assert min(said_background) < 0.15 and max(said_background) > 0.6, said_background


def test_scenes_reject_impossible_arguments():
    with pytest.raises(ValueError, match="image_size"):
        generate_scenes(image_size=32)
    with pytest.raises(ValueError, match="non-negative"):
        generate_scenes(num_test=-1)
