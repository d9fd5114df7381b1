"""The on-disk feature cache (imgcap_hf/feature_cache.py) measured: what a second run saves, and what each process
holds in memory.

    python benchmarks/feature_cache.py second-run [--images 2000]   # time to the first optimizer step, run 1 vs 2
    python benchmarks/feature_cache.py memory [--images 10000]      # peak memory per process, 2 processes

`second-run` runs train.py twice on the synthetic shapes set at 224 px with the full-size ResNet-50 encoder (random
weights, frozen) and a float16 cache in a fresh folder, and stops each run at its first optimizer step: the first run
encodes every image (as train.py always did), the second finds them all in the cache.

`memory` starts 2 processes (DDP over gloo on the CPU, as train.py does without a GPU) on a synthetic split of
`--images` images, float16, and runs in each the feature step and then one pass over its half of the rows through
the training collator: once with the in-memory cache (every process encodes every image and keeps the whole tensor,
train.py's path before the on-disk cache) and twice with the on-disk cache (building it, then reusing it). The
encoder is a small bottleneck ResNet whose last stage has 2048 channels, pooled to 7 x 7: features of ResNet-50's
shape at a fraction of its cost; their size is what decides the memory. Each process reports its peak resident
memory (VmHWM) and the largest anonymous (private) part of it seen after each batch: memory-mapped cache pages count
in the resident set while mapped, but they are the page cache, shared by all processes and given back under pressure.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

RESNET_50 = {"model_type": "resnet"}  # transformers' ResNetConfig defaults are ResNet-50's
# A cheap backbone with ResNet-50's output channels: (batch, 2048, 2, 2) from 64 px images, pooled to 7 x 7 regions.
WIDE_TINY_RESNET = {"model_type": "resnet", "layer_type": "bottleneck", "embedding_size": 8, "depths": [1, 1, 1, 1],
                    "hidden_sizes": [8, 16, 32, 2048]}  # fmt: skip


def machine_load() -> str:
    return "load average " + " ".join(f"{value:.1f}" for value in os.getloadavg()) + f" on {os.cpu_count()} cores"


# ====================================================================================================================
# second-run: time to the first optimizer step
# ====================================================================================================================


class FirstStepReached(Exception):
    """Raised at the first optimizer step, to end a timed run there."""


def time_to_first_step(argv: list[str]) -> float:
    import train

    start = time.perf_counter()
    original = train.record_step

    def stop_at_first_step(run, step_loss):
        raise FirstStepReached

    train.record_step = stop_at_first_step
    try:
        train.main(argv)
    except FirstStepReached:
        return time.perf_counter() - start
    finally:
        train.record_step = original
    raise RuntimeError("train.py ended without an optimizer step")


def second_run(images: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        common = ["--dataset", "shapes", "--shapes_num_train", str(images), "--shapes_num_eval", "16",
                  "--image_size", "224", "--vision_config", json.dumps(RESNET_50), "--freeze_encoder",
                  "--feature_cache", "on", "--feature_cache_dtype", "float16",
                  "--feature_cache_dir", f"{folder}/cache", "--per_device_eval_batch_size", "64",
                  "--per_device_train_batch_size", "32"]  # fmt: skip
        print(f"before: {machine_load()}", flush=True)
        first = time_to_first_step([*common, "--output_dir", f"{folder}/first"])
        print(f"first run (encodes {images + 32} images): {first:.1f} s to the first optimizer step", flush=True)
        second = time_to_first_step([*common, "--output_dir", f"{folder}/second"])
        print(f"second run (reuses the cache): {second:.1f} s to the first optimizer step", flush=True)
        print(f"after: {machine_load()}")


# ====================================================================================================================
# memory: peak resident memory per process, 2 processes
# ====================================================================================================================


def synthetic_split(images: int, side: int = 64):
    """`images` random PNG images with one caption each, seeded: every process builds the same split."""
    import datasets
    from PIL import Image

    from imgcap_hf.data.schema import CAPTION_FEATURES

    generator = np.random.default_rng(0)
    files = []
    for _ in range(images):
        buffer = io.BytesIO()
        Image.fromarray(generator.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, format="PNG")
        files.append({"bytes": buffer.getvalue(), "path": None})
    return datasets.Dataset.from_dict(
        {"image_id": [str(i) for i in range(images)], "image": files, "captions": [["a picture"]] * images},
        features=CAPTION_FEATURES,
    )


def memory_status() -> dict[str, int]:
    """VmHWM (peak resident), RssAnon (private), RssFile (mapped files) of this process, in MiB."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmHWM", "RssAnon", "RssFile"):
            values[name] = int(rest.split()[0]) // 1024
    return values


def memory_worker(mode: str, images: int, cache_dir: str, report: str) -> None:
    """One process of the `memory` measurement (started by torchrun)."""
    from accelerate import Accelerator

    from imgcap_hf import ImgCapConfig, ImgCapForConditionalGeneration, ImgCapImageProcessor, feature_cache
    from imgcap_hf.batching import ImageCaptionCollator, encode_images

    accelerator = Accelerator(cpu=True)
    split = synthetic_split(images)
    image_processor = ImgCapImageProcessor(crop_size={"height": 64, "width": 64}, crop_pct=1.0)
    torch.manual_seed(0)
    model = ImgCapForConditionalGeneration(
        ImgCapConfig(vision_config=dict(WIDE_TINY_RESNET), region_grid_size=7, vocab_size=64)
    )
    before = memory_status()
    start = time.perf_counter()
    if mode == "in-memory":  # train.py's earlier path: every process encodes every image and keeps them all
        features = encode_images(model, split, image_processor, 64, accelerator.device, torch.float16)
    else:
        features = feature_cache.load_or_encode(
            accelerator, model, {"train": split}, image_processor, cache_dir=Path(cache_dir), dtype=torch.float16,
            batch_size=64,
        )["train"]  # fmt: skip
    feature_seconds = time.perf_counter() - start
    peak_private = memory_status()["RssAnon"]
    collator = ImageCaptionCollator(split, image_processor, features=features)
    rows = list(range(accelerator.process_index, images, accelerator.num_processes))  # this process's DDP shard
    for first in range(0, len(rows), 32):
        batch = collator(rows[first : first + 32])
        assert batch["encoder_features"].shape[1:] == (49, 2048)
        peak_private = max(peak_private, memory_status()["RssAnon"])
    after = memory_status()
    accelerator.wait_for_everyone()
    result = {"mode": mode, "process": accelerator.process_index, "feature_seconds": round(feature_seconds, 1),
              "baseline_rss_mib": before["RssAnon"] + before["RssFile"], "peak_rss_mib": after["VmHWM"],
              "peak_private_mib": peak_private, "mapped_file_mib_at_end": after["RssFile"]}  # fmt: skip
    Path(f"{report}.{accelerator.process_index}").write_text(json.dumps(result))


def memory(images: int) -> None:
    print(f"before: {machine_load()}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        for mode, label in (("in-memory", "in memory"), ("on-disk", "on disk, built"), ("on-disk", "on disk, reused")):
            report = f"{folder}/report"
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", __file__,
                       "memory-worker", "--mode", mode, "--images", str(images), "--cache_dir", f"{folder}/cache",
                       "--report", report]  # fmt: skip
            subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            for process in range(2):
                result = json.loads(Path(f"{report}.{process}").read_text())
                print(f"{label}: {json.dumps(result)}", flush=True)
    print(f"after: {machine_load()}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("second-run").add_argument("--images", type=int, default=2000)
    commands.add_parser("memory").add_argument("--images", type=int, default=10000)
    worker = commands.add_parser("memory-worker")
    for name in ("--mode", "--cache_dir", "--report"):
        worker.add_argument(name, required=True)
    worker.add_argument("--images", type=int, required=True)
    args = parser.parse_args(argv)
    if args.command == "second-run":
        second_run(args.images)
    elif args.command == "memory":
        memory(args.images)
    else:
        memory_worker(args.mode, args.images, args.cache_dir, args.report)


if __name__ == "__main__":
    main()
