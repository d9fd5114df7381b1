"""coco-caption scores: both caption tokenizers against pycocoevalcap's Java one, scores against pycocoevalcap's
full pipeline, the fallback without Java, the evaluate module."""

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_args
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer

from imgcap_hf.scoring import (
    compute_caption_metrics,
    java_tokenize,
    python_tokenize,
    resolve_caption_tokenizer,
    tokenize_captions_for_scoring,
)
from imgcap_hf.scoring import java_tokenizer as java_tokenizer_module

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
SCORE_KEYS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "cider", "rouge_l")

# (caption, what pycocoevalcap's Java PTBTokenizer gives), checked by test_quirks_table_is_what_java_gives.
TOKENIZER_QUIRKS = [
    ('A man (in red) isn\'t "happy".', "a man -lrb- in red -rrb- is n't happy"),
    ("Two dogs' toys and a cat's bowl", "two dogs toys and a cat 's bowl"),
    ("They're gonna play, can't they?", "they 're gon na play ca n't they"),
    ("A U.S. Army soldier at 3:30 p.m. with 1,000 people", "a u.s. army soldier at 3:30 p.m. with 1,000 people"),
    ("A well-known t-shirt -- and a 3-year-old", "a well-known t-shirt and a 3-year-old"),
    ("AT&T and Tom & Jerry ; 50% off $5", "at&t and tom & jerry 50 % off $ 5"),
    ("A sign says: [STOP] {now} <unk>", "a sign says -lsb- stop -rsb- -lcb- now -rcb- <unk>"),
    ("Wait... what?! ....", "wait what ?!"),
    ("\u2019Curly\u2019 \u201cquotes\u201d \u2014 and \u2013 dashes\u2026", "curly quotes and dashes"),
    ("\u00bd cup, 5 7/8 inches", "1/2 cup 5\u00a07/8 inches"),
    ("Caf\u00e9 na\u00efve Z\u00fcrich \U0001f600 emoji", "caf\u00e9 na\u00efve z\u00fcrich emoji"),
    ("Rock 'n' roll in the '90s, o'clock", "rock 'n' roll in the '90s o'clock"),
    ("Mr. Smith and Dr. Who visit St. Louis, etc. The end.", "mr. smith and dr. who visit st. louis etc. the end"),
    ("e-mail me@example.com or see www.example.com", "e-mail me@example.com or see www.example.com"),
    ("A dog cannot swim", "a dog can not swim"),
    ("I'd've gone", "i 'd 've gone"),
    ("A DOG'S LIFE", "a dog 's life"),
    ("...", ""),
    ("", ""),
]
# What our Python tokenizer makes of the quirks it does not reproduce (README: "kinds of text that differ").
PYTHON_KNOWN_DIFFERENCES = {"\u00bd cup, 5 7/8 inches": "\u00bd cup 5 7/8 inches"}

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs `java` on the PATH")


@pytest.fixture(scope="module")
def agreement_script():
    """benchmarks/tokenizer_agreement.py imported as a module: the hostile set and the measurements the README
    reports come from there."""
    spec = importlib.util.spec_from_file_location(
        "tokenizer_agreement", REPO_ROOT / "benchmarks" / "tokenizer_agreement.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pycocoevalcap_tokenize():
    """pycocoevalcap's own tokenizer class (Java): {id: [captions]} -> {id: [tokenized captions]}."""
    if shutil.which("java") is None:
        pytest.skip("needs `java` on the PATH")
    if not os.access(Path(ptbtokenizer.__file__).parent, os.W_OK):
        pytest.skip("pycocoevalcap's PTBTokenizer writes its input next to its jar, and that folder is read-only")

    def tokenize(captions_by_id: dict[int, list[str]]) -> dict[int, list[str]]:
        return ptbtokenizer.PTBTokenizer().tokenize(
            {key: [{"caption": caption} for caption in captions] for key, captions in captions_by_id.items()}
        )

    return tokenize


@pytest.fixture(scope="module")
def shared_captions(agreement_script) -> dict[str, list[str]]:
    """The 15,892 Flickr30k captions (file order) and coco-caption's 1,000 demo captions from ../shared."""
    if not agreement_script.FLICKR_CSV.is_file() or not agreement_script.COCO_JSON.is_file():
        pytest.skip(f"{SHARED_DATA} not present")
    by_image = agreement_script.read_flickr_captions()
    return {
        "flickr30k": [caption for captions in by_image.values() for caption in captions],
        "coco_fakecap": agreement_script.read_coco_captions(),
    }


@pytest.fixture(scope="module")
def flickr_images(agreement_script) -> list[list[str]]:
    """Captions of the Flickr30k sample grouped by image, for the images that have at least two (2,606 of them)."""
    if not agreement_script.FLICKR_CSV.is_file():
        pytest.skip(f"{agreement_script.FLICKR_CSV} not present")
    by_image = agreement_script.read_flickr_captions()
    return [captions for captions in by_image.values() if len(captions) >= 2]


def pycocoevalcap_scores(gts: dict[int, list[str]], res: dict[int, list[str]]) -> dict[str, float]:
    """BLEU, CIDEr-D and ROUGE-L of already tokenized captions, straight from pycocoevalcap's classes."""
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    rouge_l, _ = Rouge().compute_score(gts, res)
    return {**{f"bleu_{n}": bleu[n - 1] for n in range(1, 5)}, "cider": cider, "rouge_l": rouge_l}


# --- The Java tokenizer is pycocoevalcap's ----------------------------------------------------------------------


def test_quirks_table_is_what_java_gives(pycocoevalcap_tokenize):
    java = pycocoevalcap_tokenize({index: [caption] for index, (caption, _) in enumerate(TOKENIZER_QUIRKS)})
    assert [java[index][0] for index in range(len(TOKENIZER_QUIRKS))] == [expected for _, expected in TOKENIZER_QUIRKS]
    assert java_tokenize([caption for caption, _ in TOKENIZER_QUIRKS]) == [
        expected for _, expected in TOKENIZER_QUIRKS
    ]


def test_java_tokenize_equals_pycocoevalcap_on_every_shared_caption(shared_captions, pycocoevalcap_tokenize):
    for name, captions in shared_captions.items():
        expected = pycocoevalcap_tokenize({index: [caption] for index, caption in enumerate(captions)})
        assert java_tokenize(captions) == [expected[index][0] for index in range(len(captions))], name


@pytest.mark.parametrize("candidate", ["held-out caption", "caption of the next image"])
def test_ptb_java_scores_equal_the_full_pycocoevalcap_pipeline(flickr_images, pycocoevalcap_tokenize, candidate):
    """One caption per image is the prediction, the others are its references, as coco-caption would score them."""
    references = [captions[1:] for captions in flickr_images]
    held_out = [captions[0] for captions in flickr_images]
    predictions = held_out if candidate == "held-out caption" else held_out[1:] + held_out[:1]

    ours = compute_caption_metrics(predictions, references, include_meteor=False, tokenizer="ptb-java")

    gts = pycocoevalcap_tokenize(dict(enumerate(references)))
    res = pycocoevalcap_tokenize({index: [prediction] for index, prediction in enumerate(predictions)})
    expected = pycocoevalcap_scores(gts, res)
    assert ours["num_images"] == len(flickr_images) == 2606 and ours["tokenizer"] == "ptb-java"
    assert {key: ours[key] for key in SCORE_KEYS} == pytest.approx(expected, abs=1e-9)
    assert 0.0 < ours["bleu_4"] < ours["bleu_1"] < 1.0


@needs_java
def test_java_tokenize_keeps_one_line_per_caption_where_pycocoevalcap_would_shift_them(pycocoevalcap_tokenize):
    captions = ["A dog\rruns .", "A cat\u2028sleeps .", "Two birds fly ."]
    assert java_tokenize(captions) == ["a dog runs", "a cat sleeps", "two birds fly"]
    # pycocoevalcap replaces only "\n": the jar splits the other line breaks, and later captions move up.
    shifted = pycocoevalcap_tokenize({index: [caption] for index, caption in enumerate(captions)})
    assert [shifted[index][0] for index in range(3)] == ["a dog", "runs", "a cat"]


@needs_java
def test_java_tokenize_starts_one_process_for_many_captions(monkeypatch):
    runs = []
    real_run = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: runs.append(args) or real_run(*args, **kwargs))
    scores = compute_caption_metrics(["a dog", "a cat", ""], [["a dog ."], ["a cat .", "cats"], ["a bird"]])
    assert scores["tokenizer"] == "ptb-java" and len(runs) == 1


@needs_java
def test_java_tokenize_handles_empty_captions_and_text_utf8_cannot_hold():
    assert java_tokenize([]) == []
    assert java_tokenize(["", "A dog .", "", "caf\u00e9 \ud800 ok", ""]) == ["", "a dog", "", "caf\u00e9 ok", ""]


# --- The Python tokenizer agrees with Java ----------------------------------------------------------------------


@pytest.mark.parametrize(("caption", "java"), TOKENIZER_QUIRKS)
def test_python_tokenize_on_the_quirks_table(caption, java):
    assert python_tokenize(caption) == PYTHON_KNOWN_DIFFERENCES.get(caption, java)


@needs_java
def test_python_tokenize_equals_java_on_every_shared_caption(shared_captions, agreement_script):
    for name, captions in shared_captions.items():
        same, differing = agreement_script.agreement(captions)
        assert same == len(captions), f"{name}: {len(differing)} of {len(captions)} differ, e.g. {differing[:3]}"


@needs_java
def test_python_tokenize_on_the_hostile_set_agrees_as_the_readme_says(agreement_script):
    hostile = agreement_script.hostile_captions(count_per_kind=100, seed=0)
    assert len(hostile) == 1100
    same, differing = agreement_script.agreement([caption for _, caption in hostile])
    kind_of = {caption: kind for kind, caption in hostile}
    differing_kinds = {kind_of[caption] for caption, _, _ in differing}
    assert same / len(hostile) >= 0.97, differing[:5]  # README: 1,072 of 1,100 (97.45%)
    assert differing_kinds <= {"apostrophes", "parentheses", "urls"}, differing_kinds  # the README's list


@needs_java
@pytest.mark.slow
def test_python_and_java_scores_differ_by_at_most_1e_4_on_the_flickr_corpus(agreement_script, shared_captions):
    largest = agreement_script.score_differences(agreement_script.read_flickr_captions())
    assert max(largest.values()) <= 1e-4, largest


def test_python_tokenize_never_raises_and_returns_normalised_text():
    for caption in ["", " ", "\ud800", "\x00\x01", "a" * 5000, "((((", "\u202e\u0301", "&amp;&lt;", "\U0001f600" * 3]:
        tokens = python_tokenize(caption)
        assert isinstance(tokens, str) and tokens == tokens.lower() and "  " not in tokens


# --- Which tokenizer, and saying so ------------------------------------------------------------------------------


@needs_java
def test_with_java_the_default_is_ptb_java():
    assert resolve_caption_tokenizer() == "ptb-java"
    assert compute_caption_metrics(["a dog"], [["a dog ."]])["tokenizer"] == "ptb-java"


def test_without_java_the_python_tokenizer_is_used_and_named(monkeypatch):
    monkeypatch.setenv("PATH", "")
    assert resolve_caption_tokenizer("auto") == "python"
    scores = compute_caption_metrics(["a dog runs"], [["A dog is running ."]])
    assert scores["tokenizer"] == "python" and "meteor" not in scores
    with pytest.raises(RuntimeError, match="needs `java` on the PATH"):
        compute_caption_metrics(["a dog runs"], [["a dog is running"]], tokenizer="ptb-java")


def test_an_unknown_tokenizer_name_is_refused():
    with pytest.raises(ValueError, match="unknown caption tokenizer 'ptb'"):
        compute_caption_metrics(["a dog"], [["a dog"]], tokenizer="ptb")


@needs_java
def test_a_failing_jar_falls_back_to_python_with_a_warning_unless_java_was_required(monkeypatch, tmp_path):
    monkeypatch.setattr(java_tokenizer_module, "JAR", tmp_path / "missing.jar")
    with pytest.warns(RuntimeWarning, match="Python tokenizer instead"):
        tokenized, used = tokenize_captions_for_scoring(["A dog ."])
    assert (tokenized, used) == (["a dog"], "python")
    with pytest.raises(RuntimeError, match="exited with status"):
        tokenize_captions_for_scoring(["A dog ."], tokenizer="ptb-java")


@pytest.mark.slow
@pytest.mark.parametrize("java_on_path", [True, False])
def test_train_py_scores_with_either_tokenizer_and_records_which(java_on_path, tmp_path, monkeypatch):
    import train

    if java_on_path and shutil.which("java") is None:
        pytest.skip("needs `java` on the PATH")
    if not java_on_path:
        monkeypatch.setenv("PATH", "")
    args = tiny_args(tmp_path, "attention", "--num_train_epochs", "1", "--max_train_steps", "2", "--num_beams", "1")
    results = train.main(args)
    expected = "ptb-java" if java_on_path else "python"
    assert results["test_tokenizer"] == expected
    assert json.loads((tmp_path / "all_results.json").read_text())["test_tokenizer"] == expected
    assert results["history"][-1]["tokenizer"] == expected


def test_train_py_refuses_ptb_java_without_java_before_training(tmp_path, monkeypatch, capsys):
    import train

    monkeypatch.setenv("PATH", "")
    with pytest.raises(SystemExit):
        train.parse_args(tiny_args(tmp_path, "attention", "--caption_tokenizer", "ptb-java"))
    assert "needs `java` on the PATH" in capsys.readouterr().err


@pytest.mark.parametrize("java_on_path", [True, False])
def test_cli_evaluate_with_either_tokenizer_says_which(java_on_path, saved_tiny_attention_captioner):
    """The caption tokenizer does not depend on the decoder: one model (both decoders evaluate in test_train.py)."""
    if java_on_path and shutil.which("java") is None:
        pytest.skip("needs `java` on the PATH")
    env = {**os.environ, "PATH": os.environ["PATH"] if java_on_path else ""}
    command = [sys.executable, "-m", "imgcap_hf", "evaluate", "--model", str(saved_tiny_attention_captioner),
               "--dataset", "shapes", "--max_samples", "4", "--max_new_tokens", "4"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["tokenizer"] == (
        "ptb-java" if java_on_path else "python"
    )
    if not java_on_path:
        refused = subprocess.run([*command, "--caption_tokenizer", "ptb-java"], capture_output=True, text=True,
                                 timeout=300, env=env, cwd=REPO_ROOT)  # fmt: skip
        assert refused.returncode == 2 and "needs `java` on the PATH" in refused.stderr


# --- Scores worked out by hand -----------------------------------------------------------------------------------


def test_identical_candidate_and_references_give_bleu_of_one():
    caption = "a brown dog runs across the green field"
    scores = compute_caption_metrics([caption], [[caption, caption]], include_meteor=False)
    assert [scores[f"bleu_{n}"] for n in range(1, 5)] == pytest.approx([1.0] * 4, abs=1e-6)
    assert scores["rouge_l"] == pytest.approx(1.0)


def test_bleu_is_a_corpus_statistic_with_the_closest_reference_length():
    predictions = ["a dog runs on the grass", "two men ride bikes"]
    references = [["A dog is running on the grass .", "A brown dog runs ."], ["Two men riding bicycles ."]]
    scores = compute_caption_metrics(predictions, references, include_meteor=False)
    # Unigrams matched over the corpus: 6 of 6, then 2 of 4. The first candidate (6 words) is closer to the
    # 7-word reference than to the 4-word one, so the corpus reference length is 7 + 4 against 6 + 4 candidate words.
    assert scores["bleu_1"] == pytest.approx(8 / 10 * math.exp(1 - 11 / 10), abs=1e-6)


def test_cider_of_a_single_image_is_zero_even_for_a_perfect_caption():
    # Document frequencies come from the references scored: with one image every n-gram occurs in all "documents".
    scores = compute_caption_metrics(["a dog runs"], [["a dog runs"]], include_meteor=False)
    assert scores["cider"] == 0.0


def test_cider_of_perfect_captions_of_distinct_images_is_ten():
    # Each n-gram occurs in one image of two: all weights are log(2), every cosine is 1, and CIDEr-D scales by 10.
    predictions = ["a dog runs fast", "two men ride bikes"]
    scores = compute_caption_metrics(predictions, [[caption] for caption in predictions], include_meteor=False)
    assert scores["cider"] == pytest.approx(10.0)


def test_cider_of_a_split_is_not_the_mean_of_its_batches():
    predictions = ["a dog runs on grass", "a man rides a bike", "two dogs play in snow", "a man runs"]
    references = [["a dog running on grass"], ["a man riding a bike"], ["dogs playing in the snow"], ["a man jogs"]]
    whole = compute_caption_metrics(predictions, references, include_meteor=False)["cider"]
    halves = [
        compute_caption_metrics(predictions[i : i + 2], references[i : i + 2], include_meteor=False) for i in (0, 2)
    ]
    assert whole != pytest.approx(sum(half["cider"] for half in halves) / 2, abs=1e-3)


def test_scores_equal_pycocoevalcap_classes_on_a_small_example():
    predictions = ["a man riding a horse on a beach", "two dogs play in the snow", "a red car", ""]
    references = [
        ["a man rides a horse along the beach", "a person on a horse near the ocean"],
        ["two dogs playing in snow", "dogs run through the snow", "two puppies in the snow"],
        ["a red car parked on the street"],
        ["a woman holding an umbrella"],
    ]
    # Lower-case text without punctuation comes out of the tokenizer unchanged.
    assert all(python_tokenize(caption) == caption for caption in predictions + sum(references, []))
    expected = pycocoevalcap_scores(dict(enumerate(references)), {i: [p] for i, p in enumerate(predictions)})
    scores = compute_caption_metrics(predictions, references, include_meteor=False)
    assert {key: scores[key] for key in SCORE_KEYS} == pytest.approx(expected, abs=1e-12)


def test_empty_predictions_score_zero_without_crashing():
    references = [["a dog runs on the grass"], ["two men ride bikes"]]
    scores = compute_caption_metrics(["", ""], references, include_meteor=False)
    assert {key: scores[key] for key in SCORE_KEYS} == dict.fromkeys(SCORE_KEYS, 0.0)

    one_empty = compute_caption_metrics(["", "two men ride bikes"], references, include_meteor=False)
    both = compute_caption_metrics(["a dog runs on the grass", "two men ride bikes"], references, include_meteor=False)
    assert one_empty["rouge_l"] == pytest.approx(both["rouge_l"] / 2)
    assert 0.0 < one_empty["bleu_1"] < both["bleu_1"]


# --- Input validation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("predictions", "references", "error", "message"),
    [
        (["a dog"], [["a dog"], ["a cat"]], ValueError, "1 predictions and 2 reference lists"),
        ([], [], ValueError, "no images to score"),
        (["a dog", "a cat"], [["a dog"], []], ValueError, r"references\[1\] is empty"),
        (["a dog"], ["a dog"], TypeError, r"references\[0\] must be a list of reference strings"),
        (["a dog", None], [["a dog"], ["a cat"]], TypeError, r"predictions\[1\] must be a string"),
        (["a dog"], [["a dog", "  "]], ValueError, r"references\[0\]\[1\] is blank"),
        (["a dog"], [["a dog", 3]], TypeError, r"references\[0\]\[1\] must be a string"),
        ("a dog", [["a dog"]], TypeError, "not a single string"),
    ],
)
def test_bad_inputs_name_what_is_wrong(predictions, references, error, message):
    with pytest.raises(error, match=message):
        compute_caption_metrics(predictions, references, include_meteor=False)


# --- METEOR ------------------------------------------------------------------------------------------------------


def test_meteor_is_left_out_when_java_is_missing(monkeypatch):
    monkeypatch.setenv("PATH", "")
    scores = compute_caption_metrics(["a dog runs"], [["a dog is running"]])
    assert "meteor" not in scores and scores["num_images"] == 1
    with pytest.raises(RuntimeError, match="java"):
        compute_caption_metrics(["a dog runs"], [["a dog is running"]], include_meteor=True)


@needs_java
def test_meteor_equals_pycocoevalcap_meteor():
    predictions = ["a man riding a horse on a beach", "two dogs play in the snow", "", "a red car"]
    references = [
        ["A man rides a horse along the beach .", "A person on a horse near the ocean ."],
        ["Two dogs playing in snow .", "Dogs run through the snow ."],
        ["A woman holding an umbrella ."],
        ["A red car parked on the street .", "..."],
    ]
    scores = compute_caption_metrics(predictions, references, include_meteor=True)
    # pycocoevalcap's Meteor().compute_score(gts, res) on these captions tokenized by the PTB tokenizer (an empty
    # prediction and an empty reference included) returns 0.33837134650286305. It is not rerun here: each METEOR
    # start loads a paraphrase table in a new JVM (about 5 s).
    assert scores["meteor"] == pytest.approx(0.33837134650286305, abs=1e-12)


# --- The evaluate module -----------------------------------------------------------------------------------------


def test_evaluate_module_loads_offline_and_scores_the_whole_split(tmp_path, monkeypatch):
    import evaluate

    monkeypatch.setattr(evaluate.config, "HF_MODULES_CACHE", tmp_path / "modules")
    coco_caption = evaluate.load(str(REPO_ROOT / "metrics" / "coco_caption"), keep_in_memory=True)
    predictions = ["a dog runs on the grass", "two men ride bikes", "a red car"]
    references = [["A dog is running on the grass ."], ["Two men riding bicycles ."], ["A red car parks ."]]

    coco_caption.add_batch(predictions=predictions[:2], references=references[:2])
    coco_caption.add_batch(predictions=predictions[2:], references=references[2:])
    scores = coco_caption.compute(include_meteor=False)

    assert scores == compute_caption_metrics(predictions, references, include_meteor=False)
    assert scores["num_images"] == 3 and scores["cider"] > 0.0
