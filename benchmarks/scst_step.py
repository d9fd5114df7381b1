"""Time one self-critical (SCST) training step against one cross-entropy (XE) step on the same batch, at full size.

    python benchmarks/scst_step.py                 # ResNet-50 features (random weights), 2 x 1024 LSTM, 4,096 words
    python benchmarks/scst_step.py --repeats 5

The published sizes of benchmark_imgcap.py (`FULL`): a frozen ResNet-50 whose 7x7x2048 features are computed once, as
the Flickr30k recipes' feature cache does, so both steps run the decoder only; 16 images a batch. The XE step
teacher-forces the images' 5 reference captions of 20 words; the SCST step samples 5 captions per image of up to 20
words (no gradients), scores them with the CIDEr-D reward against the 5 references, and runs one teacher-forced pass
with gradients over the samples. Random weights sample captions that seldom end, so nearly every sample runs the full
20 words: the longest SCST step there is. Prints the machine, its load, the median seconds of each step and the
reward's share of the SCST step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers.modeling_outputs import BaseModelOutput

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_imgcap import FULL, build_config, load_average_line, machine_line, random_labels  # noqa: E402

from imgcap_hf import ImgCapForConditionalGeneration  # noqa: E402
from imgcap_hf.scoring.cider_reward import CaptionReward  # noqa: E402
from imgcap_hf.scst import SelfCriticalObjective  # noqa: E402

NUM_IMAGES = 16
CAPTIONS_PER_IMAGE = 5  # references per image, and samples per image


class TimedReward:
    """The reward, with the seconds spent in it."""

    def __init__(self, reward: CaptionReward):
        self.reward, self.seconds = reward, 0.0

    def __call__(self, samples: torch.Tensor, image_indices: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        rewards = self.reward(samples, image_indices)
        self.seconds += time.perf_counter() - start
        return rewards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="Timed steps of each kind (after one warm-up).")
    args = parser.parse_args()
    torch.set_flush_denormal(True)  # as train.py does
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    torch.manual_seed(0)
    config = build_config(FULL)  # the attention decoder, teacher forcing 0.9 as the published recipe
    model = ImgCapForConditionalGeneration(config).to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    with torch.no_grad():
        images = torch.randn(NUM_IMAGES, 3, FULL.image_size, FULL.image_size, device=device)
        features = model.get_encoder()(images).last_hidden_state  # (images, 49, 2048): the feature cache
    labels = random_labels(FULL, NUM_IMAGES * CAPTIONS_PER_IMAGE, seed=1).to(device)  # (80, 20), ending with <eos>
    image_indices = torch.arange(NUM_IMAGES, device=device).repeat_interleave(CAPTIONS_PER_IMAGE)
    references = [[row.tolist() for row in labels[i * CAPTIONS_PER_IMAGE : (i + 1) * CAPTIONS_PER_IMAGE]]
                  for i in range(NUM_IMAGES)]  # fmt: skip
    reward = TimedReward(CaptionReward(references, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id))
    objective = SelfCriticalObjective(reward, num_samples=CAPTIONS_PER_IMAGE, max_new_tokens=FULL.max_new_tokens)
    batch = {"dataset_rows": torch.arange(NUM_IMAGES, device=device), "encoder_features": features}
    encoder_outputs = BaseModelOutput(last_hidden_state=features)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def xe_step() -> None:
        loss = model(encoder_outputs=encoder_outputs, labels=labels, image_indices=image_indices).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def scst_step() -> dict:
        loss, step_statistics = objective(model, model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return step_statistics

    timings = {"xe": [], "scst": [], "reward": []}
    lengths = []
    for repeat in range(args.repeats + 1):  # the first of each is a warm-up, not counted
        synchronize()
        start = time.perf_counter()
        xe_step()
        synchronize()
        xe_seconds = time.perf_counter() - start
        reward.seconds = 0.0
        start = time.perf_counter()
        step_statistics = scst_step()
        synchronize()
        scst_seconds = time.perf_counter() - start
        if repeat:
            timings["xe"].append(xe_seconds)
            timings["scst"].append(scst_seconds)
            timings["reward"].append(reward.seconds)
            lengths.append(step_statistics["mean_sample_length"].item())

    xe, scst, reward_seconds = (statistics.median(timings[name]) for name in ("xe", "scst", "reward"))
    print(f"Machine: {machine_line()}")
    print(f"Load average (1, 5, 15 min): {load_average_line()}")
    mean_length = statistics.mean(lengths)
    print(
        f"Batch: {NUM_IMAGES} images x {CAPTIONS_PER_IMAGE} captions (XE: references of {FULL.caption_length} words; "
        f"SCST: samples of mean length {mean_length:.1f}, at most {FULL.max_new_tokens} words)"
    )
    print(f"Median of {args.repeats} steps on {device.type}:")
    print(f"  XE step:    {xe:8.3f} s")
    print(f"  SCST step:  {scst:8.3f} s  ({scst / xe:.2f} x the XE step)")
    print(f"  of which the reward: {reward_seconds:.4f} s ({100 * reward_seconds / scst:.2f} % of the SCST step)")


if __name__ == "__main__":
    main()
