"""How much faster ImgCap-HF is than the published ImgCap code, measured in one process on the same machine.

The published attention captioner decodes one word at a time and recomputes its attention over `[features; hidden]`
concatenations at every step, encodes the image again for every caption, loops over the batch in Python to find
`<eos>`, and runs beam search one image at a time with a Python list of candidate beams. `ReferenceImgCap` below is
that design written plainly; `ImgCapForConditionalGeneration` is ours. Both are built here at the published sizes
with the same random weights (ours are copied into the reference) and get the same inputs. Before anything is timed,
`check_equivalence` verifies that they compute the same model (teacher-forced logits, greedy and beam-search captions)
and the run aborts otherwise, so no speed is bought with a different model.

Usage (from the repository root, with the package installed: `make install` or `pip install -e .`):

    python benchmarks/benchmark_imgcap.py                    # full size: ResNet-50, 2 x 1024 LSTM, 4,096 words
    python benchmarks/benchmark_imgcap.py --quick            # checks the script runs, not the speed (tiny sizes)
    python benchmarks/benchmark_imgcap.py --only beam,latency --repeats 5 --json results.json

Measures (`--only` names): `train` (training step with the encoder), `decoder` (training step on precomputed
features), `epoch` (N images x 5 captions: feature cache vs encoding every step), `beam` (beam-5 and greedy
captions/s), `latency` (one image, beam 3), `memory` (peak resident memory, each in a fresh subprocess), `bf16`
(autocast speed and caption agreement), `inference` (the CPU inference settings of `imgcap_hf.inference` against
fp32 and the reference: beam 5 on 4 and 16 images, one image at beam 3, greedy captions/s at batch 16).

The full-size table has a `bound` column for inference rows: the time that reading the decoder's per-step weights
once per generated word at this machine's measured memory bandwidth (a 64 MB tensor copy), plus the encoder's FLOPs
at its measured peak FLOP rate (a 2048 x 2048 float32 matmul), would take; for a rate, the captions/s that allows.

`--quick` (what tests/test_benchmark.py runs) checks the script, not the speed: at tiny sizes the timings mean
nothing, so it reports the times without ratios or targets.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModel
from transformers.modeling_outputs import BaseModelOutput

from imgcap_hf import ImgCapConfig, ImgCapForConditionalGeneration
from imgcap_hf.inference import candidate_precisions, optimize_for_cpu

MEASURES = ("train", "decoder", "epoch", "beam", "latency", "memory", "bf16", "inference")
TINY_RESNET = {"model_type": "resnet", "depths": [1, 1, 1, 1], "hidden_sizes": [8, 16, 24, 32], "embedding_size": 8}


@dataclass(frozen=True)
class Sizes:
    """Model sizes and workloads. `FULL` is the published configuration; `QUICK` is tiny, for the test."""

    vision_config: dict | None  # None: transformers' ResNetConfig(), the ResNet-50 architecture
    image_size: int
    region_grid_size: int
    vocab_size: int
    embedding_size: int
    hidden_size: int
    attention_size: int
    num_hidden_layers: int = 2
    batch_size: int = 16  # training step: captions, each of its own image
    large_batch_size: int = 128  # the published recipe's batch, timed once for the decoder-only step
    caption_length: int = 20
    max_new_tokens: int = 20
    num_beams: int = 5
    latency_beams: int = 3
    decode_images: int = 16  # images captioned per call in the beam/greedy measure
    reference_beam_images: int = 4  # the reference's one-image-at-a-time beam search is timed on fewer images
    epoch_images: int = 8
    captions_per_image: int = 5
    epoch_images_per_batch: int = 4  # x 5 captions = 20 captions per step, for ours and the reference alike
    check_images: int = 3


FULL = Sizes(
    vision_config=None, image_size=224, region_grid_size=7, vocab_size=4096, embedding_size=1024, hidden_size=1024,
    attention_size=1024,
)  # fmt: skip
QUICK = Sizes(
    vision_config=TINY_RESNET, image_size=64, region_grid_size=2, vocab_size=64, embedding_size=16, hidden_size=32,
    attention_size=16, batch_size=4, large_batch_size=8, caption_length=6, max_new_tokens=6, decode_images=4,
    reference_beam_images=2, epoch_images=4, epoch_images_per_batch=2, check_images=4,
)  # fmt: skip


# ====================================================================================================================
# The reference: the published architecture and decoding, written the straightforward way
# ====================================================================================================================


class ReferenceAttention(nn.Module):
    """score_i = w^T tanh(W [feature_i ; h]) with W: Linear(2048 + 1024 -> 1024), w: Linear(1024 -> 1), as published.

    The concatenation, and so the 49 x 3072 x 1024 product, is recomputed at every step for every caption or beam.
    """

    def __init__(self, feature_size: int, hidden_size: int, attention_size: int):
        super().__init__()
        self.W = nn.Linear(feature_size + hidden_size, attention_size)
        self.w = nn.Linear(attention_size, 1)

    def forward(self, features: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = hidden.unsqueeze(1).expand(-1, features.shape[1], -1)  # (batch, regions, hidden)
        scores = self.w(torch.tanh(self.W(torch.cat([features, hidden], dim=2)))).squeeze(2)  # (batch, regions)
        alpha = scores.softmax(dim=1)
        context = (features * alpha.unsqueeze(2)).sum(dim=1)  # (batch, feature_size)
        return context, alpha


class ReferenceImgCap(nn.Module):
    """The published attention captioner: frozen ResNet-50 conv layers pooled to 7x7, attention, 2 LSTM cells.

    Sizes are read from an `ImgCapConfig` so that both models are built from one description. The backbone is
    transformers' ResNet-50 (the published code used torchvision's, the same architecture). Its BatchNorm stays in
    eval mode, as in ours, so both encoders do identical work.
    """

    def __init__(self, config: ImgCapConfig):
        super().__init__()
        self.config = config
        self.backbone = AutoModel.from_config(config.vision_config)
        self.backbone.requires_grad_(False)  # "frozen conv layers", but no torch.no_grad around the call
        self.pool = nn.AdaptiveAvgPool2d(config.region_grid_size)
        feature_size = config.vision_feature_size
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_size)
        self.attention = ReferenceAttention(feature_size, config.hidden_size, config.attention_size)
        input_sizes = [config.embedding_size + feature_size] + [config.hidden_size] * (config.num_hidden_layers - 1)
        self.cells = nn.ModuleList(nn.LSTMCell(size, config.hidden_size) for size in input_sizes)
        self.dropout = nn.Dropout(config.dropout)
        self.fc = nn.Linear(config.hidden_size, config.vocab_size)

    def train(self, mode: bool = True) -> ReferenceImgCap:
        super().train(mode)
        self.backbone.eval()
        return self

    @torch.no_grad()
    def load_from(self, ours: ImgCapForConditionalGeneration) -> ReferenceImgCap:
        """Copy our weights: the split attention `W_r`, `W_h` concatenate into W, everything else maps 1:1."""
        decoder = ours.decoder
        self.backbone.load_state_dict(ours.encoder.backbone.state_dict())
        self.embedding.load_state_dict(decoder.embedding.state_dict())
        attention = decoder.attention
        self.attention.W.weight.copy_(
            torch.cat([attention.region_projection.weight, attention.hidden_projection.weight], dim=1)
        )  # (attention, feature + hidden)
        self.attention.W.bias.copy_(attention.region_projection.bias)
        self.attention.w.load_state_dict(attention.score.state_dict())
        self.cells.load_state_dict(decoder.cells.state_dict())
        self.fc.load_state_dict(decoder.output.state_dict())
        return self

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        features = self.pool(self.backbone(pixel_values=images).last_hidden_state)  # (batch, 2048, 7, 7)
        return features.flatten(2).permute(0, 2, 1)  # (batch, 49, 2048)

    def initial_state(self, batch_size: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        zeros = torch.zeros(batch_size, self.config.hidden_size)
        return [zeros] * len(self.cells), [zeros] * len(self.cells)

    def step(
        self, words: torch.Tensor, features: torch.Tensor, h: list[torch.Tensor], c: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """One word for every row: logits `(batch, vocab)` and the new per-layer states."""
        context, _ = self.attention(features, h[-1])
        layer_input = torch.cat([self.embedding(words), context], dim=1)  # (batch, embedding + feature)
        new_h, new_c = [], []
        for layer, cell in enumerate(self.cells):
            hidden, cell_state = cell(layer_input, (h[layer], c[layer]))
            new_h.append(hidden)
            new_c.append(cell_state)
            layer_input = self.dropout(hidden)
        return self.fc(layer_input), new_h, new_c

    def decode(self, features: torch.Tensor, captions: torch.Tensor, teacher_forcing_ratio: float) -> torch.Tensor:
        """Logits `(batch, steps, vocab)` for `captions` (`<sos> w1 ... w_{n-1}`), one step at a time. Teacher forcing
        is drawn per step for the whole batch, as in the published training loop."""
        h, c = self.initial_state(features.shape[0])
        words = captions[:, 0]
        outputs = []
        for t in range(captions.shape[1]):
            logits, h, c = self.step(words, features, h, c)
            outputs.append(logits)
            if t + 1 < captions.shape[1]:
                use_truth = torch.rand(()).item() < teacher_forcing_ratio
                words = captions[:, t + 1] if use_truth else logits.argmax(dim=1)
        return torch.stack(outputs, dim=1)

    def forward(self, images: torch.Tensor, captions: torch.Tensor, teacher_forcing_ratio: float) -> torch.Tensor:
        return self.decode(self.encode(images), captions, teacher_forcing_ratio)

    @torch.no_grad()
    def greedy(self, images: torch.Tensor, max_new_tokens: int) -> list[list[int]]:
        """Batched greedy decoding that, like the published code, checks every caption for `<eos>` in Python."""
        sos, eos = self.config.decoder_start_token_id, self.config.eos_token_id
        features = self.encode(images)
        h, c = self.initial_state(len(images))
        words = torch.full((len(images),), sos)
        captions = [[sos] for _ in range(len(images))]
        finished = [False] * len(images)
        for _ in range(max_new_tokens):
            logits, h, c = self.step(words, features, h, c)
            words = logits.argmax(dim=1)
            for i, word in enumerate(words.tolist()):
                if not finished[i]:
                    captions[i].append(word)
                    finished[i] = word == eos
            if all(finished):
                break
        return captions

    @torch.no_grad()
    def beam_search(self, image: torch.Tensor, num_beams: int, max_new_tokens: int) -> tuple[list[int], float]:
        """Beam search for one image `(1, 3, H, W)`: a Python list of (score, words, state) beams, each expanded on its
        own (attention recomputed per candidate), scores summed without length normalisation. A beam that emitted
        `<eos>` keeps its place in the list. Returns the best caption and its summed log-probability."""
        sos, eos = self.config.decoder_start_token_id, self.config.eos_token_id
        features = self.encode(image)  # (1, 49, 2048)
        beams = [(0.0, [sos], self.initial_state(1))]
        for _ in range(max_new_tokens):
            candidates = []
            for score, words, (h, c) in beams:
                if words[-1] == eos:
                    candidates.append((score, words, (h, c)))
                    continue
                logits, new_h, new_c = self.step(torch.tensor([words[-1]]), features, h, c)
                top_log_probs, top_ids = F.log_softmax(logits[0], dim=-1).topk(num_beams)
                for log_prob, word in zip(top_log_probs.tolist(), top_ids.tolist()):
                    candidates.append((score + log_prob, words + [word], (new_h, new_c)))
            beams = sorted(candidates, key=lambda beam: beam[0], reverse=True)[:num_beams]
            if all(words[-1] == eos for _, words, _ in beams):
                break
        score, words, _ = beams[0]
        return words, score

    @torch.no_grad()
    def sequence_log_prob(self, image: torch.Tensor, words: list[int]) -> tuple[float, torch.Tensor]:
        """Summed log-probability of `words[1:]` given `<sos>` (teacher-forced), and the per-step logits."""
        captions = torch.tensor([words[:-1]])
        logits = self(image, captions, teacher_forcing_ratio=1.0)[0]  # (steps, vocab)
        log_probs = F.log_softmax(logits, dim=-1).gather(1, torch.tensor(words[1:]).unsqueeze(1))
        return float(log_probs.sum()), logits


# ====================================================================================================================
# Building both models and their inputs
# ====================================================================================================================


def build_config(sizes: Sizes) -> ImgCapConfig:
    kwargs = {} if sizes.vision_config is None else {"vision_config": dict(sizes.vision_config)}
    return ImgCapConfig(
        **kwargs, decoder_type="attention", vocab_size=sizes.vocab_size, embedding_size=sizes.embedding_size,
        hidden_size=sizes.hidden_size, attention_size=sizes.attention_size, num_hidden_layers=sizes.num_hidden_layers,
        region_grid_size=sizes.region_grid_size, teacher_forcing_ratio=0.9,
    )  # fmt: skip


def build_models(sizes: Sizes, seed: int = 0) -> tuple[ImgCapForConditionalGeneration, ReferenceImgCap]:
    """Ours with random weights (no Hub access: the ResNet-50 is random too) and the reference holding a copy."""
    torch.manual_seed(seed)
    config = build_config(sizes)
    ours = ImgCapForConditionalGeneration(config).eval()
    reference = ReferenceImgCap(config).load_from(ours).eval()
    return ours, reference


def trainable_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)


def random_images(sizes: Sizes, count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, sizes.image_size, sizes.image_size, generator=generator)  # (count, 3, H, W)


def random_labels(sizes: Sizes, count: int, seed: int) -> torch.Tensor:
    """`(count, caption_length)` next-word targets: random words, then `<eos>`. No padding: every step counts."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(4, sizes.vocab_size, (count, sizes.caption_length), generator=generator)
    labels[:, -1] = 3
    return labels


def shift_right(labels: torch.Tensor, config: ImgCapConfig) -> torch.Tensor:
    """The reference is fed `<sos> w1 ... w_{n-1}` and predicts `w1 ... w_n`, as ours builds it from `labels`."""
    captions = labels.roll(1, dims=1)  # (batch, steps)
    captions[:, 0] = config.decoder_start_token_id
    return captions


def trim(words: list[int], eos: int) -> list[int]:
    """A generated caption up to and including its first `<eos>`, without the padding generate() adds after it."""
    return words[: words.index(eos) + 1] if eos in words else words


@contextlib.contextmanager
def weights_restored(*models: nn.Module) -> Iterator[None]:
    """Training measures update the weights; put them back so every measure starts from the same models."""
    saved = [{name: tensor.clone() for name, tensor in model.state_dict().items()} for model in models]
    try:
        yield
    finally:
        for model, state in zip(models, saved):
            model.load_state_dict(state)
            model.eval()


# ====================================================================================================================
# Correctness: the same model, or no timing at all
# ====================================================================================================================


class EquivalenceError(RuntimeError):
    """Ours and the reference do not compute the same model: any speed comparison would be meaningless."""


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def check_equivalence(
    ours: ImgCapForConditionalGeneration, reference: ReferenceImgCap, sizes: Sizes, seed: int = 123
) -> list[str]:
    """Checks that ours and the reference compute the same captioner; returns one line per check, raises
    `EquivalenceError` with the reason otherwise. Teacher forcing is off (eval mode, ratio 1)."""
    ours.eval()
    reference.eval()
    eos = ours.config.eos_token_id
    images = random_images(sizes, sizes.check_images, seed)
    labels = random_labels(sizes, sizes.check_images, seed + 1)
    lines = []

    # 1. Teacher-forced logits: the split attention W_r r + W_h h equals the published W [r; h].
    with torch.no_grad():
        our_logits = ours(pixel_values=images, labels=labels).logits
        reference_logits = reference(images, shift_right(labels, ours.config), teacher_forcing_ratio=1.0)
    difference = (our_logits - reference_logits).abs().max().item()
    scale = reference_logits.abs().max().item()
    if not difference <= 1e-4 * max(1.0, scale):
        raise EquivalenceError(f"teacher-forced logits differ by {difference:.3g} (largest logit {scale:.3g}).")
    lines.append(f"teacher-forced logits equal: largest difference {difference:.2g} (largest logit {scale:.3g})")

    # 2. Greedy captions, token for token. A float-rounding near-tie may flip one argmax: only that is forgiven.
    with torch.no_grad():
        our_greedy = ours.generate(pixel_values=images, max_new_tokens=sizes.max_new_tokens, do_sample=False)
    reference_greedy = reference.greedy(images, sizes.max_new_tokens)
    ties = 0
    for index, (mine, theirs) in enumerate(zip(our_greedy.tolist(), reference_greedy)):
        mine = trim(mine, eos)
        if mine == theirs:
            continue
        position = first_difference(mine, theirs)
        gap = math.inf  # one caption stopping early without a differing word is no near-tie
        if position < min(len(mine), len(theirs)):
            _, logits = reference.sequence_log_prob(images[index : index + 1], theirs)  # (words - 1, vocab)
            gap = (logits[position - 1, theirs[position]] - logits[position - 1, mine[position]]).abs().item()
        if gap > 1e-4:
            raise EquivalenceError(
                f"greedy captions differ for image {index} at word {position} (logit gap {gap:.3g}): "
                f"ours {mine}, reference {theirs}."
            )
        ties += 1
    lines.append(
        f"greedy captions equal (token ids) on {len(images)} images"
        + (f", {ties} after a float near-tie (logit gap <= 1e-4)" if ties else "")
    )

    # 3. Beam search with un-normalised scores (length_penalty=0): without <eos> both searches keep the same beams.
    # When a beam ends early they differ by design: transformers sets finished captions aside and keeps num_beams
    # running beams, while the reference lets a finished beam hold one of its num_beams places. Then our reported
    # score must still be the reference model's log-probability of our caption.
    with torch.no_grad():
        output = ours.generate(
            pixel_values=images, num_beams=sizes.num_beams, max_new_tokens=sizes.max_new_tokens, length_penalty=0.0,
            do_sample=False, output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
    same, rescored = 0, []
    for index, (mine, our_score) in enumerate(zip(output.sequences.tolist(), output.sequences_scores.tolist())):
        mine = trim(mine, eos)
        image = images[index : index + 1]
        theirs, their_score = reference.beam_search(image, sizes.num_beams, sizes.max_new_tokens)
        if mine == theirs:
            if abs(our_score - their_score) > 1e-3 * max(1.0, abs(their_score)):
                raise EquivalenceError(f"beam scores differ for image {index}: ours {our_score}, ref {their_score}.")
            same += 1
            continue
        ended_early = eos in mine or eos in theirs
        our_log_prob, _ = reference.sequence_log_prob(image, mine)
        near_tie = abs(our_score - their_score) <= 1e-4 * max(1.0, abs(their_score))
        if not (ended_early or near_tie) or abs(our_log_prob - our_score) > 1e-3 * max(1.0, abs(our_score)):
            raise EquivalenceError(
                f"beam search differs for image {index}: ours {mine} (score {our_score:.4f}, reference model "
                f"log-probability {our_log_prob:.4f}), reference {theirs} (score {their_score:.4f})."
            )
        rescored.append(f"image {index}: ours {our_score:.3f} vs reference {their_score:.3f}")
    line = f"beam search (beam {sizes.num_beams}, length_penalty=0) equal on {same} of {len(images)} images"
    if rescored:
        line += (
            "; the others ended early (<eos>), where the searches differ by design, and our score equals the "
            "reference model's log-probability of our caption (" + "; ".join(rescored) + ")"
        )
    lines.append(line)
    return lines


# ====================================================================================================================
# Timing, profiling, memory
# ====================================================================================================================


def time_calls(calls: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall times of each call, `repeats` times after `warmup` rounds. The calls alternate, so that a noisy neighbour
    on a shared machine slows all of them alike rather than one of them."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Send what C++ code writes to file descriptor 2 to /dev/null meanwhile: torch's profiler (Kineto) logs
    `USDT: ... profiler_start` lines there that no setting turns off. Python exceptions still propagate."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def profile_top_ops(call: Callable[[], object], count: int = 5) -> list[str]:
    """The operators (with their input shapes) that took most of one call's CPU time, per torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler:
        call()
    events = profiler.key_averages(group_by_input_shape=True)
    total = sum(event.self_cpu_time_total for event in events) or 1.0
    top = sorted(events, key=lambda event: event.self_cpu_time_total, reverse=True)[:count]
    return [
        f"{event.key} {event.input_shapes} x{event.count}: {100 * event.self_cpu_time_total / total:.0f}%"
        for event in top
    ]


def peak_resident_mb() -> float:
    """This process's peak resident memory in MB.

    Linux: `VmHWM` from /proc/self/status. `getrusage(RUSAGE_SELF).ru_maxrss` would be wrong in a subprocess: Linux
    carries the parent's peak over the fork, so every child of a large parent reports at least the parent's size.
    Elsewhere `ru_maxrss` (a child of a large parent may then over-report).
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / (1024 if sys.platform == "darwin" else 1)  # bytes on macOS, KiB elsewhere


def peak_rss_probe(implementation: str, workload: str, quick: bool) -> dict[str, float]:
    """Run in a fresh interpreter: build one implementation, run one workload, report peak resident memory (MB).

    `baseline_mb` is the peak after the imports (the interpreter, torch and transformers), before the model exists.
    """
    baseline = peak_resident_mb()
    sizes = QUICK if quick else FULL
    torch.manual_seed(0)
    config = build_config(sizes)
    model = ImgCapForConditionalGeneration(config) if implementation == "ours" else ReferenceImgCap(config)
    if workload == "inference":
        model.eval()
        image = random_images(sizes, 1, seed=5)
        with torch.no_grad():
            if implementation == "ours":
                model.generate(pixel_values=image, num_beams=sizes.latency_beams, max_new_tokens=sizes.max_new_tokens)
            else:
                model.beam_search(image, sizes.latency_beams, sizes.max_new_tokens)
    else:
        model.train()
        images = random_images(sizes, sizes.batch_size, seed=6)
        labels = random_labels(sizes, sizes.batch_size, seed=7)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=4e-4, weight_decay=1e-4)
        if implementation == "ours":
            loss = model(pixel_values=images, labels=labels).loss
        else:
            captions = shift_right(labels, config)
            loss = F.cross_entropy(model(images, captions, 0.9).flatten(0, 1), labels.flatten())
        loss.backward()
        optimizer.step()
    return {"baseline_mb": baseline, "peak_mb": peak_resident_mb()}


PROBE_CODE = (
    "import json, runpy, sys; probe = runpy.run_path(sys.argv[1])['peak_rss_probe']; "
    "print(json.dumps(probe(sys.argv[2], sys.argv[3], sys.argv[4] == 'quick')))"
)


def measure_peak_rss(quick: bool) -> dict[tuple[str, str], dict[str, float]]:
    """Peak RSS of ours and the reference, for inference and training, each in its own fresh subprocess.

    The four processes run at the same time (memory, not speed, is measured: each reads only its own peak).
    """
    processes = {
        (implementation, workload): subprocess.Popen(
            [sys.executable, "-c", PROBE_CODE, __file__, implementation, workload, "quick" if quick else "full"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for implementation in ("ours", "reference")
        for workload in ("inference", "training")
    }
    results = {}
    for key, process in processes.items():
        stdout, stderr = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"the {key[0]} {key[1]} memory probe failed: {stderr.strip().splitlines()[-1:]}")
        results[key] = json.loads(stdout.strip().splitlines()[-1])
    return results


# ====================================================================================================================
# Results
# ====================================================================================================================


@dataclass
class Row:
    """One line of the table. `ratio` says how many times better ours is: faster, or smaller in memory."""

    what: str
    ours: float
    reference: float | None
    unit: str
    ratio: float | None = None
    target: str = ""
    met: bool | None = None
    samples: dict[str, list[float]] = field(default_factory=dict)
    why: list[str] = field(default_factory=list)  # filled in where a target is missed
    bound: float | None = None  # inference rows: what the machine's bandwidth and FLOP rate allow (`MachineLimits`)


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value:.3f} s" if value < 10 else f"{value:.1f} s"
    if unit == "MB":
        return f"{value:,.0f} MB"
    if unit == "fraction":
        return f"{value:.2f}"
    return f"{value:.3g} {unit}" if value < 100 else f"{value:,.0f} {unit}"


def format_table(rows: list[Row], judge_speed: bool = True) -> str:
    """The results as a Markdown table; without `judge_speed` (--quick) only the times, no ratio or target."""
    if not judge_speed:
        lines = ["| what | ours | reference |", "|---|---|---|"]
        lines += [f"| {row.what} | {format_value(row.ours, row.unit)} | {format_value(row.reference, row.unit)} |"
                  for row in rows]  # fmt: skip
        return "\n".join(lines)
    lines = ["| what | ours | reference | ratio | target | met? | bound |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        ratio = f"{row.ratio:.1f}x" if row.ratio is not None else "-"
        met = {True: "yes", False: "**no**", None: "-"}[row.met]
        lines.append(
            f"| {row.what} | {format_value(row.ours, row.unit)} | {format_value(row.reference, row.unit)} | "
            f"{ratio} | {row.target or '-'} | {met} | {format_value(row.bound, row.unit)} |"
        )
    return "\n".join(lines)


def load_average_line() -> str:
    """The 1, 5 and 15 minute load averages, "nan" each where the system has none (Windows)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return f"{load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}"


def machine_line() -> str:
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {cores} cores available, {gpu}; Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, torch.get_num_threads() = {torch.get_num_threads()}"
    )


def time_row(what: str, ours: list[float], reference: list[float], per: int = 1) -> Row:
    """Median seconds per call (divided by `per`), ours vs a baseline; ratio = baseline time / our time."""
    ours_seconds, reference_seconds = median(ours) / per, median(reference) / per
    samples = {"ours": ours, "reference": reference}
    return Row(what, ours_seconds, reference_seconds, "s", reference_seconds / ours_seconds, samples=samples)


def rate_row(what: str, ours: list[float], reference: list[float], ours_count: int, reference_count: int) -> Row:
    """Captions per second from the median call times; ratio = our rate / the reference's."""
    ours_rate, reference_rate = ours_count / median(ours), reference_count / median(reference)
    samples = {"ours": ours, "reference": reference}
    return Row(what, ours_rate, reference_rate, "captions/s", ours_rate / reference_rate, samples=samples)


# ====================================================================================================================
# The measures
# ====================================================================================================================

LSTM_HINT = (
    "What is left: both implementations run the LSTM one word at a time, and at every word the forward products and "
    "the input-gradient products read every decoder weight (about 120 MB in float32) for a batch of 16-20 rows, "
    "which is memory-bound work the reference pays alike (ours already gathers the weight gradients into one product "
    "per pass and projects each image once). What would close it: bf16 autocast (half the bytes; the bf16 rows), or "
    "the published batch of 128 (the batch-128 row), where the per-word products fill the CPU's matrix units and the "
    "reference's per-word attention over [features; hidden] becomes the larger cost."
)
ENCODER_HINT = (
    "What would close it: the encoder is the same ResNet-50 work in both implementations, so it bounds the ratio; "
    "bf16 autocast speeds both halves on CPUs with bf16 matrix units, and a GPU makes the encoder almost free."
)


@dataclass
class Bench:
    """Everything the measures share: both models, sizes, repeats, and where the rows go."""

    ours: ImgCapForConditionalGeneration
    reference: ReferenceImgCap
    sizes: Sizes
    repeats: int
    judge_speed: bool = True  # False under --quick: tiny sizes say nothing about speed
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    limits: MachineLimits | None = None  # measured on first use by `bound_seconds`

    def bound_seconds(self, images: int, steps: int, precision: str = "fp32") -> float:
        """What this machine's bandwidth and FLOP rate allow for captioning `images` images in `steps` steps with our
        model in `precision` (`MachineLimits`)."""
        if self.limits is None:
            self.limits = MachineLimits.measure(self.ours, self.sizes)
            self.notes.append(f"Bound column: {self.limits.describe()}.")
        step_bytes = step_weights(self.ours) * BYTES_PER_WEIGHT[precision]
        return self.limits.seconds(step_bytes, images, steps)

    def set_target(self, row: Row, target: str, met: bool, explain_miss: Callable[[], None]) -> None:
        """Give `row` its target and, where it is missed, the reasons (`explain_miss`). Under --quick no row gets a
        target: at tiny sizes a miss would only read as a failure of something that was never measured."""
        if not self.judge_speed:
            return
        row.target, row.met = target, met
        if not met:
            explain_miss()

    @property
    def slow_repeats(self) -> int:
        """Repeats for the measures where one reference call takes many seconds."""
        return max(1, min(self.repeats, 3))

    def optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        """AdamW as in the published recipe (lr 4e-4, weight decay 1e-4), over the trainable (decoder) weights."""
        return tuple(
            torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=4e-4, weight_decay=1e-4)
            for model in (self.ours, self.reference)
        )

    def encoder_seconds(self, images: torch.Tensor) -> float:
        """Our frozen encoder's time for `images`: work that both implementations do alike."""
        encoder = self.ours.get_encoder()
        with torch.no_grad():
            times = time_calls({"encoder": lambda: encoder(images)}, self.slow_repeats)
        return median(times["encoder"])

    def explain_miss(
        self, row: Row, our_call: Callable[[], object], hint: str, images: torch.Tensor | None = None,
        ours_seconds: float | None = None, reference_seconds: float | None = None,
    ) -> None:  # fmt: skip
        """Why a target was missed: the encoder's share of our time where it is included (the same work in the
        reference, so it bounds any ratio), where the rest goes (torch.profiler, one call), and what would help."""
        ours_seconds = ours_seconds if ours_seconds is not None else row.ours
        reference_seconds = reference_seconds if reference_seconds is not None else row.reference
        if images is not None:
            encoder = self.encoder_seconds(images)
            row.why.append(
                f"our frozen encoder alone takes {encoder:.3f} s of our {ours_seconds:.3f} s "
                f"({encoder / ours_seconds:.0%}); with a free decoder the ratio could reach at most "
                f"{reference_seconds / encoder:.1f}x"
            )
        row.why.append("top operators of one of our calls: " + "; ".join(profile_top_ops(our_call)))
        row.why.append(hint)


def train_step(loss: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()

    return step


def reference_loss(logits: torch.Tensor, labels: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=pad_token_id)


def time_training(
    bench: Bench, batch_size: int, with_encoder: bool, repeats: int
) -> tuple[dict, Callable, torch.Tensor]:
    """Times a training step (forward, backward, AdamW) of both models on `batch_size` captions of `caption_length`
    words, teacher forcing 0.9, each caption with its own image. With the encoder, both run it once per image: ours
    under no_grad, the reference as published (frozen weights, called every step). Weights are restored after."""
    ours, reference, sizes = bench.ours, bench.reference, bench.sizes
    images = random_images(sizes, batch_size, seed=10)
    labels = random_labels(sizes, batch_size, seed=11)
    captions = shift_right(labels, ours.config)
    pad = ours.config.pad_token_id
    with weights_restored(ours, reference):
        ours.train()
        reference.train()
        our_optimizer, reference_optimizer = bench.optimizers()
        if with_encoder:
            image_input, features = {"pixel_values": images}, None
        else:
            with torch.no_grad():
                features = ours.get_encoder()(images).last_hidden_state  # (batch, regions, feature_size)
            image_input = {"encoder_outputs": BaseModelOutput(last_hidden_state=features)}

        def our_loss() -> torch.Tensor:
            return ours(**image_input, labels=labels).loss

        def ref_loss() -> torch.Tensor:
            regions = reference.encode(images) if features is None else features  # encoded at every step
            return reference_loss(reference.decode(regions, captions, 0.9), labels, pad)

        our_step = train_step(our_loss, our_optimizer)
        times = time_calls({"ours": our_step, "reference": train_step(ref_loss, reference_optimizer)}, repeats)
    # The profiler may re-run our step when a target is missed: give it its own weights-restoring wrapper.
    return times, lambda: _restoring(bench, our_step), images


def _restoring(bench: Bench, call: Callable[[], object]) -> None:
    with weights_restored(bench.ours, bench.reference):
        bench.ours.train()
        call()


def measure_training(bench: Bench) -> None:
    sizes = bench.sizes
    times, our_step, images = time_training(bench, sizes.batch_size, True, bench.repeats)
    what = f"training step, batch {sizes.batch_size} x {sizes.caption_length} words, with the frozen encoder (s/step)"
    row = time_row(what, times["ours"], times["reference"])
    bench.set_target(row, ">= 3x", row.ratio >= 3, lambda: bench.explain_miss(row, our_step, LSTM_HINT, images))
    bench.rows.append(row)


def measure_decoder(bench: Bench) -> None:
    sizes = bench.sizes
    times, our_step, _ = time_training(bench, sizes.batch_size, False, bench.repeats)
    what = f"training step, decoder only (precomputed features), batch {sizes.batch_size} (s/step)"
    row = time_row(what, times["ours"], times["reference"])
    bench.set_target(row, ">= 5x", row.ratio >= 5, lambda: bench.explain_miss(row, our_step, LSTM_HINT))
    large, _, _ = time_training(bench, sizes.large_batch_size, False, repeats=1)
    bench.rows += [
        row,
        time_row(
            f"training step, decoder only, batch {sizes.large_batch_size} (the published recipe used 128) (s/step, "
            "one timed run)",
            large["ours"],
            large["reference"],
        ),
    ]


def measure_epoch(bench: Bench) -> None:
    """One epoch over `epoch_images` images x 5 captions, 4 images (20 captions) per step for every variant.

    Ours with the feature cache encodes every image once (the first epoch pays that) and later epochs run only the
    decoder; ours without it encodes each image once per step, for all its 5 captions (`image_indices`); the
    reference, with one dataset row per caption as published, encodes every image 5 times per epoch.
    """
    ours, reference, sizes = bench.ours, bench.reference, bench.sizes
    per_batch, per_image = sizes.epoch_images_per_batch, sizes.captions_per_image
    images = random_images(sizes, sizes.epoch_images, seed=20)
    labels = random_labels(sizes, sizes.epoch_images * per_image, seed=21)  # caption k belongs to image k // 5
    captions = shift_right(labels, ours.config)
    row_images = images.repeat_interleave(per_image, dim=0)  # the reference's dataset: one image per caption row
    pad = ours.config.pad_token_id
    image_indices = torch.arange(per_batch).repeat_interleave(per_image)  # (captions per step,)
    steps = [(start, start + per_batch) for start in range(0, sizes.epoch_images, per_batch)]

    def encode_all() -> torch.Tensor:
        with torch.no_grad():
            return ours.get_encoder()(images).last_hidden_state  # (images, regions, feature_size)

    features = encode_all()

    with weights_restored(ours, reference):
        ours.train()
        reference.train()
        our_optimizer, reference_optimizer = bench.optimizers()

        def ours_epoch(cache: bool) -> None:
            for first, last in steps:
                image_input = (
                    {"encoder_outputs": BaseModelOutput(last_hidden_state=features[first:last])}
                    if cache
                    else {"pixel_values": images[first:last]}
                )
                rows = slice(first * per_image, last * per_image)
                our_optimizer.zero_grad(set_to_none=True)
                ours(**image_input, labels=labels[rows], image_indices=image_indices).loss.backward()
                our_optimizer.step()

        def reference_epoch() -> None:
            for first, last in steps:
                rows = slice(first * per_image, last * per_image)
                reference_optimizer.zero_grad(set_to_none=True)
                logits = reference(row_images[rows], captions[rows], 0.9)  # every image encoded once per caption
                reference_loss(logits, labels[rows], pad).backward()
                reference_optimizer.step()

        calls = {
            "cached": lambda: ours_epoch(cache=True),
            "reference": reference_epoch,
            "uncached": lambda: ours_epoch(cache=False),
            "encode": encode_all,
        }
        # The training measures have warmed these kernels up already; a full warm-up epoch would double the cost.
        times = time_calls(calls, bench.slow_repeats, warmup=0 if bench.slow_repeats > 1 else 1)
        what = f"epoch of {sizes.epoch_images} images x {per_image} captions"
        cached = time_row(
            f"{what}, ours with feature cache, epochs after the first (s)", times["cached"], times["reference"]
        )
        bench.set_target(
            cached, ">= 10x", cached.ratio >= 10, lambda: bench.explain_miss(cached, calls["cached"], LSTM_HINT)
        )
    first_epoch = [encode + epoch for encode, epoch in zip(times["encode"], times["cached"])]
    bench.rows += [
        cached,
        time_row(f"{what}, ours with feature cache, first epoch incl. encoding (s)", first_epoch, times["reference"]),
        time_row(f"{what}, ours without cache (s)", times["uncached"], times["reference"]),
        time_row(
            f"{what}, ours with cache vs (reference column) ours without cache (s)", times["cached"], times["uncached"]
        ),
    ]


def measure_decoding(bench: Bench) -> None:
    """Captions per second: beam 5 and greedy, up to `max_new_tokens` words, full model (encoder included)."""
    ours, reference, sizes = bench.ours, bench.reference, bench.sizes
    images = random_images(sizes, sizes.decode_images, seed=30)
    few = images[: sizes.reference_beam_images]
    new_tokens, eos = sizes.max_new_tokens, ours.config.eos_token_id
    captions = {}

    def ours_beam() -> None:
        with torch.no_grad():
            ids = ours.generate(pixel_values=images, num_beams=sizes.num_beams, max_new_tokens=new_tokens)
        captions["ours"] = [trim(row, eos) for row in ids.tolist()]

    def reference_beam() -> None:
        captions["reference"] = [reference.beam_search(image[None], sizes.num_beams, new_tokens)[0] for image in few]

    times = time_calls({"ours": ours_beam, "reference": reference_beam}, bench.slow_repeats)
    beam = rate_row(
        f"beam search, beam {sizes.num_beams}, <= {new_tokens} words, {len(images)} images per call (reference: "
        f"{len(few)} images, one at a time) (captions/s)", times["ours"], times["reference"], len(images), len(few),
    )  # fmt: skip
    beam.bound = len(images) / bench.bound_seconds(len(images), new_tokens)
    bench.set_target(
        beam, ">= 20x", beam.ratio >= 20,
        lambda: bench.explain_miss(
            beam, ours_beam, ENCODER_HINT, images, median(times["ours"]), len(images) / beam.reference
        ),
    )  # fmt: skip

    with torch.no_grad():
        greedy_calls = {
            "ours": lambda: ours.generate(pixel_values=images, max_new_tokens=new_tokens, do_sample=False),
            "reference": lambda: reference.greedy(images, new_tokens),
        }
        greedy_times = time_calls(greedy_calls, bench.repeats)
    greedy = rate_row(
        f"greedy decoding, <= {new_tokens} words, {len(images)} images per call (captions/s)",
        greedy_times["ours"], greedy_times["reference"], len(images), len(images),
    )  # fmt: skip
    greedy.bound = len(images) / bench.bound_seconds(len(images), new_tokens)
    bench.rows += [beam, greedy]
    words = {name: statistics.mean(len(caption) - 1 for caption in found) for name, found in captions.items()}
    bench.notes.append(
        f"Beam-{sizes.num_beams} captions averaged {words['ours']:.1f} words (ours) and {words['reference']:.1f} "
        f"(reference) of at most {new_tokens}: random weights over a {sizes.vocab_size}-word vocabulary rarely emit "
        "<eos>, so both decode to the word limit, the fair worst case."
    )


def measure_latency(bench: Bench) -> None:
    """One image, beam 3, up to `max_new_tokens` words, encoder included: what a user of the demo waits for."""
    ours, reference, sizes = bench.ours, bench.reference, bench.sizes
    image = random_images(sizes, 1, seed=40)
    beams, new_tokens = sizes.latency_beams, sizes.max_new_tokens

    def ours_caption() -> None:
        with torch.no_grad():
            ours.generate(pixel_values=image, num_beams=beams, max_new_tokens=new_tokens)

    calls = {"ours": ours_caption, "reference": lambda: reference.beam_search(image, beams, new_tokens)}
    times = time_calls(calls, max(5, bench.repeats))
    row = time_row(f"latency, one image, beam {beams}, <= {new_tokens} words (s)", times["ours"], times["reference"])
    row.bound = bench.bound_seconds(1, new_tokens)
    bench.set_target(
        row, "ours < 0.3 s", row.ours < 0.3, lambda: bench.explain_miss(row, ours_caption, ENCODER_HINT, image)
    )
    bench.rows.append(row)


def measure_memory(bench: Bench, quick: bool) -> None:
    peaks = measure_peak_rss(quick)
    for workload, what in (
        ("inference", f"peak resident memory, inference (one image, beam {bench.sizes.latency_beams})"),
        ("training", f"peak resident memory, training step (batch {bench.sizes.batch_size}, with encoder)"),
    ):
        ours, reference = peaks[("ours", workload)]["peak_mb"], peaks[("reference", workload)]["peak_mb"]
        bench.rows.append(Row(what, ours, reference, "MB", reference / ours))
    baseline = min(result["baseline_mb"] for result in peaks.values())
    bench.notes.append(
        f"Peak memory is the peak resident set (VmHWM) of a fresh interpreter per row; about {baseline:,.0f} MB of "
        "it is Python, torch and transformers after import, before any model exists."
    )


def greedy_captions(
    model: ImgCapForConditionalGeneration, pixels: torch.Tensor, max_new_tokens: int, dtype: torch.dtype | None
) -> list[list[int]]:
    """Greedy captions, under autocast to `dtype` when given (on the device `pixels` are on)."""
    with torch.no_grad(), torch.autocast(pixels.device.type, dtype=dtype, enabled=dtype is not None):
        ids = model.generate(pixel_values=pixels, max_new_tokens=max_new_tokens, do_sample=False)
    return [trim(row, model.config.eos_token_id) for row in ids.tolist()]  # .tolist() also waits for a GPU


def measure_reduced_precision(bench: Bench) -> None:
    """bf16 autocast on CPU (fp16 on a GPU when present) against fp32, both ours: speed and caption agreement."""
    ours, sizes = bench.ours, bench.sizes
    images = random_images(sizes, sizes.decode_images, seed=50)
    devices = [("cpu", torch.bfloat16)] + ([("cuda", torch.float16)] if torch.cuda.is_available() else [])
    for device, dtype in devices:
        model, pixels = ours.to(device), images.to(device)
        calls = {
            "low": lambda: greedy_captions(model, pixels, sizes.max_new_tokens, dtype),  # noqa: B023
            "fp32": lambda: greedy_captions(model, pixels, sizes.max_new_tokens, None),  # noqa: B023
        }
        times = time_calls(calls, bench.repeats)
        low, full = calls["low"](), calls["fp32"]()
        name = str(dtype).removeprefix("torch.")
        same = [a == b for a, b in zip(low, full)]
        agreeing = sum(first_difference(a, b) for a, b in zip(low, full)) / sum(map(len, full))
        bench.rows += [
            time_row(
                f"greedy, {len(images)} images, {name} autocast on {device} vs (reference column) ours in fp32 (s)",
                times["low"],
                times["fp32"],
            ),
            Row(
                f"greedy captions identical to fp32 under {name} autocast on {device} (fraction)",
                statistics.mean(same),
                None,
                "fraction",
            ),
        ]
        bench.notes.append(
            f"{name} on {device}: {sum(same)} of {len(same)} greedy captions equal fp32's; the words before the first "
            f"difference are {agreeing:.0%} of fp32's words. Random weights leave the top words close together, so "
            "rounding flips them more often than in a trained model."
        )
    ours.to("cpu")


@dataclass(frozen=True)
class MachineLimits:
    """This machine's measured memory bandwidth and float32 matmul rate, and what they allow a captioner: the time of
    reading its decoder's per-step weights once per word plus its encoder's FLOPs at the peak rate."""

    bytes_per_second: float
    flops_per_second: float
    encoder_flops_per_image: float

    @classmethod
    def measure(cls, model: ImgCapForConditionalGeneration, sizes: Sizes) -> MachineLimits:
        source = torch.ones(16 * 1024 * 1024)  # 64 MB
        target = torch.empty_like(source)
        copy_seconds = median(time_calls({"copy": lambda: target.copy_(source)}, repeats=9)["copy"])
        square = torch.randn(2048, 2048)
        matmul_seconds = median(time_calls({"matmul": lambda: square @ square}, repeats=5)["matmul"])
        image = random_images(sizes, 1, seed=60)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.get_encoder()(image)
        return cls(2 * source.numel() * 4 / copy_seconds, 2 * 2048**3 / matmul_seconds, counter.get_total_flops())

    def seconds(self, step_bytes: int, images: int, steps: int) -> float:
        """The lower bound for captioning `images` images with `steps` decoding steps each, reading `step_bytes` of
        decoder weights per step."""
        decoder_seconds = steps * step_bytes / self.bytes_per_second
        return decoder_seconds + images * self.encoder_flops_per_image / self.flops_per_second

    def describe(self) -> str:
        return (
            f"memory bandwidth {self.bytes_per_second / 1e9:.1f} GB/s (64 MB tensor copy, read + write), float32 "
            f"matmul {self.flops_per_second / 1e9:.0f} GFLOP/s (2048 x 2048), encoder "
            f"{self.encoder_flops_per_image / 1e9:.1f} GFLOP per image"
        )


BYTES_PER_WEIGHT = {"fp32": 4, "bf16": 2, "int8": 1}


def step_weights(model: ImgCapForConditionalGeneration) -> int:
    """How many decoder weights every decoding step reads: the recurrent layers, the attention query and score and
    the output layer; not the word embedding (one row per caption) nor the region projection (once per image)."""
    decoder = model.decoder
    if model.config.decoder_type == "attention":
        layers = [decoder.cells, decoder.attention.hidden_projection, decoder.attention.score, decoder.output]
    else:
        layers = [decoder.lstm, decoder.output]
    return sum(parameter.numel() for layer in layers for parameter in layer.parameters())


def measure_inference_settings(bench: Bench) -> None:
    """The issue-17 targets, each setting of `imgcap_hf.inference` against our fp32 model and the reference, in one
    process: beam 5 over 4 and 16 images, one image at beam 3, greedy at batch 16; each row with its bound."""
    ours, reference, sizes = bench.ours, bench.reference, bench.sizes
    settings = {"fp32": ours} | {
        precision: optimize_for_cpu(copy.deepcopy(ours), precision) for precision in candidate_precisions()
    }
    new_tokens, few = sizes.max_new_tokens, sizes.reference_beam_images
    images = random_images(sizes, sizes.decode_images, seed=70)

    def generate(model, pixels, **kwargs) -> Callable[[], None]:
        def call() -> None:
            with torch.no_grad():
                model.generate(pixel_values=pixels, max_new_tokens=new_tokens, **kwargs)

        return call

    def reference_beam() -> None:
        for image in images[:few]:
            reference.beam_search(image[None], sizes.num_beams, new_tokens)

    for count in (few, sizes.decode_images):
        calls = {name: generate(model, images[:count], num_beams=sizes.num_beams) for name, model in settings.items()}
        times = time_calls({**calls, **({"reference": reference_beam} if count == few else {})}, bench.slow_repeats)
        if count == few:
            reference_times = times["reference"]
        for name in settings:
            row = rate_row(
                f"beam {sizes.num_beams}, <= {new_tokens} words, {count} images, encoder included, ours {name} "
                f"(reference: {few} images one at a time) (captions/s)", times[name], reference_times, count, few,
            )  # fmt: skip
            row.bound = count / bench.bound_seconds(count, new_tokens, name)
            bench.set_target(row, ">= 40x", row.ratio >= 40, lambda: None)
            bench.rows.append(row)

    image = images[:1]
    calls = {name: generate(model, image, num_beams=sizes.latency_beams) for name, model in settings.items()}
    times = time_calls(calls, max(5, bench.repeats))
    for name in settings:
        row = time_row(
            f"latency, one image, beam {sizes.latency_beams}, <= {new_tokens} words, ours {name} vs (reference "
            "column) ours fp32 (s)", times[name], times["fp32"],
        )  # fmt: skip
        row.bound = bench.bound_seconds(1, new_tokens, name)
        bench.set_target(row, "<= 0.25 s", row.ours <= 0.25, lambda: None)
        bench.rows.append(row)

    calls = {name: generate(model, images, do_sample=False) for name, model in settings.items()}
    times = time_calls(calls, bench.repeats)
    for name in settings:
        row = rate_row(
            f"greedy, <= {new_tokens} words, {len(images)} images per call, ours {name} vs (reference column) ours "
            "fp32 (captions/s)", times[name], times["fp32"], len(images), len(images),
        )  # fmt: skip
        row.bound = len(images) / bench.bound_seconds(len(images), new_tokens, name)
        if name != "fp32":
            bench.set_target(row, ">= 3x", row.ratio >= 3, lambda: None)
        bench.rows.append(row)


# ====================================================================================================================
# Main
# ====================================================================================================================


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="check that the script runs, not the speed: tiny sizes, one repeat, no ratios or targets (the tests)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measure after warm-up (median)")
    parser.add_argument("--only", default=",".join(MEASURES), help=f"comma-separated subset of {','.join(MEASURES)}")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    parser.add_argument(
        "--keep_denormals",
        action="store_true",
        help="do not flush denormal floats to zero (random-weight LSTMs backpropagate many; x86 CPUs compute them "
        "tens of times slower)",
    )
    args = parser.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(args.only) - set(MEASURES))
    if unknown:
        parser.error(f"unknown measure(s) {', '.join(unknown)}; choose from {', '.join(MEASURES)}")
    if args.repeats is None:
        args.repeats = 1 if args.quick else 5
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; print the report and return it as a dict (what `--json` writes). Exits with status 1 if
    the two implementations do not compute the same model."""
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    # Before any parallel work: the thread pool's workers inherit this setting only when they are created.
    flushed = not args.keep_denormals and torch.set_flush_denormal(True)
    if args.quick:
        print(
            "--quick checks that this script runs and that the reference computes our model, at tiny sizes with one "
            "repeat: its times say nothing about speed, so it reports no ratios and no targets. Run it without "
            "--quick for the figures.\n"
        )
    print(f"Machine: {machine_line()}")
    print(
        "Denormal floats: "
        + (
            "flushed to zero (torch.set_flush_denormal, as train.py does), for both implementations alike."
            if flushed
            else "computed in full (--keep_denormals, or a CPU without flush-to-zero)."
        )
    )
    ours, reference = build_models(sizes)
    print(
        f"Models: ours ImgCapForConditionalGeneration (attention decoder) and the reference, both with "
        f"{trainable_parameters(ours):,} trainable parameters and the same random weights. "
        + ("Tiny sizes (--quick)." if args.quick else "ResNet-50 encoder (random init: no Hub access here; frozen), ")
        + ("" if args.quick else "7x7x2048 regions, embedding/hidden 1024, 2 LSTM layers, 4,096-word vocabulary.")
    )
    valid = "the equality checks are" if args.quick else "timings and the equality checks are"
    print(f"Random weights make nonsense captions; {valid} still valid.\n")

    try:
        checks = check_equivalence(ours, reference, sizes)
    except EquivalenceError as error:
        print(f"ABORTED: ours and the reference do not compute the same model, so no timing is meaningful: {error}")
        raise SystemExit(1) from None
    print("Correctness (before any timing):\n" + "\n".join(f"- {line}" for line in checks) + "\n")

    bench = Bench(ours, reference, sizes, args.repeats, judge_speed=not args.quick)
    steps: dict[str, Callable[[], None]] = {
        "train": lambda: measure_training(bench),
        "decoder": lambda: measure_decoder(bench),
        "epoch": lambda: measure_epoch(bench),
        "beam": lambda: measure_decoding(bench),
        "latency": lambda: measure_latency(bench),
        "memory": lambda: measure_memory(bench, args.quick),
        "bf16": lambda: measure_reduced_precision(bench),
        "inference": lambda: measure_inference_settings(bench),
    }
    for name in MEASURES:
        if name in args.only:
            start = time.perf_counter()
            steps[name]()
            print(f"[{name} measured in {time.perf_counter() - start:.0f} s]", file=sys.stderr, flush=True)

    if args.quick:
        for row in bench.rows:  # a ratio of tiny-size timings is noise, not a speed-up
            row.ratio = None
        print("Times at tiny sizes (--quick: not a measure of speed).\n")
    else:
        print(f"Medians of {args.repeats} timed runs after warm-up (the slow reference measures use at most 3), ")
        print("ratio = how many times faster (or smaller) ours is than the reference.\n")
    print(format_table(bench.rows, judge_speed=bench.judge_speed))
    notes = bench.notes + [f"{row.what}: target missed. Why: {' | '.join(row.why)}" for row in bench.rows if row.why]
    if notes:
        print("\nNotes:\n" + "\n".join(f"- {note}" for note in notes))
    report = {
        "machine": machine_line(),
        "denormals_flushed": bool(flushed),
        "sizes": asdict(sizes),
        "repeats": args.repeats,
        "checks": checks,
        "rows": [asdict(row) for row in bench.rows],
        "notes": notes,
    }
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
