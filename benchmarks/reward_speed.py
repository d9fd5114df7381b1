"""How fast the SCST reward (`imgcap_hf.scoring.CaptionReward`) is at full size.

    python benchmarks/reward_speed.py              # Flickr30k-sized: 29,000 training images x 5 references
    python benchmarks/reward_speed.py --bleu4_weight 0.5

Synthetic references of Flickr30k's lengths (8-20 words, mean about 12, plus <eos>) over a 4,096-word vocabulary
with Zipf-like word frequencies; the constructor's time is reported. Then one SCST step's reward: 16 images x 5
samples of up to 20 words (each a reference of its image with words swapped and its length changed, some without
<eos>), median time of many calls.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path
from statistics import median

import numpy as np
import torch

from imgcap_hf.scoring import CaptionReward

PAD, EOS, FIRST_WORD = 0, 1, 4  # ids 2 and 3 would be <sos> and <unk>


def synthetic_references(rng: np.random.Generator, num_images: int, per_image: int, vocab: int) -> list:
    words = np.arange(FIRST_WORD, vocab)
    frequencies = 1.0 / np.arange(1, len(words) + 1)
    frequencies /= frequencies.sum()
    references = []
    for _ in range(num_images):
        lengths = np.clip(rng.normal(12, 3, per_image).round().astype(int), 8, 20)
        references.append([[*rng.choice(words, length, p=frequencies).tolist(), EOS] for length in lengths])
    return references


def synthetic_samples(rng: np.random.Generator, references: list, images: np.ndarray, max_words: int, vocab: int):
    samples = torch.full((len(images), max_words + 1), PAD, dtype=torch.long)  # (N, words + <eos>)
    for row, image in enumerate(images):
        words = list(references[image][rng.integers(len(references[image]))][:-1])
        words = [int(rng.integers(FIRST_WORD, vocab)) if rng.random() < 0.3 else word for word in words]
        words = (words * 2)[: max(1, len(words) + int(rng.integers(-3, 4)))][:max_words]
        finished = rng.random() < 0.9
        samples[row, : len(words) + finished] = torch.tensor(words + [EOS] * finished)
    return samples


def machine_line() -> str:
    cpu = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        cpu = next(
            (line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line), cpu
        )
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"{cpu}, {os.cpu_count()} cores{load}; Python {platform.python_version()}, numpy {np.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=29_000)
    parser.add_argument("--references_per_image", type=int, default=5)
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--images_per_step", type=int, default=16)
    parser.add_argument("--samples_per_image", type=int, default=5)
    parser.add_argument("--max_words", type=int, default=20)
    parser.add_argument("--bleu4_weight", type=float, default=0.0)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(machine_line())
    references = synthetic_references(rng, args.num_images, args.references_per_image, args.vocab_size)
    start = time.perf_counter()
    reward = CaptionReward(references, eos_token_id=EOS, pad_token_id=PAD, bleu4_weight=args.bleu4_weight)
    print(
        f"__init__ for {args.num_images:,} images x {args.references_per_image} references: "
        f"{time.perf_counter() - start:.2f} s"
    )
    times = []
    for _ in range(args.calls):
        images = np.repeat(rng.choice(args.num_images, args.images_per_step, replace=False), args.samples_per_image)
        samples = synthetic_samples(rng, references, images, args.max_words, args.vocab_size)
        image_indices = torch.from_numpy(images)
        start = time.perf_counter()
        reward(samples, image_indices)
        times.append(time.perf_counter() - start)
    print(
        f"call for {len(images)} samples ({args.images_per_step} images x {args.samples_per_image}, up to "
        f"{args.max_words} words, bleu4_weight {args.bleu4_weight}): median {median(times) * 1e3:.2f} ms, "
        f"max {max(times) * 1e3:.2f} ms over {args.calls} calls"
    )


if __name__ == "__main__":
    main()
