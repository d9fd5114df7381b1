"""A frozen encoder's region features on disk: encoded once, shared by every process and every later run.

With a frozen encoder and no augmentation an image's features never change, so training and evaluation need only the
decoder once each image is encoded. Kept in memory, that costs every process a copy (Flickr30k: 31,783 x 49 x 2048 in
float16, 6.4 GB) and every run a full encoding. Here each split's features are written once, in shards, and every
process memory-maps the same files:

    FEATURE_CACHE_DIR/
      <key>/                    one split's features, complete (renamed into place once written)
        000000000.safetensors   rows [0, n) as one tensor "features" (rows, regions, feature_size) in the cache dtype
        000001280.safetensors   the next rows, ...
        manifest.json           written last: format, version, the key and its parts, rows, shape, dtype, and every
                                shard's first row, rows, size in bytes and sha256
      <key>.partial/            being written (a crashed write leaves it; the next build of that key removes it)
      <key>.lock                held (flock) by the main process while it checks or builds <key>

**The key** is the sha256 of everything that changes the features: the encoder's weights and buffers (a sha256 of
every tensor's name, dtype, shape and bytes), its settings (the backbone's config, the region grid), the image
processor's settings, the split's images in order (embedded bytes are hashed; image files by path, size and
modification time, as datasets itself fingerprints local files), the storage dtype and `FORMAT_VERSION`. One key per
split: a change of `--max_eval_samples` re-encodes the evaluation split only. A folder is used only when its manifest
names the same key, so a change anywhere means another folder, never stale features.

**The format** is safetensors shards: pickle-free, readable by any safetensors tool, and `safe_open(...).get_tensor`
(safetensors 0.8 on CPU) returns a tensor backed by a private, copy-on-write memory map of the file (measured: reading
a 400 MB shard's tensor grows the process's file-backed RSS, RssFile, and leaves its anonymous memory, RssAnon, as it
was). A batch's rows are copied out of the map; the rest stays in the page cache that all processes share. Shards hold
about `SHARD_BYTES` each, so that writing one needs memory for one shard only, and the shard boundaries depend on the
split and the batch size only: a cache written by 8 processes serves a run of 1, and the other way round. (An Arrow
table would map as well, but rows of a 49 x 2048 array are nested lists there, and a torch tensor needs a copy.)

**Crash safety**, as for the checkpoints (and with their helpers): shards go into `<key>.partial`, each fsynced with
its sha256 beside it; the manifest is written last and the folder renamed into place. On open every shard's size and
sha256 are checked (the processes share the work: each hashes every n-th shard); a torn, partial or altered folder is
removed and rebuilt, never half used. sha256 rather than a faster checksum: it also catches a deliberate change, and
reading Flickr30k's 6.4 GB once for it takes seconds next to the minutes of encoding it saves. The free disk space is
checked, and the size printed, before anything is encoded. Nothing is ever unpickled.

`clear_feature_cache` (`python -m imgcap_hf clear-feature-cache`) removes the cache folder's entries.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate.utils import broadcast
from huggingface_hub import constants as hub_constants
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .batching import encode_images
from .checkpointing import everyone_succeeded, fsync_path, read_json, sha256_of_file, write_json, write_safetensors

logger = logging.getLogger(__name__)

CACHE_FORMAT = "imgcap-hf-feature-cache"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TENSOR_NAME = "features"
SHARD_BYTES = 256 * 2**20  # a shard's size, about: the memory that writing it needs
PARTIAL_SUFFIX = ".partial"
LOCK_SUFFIX = ".lock"
HASH_SUFFIX = ".sha256.json"  # beside a shard in `.partial`: its size and sha256, by the process that wrote it


def default_cache_dir() -> Path:
    """`HF_HOME/imgcap_hf/feature_cache`: beside the other Hugging Face caches, shared by all runs whatever their
    `--output_dir` (the key keeps them apart), so that a second run with the same encoder and data encodes nothing."""
    return Path(hub_constants.HF_HOME) / "imgcap_hf" / "feature_cache"


class FeatureCacheError(OSError):
    """The feature cache cannot be written (no space, unwritable folder): found before training starts."""


# ====================================================================================================================
# The key: everything that changes the features
# ====================================================================================================================


def encoder_digest(encoder: torch.nn.Module) -> str:
    """sha256 of every tensor of the encoder's state (weights and BatchNorm statistics): name, dtype, shape, bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def encoder_settings(encoder: torch.nn.Module) -> dict[str, Any]:
    """The encoder's settings that shape its output: the backbone's class and config, the region grid."""
    config = encoder.config
    return {
        "backbone": type(encoder.backbone).__name__,
        "vision_config": config.vision_config.to_dict(),
        "region_grid_size": config.region_grid_size,
        "num_regions": config.num_regions,
    }


def split_digest(split: datasets.Dataset) -> str:
    """sha256 of the split's images, in row order: embedded bytes hashed, files by path, size and modification time
    (the images' names and sizes, and their mtimes as datasets uses for local files). A column of anything else than
    a `datasets.Image` (decoded images, e.g. from `Dataset.from_dict` without features) is hashed pixel by pixel."""
    digest = hashlib.sha256(f"rows {len(split)}\n".encode())
    if not isinstance(split.features.get("image"), datasets.Image):
        for image in split["image"]:
            digest.update(json.dumps([image.mode, list(image.size)]).encode())
            digest.update(image.tobytes())
        return digest.hexdigest()
    files = split.cast_column("image", datasets.Image(decode=False)).select_columns(["image"])
    for batch in files.iter(batch_size=1000):
        for file in batch["image"]:
            if file["bytes"] is not None:
                digest.update(f"bytes {len(file['bytes'])}\n".encode())
                digest.update(file["bytes"])
            else:
                status = os.stat(file["path"])
                digest.update(json.dumps(["file", file["path"], status.st_size, status.st_mtime_ns]).encode())
    return digest.hexdigest()


def cache_key_parts(encoder, image_processor, split: datasets.Dataset, dtype: torch.dtype) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "encoder_sha256": encoder_digest(encoder),
        "encoder_settings": encoder_settings(encoder),
        "image_processor": json.loads(image_processor.to_json_string()),
        "split_sha256": split_digest(split),
        "dtype": str(dtype).removeprefix("torch."),
    }


def cache_key(parts: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


# ====================================================================================================================
# Reading: a split's shards as one indexable store
# ====================================================================================================================


class CachedFeatures:
    """A split's cached features: `features[rows]` is a `(len(rows), regions, feature_size)` tensor in the storage
    dtype, copied out of the memory-mapped shards (what `ImageCaptionCollator` takes as `features`).

    The maps are opened on first use and not pickled: a DataLoader worker started by fork shares them, one started
    by spawn or forkserver maps the files again instead of receiving a copy of the data.
    """

    def __init__(self, folder: Path, manifest: Mapping[str, Any], encoded_images: int = 0):
        self.folder = Path(folder)
        self.key = manifest["key"]
        self.shape = (manifest["rows"], *manifest["row_shape"])  # (rows, regions, feature_size)
        self.dtype = getattr(torch, manifest["dtype"])
        self.shard_files = [entry["file"] for entry in manifest["shards"]]
        self.shard_starts = torch.tensor([entry["first_row"] for entry in manifest["shards"]], dtype=torch.long)
        self.encoded_images = encoded_images  # by this process, for this split, in this run (0 when reused)
        self._shards: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.shape[2] * self.dtype.itemsize

    def __getstate__(self) -> dict[str, Any]:
        return {**vars(self), "_shards": None}

    def shards(self) -> list[torch.Tensor]:
        if self._shards is None:
            self._shards = []
            for name in self.shard_files:
                with safe_open(str(self.folder / name), framework="pt") as handle:
                    self._shards.append(handle.get_tensor(TENSOR_NAME))  # memory-mapped, copy-on-write
        return self._shards

    def __getitem__(self, rows: Sequence[int] | torch.Tensor) -> torch.Tensor:
        rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)  # (batch,)
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= len(self)):
            raise IndexError(f"Rows {rows.tolist()} are outside the {len(self)} rows of the feature cache.")
        shard_of_row = torch.searchsorted(self.shard_starts, rows, right=True) - 1  # (batch,)
        batch = torch.empty((len(rows), *self.shape[1:]), dtype=self.dtype)  # (batch, regions, feature_size)
        shards = self.shards()
        for shard in shard_of_row.unique().tolist():
            in_shard = shard_of_row == shard
            batch[in_shard] = shards[shard][rows[in_shard] - self.shard_starts[shard]]
        return batch


def verify_manifest(folder: Path, key: str) -> dict[str, Any]:
    """The manifest of a complete cache folder for `key`, checked without reading the shards; otherwise a
    `ValueError` saying in one sentence what is wrong."""
    manifest_path = folder / MANIFEST_NAME
    try:
        manifest = read_json(manifest_path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{manifest_path} is missing or unreadable ({error}).") from error
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
        raise ValueError(f"{manifest_path} is not a manifest of the {CACHE_FORMAT!r} format.")
    if manifest.get("format_version") != FORMAT_VERSION or manifest.get("key") != key:
        raise ValueError(f"{manifest_path} describes other features (format version or key differ).")
    next_row = 0
    for entry in manifest.get("shards", []):
        name = entry.get("file")
        if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
            raise ValueError(f"{manifest_path} lists an invalid shard {name!r}.")
        if entry.get("first_row") != next_row or not isinstance(entry.get("rows"), int) or entry["rows"] < 1:
            raise ValueError(f"{manifest_path}: the shards do not cover the rows in order.")
        next_row += entry["rows"]
    if next_row != manifest.get("rows"):
        raise ValueError(f"{manifest_path}: the shards hold {next_row} rows, not the {manifest.get('rows')} it lists.")
    return manifest


def verify_shard(folder: Path, entry: Mapping[str, Any], row_shape: Sequence[int], dtype: str) -> None:
    """Size, sha256 and tensor header of one listed shard, or a `ValueError` naming what differs."""
    path = folder / entry["file"]
    if not path.is_file():
        raise ValueError(f"{path} is missing.")
    if path.stat().st_size != entry["bytes"]:
        raise ValueError(f"{path} has {path.stat().st_size} bytes, the manifest says {entry['bytes']}.")
    if sha256_of_file(path) != entry["sha256"]:
        raise ValueError(f"the sha256 of {path} differs from the manifest's.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            stored = handle.get_slice(TENSOR_NAME)
            shape, stored_dtype = stored.get_shape(), stored.get_dtype()
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error}).") from error
    expected_dtype = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[dtype]
    if shape != [entry["rows"], *row_shape] or stored_dtype != expected_dtype:
        raise ValueError(f"{path} holds a {stored_dtype} tensor of shape {shape}, not what the manifest lists.")


# ====================================================================================================================
# Writing: each process encodes every n-th shard; the main process publishes the folder
# ====================================================================================================================


def plan_shards(num_rows: int, row_bytes: int, batch_size: int) -> list[tuple[int, int]]:
    """`(first_row, rows)` of each shard: about `SHARD_BYTES` each, a whole number of encoding batches (so that the
    batches are those of encoding the split in one go, and the features the same to the bit)."""
    batches_per_shard = max(1, SHARD_BYTES // max(row_bytes * batch_size, 1))
    rows_per_shard = batches_per_shard * batch_size
    return [(first, min(rows_per_shard, num_rows - first)) for first in range(0, num_rows, rows_per_shard)]


@contextmanager
def _held_lock(path: Path, held: bool):
    """An exclusive flock on `path` while the block runs (when `held`): two runs that build the same key at once
    take turns, and the second finds the first's features."""
    if not held:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_shard(partial: Path, name: str, features: torch.Tensor) -> None:
    path = partial / name
    write_safetensors(lambda target: save_file({TENSOR_NAME: features.contiguous()}, target), path)
    write_json(partial / (name + HASH_SUFFIX), {"bytes": path.stat().st_size, "sha256": sha256_of_file(path)})


def _publish(partial: Path, final: Path, key: str, parts: Mapping[str, Any], shards, row_shape) -> dict[str, Any]:
    """The manifest from the shards' hash files, written last; then the folder renamed into place."""
    entries = []
    for first_row, rows in shards:
        name = f"{first_row:09d}.safetensors"
        written = read_json(partial / (name + HASH_SUFFIX))
        entries.append({"file": name, "first_row": first_row, "rows": rows, **written})
        (partial / (name + HASH_SUFFIX)).unlink()
    manifest = {"format": CACHE_FORMAT, "format_version": FORMAT_VERSION, "key": key, "key_parts": parts,
                "rows": sum(rows for _, rows in shards), "row_shape": list(row_shape), "dtype": parts["dtype"],
                "shards": entries}  # fmt: skip
    write_json(partial / MANIFEST_NAME, manifest)
    fsync_path(partial)
    os.replace(partial, final)
    fsync_path(final.parent)
    return manifest


def _check_free_space(folder: Path, needed_bytes: int, num_rows: int) -> None:
    free = shutil.disk_usage(folder).free
    logger.info(
        f"Feature cache: encoding {num_rows} images into {folder}, about {needed_bytes / 2**20:,.0f} MiB "
        f"({free / 2**20:,.0f} MiB free)"
    )
    if free < needed_bytes * 1.02 + 16 * 2**20:
        raise FeatureCacheError(
            f"Not enough disk space in {folder} for the feature cache: it needs about {needed_bytes / 2**20:,.0f} "
            f"MiB and {free / 2**20:,.0f} MiB are free; choose another --feature_cache_dir or --feature_cache off."
        )


def _build(accelerator, model, split, image_processor, *, folder: Path, key, parts, dtype, batch_size) -> int:
    """Encode the split into `folder/<key>` (collective); returns how many images this process encoded."""
    final, partial = folder / key, folder / (key + PARTIAL_SUFFIX)
    row_shape = (model.config.num_regions, model.config.vision_feature_size)  # what the encoder outputs per image
    row_bytes = row_shape[0] * row_shape[1] * dtype.itemsize
    shards = plan_shards(len(split), row_bytes, batch_size)
    error: OSError | None = None
    if accelerator.is_main_process:
        try:
            if final.exists():  # damaged: it failed verification
                shutil.rmtree(final)
            if partial.exists():
                shutil.rmtree(partial)  # left by a crashed write: the lock says that no one is writing it now
            _check_free_space(folder, len(split) * row_bytes + len(shards) * 4096, len(split))
            partial.mkdir()
        except OSError as caught:
            error = caught
    if not everyone_succeeded(accelerator, error is None):
        if isinstance(error, FeatureCacheError):  # not enough disk space: its own sentence
            raise error
        reason = error.strerror or error if error is not None else "on the main process"
        raise FeatureCacheError(f"The feature cache {partial} could not be prepared ({reason}).") from error
    encoded = 0
    try:
        for first_row, rows in shards[accelerator.process_index :: accelerator.num_processes]:
            features = encode_images(  # (rows, regions, feature_size)
                model, split.select(range(first_row, first_row + rows)), image_processor, batch_size,
                accelerator.device, dtype,
            )  # fmt: skip
            if tuple(features.shape[1:]) != row_shape:
                raise ValueError(f"The encoder gave features of shape {tuple(features.shape[1:])}, not {row_shape}.")
            encoded += rows
            _write_shard(partial, f"{first_row:09d}.safetensors", features)
    except OSError as caught:
        error = caught
    ok = everyone_succeeded(accelerator, error is None)
    if ok and accelerator.is_main_process:
        try:
            _publish(partial, final, key, parts, shards, row_shape)
        except OSError as caught:
            error = caught
    if not everyone_succeeded(accelerator, ok and error is None):
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        reason = f"{error.strerror or error}" if error is not None else "another process failed to write its part"
        raise FeatureCacheError(f"Could not write the feature cache {final} ({reason}); it was removed.") from error
    return encoded


def _verified_everywhere(accelerator, folder: Path, key: str) -> dict[str, Any] | None:
    """The manifest of `folder/<key>` when it is complete and every shard verifies (each process checks every n-th
    shard); None when there is no such folder or any check fails (the reason logged once)."""
    manifest, problem = None, None
    try:
        manifest = verify_manifest(folder / key, key)
        for entry in manifest["shards"][accelerator.process_index :: accelerator.num_processes]:
            verify_shard(folder / key, entry, manifest["row_shape"], manifest["dtype"])
    except ValueError as error:
        problem = error
    if not everyone_succeeded(accelerator, problem is None):
        if problem is not None and (folder / key).exists():
            logger.warning(f"Feature cache {folder / key} is damaged or incomplete ({problem}): encoding it again")
        return None
    return manifest


def load_or_encode(
    accelerator, model, splits: Mapping[str, datasets.Dataset], image_processor, *, cache_dir: Path,
    dtype: torch.dtype, batch_size: int,
) -> dict[str, CachedFeatures]:  # fmt: skip
    """Every split's features from `cache_dir`, encoded (each process its share of the shards) where no verified
    folder holds them. Collective: every process calls it. `cache_dir` must be one folder that all processes see."""
    cache_dir = Path(cache_dir)
    error = None
    if accelerator.is_main_process:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as caught:
            error = caught
    if not everyone_succeeded(accelerator, error is None):
        reason = error.strerror or error if error is not None else "on the main process"
        raise FeatureCacheError(f"The feature cache folder {cache_dir} cannot be created ({reason}).") from error
    model.to(accelerator.device)
    encoder = model.get_encoder()
    features = {}
    for name, split in splits.items():
        parts = cache_key_parts(encoder, image_processor, split, dtype) if accelerator.is_main_process else None
        key = _shared_key(accelerator, cache_key(parts) if parts is not None else None)
        with _held_lock(cache_dir / (key + LOCK_SUFFIX), held=accelerator.is_main_process):
            accelerator.wait_for_everyone()  # no process looks at the folder before the main one holds the lock
            manifest = _verified_everywhere(accelerator, cache_dir, key)
            built, encoded = manifest is None, 0
            if built:  # `parts` only on the main process, which writes the manifest
                encoded = _build(accelerator, model, split, image_processor, folder=cache_dir, key=key, parts=parts,
                                 dtype=dtype, batch_size=batch_size)  # fmt: skip
                manifest = verify_manifest(cache_dir / key, key)
        features[name] = CachedFeatures(cache_dir / key, manifest, encoded_images=encoded)
        logger.info(
            f"Feature cache, {name}: {len(split)} images, {features[name].nbytes / 2**20:,.1f} MiB in "
            f"{cache_dir / key} ({f'built, {encoded} encoded by this process' if built else 'reused, none encoded'})"
        )
    return features


def _shared_key(accelerator, key: str | None) -> str:
    """The main process's key on every process (a sha256 travels as 32 integers): only it hashes the data."""
    if accelerator.num_processes == 1:
        return key
    values = list(bytes.fromhex(key)) if key is not None else [0] * 32
    shared = broadcast(torch.tensor(values, dtype=torch.int64, device=accelerator.device), from_process=0)
    return bytes(shared.cpu().tolist()).hex()


def clear_feature_cache(cache_dir: Path) -> list[str]:
    """Remove every cached split (complete, partial, lock files) from `cache_dir`; returns the removed names. A run
    that has the files mapped keeps reading them (on Linux an unlinked file lives on while mapped)."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    removed = []
    for entry in sorted(cache_dir.iterdir()):
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry.name)
    return removed
