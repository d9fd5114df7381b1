"""Soak the demo app: minutes of bounded, mixed traffic against `python app.py` on 127.0.0.1, then a report.

    python benchmarks/soak_app.py                    # 10 minutes against outputs/shapes-attention (`make demo`)
    python benchmarks/soak_app.py --tiny --minutes 1  # a small random model: checks the server, not the captions

The traffic, from `--clients` threads until the time is up: good images of every mode a user may send (RGB, RGBA,
grey, palette, CMYK, 16-bit, a JPEG with EXIF rotation) with varied decoding settings; bursts of identical and of
distinct requests sent at once; bad files (truncated, random bytes, a decompression bomb, empty); uploads over the
size limit; image URLs; and the batched endpoint with good and bad images together. Every answer is checked: a
good image must get a caption, its table and every heatmap file whole and decodable; a bad one its one sentence; an
oversized upload HTTP 413; a full queue the busy answer (counted, not an error).

The report: requests answered, errors by kind, p50/p99 latency of the good requests per endpoint, the server's
resident memory after warm-up and at the end with the verdict on whether it stayed flat (`memory_verdict`), and
whether the server process was the same one throughout. The exit status is 1 when any error, a restart or memory
that did not stay flat happened. Not part of the test suite: its figures go in the README
("Robustness and security"), next to this command.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = REPO_ROOT / "outputs" / "shapes-attention"
MAX_FILE_SIZE = 10 * 1024 * 1024  # app.MAX_FILE_SIZE, read here without importing the app into the client
FILE_META = {"meta": {"_type": "gradio.FileData"}}
REQUEST_TIMEOUT = 120.0  # seconds; a request that takes longer counts as an error ("timeout")
BURST = 8  # requests sent at once by a burst
WARM_UP_REQUESTS = 5
START_UP_TIMEOUT = 900.0  # seconds for the app to answer: loading torch and Gradio is slow on a busy machine
# "Flat" resident memory: the end at most this much above the memory after warm-up (the first minutes fill Gradio's
# `STATE_SESSION_CAPACITY` session records, about 60 MB, and start worker threads), and over the run's second half a
# least-squares trend through the samples (one a second, so that the requests in flight at any one moment weigh
# little) of at most this much.
FLAT_TOTAL_GROWTH_MB = 80.0
FLAT_SECOND_HALF_TREND_MB = 20.0


# ---------------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------------


def _encoded(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def _scene(seed: int) -> Image.Image:
    """A small RGB picture of a few coloured rectangles, different for every seed."""
    rng = np.random.default_rng(seed)
    width, height = (int(side) for side in rng.integers(48, 129, size=2))
    pixels = np.full((height, width, 3), rng.integers(0, 256, size=3), np.uint8)
    for _ in range(4):
        top, left = rng.integers(0, height - 12), rng.integers(0, width - 12)
        pixels[top : top + rng.integers(6, 30), left : left + rng.integers(6, 30)] = rng.integers(0, 256, size=3)
    return Image.fromarray(pixels)


def good_images(count: int) -> list[tuple[str, bytes]]:
    """(name, bytes) of `count` scenes, cycling through the image modes a user may send."""
    images = []
    for seed in range(count):
        scene = _scene(seed)
        kind = seed % 7
        if kind == 0:
            images.append((f"rgb_{seed}.png", _encoded(scene, "PNG")))
        elif kind == 1:
            rgba = scene.copy()
            rgba.putalpha(
                Image.fromarray(np.tile(np.linspace(0, 255, scene.width, dtype=np.uint8), (scene.height, 1)))
            )
            images.append((f"rgba_{seed}.png", _encoded(rgba, "PNG")))
        elif kind == 2:
            images.append((f"grey_{seed}.png", _encoded(scene.convert("L"), "PNG")))
        elif kind == 3:
            palette = scene.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
            images.append((f"palette_{seed}.png", _encoded(palette, "PNG")))
        elif kind == 4:
            images.append((f"cmyk_{seed}.jpg", _encoded(scene.convert("CMYK"), "JPEG")))
        elif kind == 5:
            sixteen = Image.fromarray(np.asarray(scene.convert("L"), np.uint16) * 257)
            images.append((f"sixteen_bit_{seed}.png", _encoded(sixteen, "PNG")))
        else:
            exif = Image.Exif()
            exif[0x0112] = 6  # Orientation: turn 90 degrees clockwise to display
            sideways = scene.transpose(Image.Transpose.ROTATE_90)
            images.append((f"exif_rotated_{seed}.jpg", _encoded(sideways, "JPEG", exif=exif, quality=90)))
    return images


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bad_images() -> list[tuple[str, bytes]]:
    """(name, bytes) of files that are not usable images; each must be answered "Cannot read image '<name>': ..."."""
    jpeg = _encoded(_scene(1000).resize((200, 150)), "JPEG", quality=90)
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)  # 100000 x 100000 pixels, 8-bit RGB
    bomb = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return [
        ("truncated.jpg", jpeg[: len(jpeg) // 2]),
        ("noise.png", np.random.default_rng(0).bytes(2048)),
        ("bomb.png", bomb + _png_chunk(b"IEND", b"")),
        ("empty.png", b""),
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Requests over plain HTTP (Gradio's /gradio_api/call protocol)
# ---------------------------------------------------------------------------------------------------------------------


class Rejected(Exception):
    """An answer other than the one expected; its message is the error kind the report counts."""


def upload(client: httpx.Client, url: str, name: str, data: bytes) -> dict:
    response = client.post(f"{url}gradio_api/upload", files={"files": (name, data)}, timeout=60)
    if response.status_code != 200:
        raise Rejected(f"upload HTTP {response.status_code}")
    (path,) = response.json()
    return {"path": path, **FILE_META}


def call(client: httpx.Client, url: str, endpoint: str, data: list) -> tuple[str, object]:
    """("complete", outputs), ("error", message) or ("busy", None) for one call."""
    joined = client.post(f"{url}gradio_api/call/{endpoint}", json={"data": data}, timeout=60)
    if joined.status_code == 503:
        return "busy", None
    if joined.status_code != 200:
        raise Rejected(f"join HTTP {joined.status_code}")
    event_id = joined.json()["event_id"]
    stream = client.get(f"{url}gradio_api/call/{endpoint}/{event_id}", timeout=REQUEST_TIMEOUT)
    for block in stream.text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if fields.get("event") in ("complete", "error"):
            data = json.loads(fields["data"])
            if fields["event"] == "error":
                data = data.get("error") if isinstance(data, dict) else data
            return fields["event"], data
    raise Rejected("no result in the event stream")


def caption_arguments(image: object, rng: random.Random) -> list:
    """The ten inputs of `/caption` with varied decoding settings: beam search or seeded sampling."""
    if rng.random() < 0.25:
        return [image, None, 1, rng.randint(3, 12), 1.0, rng.randint(1, 3), True, 1.2, 0.9, rng.randint(0, 9)]
    return [image, None, rng.randint(1, 4), rng.randint(3, 12), 1.0, 1, False, 1.0, 0.9, 0]


def check_caption_answer(client: httpx.Client, outputs: list) -> None:
    """A good image's answer: a caption that heads its table, and every heatmap file whole and decodable."""
    caption, table, gallery = outputs
    if not caption or table["data"][0][0] != caption:
        raise Rejected("wrong answer")
    for item in gallery or []:
        response = client.get(item["image"]["url"], timeout=60)
        if response.status_code != 200:
            raise Rejected(f"heatmap HTTP {response.status_code}")
        try:
            Image.open(io.BytesIO(response.content)).load()
        except OSError:
            raise Rejected("heatmap does not decode") from None


# ---------------------------------------------------------------------------------------------------------------------
# The traffic
# ---------------------------------------------------------------------------------------------------------------------


class Tally:
    """Thread-safe counts of answers, errors by kind and latencies of good requests per endpoint."""

    def __init__(self):
        self.lock = threading.Lock()
        self.answered = Counter()
        self.errors = Counter()
        self.latencies: dict[str, list[float]] = {"/caption": [], "/caption_batch": []}

    def answer(self, kind: str, endpoint: str | None = None, seconds: float | None = None) -> None:
        with self.lock:
            self.answered[kind] += 1
            if endpoint is not None:
                self.latencies[endpoint].append(seconds)

    def error(self, kind: str) -> None:
        with self.lock:
            self.errors[kind] += 1


class Traffic:
    """The request kinds, each sending one request (or one burst) and checking its answers."""

    def __init__(self, url: str, tally: Tally, seed: int):
        self.url, self.tally = url, tally
        self.client = httpx.Client()
        self.good = good_images(28)  # four of each mode
        self.bad = bad_images()
        self.uploads: dict[str, dict] = {}
        self.rng = random.Random(seed)

    def _uploaded(self, name: str, data: bytes) -> dict:
        if name not in self.uploads:
            self.uploads[name] = upload(self.client, self.url, name, data)
        return self.uploads[name]

    def _guarded(self, kind: str, action) -> None:
        try:
            action()
        except Rejected as rejected:
            self.tally.error(f"{kind}: {rejected}")
        except httpx.TimeoutException:
            self.tally.error(f"{kind}: timeout")
        except httpx.TransportError as error:
            self.tally.error(f"{kind}: {type(error).__name__}")

    def good_caption(self, image: dict | None = None, arguments: list | None = None, client=None) -> None:
        client = client or self.client
        image = image or self._uploaded(*self.rng.choice(self.good))
        started = time.perf_counter()
        kind, outputs = call(client, self.url, "caption", arguments or caption_arguments(image, self.rng))
        if kind == "busy":
            self.tally.answer("busy")
            return
        if kind != "complete":
            raise Rejected(f"error answer {str(outputs)[:60]!r}")
        check_caption_answer(client, outputs)
        self.tally.answer("good image", "/caption", time.perf_counter() - started)

    def burst(self, identical: bool) -> None:
        """`BURST` requests at once, each on its own connection as separate visitors' would be: all for one picture
        with the same settings (identical answers), or for different pictures."""
        images = [self._uploaded(*self.rng.choice(self.good)) for _ in range(1 if identical else BURST)]
        arguments = [caption_arguments(images[index % len(images)], self.rng) for index in range(BURST)]
        if identical:
            arguments = [arguments[0]] * BURST
        kind = "identical burst" if identical else "distinct burst"

        def one(index: int) -> None:
            with httpx.Client() as client:
                self._guarded(kind, lambda: self.good_caption(arguments[index][0], arguments[index], client))

        with ThreadPoolExecutor(BURST) as pool:
            list(pool.map(one, range(BURST)))

    def bad_file(self) -> None:
        name, data = self.rng.choice(self.bad)
        kind, message = call(self.client, self.url, "caption", caption_arguments(self._uploaded(name, data), self.rng))
        if kind == "busy":
            self.tally.answer("busy")
        elif kind == "error" and isinstance(message, str) and message.startswith(f"Cannot read image '{name}': "):
            self.tally.answer("bad file, one sentence")
        else:
            raise Rejected(f"bad file answered {kind} {str(message)[:60]!r}")

    def oversized_upload(self) -> None:
        response = self.client.post(
            f"{self.url}gradio_api/upload", files={"files": ("big.png", b"\0" * (MAX_FILE_SIZE + 1))}, timeout=60
        )
        if response.status_code != 413:
            raise Rejected(f"oversized upload HTTP {response.status_code}")
        self.tally.answer("oversized upload, 413")

    def image_url(self) -> None:
        image = {"path": "http://127.0.0.1:9/photo.png", **FILE_META}  # port 9 (discard): nothing is served there
        kind, message = call(self.client, self.url, "caption", caption_arguments(image, self.rng))
        if kind == "busy":
            self.tally.answer("busy")
        elif kind == "error" and isinstance(message, str) and "does not download images from URLs" in message:
            self.tally.answer("image URL, one sentence")
        else:
            raise Rejected(f"image URL answered {kind} {str(message)[:60]!r}")

    def batch(self) -> None:
        good = self.rng.random() < 0.75
        name, data = self.rng.choice(self.good if good else self.bad)
        started = time.perf_counter()
        kind, outputs = call(self.client, self.url, "caption_batch", [self._uploaded(name, data)])
        if kind == "busy":
            self.tally.answer("busy")
            return
        if kind != "complete":
            raise Rejected(f"batch error answer {str(outputs)[:60]!r}")
        caption, error = outputs
        if good and caption and not error:
            self.tally.answer("good image", "/caption_batch", time.perf_counter() - started)
        elif not good and not caption and error.startswith(f"Cannot read image '{name}': "):
            self.tally.answer("bad file, one sentence")
        else:
            raise Rejected("wrong batch answer")

    def step(self) -> None:
        """One request kind, drawn with the weights below (mostly good images, the rest bounded)."""
        choice = self.rng.choices(
            ["good", "identical", "distinct", "bad", "oversized", "url", "batch"],
            weights=[40, 6, 6, 15, 2, 5, 26],
        )[0]
        actions = {
            "good": self.good_caption,
            "identical": lambda: self.burst(identical=True),
            "distinct": lambda: self.burst(identical=False),
            "bad": self.bad_file,
            "oversized": self.oversized_upload,
            "url": self.image_url,
            "batch": self.batch,
        }
        self._guarded(choice, actions[choice])


# ---------------------------------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------------------------------


def resident_megabytes(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS line in /proc/<pid>/status")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_tiny_model(directory: Path) -> Path:
    """A small random attention captioner (a 4-stage ResNet of 8 to 32 channels, 32 px crops), saved like a trained
    one: it captions nonsense, but exercises every part of the server."""
    import torch

    from imgcap_hf import (
        ImgCapConfig,
        ImgCapForConditionalGeneration,
        ImgCapImageProcessor,
        ImgCapProcessor,
        ImgCapTokenizer,
    )

    tokenizer = ImgCapTokenizer.from_captions(
        ["A red square above a blue circle .", "Two green triangles beside a yellow star ."], min_frequency=1
    )
    processor = ImgCapProcessor(ImgCapImageProcessor(crop_size=32, crop_pct=1.0), tokenizer)
    torch.manual_seed(4)
    vision = {"model_type": "resnet", "depths": [1, 1, 1, 1], "hidden_sizes": [8, 16, 24, 32], "embedding_size": 8}
    config = ImgCapConfig(
        vision_config=vision, decoder_type="attention", vocab_size=len(tokenizer), embedding_size=16,
        hidden_size=32, attention_size=16, image_head_size=24, region_grid_size=2, dropout=0.0,
    )  # fmt: skip
    model = ImgCapForConditionalGeneration(config).eval()
    model.generation_config.update(max_new_tokens=8, num_beams=2)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def start_server(model: Path, port: int, log_path: Path) -> subprocess.Popen:
    environment = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    log = log_path.open("w")
    process = subprocess.Popen(
        [sys.executable, "app.py", "--model", str(model), "--port", str(port)],
        cwd=REPO_ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + START_UP_TIMEOUT
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the app exited at start-up:\n{log_path.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"the app did not start in {START_UP_TIMEOUT:.0f} s")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/gradio_api/info", timeout=5).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.5)


def memory_verdict(samples: list[tuple[float, float]]) -> tuple[bool, str]:
    """(flat, the sentence saying why) for (seconds since warm-up, resident MB) samples, the first taken right after
    warm-up and the last at the end: flat when the end is at most `FLAT_TOTAL_GROWTH_MB` above the first, and the
    least-squares trend through the second half's samples rises at most `FLAT_SECOND_HALF_TREND_MB` over that half."""
    (start_time, start), (end_time, end) = samples[0], samples[-1]
    half_time = (start_time + end_time) / 2
    second_half = np.array([sample for sample in samples if sample[0] >= half_time])  # (samples, 2)
    slope = np.polyfit(second_half[:, 0], second_half[:, 1], 1)[0] if len(second_half) >= 2 else 0.0  # MB a second
    trend = float(slope * (end_time - half_time))
    flat = end - start <= FLAT_TOTAL_GROWTH_MB and trend <= FLAT_SECOND_HALF_TREND_MB
    return flat, (
        f"{'flat' if flat else 'NOT FLAT'}: {end - start:+.0f} MB from warm-up to the end (at most "
        f"+{FLAT_TOTAL_GROWTH_MB:.0f}), trend {trend:+.0f} MB over the second half (at most "
        f"+{FLAT_SECOND_HALF_TREND_MB:.0f})"
    )


def percentile(values: list[float], fraction: float) -> float:
    return float(np.percentile(values, fraction * 100)) if values else float("nan")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="How long to send traffic. Default: 10.")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="Default: outputs/shapes-attention.")
    parser.add_argument("--tiny", action="store_true", help="Serve a small random model instead of --model.")
    parser.add_argument("--clients", type=int, default=4, help="Threads sending traffic at once. Default: 4.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.minutes <= 0:
        parser.error(f"argument --minutes: must be more than 0, not {args.minutes:g}")
    if args.clients < 1:
        parser.error(f"argument --clients: must be at least 1, not {args.clients}")
    if not args.tiny and not (args.model / "config.json").is_file():
        parser.error(f"argument --model: no model in {args.model} (train one with `make demo`, or pass --tiny)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not Path("/proc/self/status").is_file():
        raise SystemExit("resident memory is read from /proc: this script runs on Linux")
    workspace = Path(tempfile.mkdtemp(prefix="imgcap-soak-"))
    model = write_tiny_model(workspace / "tiny-model") if args.tiny else args.model
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    process = start_server(model, port, workspace / "server.log")
    try:
        tally = Tally()
        warm_up = Traffic(url, Tally(), seed=args.seed)
        for _ in range(WARM_UP_REQUESTS):  # the first captions allocate the model's working memory
            warm_up.good_caption()
        memory_start = resident_megabytes(process.pid)
        started = time.monotonic()
        deadline = started + args.minutes * 60
        memory_peak = memory_start

        def client_loop(index: int) -> None:
            traffic = Traffic(url, tally, seed=args.seed * 1000 + index)
            while time.monotonic() < deadline:
                traffic.step()

        memory_by_minute = [memory_start]  # resident memory once a minute, for the report
        memory_samples = [(0.0, memory_start)]  # (seconds since warm-up, MB) once a second, for the verdict
        with ThreadPoolExecutor(args.clients) as pool:
            futures = [pool.submit(client_loop, index) for index in range(args.clients)]
            while not all(future.done() for future in futures):
                resident = resident_megabytes(process.pid)
                memory_samples.append((time.monotonic() - started, resident))
                memory_peak = max(memory_peak, resident)
                if time.monotonic() - started >= 60 * len(memory_by_minute):
                    memory_by_minute.append(resident)
                time.sleep(1.0)
            for future in futures:
                future.result()
        elapsed = time.monotonic() - started
        memory_end = resident_megabytes(process.pid)
        memory_samples.append((elapsed, memory_end))
        memory_flat, memory_report = memory_verdict(memory_samples)
        same_server = process.poll() is None
        if same_server:
            same_server = httpx.get(f"{url}gradio_api/info", timeout=30).status_code == 200
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()

    answered = sum(tally.answered.values())
    print(f"soak: {elapsed / 60:.1f} min, {args.clients} clients, model {'tiny random' if args.tiny else model}")
    print(f"requests answered as expected: {answered}")
    for kind, count in sorted(tally.answered.items()):
        print(f"  {kind}: {count}")
    print(f"errors: {sum(tally.errors.values())}")
    for kind, count in sorted(tally.errors.items()):
        print(f"  {kind}: {count}")
    for endpoint, latencies in tally.latencies.items():
        print(
            f"latency {endpoint} (good images, {len(latencies)}): p50 {percentile(latencies, 0.5):.2f} s, "
            f"p99 {percentile(latencies, 0.99):.2f} s"
        )
    print(
        f"server resident memory: {memory_start:.0f} MB after warm-up, {memory_end:.0f} MB at the end "
        f"(peak {memory_peak:.0f} MB); each minute: {', '.join(f'{mb:.0f}' for mb in memory_by_minute)} MB"
    )
    print(f"server resident memory {memory_report}")
    print(f"server process: {'the same one throughout' if same_server else 'EXITED OR STOPPED ANSWERING'}")
    print(f"server log: {workspace / 'server.log'}")
    return 0 if same_server and not tally.errors and memory_flat else 1


if __name__ == "__main__":
    raise SystemExit(main())
