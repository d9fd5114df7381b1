"""Self-critical training: the baselines, the masking, the direction of the gradient, learning, resume, DDP, and the
recipes of several phases. The end-to-end runs use the real CIDEr-D reward (imgcap_hf/scoring/cider_reward.py)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    build_tiny_captioner,
    kill_inside_a_checkpoint_write,
    tiny_args,
    train_in_two_processes,
    train_script,
)
from safetensors.torch import load_file
from transformers.modeling_outputs import BaseModelOutput

import train
from imgcap_hf import checkpointing
from imgcap_hf.evaluation import mean_caption_length
from imgcap_hf.scoring import CaptionReward
from imgcap_hf.scst import (
    SelfCriticalObjective,
    caption_mask,
    mean_of_others_baseline,
    sampled_word_log_probs,
    self_critical_loss,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
# The smallest runs: 16 training images (2 steps an epoch), 4 evaluation images, greedy, short captions, no Java.
QUICK = ["--shapes_num_train", "16", "--max_eval_samples", "4", "--num_beams", "1", "--max_new_tokens", "8",
         "--caption_tokenizer", "python"]  # fmt: skip
EOS, PAD = 3, 1


def test_mean_of_others_baseline_is_the_mean_reward_of_the_images_other_samples():
    rewards = torch.tensor([1.0, 2.0, 6.0, 10.0, 20.0, 30.0])  # two images, three samples each
    expected = torch.tensor([4.0, 3.5, 1.5, 25.0, 20.0, 15.0])
    assert torch.allclose(mean_of_others_baseline(rewards, 3), expected)
    with pytest.raises(ValueError, match="at least 2 samples"):
        mean_of_others_baseline(rewards, 1)


def test_the_mask_keeps_the_words_up_to_and_including_the_first_eos():
    samples = torch.tensor([[5, 6, EOS, PAD, PAD], [5, EOS, 7, EOS, PAD], [5, 6, 7, 8, 9], [EOS, PAD, PAD, PAD, PAD]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(caption_mask(samples, EOS), expected)


def tiny_policy(seed: int = 0):
    """A tiny random captioner in train mode without dropout, and region features for two images."""
    model, _ = build_tiny_captioner("attention", seed=seed)
    torch.manual_seed(seed)
    regions = torch.randn(2, 4, model.config.vision_feature_size)  # (images, regions, feature_size)
    return model.train(), {"encoder_outputs": BaseModelOutput(last_hidden_state=regions)}


def test_words_after_eos_do_not_change_the_loss():
    model, inputs = tiny_policy()
    eos = model.config.eos_token_id
    samples = torch.tensor([[5, 6, eos, 7, 8], [6, 5, 7, 8, 9]])
    altered = torch.tensor([[5, 6, eos, 9, 4], [6, 5, 7, 8, 9]])  # only words after the first <eos> differ
    advantages = torch.tensor([1.0, -0.5])
    image_indices = torch.tensor([0, 1])
    start = model.config.decoder_start_token_id
    losses = []
    for words in (samples, altered):
        log_probs = sampled_word_log_probs(model, inputs, words, image_indices, start)
        losses.append(self_critical_loss(log_probs, caption_mask(words, eos), advantages))
    assert torch.equal(losses[0], losses[1])
    # ... while a word before <eos> does.
    before = samples.clone()
    before[0, 1] = 9
    log_probs = sampled_word_log_probs(model, inputs, before, image_indices, start)
    assert not torch.equal(self_critical_loss(log_probs, caption_mask(before, eos), advantages), losses[0])


def caption_log_prob(model, inputs, samples, image_indices) -> torch.Tensor:
    """`(captions,)` each caption's log-probability: its words' up to and including `<eos>`."""
    with torch.no_grad():
        log_probs = sampled_word_log_probs(model, inputs, samples, image_indices, model.config.decoder_start_token_id)
    return (log_probs * caption_mask(samples, model.config.eos_token_id)).sum(dim=1)


def step_along_the_loss(model, inputs, samples, image_indices, advantages, learning_rate=0.02):
    """One plain gradient step on the SCST loss of `samples`; returns the change of each caption's log-probability."""
    before = caption_log_prob(model, inputs, samples, image_indices)
    log_probs = sampled_word_log_probs(model, inputs, samples, image_indices, model.config.decoder_start_token_id)
    model.zero_grad()
    self_critical_loss(log_probs, caption_mask(samples, model.config.eos_token_id), advantages).backward()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.grad is not None:
                parameter -= learning_rate * parameter.grad
    return caption_log_prob(model, inputs, samples, image_indices) - before


def test_the_gradient_raises_above_baseline_samples_and_lowers_below_baseline_ones():
    eos = tiny_policy()[0].config.eos_token_id
    # Two samples of each image: the first above its baseline, the second below.
    samples = torch.tensor([[5, 6, eos, PAD], [6, 7, 5, eos], [7, 5, eos, PAD], [5, 5, 6, eos]])
    image_indices = torch.tensor([0, 0, 1, 1])
    rewards = torch.tensor([0.9, 0.1, 0.7, 0.3])
    advantages = rewards - mean_of_others_baseline(rewards, 2)  # (+0.8, -0.8, +0.4, -0.4)
    for row in range(4):  # each sample alone: its own log-probability moves with the sign of its advantage
        model, inputs = tiny_policy()
        change = step_along_the_loss(model, inputs, samples[row : row + 1], image_indices[row : row + 1],
                                     advantages[row : row + 1])  # fmt: skip
        assert change.sign().item() == advantages[row].sign().item(), (row, change)
    # All together (they share the softmax, so all may move one way): each image's better sample gains on its worse.
    model, inputs = tiny_policy()
    change = step_along_the_loss(model, inputs, samples, image_indices, advantages)
    assert change[0] > change[1] and change[2] > change[3], change


@pytest.mark.slow
@pytest.mark.parametrize("baseline", ["mean_of_others", "greedy"])
def test_self_critical_steps_raise_the_mean_cider_reward(baseline):
    """Sixteen SCST steps of a random tiny captioner on two images, rewarded with CIDEr-D against each image's two
    references: the mean reward of the last four steps is well above that of the first four."""
    torch.manual_seed(0)
    model, inputs = tiny_policy()
    eos = model.config.eos_token_id
    references = [[[7, 8, 9, eos], [7, 8, eos]], [[10, 11, 12, eos], [11, 12, eos]]]
    reward = CaptionReward(references, eos_token_id=eos, pad_token_id=model.config.pad_token_id)
    objective = SelfCriticalObjective(reward, num_samples=4, baseline=baseline, max_new_tokens=6)
    batch = {"dataset_rows": torch.tensor([0, 1]), "encoder_features": inputs["encoder_outputs"][0]}
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    mean_rewards = []
    for _ in range(16):
        loss, statistics = objective(model, model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        mean_rewards.append(statistics["mean_reward"].item())
    assert sum(mean_rewards[-4:]) / 4 > sum(mean_rewards[:4]) / 4 + 0.25, mean_rewards
    if baseline == "mean_of_others":  # the mean of the others' means is the mean
        assert statistics["mean_baseline"].item() == pytest.approx(statistics["mean_reward"].item())


# ====================================================================================================================
# train.py end to end: --objective scst from a cross-entropy model, resume, DDP, recipes of several phases, flags
# ====================================================================================================================


@pytest.fixture(scope="module")
def cross_entropy_model(tmp_path_factory) -> Path:
    """A tiny attention captioner trained two cross-entropy steps by train.py: what SCST starts from."""
    folder = tmp_path_factory.mktemp("xe") / "model"
    train.main(tiny_args(folder, "attention", *QUICK, "--max_train_steps", "2"))
    return folder


def scst_args(output_dir: Path, init_from: Path, *extra: str) -> list[str]:
    return tiny_args(output_dir, "attention", *QUICK, "--objective", "scst", "--init_from", str(init_from),
                     "--scst_num_samples", "3", "--learning_rate", "1e-3", *extra)  # fmt: skip


@pytest.mark.slow
def test_a_killed_scst_run_resumes_bit_exactly(cross_entropy_model, tmp_path):
    """SIGKILL an SCST run in the middle of writing checkpoint-2 (its last step's, staged: the weights of the run
    that never stopped), resume with `latest`: it resumes from checkpoint-1, mid-epoch, and its step 2 must draw the
    same samples from the restored RNG, log the same rewards and end with bit-identical weights."""
    common = ["--max_train_steps", "2", "--checkpointing_steps", "1", "--checkpoints_total_limit", "10",
              "--logging_steps", "1"]  # fmt: skip
    output_dir = tmp_path / "run"
    checkpoints = output_dir / "checkpoints"
    train_args = scst_args(output_dir, cross_entropy_model, *common)
    kill_inside_a_checkpoint_write(train_args, 2, tmp_path / "paused", java=False)
    assert checkpointing.latest_checkpoint(checkpoints) == checkpoints / "checkpoint-1"
    assert not (output_dir / "all_results.json").exists()
    uninterrupted = load_file(checkpoints / "checkpoint-2.tmp" / "model.safetensors")
    first_checkpoint_written = (checkpoints / "checkpoint-1" / "model.safetensors").stat().st_mtime_ns
    log_before_resume = (output_dir / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log_before_resume] == [1, 2]

    resumed = train_script(*train_args, "--resume_from_checkpoint", "latest", java=False)
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output[-3000:]

    # It resumed: from checkpoint-1 (left as it was), training step 2 only; the killed write was cleared away.
    assert f"Resumed from {checkpoints / 'checkpoint-1'} at step 1" in output
    assert re.findall(r"step (\d+)/2: loss", output) == ["2"]
    assert (checkpoints / "checkpoint-1" / "model.safetensors").stat().st_mtime_ns == first_checkpoint_written
    assert not (checkpoints / "checkpoint-2.tmp").exists()
    # Step 1's log line is kept, step 2's is the one the killed run logged before its kill, to the last digit.
    resumed_log = (output_dir / "train_log.jsonl").read_text().splitlines()
    assert resumed_log == log_before_resume
    assert {"mean_reward", "mean_baseline", "mean_sample_length", "eos_fraction"} <= json.loads(resumed_log[0]).keys()
    for weights in (checkpoints / "checkpoint-2" / "model.safetensors", output_dir / "model.safetensors"):
        got = load_file(weights)
        assert uninterrupted.keys() == got.keys(), weights
        assert all(torch.equal(uninterrupted[key], got[key]) for key in got), weights
    # The SCST model keeps the cross-entropy model's vocabulary (its tokenizer came with --init_from).
    assert (output_dir / "vocab.json").read_bytes() == (cross_entropy_model / "vocab.json").read_bytes()


@pytest.mark.slow
def test_two_process_ddp_scst_run(cross_entropy_model, tmp_path):
    train_in_two_processes(
        scst_args(tmp_path / "ddp", cross_entropy_model, "--max_train_steps", "2", "--logging_steps", "1")
    )
    results = json.loads((tmp_path / "ddp" / "all_results.json").read_text())
    assert results["completed_steps"] == 2 and results["test_num_images"] == 4
    log = [json.loads(line) for line in (tmp_path / "ddp" / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2] and all(0 <= entry["eos_fraction"] <= 1 for entry in log)


PHASED_RECIPE = {
    "phases": [
        {"name": "xe", "max_train_steps": 2},
        {"name": "scst", "objective": "scst", "max_train_steps": 2, "learning_rate": 1e-3, "scst_num_samples": 3},
    ],
}


def write_phased_recipe(folder: Path) -> Path:
    """A two-phase recipe whose shared keys are the tiny run's flags (as a recipe: names without dashes)."""
    flags = tiny_args(folder / "unused", "attention", *QUICK)
    shared = {flags[i].removeprefix("--"): yaml.safe_load(flags[i + 1]) for i in range(0, len(flags), 2)}
    shared.pop("output_dir")
    recipe = folder / "recipe.yaml"
    # A shared label smoothing is the cross-entropy phases': the SCST phase trains without it.
    recipe.write_text(yaml.safe_dump({**shared, "label_smoothing": 0.1, **PHASED_RECIPE}))
    return recipe


@pytest.mark.slow
def test_a_phased_recipe_runs_every_phase_and_reports_each(tmp_path):
    recipe = write_phased_recipe(tmp_path)
    output_dir = tmp_path / "run"
    # The command a user types, in a fresh process (nothing set up by an earlier run in this one).
    command = [sys.executable, str(REPO_ROOT / "train.py"), "--config", str(recipe), "--output_dir", str(output_dir),
               "--shapes_num_train", "24"]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=1200)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Phase 1 (scst) of 2" in result.stderr

    saved = json.loads((output_dir / "all_results.json").read_text())
    assert [phase["phase"] for phase in saved["phases"]] == ["xe", "scst"]
    assert all("test_cider" in phase and "test_bleu_4" in phase for phase in saved["phases"])
    assert saved["test_cider"] == saved["phases"][-1]["test_cider"]
    # Each phase reports its captions' mean length; the final one over every test caption (all four are in
    # test_samples.json), counted here as the words that hold a letter or digit.
    assert all("test_mean_caption_length" in phase for phase in saved["phases"])
    assert all("mean_caption_length" in entry for entry in saved["history"])  # and validation's, epoch by epoch
    samples = json.loads((output_dir / "test_samples.json").read_text())
    words = [word for sample in samples for word in sample["caption"].split() if any(c.isalnum() for c in word)]
    assert len(samples) == saved["test_num_images"] == 4
    assert saved["test_mean_caption_length"] == pytest.approx(len(words) / len(samples))
    for index, name in enumerate(["xe", "scst"]):
        phase_folder = output_dir / "phases" / f"{index}-{name}"
        phase_args = json.loads((phase_folder / "training_args.json").read_text())
        assert phase_args["shapes_num_train"] == 24  # a flag given on the command line applies to every phase
        assert (phase_args["objective"], phase_args["label_smoothing"]) == (("xe", 0.1), ("scst", 0.0))[index]
    assert phase_args["init_from"] == str(output_dir / "phases" / "0-xe")
    final = load_file(output_dir / "model.safetensors")
    last_phase = load_file(output_dir / "phases" / "1-scst" / "model.safetensors")
    assert all(torch.equal(final[key], last_phase[key]) for key in final)

    # Resumed after the end: finished phases are not trained again, and the results stay.
    first_phase_weights = output_dir / "phases" / "0-xe" / "model.safetensors"
    written = first_phase_weights.stat().st_mtime_ns
    again = train.main(["--config", str(recipe), "--output_dir", str(output_dir), "--shapes_num_train", "24",
                        "--resume_from_checkpoint", "latest"])  # fmt: skip
    assert first_phase_weights.stat().st_mtime_ns == written
    assert again["phases"] == saved["phases"]


def test_the_mean_caption_length_counts_words_as_the_scores_do():
    """PTB tokens without punctuation: a full stop is no word, a contraction two."""
    assert mean_caption_length(["A dog runs .", "Two men ride bikes .", "It isn't red"]) == pytest.approx(11 / 3)


def test_bad_scst_flags_and_phases_stop_with_one_argparse_line(tmp_path, capsys):
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    bad_phases = tmp_path / "bad-phases.yaml"
    bad_phases.write_text(yaml.safe_dump({"phases": [{"name": "xe", "output_dir": "elsewhere"}]}))
    unknown_key = tmp_path / "unknown-key.yaml"
    unknown_key.write_text(yaml.safe_dump({"phases": [{"learning_rat": 1.0}]}))
    late_error = tmp_path / "late-error.yaml"
    late_error.write_text(yaml.safe_dump({"phases": [{"name": "xe"}, {"name": "scst", "scst_num_samples": 0}]}))
    smoothed_phase = tmp_path / "smoothed-phase.yaml"
    smoothed_phase.write_text(yaml.safe_dump({"phases": [{}, {"objective": "scst", "label_smoothing": 0.1}]}))
    two_phases = tmp_path / "two-phases.yaml"
    two_phases.write_text(yaml.safe_dump({"phases": [{}, {"objective": "scst"}]}))
    smoothed_scst = "--label_smoothing 0.1 smooths the cross-entropy, which --objective scst does not train on"
    for bad, message in [
        (["--objective", "rl"], "argument --objective: invalid choice: 'rl'"),
        (["--scst_baseline", "zero"], "argument --scst_baseline: invalid choice: 'zero'"),
        (["--scst_num_samples", "0"], "--scst_num_samples must be a positive integer, got 0"),
        (["--objective", "scst", "--scst_num_samples", "1"], "--scst_baseline mean_of_others needs --scst_num_samp"),
        (["--scst_bleu4_weight", "-1"], "--scst_bleu4_weight must be a finite number >= 0, got -1.0"),
        (["--init_from", str(tmp_path / "none")], f"--init_from {tmp_path / 'none'}: no such folder"),
        (["--init_from", str(not_a_model)], "--init_from: Cannot load the model from"),
        (["--config", str(bad_phases)], "phase 0 (xe): ['output_dir'] apply to the whole run, not to one phase"),
        (["--config", str(unknown_key)], "phase 0 (xe): unknown keys ['learning_rat']"),
        (["--config", str(late_error)], "--scst_num_samples must be a positive integer, got 0"),
        (["--objective", "scst", "--label_smoothing", "0.1"], smoothed_scst),
        (["--config", str(smoothed_phase)], smoothed_scst),
        (["--config", str(two_phases), "--label_smoothing", "0.1"], smoothed_scst),  # a flag applies to every phase
    ]:
        with pytest.raises(SystemExit) as exit_info:
            train.main([*tiny_args(tmp_path / "run", "attention"), *bad])
        usage, error = capsys.readouterr().err.strip().splitlines()[-2:]
        assert exit_info.value.code == 2 and usage.startswith("usage: "), bad
        assert ": error: " in error and message in error, (bad, error)
    assert not (tmp_path / "run").exists()
