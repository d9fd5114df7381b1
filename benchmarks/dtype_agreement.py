"""Do a model's captions change when it is loaded in half precision? Greedy captions of a test split, float32 against
`from_pretrained(..., dtype=torch.bfloat16)` (or float16), on the same float32 `pixel_values` from the processor.

Usage (from the repository root, with the package installed), for a model trained on the built-in shapes set:

    python benchmarks/dtype_agreement.py outputs/shapes-attention
    python benchmarks/dtype_agreement.py outputs/shapes-attention --dtype float16 --device cuda

The test split is rebuilt from the model folder's `training_args.json` (the shapes set is deterministic). Prints the
number of identical captions, each differing pair, and the time each precision took.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from imgcap_hf import ImgCapForConditionalGeneration, ImgCapProcessor
from imgcap_hf.data import load_caption_dataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, help="A train.py output folder (with training_args.json).")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--max_new_tokens", type=int, default=20)
    return parser.parse_args(argv)


def greedy_captions(model, processor, images: list, batch_size: int, max_new_tokens: int) -> list[str]:
    captions = []
    for start in range(0, len(images), batch_size):
        inputs = processor(images=images[start : start + batch_size], return_tensors="pt").to(model.device)
        ids = model.generate(**inputs, num_beams=1, do_sample=False, max_new_tokens=max_new_tokens)
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
    captions, seconds = {}, {}
    for dtype in ("float32", args.dtype):
        model = ImgCapForConditionalGeneration.from_pretrained(args.model_dir, dtype=getattr(torch, dtype))
        model.to(args.device).eval()
        start = time.perf_counter()
        captions[dtype] = greedy_captions(model, processor, images, args.batch_size, args.max_new_tokens)
        seconds[dtype] = round(time.perf_counter() - start, 1)
    pairs = list(zip(captions["float32"], captions[args.dtype]))
    differing = [(full, half) for full, half in pairs if full != half]
    print(f"Identical greedy captions, float32 vs {args.dtype}: {len(pairs) - len(differing)}/{len(pairs)}")
    for full, half in differing:
        print(f"  float32: {full!r}\n  {args.dtype}: {half!r}")
    print(f"Seconds: {seconds}")
    return {"identical": len(pairs) - len(differing), "images": len(pairs), "seconds": seconds}


if __name__ == "__main__":
    main()
