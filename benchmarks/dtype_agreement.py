"""Do a model's captions change in reduced precision? Captions of a test split in float32 against
`from_pretrained(..., dtype=torch.bfloat16)` (or float16), and against the CPU inference settings of
`imgcap_hf.inference.optimize_for_cpu` (`--precision int8`, `--precision bf16`), all on the same float32
`pixel_values` from the processor.

Usage (from the repository root, with the package installed), for a model trained on the built-in shapes set:

    python benchmarks/dtype_agreement.py outputs/shapes-attention
    python benchmarks/dtype_agreement.py outputs/shapes-attention --dtype float16 --device cuda
    python benchmarks/dtype_agreement.py outputs/shapes-attention --precision int8 --precision bf16 --num_beams 5

The test split is rebuilt from the model folder's `training_args.json` (the shapes set is deterministic). Prints, for
each setting, the number of captions identical to float32's, each differing pair, and the time each setting took.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from imgcap_hf import ImgCapForConditionalGeneration, ImgCapProcessor
from imgcap_hf.data import load_caption_dataset
from imgcap_hf.inference import PRECISIONS, optimize_for_cpu


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, help="A train.py output folder (with training_args.json).")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "none"],
                        help="load the model in this dtype too ('none': skip)")  # fmt: skip
    parser.add_argument("--precision", action="append", default=[], choices=[p for p in PRECISIONS if p != "fp32"],
                        help="also an optimize_for_cpu setting (CPU only); repeat for several")  # fmt: skip
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--max_new_tokens", type=int, default=20)
    parser.add_argument("--num_beams", type=int, default=1, help="1: greedy (the default)")
    return parser.parse_args(argv)


def captions_of(model, processor, images: list, args: argparse.Namespace) -> list[str]:
    captions = []
    for start in range(0, len(images), args.batch_size):
        inputs = processor(images=images[start : start + args.batch_size], return_tensors="pt").to(model.device)
        with torch.no_grad():
            ids = model.generate(
                **inputs, num_beams=args.num_beams, do_sample=False, max_new_tokens=args.max_new_tokens
            )
        captions += processor.batch_decode(ids, skip_special_tokens=True)
    return captions


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    recipe = json.loads((args.model_dir / "training_args.json").read_text())
    shapes_kwargs = {
        "num_train": recipe["shapes_num_train"],
        "num_validation": recipe["shapes_num_eval"],
        "num_test": recipe["shapes_num_eval"],
        "image_size": recipe["image_size"],
    }
    splits, _ = load_caption_dataset(recipe["dataset"], karpathy_json=recipe.get("karpathy_json"),
                                     shapes_kwargs=shapes_kwargs)  # fmt: skip
    images = splits["test"]["image"]
    processor = ImgCapProcessor.from_pretrained(args.model_dir)

    def load(dtype: str = "float32", precision: str | None = None):
        model = ImgCapForConditionalGeneration.from_pretrained(args.model_dir, dtype=getattr(torch, dtype))
        model.to(args.device).eval()
        return optimize_for_cpu(model, precision) if precision else model

    settings = {"float32": lambda: load()}
    if args.dtype != "none":
        settings[f"{args.dtype} (from_pretrained dtype)"] = lambda: load(args.dtype)
    for precision in args.precision:
        settings[f"{precision} (optimize_for_cpu)"] = lambda precision=precision: load(precision=precision)
    decoding = "greedy" if args.num_beams == 1 else f"beam {args.num_beams}"
    captions, seconds, report = {}, {}, {}
    for name, build in settings.items():
        model = build()
        captions_of(model, processor, images[: args.batch_size], args)  # warm-up
        start = time.perf_counter()
        captions[name] = captions_of(model, processor, images, args)
        seconds[name] = round(time.perf_counter() - start, 1)
    for name in list(settings)[1:]:
        pairs = list(zip(captions["float32"], captions[name]))
        differing = [(full, reduced) for full, reduced in pairs if full != reduced]
        print(f"Identical {decoding} captions, float32 vs {name}: {len(pairs) - len(differing)}/{len(pairs)}")
        for full, reduced in differing:
            print(f"  float32: {full!r}\n  {name}: {reduced!r}")
        report[name] = {"identical": len(pairs) - len(differing), "images": len(pairs)}
    print(f"Seconds ({decoding}, {len(images)} images): {seconds}")
    return {"settings": report, "seconds": seconds}


if __name__ == "__main__":
    main()
