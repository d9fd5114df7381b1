"""Human agreement of the scenes set as COCO reports it, and the same computation on real Flickr30k captions.

    python benchmarks/human_agreement.py                    # scenes test split; Flickr30k where ../shared/data exists
    python benchmarks/human_agreement.py --json agreement.json

A model's caption is scored against an image's references; the yardstick is how well one human caption of the same
image scores against the others. COCO's protocol: each annotator's caption against the other four, with
coco-caption BLEU-4 and CIDEr-D (`imgcap_hf.scoring.compute_caption_metrics`, one call per annotator over the whole
test split, so that CIDEr-D's document frequencies come from the scored references), averaged over the annotators.

Flickr30k's real captions in ../shared/data (15,892 captions, no images) hold five captions for only one image and
two or more for about 2,600, so the four-reference protocol cannot run on them. Both sets are therefore also scored
pairwise: one caption against one other caption of its image (scenes: every ordered pair of annotators; Flickr30k:
the first two captions of each image with two or more, both ways round), averaged. This one-reference figure is the
like-for-like comparison of the two sets; it is lower than the four-reference one, since BLEU and CIDEr-D reward
matching any of the references.

A last row scores, against all five references, a caption written from each scene's ground truth in the plainest
words and one fixed phrasing ("there are two small black diamonds above a large purple circle ."): what a perfect
recogniser that always words its captions this way would score, the ceiling a model is read against besides the
annotators' agreement.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from itertools import permutations
from pathlib import Path
from statistics import mean

from imgcap_hf.data.scenes import (
    ANNOTATORS,
    COLOUR_WORDS,
    COUNT_WORDS,
    KIND_WORDS,
    REGION_WORDS,
    RELATION_WORDS,
    SIZE_WORDS,
    generate_scenes,
)
from imgcap_hf.scoring import compute_caption_metrics

FLICKR_CSV = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr30k_captions_sample.csv"
SCORE_KEYS = ("bleu_1", "bleu_4", "cider", "rouge_l")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_test", type=int, default=300, help="Test images of the scenes set (its default).")
    parser.add_argument("--image_size", type=int, default=64, help="Side the scenes are drawn at (its default).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the scenes set (its default).")
    parser.add_argument("--tokenizer", default="auto", help="Caption tokenizer: auto, ptb-java or python.")
    parser.add_argument("--flickr_csv", type=Path, default=FLICKR_CSV, help="Kaggle-layout Flickr30k captions.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures here.")
    return parser.parse_args(argv)


def score(predictions: list[str], references: list[list[str]], tokenizer: str) -> dict[str, float]:
    scores = compute_caption_metrics(predictions, references, include_meteor=False, tokenizer=tokenizer)
    return {key: float(scores[key]) for key in SCORE_KEYS}


def averaged(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: mean(run[key] for run in runs) for key in SCORE_KEYS}


def leave_one_out_agreement(captions: list[list[str]], tokenizer: str) -> tuple[dict[str, float], list[dict]]:
    """COCO's human agreement: caption k of each image against the image's others, for each k, then the mean."""
    per_annotator = [
        score(
            [image_captions[k] for image_captions in captions],
            [image_captions[:k] + image_captions[k + 1 :] for image_captions in captions],
            tokenizer,
        )
        for k in range(len(captions[0]))
    ]
    return averaged(per_annotator), per_annotator


def pairwise_agreement(pairs_by_order: list[tuple[list[str], list[str]]], tokenizer: str) -> dict[str, float]:
    """One caption against one reference, per image; one scoring call per (candidate, reference) assignment."""
    return averaged(
        [
            score(candidates, [[reference] for reference in references], tokenizer)
            for candidates, references in pairs_by_order
        ]
    )


def ground_truth_caption(scene) -> str:
    """The scene in the plain word of each table, every group with its count, size and colour, then its place or the
    two groups' relation: "there are two small black diamonds above a large purple circle ."."""
    phrases = []
    for group in scene.groups:
        count = len(group.objects)
        singular, plural = KIND_WORDS[group.kind][0]
        count_word = COUNT_WORDS[count][0]
        size_word, colour_word = SIZE_WORDS[group.size][0], COLOUR_WORDS[group.colour][0]
        phrases.append(f"{count_word} {size_word} {colour_word} {singular if count == 1 else plural}")
    if len(phrases) == 1:
        body = f"{phrases[0]} {REGION_WORDS[scene.region][0]}"
    else:
        body = f"{phrases[0]} {RELATION_WORDS[scene.relation][0]} {phrases[1]}"
    verb = "is" if len(scene.groups[0].objects) == 1 else "are"
    return f"there {verb} {body} ."


def read_flickr_captions(path: Path) -> list[list[str]]:
    """The captions of each image of the Kaggle-layout CSV (`image_name`, `comment_number`, `comment`), in
    comment-number order, for the images with two or more."""
    by_image: dict[str, list[tuple[int, str]]] = defaultdict(list)
    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle, skipinitialspace=True):
            fields = {key.strip(): value for key, value in row.items() if key is not None}
            caption = (fields.get("comment") or "").strip()
            if caption:
                by_image[fields["image_name"].strip()].append((int(fields["comment_number"]), caption))
    return [[caption for _, caption in sorted(captions)] for captions in by_image.values() if len(captions) >= 2]


def format_row(name: str, scores: dict[str, float]) -> str:
    return f"{name:<44}" + "".join(f"{scores[key]:>9.3f}" for key in SCORE_KEYS)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    scenes = generate_scenes(
        num_train=0, num_validation=0, num_test=args.num_test, image_size=args.image_size, seed=args.seed
    )["test"]
    scene_captions = [list(scene.captions) for scene in scenes]
    report: dict = {"scenes": {"num_images": len(scene_captions)}}
    print(f"{'':<44}" + "".join(f"{key:>9}" for key in SCORE_KEYS))

    coco, per_annotator = leave_one_out_agreement(scene_captions, args.tokenizer)
    report["scenes"]["leave_one_out"] = coco
    report["scenes"]["per_annotator"] = dict(zip((annotator.name for annotator in ANNOTATORS), per_annotator))
    for annotator, scores in zip(ANNOTATORS, per_annotator):
        print(format_row(f"scenes, {annotator.name} vs the other four", scores))
    print(format_row(f"scenes, 4 references (COCO protocol), {len(scenes)} img", coco))
    ordered_pairs = [
        ([captions[i] for captions in scene_captions], [captions[j] for captions in scene_captions])
        for i, j in permutations(range(len(ANNOTATORS)), 2)
    ]
    report["scenes"]["pairwise"] = pairwise_agreement(ordered_pairs, args.tokenizer)
    print(format_row("scenes, 1 reference (pairwise)", report["scenes"]["pairwise"]))

    written = [ground_truth_caption(scene) for scene in scenes]
    report["scenes"]["ground_truth_caption"] = score(written, scene_captions, args.tokenizer)
    print(format_row("scenes, the ground truth written plainly, 5 refs", report["scenes"]["ground_truth_caption"]))

    if args.flickr_csv.is_file():
        flickr = read_flickr_captions(args.flickr_csv)
        first, second = [captions[0] for captions in flickr], [captions[1] for captions in flickr]
        report["flickr30k"] = {
            "num_images": len(flickr),
            "pairwise": pairwise_agreement([(first, second), (second, first)], args.tokenizer),
        }
        print(format_row(f"flickr30k, 1 reference (pairwise), {len(flickr)} img", report["flickr30k"]["pairwise"]))
    else:
        print(f"Flickr30k skipped: {args.flickr_csv} is absent (it is in the project workspace's ../shared/data).")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
