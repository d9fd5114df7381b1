"""How often the demo's heatmaps point at the shape a word names, on the synthetic shapes test set.

    python benchmarks/heatmap_grounding.py --model outputs/shapes-attention     # the model `make demo` trains

Every test scene (never trained on; its shapes' boxes are known, `DrawnShape.box`) is captioned with its five
reference captions, teacher-forced through the model, so every word that names a shape (circle, square, triangle,
cross; the colour before it says which shape) names one that is there. For each such word the heatmap the app draws
(`imgcap_hf.heatmaps.peak_position`: the same interpolation, display size and crop mapping) has its peak mapped back
onto the picture, and the word counts as grounded when that peak lies inside the named shape's box. Two placements of
the regions' weights are compared: at the centres of the grid's cells, and at the regions' receptive-field centres
(`measure_region_centres`, what the app draws). The mean offset of the peaks from the boxes' centres shows the
direction of any shift.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np
import torch

from imgcap_hf.data.shapes import SHAPE_KINDS, ShapesScene, generate_shapes_scenes
from imgcap_hf.heatmaps import RegionCentres, measure_region_centres, peak_position, words_with_attention
from imgcap_hf.loading import load_captioner


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="outputs/shapes-attention", help="An attention model trained on shapes.")
    parser.add_argument("--num_images", type=int, default=300, help="Test scenes to use (the shapes test split).")
    parser.add_argument("--image_size", type=int, default=64, help="The shapes image size the model was trained at.")
    parser.add_argument("--batch_size", type=int, default=50, help="Scenes per forward pass.")
    args = parser.parse_args(argv)
    if args.num_images < 1 or args.batch_size < 1:
        parser.error("--num_images and --batch_size must be at least 1")
    return args


def named_shapes(
    words: list[tuple[str, np.ndarray]], scene: ShapesScene
) -> list[tuple[np.ndarray, tuple[float, float, float, float]]]:
    """(attention weights, box of the named shape) for each word of a caption that names a shape of `scene`."""
    named = []
    for index, (word, weights) in enumerate(words):
        colour = words[index - 1][0] if index else None
        matches = [shape for shape in scene.shapes if shape.kind == word and shape.colour == colour]
        if word in SHAPE_KINDS and len(matches) == 1:
            named.append((weights, matches[0].box))
    return named


def measure(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    model, processor = load_captioner(args.model)
    if model.config.decoder_type != "attention":
        raise SystemExit(f"error: {args.model} is a {model.config.decoder_type!r} model; heatmaps need attention.")
    scenes = generate_shapes_scenes(0, 0, args.num_images, image_size=args.image_size)["test"]
    image_processor = processor.image_processor
    offsets: dict[str, list[tuple[float, float, bool]]] = {"grid-cell centres": [], "receptive-field centres": []}
    placements: dict[str, RegionCentres] = {}
    for start in range(0, len(scenes), args.batch_size):
        batch = scenes[start : start + args.batch_size]
        captions = [caption for scene in batch for caption in scene.captions]
        pixel_values = processor(images=[scene.image for scene in batch], return_tensors="pt")["pixel_values"]
        labels = processor(text=captions, return_tensors="pt")["labels"]  # (captions, steps)
        if not placements:
            height, width = pixel_values.shape[-2:]  # (images, 3, height, width)
            grid = model.config.region_grid_size
            placements["grid-cell centres"] = RegionCentres.grid_cells(grid, grid, height, width)
            placements["receptive-field centres"] = measure_region_centres(model.get_encoder(), height, width)
        image_indices = torch.arange(len(batch)).repeat_interleave(len(batch[0].captions))  # (captions,)
        with torch.inference_mode():
            output = model(
                pixel_values=pixel_values,
                decoder_input_ids=model.prepare_decoder_input_ids_from_labels(labels),
                image_indices=image_indices,
                output_attentions=True,
            )
        attention = output.cross_attentions[0][:, 0]  # (captions, steps, regions)
        for row, caption_labels in enumerate(labels):
            scene = batch[int(image_indices[row])]
            for weights, (left, top, right, bottom) in named_shapes(
                words_with_attention(attention[row], caption_labels, processor.tokenizer), scene
            ):
                for name, centres in placements.items():
                    x, y = peak_position(scene.image, weights, image_processor, centres)
                    inside = left <= x <= right and top <= y <= bottom
                    offsets[name].append((x - (left + right) / 2, y - (top + bottom) / 2, inside))
    cell = args.image_size / model.config.region_grid_size  # pixels per grid cell
    return {
        name: {
            "words": len(rows),
            "grounded": float(np.mean([inside for _, _, inside in rows])),
            "offset_x_cells": float(np.mean([x for x, _, _ in rows])) / cell,
            "offset_y_cells": float(np.mean([y for _, y, _ in rows])) / cell,
        }
        for name, rows in offsets.items()
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    results = measure(args)
    print(f"Heatmap grounding of {args.model} on {args.num_images} shapes test scenes (5 reference captions each)")
    print(f"{'regions placed at':<26}{'shape words':>12}{'peak in box':>13}{'mean peak offset (cells) x, y':>32}")
    for name, result in results.items():
        print(
            f"{name:<26}{result['words']:>12}{result['grounded']:>13.1%}"
            f"{result['offset_x_cells']:>+24.2f}, {result['offset_y_cells']:+.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
