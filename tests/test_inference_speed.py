"""The CPU inference settings (`imgcap_hf.inference`): fp32 keeps the model's captions exactly, int8 and bf16 load and
caption with the layers they promise, `choose_precision` keeps only settings that agree with fp32, and the setting
reaches the CLI and the app. Tiny random models; the speed itself is measured by benchmarks/benchmark_imgcap.py."""

import copy
import json

import pytest
import torch
from conftest import build_tiny_captioner
from PIL import Image
from torch import nn

from imgcap_hf import cli, inference
from imgcap_hf.inference import PrecisionChoice, choose_precision, optimize_for_cpu

DECODER_TYPES = ["attention", "pooled"]


def random_images(count: int = 4) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(7))  # (count, 3, H, W)


def captions(model: nn.Module, images: torch.Tensor, num_beams: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(pixel_values=images, num_beams=num_beams, max_new_tokens=8)


@pytest.mark.parametrize("decoder_type", DECODER_TYPES)
def test_fp32_setting_keeps_greedy_and_beam_captions_exactly(decoder_type):
    model, _ = build_tiny_captioner(decoder_type, seed=4)
    images = random_images()

    def logits() -> torch.Tensor:
        with torch.no_grad():
            return model(pixel_values=images, decoder_input_ids=before[1][:, :-1]).logits

    before = {beams: captions(model, images, beams) for beams in (1, 3)}
    logits_before = logits()
    optimized = optimize_for_cpu(model, "fp32")
    assert optimized is model and model.inference_precision == "fp32"
    convolution = model.get_encoder().backbone.embedder.embedder.convolution
    assert convolution.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(logits(), logits_before)  # bit for bit: the same arithmetic, only another weight layout
    for beams, expected in before.items():
        assert torch.equal(captions(model, images, beams), expected), beams


@pytest.mark.parametrize("decoder_type", DECODER_TYPES)
def test_int8_setting_quantizes_the_decoder_and_computes_nearly_the_same_model(decoder_type):
    model, _ = build_tiny_captioner(decoder_type, seed=4)
    images = random_images()
    decoder_input_ids = captions(model, images, 1)[:, :-1]
    with torch.no_grad():
        fp32_logits = model(pixel_values=images, decoder_input_ids=decoder_input_ids).logits
    int8 = optimize_for_cpu(copy.deepcopy(model), "int8")
    quantized = [name for name, module in int8.decoder.named_modules() if "quantized" in type(module).__module__]
    recurrent = ["cells.0", "cells.1"] if decoder_type == "attention" else ["lstm"]
    assert {"output", *recurrent} <= set(quantized)
    assert not any(isinstance(module, nn.BatchNorm2d) for module in int8.get_encoder().modules())
    with torch.no_grad():
        int8_logits = int8(pixel_values=images, decoder_input_ids=decoder_input_ids).logits
    # int8 weights round each weight to 1/127 of its row's largest: close to fp32's logits, not equal.
    assert not torch.equal(int8_logits, fp32_logits)
    assert (int8_logits - fp32_logits).abs().max() <= 0.05 * fp32_logits.abs().max()
    for beams in (1, 3):
        ids = captions(int8, images, beams)
        assert ids.shape[0] == len(images) and (ids[:, 0] == model.config.decoder_start_token_id).all()
        assert int(ids.max()) < model.config.vocab_size
    with pytest.raises(ValueError, match="int8-quantized captioner cannot be saved"):
        int8.save_pretrained("unused")


def test_bf16_setting_runs_the_whole_model_in_bfloat16():
    model, _ = build_tiny_captioner("attention", seed=4)
    images = random_images()
    optimize_for_cpu(model, "bf16")
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
    ids = captions(model, images, 3)
    assert ids.shape[0] == len(images) and (ids[:, 0] == model.config.decoder_start_token_id).all()


def test_a_bad_or_repeated_precision_is_one_clear_sentence():
    model, _ = build_tiny_captioner("attention")
    with pytest.raises(ValueError, match=r"^precision must be one of fp32, int8, bf16, got 'fp16'\.$"):
        optimize_for_cpu(model, "fp16")
    optimize_for_cpu(model, "int8")
    with pytest.raises(ValueError, match="already prepared for int8 inference: load it again"):
        optimize_for_cpu(model, "fp32")


def test_choose_precision_takes_the_fastest_setting_that_agrees_with_fp32(monkeypatch):
    model, processor = build_tiny_captioner("attention")
    images = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue")]
    # Scripted captions and times per setting (fp32 is always captioned first): int8 is faster but disagrees once.
    scripted = {"fp32": (["a", "b"], 1.0), "int8": (["a", "x"], 0.2), "bf16": (["a", "b"], 0.5)}

    def timed_captions(prepared, processor, inputs, generation_kwargs):
        return scripted[prepared.inference_precision]

    monkeypatch.setattr(inference, "_timed_captions", timed_captions)
    chosen_model, choice = choose_precision(model, processor, images, candidates=["int8", "bf16"])
    assert choice == PrecisionChoice("bf16", 2, {"int8": 1, "bf16": 2}, {"fp32": 1.0, "int8": 0.2, "bf16": 0.5})
    assert chosen_model.inference_precision == "bf16" and chosen_model is not model
    assert choice.describe().startswith("bf16 (the fastest setting whose captions equal fp32's on all 2 check images")

    scripted["bf16"] = (["a", "b"], 1.5)  # agrees, but slower than fp32
    chosen_model, choice = choose_precision(*build_tiny_captioner("attention"), images, candidates=["int8", "bf16"])
    assert choice.precision == "fp32" and chosen_model.inference_precision == "fp32"


def test_cli_captions_with_the_precision_it_is_given(saved_tiny_captioner, tmp_path, capsys, monkeypatch):
    image = tmp_path / "red.png"
    Image.new("RGB", (40, 40), "red").save(image)
    used = []
    monkeypatch.setattr(cli, "optimize_for_cpu", lambda model, precision: used.append(precision) or model)
    argv = ["caption", "--model", str(saved_tiny_captioner), "--device", "cpu", str(image), "--max_new_tokens", "3"]
    assert cli.main([*argv, "--precision", "int8"]) == 0
    assert used == ["int8"] and "caption" in json.loads(capsys.readouterr().out.splitlines()[0])
    monkeypatch.undo()
    assert cli.main([*argv, "--precision", "int8"]) == 0  # the real setting captions too
    assert "caption" in json.loads(capsys.readouterr().out.splitlines()[0])
    with pytest.raises(SystemExit):
        cli.main([*argv, "--precision", "fp16"])
    assert "invalid choice: 'fp16'" in capsys.readouterr().err


def test_app_serves_in_the_precision_it_chose_and_says_so(saved_tiny_attention_captioner, capsys, monkeypatch):
    import app

    monkeypatch.setattr(app, "PRECISION_CHECK_IMAGES", 2)

    (captioner,) = app.load_captioners([str(saved_tiny_attention_captioner)], precision="int8").values()
    assert captioner.model.inference_precision == "int8" and captioner.precision == "int8 (set by --precision)"
    assert "inference in int8 (set by --precision)" in capsys.readouterr().out

    (captioner,) = app.load_captioners([str(saved_tiny_attention_captioner)], precision="auto").values()
    assert captioner.precision.startswith(f"{captioner.model.inference_precision} (the fastest setting whose")
    assert f"all {app.PRECISION_CHECK_IMAGES} check images" in captioner.precision
    assert app.parse_args(["--precision", "int8"]).precision == "int8"
    assert app.parse_args([]).precision == "auto"
