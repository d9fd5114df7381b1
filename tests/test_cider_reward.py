"""The SCST reward: CIDEr-D of sampled token ids as coco-caption computes it, with document frequencies fixed from the
training references, <eos> counted as a word, and an optional BLEU-4 term."""

import csv
import math
import random
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch
from conftest import SHARED_CAPTIONS
from pycocoevalcap.cider.cider import Cider

from imgcap_hf.scoring import CaptionReward, python_tokenize

PAD, EOS = 0, 1
# Three training images; ids 2.. are words. Image 0: "a dog runs", "the dog runs fast"; image 1: "a cat sleeps";
# image 2: "a bird sings", "a bird flies high", "the bird sings".
REFERENCES = [
    [[2, 3, 4, EOS], [5, 3, 4, 6, EOS]],
    [[2, 7, 8, EOS]],
    [[2, 9, 10, EOS], [2, 9, 11, 12, EOS], [5, 9, 10, EOS]],
]


def padded(rows: list[list[int]], length: int = 8) -> torch.Tensor:
    return torch.tensor([row + [PAD] * (length - len(row)) for row in rows])


def rewards(rows: list[list[int]], images: list[int], **kwargs) -> list[float]:
    reward = CaptionReward(REFERENCES, eos_token_id=EOS, pad_token_id=PAD, **kwargs)
    return reward(padded(rows), torch.tensor(images)).tolist()


def coco_cider_d(candidates: list[list[int]], references: list[list[list[int]]]) -> np.ndarray:
    """pycocoevalcap's per-caption CIDEr-D, the ids written as words; its df come from these references."""
    gts = {image: [" ".join(map(str, reference)) for reference in refs] for image, refs in enumerate(references)}
    res = {image: [" ".join(map(str, candidate))] for image, candidate in enumerate(candidates)}
    return Cider().compute_score(gts, res)[1]


def test_a_caption_equal_to_a_reference_scores_above_a_wrong_one():
    right, wrong, partly = rewards([[2, 7, 8, EOS], [2, 9, 10, EOS], [2, 7, 10, EOS]], [1, 1, 1])
    # Cosine 1 at every order and no length gap: a caption equal to its image's only reference scores 10.
    assert right == pytest.approx(10.0)
    assert right > partly > wrong >= 0.0


def test_eos_counts_as_a_word():
    finished, unfinished = rewards([[2, 3, 4, EOS], [2, 3, 4]], [0, 0])
    assert finished > unfinished > 0.0
    # Scored as it is: the unfinished sample is CIDEr-D of "2 3 4" against references that end with <eos>.
    expected = coco_cider_d([[2, 3, 4], [2, 7, 8, EOS], [2, 9, 10, EOS]], REFERENCES)
    assert unfinished == pytest.approx(expected[0], abs=1e-6)


def test_what_follows_the_first_eos_is_ignored():
    reward = CaptionReward(REFERENCES, eos_token_id=EOS, pad_token_id=PAD)
    samples = torch.tensor(
        [
            [2, 3, 4, EOS, PAD, PAD, PAD],
            [2, 3, 4, EOS, 5, 3, EOS],  # words after <eos>, as an unmasked sampler leaves them
            [2, 3, 4, EOS, EOS, EOS, EOS],
        ]
    )
    scores = reward(samples, torch.tensor([0, 0, 0])).tolist()
    alone = reward(torch.tensor([[2, 3, 4, EOS]]), torch.tensor([0])).item()
    assert scores == pytest.approx([alone] * 3, abs=1e-6)
    # With padding by <eos> itself (pad id == eos id), the first one ends the sample and counts.
    same_ids = CaptionReward(REFERENCES, eos_token_id=EOS, pad_token_id=EOS)
    assert same_ids(samples[2:], torch.tensor([0])).item() == pytest.approx(alone, abs=1e-6)


def test_document_frequencies_come_from_the_training_references_not_the_batch():
    reward = CaptionReward(REFERENCES, eos_token_id=EOS, pad_token_id=PAD)
    sample = [5, 9, 11, 12, EOS]
    alone = reward(padded([sample]), torch.tensor([2])).item()
    crowded = reward(padded([sample, [2, 7, 8, EOS], sample, [2, 3, EOS]]), torch.tensor([2, 1, 2, 0])).tolist()
    assert crowded[0] == crowded[2] == pytest.approx(alone, abs=1e-6)
    # The value is coco-caption's with df over all three training images, not over the one image scored.
    expected = coco_cider_d([sample, [2, 7, 8, EOS], [2, 9, 10, EOS]], [REFERENCES[2], REFERENCES[1], REFERENCES[0]])
    assert alone == pytest.approx(expected[0], abs=1e-6)


def reference_bleu4(sample: list[int], references: list[list[int]]) -> float:
    """Sentence BLEU-4 as CaptionReward documents it, from Counters: p_1 unsmoothed, p_2..p_4 add one (Lin and Och
    2004), brevity against the closest reference length (the shorter on a tie)."""
    log_precisions = []
    for n in range(1, 5):
        grams = Counter(tuple(sample[i : i + n]) for i in range(len(sample) - n + 1))
        most = Counter()
        for reference in references:
            most |= Counter(tuple(reference[i : i + n]) for i in range(len(reference) - n + 1))
        matches = sum(min(count, most[gram]) for gram, count in grams.items())
        smoothing = 0 if n == 1 else 1
        if matches + smoothing == 0:
            return 0.0
        log_precisions.append(math.log((matches + smoothing) / (sum(grams.values()) + smoothing)))
    closest = min((abs(len(reference) - len(sample)), len(reference)) for reference in references)[1]
    brevity = 1.0 if len(sample) >= closest else math.exp(1 - closest / len(sample))
    return brevity * math.exp(sum(log_precisions) / 4)


def test_the_bleu4_weight_adds_weight_times_sentence_bleu4():
    samples = [[2, 9, 10, EOS], [2, 9, 12, 10, EOS], [9, EOS], [2, 3, 4, 6, EOS], [7, 7, 7, 7, 7, 7, 7, EOS]]
    images = [2, 2, 2, 0, 1]
    cider_d = np.array(rewards(samples, images))
    with_bleu = np.array(rewards(samples, images, bleu4_weight=0.5))
    expected = [reference_bleu4(sample, REFERENCES[image]) for sample, image in zip(samples, images)]
    assert expected[0] == pytest.approx(1.0)  # equal to a reference
    assert min(expected[1:]) > 0.0  # the smoothing scores samples without a matching 4-gram
    np.testing.assert_allclose(with_bleu - cider_d, 0.5 * np.array(expected), atol=2e-6)


def random_corpus(seed: int, num_images: int) -> tuple[list[list[list[int]]], list[list[int]]]:
    """References over ids 2..11 (repeats and shared n-grams are common), 1 to 5 per image, each ending with <eos>;
    candidates are random sentences that also use ids 12..14, which no reference holds, or every third one a
    reference of its image with its last word changed; some lack <eos>."""
    rng = random.Random(seed)

    def sentence(top: int) -> list[int]:
        return [rng.randint(2, top) for _ in range(rng.randint(0, 7))]

    references = [[sentence(11) + [EOS] for _ in range(rng.randint(1, 5))] for _ in range(num_images)]
    candidates = [sentence(14) + [EOS] * rng.randint(0, 1) for _ in range(num_images)]
    for image in range(0, num_images, 3):
        candidates[image] = rng.choice(references[image])[:-2] + [rng.randint(2, 14), EOS]
    return references, candidates


def test_matches_coco_caption_cider_d_per_caption_with_the_same_references():
    references, candidates = random_corpus(seed=0, num_images=200)
    reward = CaptionReward(references, eos_token_id=EOS, pad_token_id=PAD)
    ours = reward(padded(candidates), torch.arange(len(candidates))).numpy()
    expected = coco_cider_d(candidates, references)
    assert expected.max() > 5 and (expected > 0).mean() > 0.5  # a spread of scores, not all near 0
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)


def test_matches_coco_caption_cider_d_on_flickr30k_captions():
    if not SHARED_CAPTIONS.is_file():
        pytest.skip(f"{SHARED_CAPTIONS} not present")
    captions = defaultdict(list)
    with SHARED_CAPTIONS.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle, skipinitialspace=True):
            captions[row["image_name"]].append(row["comment"])
    images = [name for name in sorted(captions) if len(captions[name]) >= 3][:300]
    vocabulary = {"<pad>": PAD, "<eos>": EOS}

    def as_ids(text: str) -> list[int]:
        return [vocabulary.setdefault(word, len(vocabulary)) for word in [*python_tokenize(text).split(), "<eos>"]]

    # Each image's first caption as its candidate, or the next image's (a mismatch), against its other captions.
    references = [[as_ids(caption) for caption in captions[name][1:]] for name in images]
    candidates = [as_ids(captions[images[(i + i % 2) % len(images)]][0]) for i in range(len(images))]
    reward = CaptionReward(references, eos_token_id=EOS, pad_token_id=PAD)
    ours = reward(padded(candidates, max(map(len, candidates))), torch.arange(len(images))).numpy()
    np.testing.assert_allclose(ours, coco_cider_d(candidates, references), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("samples", "images", "message"),
    [
        (torch.tensor([[2, EOS]]), torch.tensor([3]), "image_indices holds 3, outside the 3 images"),
        (torch.tensor([[2, EOS]]), torch.tensor([-1]), "image_indices holds -1, outside the 3 images"),
        (torch.tensor([2, EOS]), torch.tensor([0]), r"samples must be a 2-D tensor .* got \(2,\)"),
        (
            torch.zeros(1, 2, 3, dtype=torch.long),
            torch.tensor([0]),
            r"samples must be a 2-D tensor .* got \(1, 2, 3\)",
        ),
        (
            torch.tensor([[2.0, 1.0]]),
            torch.tensor([0]),
            "samples must hold integer token ids, got dtype torch.float32",
        ),
        (torch.tensor([[2, EOS]]), torch.tensor([0, 1]), r"one index per sample \(1\), got \(2,\)"),
        (torch.tensor([[2, EOS]]), torch.tensor([[0]]), r"one index per sample \(1\), got \(1, 1\)"),
        (torch.tensor([[-100, EOS]]), torch.tensor([0]), r"samples hold a negative token id \(-100\)"),
    ],
)
def test_bad_calls_get_one_clear_sentence(samples, images, message):
    reward = CaptionReward(REFERENCES, eos_token_id=EOS, pad_token_id=PAD)
    with pytest.raises(ValueError, match=message):
        reward(samples, images)


@pytest.mark.parametrize(
    ("references", "message"),
    [
        ([], "references must be a non-empty list"),
        ([[[2, EOS]], []], r"references\[1\] is empty"),
        ([[[2, EOS], [2, 3]]], r"references\[0\]\[1\] does not end with eos_token_id 1"),
        ([[[2, EOS], []]], r"references\[0\]\[1\] does not end with eos_token_id 1"),
        ([[[-2, EOS]]], r"references hold a negative token id \(-2\)"),
        ([[[2**20, EOS]]], "references hold token id 1048576: CaptionReward codes 4-grams in 64 bits"),
    ],
)
def test_bad_references_get_one_clear_sentence(references, message):
    with pytest.raises(ValueError, match=message):
        CaptionReward(references, eos_token_id=EOS, pad_token_id=PAD)


def test_returns_float32_rewards_one_per_sample():
    reward = CaptionReward(REFERENCES, eos_token_id=EOS, pad_token_id=PAD)
    scores = reward(padded([[2, 3, EOS], [9, EOS]]), torch.tensor([0, 2]))
    assert scores.dtype == torch.float32 and scores.shape == (2,)
    assert reward(torch.zeros(0, 5, dtype=torch.long), torch.zeros(0, dtype=torch.long)).shape == (0,)
