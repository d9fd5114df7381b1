"""Training under faults: killed runs resume bit-exactly, interrupted or foreign checkpoints are skipped or refused
(never unpickled), a full or unwritable disk is reported clearly, non-finite losses stop cleanly, seeds reproduce.

Faults are made for real: a training process SIGKILLed in the middle of a checkpoint write, a file-size limit
(RLIMIT_FSIZE) that makes the kernel refuse checkpoint writes, a folder whose parent is a file, a learning rate that
makes the loss overflow."""

import json
import os
import pickle
import re
import resource
import shutil
import signal
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import kill_inside_a_checkpoint_write, tiny_args, train_script
from safetensors.torch import load_file
from transformers import get_scheduler

import train
from imgcap_hf import checkpointing
from imgcap_hf.checkpointing import CheckpointError, PreflightError

# Dropout and teacher forcing < 1 make every step draw random numbers: resuming must restore the RNG exactly.
RANDOM_STEPS = ["--teacher_forcing_ratio", "0.8", "--dropout", "0.3"]


def tiny_training_state(seed: int = 0):
    """A small model, AdamW and a cosine schedule, prepared by accelerate and stepped three times (so the optimizer
    has moments and a step count, the scheduler a position)."""
    torch.manual_seed(seed)
    accelerator = Accelerator()
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=1, num_training_steps=10)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    for _ in range(3):
        model(torch.randn(5, 4)).square().mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return accelerator, model, optimizer, scheduler


def save(folder: Path, step: int, seed: int = 0, **kwargs) -> Path:
    accelerator, model, optimizer, scheduler = tiny_training_state(seed)
    return checkpointing.save_checkpoint(
        accelerator, folder, step, model, optimizer, scheduler, {"completed_steps": step}, **kwargs
    )


class _Exploit:
    """Unpickling this runs a shell command that creates `marker`: what a hostile `.pkl`/`.bin` can do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ====================================================================================================================
# The format: exact, pickle-free, complete or not taken
# ====================================================================================================================


def test_checkpoint_round_trip_is_exact_and_pickle_free(tmp_path):
    """Model, AdamW (moments, step counts, betas as a tuple), scheduler and RNG come back exactly, from safetensors and
    JSON files only."""
    path = save(tmp_path, 3)
    assert sorted(p.name for p in path.iterdir()) == [
        "checkpoint.json", "model.safetensors", "optimizer.json", "optimizer.safetensors", "rng_state_0.json",
        "scheduler.json", "training_state.json",
    ]  # fmt: skip
    draws_after_save = (torch.rand(3), torch.randint(0, 10**6, (1,)).item())
    accelerator, original_model, original_optimizer, original_scheduler = tiny_training_state(seed=0)

    _, model, optimizer, scheduler = tiny_training_state(seed=1)  # different weights and moments
    assert checkpointing.load_checkpoint(accelerator, path, model, optimizer, scheduler) == {"completed_steps": 3}
    draws_after_load = (torch.rand(3), torch.randint(0, 10**6, (1,)).item())
    assert torch.equal(draws_after_save[0], draws_after_load[0]) and draws_after_save[1] == draws_after_load[1]
    for name, tensor in original_model.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    loaded, expected = optimizer.state_dict(), original_optimizer.state_dict()
    assert loaded["param_groups"] == expected["param_groups"]
    assert isinstance(loaded["param_groups"][0]["betas"], tuple)
    for index, values in expected["state"].items():
        for name, value in values.items():
            assert torch.equal(loaded["state"][index][name], value), (index, name)
    assert scheduler.state_dict() == original_scheduler.state_dict()


def test_latest_skips_interrupted_and_damaged_checkpoints_and_an_explicit_resume_says_why(tmp_path):
    """What a kill during a write or a delete leaves behind (by hand, deterministically) is never taken for a
    checkpoint: `latest` falls back to the newest complete one, an explicit folder gets one clear sentence."""
    good = save(tmp_path, 4)
    save(tmp_path, 2)
    # Killed before the manifest: the staging folder, and (for an older, non-atomic writer) a named folder.
    shutil.copytree(good, tmp_path / "checkpoint-6.tmp")
    no_manifest = shutil.copytree(good, tmp_path / "checkpoint-6")
    (no_manifest / "checkpoint.json").unlink()
    # A torn file: the manifest says more bytes than are there.
    truncated = shutil.copytree(good, tmp_path / "checkpoint-8")
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    # Same size, different bytes: only the sha256 tells.
    flipped = shutil.copytree(good, tmp_path / "checkpoint-10")
    weights = bytearray((flipped / "model.safetensors").read_bytes())
    weights[-1] ^= 0xFF
    (flipped / "model.safetensors").write_bytes(bytes(weights))
    # A deletion killed after the rename.
    deleting = shutil.copytree(good, tmp_path / "checkpoint-1.deleting")
    # A manifest from somewhere else.
    foreign = shutil.copytree(good, tmp_path / "checkpoint-12")
    (foreign / "checkpoint.json").write_text(json.dumps({"format": "something-else", "files": {}}))

    assert checkpointing.latest_checkpoint(tmp_path) == good
    assert train.resolve_resume_dir(tmp_path / "elsewhere", "latest") is None  # no checkpoints there
    assert checkpointing.list_checkpoints(tmp_path) == [tmp_path / "checkpoint-2", good, flipped]  # sizes only
    for folder, reason in [
        (no_manifest, "is not a complete checkpoint: it has no checkpoint.json"),
        (truncated, "is incomplete or damaged: model.safetensors has"),
        (flipped, "is damaged: the sha256 of model.safetensors differs"),
        (foreign, "is not a manifest of the 'imgcap-hf-training-checkpoint' format"),
        (tmp_path / "checkpoint-99", "no such folder"),
    ]:
        with pytest.raises(CheckpointError, match=reason):
            train.resolve_resume_dir(tmp_path, str(folder))

    removed = checkpointing.clean_interrupted(tmp_path)
    assert sorted(removed) == [deleting, tmp_path / "checkpoint-6.tmp"]
    assert not deleting.exists() and good.is_dir()


def test_latest_never_takes_a_checkpoint_of_another_run(tmp_path):
    """Each manifest names its run and `run.json` the run that wrote the newest checkpoint: `latest` takes that run's
    newest checkpoint, even where another run's has a higher step; checkpoints without a run id (written before run
    ids existed) still count."""
    earlier = save(tmp_path, 4, run_id="earlier-run")
    assert checkpointing.checkpoint_run_id(earlier) == "earlier-run"
    assert checkpointing.latest_checkpoint(tmp_path) == earlier
    new = save(tmp_path, 2, run_id="new-run")
    assert checkpointing.read_run_id(tmp_path) == "new-run"
    assert checkpointing.latest_checkpoint(tmp_path) == new
    assert checkpointing.list_checkpoints(tmp_path) == [new, earlier]  # both complete: only `latest` tells them apart
    legacy = save(tmp_path, 1)
    manifest = json.loads((legacy / "checkpoint.json").read_text())
    assert "run_id" not in manifest and checkpointing.checkpoint_run_id(legacy) is None
    shutil.rmtree(new)
    assert checkpointing.latest_checkpoint(tmp_path) == legacy


def test_checkpoint_files_get_the_umasks_permissions(tmp_path):
    """safetensors writes its files 0600; in a checkpoint they get what the umask gives the JSON files beside them."""
    old_umask = os.umask(0o022)
    try:
        path = save(tmp_path, 3)
    finally:
        os.umask(old_umask)
    assert {p.name: p.stat().st_mode & 0o777 for p in path.iterdir()} == {p.name: 0o644 for p in path.iterdir()}


def test_deleting_old_checkpoints_renames_them_out_of_the_namespace_first(tmp_path):
    for step in (1, 2, 3):
        save(tmp_path, step, total_limit=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"]
    save(tmp_path, 3, total_limit=2)  # the same step again replaces it in full
    assert checkpointing.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"]


def test_a_pickled_checkpoint_is_refused_and_never_unpickled(tmp_path):
    """accelerate's file names holding a payload that would create a marker file: refused with one sentence by
    `python train.py` (before any data is loaded), and ignored when slipped into a complete checkpoint."""
    marker = tmp_path / "pwned"
    canary = tmp_path / "canary"
    pickle.loads(pickle.dumps(_Exploit(canary)))  # the payload is live: unpickling it does run the command
    assert canary.exists()

    hostile = tmp_path / "hostile"
    hostile.mkdir()
    for name in ("custom_checkpoint_0.pkl", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
        (hostile / name).write_bytes(pickle.dumps(_Exploit(marker)))
    run = train_script(*tiny_args(tmp_path / "run"), "--resume_from_checkpoint", str(hostile), java=False)
    output = run.communicate(timeout=300)[0]
    assert run.returncode == 2, output[-3000:]
    assert f"{hostile} holds pickle files (custom_checkpoint_0.pkl, optimizer.bin" in output
    assert "unpickling a file can run arbitrary code" in output and "Traceback" not in output
    assert not (tmp_path / "run" / "data_report.json").exists()  # refused before the data was loaded

    # A complete checkpoint with the same payloads added (and even listed in its manifest): loads, never opens them.
    path = save(tmp_path / "checkpoints", 3)
    for name in ("custom_checkpoint_0.pkl", "optimizer.bin"):
        (path / name).write_bytes(pickle.dumps(_Exploit(marker)))
    manifest = json.loads((path / "checkpoint.json").read_text())
    manifest["files"]["custom_checkpoint_0.pkl"] = {
        "bytes": (path / "custom_checkpoint_0.pkl").stat().st_size,
        "sha256": checkpointing.sha256_of_file(path / "custom_checkpoint_0.pkl"),
    }
    (path / "checkpoint.json").write_text(json.dumps(manifest))
    accelerator, model, optimizer, scheduler = tiny_training_state(seed=1)
    checkpointing.load_checkpoint(accelerator, path, model, optimizer, scheduler)
    assert not marker.exists()


def test_a_checkpoint_of_another_model_is_refused_clearly(tmp_path):
    path = save(tmp_path, 3)
    accelerator = Accelerator()
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 2))
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = get_scheduler("constant", optimizer=optimizer)
    with pytest.raises(CheckpointError, match=r"model.safetensors does not fit this model \(were the model flags"):
        checkpointing.load_checkpoint(accelerator, path, model, optimizer, scheduler)


# ====================================================================================================================
# Killed runs
# ====================================================================================================================


@pytest.mark.slow
def test_a_run_killed_mid_training_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL a real training process in the middle of writing checkpoint-4, resume with `latest`: it resumes from
    checkpoint-3 (its log says so and restarts at step 4, the log lines of steps 1-3 are kept as they were), and the
    final weights, results and per-step loss log equal those of a run that was never interrupted, bit for bit."""
    common = ["--max_train_steps", "10", "--checkpointing_steps", "1", "--checkpoints_total_limit", "2",
              "--logging_steps", "1", *RANDOM_STEPS]  # fmt: skip
    killed = tmp_path / "killed"
    kill_inside_a_checkpoint_write(tiny_args(killed, "attention", *common), 4, tmp_path / "paused", java=False)
    assert (killed / "checkpoints" / "checkpoint-4.tmp").is_dir()  # the write the kill interrupted
    assert not (killed / "all_results.json").exists()
    assert checkpointing.latest_checkpoint(killed / "checkpoints") == killed / "checkpoints" / "checkpoint-3"
    log_before_resume = (killed / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log_before_resume] == [1, 2, 3, 4]

    # All three runs in the same kind of process: the thread count changes float sums, so bit-exact needs it equal.
    straight = tmp_path / "straight"
    outputs = []
    for args in (tiny_args(killed, "attention", *common, "--resume_from_checkpoint", "latest"),
                 tiny_args(straight, "attention", *common)):  # fmt: skip
        run = train_script(*args, java=False)
        outputs.append(run.communicate(timeout=600)[0])
        assert run.returncode == 0, outputs[-1][-3000:]

    resumed_output = outputs[0]
    assert f"Resumed from {killed / 'checkpoints' / 'checkpoint-3'} at step 3" in resumed_output
    assert [int(step) for step in re.findall(r"step (\d+)/10: loss", resumed_output)] == list(range(4, 11))
    assert not (killed / "checkpoints" / "checkpoint-4.tmp").exists()
    resumed_log = (killed / "train_log.jsonl").read_text().splitlines()
    assert resumed_log[:3] == log_before_resume[:3]

    for weights in ("checkpoints/checkpoint-10/model.safetensors", "model.safetensors"):
        expected, got = load_file(straight / weights), load_file(killed / weights)
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[key], got[key]) for key in expected), weights
    straight_results, resumed_results = (json.loads((r / "all_results.json").read_text()) for r in (straight, killed))
    for results in (straight_results, resumed_results):
        results.pop("train_runtime_seconds")
    assert resumed_results == straight_results
    assert resumed_log == (straight / "train_log.jsonl").read_text().splitlines()
    assert len(resumed_log) == 10


# ====================================================================================================================
# The disk: unwritable, too small, failing mid-write
# ====================================================================================================================


def test_an_output_folder_under_a_file_fails_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(
        PreflightError, match=re.escape(f"{blocker} is a file, not a folder") + ".*nothing was trained"
    ):
        train.main(tiny_args(blocker / "run"))


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs Linux sysfs, where no one may create folders")
def test_a_read_only_location_fails_before_training():
    target = Path("/sys/imgcap-hf-test-output/run")
    with pytest.raises(PreflightError, match="The output folder /sys/imgcap-hf-test-output/run is not writable"):
        train.main(tiny_args(target))
    assert not target.parent.exists()


def test_too_little_free_space_is_reported_with_the_numbers(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    needed = free + 2**40
    with pytest.raises(
        PreflightError, match=re.escape(f"Not enough disk space in {tmp_path}:") + f".*{needed:,} bytes.*are free"
    ):
        checkpointing.check_free_space(tmp_path, needed)
    checkpointing.check_free_space(tmp_path, 1)

    model = torch.nn.Linear(10, 10)  # 110 float32 parameters, all trainable
    model.bias.requires_grad_(False)
    weights, moments = 110 * 4, 2 * 100 * 4
    assert checkpointing.estimate_run_bytes(model) == int((3 * weights + moments) * 1.1) + 16 * 2**20


def _limit_file_size_to_100_kb():
    """In the child: the kernel refuses (EFBIG) any write past 100 kB, instead of killing the process (SIGXFSZ)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))


@pytest.mark.slow
def test_a_failed_checkpoint_write_stops_training_and_keeps_the_previous_checkpoint(tmp_path, scores_without_java):
    """The model file of a checkpoint (150 kB) cannot be written under a 100 kB file-size limit: the run stops with one
    clear sentence and a non-zero exit, no half-written folder remains, the previous checkpoint still verifies."""
    output = tmp_path / "run"
    train.main(tiny_args(output, "attention", "--max_train_steps", "2", "--checkpointing_steps", "2"))
    previous = output / "checkpoints" / "checkpoint-2"
    manifest = checkpointing.verify_checkpoint(previous)

    run = train_script(
        *tiny_args(output, "attention", "--max_train_steps", "4", "--checkpointing_steps", "2",
                   "--resume_from_checkpoint", "latest"),
        preexec_fn=_limit_file_size_to_100_kb, java=False,
    )  # fmt: skip
    log = run.communicate(timeout=300)[0]
    assert run.returncode == 2, log[-3000:]
    failed = output / "checkpoints" / "checkpoint-4"
    assert (
        f"Training stopped: Could not write checkpoint {failed} (File too large); it was removed and the previous "
        f"checkpoint {previous} is intact." in log
    ), log[-3000:]
    assert "Traceback" not in log
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == [
        "checkpoint-2",
        "run.json",
    ]  # run.json: the run that wrote them
    assert checkpointing.verify_checkpoint(previous) == manifest


# ====================================================================================================================
# Non-finite losses, determinism
# ====================================================================================================================


def test_diverging_losses_stop_training_and_the_last_good_checkpoint_stays_loadable(tmp_path):
    """A learning rate of 1e30 (zero for the first, warm-up step) makes the weights overflow after step 2: the
    non-finite losses that follow are skipped and counted, training stops, and checkpoint-2 is complete and loads."""
    output = tmp_path / "run"
    results = train.main(
        tiny_args(output, "attention", "--learning_rate", "1e30", "--lr_scheduler_type", "constant_with_warmup",
                  "--num_warmup_steps", "2", "--checkpointing_steps", "1", "--max_consecutive_nonfinite", "3",
                  "--max_train_steps", "10")
    )  # fmt: skip
    assert results["stopped_early"] == "3 non-finite losses in a row"
    assert results["nonfinite_losses"] == 3 and results["completed_steps"] == 2
    log = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2] and all(abs(entry["loss"]) < 1e3 for entry in log)
    assert not (output / "model.safetensors").exists()  # a diverged model is not saved as the result

    latest = checkpointing.latest_checkpoint(output / "checkpoints")
    assert latest == output / "checkpoints" / "checkpoint-2"
    state = json.loads((latest / "training_state.json").read_text())
    assert state["completed_steps"] == 2 and state["nonfinite_losses"] == 0
    assert all(torch.isfinite(t).all() for t in load_file(latest / "model.safetensors").values())
    # Files the manifests do not list: they survive only if the checkpoints are resumed from, not written again.
    for checkpoint in (output / "checkpoints").glob("checkpoint-*"):
        (checkpoint / "untouched").write_text("")
    # It resumes: the run picks it up and (the weights being what they are) stops again the same way.
    resumed = train.main(
        tiny_args(output, "attention", "--learning_rate", "1e30", "--lr_scheduler_type", "constant_with_warmup",
                  "--num_warmup_steps", "2", "--checkpointing_steps", "1", "--max_consecutive_nonfinite", "3",
                  "--max_train_steps", "10", "--resume_from_checkpoint", "latest")
    )  # fmt: skip
    assert resumed["completed_steps"] == 2 and resumed["nonfinite_losses"] == 3
    assert checkpointing.latest_checkpoint(output / "checkpoints") == latest
    assert [(p.name, (p / "untouched").exists()) for p in sorted((output / "checkpoints").glob("checkpoint-*"))] == [
        ("checkpoint-1", True), ("checkpoint-2", True)
    ]  # fmt: skip
    assert (output / "train_log.jsonl").read_text().splitlines() == [json.dumps(entry) for entry in log]


@pytest.mark.slow
def test_the_same_seed_gives_the_same_loss_curve_with_dataloader_workers(tmp_path, scores_without_java):
    """Two runs with seed 42 and two DataLoader worker processes log identical losses at every step and end with
    identical weights; seed 43 gives different ones."""
    common = ["--max_train_steps", "4", "--dataloader_num_workers", "2", "--checkpointing_steps", "no", *RANDOM_STEPS,
              "--max_eval_samples", "4", "--num_beams", "1"]  # fmt: skip
    runs = {}
    for name, seed in (("first", "42"), ("again", "42"), ("other", "43")):
        train.main(tiny_args(tmp_path / name, "attention", *common, "--seed", seed))
        runs[name] = (
            (tmp_path / name / "train_log.jsonl").read_text(),
            load_file(tmp_path / name / "model.safetensors"),
        )
    assert len(runs["first"][0].splitlines()) == 4
    assert runs["first"][0] == runs["again"][0]
    assert all(torch.equal(runs["first"][1][k], runs["again"][1][k]) for k in runs["first"][1])
    assert runs["first"][0] != runs["other"][0]
    assert not all(torch.equal(runs["first"][1][k], runs["other"][1][k]) for k in runs["first"][1])
