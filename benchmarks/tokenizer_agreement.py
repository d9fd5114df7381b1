"""How closely our Python caption tokenizer agrees with coco-caption's Java tokenizer, and what that does to scores.

    python benchmarks/tokenizer_agreement.py                 # needs `java` and ../shared/data (the project workspace)
    python benchmarks/tokenizer_agreement.py --json agreement.json

Three sets of captions go through both tokenizers (`imgcap_hf.scoring.java_tokenize`, one JVM per set, and
`imgcap_hf.scoring.python_tokenize`): the 15,892 human Flickr30k captions and the 1,000 machine captions of
coco-caption's demo in ../shared/data, and a seeded set of hostile strings, one kind of difficulty each. For the
hostile set the report lists, per kind, how many strings the two tokenizers split differently, with examples. Then
both pipelines score the Flickr30k corpus (each image's first caption against the others, and the next image's
first caption as a mismatched candidate) and the largest difference of BLEU-1..4, CIDEr-D and ROUGE-L is reported.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
from collections import defaultdict
from pathlib import Path

from imgcap_hf.scoring import compute_caption_metrics, java_available, java_tokenize, python_tokenize

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FLICKR_CSV = SHARED_DATA / "flickr30k_captions_sample.csv"
COCO_JSON = SHARED_DATA / "coco_fakecap_results.json"
SCORE_KEYS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "cider", "rouge_l")

_SUBJECTS = ["A man", "Two dogs", "The girl", "A woman", "Some kids", "An old car", "The team", "A bird"]
_VERBS = ["runs", "is sitting", "jumps", "plays", "stands", "waits", "looks up", "rides"]
_PLACES = ["on the grass", "near the lake", "in a park", "at the beach", "by the road", "in the snow"]
_EMOJI_RANGES = [(0x1F300, 0x1F5FF), (0x1F600, 0x1F64F), (0x1F680, 0x1F6FF), (0x1F900, 0x1F9FF), (0x2600, 0x26FF)]
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(2, 7)))


def _number(rng: random.Random) -> str:
    forms = [
        lambda: f"{rng.randint(1, 999)},{rng.randint(0, 999):03d}",
        lambda: f"{rng.randint(0, 99)}.{rng.randint(0, 99)}",
        lambda: f"${rng.randint(1, 99)}.{rng.randint(0, 99):02d}",
        lambda: f"{rng.randint(1, 100)}%",
        lambda: f"{rng.randint(1, 12)}:{rng.randint(0, 59):02d}",
        lambda: f"{rng.randint(1, 12)}:{rng.randint(0, 59):02d}{rng.choice(['am', 'pm'])}",
        lambda: f"{rng.randint(1, 9)}/{rng.randint(2, 9)}",
        lambda: f"{rng.randint(1, 31)}{rng.choice(['st', 'nd', 'rd', 'th'])}",
        lambda: f"{rng.randint(0, 9)}.{rng.randint(0, 9)}.{rng.randint(0, 9)}",
        lambda: f"#{rng.randint(1, 99)}",
        lambda: f"{rng.randint(1, 9)}'{rng.randint(0, 11)}\"",
        lambda: f"-{rng.randint(1, 99)}",
        lambda: f"{rng.randint(1, 99)}.",
        lambda: f"{rng.randint(1, 9)}-{rng.randint(1, 99)}",
    ]
    return rng.choice(forms)()


# Each kind makes one hostile fragment; a caption holds one fragment, so every difference has one kind.
HOSTILE_KINDS = {
    "quotes": lambda rng: rng.choice(
        ['"{w}"', "'{w}'", "“{w}”", "‘{w}’", "«{w}»", "`{w}'", "``{w}''", '"{w}."', "'{w},'"]
    ),
    "apostrophes": lambda rng: rng.choice(
        [
            "{w}'s",
            "{w}s'",
            "{W}'S",
            "can't",
            "WON'T",
            "{w}n't",
            "they're",
            "I'd've",
            "y'all",
            "o'clock",
            "rock'n'roll",
            "'tis",
            "'90s",
            "{w}’s",
            "don’t",
            "'em",
            "ma'am",
            "{w}'ll",
            "{w}'",
        ]
    ),  # fmt: skip
    "hyphens": lambda rng: rng.choice(
        [
            "{w}-{w}",
            "{w} - {w}",
            "{w}--{w}",
            "{w} --- {w}",
            "{w}-",
            "-{w}",
            "{w} — {w}",
            "{w}–{w}",
            "3-year-old",
            "x-ray",
            "{w}-{w}-{w}",
            "- -",
            "{w}‐{w}",
        ]
    ),  # fmt: skip
    "numbers": lambda rng: _number(rng),
    "ellipses": lambda rng: rng.choice(
        ["{w}...", "...{w}", "{w}....", "{w}..", "{w}…", ". . .", "{w} ... {w}", "..."]
    ),
    "parentheses": lambda rng: rng.choice(
        ["({w})", "[{w}]", "{{{w}}}", "({w}.)", "(({w}))", "<{w}>", "{w}(s)", "( {w} )", ":)", ";-)", "({w}"]
    ),
    "ampersands": lambda rng: rng.choice(["AT&T", "{W}&{W}", "{w} & {w}", "{w}&{w}", "&amp;", "&&", "&c", "& {w}"]),
    "urls": lambda rng: rng.choice(
        [
            "http://{w}.com",
            "https://www.{w}.org/{w}?q={w}",
            "www.{w}.com",
            "{w}@{w}.com",
            "{w}.com",
            "(www.{w}.net)",
            "http://{w}.com.",
            "ftp://{w}.org",
        ]
    ),  # fmt: skip
    "emoji": lambda rng: rng.choice(
        ["{e}", "{w}{e}", "{e}{e}", "{e} {w}", "{w}{e}{w}", "❤", "★", "👍🏽", "👨‍👩‍👧", "🇫🇷"]
    ),
    "non-ascii letters": lambda rng: rng.choice(
        [
            "café",
            "naïve",
            "Zürich",
            "Straße",
            "Ελληνικά",
            "русский",
            "中文",
            "العربية",
            "ﬁsh",
            "e\u0301cole",
            "İstanbul",
            "ǅemal",
            "ÆSIR",
            "smörgåsbord",
            "Ĳssel",
        ]
    ),  # fmt: skip
    "repeated punctuation": lambda rng: rng.choice(
        ["{w}!!!", "{w}???", "{w}?!", "{w},,", "{w};;", "{w}::", "{w}!?!?", "{w}.?!", "!!!", "{w} ,, {w}", "{w}!."]
    ),
}


def hostile_captions(count_per_kind: int = 100, seed: int = 0) -> list[tuple[str, str]]:
    """`(kind, caption)` pairs: ordinary caption words with one hostile fragment of `kind`, seeded."""
    rng = random.Random(seed)
    captions = []
    for kind, fragment in HOSTILE_KINDS.items():
        for _ in range(count_per_kind):
            low, high = rng.choice(_EMOJI_RANGES)
            text = fragment(rng).format(w=_word(rng), W=_word(rng).upper(), e=chr(rng.randint(low, high)))
            subject, verb, place = rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_PLACES)
            where = rng.randrange(3)
            parts = [subject, verb, place]
            parts.insert(where if where < 2 else 3, text)
            captions.append((kind, " ".join(parts) + rng.choice(["", " .", ".", "!"])))
    return captions


def read_flickr_captions() -> dict[str, list[str]]:
    """The shared Flickr30k captions grouped by image, in file order."""
    by_image = defaultdict(list)
    with FLICKR_CSV.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle, skipinitialspace=True):
            if row.get("comment"):
                by_image[row["image_name"]].append(row["comment"].strip())
    return dict(by_image)


def read_coco_captions() -> list[str]:
    return [entry["caption"] for entry in json.loads(COCO_JSON.read_text(encoding="utf-8"))]


def agreement(captions: list[str]) -> tuple[int, list[tuple[str, str, str]]]:
    """How many captions both tokenizers turn into the same tokens, and `(caption, java, python)` for the others."""
    pairs = zip(captions, java_tokenize(captions), map(python_tokenize, captions))
    differing = [(caption, java, python) for caption, java, python in pairs if java != python]
    return len(captions) - len(differing), differing


def score_differences(by_image: dict[str, list[str]]) -> dict[str, float]:
    """Largest |Java - Python| of each score over two candidate sets scored against the Flickr30k references."""
    images = [captions for captions in by_image.values() if len(captions) >= 2]
    references = [captions[1:] for captions in images]
    held_out = [captions[0] for captions in images]
    largest = dict.fromkeys(SCORE_KEYS, 0.0)
    for predictions in (held_out, held_out[1:] + held_out[:1]):
        java = compute_caption_metrics(predictions, references, include_meteor=False, tokenizer="ptb-java")
        python = compute_caption_metrics(predictions, references, include_meteor=False, tokenizer="python")
        for key in SCORE_KEYS:
            largest[key] = max(largest[key], abs(java[key] - python[key]))
    return largest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count_per_kind", type=int, default=100, help="Hostile strings per kind.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="Also write the report to this file.")
    args = parser.parse_args(argv)
    if not java_available():
        print("error: needs `java` on the PATH (the reference is coco-caption's Java tokenizer)", file=sys.stderr)
        return 2
    if not FLICKR_CSV.is_file() or not COCO_JSON.is_file():
        print(f"error: needs {FLICKR_CSV} and {COCO_JSON} (the project workspace's shared data)", file=sys.stderr)
        return 2

    by_image = read_flickr_captions()
    flickr = [caption for captions in by_image.values() for caption in captions]
    report: dict[str, object] = {}
    for name, captions in (("flickr30k", flickr), ("coco_fakecap", read_coco_captions())):
        same, differing = agreement(captions)
        report[name] = {"captions": len(captions), "identical": same, "examples": differing[:5]}
        print(f"{name}: {same} of {len(captions)} captions tokenized identically ({same / len(captions):.2%})")

    hostile = hostile_captions(args.count_per_kind, args.seed)
    same, differing = agreement([caption for _, caption in hostile])
    kind_of = {caption: kind for kind, caption in hostile}
    by_kind: dict[str, list] = defaultdict(list)
    for caption, java_tokens, python_tokens in differing:
        by_kind[kind_of[caption]].append({"caption": caption, "java": java_tokens, "python": python_tokens})
    report["hostile"] = {"captions": len(hostile), "identical": same, "differing_by_kind": dict(by_kind)}
    print(f"hostile (seed {args.seed}): {same} of {len(hostile)} tokenized identically ({same / len(hostile):.2%})")
    for kind in HOSTILE_KINDS:
        examples = by_kind.get(kind, [])
        print(f"  {kind}: {len(examples)} of {args.count_per_kind} differ", end="")
        print(f", e.g. {examples[0]['caption']!r}: java {examples[0]['java']!r}, python {examples[0]['python']!r}"
              if examples else "")  # fmt: skip

    largest = score_differences(by_image)
    report["largest_score_difference"] = largest
    print("largest |java - python| score difference on the Flickr30k corpus: "
          + ", ".join(f"{key} {value:.2e}" for key, value in largest.items()))  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
