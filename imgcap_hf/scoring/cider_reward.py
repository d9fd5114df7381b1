"""The reward of self-critical training: CIDEr-D (optionally plus BLEU-4) of sampled token-id captions.

CIDEr-D (Vedantam et al. 2015, as coco-caption computes it) of a candidate ``c`` against the references ``S`` of its
image, for n-gram orders ``n = 1..4``:

- each sentence becomes a vector ``g_n`` of n-gram weights ``count(w) * idf(w)``, with
  ``idf(w) = log(num_images) - log(max(1, df(w)))``, where ``df(w)`` counts the images whose references contain ``w``;
- ``sim_n(c, s) = sum_w min(g_n(c)[w], g_n(s)[w]) * g_n(s)[w] / (|g_n(c)| * |g_n(s)|)`` (the candidate's weights are
  clipped by the reference's, the "-D" against gaming by repetition), times the Gaussian length penalty
  ``exp(-(len(c) - len(s))**2 / (2 * sigma**2))``;
- ``CIDEr-D(c, S) = 10 * mean_n mean_{s in S} sim_n(c, s)``.

coco-caption takes ``df`` and ``num_images`` from the references of the captions being evaluated; a reward must not
depend on what else is in the batch, so here they come once from the training references given to the constructor
(pass the evaluated set's own references and the scores are coco-caption's per-caption CIDEr-D).

Sentences are token ids, and ``<eos>`` is a word like any other: references end with it, so a sample that stops
properly matches their last unigram and n-grams, and an unfinished one does not.

The optional BLEU-4 term is the sample's sentence BLEU-4 against the same references, with the same words:
``BP * exp(mean_n log p_n)``, where ``p_n`` is the sample's n-grams that the references hold (each counted at most as
often as in the reference that holds it most) over its n-grams, and BP is ``exp(1 - r / c)`` for a sample of ``c``
words shorter than ``r``, the length of its closest reference (the shorter on a tie), else 1. Smoothing: ``p_2`` to
``p_4`` add one to both counts (Lin and Och 2004), so that a sample without a matching 4-gram still scores by its
shorter matches; ``p_1`` is not smoothed, so a sample with no matching word (or no word) scores 0.

Why numpy arrays instead of dictionaries of n-gram tuples: Flickr30k's 29,000 training images hold millions of
distinct n-grams, which Python dictionaries keep in gigabytes; as sorted arrays of integer codes they take a few tens
of bytes per distinct n-gram of each image, and a batch's n-grams are found in them by vectorized binary searches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import chain

import numpy as np
import torch

MAX_ORDER = 4  # CIDEr-D and BLEU-4 use 1- to 4-grams
# An n-gram is coded as the base-B number of its tokens' digits (token id + 1, never 0, so that codes of different
# orders differ); a 4-gram's code stays below B**4, which must fit in an int64.
_LARGEST_BASE = math.floor((2**63 - 1) ** (1 / MAX_ORDER))


class CaptionReward:
    """CIDEr-D (optionally + bleu4_weight * BLEU-4) of sampled captions, as token-id sequences, against their
    image's references.

    Everything that depends only on the references (document frequencies, each reference's n-gram counts, norms and
    length) is computed once here, so that a call only counts the samples' n-grams.

    Args:
        references: ``references[i]`` are the reference captions of training image ``i``: each a list of token ids
            without ``<sos>`` and ending with ``<eos>`` (the caller appends it; a reference that does not end with
            ``eos_token_id`` is refused). Images may have different numbers of references, at least one each.
        eos_token_id: The id of ``<eos>``: a sample ends after its first ``<eos>``, which counts as a word.
        pad_token_id: The id of padding: a sample without ``<eos>`` ends before its first pad (if ``pad_token_id``
            equals ``eos_token_id``, the first such token is an ``<eos>``, counted).
        bleu4_weight: Weight of the sample's sentence BLEU-4 (defined in this module's docstring) added to its
            CIDEr-D; 0 gives CIDEr-D alone.
        sigma: Standard deviation of CIDEr-D's Gaussian length penalty, in words (6 in CIDEr-D).

    Example:
        >>> reward = CaptionReward([[[5, 6, 7, 2]], [[8, 9, 2]]], eos_token_id=2, pad_token_id=0)  # <eos> is 2
        >>> samples = torch.tensor([[5, 6, 7, 2, 0], [5, 6, 7, 0, 0], [8, 9, 2, 0, 0]])  # (N, T)
        >>> [round(score, 3) for score in reward(samples, torch.tensor([0, 0, 0])).tolist()]
        [10.0, 6.222, 0.0]
    """

    def __init__(
        self,
        references: Sequence[Sequence[Sequence[int]]],
        *,
        eos_token_id: int,
        pad_token_id: int,
        bleu4_weight: float = 0.0,
        sigma: float = 6.0,
    ) -> None:
        if not math.isfinite(bleu4_weight):
            raise ValueError(f"bleu4_weight must be a finite number, got {bleu4_weight}")
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        self.eos_token_id = int(eos_token_id)
        self.pad_token_id = int(pad_token_id)
        self.bleu4_weight = float(bleu4_weight)
        self.sigma = float(sigma)

        lengths, references_per_image = _reference_lengths(references, self.eos_token_id)
        tokens = np.array(list(chain.from_iterable(chain.from_iterable(references))), dtype=np.int64)  # (tokens,)
        if tokens.min() < 0:
            raise ValueError(f"references hold a negative token id ({tokens.min()}): token ids are 0 or more")
        # Digits 1..max_id+1 are the references' ids, max_id+2 stands for any id that no reference holds.
        self._base = int(tokens.max()) + 3
        if self._base > _LARGEST_BASE:
            raise ValueError(
                f"references hold token id {tokens.max()}: CaptionReward codes 4-grams in 64 bits, which allows "
                f"ids up to {_LARGEST_BASE - 3}"
            )
        self.num_images = len(references)
        self._log_num_images = math.log(self.num_images)
        self._references_per_image = references_per_image  # (images,)
        self._build_reference_tables(tokens + 1, lengths)

    def _build_reference_tables(self, digits: np.ndarray, lengths: np.ndarray) -> None:
        """Document frequencies, and each image's n-gram counts per reference, norms and lengths, as arrays."""
        num_references = len(lengths)
        image_of_reference = np.repeat(np.arange(self.num_images), self._references_per_image)  # (references,)
        first_reference = np.cumsum(self._references_per_image) - self._references_per_image  # (images,)
        column_of_reference = np.arange(num_references) - np.repeat(first_reference, self._references_per_image)
        reference_of_token = np.repeat(np.arange(num_references), lengths)  # (tokens,)
        position_in_reference = np.arange(len(digits)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        codes, orders, references = [], [], []
        for order in range(1, MAX_ORDER + 1):
            starts = np.flatnonzero(position_in_reference + order <= lengths[reference_of_token])
            codes.append(_ngram_codes(digits, starts, order, self._base))
            orders.append(np.full(len(starts), order, dtype=np.int8))
            references.append(reference_of_token[starts])
        codes, orders, references = np.concatenate(codes), np.concatenate(orders), np.concatenate(references)

        # Every distinct n-gram of the references gets an index into the sorted table of their codes.
        by_code = np.argsort(codes)
        sorted_codes = codes[by_code]
        new_code = np.ones(len(codes), dtype=bool)
        new_code[1:] = sorted_codes[1:] != sorted_codes[:-1]
        self._ngram_codes = sorted_codes[new_code]  # (ngrams,)
        num_ngrams = len(self._ngram_codes)
        ngram_order = orders[by_code][new_code]  # (ngrams,)
        ngram_index = np.empty(len(codes), dtype=np.int64)
        ngram_index[by_code] = np.cumsum(new_code) - 1

        # Sorted by (image, n-gram, reference), the n-gram occurrences give each reference's count of each n-gram,
        # and each image's distinct n-grams, whose number per n-gram is its document frequency.
        max_references = int(self._references_per_image.max())
        image_ngrams = image_of_reference[references] * num_ngrams + ngram_index
        keys, counts = np.unique(image_ngrams * max_references + column_of_reference[references], return_counts=True)
        image_ngram, column = np.divmod(keys, max_references)
        new_image_ngram = np.ones(len(keys), dtype=bool)
        new_image_ngram[1:] = image_ngram[1:] != image_ngram[:-1]
        self._image_ngram_codes = image_ngram[new_image_ngram]  # (image n-grams,) sorted
        image, reference_ngram_index = np.divmod(image_ngram, num_ngrams)
        document_frequency = np.bincount(reference_ngram_index[new_image_ngram], minlength=num_ngrams)
        self._idf = self._log_num_images - np.log(np.maximum(document_frequency, 1))  # (ngrams,)

        # Row r of the count table holds, per reference of its image, how often the image's n-gram r occurs in it.
        rows = np.cumsum(new_image_ngram) - 1
        count_type = np.uint16 if counts.max() <= np.iinfo(np.uint16).max else np.int64
        self._reference_counts = np.zeros((len(self._image_ngram_codes), max_references), dtype=count_type)
        self._reference_counts[rows, column] = counts

        reference_ngram_reference = first_reference[image] + column
        squared_weights = (counts * self._idf[reference_ngram_index]) ** 2
        slots = reference_ngram_reference * MAX_ORDER + ngram_order[reference_ngram_index] - 1
        norms = np.sqrt(np.bincount(slots, squared_weights, minlength=num_references * MAX_ORDER))
        self._reference_norms = np.zeros((self.num_images, max_references, MAX_ORDER))  # 0 where no reference
        self._reference_norms[image_of_reference, column_of_reference] = norms.reshape(num_references, MAX_ORDER)
        self._reference_lengths = np.zeros((self.num_images, max_references), dtype=np.int64)
        self._reference_lengths[image_of_reference, column_of_reference] = lengths
        self._has_reference = np.arange(max_references) < self._references_per_image[:, None]  # (images, refs)

    def __call__(self, samples: torch.LongTensor, image_indices: torch.LongTensor) -> torch.FloatTensor:
        """Reward each sample against the references of its image.

        Args:
            samples: ``(N, T)`` generated token ids without ``<sos>``. Each sample ends after its first ``<eos>``
                (counted as a word); what follows is ignored. A sample without ``<eos>`` is scored as it is,
                unfinished, up to its first pad.
            image_indices: ``(N,)`` the training image of each sample, an index into ``references``.

        Returns:
            ``(N,)`` float32 rewards on the device of ``samples``: CIDEr-D + ``bleu4_weight`` * BLEU-4.
        """
        tokens, lengths, images = self._check_inputs(samples, image_indices)
        rewards = self._cider_d_and_bleu4(tokens, lengths, images)
        return torch.from_numpy(rewards.astype(np.float32)).to(samples.device)

    def _check_inputs(self, samples: torch.Tensor, image_indices: torch.Tensor) -> tuple[np.ndarray, ...]:
        """The samples' token ids with their lengths, and the image indices, after checking their shapes and ranges."""
        if not isinstance(samples, torch.Tensor) or samples.dim() != 2:
            shape = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
            raise ValueError(f"samples must be a 2-D tensor of token ids (num_samples, length), got {shape}")
        if not _holds_integers(samples):
            raise ValueError(f"samples must hold integer token ids, got dtype {samples.dtype}")
        if not isinstance(image_indices, torch.Tensor) or tuple(image_indices.shape) != (len(samples),):
            shape = tuple(image_indices.shape) if isinstance(image_indices, torch.Tensor) else type(image_indices)
            raise ValueError(
                f"image_indices must be a 1-D tensor with one index per sample ({len(samples)}), got {shape}"
            )
        if not _holds_integers(image_indices):
            raise ValueError(f"image_indices must hold integer image indices, got dtype {image_indices.dtype}")
        tokens = samples.detach().cpu().numpy().astype(np.int64, copy=False)  # (N, T)
        images = image_indices.detach().cpu().numpy().astype(np.int64, copy=False)  # (N,)
        if images.size and (images.min() < 0 or images.max() >= self.num_images):
            bad = images[(images < 0) | (images >= self.num_images)][0]
            raise ValueError(
                f"image_indices holds {bad}, outside the {self.num_images} images given references (0 to "
                f"{self.num_images - 1})"
            )
        if tokens.size and tokens.min() < 0:
            raise ValueError(f"samples hold a negative token id ({tokens.min()}): token ids are 0 or more")
        return tokens, self._sample_lengths(tokens), images

    def _sample_lengths(self, tokens: np.ndarray) -> np.ndarray:
        """Words of each sample ``(N,)``: up to its first ``<eos>`` included, else up to its first pad, else all."""
        lengths = np.full(len(tokens), tokens.shape[1])
        is_eos = tokens == self.eos_token_id
        has_eos = is_eos.any(axis=1)
        lengths[has_eos] = is_eos[has_eos].argmax(axis=1) + 1
        if self.pad_token_id != self.eos_token_id:
            is_pad = tokens == self.pad_token_id
            unfinished = ~has_eos & is_pad.any(axis=1)
            lengths[unfinished] = is_pad[unfinished].argmax(axis=1)
        return lengths

    def _cider_d_and_bleu4(self, tokens: np.ndarray, lengths: np.ndarray, images: np.ndarray) -> np.ndarray:
        num_samples, length = tokens.shape
        # The batch's n-grams are told apart by codes of the batch's own distinct ids (the references' digits map
        # every id they lack to one digit), and looked up by their codes in the references' digits.
        batch_digits = np.unique(tokens, return_inverse=True)[1].reshape(-1) + 1
        batch_base = int(batch_digits.max(initial=0)) + 1
        if batch_base > _LARGEST_BASE:
            raise ValueError(
                f"samples hold {batch_base - 1} distinct token ids: CaptionReward allows {_LARGEST_BASE - 1}"
            )
        codes, batch_codes, orders, sample_of = [], [], [], []
        flat_digits = np.minimum(tokens.reshape(-1) + 1, self._base - 1)
        for order in range(1, MAX_ORDER + 1):
            sample_index, position = np.nonzero(np.arange(length) + order <= lengths[:, None])
            starts = sample_index * length + position
            codes.append(_ngram_codes(flat_digits, starts, order, self._base))
            batch_codes.append(_ngram_codes(batch_digits, starts, order, batch_base))
            orders.append(np.full(len(sample_index), order))
            sample_of.append(sample_index)
        codes, batch_codes = np.concatenate(codes), np.concatenate(batch_codes)
        orders, sample_of = np.concatenate(orders), np.concatenate(sample_of)
        # Each sample's distinct n-grams, with their counts.
        by_sample = np.lexsort((batch_codes, sample_of))
        batch_codes, sample_of = batch_codes[by_sample], sample_of[by_sample]
        distinct = np.ones(len(batch_codes), dtype=bool)
        distinct[1:] = (batch_codes[1:] != batch_codes[:-1]) | (sample_of[1:] != sample_of[:-1])
        first = np.flatnonzero(distinct)
        counts = np.diff(np.append(first, len(batch_codes)))  # (distinct n-grams of the batch,)
        codes, orders, sample_of = codes[by_sample][first], orders[by_sample][first], sample_of[first]
        slots = sample_of * MAX_ORDER + orders - 1  # (sample, order) of each n-gram

        # Document frequencies of the training references; an n-gram they never hold has df 0, so idf log(images).
        ngram_index = np.minimum(_sorted_search(self._ngram_codes, codes), len(self._ngram_codes) - 1)
        known = self._ngram_codes[ngram_index] == codes
        idf = np.where(known, self._idf[ngram_index], self._log_num_images)
        sample_norms = np.sqrt(np.bincount(slots, (counts * idf) ** 2, minlength=num_samples * MAX_ORDER))
        sample_norms = sample_norms.reshape(num_samples, MAX_ORDER)

        # The n-grams that the sample's image's references hold, with their count in each reference.
        image_codes = images[sample_of[known]] * len(self._ngram_codes) + ngram_index[known]
        rows = np.minimum(_sorted_search(self._image_ngram_codes, image_codes), len(self._image_ngram_codes) - 1)
        in_image = self._image_ngram_codes[rows] == image_codes
        shared = np.flatnonzero(known)[in_image]
        reference_counts = self._reference_counts[rows[in_image]]  # (shared n-grams, refs)
        sample_counts = counts[shared][:, None]
        clipped_products = np.minimum(sample_counts, reference_counts) * reference_counts * idf[shared][:, None] ** 2
        max_references = reference_counts.shape[1]
        dot = np.stack(
            [np.bincount(slots[shared], column, minlength=num_samples * MAX_ORDER) for column in clipped_products.T]
        )  # (refs, N * orders)
        dot = dot.reshape(max_references, num_samples, MAX_ORDER).transpose(1, 0, 2)  # (N, refs, orders)

        norm_products = sample_norms[:, None, :] * self._reference_norms[images]  # (N, refs, orders)
        cosine = np.divide(dot, norm_products, out=np.zeros(dot.shape), where=norm_products > 0)
        length_gap = lengths[:, None] - self._reference_lengths[images]  # (N, refs)
        penalty = np.exp(-(length_gap**2) / (2 * self.sigma**2))
        per_reference = cosine.mean(axis=2) * penalty * self._has_reference[images]  # (N, refs)
        rewards = 10.0 * per_reference.sum(axis=1) / self._references_per_image[images]  # (N,)
        if self.bleu4_weight:
            clipped_counts = np.minimum(counts[shared], reference_counts.max(axis=1))
            matches = np.bincount(slots[shared], clipped_counts, minlength=num_samples * MAX_ORDER)
            rewards = rewards + self.bleu4_weight * self._sentence_bleu4(
                matches.reshape(num_samples, MAX_ORDER), lengths, images
            )
        return rewards

    def _sentence_bleu4(self, matches: np.ndarray, lengths: np.ndarray, images: np.ndarray) -> np.ndarray:
        """Sentence BLEU-4 of each sample ``(N,)`` from its clipped n-gram matches ``(N, 4)``, as the module's
        docstring defines it."""
        totals = np.maximum(lengths[:, None] - np.arange(MAX_ORDER), 0)  # (N, 4) n-grams per order
        smoothing = np.array([0, 1, 1, 1])
        with np.errstate(divide="ignore", invalid="ignore"):
            log_precisions = np.log((matches + smoothing) / (totals + smoothing))
        geometric_mean = np.exp(log_precisions.mean(axis=1))
        geometric_mean[(matches[:, 0] == 0) | (lengths == 0)] = 0.0
        reference_lengths = self._reference_lengths[images]  # (N, refs)
        gap = np.where(
            self._has_reference[images], np.abs(reference_lengths - lengths[:, None]), np.iinfo(np.int64).max
        )
        closest = reference_lengths[np.arange(len(lengths)), np.lexsort((reference_lengths, gap))[:, 0]]
        brevity = np.exp(1 - closest / np.maximum(lengths, 1))
        return geometric_mean * np.where(lengths < closest, brevity, 1.0)


def _reference_lengths(references: Sequence[Sequence[Sequence[int]]], eos_token_id: int) -> tuple[np.ndarray, ...]:
    """Each reference's length and each image's number of references, after checking that all are usable."""
    if isinstance(references, (str, torch.Tensor, np.ndarray)) or len(references) == 0:
        raise ValueError("references must be a non-empty list with, per training image, its reference captions")
    lengths, references_per_image = [], []
    for image, image_references in enumerate(references):
        if len(image_references) == 0:
            raise ValueError(f"references[{image}] is empty: every image needs at least one reference caption")
        for index, reference in enumerate(image_references):
            if len(reference) == 0 or reference[-1] != eos_token_id:
                raise ValueError(
                    f"references[{image}][{index}] does not end with eos_token_id {eos_token_id}: append <eos> to "
                    "every reference, it counts as a word"
                )
            lengths.append(len(reference))
        references_per_image.append(len(image_references))
    return np.array(lengths, dtype=np.int64), np.array(references_per_image, dtype=np.int64)


def _holds_integers(tensor: torch.Tensor) -> bool:
    return not (tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool)


def _ngram_codes(digits: np.ndarray, starts: np.ndarray, order: int, base: int) -> np.ndarray:
    """The code of each n-gram of ``order`` words that begins at ``starts``: its ``digits`` in base ``base``."""
    codes = np.zeros(len(starts), dtype=np.int64)
    for offset in range(order):
        codes = codes * base + digits[starts + offset]
    return codes


def _sorted_search(table: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """``np.searchsorted(table, queries)``, with the queries searched in increasing order: a large table's binary
    searches then share the parts of it that they read."""
    order = np.argsort(queries)
    positions = np.empty(len(queries), dtype=np.int64)
    positions[order] = np.searchsorted(table, queries[order])
    return positions
