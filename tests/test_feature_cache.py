"""The on-disk feature cache (imgcap_hf/feature_cache.py): keyed by all it depends on, reused, checked, shared."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import REPO_ROOT, build_tiny_captioner, tiny_args
from PIL import Image

import train
from imgcap_hf import ImgCapImageProcessor, feature_cache
from imgcap_hf.batching import encode_images
from imgcap_hf.data.schema import CAPTION_FEATURES
from imgcap_hf.feature_cache import FeatureCacheError, cache_key, cache_key_parts, load_or_encode


def png_split(num_images: int, seed: int = 0) -> datasets.Dataset:
    generator = np.random.default_rng(seed)
    files = []
    for _ in range(num_images):
        buffer = io.BytesIO()
        Image.fromarray(generator.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
        files.append({"bytes": buffer.getvalue(), "path": None})
    return datasets.Dataset.from_dict(
        {"image_id": [str(i) for i in range(num_images)], "image": files, "captions": [["a picture"]] * num_images},
        features=CAPTION_FEATURES,
    )


@pytest.fixture
def encoded_rows(monkeypatch) -> list[int]:
    """Counts every image the cache sends through the encoder (a spy on the encoding it calls)."""
    counted = []

    def counting_encode_images(model, split, *args, **kwargs):
        counted.append(len(split))
        return encode_images(model, split, *args, **kwargs)

    monkeypatch.setattr(feature_cache, "encode_images", counting_encode_images)
    return counted


@pytest.fixture
def small_shards(monkeypatch):
    """Shards of 4 rows (a batch of 4 images of 4 x 32 float32 features is 2 KiB), so that a split has several."""
    monkeypatch.setattr(feature_cache, "SHARD_BYTES", 2048)


def load(cache_dir: Path, model, processor, split, dtype=torch.float32):
    return load_or_encode(
        Accelerator(cpu=True), model, {"train": split}, processor.image_processor, cache_dir=cache_dir, dtype=dtype,
        batch_size=4,
    )["train"]  # fmt: skip


def test_each_part_of_the_key_changes_it():
    model, processor = build_tiny_captioner("attention")
    split = png_split(3)
    encoder = model.get_encoder()

    def key(encoder=encoder, image_processor=processor.image_processor, split=split, dtype=torch.float16):
        return cache_key(cache_key_parts(encoder, image_processor, split, dtype))

    baseline = key()
    assert key() == baseline == key(encoder=build_tiny_captioner("attention")[0].get_encoder())  # same seed
    changed_weight = build_tiny_captioner("attention")[0]
    with torch.no_grad():
        changed_weight.get_encoder().backbone.embedder.embedder.convolution.weight[0, 0, 0, 0] += 1e-3
    changed_statistics = build_tiny_captioner("attention")[0]
    changed_statistics.get_encoder().backbone.embedder.embedder.normalization.running_mean[0] += 1e-3
    changed_grid = build_tiny_captioner("attention")[0]
    changed_grid.config.region_grid_size = 3
    reordered = split.select([1, 0, 2])
    edited = png_split(3).map(lambda row, i: row if i else {"image": png_split(1, seed=9)[0]["image"]},
                              with_indices=True)  # fmt: skip
    variants = {
        "a weight": key(encoder=changed_weight.get_encoder()),
        "a BatchNorm statistic": key(encoder=changed_statistics.get_encoder()),
        "the region grid": key(encoder=changed_grid.get_encoder()),
        "crop_pct": key(image_processor=ImgCapImageProcessor(crop_size=32, crop_pct=0.5)),
        "the image size": key(image_processor=ImgCapImageProcessor(crop_size=24, crop_pct=1.0)),
        "one image": key(split=edited),
        "the row order": key(split=reordered),
        "one row fewer": key(split=split.select([0, 1])),
        "the dtype": key(dtype=torch.bfloat16),
    }
    assert all(variant != baseline for variant in variants.values()), variants
    assert len(set(variants.values())) == len(variants)
    parts = cache_key_parts(encoder, processor.image_processor, split, torch.float16)
    assert cache_key({**parts, "format_version": feature_cache.FORMAT_VERSION + 1}) != baseline


def test_image_files_are_keyed_by_path_size_and_modification_time(tmp_path):
    paths = []
    for index in range(2):
        path = tmp_path / f"{index}.bmp"  # uncompressed: another picture has the same size
        Image.new("RGB", (8, 8), (index * 100, 0, 0)).save(path)
        paths.append(str(path))
    split = datasets.Dataset.from_dict({"image_id": ["0", "1"], "image": paths, "captions": [["a"], ["b"]]},
                                       features=CAPTION_FEATURES)  # fmt: skip
    before = feature_cache.split_digest(split)
    assert feature_cache.split_digest(split) == before
    size = os.path.getsize(paths[1])
    Image.new("RGB", (8, 8), (0, 0, 250)).save(paths[1])  # another picture under the same name, of the same size
    os.utime(paths[1], ns=(1, 1))  # and a modification time of its own, whatever the clock's resolution
    assert os.path.getsize(paths[1]) == size
    assert feature_cache.split_digest(split) != before


def test_a_second_run_encodes_nothing_and_serves_the_in_memory_features(tmp_path, encoded_rows, small_shards):
    model, processor = build_tiny_captioner("attention")
    split = png_split(10)
    in_memory = encode_images(model, split, processor.image_processor, 4, torch.device("cpu"))  # (10, 4, 32)

    first = load(tmp_path, model, processor, split)
    assert sum(encoded_rows) == first.encoded_images == 10
    assert len(first.shard_files) == 3  # rows 0-3, 4-7, 8-9
    second = load(tmp_path, model, processor, split)
    assert sum(encoded_rows) == 10 and second.encoded_images == 0  # nothing encoded the second time
    rows = [9, 0, 5, 3, 4, 8]  # across every shard, in a shuffled order
    assert torch.equal(second[rows], in_memory[rows])  # bit-equal to the earlier in-memory path
    assert torch.equal(second[list(range(10))], in_memory)
    with pytest.raises(IndexError, match="outside the 10 rows"):
        second[[10]]
    # Serving a batch copies its rows out of the map: the tensor it returns owns its memory.
    assert second[[1, 2]].untyped_storage().nbytes() == 2 * 4 * 32 * 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_caches_store_the_rounded_features(tmp_path, encoded_rows, dtype):
    model, processor = build_tiny_captioner("pooled")
    split = png_split(5)
    features = load(tmp_path, model, processor, split, dtype=dtype)
    in_memory = encode_images(model, split, processor.image_processor, 4, torch.device("cpu"), dtype)
    assert features.dtype == dtype and torch.equal(features[list(range(5))], in_memory)
    assert load(tmp_path, model, processor, split, dtype=dtype).encoded_images == 0
    assert load(tmp_path, model, processor, split, dtype=torch.float32).encoded_images == 5  # another key


def damage(folder: Path, how: str) -> None:
    shard = sorted(folder.glob("*.safetensors"))[1]
    if how == "torn shard":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif how == "tampered shard":  # same size, one feature byte changed
        data = bytearray(shard.read_bytes())
        data[-3] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif how == "missing shard":
        shard.unlink()
    elif how == "no manifest":  # killed before the manifest was written
        (folder / feature_cache.MANIFEST_NAME).unlink()
    elif how == "manifest of another key":
        manifest = json.loads((folder / feature_cache.MANIFEST_NAME).read_text())
        manifest["key"] = "0" * 64
        (folder / feature_cache.MANIFEST_NAME).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "how", ["torn shard", "tampered shard", "missing shard", "no manifest", "manifest of another key"]
)
def test_a_damaged_cache_is_detected_and_rebuilt_never_used(tmp_path, encoded_rows, small_shards, how, caplog):
    model, processor = build_tiny_captioner("attention")
    split = png_split(10)
    original = load(tmp_path, model, processor, split)[list(range(10))]
    (folder,) = [path for path in tmp_path.iterdir() if path.is_dir()]
    damage(folder, how)
    rebuilt = load(tmp_path, model, processor, split)
    assert rebuilt.encoded_images == 10 and sum(encoded_rows) == 20  # encoded again, in full
    assert torch.equal(rebuilt[list(range(10))], original)
    assert "damaged or incomplete" in caplog.text
    assert load(tmp_path, model, processor, split).encoded_images == 0  # and the rebuilt folder verifies


def test_a_leftover_partial_folder_is_never_read_and_is_replaced(tmp_path, encoded_rows):
    model, processor = build_tiny_captioner("attention")
    split = png_split(4)
    key = cache_key(cache_key_parts(model.get_encoder(), processor.image_processor, split, torch.float32))
    partial = tmp_path / (key + feature_cache.PARTIAL_SUFFIX)
    partial.mkdir()
    (partial / "000000000.safetensors").write_bytes(b"left by a killed run")
    features = load(tmp_path, model, processor, split)
    assert features.encoded_images == 4 and not partial.exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == [key, key + feature_cache.LOCK_SUFFIX]


def test_too_little_disk_space_stops_before_encoding(tmp_path, encoded_rows, monkeypatch):
    model, processor = build_tiny_captioner("attention")
    monkeypatch.setattr(feature_cache.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 10 * 2**20}))
    with pytest.raises(FeatureCacheError, match="Not enough disk space .* for the feature cache"):
        load(tmp_path, model, processor, png_split(4))
    assert encoded_rows == [] and [path for path in tmp_path.iterdir() if path.is_dir()] == []


def test_clear_feature_cache_removes_every_entry(tmp_path, capsys):
    from imgcap_hf import cli

    model, processor = build_tiny_captioner("attention")
    load(tmp_path, model, processor, png_split(2))
    assert cli.main(["clear-feature-cache", "--feature_cache_dir", str(tmp_path)]) == 0
    assert list(tmp_path.iterdir()) == []
    printed = json.loads(capsys.readouterr().out)
    assert printed["feature_cache_dir"] == str(tmp_path) and len(printed["removed"]) == 2  # the split and its lock


TWO_PROCESS_WORKER = """
import json, sys
import torch
from accelerate import Accelerator
sys.path[:0] = [{tests!r}, {root!r}]
from conftest import build_tiny_captioner
from test_feature_cache import png_split
from imgcap_hf import feature_cache

feature_cache.SHARD_BYTES = 2048  # 4 rows a shard: 3 shards, 2 processes
encoded = []
def counting_encode_images(model, split, *args, **kwargs):
    encoded.extend(split["image_id"])
    return encode_images(model, split, *args, **kwargs)
encode_images, feature_cache.encode_images = feature_cache.encode_images, counting_encode_images

accelerator = Accelerator(cpu=True)
model, processor = build_tiny_captioner("attention")
features = feature_cache.load_or_encode(accelerator, model, {{"train": png_split(10)}}, processor.image_processor,
                                        cache_dir={cache!r}, dtype=torch.float16, batch_size=4)["train"]
report = {{"encoded": encoded, "features": features[list(range(10))].float().sum().item()}}
open(f"{{sys.argv[1]}}.{{accelerator.process_index}}", "w").write(json.dumps(report))
"""


@pytest.mark.slow
def test_two_processes_encode_each_image_exactly_once_and_a_second_launch_none(tmp_path):
    """DDP over gloo on the CPU, as train.py runs on a machine without GPUs."""
    worker = tmp_path / "worker.py"
    worker.write_text(
        TWO_PROCESS_WORKER.format(tests=str(REPO_ROOT / "tests"), root=str(REPO_ROOT), cache=str(tmp_path / "cache"))
    )
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    reports = []
    for launch in ("first", "second"):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(worker),
                   str(tmp_path / launch)]  # fmt: skip
        result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        reports.append([json.loads((tmp_path / f"{launch}.{process}").read_text()) for process in range(2)])
    first, second = reports
    encoded = first[0]["encoded"] + first[1]["encoded"]
    assert sorted(encoded, key=int) == [str(row) for row in range(10)]  # every image once, in all
    assert first[0]["encoded"] and first[1]["encoded"]  # shared: each process encoded a part
    assert second[0]["encoded"] == second[1]["encoded"] == []  # the second launch encodes nothing
    assert first[0]["features"] == first[1]["features"] == second[0]["features"]  # all read the same features


@pytest.mark.slow
def test_training_from_the_disk_cache_equals_the_in_memory_path_and_a_resumed_run_reuses_it(
    tmp_path, encoded_rows, monkeypatch
):
    """The same losses, to the bit on CPU, as the earlier in-memory cache; a resumed run encodes nothing."""
    monkeypatch.setattr("imgcap_hf.scoring.coco_metrics.java_available", lambda: False)  # no METEOR: faster
    common = ["--freeze_encoder", "--max_train_steps", "4", "--checkpointing_steps", "2", "--shapes_num_train", "32",
              "--max_eval_samples", "4", "--num_beams", "1", "--caption_tokenizer", "python",
              "--feature_cache_dir", str(tmp_path / "cache")]  # fmt: skip

    def in_memory_features(args, accelerator, model, splits, image_processor):
        return {name: encode_images(model, splits[name], image_processor, args.per_device_eval_batch_size,
                                    accelerator.device) for name in ("train", "validation", "test")}  # fmt: skip

    with monkeypatch.context() as patched:
        patched.setattr(train, "load_features", in_memory_features)
        train.main(tiny_args(tmp_path / "in-memory", "attention", *common))
    train.main(tiny_args(tmp_path / "disk", "attention", *common))
    encoded_by_first_run = sum(encoded_rows)
    assert encoded_by_first_run == 32 + 4 + 4
    in_memory_log = (tmp_path / "in-memory" / "train_log.jsonl").read_text()
    assert (tmp_path / "disk" / "train_log.jsonl").read_text() == in_memory_log

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    (tmp_path / "disk" / "checkpoints" / "checkpoint-2").rename(resumed / "checkpoints" / "checkpoint-2")
    train.main(tiny_args(resumed, "attention", *common, "--resume_from_checkpoint", "latest"))
    assert sum(encoded_rows) == encoded_by_first_run  # the resumed run found every split in the cache
    assert (resumed / "train_log.jsonl").read_text().splitlines() == in_memory_log.splitlines()[2:]
