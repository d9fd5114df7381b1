"""The pipelines users reach through transformers: `image-captioning` and `image-text-to-text`, batched as unbatched,
shipped as remote code (run where only the model stack is installed), images from URLs, and saved generation
defaults that leave a user's request alone."""

import contextlib
import http.server
import importlib.metadata
import io
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_captioner
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from PIL import Image, ImageDraw
from transformers import TextStreamer, pipeline
from transformers.generation import GenerateBeamEncoderDecoderOutput, GenerateEncoderDecoderOutput

import train
from imgcap_hf import ImgCapForConditionalGeneration, ImgCapProcessor
from imgcap_hf.models.imgcap.pipeline_imgcap import SHIPPED_PIPELINES, caption_prompt_ids, download_image_bytes

# The packages a Hub user needs for the remote code (and, with them, what these require).
MODEL_STACK = ("torch", "transformers", "pillow", "numpy")


def scenes() -> list[Image.Image]:
    """Five pictures that the seed-12 tiny attention captioner describes in five different ways, so that a caption
    given to the wrong picture is noticed."""
    pictures = []
    for index, colour in enumerate(["red", "blue", "white", "black", "green"]):
        picture = Image.new("RGB", (40, 40), "gray")
        ImageDraw.Draw(picture).ellipse((4 + 3 * index, 4, 30 + 2 * index, 34), fill=colour)
        pictures.append(picture)
    return pictures


@pytest.fixture(scope="module")
def captioner_folder(tmp_path_factory) -> Path:
    model, processor = build_tiny_captioner("attention", seed=12)
    folder = tmp_path_factory.mktemp("tiny-pipelines")
    model.generation_config.update(max_new_tokens=6)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def captioner(captioner_folder):
    return pipeline("image-captioning", model=str(captioner_folder))


@pytest.fixture(scope="module")
def continuer(captioner_folder):
    return pipeline("image-text-to-text", model=str(captioner_folder), trust_remote_code=True)


# ---------------------------------------------------------------------------------------------------------------------
# Batched output is unbatched output
# ---------------------------------------------------------------------------------------------------------------------

GENERATE_SETTINGS = [
    {},
    {"num_beams": 3},
    {"num_beams": 3, "num_return_sequences": 2},
    {"num_beams": 4, "num_return_sequences": 3, "length_penalty": 0.5},
    {"do_sample": True, "top_k": 1, "num_return_sequences": 2},  # sampling, made deterministic by top_k=1
    {"no_repeat_ngram_size": 2, "max_new_tokens": 5},
]


@pytest.mark.parametrize("settings", GENERATE_SETTINGS, ids=lambda settings: ",".join(settings) or "saved")
def test_batched_captioning_equals_one_image_at_a_time(captioner, settings):
    """Five images in batches of two (the last one short): every image gets its own captions, as many as
    `num_return_sequences`, the same ones it gets alone."""
    alone = [captioner(picture, generate_kwargs=settings) for picture in scenes()]
    batched = captioner(scenes(), batch_size=2, generate_kwargs=settings)
    assert batched == alone
    assert [len(results) for results in batched] == [settings.get("num_return_sequences", 1)] * 5
    assert len({results[0]["generated_text"] for results in alone}) >= 4  # a misattributed caption would show


def test_generation_settings_come_as_keywords_too(captioner):
    assert captioner(scenes()[:3], batch_size=2, num_beams=3, num_return_sequences=2) == captioner(
        scenes()[:3], generate_kwargs={"num_beams": 3, "num_return_sequences": 2}
    )
    with pytest.raises(TypeError, match="num_beam"):
        captioner(scenes()[0], num_beam=3)


def test_image_text_to_text_continues_the_prefix_batched_as_alone(continuer, captioner):
    """transformers' image-text-to-text task: the text starts the caption ("" for none), prefixes of different
    lengths in one call give what each gives alone, and `return_full_text=False` gives only the continuation."""
    prefixes = ["", "a man rides", "two", "a dog runs across"]
    settings = {"num_beams": 3, "num_return_sequences": 2}
    together = continuer(scenes()[:4], text=prefixes, generate_kwargs=settings)
    alone = [record for picture, prefix in zip(scenes(), prefixes) for record in continuer(picture, text=prefix,
             generate_kwargs=settings)]  # fmt: skip
    assert together == alone and len(together) == 8
    for record, prefix in zip(together, [prefix for prefix in prefixes for _ in range(2)]):
        assert record["input_text"] == prefix and record["generated_text"].startswith(prefix)
        assert len(record["generated_text"]) > len(prefix)

    # No prefix is plain captioning: the same captions as the captioning pipeline, with or without `text=""`.
    expected = captioner(scenes()[1], num_beams=3)[0]["generated_text"]
    assert continuer(scenes()[1], text="", num_beams=3) == [{"input_text": "", "generated_text": expected}]
    assert continuer(scenes()[1], num_beams=3) == [{"input_text": "", "generated_text": expected}]
    continuation = continuer(scenes()[1], text="a man rides", return_full_text=False)[0]["generated_text"]
    assert continuer(scenes()[1], text="a man rides")[0]["generated_text"] == "a man rides" + continuation


def test_a_caption_prefix_is_sos_and_its_words_without_eos(continuer):
    """The tokenizer ends a text with `<eos>`: inside a prompt it would tell the model the caption is over."""
    tokenizer = continuer.processor.tokenizer
    words = tokenizer("A man rides")["input_ids"]  # <sos> a man rides <eos>
    assert words[0] == tokenizer.bos_token_id and words[-1] == tokenizer.eos_token_id
    assert caption_prompt_ids(tokenizer, "A man rides") == words[:-1]
    assert caption_prompt_ids(tokenizer, "") == caption_prompt_ids(tokenizer, "  ") == [tokenizer.bos_token_id]


def test_image_text_to_text_refuses_what_a_captioner_cannot_do(continuer):
    with pytest.raises(ValueError, match="not a chat or text alone"):
        continuer(text=[{"role": "user", "content": [{"type": "text", "text": "Describe."}]}])
    with pytest.raises(ValueError, match="2 images but 3 caption prefixes"):
        continuer(scenes()[:2], text=["a", "b", "c"])
    with pytest.raises(TypeError, match="padding"):
        continuer(scenes()[0], text="a", padding=True)


# ---------------------------------------------------------------------------------------------------------------------
# Remote code, where only the model stack is installed
# ---------------------------------------------------------------------------------------------------------------------


def model_stack_distributions() -> set[str]:
    """`MODEL_STACK` and everything it requires (extras left out), as installed here."""
    found, pending = set(), [canonicalize_name(name) for name in MODEL_STACK]
    while pending:
        name = pending.pop()
        if name in found:
            continue
        found.add(name)
        for line in importlib.metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(canonicalize_name(requirement.name))
    return found


@pytest.fixture(scope="module")
def model_stack_site(tmp_path_factory) -> Path:
    """A site-packages folder holding only the model stack's distributions (links to the installed ones)."""
    site = tmp_path_factory.mktemp("model-stack-site")
    for name in model_stack_distributions():
        distribution = importlib.metadata.distribution(name)
        for top in {file.parts[0] for file in distribution.files or []} - {"..", "__pycache__"}:
            if not top.endswith(".pth") and not (site / top).exists():
                (site / top).symlink_to(Path(distribution.locate_file(top)).resolve())
    return site


def run_with_only_the_model_stack(script: str, site: Path, tmp_path: Path) -> dict:
    """Run `script` in a fresh interpreter that sees the standard library and `site` only (no site-packages, no
    user site, no PYTHONPATH), offline with its own HF_HOME; return the JSON object its last printed line holds."""
    prelude = f"import sys\nsys.path.insert(0, {str(site)!r})\n"
    environment = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1", "PYTHONNOUSERSITE": "1"}
    environment.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-S", "-c", prelude + script], cwd=tmp_path, env=environment, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_shipped_pipelines_run_where_only_the_model_stack_is_installed(
    captioner_folder, captioner, continuer, model_stack_site, tmp_path
):
    """A Hub user with torch, transformers, Pillow and numpy (and what they need), and neither our package nor
    spaCy, gets both pipelines from the saved folder alone, captioning as our package does. (A caption prefix other
    than "" needs spaCy, as any text encoding by the tokenizer does.)"""
    assert json.loads((captioner_folder / "config.json").read_text())["custom_pipelines"] == SHIPPED_PIPELINES
    paths = []
    for index, picture in enumerate(scenes()[:3]):
        paths.append(tmp_path / f"scene{index}.png")
        picture.save(paths[-1])
    expected = {
        "captions": captioner([str(path) for path in paths], batch_size=2, num_beams=3, num_return_sequences=2),
        "continued": continuer(str(paths[0]), text="", num_beams=3),
    }
    script = textwrap.dedent(
        f"""
        import importlib.util, json
        from transformers import pipeline
        folder, paths = {str(captioner_folder)!r}, {[str(path) for path in paths]!r}
        captioner = pipeline("image-captioning", model=folder, trust_remote_code=True)
        continuer = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
        print(json.dumps({{
            "captions": captioner(paths, batch_size=2, num_beams=3, num_return_sequences=2),
            "continued": continuer(paths[0], text="", num_beams=3),
            "classes": [type(captioner).__module__, type(continuer).__module__],
            "importable": [name for name in ("imgcap_hf", "spacy", "datasets", "accelerate")
                           if importlib.util.find_spec(name) is not None],
        }}))
        """
    )
    output = run_with_only_the_model_stack(script, model_stack_site, tmp_path)
    assert output["importable"] == []
    assert all(module.startswith("transformers_modules.") for module in output["classes"])
    assert {key: output[key] for key in expected} == expected


# ---------------------------------------------------------------------------------------------------------------------
# Images from http(s) URLs, against a local server
# ---------------------------------------------------------------------------------------------------------------------


def png_bytes(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


class ImageServer(http.server.BaseHTTPRequestHandler):
    """/scene.png: a picture; /slow.png: answers after 2 s; /drip.png: sends a byte every 0.1 s for 2 s;
    /huge.png: declares 50 MB; /endless.png: streams bytes without a length; /redirect.png: to an ftp:// URL;
    anything else: 404."""

    picture = png_bytes(scenes()[2])

    def do_GET(self):
        if self.path == "/scene.png":
            self.answer(200, {"Content-Type": "image/png", "Content-Length": str(len(self.picture))}, self.picture)
        elif self.path == "/slow.png":
            time.sleep(2)
            self.answer(200, {"Content-Length": str(len(self.picture))}, self.picture)
        elif self.path == "/drip.png":
            self.answer(200, {}, b"")
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                for _ in range(20):
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(0.1)
        elif self.path == "/huge.png":
            self.answer(200, {"Content-Length": str(50 * 2**20)}, self.picture)
        elif self.path == "/endless.png":
            self.answer(200, {}, b"")
            try:
                for _ in range(64):
                    self.wfile.write(b"\0" * 2**16)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client stopped reading, as it should
        elif self.path == "/redirect.png":
            self.answer(302, {"Location": "ftp://127.0.0.1/scene.png", "Content-Length": "0"}, b"")
        else:
            self.answer(404, {"Content-Length": "0"}, b"")

    def answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # a client that gave up waiting
            self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ImageServer)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_pipelines_caption_image_urls(captioner, continuer, image_server):
    expected = captioner(scenes()[2], num_beams=3)
    assert captioner(f"{image_server}/scene.png", num_beams=3) == expected
    assert captioner([f"{image_server}/scene.png", scenes()[0]], batch_size=2)[0] == captioner(scenes()[2])
    assert (
        continuer(f"{image_server}/scene.png", text="", num_beams=3)[0]["generated_text"]
        == (expected[0]["generated_text"])
    )


def test_image_urls_have_a_time_limit_and_a_size_limit(captioner, continuer, image_server):
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"slow\.png: no complete answer within 0\.5 s \(timeout\)"):
        captioner(f"{image_server}/slow.png", timeout=0.5)
    assert time.monotonic() - started < 1.8
    started = time.monotonic()  # every read is quick, the whole answer is not
    with pytest.raises(ValueError, match=r"drip\.png: no complete answer within 0\.5 s \(timeout\)"):
        continuer(f"{image_server}/drip.png", text="", timeout=0.5)
    assert time.monotonic() - started < 1.8
    with pytest.raises(ValueError, match=r"huge\.png: it is 52,428,800 bytes, over the limit of 10,485,760"):
        download_image_bytes(f"{image_server}/huge.png")
    with pytest.raises(ValueError, match=r"endless\.png: it is over the limit of 100,000 bytes"):
        captioner(f"{image_server}/endless.png", max_download_bytes=100_000)
    with pytest.raises(ValueError, match=r"endless\.png: it is over the limit of 100,000 bytes"):
        continuer(f"{image_server}/endless.png", text="", max_download_bytes=100_000)
    with pytest.raises(ValueError, match=r"missing\.png: the server answered HTTP 404\."):
        captioner(f"{image_server}/missing.png")
    with pytest.raises(ValueError, match=r"redirects to ftp://127\.0\.0\.1/scene\.png, not http\(s\)"):
        captioner(f"{image_server}/redirect.png")
    assert download_image_bytes(f"{image_server}/scene.png") == ImageServer.picture


# ---------------------------------------------------------------------------------------------------------------------
# Saved generation defaults
# ---------------------------------------------------------------------------------------------------------------------


def test_saved_generation_defaults_leave_explicit_requests_alone(tmp_path):
    """train.py evaluates with beam search, yet the folder it saves decodes greedily by default: `do_sample=True`
    samples (not beam-samples), `TextStreamer` streams, and `num_beams=5` is beam search because it was asked for."""
    model, processor = build_tiny_captioner("attention", seed=12)
    train.save_model(model, processor, {"num_beams": 5, "max_new_tokens": 7, "length_penalty": 0.7}, tmp_path)
    model = ImgCapForConditionalGeneration.from_pretrained(tmp_path)
    processor = ImgCapProcessor.from_pretrained(tmp_path)
    assert (model.generation_config.num_beams, model.generation_config.max_new_tokens) == (1, 7)
    inputs = processor(images=scenes()[:1], return_tensors="pt")

    torch.manual_seed(0)
    sampled = model.generate(**inputs, do_sample=True, return_dict_in_generate=True)
    assert isinstance(sampled, GenerateEncoderDecoderOutput)  # beam sampling would be a beam output
    searched = model.generate(**inputs, num_beams=5, return_dict_in_generate=True)
    assert isinstance(searched, GenerateBeamEncoderDecoderOutput)

    class Collecting(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            streamed.append(text)

    streamed = []
    greedy = model.generate(**inputs, streamer=Collecting(processor.tokenizer, skip_special_tokens=True))
    assert greedy.shape[1] <= 8
    assert "".join(streamed).strip() == processor.batch_decode(greedy, skip_special_tokens=True)[0].strip()
