"""Shared test set-up: everything offline, seeded, and tiny."""

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Set before transformers/datasets/evaluate are imported by any test module.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread per process, inherited by the subprocesses the tests start (servers, CLI runs, DDP workers): the
# models here are tiny, so a second thread only adds synchronisation, and on a busy machine its threads wait for
# each other at every operation.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The tests' own HF_HOME, so that the feature cache (HF_HOME/imgcap_hf/feature_cache) of train.py runs in subprocesses
# never lands in, or reads from, the tester's.
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="imgcap-tests-hf-home-")
atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_CAPTIONS = REPO_ROOT.parent / "shared" / "data" / "flickr30k_captions_sample.csv"
# The remote code Hub users run: every module of this folder except its (unshipped) __init__.py.
SHIPPED_FOLDER = REPO_ROOT / "imgcap_hf" / "models" / "imgcap"


def shipped_files() -> dict[str, bytes]:
    """Name and content of every file that `save_pretrained` and push_to_hub.py must ship as remote code."""
    return {path.name: path.read_bytes() for path in sorted(SHIPPED_FOLDER.glob("*.py")) if path.name != "__init__.py"}


@pytest.fixture(scope="session")
def flickr_captions() -> list[str]:
    """Real Flickr30k captions from ../shared (absent for users: the tests that need it skip)."""
    if not SHARED_CAPTIONS.is_file():
        pytest.skip(f"{SHARED_CAPTIONS} not present")
    import csv

    with SHARED_CAPTIONS.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, skipinitialspace=True))
    return [row["comment"].strip() for row in rows if row.get("comment")]


@pytest.fixture(autouse=True)
def own_feature_cache(tmp_path, monkeypatch):
    """Each test's in-process train.py runs get a feature cache of their own: no test reuses another's features."""
    from imgcap_hf import feature_cache

    monkeypatch.setattr(feature_cache, "default_cache_dir", lambda: tmp_path / "feature_cache")


# The tiny encoder of the training tests, as the JSON that train.py's --vision_config takes.
TINY_TRAIN_VISION = json.dumps(
    {
        "model_type": "resnet",
        "layer_type": "basic",
        "embedding_size": 8,
        "depths": [1, 1, 1],
        "hidden_sizes": [8, 16, 32],
    }
)


def tiny_args(output_dir: Path, decoder_type: str = "attention", *extra: str) -> list[str]:
    """The shapes recipe, shrunk: 96 training images, a tiny ResNet and decoder, greedy evaluation."""
    return [
        "--output_dir", str(output_dir), "--decoder_type", decoder_type,
        "--shapes_num_train", "96", "--shapes_num_eval", "16", "--image_size", "32",
        "--vision_config", TINY_TRAIN_VISION, "--region_grid_size", "2",
        "--hidden_size", "32", "--embedding_size", "16", "--attention_size", "16", "--image_head_size", "16",
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
        "--num_beams", "2", "--max_new_tokens", "12", "--num_warmup_steps", "0", "--learning_rate", "1e-2",
        *extra,
    ]  # fmt: skip


@pytest.fixture
def scores_without_java(monkeypatch):
    """In-process runs score as on a machine without Java: the Python caption tokenizer, no METEOR. For tests that
    check no METEOR or Java-tokenized score: every evaluation with Java starts a METEOR JVM that loads a paraphrase
    table, which costs more than a tiny training run. The Java path is tested in test_scoring.py."""
    from imgcap_hf.scoring import coco_metrics

    monkeypatch.setattr(coco_metrics, "java_available", lambda: False)


def without_java(environment: dict[str, str]) -> dict[str, str]:
    """`environment` for a subprocess that scores as on a machine without Java (see `scores_without_java`): an empty
    PATH, so the subprocess must be started by absolute path (`sys.executable`)."""
    return {**environment, "PATH": ""}


def one_thread_environment(java: bool = True) -> dict[str, str]:
    """This process's environment for a subprocess with one torch thread (runs compared bit for bit must sum floats
    the same way); `java=False` scores as on a machine without Java (`without_java`)."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return environment if java else without_java(environment)


def train_in_two_processes(train_args: list[str], *, java: bool = True) -> None:
    """`accelerate launch --multi_gpu --num_processes 2 train.py ARGS`: torchrun starts two processes, and train.py
    picks DDP over gloo on a machine without GPUs (accelerate's `--cpu` launcher would start a single process).
    `java=False` scores as on a machine without Java (`without_java`)."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO_ROOT / "train.py"),
        *train_args,
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=REPO_ROOT, env=one_thread_environment(java), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]


def train_script(*args: str, preexec_fn=None, java: bool = True) -> subprocess.Popen:
    """`python train.py ARGS` as a separate process (stdout and stderr captured together); `java=False` scores as on
    a machine without Java (`without_java`)."""
    return start_python(str(REPO_ROOT / "train.py"), *args, preexec_fn=preexec_fn, java=java)


def start_python(*args: str, preexec_fn=None, java: bool = True) -> subprocess.Popen:
    """`python ARGS` in the repository with one thread (`one_thread_environment`)."""
    return subprocess.Popen(
        [sys.executable, *args], cwd=REPO_ROOT, env=one_thread_environment(java), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, preexec_fn=preexec_fn,
    )  # fmt: skip


# `python train.py` that stops inside the write of one checkpoint (argv[1]: its step) after its files are staged and
# before its manifest, says so by creating the file argv[2], and waits there to be killed: the kill lands at the same
# point every time, however fast or slow the machine is.
PAUSE_IN_A_CHECKPOINT_WRITE = """
import sys, time
from pathlib import Path
import train
from imgcap_hf import checkpointing

publish, pause_at_step, paused = checkpointing._publish, int(sys.argv[1]), Path(sys.argv[2])

def publish_or_pause(staging, final, step, *args):
    if step == pause_at_step:
        paused.write_text(str(staging))
        time.sleep(600)
    publish(staging, final, step, *args)

checkpointing._publish = publish_or_pause
train.main(sys.argv[3:])
"""


def kill_inside_a_checkpoint_write(train_args: list[str], step: int, marker: Path, *, java: bool = True) -> str:
    """Run `python train.py TRAIN_ARGS` (like `train_script`) and SIGKILL it in the middle of writing checkpoint-STEP:
    its files staged in `checkpoint-STEP.tmp`, its manifest not written. `marker` is the file the paused process
    creates; `java` as in `train_script`. Returns the process's output."""
    run = start_python("-c", PAUSE_IN_A_CHECKPOINT_WRITE, str(step), str(marker), *train_args, java=java)
    deadline = time.monotonic() + 300  # a bound, not a timing: the process waits for the kill
    while not marker.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    output = run.communicate(timeout=60)[0]
    assert marker.exists() and run.returncode == -signal.SIGKILL, output[-3000:]
    return output


def run_without_imgcap(script: str, tmp_path: Path) -> dict:
    """Run `script` in a fresh interpreter where `import imgcap_hf` fails (as for a Hub user who has only the saved
    folder), offline with its own HF_HOME; return the JSON object its last printed line holds."""
    import json
    import subprocess
    import sys

    guarded = 'import sys\nsys.modules["imgcap_hf"] = None  # any import of our package now raises ImportError\n'
    environment = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1"}
    environment.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", guarded + script], cwd=tmp_path, env=environment, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


TINY_RESNET = {"model_type": "resnet", "depths": [1, 1, 1, 1], "hidden_sizes": [8, 16, 24, 32], "embedding_size": 8}
TINY_CAPTIONS = [
    "A man rides a bike down a street .",
    "A dog runs across the grass .",
    "Two children play in the snow .",
    "A woman in a red dress sings on a stage .",
]


def build_tiny_captioner(decoder_type: str = "attention", seed: int = 0):
    """A random tiny model and its processor (32 px images), consistent with each other."""
    import torch

    from imgcap_hf import (
        ImgCapConfig,
        ImgCapForConditionalGeneration,
        ImgCapImageProcessor,
        ImgCapProcessor,
        ImgCapTokenizer,
    )

    tokenizer = ImgCapTokenizer.from_captions(TINY_CAPTIONS, min_frequency=1)
    processor = ImgCapProcessor(ImgCapImageProcessor(crop_size=32, crop_pct=1.0), tokenizer)
    torch.manual_seed(seed)
    config = ImgCapConfig(
        vision_config=dict(TINY_RESNET), decoder_type=decoder_type, vocab_size=len(tokenizer), embedding_size=16,
        hidden_size=32, attention_size=16, image_head_size=24, region_grid_size=2, use_region_positions=True,
        dropout=0.0,
    )  # fmt: skip
    return ImgCapForConditionalGeneration(config).eval(), processor


@pytest.fixture(scope="session", params=["attention", "pooled"])
def saved_tiny_captioner(request, tmp_path_factory) -> Path:
    """A tiny captioner saved with `save_pretrained` (model + processor), one per decoder type."""
    model, processor = build_tiny_captioner(request.param)
    directory = tmp_path_factory.mktemp(f"tiny-{request.param}")
    model.generation_config.update(max_new_tokens=8, num_beams=2)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def saved_tiny_attention_captioner(tmp_path_factory) -> Path:
    """One tiny attention captioner saved like `saved_tiny_captioner`, for tests that need a single served model.

    Seed 4 gives captions that differ from picture to picture (seed 0 says "l" to nearly everything), so a caption
    delivered to the wrong request is noticed."""
    model, processor = build_tiny_captioner("attention", seed=4)
    directory = tmp_path_factory.mktemp("tiny-attention-served")
    model.generation_config.update(max_new_tokens=8, num_beams=2)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
