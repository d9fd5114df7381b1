"""torch.compile of one decoder step (`compile_steps`, train.py --torch_compile) against eager mode, in one process.

    python benchmarks/compile_step.py                         # the attention decoder at the published size
    python benchmarks/compile_step.py --decoder_type pooled   # Show-and-Tell
    python benchmarks/compile_step.py --quick                 # tiny sizes: checks the script, not the speed

The published decoder (2 x 1024 LSTM, attention 1024, 4,096 words, 7 x 7 x 2048 regions, dropout 0.5, teacher forcing
0.9, so both decoders run word by word) on cached features, as the Flickr30k recipes train it: the frozen encoder is
not run. An epoch is `--batches` batches of `--images` images x 5 captions whose padded length changes from batch to
batch (12-25 words), then a last partial batch. The first epoch counts the graphs compiled and the seconds spent
compiling them; a second epoch over the same batches must compile nothing more, and alternates the compiled and the
eager model (same weights) batch by batch for the steady-state step time: forward, loss and backward, the medians.
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
from benchmark_imgcap import FULL, QUICK, build_config, load_average_line, machine_line  # noqa: E402

from imgcap_hf import ImgCapForConditionalGeneration  # noqa: E402
from imgcap_hf.compilation import CompileCounter  # noqa: E402

CAPTIONS_PER_IMAGE = 5
CAPTION_LENGTHS = [14, 22, 18, 25, 12, 20, 16, 23, 19, 15]  # each batch's padded length, in turn


def build_batches(config, num_batches: int, num_images: int) -> list[dict]:
    """`num_batches` full batches of mixed caption lengths and a last one of fewer images, on random features."""
    generator = torch.Generator().manual_seed(0)
    image_counts = [num_images] * num_batches + [max(2, num_images // 2 - 1)]
    batches = []
    for index, images in enumerate(image_counts):
        length = CAPTION_LENGTHS[index % len(CAPTION_LENGTHS)]
        features = torch.randn(images, config.num_regions, config.vision_feature_size, generator=generator)
        labels = torch.randint(4, config.vocab_size, (images * CAPTIONS_PER_IMAGE, length), generator=generator)
        labels[:, -1] = 3  # <eos>
        batches.append({
            "encoder_outputs": BaseModelOutput(last_hidden_state=features),
            "labels": labels,
            "image_indices": torch.arange(images).repeat_interleave(CAPTIONS_PER_IMAGE),
        })  # fmt: skip
    return batches


def timed_step(model, batch: dict) -> float:
    start = time.perf_counter()
    model(**batch).loss.backward()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decoder_type", choices=["attention", "pooled"], default="attention")
    parser.add_argument("--batches", type=int, default=6, help="Full batches an epoch, before the partial one.")
    parser.add_argument("--images", type=int, default=8, help="Images a full batch (each with 5 captions).")
    parser.add_argument("--backend", default="inductor", help="torch.compile's backend.")
    parser.add_argument("--quick", action="store_true", help="Tiny sizes: checks the script, not the speed.")
    args = parser.parse_args()
    torch.set_flush_denormal(True)  # as train.py does
    sizes = QUICK if args.quick else FULL
    print(f"Machine: {machine_line()}")
    print(f"Load average (1, 5, 15 min) at the start: {load_average_line()}")

    config = build_config(sizes)
    config.decoder_type, config.dropout = args.decoder_type, 0.5
    torch.manual_seed(0)
    eager = ImgCapForConditionalGeneration(config).train()
    compiled = ImgCapForConditionalGeneration(config).train()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_steps(backend=args.backend)
    batches = build_batches(config, args.batches, args.images)
    rows = ", ".join(f"{len(batch['labels'])} x {batch['labels'].shape[1]}" for batch in batches)
    print(f"{args.decoder_type} decoder; an epoch of {len(batches)} batches (captions x words): {rows}")

    counter = CompileCounter()
    first_epoch = [timed_step(compiled, batch) for batch in batches]
    graphs, compile_seconds = counter.graphs, counter.seconds
    print(f"First epoch, compiled: {sum(first_epoch):.1f} s; compiled {graphs} graphs in {compile_seconds:.1f} s")

    eager_times, compiled_times = [], []
    for batch in batches:  # the same batches, the two models alternating
        eager_times.append(timed_step(eager, batch))
        compiled_times.append(timed_step(compiled, batch))
    new_graphs = counter.graphs - graphs
    print(f"Second epoch: {new_graphs} more graphs (over {len(batches)} batches of the same shapes)")
    eager_median, compiled_median = statistics.median(eager_times), statistics.median(compiled_times)
    print(f"Steady-state step (forward, loss, backward), median of {len(batches)}:")
    print(f"  eager:    {eager_median:8.3f} s")
    print(f"  compiled: {compiled_median:8.3f} s  ({eager_median / compiled_median:.2f}x eager's speed)")
    print(f"First epoch's compiled steps against eager steady state: {sum(first_epoch) - sum(eager_times):+.1f} s")
    print(f"Load average (1, 5, 15 min) at the end: {load_average_line()}")


if __name__ == "__main__":
    main()
