"""Pickle-free, crash-safe training checkpoints, and the output-folder checks to run before training.

accelerate's `save_state` pickles the optimizer, scheduler, RNG and custom states, and `load_state` unpickles them
(custom states with `weights_only=False`): resuming from a folder someone hands you could run their code. Here every
piece is safetensors (tensors) or JSON (everything else), so loading a checkpoint never executes anything.

A checkpoint folder `checkpoint-N` (N = completed optimizer steps) holds:

    model.safetensors            the unwrapped model's full state dict (tensors shared by two names stored once)
    optimizer.safetensors        optimizer tensors, keyed "state.{param_index}.{name}" (AdamW: step, exp_avg, ...)
    optimizer.json               param_groups, and any per-parameter state that is not a tensor
    scheduler.json               the LR scheduler's state_dict
    scaler.json                  the fp16 GradScaler's state_dict (only when one is enabled)
    training_state.json          the training loop's own progress (epoch, steps, best score, history)
    rng_state_{process}.json     python, numpy, torch CPU (and CUDA) generator states and accelerate's step counter
    checkpoint.json              the manifest, written last: format, version, step, run id, every file's size and
                                 sha256

Beside the checkpoints, `run.json` names the run that wrote the newest of them: `latest_checkpoint` takes only that
run's checkpoints, so a checkpoint that another run left in the folder is never resumed by mistake.

A folder counts as a checkpoint only when its manifest exists and every listed file has the listed size (and, before
loading, the listed sha256). Files are written into `checkpoint-N.tmp`, fsynced, and the folder is renamed into place;
a deletion first renames the folder out of the `checkpoint-N` namespace. So a kill at any moment leaves complete
checkpoints and folders that are skipped (and cleaned up at the next start), never a partial folder taken for whole.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from .pickles import pickle_files

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
STAGING_SUFFIX = ".tmp"  # a checkpoint being written
DELETING_SUFFIX = ".deleting"  # a checkpoint being removed
MANIFEST_NAME = "checkpoint.json"
RUN_FILE = "run.json"  # beside the checkpoints: {"run_id": ...} of the run that wrote the newest one
CHECKPOINT_FORMAT = "imgcap-hf-training-checkpoint"
FORMAT_VERSION = 1

MODEL_FILE = "model.safetensors"
OPTIMIZER_TENSORS_FILE = "optimizer.safetensors"
OPTIMIZER_FILE = "optimizer.json"
SCHEDULER_FILE = "scheduler.json"
SCALER_FILE = "scaler.json"
TRAINING_STATE_FILE = "training_state.json"
REQUIRED_FILES = (MODEL_FILE, OPTIMIZER_TENSORS_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, TRAINING_STATE_FILE)


class CheckpointError(ValueError):
    """A folder that is not a complete checkpoint of this format, or that does not fit the model being trained."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (disk full, file too large, ...); the earlier checkpoints are untouched."""


class PreflightError(OSError):
    """The output folder cannot take the run's files (unwritable, too small, holding another run): found before
    training starts."""


def rng_state_file(process_index: int) -> str:
    return f"rng_state_{process_index}.json"


# ====================================================================================================================
# Durable small writes
# ====================================================================================================================


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk: a rename is only durable once both are."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def apply_umask(path: Path) -> None:
    """Give a file the permissions that the process's umask gives new files (0644 under the usual 022). safetensors
    writes through a private temporary file, so its files come out readable by their owner only (0600)."""
    umask = os.umask(0o077)  # reading the umask means setting it: briefly to the strictest usual value
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_safetensors(save, path: Path) -> None:
    """Run a safetensors save into `path`, give the file the umask's permissions and fsync it. safetensors reports
    I/O failures as `SafetensorError`; they become the `OSError` they are (errno kept: "File too large", "No space
    left on device")."""
    try:
        save(str(path))
    except SafetensorError as error:
        code = re.search(r"os error (\d+)", str(error))
        if code is None:
            raise OSError(str(error)) from error
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from error
    apply_umask(path)
    fsync_path(path)


def write_json(path: Path, value: Any) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(value, indent=1) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ====================================================================================================================
# State <-> files: optimizer, RNG
# ====================================================================================================================


def split_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state_dict as (tensors for safetensors, the JSON-able rest)."""
    tensors, plain_state = {}, {}
    for index, values in state_dict["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                plain_state.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "state": plain_state}


def join_optimizer_state(
    tensors: dict[str, torch.Tensor], rest: dict[str, Any], current_groups: list[dict[str, Any]]
) -> dict[str, Any]:
    """The inverse of `split_optimizer_state`. JSON has no tuples: values that are tuples in the optimizer being
    loaded (AdamW's betas) become tuples again, so the restored param_groups equal the saved ones exactly."""
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = tensor
    for index, values in rest["state"].items():
        state.setdefault(int(index), {}).update(values)
    groups = []
    for group, current in zip(rest["param_groups"], current_groups):
        groups.append({k: tuple(v) if isinstance(current.get(k), tuple) else v for k, v in group.items()})
    groups.extend(rest["param_groups"][len(current_groups) :])  # a count mismatch: torch's load_state_dict says so
    return {"state": state, "param_groups": groups}


def _bytes_to_text(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode("ascii")


def _text_to_bytes(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def get_rng_state() -> dict[str, Any]:
    """This process's generator states as JSON-able values (torch's byte states as base64)."""
    version, internal, gauss_next = random.getstate()
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {
        "python": [version, list(internal), gauss_next],
        "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached_gaussian)],
        "torch": _bytes_to_text(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_bytes_to_text(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(_text_to_bytes(state["torch"]))
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state_all([_text_to_bytes(s) for s in state["cuda"]])


# ====================================================================================================================
# Which folders are checkpoints
# ====================================================================================================================


def checkpoint_step(path: Path) -> int | None:
    """N for a folder named `checkpoint-N`; None for anything else (`.tmp` and `.deleting` folders included)."""
    number = path.name.removeprefix(CHECKPOINT_PREFIX)
    return int(number) if path.name.startswith(CHECKPOINT_PREFIX) and number.isdigit() else None


def verify_checkpoint(path: Path, check_hashes: bool = True) -> dict[str, Any]:
    """The manifest of a complete checkpoint; otherwise a `CheckpointError` saying, in one sentence, what is wrong.
    Reads JSON and hashes bytes only: nothing in the folder is ever unpickled or executed."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint: no such folder.")
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        pickles = pickle_files(path)  # named only, to say why the folder is refused
        if pickles:
            raise CheckpointError(
                f"{path} holds pickle files ({', '.join(pickles)}), e.g. from accelerate's save_state or an older "
                f"train.py, and no {MANIFEST_NAME}: it is refused, because unpickling a file can run arbitrary code."
            )
        raise CheckpointError(
            f"{path} is not a complete checkpoint: it has no {MANIFEST_NAME} (its write was interrupted, or it is "
            "not a checkpoint of this train.py)."
        )
    try:
        manifest = read_json(manifest_path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{manifest_path} is unreadable ({error}): the checkpoint is damaged.") from error
    if not isinstance(manifest, dict) or manifest.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{manifest_path} is not a manifest of the {CHECKPOINT_FORMAT!r} format.")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {manifest.get('format_version')!r}; this train.py reads version "
            f"{FORMAT_VERSION} only."
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or any(name not in files for name in REQUIRED_FILES):
        raise CheckpointError(f"{manifest_path} does not list the files {', '.join(REQUIRED_FILES)}.")
    for name, entry in files.items():
        file = path / name
        if Path(name).name != name or name in (".", "..") or not isinstance(entry, dict):
            raise CheckpointError(f"{manifest_path} lists an invalid file entry {name!r}.")
        if not file.is_file():
            raise CheckpointError(f"{path} is incomplete: {name} is missing.")
        if file.stat().st_size != entry.get("bytes"):
            raise CheckpointError(
                f"{path} is incomplete or damaged: {name} has {file.stat().st_size} bytes, the manifest says "
                f"{entry.get('bytes')}."
            )
        if check_hashes and sha256_of_file(file) != entry.get("sha256"):
            raise CheckpointError(f"{path} is damaged: the sha256 of {name} differs from the manifest's.")
    return manifest


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints (manifest present, file sizes as listed), oldest first."""
    if not Path(folder).is_dir():
        return []
    found = []
    for path in Path(folder).iterdir():
        if checkpoint_step(path) is None or not path.is_dir():
            continue
        try:
            verify_checkpoint(path, check_hashes=False)
        except CheckpointError:
            continue
        found.append(path)
    return sorted(found, key=checkpoint_step)


def new_run_id() -> str:
    return uuid.uuid4().hex


def read_run_id(folder: Path) -> str | None:
    """The run that wrote the newest checkpoint in `folder` (its `run.json`); None where there is no such record."""
    try:
        return json.loads((Path(folder) / RUN_FILE).read_text(encoding="utf-8")).get("run_id")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None


def write_run_id(folder: Path, run_id: str) -> None:
    staging = Path(folder) / (RUN_FILE + STAGING_SUFFIX)
    write_json(staging, {"run_id": run_id})
    os.replace(staging, Path(folder) / RUN_FILE)


def checkpoint_run_id(path: Path) -> str | None:
    """The run a checkpoint belongs to; None for a checkpoint written before runs had identifiers."""
    return verify_checkpoint(path, check_hashes=False).get("run_id")


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint that verifies in full and belongs to the folder's run (`run.json`; checkpoints without a
    run id are taken too: they predate run ids). Newer folders that do not qualify are skipped with a warning."""
    folder_run = read_run_id(folder)
    candidates = [p for p in Path(folder).glob(f"{CHECKPOINT_PREFIX}*") if checkpoint_step(p) is not None]
    for path in sorted(candidates, key=checkpoint_step, reverse=True):
        try:
            run_id = verify_checkpoint(path).get("run_id")
        except CheckpointError as error:
            logger.warning(f"Skipping {path}: {error}")
            continue
        if folder_run is not None and run_id is not None and run_id != folder_run:
            logger.warning(f"Skipping {path}: it belongs to run {run_id}, not to the folder's run {folder_run}")
            continue
        return path
    return None


def remove_checkpoint(path: Path) -> None:
    """Rename out of the `checkpoint-N` namespace first, then delete: a kill mid-delete leaves a `.deleting` folder,
    never a half-deleted one that still looks like a checkpoint."""
    doomed = path.with_name(path.name + DELETING_SUFFIX)
    if doomed.exists():
        shutil.rmtree(doomed)
    os.replace(path, doomed)
    fsync_path(path.parent)
    shutil.rmtree(doomed)


def clean_interrupted(folder: Path) -> list[Path]:
    """Remove the `.tmp` and `.deleting` folders a killed run left behind; return them."""
    if not Path(folder).is_dir():
        return []
    leftovers = [
        p
        for p in Path(folder).iterdir()
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name.endswith((STAGING_SUFFIX, DELETING_SUFFIX))
    ]
    for path in leftovers:
        shutil.rmtree(path)
    return leftovers


# ====================================================================================================================
# Save and load
# ====================================================================================================================


def everyone_succeeded(accelerator, succeeded: bool) -> bool:
    """True when every process succeeded. A collective, so all processes take the same decision and none is left
    waiting at a barrier for a process that gave up."""
    if accelerator.num_processes == 1:
        return succeeded
    flags = accelerator.gather(torch.tensor([1.0 if succeeded else 0.0], device=accelerator.device))
    return bool(flags.min() > 0)


def _write_state_files(accelerator, staging: Path, model, optimizer, scheduler, training_state) -> None:
    """The main process writes the shared state; every process writes its own RNG file."""
    if accelerator.is_main_process:
        write_safetensors(lambda path: save_model(accelerator.unwrap_model(model), path), staging / MODEL_FILE)
        tensors, rest = split_optimizer_state(optimizer.state_dict())
        write_safetensors(lambda path: save_file(tensors, path), staging / OPTIMIZER_TENSORS_FILE)
        write_json(staging / OPTIMIZER_FILE, rest)
        write_json(staging / SCHEDULER_FILE, scheduler.state_dict())
        if accelerator.scaler is not None and accelerator.scaler.is_enabled():
            write_json(staging / SCALER_FILE, accelerator.scaler.state_dict())
        write_json(staging / TRAINING_STATE_FILE, training_state)
    rng = {**get_rng_state(), "accelerator_step": accelerator.step}
    write_json(staging / rng_state_file(accelerator.process_index), rng)


def _publish(staging: Path, final: Path, step: int, num_processes: int, run_id: str | None) -> None:
    """Manifest last, then the folder's run record and the atomic rename; fsync the folders so the rename survives a
    power cut."""
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": sha256_of_file(p)}
        for p in sorted(staging.iterdir())
        if p.is_file()
    }
    manifest = {
        "format": CHECKPOINT_FORMAT,
        "format_version": FORMAT_VERSION,
        "step": step,
        "num_processes": num_processes,
        "files": files,
    }
    if run_id is not None:
        manifest["run_id"] = run_id
    write_json(staging / MANIFEST_NAME, manifest)
    fsync_path(staging)
    if run_id is not None:  # before the rename: `latest` never sees this checkpoint under another run's record
        write_run_id(final.parent, run_id)
    if final.exists():  # the same step saved again (e.g. a resumed run): its older copy goes first
        remove_checkpoint(final)
    os.replace(staging, final)
    fsync_path(final.parent)


def save_checkpoint(
    accelerator,
    folder: Path,
    step: int,
    model,
    optimizer,
    scheduler,
    training_state: dict[str, Any],
    total_limit: int | None = None,
    run_id: str | None = None,
) -> Path:
    """Write `folder/checkpoint-{step}` on every process (collective), its manifest naming `run_id`; then keep the
    newest `total_limit`.
    A failed write (an OSError: disk full, file too large, ...) removes the staging folder on every process and
    raises `CheckpointWriteError`, leaving the earlier checkpoints as they were."""
    folder = Path(folder)
    final = folder / f"{CHECKPOINT_PREFIX}{step}"
    staging = final.with_name(final.name + STAGING_SUFFIX)
    error: OSError | None = None
    try:
        if accelerator.is_main_process:
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
    except OSError as caught:
        error = caught
    ok = everyone_succeeded(accelerator, error is None)
    if ok:
        try:
            _write_state_files(accelerator, staging, model, optimizer, scheduler, training_state)
        except OSError as caught:
            error = caught
    ok = everyone_succeeded(accelerator, ok and error is None)
    if ok and accelerator.is_main_process:
        try:
            _publish(staging, final, step, accelerator.num_processes, run_id)
        except OSError as caught:
            error = caught
    ok = everyone_succeeded(accelerator, ok and error is None)
    if not ok:
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        complete = [p for p in list_checkpoints(folder) if p != final]
        earlier = f"the previous checkpoint {complete[-1]} is intact" if complete else "there is no earlier checkpoint"
        reason = f"{error.strerror or error}" if error is not None else "another process failed to write its part"
        raise CheckpointWriteError(
            f"Could not write checkpoint {final} ({reason}); it was removed and {earlier}."
        ) from error
    if accelerator.is_main_process and total_limit:
        # Old checkpoints go only once the new one is complete.
        for old in [p for p in list_checkpoints(folder) if p != final][: -(total_limit - 1) or None]:
            try:
                remove_checkpoint(old)
            except OSError as caught:
                logger.warning(f"Could not remove the old checkpoint {old}: {caught}")
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path, model, optimizer, scheduler) -> dict[str, Any]:
    """Restore model, optimizer, scheduler, scaler and this process's RNG from a verified checkpoint (safetensors
    and JSON only); return the training state saved with it. Anything that does not fit is a `CheckpointError`."""
    path = Path(path)
    manifest = verify_checkpoint(path)
    try:
        load_model(accelerator.unwrap_model(model), str(path / MODEL_FILE), strict=True)
    except (RuntimeError, SafetensorError) as error:
        first_lines = " ".join(str(error).split())[:500]
        raise CheckpointError(
            f"{path / MODEL_FILE} does not fit this model (were the model flags changed?): {first_lines}"
        ) from error
    try:
        rest = read_json(path / OPTIMIZER_FILE)
        tensors = load_file(str(path / OPTIMIZER_TENSORS_FILE))
        optimizer.load_state_dict(join_optimizer_state(tensors, rest, optimizer.state_dict()["param_groups"]))
        scheduler.load_state_dict(read_json(path / SCHEDULER_FILE))
        if accelerator.scaler is not None and accelerator.scaler.is_enabled() and SCALER_FILE in manifest["files"]:
            accelerator.scaler.load_state_dict(read_json(path / SCALER_FILE))
        rng_name = rng_state_file(accelerator.process_index)
        if rng_name in manifest["files"]:
            rng = read_json(path / rng_name)
            set_rng_state(rng)
            accelerator.step = rng["accelerator_step"]
        else:
            logger.warning(f"{path} has no {rng_name} (saved with fewer processes?): random states not restored")
        return read_json(path / TRAINING_STATE_FILE)
    except (SafetensorError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"The training state in {path} does not fit this run: {error!r}") from error


# ====================================================================================================================
# Preflight: find out before training whether the output folder can take the run's files
# ====================================================================================================================


def check_output_dir_writable(folder: Path) -> None:
    """Create `folder` and write (and fsync) a probe file in it, or raise a `PreflightError` that says why not."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        with open(probe, "wb") as handle:
            handle.write(b"ok")
            handle.flush()
            os.fsync(handle.fileno())
        probe.unlink()
    except OSError as error:
        blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
        reason = f"{blocker} is a file, not a folder" if blocker is not None else (error.strerror or str(error))
        raise PreflightError(
            f"The output folder {folder} is not writable ({reason}); nothing was trained: choose another --output_dir."
        ) from error


def estimate_run_bytes(model: torch.nn.Module) -> int:
    """Disk a run needs at least: one checkpoint (weights + AdamW's two moments of each trainable parameter), the
    best model and the final model (weights each), plus 10% and 16 MiB for JSON, logs and the processor."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    moments = 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return int((weights + moments + 2 * weights) * 1.1) + 16 * 2**20


def check_free_space(folder: Path, needed_bytes: int) -> None:
    """Raise a `PreflightError` naming the folder, the bytes needed and the bytes free when they do not fit."""
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise PreflightError(
            f"Not enough disk space in {folder}: the run needs about {needed_bytes / 2**20:,.0f} MiB "
            f"({needed_bytes:,} bytes) for a checkpoint, the best model and the final model, but only "
            f"{free / 2**20:,.0f} MiB ({free:,} bytes) are free; nothing was trained."
        )
