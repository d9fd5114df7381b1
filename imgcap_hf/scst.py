"""Self-critical sequence training (SCST): REINFORCE on the CIDEr-D of sampled captions, against a baseline.

Rennie et al. 2017 ("Self-critical Sequence Training for Image Captioning") reward each sampled caption with its
CIDEr-D and subtract the greedy caption's reward; Luo 2020 ("A Better Variant of Self-Critical Sequence Training")
draws k samples per image and subtracts the mean reward of the other k - 1, which needs no extra decoding. One step:

1. the encoder runs once per image; its features serve all k samples of the image (`image_indices`);
2. k captions per image are sampled with `generate(do_sample=True)` without gradients, with dropout off (the model in
   eval mode: the samples come from the policy that validation decodes);
3. each sample gets its reward, and the baseline its reward is compared with;
4. one teacher-forced pass over the samples, with gradients (train mode, teacher forcing 1: the log-probabilities
   must be those of the sampled words), gives each word's log-probability; words after a sample's first `<eos>` are
   masked out, the `<eos>` itself counts;
5. loss = -sum((reward - baseline) * log-probability) over the words that count, divided by their number: the mean
   over words, as the cross-entropy phase's loss is, so that a learning rate means the same in both phases (this is
   also the normalisation of ruotianluo/ImageCaptioning.pytorch's reward criterion).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutput

BASELINES = ("mean_of_others", "greedy")


def mean_of_others_baseline(rewards: torch.Tensor, num_samples: int) -> torch.Tensor:
    """For each sample, the mean reward of the other `num_samples - 1` samples of its image.

    `rewards` is `(images * num_samples,)`, an image's samples next to each other (the order of
    `generate(num_return_sequences=...)`); returns the same shape."""
    if num_samples < 2:
        raise ValueError(f"The mean-of-others baseline needs at least 2 samples per image, got {num_samples}.")
    per_image = rewards.view(-1, num_samples)  # (images, samples)
    others = (per_image.sum(dim=1, keepdim=True) - per_image) / (num_samples - 1)
    return others.reshape(-1)  # (images * samples,)


def caption_mask(samples: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """`(captions, steps)` True at every word up to and including the caption's first `<eos>` (all words of a
    caption that never ends)."""
    is_eos = samples == eos_token_id
    # The number of <eos> strictly before each position: 0 up to and including the first <eos>.
    eos_before = is_eos.long().cumsum(dim=1) - is_eos.long()
    return eos_before == 0


def self_critical_loss(log_probs: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """REINFORCE with a baseline: `-(advantage * log-probability)` averaged over the words that count.

    `log_probs` and `mask` are `(captions, steps)` (the sampled words' log-probabilities, which of them count),
    `advantages` is `(captions,)`: reward minus baseline, a constant (no gradient flows into it)."""
    weighted = log_probs * advantages.detach().unsqueeze(1) * mask  # (captions, steps)
    return -weighted.sum() / mask.sum().clamp(min=1)


def sampled_word_log_probs(
    model, image_inputs: dict[str, Any], samples: torch.Tensor, image_indices: torch.Tensor, start_token_id: int
) -> torch.Tensor:
    """`(captions, steps)` the log-probability of each sampled word, from one teacher-forced pass of `model` (the
    prepared model, so that DDP and mixed precision apply) fed `<sos>` and the samples' words."""
    start = samples.new_full((samples.shape[0], 1), start_token_id)
    decoder_input_ids = torch.cat([start, samples[:, :-1]], dim=1)  # (captions, steps)
    logits = model(
        **image_inputs, decoder_input_ids=decoder_input_ids, image_indices=image_indices, teacher_forcing_ratio=1.0
    ).logits  # (captions, steps, vocab)
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return log_probs.gather(2, samples.unsqueeze(2)).squeeze(2)  # (captions, steps)


@dataclass
class SelfCriticalObjective:
    """The SCST loss of a batch of training images (see the module docstring), with the step's statistics.

    `reward(samples, image_indices)` scores `(captions, steps)` id sequences (no `<sos>`, padded after `<eos>`)
    against the references of training images `image_indices` (`CaptionReward`)."""

    reward: Any
    num_samples: int = 5
    baseline: str = "mean_of_others"
    max_new_tokens: int = 30

    def __post_init__(self):
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {self.baseline!r}")

    def __call__(self, model, unwrapped_model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """The loss (with gradients) and the statistics logged per step: mean reward, mean baseline, mean sample
        length (words up to and including `<eos>`), and the fraction of samples that end with `<eos>`.

        `model` is the prepared model (DDP, autocast), `unwrapped_model` the model itself (for `generate`)."""
        config = unwrapped_model.config
        sampling_inputs, gradient_inputs = self.image_inputs(unwrapped_model, batch)
        num_images = batch["dataset_rows"].shape[0]
        device = batch["dataset_rows"].device
        image_indices = torch.arange(num_images, device=device).repeat_interleave(self.num_samples)  # (captions,)
        samples, greedy = self.decode(unwrapped_model, sampling_inputs)
        rows = batch["dataset_rows"].repeat_interleave(self.num_samples)  # (captions,) training-split rows
        rewards = torch.as_tensor(self.reward(samples.cpu(), rows.cpu()), dtype=torch.float32).to(device)
        if greedy is None:
            baselines = mean_of_others_baseline(rewards, self.num_samples)
        else:
            greedy_rewards = torch.as_tensor(self.reward(greedy.cpu(), batch["dataset_rows"].cpu()))
            baselines = greedy_rewards.float().to(device).repeat_interleave(self.num_samples)  # (captions,)

        mask = caption_mask(samples, config.eos_token_id)  # (captions, steps)
        log_probs = sampled_word_log_probs(
            model, gradient_inputs, samples, image_indices, config.decoder_start_token_id
        )
        loss = self_critical_loss(log_probs, mask, rewards - baselines)
        statistics = {
            "mean_reward": rewards.mean(),
            "mean_baseline": baselines.mean(),
            "mean_sample_length": mask.sum(dim=1).float().mean(),
            "eos_fraction": (samples == config.eos_token_id).any(dim=1).float().mean(),
        }
        return loss, statistics

    def image_inputs(self, unwrapped_model, batch: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        """The image inputs of the sampling and of the gradient pass. Cached features, or a frozen encoder's output,
        serve both (the encoder runs once per image); an encoder that trains runs once more, with gradients, in the
        gradient pass (once per image there too, never once per sample)."""
        if "encoder_features" in batch:
            shared = {"encoder_outputs": BaseModelOutput(last_hidden_state=batch["encoder_features"])}
            return shared, shared
        encoder = unwrapped_model.get_encoder()
        was_training = unwrapped_model.training
        unwrapped_model.eval()
        with torch.no_grad():
            regions = encoder(batch["pixel_values"]).last_hidden_state  # (images, regions, feature_size)
        unwrapped_model.train(was_training)
        sampling = {"encoder_outputs": BaseModelOutput(last_hidden_state=regions)}
        if any(parameter.requires_grad for parameter in encoder.parameters()):
            return sampling, {"pixel_values": batch["pixel_values"]}
        return sampling, sampling

    @torch.no_grad()
    def decode(self, unwrapped_model, sampling_inputs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(images * num_samples, steps)` sampled captions, and `(images, steps)` greedy ones for the greedy
        baseline (else None), without `<sos>` and padded after `<eos>`; dropout off while decoding."""
        was_training = unwrapped_model.training
        unwrapped_model.eval()
        common = {"max_new_tokens": self.max_new_tokens, "num_beams": 1, "length_penalty": 1.0}
        samples = unwrapped_model.generate(
            **sampling_inputs, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
            num_return_sequences=self.num_samples, **common,
        )[:, 1:]  # fmt: skip
        greedy = None
        if self.baseline == "greedy":
            greedy = unwrapped_model.generate(**sampling_inputs, do_sample=False, **common)[:, 1:]
        unwrapped_model.train(was_training)
        return samples, greedy
