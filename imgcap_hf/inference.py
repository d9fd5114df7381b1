"""Faster CPU inference settings for a loaded captioner: `optimize_for_cpu(model, precision)`.

A step of beam search or greedy decoding reads every decoder weight once (about 30M of them at the published size)
for a handful of rows, so on a CPU it is bound by memory bandwidth: fewer bytes per weight is what makes it faster.

- `"fp32"`: the arithmetic of the loaded model, bit for bit; only the encoder's convolution weights move to the
  channels-last layout the encoder already feeds its images in (oneDNN then skips a reorder per call).
- `"int8"`: the decoder's linear and LSTM layers dynamically quantized to int8 (weights per output channel,
  activations per call; a quarter of the float32 bytes), and the encoder's BatchNorm folded into its convolutions.
  Captions may differ from fp32's: `benchmarks/dtype_agreement.py` reports how often, on a test set.
- `"bf16"`: every weight and activation in bfloat16 (half the bytes). Fast only on CPUs with bf16 units
  (`avx512_bf16` or AMX, see `cpu_has_bf16_units`); elsewhere the products are emulated and slower than float32.

The result is for captioning in this process: `save_pretrained` of an int8 model is refused.

`choose_precision` picks, for one model, the fastest of these whose captions of a check set equal fp32's (what the
app does at start-up with `--precision auto`).
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

PRECISIONS = ("fp32", "int8", "bf16")


@dataclass(frozen=True)
class PrecisionChoice:
    """What `choose_precision` found: the setting it chose, and for every setting tried the number of check images
    captioned exactly as fp32 captions them and the seconds one captioning of the check set took."""

    precision: str
    checked_images: int
    agreeing: dict[str, int]
    seconds: dict[str, float]

    def describe(self) -> str:
        """One line for a log or a UI, e.g. `int8 (captions equal fp32's on 16 of 16 check images; 0.40 s
        against fp32's 1.10 s)`."""
        tried = ", ".join(
            f"{name} {self.agreeing[name]} of {self.checked_images} equal in {self.seconds[name]:.2f} s"
            for name in self.agreeing
        )
        return (
            f"{self.precision} (the fastest setting whose captions equal fp32's on all {self.checked_images} check "
            f"images; fp32 took {self.seconds['fp32']:.2f} s; tried: {tried or 'nothing else on this CPU'})"
        )


def candidate_precisions() -> list[str]:
    """The faster settings worth trying on this CPU: int8 everywhere, bf16 only where the CPU has bf16 units."""
    return ["int8"] + (["bf16"] if cpu_has_bf16_units() else [])


def cpu_has_bf16_units() -> bool:
    """Whether this CPU computes bfloat16 products natively (`avx512_bf16` or AMX in /proc/cpuinfo's flags)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def optimize_for_cpu(model: nn.Module, precision: str = "fp32") -> nn.Module:
    """Prepare an `ImgCapForConditionalGeneration` for captioning on CPU, in place, and return it (in eval mode).

    `precision` is one of `PRECISIONS` (see the module docstring). The chosen setting is recorded as
    `model.inference_precision`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
    if getattr(model, "inference_precision", "fp32") != "fp32":
        raise ValueError(
            f"This model is already prepared for {model.inference_precision} inference: load it again to choose "
            "another precision."
        )
    model.eval().requires_grad_(False)
    backbone = model.get_encoder().backbone
    if precision != "fp32":
        _fold_batch_norms(backbone)
    if precision == "bf16":
        model.to(torch.bfloat16)
    backbone.to(memory_format=torch.channels_last)
    if precision == "int8":
        _quantize_decoder(model)
    model.inference_precision = precision
    return model


def _fold_batch_norms(backbone: nn.Module) -> None:
    """Fold each eval-mode BatchNorm into the convolution before it (transformers' ResNet and ConvNeXt-style
    `convolution` + `normalization` layers): one pass over the activations fewer per layer, the same function up to
    float rounding."""
    for layer in backbone.modules():
        convolution, normalization = getattr(layer, "convolution", None), getattr(layer, "normalization", None)
        if isinstance(convolution, nn.Conv2d) and isinstance(normalization, nn.BatchNorm2d):
            layer.convolution = fuse_conv_bn_eval(convolution, normalization)
            layer.normalization = nn.Identity()


def _quantize_decoder(model: nn.Module) -> None:
    """Swap the decoder's `nn.Linear`, `nn.LSTMCell` and `nn.LSTM` layers for int8 dynamic ones (the decoder's step
    runs whatever layers it holds). The embedding stays float: a step reads only its rows for the words fed."""
    qconfigs = {
        nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig,
        nn.LSTMCell: torch.ao.quantization.default_dynamic_qconfig,
        nn.LSTM: torch.ao.quantization.default_dynamic_qconfig,
    }
    with warnings.catch_warnings():  # torch.ao's eager quantization warns that it is moving to torchao
        warnings.simplefilter("ignore")
        torch.ao.quantization.quantize_dynamic(model.decoder, qconfigs, dtype=torch.qint8, inplace=True)
    model.save_pretrained = _refuse_saving


def _refuse_saving(*args, **kwargs):
    raise ValueError(
        "An int8-quantized captioner cannot be saved (its layers are not the checkpoint's): save the float model, "
        "and call optimize_for_cpu after loading it."
    )


def choose_precision(
    model: nn.Module, processor, images: list, candidates: list[str] | None = None, **generation_kwargs
) -> tuple[nn.Module, PrecisionChoice]:
    """The fastest CPU setting (of fp32 and `candidates`, default `candidate_precisions()`) whose captions of
    `images` all equal fp32's, applied: returns the model to caption with (`model` itself for fp32, else a prepared
    copy) and the `PrecisionChoice`. Each setting captions the images twice with `generation_kwargs`; the second,
    warm run is timed."""
    inputs = processor(images=images, return_tensors="pt")
    reference = optimize_for_cpu(model, "fp32")
    reference_captions, seconds = _timed_captions(reference, processor, inputs, generation_kwargs)
    fastest, chosen, timings, agreeing = reference, "fp32", {"fp32": seconds}, {}
    for precision in candidates if candidates is not None else candidate_precisions():
        prepared = optimize_for_cpu(copy.deepcopy(reference), precision)
        captions, timings[precision] = _timed_captions(prepared, processor, inputs, generation_kwargs)
        agreeing[precision] = sum(ours == theirs for ours, theirs in zip(captions, reference_captions))
        if agreeing[precision] == len(images) and timings[precision] < timings[chosen]:
            fastest, chosen = prepared, precision
    return fastest, PrecisionChoice(chosen, len(images), agreeing, timings)


def _timed_captions(model: nn.Module, processor, inputs, generation_kwargs: dict) -> tuple[list[str], float]:
    with torch.no_grad():
        model.generate(**inputs, **generation_kwargs)
        start = time.perf_counter()
        ids = model.generate(**inputs, **generation_kwargs)
    seconds = time.perf_counter() - start
    return processor.batch_decode(ids, skip_special_tokens=True), seconds
