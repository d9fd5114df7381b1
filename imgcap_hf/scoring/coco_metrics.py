"""Captioning metrics computed exactly as coco-caption (pycocoevalcap 1.2) computes them.

Published captioning results (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D) come from the coco-caption toolkit. Its numbers
depend on details that other toolkits change: captions are tokenized by the Stanford PTB tokenizer (Java) and stripped
of punctuation tokens, BLEU uses the reference length closest to each candidate and is computed over the whole corpus,
and CIDEr-D takes its document frequencies from the references being evaluated (so a single image always scores 0,
and averaging CIDEr over batches is wrong). Score a whole split in one call, with all of its references.

Tokenization is coco-caption's own Java tokenizer when ``java`` is on the PATH (``ptb-java``: the scores are then
coco-caption's by construction) and otherwise our Python tokenizer (``python``), which follows the same conventions
and agrees with the Java one on every real caption we measured; every result says which one produced it. The scoring
itself is done by pycocoevalcap's own ``Bleu``, ``Cider`` and ``Rouge`` classes. METEOR runs pycocoevalcap's METEOR
1.5 jar and is only computed when ``java`` is on the PATH.
"""

from __future__ import annotations

import subprocess
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import pycocoevalcap.meteor.meteor as pycocoevalcap_meteor
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from .java_tokenizer import java_available, java_tokenize
from .python_tokenizer import python_tokenize

CAPTION_TOKENIZERS = ("auto", "ptb-java", "python")

_METEOR_JAR = Path(pycocoevalcap_meteor.__file__).with_name(pycocoevalcap_meteor.METEOR_JAR)
_METEOR_TIMEOUT_S = 600.0


def resolve_caption_tokenizer(tokenizer: str = "auto") -> str:
    """The tokenizer a metrics call will use: ``"auto"`` is ``"ptb-java"`` where ``java`` is on the PATH, else
    ``"python"``.

    Java is the default because its scores are coco-caption's by construction on any text, while the Python
    tokenizer is only known to agree on the captions it was measured on (README, "Evaluation and metrics").
    """
    if tokenizer not in CAPTION_TOKENIZERS:
        raise ValueError(f"unknown caption tokenizer {tokenizer!r}: choose one of {', '.join(CAPTION_TOKENIZERS)}")
    if tokenizer == "auto":
        return "ptb-java" if java_available() else "python"
    if tokenizer == "ptb-java" and not java_available():
        raise RuntimeError("tokenizer='ptb-java' needs `java` on the PATH; use tokenizer='python' or install Java")
    return tokenizer


def tokenize_captions_for_scoring(captions: Sequence[str], tokenizer: str = "auto") -> tuple[list[str], str]:
    """Tokenize captions as coco-caption does before scoring; returns the tokenized captions and the tokenizer used.

    With ``"auto"``, a Java tokenizer that fails (a broken JVM, too little memory) is reported with a warning and
    the Python tokenizer is used instead, so an evaluation at the end of a long training run is never lost.
    """
    resolved = resolve_caption_tokenizer(tokenizer)
    if resolved == "ptb-java":
        try:
            return java_tokenize(captions), resolved
        except RuntimeError as error:
            if tokenizer == "ptb-java":
                raise
            warnings.warn(f"{error}; tokenizing with the Python tokenizer instead", RuntimeWarning, stacklevel=2)
    return [python_tokenize(caption) for caption in captions], "python"


def _validate(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("predictions and references must be sequences (one entry per image), not a single string")
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references must have one entry per image: got {len(predictions)} predictions "
            f"and {len(references)} reference lists"
        )
    if len(predictions) == 0:
        raise ValueError("no images to score: predictions and references are empty")
    for index, (prediction, image_references) in enumerate(zip(predictions, references)):
        if not isinstance(prediction, str):
            raise TypeError(f"predictions[{index}] must be a string, got {type(prediction).__name__}")
        if isinstance(image_references, str):
            raise TypeError(f"references[{index}] must be a list of reference strings, got a single string")
        if len(image_references) == 0:
            raise ValueError(f"references[{index}] is empty: every image needs at least one reference caption")
        for reference_index, reference in enumerate(image_references):
            if not isinstance(reference, str):
                raise TypeError(
                    f"references[{index}][{reference_index}] must be a string, got {type(reference).__name__}"
                )
            if not reference.strip():
                raise ValueError(f"references[{index}][{reference_index}] is blank")


def _meteor_score(gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
    """Corpus METEOR 1.5 exactly as pycocoevalcap's ``Meteor`` computes it, with the same jar and protocol.

    pycocoevalcap's class can hang (it never reads the process's stderr) and deadlocks at garbage collection after a
    failure (it keeps a lock it never releases), so we drive the jar ourselves and kill it after a timeout.
    """
    command = ["java", "-jar", "-Xmx2G", _METEOR_JAR.name, "-", "-", "-stdio", "-l", "en", "-norm"]
    with subprocess.Popen(
        command, cwd=_METEOR_JAR.parent, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    ) as process:
        watchdog = threading.Timer(_METEOR_TIMEOUT_S, process.kill)  # a killed process ends any blocked read
        watchdog.start()
        try:
            return _meteor_exchange(process, gts, res)
        finally:
            watchdog.cancel()
            process.kill()


def _meteor_exchange(process: subprocess.Popen[bytes], gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
    """pycocoevalcap's dialogue with the jar: a SCORE line per image gives its statistics, then one EVAL line of all
    the statistics gives a score per image followed by the corpus score."""

    def send(line: str) -> None:
        process.stdin.write(f"{line}\n".encode())
        process.stdin.flush()

    def receive() -> str:
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"METEOR (java -jar {_METEOR_JAR.name}) stopped before returning a score")
        return line.decode().strip()

    statistics = []
    for image, references in gts.items():
        hypothesis = res[image][0].replace("|||", "").replace("  ", " ")
        send(" ||| ".join(("SCORE", *references, hypothesis)))
        statistics.append(receive())
    send(" ||| ".join(("EVAL", *statistics)))
    for _ in statistics:
        receive()
    return float(receive())


def compute_caption_metrics(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    include_meteor: bool | None = None,
    tokenizer: str = "auto",
) -> dict[str, float | int | str]:
    """Score generated captions against their references exactly as coco-caption does.

    Pass a whole split at once: BLEU is a corpus statistic and CIDEr-D's document frequencies come from all the
    references given, so scores of batches cannot be averaged (one image alone always has CIDEr 0).

    Args:
        predictions: One generated caption per image, raw text (it is tokenized here). An empty string is allowed
            and scores 0 for its image.
        references: For each image, its reference captions (at least one, none blank).
        include_meteor: Compute METEOR (needs Java). ``None`` computes it when ``java`` is on the PATH and leaves
            it out, with a warning, if the jar fails; ``True`` requires it; ``False`` skips it.
        tokenizer: ``"auto"`` (coco-caption's Java tokenizer where ``java`` is on the PATH, else ours),
            ``"ptb-java"`` (required) or ``"python"``.

    Returns:
        ``bleu_1``..``bleu_4``, ``cider`` (CIDEr-D), ``rouge_l``, ``meteor`` when computed, ``num_images``, and
        ``tokenizer``: the caption tokenizer that produced these scores (``"ptb-java"`` or ``"python"``).

    Raises:
        TypeError, ValueError: Inputs of the wrong shape, or an unknown tokenizer; the message says which.
        RuntimeError: ``include_meteor=True`` or ``tokenizer="ptb-java"`` and Java is missing or fails.

    Example:
        >>> scores = compute_caption_metrics(
        ...     ["a dog runs on the grass", "two men ride bikes"],
        ...     [["A dog is running on the grass .", "A brown dog runs ."], ["Two men riding bicycles ."]],
        ...     include_meteor=False,
        ... )
        >>> round(scores["bleu_1"], 4), scores["num_images"]
        (0.7239, 2)
    """
    _validate(predictions, references)
    resolve_caption_tokenizer(tokenizer)  # an unknown name or a missing Java fails before any work
    if include_meteor and not java_available():
        raise RuntimeError("include_meteor=True but no `java` on the PATH: METEOR runs a Java jar")
    # One tokenizer call for the whole split: the Java tokenizer then starts one JVM, not one per caption.
    flat_references = [reference for image_references in references for reference in image_references]
    tokenized, tokenizer_used = tokenize_captions_for_scoring([*predictions, *flat_references], tokenizer)
    res = {image: [tokenized[image]] for image in range(len(predictions))}
    gts, start = {}, len(predictions)
    for image, image_references in enumerate(references):
        gts[image] = tokenized[start : start + len(image_references)]
        start += len(image_references)

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    rouge_l, _ = Rouge().compute_score(gts, res)
    scores: dict[str, float | int | str] = {f"bleu_{n}": float(bleu[n - 1]) for n in range(1, 5)}
    scores["cider"] = float(cider)
    scores["rouge_l"] = float(rouge_l)
    if include_meteor or (include_meteor is None and java_available()):
        try:
            scores["meteor"] = _meteor_score(gts, res)
        except (OSError, RuntimeError, ValueError) as error:
            if include_meteor:
                raise RuntimeError(f"METEOR failed: {error}") from error
            warnings.warn(f"METEOR left out: {error}", RuntimeWarning, stacklevel=2)
    scores["num_images"] = len(predictions)
    scores["tokenizer"] = tokenizer_used
    return scores
