"""The demo under load and under attack (issue 6): floods of simultaneous requests against the bounded queue, memory
over repeated floods, file-access attacks on Gradio's routes, and bad input that must be answered with one sentence and
never with a path or a traceback.

Requests go over plain HTTP (`httpx`, Gradio's `/gradio_api/call/<endpoint>` protocol), as any client could send them:
`gradio_client` would refuse some of them before sending, and would replace the server's messages with its own. The
app runs in-process where a test must hold its workers (to fill the queue deterministically) and as `python app.py`
in a subprocess where its memory is measured. Everything is offline, on 127.0.0.1, on a tiny random model.
"""

import hashlib
import http.client
import io
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

import app
from imgcap_hf import ImgCapForConditionalGeneration, ImgCapProcessor, load_image

REPO_ROOT = Path(__file__).resolve().parents[2]
FLOOD = 50  # simultaneous requests per flood
REQUEST_TIMEOUT = 120.0  # seconds any one request may take before the test calls it lost
FILE_META = {"meta": {"_type": "gradio.FileData"}}  # marks a file payload, which Gradio then checks was uploaded

# Gradio's queue calls pandas in ways pandas 3 deprecates; nothing this project can change.
pytestmark = [
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]


# ---------------------------------------------------------------------------------------------------------------------
# Requests over plain HTTP
# ---------------------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _picture(index: int) -> bytes:
    """A distinct small PNG per index (32 to 64 px, a few coloured rectangles), so that a caption delivered to the
    wrong request shows up as a wrong caption."""
    rng = np.random.default_rng(index)
    width, height = (int(side) for side in rng.integers(32, 65, size=2))
    pixels = np.full((height, width, 3), rng.integers(0, 256, size=3), np.uint8)
    for _ in range(3):
        top, left = rng.integers(0, height - 8), rng.integers(0, width - 8)
        pixels[top : top + rng.integers(4, 16), left : left + rng.integers(4, 16)] = rng.integers(0, 256, size=3)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _upload(base_url: str, name: str, data: bytes) -> dict:
    """Upload one file as the browser does; returns the file payload that the endpoints take."""
    response = httpx.post(f"{base_url}gradio_api/upload", files={"files": (name, data)}, timeout=30)
    assert response.status_code == 200, response.text
    (path,) = response.json()
    return {"path": path, **FILE_META}


def _caption_arguments(image: object, index: int = 0, model: object = None) -> list:
    """The ten inputs of `/caption`: greedy or beam search (1 to 3 beams) and 3 to 8 new tokens, varied by `index`
    so that the requests of a flood differ; one caption each."""
    return [image, model, 1 + index % 3, 3 + index % 6, 1.0, 1, False, 1.0, 0.9, 0]


def _join(base_url: str, endpoint: str, data: list) -> httpx.Response:
    """Put one call in the queue: 200 with an event id, or 503 when the queue is full."""
    return httpx.post(f"{base_url}gradio_api/call/{endpoint}", json={"data": data}, timeout=30)


def _outcome(base_url: str, endpoint: str, joined: httpx.Response) -> tuple[str, object]:
    """("complete", outputs), ("error", message or None), or ("busy", the 503 response) for one joined call."""
    if joined.status_code == 503:
        return "busy", joined
    assert joined.status_code == 200, joined.text
    event_id = joined.json()["event_id"]
    stream = httpx.get(f"{base_url}gradio_api/call/{endpoint}/{event_id}", timeout=REQUEST_TIMEOUT)
    for block in stream.text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if fields.get("event") in ("complete", "error"):
            data = json.loads(fields["data"])
            if fields["event"] == "error":
                data = data.get("error") if isinstance(data, dict) else data
            return fields["event"], data
    raise AssertionError(f"no result in the event stream: {stream.text[:500]}")


def _call(base_url: str, endpoint: str, data: list) -> tuple[str, object]:
    return _outcome(base_url, endpoint, _join(base_url, endpoint, data))


def _expected_captions(model_dir: Path, pictures: list[bytes]) -> list[str]:
    """Each request's caption computed directly with the same saved model: deterministic greedy or beam search."""
    model = ImgCapForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = ImgCapProcessor.from_pretrained(model_dir)
    captions = []
    for index, picture in enumerate(pictures):
        _, _, num_beams, max_new_tokens, *_ = _caption_arguments(None, index)
        pixel_values = processor(images=load_image(picture), return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            sequences = model.generate(pixel_values=pixel_values, num_beams=num_beams, max_new_tokens=max_new_tokens)
        captions.append(processor.batch_decode(sequences, skip_special_tokens=True)[0])
    return captions


def _get_verbatim(base_url: str, path: str) -> tuple[int, str]:
    """GET `/<path>` exactly as written (httpx would resolve `..` segments before sending): (status, body)."""
    server = httpx.URL(base_url)
    connection = http.client.HTTPConnection(server.host, server.port, timeout=30)
    try:
        connection.request("GET", "/" + path)
        response = connection.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        connection.close()


def _via_root(folder: str | Path, path: str | Path) -> str:
    """`path` spelled as a climb out of `folder` with `..`: <folder>/../../<path without its leading />."""
    return "/".join([str(folder), *[".."] * (len(Path(folder).parts) - 1), str(Path(path).relative_to("/"))])


def assert_no_leak(message: object, *private: object) -> None:
    """A message for the user names at most a file, never a folder, a traceback, or one of the `private` strings."""
    text = json.dumps(message) if not isinstance(message, str) else message
    assert "Traceback" not in text and 'File "' not in text, text
    assert not re.search(r"(/|\\)(tmp|home|work|etc|usr|root|proc|pytest-of-\w+|gradio)\b", text), text
    for secret in private:
        assert str(secret) not in text, (secret, text)


# ---------------------------------------------------------------------------------------------------------------------
# The served app, in-process
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live(saved_tiny_attention_captioner, tmp_path_factory):
    """The app on 127.0.0.1 with the tiny attention model, launched with the production settings, and torch's threads
    shared out between the concurrent captions as `python app.py` does (`serving_threads`)."""
    demo = app.build_demo([str(saved_tiny_attention_captioner)], examples_dir=tmp_path_factory.mktemp("examples"))
    threads = torch.get_num_threads()
    torch.set_num_threads(app.serving_threads(threads))
    app.launch_demo(demo, "127.0.0.1", _free_port(), prevent_thread_lock=True)
    try:
        yield demo
    finally:
        demo.close()
        torch.set_num_threads(threads)


def test_installed_gradio_has_no_published_file_access_advisories():
    """Gradio below 6.22 has published file-access and SSRF advisories: the `app` extra and the installed copy must
    both be past them."""
    import gradio
    from packaging.version import Version

    assert Version(gradio.__version__) >= Version("6.22")
    requirement = re.search(r"^\s*gradio(.*)$", (REPO_ROOT / "setup.cfg").read_text(), re.MULTILINE)
    assert requirement is not None and requirement.group(1).replace(" ", "") == ">=6.22,<7"


def test_flood_beyond_the_queue_gets_busy_answers_and_every_other_request_its_own_caption(
    live, saved_tiny_attention_captioner, monkeypatch
):
    """With the workers held, a flood fills the queue exactly: `QUEUE_MAX_SIZE` wait, the rest are turned away at
    once with HTTP 503, the busy sentence and a Retry-After header. Released, every waiting request gets the caption
    that the same model gives its own image directly: nothing lost, nothing swapped, nothing hanging."""
    started, gate = threading.Semaphore(0), threading.Event()
    caption_image = app.caption_image

    def held_caption_image(*args, **kwargs):
        started.release()
        assert gate.wait(timeout=REQUEST_TIMEOUT), "the test never released the workers"
        return caption_image(*args, **kwargs)

    monkeypatch.setattr(app, "caption_image", held_caption_image)
    url = live.local_url
    pictures = [_picture(index) for index in range(FLOOD)]
    expected = _expected_captions(saved_tiny_attention_captioner, pictures)
    assert len(set(expected)) >= 10, expected  # enough different captions for a swap to be noticed
    uploads = [_upload(url, f"picture_{index}.png", picture) for index, picture in enumerate(pictures)]

    with ThreadPoolExecutor(FLOOD) as pool:
        try:
            # Occupy the workers first, so that the queue alone decides who is turned away.
            workers = app.CONCURRENCY_LIMIT
            running = [_join(url, "caption", _caption_arguments(uploads[index], index)) for index in range(workers)]
            for _ in range(workers):
                assert started.acquire(timeout=30), "the first requests never started"
            barrier = threading.Barrier(FLOOD - workers)

            def join_at_once(index: int) -> httpx.Response:
                barrier.wait(timeout=30)
                return _join(url, "caption", _caption_arguments(uploads[index], index))

            joined = running + list(pool.map(join_at_once, range(workers, FLOOD)))
        finally:
            gate.set()
        outcomes = [
            future.result(timeout=REQUEST_TIMEOUT)
            for future in [pool.submit(_outcome, url, "caption", response) for response in joined]
        ]

    busy = [index for index, (kind, _) in enumerate(outcomes) if kind == "busy"]
    assert len(busy) == FLOOD - app.CONCURRENCY_LIMIT - app.QUEUE_MAX_SIZE
    for index in busy:
        response = outcomes[index][1]
        assert response.json() == {"detail": app.BUSY_MESSAGE}
        assert response.headers["retry-after"] == str(app.RETRY_AFTER_SECONDS)
    for index, (kind, outputs) in enumerate(outcomes):
        if index not in busy:
            assert kind == "complete", (index, outputs)
            assert outputs[0] == expected[index], index
    assert _call(url, "caption", _caption_arguments(uploads[0]))[1][0] == expected[0]  # and it still serves


def _expected_answers(model_dir: Path, pictures: list[bytes], settings: "app.DecodingSettings") -> list[tuple]:
    """What `/caption` must answer for each picture, computed in-process with `caption_image` and
    `attention_overlays`: (caption, table rows, heatmap pixel arrays). The heatmaps are drawn over the picture, so
    an answer delivered to another picture's request never matches."""
    (captioner,) = app.load_captioners([str(model_dir)]).values()
    answers = []
    for picture in pictures:
        image = load_image(picture)
        result = app.caption_image(captioner, image, settings)
        overlays = app.attention_overlays(
            image, result.word_attention, captioner.processor.image_processor, result.region_centres
        )
        table = [[text, round(score, 4)] for text, score in result.captions]
        answers.append((result.captions[0][0], table, [np.asarray(overlay) for overlay, _ in overlays]))
    return answers


def _download_heatmaps(gallery: list[dict]) -> list[np.ndarray]:
    """Every gallery file of one answer, fetched whole (the server's Content-Length honoured) and decoded."""
    heatmaps = []
    for item in gallery:
        response = httpx.get(item["image"]["url"], timeout=30)
        assert response.status_code == 200, response.text
        heatmaps.append(np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB")))
    return heatmaps


def test_identical_and_distinct_concurrent_requests_each_get_their_whole_answer(live, saved_tiny_attention_captioner):
    """`FLOOD` requests, at most `QUEUE_MAX_SIZE` in flight so that none is turned away, spread over three pictures
    (an example clicked by many visitors at once): every one gets its picture's caption, table and heatmaps, and every
    heatmap file downloads whole and decodes to the pixels drawn in-process. Handed PIL images, Gradio writes each to
    a path named by its content with a plain write, so identical answers rewrite one file while another response is
    sending it (the client gets "peer closed connection", the server logs "Too little data for declared
    Content-Length"): with PIL images in the answer, a few of these requests fail on every run here."""
    url = live.local_url
    settings = app.DecodingSettings(num_beams=1, max_new_tokens=2, num_captions=1)  # two heatmaps per answer
    pictures = [_picture(400 + index) for index in range(3)]
    expected = _expected_answers(saved_tiny_attention_captioner, pictures, settings)
    uploads = [_upload(url, f"scene_{index}.png", picture) for index, picture in enumerate(pictures)]

    def request(index: int) -> tuple[str, object, list[np.ndarray]]:
        arguments = [uploads[index % len(pictures)], None, 1, settings.max_new_tokens, 1.0, 1, False, 1.0, 0.9, 0]
        kind, outputs = _call(url, "caption", arguments)
        if kind != "complete":
            return kind, outputs, []
        try:
            return kind, outputs, _download_heatmaps(outputs[2])
        except (httpx.TransportError, OSError) as error:  # a truncated body, or bytes that do not decode
            return "broken file", repr(error), []

    with ThreadPoolExecutor(app.QUEUE_MAX_SIZE) as pool:
        answers = list(pool.map(request, range(FLOOD)))
    failures = [(index, kind, outputs) for index, (kind, outputs, _) in enumerate(answers) if kind != "complete"]
    assert failures == []
    for index, (_, (caption, table, gallery), heatmaps) in enumerate(answers):
        expected_caption, expected_table, expected_heatmaps = expected[index % len(pictures)]
        assert caption == expected_caption and table["data"] == expected_table, index
        assert [item["caption"] for item in gallery] == caption.split(), index
        assert len(heatmaps) == len(expected_heatmaps), index
        for heatmap, drawn in zip(heatmaps, expected_heatmaps):
            np.testing.assert_array_equal(heatmap, drawn)


def test_file_route_serves_uploads_and_nothing_else(live, saved_tiny_attention_captioner, tmp_path):
    """`/gradio_api/file=` serves what was uploaded (the control that shows the route works) and refuses everything
    else: system files, the app's source, the model folder, dotfiles, the repository's git and venv files, traversal
    in every spelling, folders, the upload folder itself, a guessed upload path, and URLs (an SSRF to the server
    itself). Refused means 403 or 404 and none of the file's bytes."""
    url = live.local_url
    secret = tmp_path / ".secret"
    secret.write_text("token=do-not-serve\n")
    uploaded = _upload(url, "mine.png", _picture(0))["path"]
    assert httpx.get(f"{url}gradio_api/file={uploaded}", timeout=30).content == _picture(0)
    inside = f"{Path(uploaded).parent}/../{Path(uploaded).parent.name}/{Path(uploaded).name}"  # `..`, staying inside
    assert _get_verbatim(url, f"gradio_api/file={inside}")[0] == 200  # so `..` reaches the server unresolved

    upload_folder = Path(uploaded).parents[1]
    # Upload folders are named by a hash of the content salted with Gradio's secret seed: knowing the bytes of
    # someone else's picture is not enough to find it.
    guessed = upload_folder / hashlib.sha256(_picture(1)).hexdigest() / "picture.png"
    _upload(url, "picture.png", _picture(1))
    model = saved_tiny_attention_captioner
    targets = {
        "/etc/passwd": "root:",
        str(REPO_ROOT / "app.py"): "import gradio",
        str(model / "config.json"): "decoder_type",
        str(model / "model.safetensors"): "",
        str(model / "tokenizer_config.json"): "",
        str(secret): "do-not-serve",
        str(Path.home() / ".bashrc"): "",
        str(REPO_ROOT / ".git" / "config"): "[core]",
        str(REPO_ROOT / ".venv" / "pyvenv.cfg"): "home",
        str(REPO_ROOT / "setup.cfg"): "[metadata]",
        str(upload_folder): "",
        str(Path(uploaded).parent): "",
        str(guessed): "",
        _via_root(Path(uploaded).parent, "/etc/passwd"): "root:",
        "app.py": "import gradio",  # relative to the working directory, which Gradio 4 served
        ".git/config": "[core]",
    }
    spellings = {
        "..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd": "root:",
        "%2Fetc%2Fpasswd": "root:",
        "%252Fetc%252Fpasswd": "root:",
        "..%252F..%252F..%252Fetc%252Fpasswd": "root:",
        "..\\..\\..\\..\\etc\\passwd": "root:",
        "....//....//....//etc/passwd": "root:",
        "/etc/./passwd": "root:",
        "//etc//passwd": "root:",
        "file:///etc/passwd": "root:",
        f"http://127.0.0.1:{live.server_port}/config": "components",
        "http://localhost/etc/passwd": "",
    }
    routes = ["gradio_api/file=", "gradio_api/file/", "file="]
    requests = [(route + target, content) for target, content in {**targets, **spellings}.items() for route in routes]
    requests += [
        ("static/../../../../etc/passwd", "root:"),
        ("assets/..%2F..%2F..%2F..%2Fetc%2Fpasswd", "root:"),
        ("gradio_api/vibe-code", "import"),
    ]
    failures = []
    for path, content in requests:
        status, body = _get_verbatim(url, path)
        if status not in (400, 403, 404) or (content and content in body):
            failures.append((path, status, body[:80]))
    assert failures == []


def test_uploads_are_capped_and_cannot_escape_or_script_the_page(live, tmp_path):
    """An upload over `MAX_FILE_SIZE` gets 413; a file name cannot place an upload outside the upload folder; an
    uploaded SVG or HTML page comes back as a download, never as a page that runs its script (stored XSS)."""
    url = live.local_url
    response = httpx.post(
        f"{url}gradio_api/upload", files={"files": ("big.png", b"\0" * (app.MAX_FILE_SIZE + 1))}, timeout=60
    )
    assert response.status_code == 413, response.text

    escaped = Path(_upload(url, "../../../../../../tmp/escaped.png", _picture(2))["path"])
    assert escaped.name == "escaped.png" and escaped.parents[1] == Path(app.get_upload_folder())

    script = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(document.cookie)</script></svg>'
    for name, data in (("drawing.svg", script), ("page.html", b"<html><script>alert(1)</script></html>")):
        served = httpx.get(f"{url}gradio_api/file={_upload(url, name, data)['path']}", timeout=30)
        assert served.status_code == 200
        assert served.headers["content-type"] == "application/octet-stream", name
        assert served.headers["content-disposition"].startswith("attachment"), name


def test_config_and_api_description_do_not_reveal_the_model_folder(live, saved_tiny_attention_captioner):
    """The page's config and the API description name the model by its folder's name only. (They do show the upload
    folder, /tmp/gradio by default, in the example images' URLs: that is how the page fetches them.)"""
    model = saved_tiny_attention_captioner
    for route in ("config", "gradio_api/info", "gradio_api/openapi.json"):
        response = httpx.get(f"{live.local_url}{route}", timeout=30)
        if response.status_code == 404:
            continue
        assert response.status_code == 200, route
        for private in (model, model.parent, REPO_ROOT, Path.home()):
            assert f'"{private}' not in response.text and f"{private}/" not in response.text, (route, private)
    assert model.name in httpx.get(f"{live.local_url}config", timeout=30).text  # the label, in the model selector


def test_endpoints_open_only_uploaded_files(live, tmp_path):
    """A file payload without Gradio's `meta` marker skips Gradio's "was this uploaded?" check and reaches the handler:
    an image anywhere on the server would be captioned and drawn back as heatmaps. Both endpoints refuse any path
    outside the upload folder (`..` included) with one sentence that is the same whether the file exists or not."""
    url = live.local_url
    on_server = tmp_path / "private_photo.png"
    on_server.write_bytes(_picture(4))
    uploaded = _upload(url, "mine.png", _picture(4))["path"]
    paths = [
        str(on_server),
        str(tmp_path / "missing.png"),
        "/etc/passwd",
        _via_root(Path(uploaded).parent, on_server),
        str(REPO_ROOT / "app.py"),
    ]
    for path in paths:
        # Without the marker, the app's own check answers; with it, Gradio refuses first (an error without text).
        for image, answer in (({"path": path}, app.NOT_UPLOADED_MESSAGE), ({"path": path, **FILE_META}, None)):
            assert _call(url, "caption", _caption_arguments(image)) == ("error", answer), image
            batched = ("complete", ["", answer]) if answer else ("error", None)
            assert _call(url, "caption_batch", [image]) == batched, image
    # Uploads still work, with or without the marker, and so do the examples (Gradio's copies, in the upload folder).
    assert _call(url, "caption", _caption_arguments({"path": uploaded}))[0] == "complete"
    config = httpx.get(f"{url}config", timeout=30).json()
    (examples,) = [block for block in config["components"] if block["type"] == "dataset"]
    example = examples["props"]["samples"][0][0]
    assert _call(url, "caption", _caption_arguments({"path": example["path"], **FILE_META}))[0] == "complete"


@pytest.fixture
def image_server():
    """A plain HTTP server on 127.0.0.1 that serves a picture at any path and records each request: (URL, paths)."""
    import http.server

    picture, requested = _picture(7), []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requested.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(picture)))
            self.end_headers()
            self.wfile.write(picture)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/photo.png", requested
    finally:
        server.shutdown()
        server.server_close()


def test_endpoints_refuse_image_urls_and_download_nothing(live, image_server, tmp_path, monkeypatch):
    """A file payload whose path is an `http(s)` URL: Gradio downloads it before any handler runs, whole and with no
    size limit, when its SSRF guard takes the host for a public one. The test lets 127.0.0.1 pass as public (the
    control: Gradio's own download then fetches from the local server), and both endpoints must answer with the
    one sentence and fetch nothing, with or without the `meta` marker. Uploads still work, also in a batch beside
    a URL."""
    from gradio import processing_utils

    url = live.local_url
    image_url, requested = image_server
    whitelist = [*processing_utils.PUBLIC_HOSTNAME_WHITELIST, "127.0.0.1"]
    monkeypatch.setattr(processing_utils, "PUBLIC_HOSTNAME_WHITELIST", whitelist)
    control = processing_utils.ssrf_protected_download(f"{image_url}?control", str(tmp_path))
    assert Path(control).read_bytes() == _picture(7) and requested == ["/photo.png?control"]

    requested.clear()
    for image in ({"path": image_url, **FILE_META}, {"path": image_url}, {"path": image_url, "url": image_url}):
        assert _call(url, "caption", _caption_arguments(image)) == ("error", app.URL_MESSAGE), image
        assert _call(url, "caption_batch", [image]) == ("complete", ["", app.URL_MESSAGE]), image
    assert requested == []

    good = _upload(url, "photo.png", _picture(7))
    assert _call(url, "caption", _caption_arguments(good))[0] == "complete"
    with ThreadPoolExecutor(4) as pool:
        batch = list(pool.map(lambda image: _call(url, "caption_batch", [image]), [good, {"path": image_url}] * 2))
    for index, (kind, (caption, error)) in enumerate(batch):
        assert kind == "complete"
        assert (caption != "" and error == "") if index % 2 == 0 else (caption, error) == ("", app.URL_MESSAGE)
    assert requested == []


def test_bad_input_gets_one_sentence_and_no_path_or_traceback(live, saved_tiny_attention_captioner):
    """Empty, SVG, text, truncated and decompression-bomb files, wrong types and unknown names: each answer is the one
    sentence that says what is wrong, or (for input Gradio itself rejects, with `show_error=False`) an error with no
    text; never a folder, the model's path or a traceback. The server keeps serving."""
    url = live.local_url
    buffer = io.BytesIO()
    Image.open(io.BytesIO(_picture(5))).convert("RGB").save(buffer, format="JPEG")

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)  # 100000 x 100000 pixels, 8-bit RGB
    bomb = (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
    files = {
        "empty.png": (b"", "the file is empty"),
        "drawing.svg": (b'<svg xmlns="http://www.w3.org/2000/svg"><rect width="9" height="9"/></svg>', "not in an"),
        "notes.jpg": (b"just some text, not a picture\n" * 20, "not in an image format"),
        "cut.jpg": (buffer.getvalue()[: len(buffer.getvalue()) // 2], "truncated"),
        "bomb.png": (bomb, "possible decompression bomb"),
    }
    private = (saved_tiny_attention_captioner, REPO_ROOT)
    for name, (data, reason) in files.items():
        kind, message = _call(url, "caption", _caption_arguments(_upload(url, name, data)))
        assert kind == "error" and message.startswith(f"Cannot read image '{name}': "), message
        assert reason in message.lower(), message
        assert_no_leak(message, *private)

    good = _upload(url, "good.png", _picture(6))
    label = f"attention ({saved_tiny_attention_captioner.name})"
    answers = {
        "unknown model": (_caption_arguments(good, model="no such model"), f"Unknown model; choose one of: {label}."),
        "model as a list": (_caption_arguments(good, model=["x"]), f"Unknown model; choose one of: {label}."),
        "no image": (_caption_arguments(None), "No image was given"),
        "image as a number": (_caption_arguments(42), None),
        "image as a string": (_caption_arguments("/etc/passwd"), None),
        "too few inputs": ([good], None),
    }
    for case, (arguments, start) in answers.items():
        kind, message = _call(url, "caption", arguments)
        assert kind == "error", case
        assert (message is None) if start is None else message.startswith(start), (case, message)
        assert_no_leak(message, *private)
    wild = _call(url, "caption", [good, None, "many", 1e308, -1e9, 1e9, "yes", "hot", "all", "seed"])
    assert wild[0] == "complete"  # every number is clamped or replaced by its default

    for response in (
        httpx.post(f"{url}gradio_api/call/no_such_endpoint", json={"data": []}, timeout=30),
        httpx.post(f"{url}gradio_api/call/caption", content=b"{not json", timeout=30),
    ):
        assert response.status_code in (404, 422, 500), response.text
        assert_no_leak(response.text, *private)
    # An unknown event id: Gradio 6.31 starts the event stream, then raises 404 inside it, and the server drops the
    # connection (its log says "response already started"). Nothing reaches the caller but the stream's start.
    try:
        text = httpx.get(f"{url}gradio_api/call/caption/no-such-event", timeout=30).text
    except httpx.RemoteProtocolError:
        text = ""
    assert_no_leak(text, *private)
    assert _call(url, "caption", _caption_arguments(good))[0] == "complete"


# ---------------------------------------------------------------------------------------------------------------------
# The served app as its own process: memory over repeated floods
# ---------------------------------------------------------------------------------------------------------------------


def _resident_megabytes(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS line")


@pytest.fixture(scope="module")
def app_process(saved_tiny_attention_captioner, tmp_path_factory):
    """`python app.py --model DIR --port P`, as an operator starts it; yields (process, base URL)."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("memory is read from /proc (Linux)")
    port = _free_port()
    log = (tmp_path_factory.mktemp("app-process") / "server.log").open("w")
    environment = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "app.py", "--model", str(saved_tiny_attention_captioner), "--port", str(port)],
        cwd=REPO_ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, Path(log.name).read_text()[-3000:]
            assert time.monotonic() < deadline, "the app did not start in 180 s"
            try:
                if httpx.get(f"{url}gradio_api/info", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        yield process, url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _flood(url: str, uploads: list[dict], expected: list[str], at_once: int = FLOOD) -> int:
    """`FLOOD` requests, `at_once` at a time: each must get its own caption or the busy answer (none lost, none
    hanging). Returns how many were turned away."""
    with ThreadPoolExecutor(at_once) as pool:
        futures = [pool.submit(_call, url, "caption", _caption_arguments(uploads[i], i)) for i in range(FLOOD)]
        outcomes = [future.result(timeout=REQUEST_TIMEOUT) for future in futures]
    for index, (kind, outputs) in enumerate(outcomes):
        if kind == "busy":
            assert outputs.json() == {"detail": app.BUSY_MESSAGE}
        else:
            assert kind == "complete" and outputs[0] == expected[index], (index, kind, outputs)
    return sum(kind == "busy" for kind, _ in outcomes)


@pytest.mark.slow
def test_python_memory_stops_growing_once_the_session_records_are_full(live, saved_tiny_attention_captioner):
    """Every API call is a new Gradio session, and Gradio keeps a record of each (about 50 KB here) up to
    `state_session_capacity`: 10,000 by default, a few hundred MB. Once `STATE_SESSION_CAPACITY` records exist they
    are recycled: once every record was made under tracing, 50 more calls leave the Python heap (traced by
    `tracemalloc`, free of the allocator's noise) where it was, instead of 2.5 MB higher. Eight calls at a time, so
    that none is turned away and each makes a session."""
    import gc
    import tracemalloc

    url = live.local_url
    pictures = [_picture(200 + index) for index in range(FLOOD)]
    expected = _expected_captions(saved_tiny_attention_captioner, pictures)
    uploads = [_upload(url, f"picture_{index}.png", picture) for index, picture in enumerate(pictures)]
    rounds = -(-app.STATE_SESSION_CAPACITY // FLOOD) + 1  # all records made under tracing, then one round measured
    tracemalloc.start()
    try:
        traced = []
        for _ in range(rounds):
            assert _flood(url, uploads, expected, at_once=8) == 0
            gc.collect()
            traced.append(tracemalloc.get_traced_memory()[0] / 2**20)
    finally:
        tracemalloc.stop()
    print(f"Python heap traced after each round of {FLOOD} calls: {[round(mb, 2) for mb in traced]} MB")
    assert len(live.state_holder.session_data) <= app.STATE_SESSION_CAPACITY
    assert traced[-1] - traced[-2] < 1.0, traced


@pytest.mark.slow
def test_memory_stays_bounded_over_repeated_floods(app_process, saved_tiny_attention_captioner):
    """Floods of `FLOOD` simultaneous requests against `python app.py`: each request gets its own caption or the busy
    answer, and the server's resident memory stays within a coarse bound. (Resident memory also moves with the
    allocator's pools, 5-25 MB a flood on this machine: the precise check of what Python keeps is the test above.)"""
    process, url = app_process
    pictures = [_picture(100 + index) for index in range(FLOOD)]
    expected = _expected_captions(saved_tiny_attention_captioner, pictures)
    uploads = [_upload(url, f"picture_{index}.png", picture) for index, picture in enumerate(pictures)]
    for index in range(5):  # warm up: the first captions allocate the model's working memory
        assert _call(url, "caption", _caption_arguments(uploads[index], index))[0] == "complete"
    resident = [_resident_megabytes(process.pid)]
    for _ in range(3):
        _flood(url, uploads, expected)
        resident.append(_resident_megabytes(process.pid))
    print(f"server resident memory before and after each flood of {FLOOD}: {[round(mb) for mb in resident]} MB")
    assert resident[-1] - resident[0] < 150, resident
    assert resident[-1] - resident[-2] < 40, resident
