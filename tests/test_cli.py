"""`python -m imgcap_hf`'s arguments and `load_captioner`'s local-or-Hub rule: a mistyped path or a bad value is one
usage line and one `error:` line (exit status 2) at once, before any model, dataset or Hub request is touched."""

import time

import httpx2
import huggingface_hub.constants
import pytest
import torch

from imgcap_hf import cli
from imgcap_hf.loading import load_captioner, local_model_folder


@pytest.fixture
def hub_calls(monkeypatch, tmp_path) -> list:
    """Online mode with an empty Hub cache, where every HTTP request huggingface_hub makes is recorded and refused:
    a name taken for a Hub id would show up here."""
    calls = []

    def refuse(self, request, *args, **kwargs):
        calls.append(str(request.url))
        raise httpx2.ConnectError("the tests never reach the Hub", request=request)

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(httpx2.Client, "send", refuse)
    monkeypatch.setattr(httpx2.AsyncClient, "send", refuse)
    return calls


@pytest.fixture
def demo_cwd(tmp_path, monkeypatch):
    """A working folder like the one after `make demo`: it holds an `outputs/` folder (here empty)."""
    (tmp_path / "outputs").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def parse_error(capsys, argv: list[str]) -> str:
    """The `error:` line argparse prints for `argv`, checking that it exits with status 2 and no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error and error.startswith("usage: python -m imgcap_hf")
    return error.strip().splitlines()[-1]


MISTYPED = ["outputs/shapes-atention", "./shapes-attention", "../x", "~/no-such-imgcap-model", "a/b/c", "x/", "a--b"]


@pytest.mark.parametrize("name", MISTYPED)
def test_a_path_that_does_not_exist_is_no_such_folder_at_once_without_the_hub(demo_cwd, hub_calls, name):
    start = time.perf_counter()
    with pytest.raises(ValueError) as error_info:
        load_captioner(name)
    assert time.perf_counter() - start < 0.5
    assert str(error_info.value) == f"no such folder: {name}"
    assert hub_calls == []


def test_an_absolute_path_that_does_not_exist_is_no_such_folder(demo_cwd, hub_calls, capsys):
    missing = str(demo_cwd / "outputs" / "shapes-atention")
    with pytest.raises(ValueError, match=f"^no such folder: {missing}$"):
        load_captioner(missing)
    line = parse_error(capsys, ["caption", "--model", missing, "x.png"])
    assert line == f"python -m imgcap_hf caption: error: argument --model: no such folder: {missing}"
    assert hub_calls == []


def test_the_cli_refuses_a_mistyped_model_path_in_well_under_a_second(demo_cwd, hub_calls, capsys, monkeypatch):
    monkeypatch.setattr(cli, "load_captioner", lambda *args: pytest.fail("the model must not be loaded"))
    start = time.perf_counter()
    line = parse_error(capsys, ["caption", "--model", "outputs/shapes-atention", "x.png"])
    assert time.perf_counter() - start < 0.5
    assert line == "python -m imgcap_hf caption: error: argument --model: no such folder: outputs/shapes-atention"
    assert hub_calls == []


def test_the_local_or_hub_rule(demo_cwd, saved_tiny_captioner):
    assert local_model_folder(str(saved_tiny_captioner)) == saved_tiny_captioner
    assert local_model_folder("you/imgcap-shapes") is None  # OWNER/NAME, and no folder `you/` here
    assert local_model_folder("gpt2") is None  # a one-part Hub id
    (demo_cwd / "you").mkdir()
    with pytest.raises(ValueError, match="^no such folder: you/imgcap-shapes$"):
        local_model_folder("you/imgcap-shapes")  # its owner part is a local folder: a path was meant
    (demo_cwd / "a-file").write_text("")
    with pytest.raises(ValueError, match="^not a folder: ./a-file$"):
        local_model_folder("./a-file")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["caption", "--num_beams", "0"], "argument --num_beams: must be at least 1, got 0"),
        (["caption", "--num_beams", "two"], "argument --num_beams: expected a whole number, got 'two'"),
        (["caption", "--max_new_tokens", "-3"], "argument --max_new_tokens: must be at least 1, got -3"),
        (["caption", "--batch_size", "0"], "argument --batch_size: must be at least 1, got 0"),
        (["caption", "--device", "gpu"], "argument --device: 'gpu' is not a torch device"),
        (["evaluate", "--dataset", "/nonexistent"], "argument --dataset: no such folder: /nonexistent (the dataset"),
        (["evaluate", "--dataset", "shapes", "--max_samples", "0"], "--max_samples: must be at least 1, got 0"),
        (["evaluate", "--dataset", "shapes", "--karpathy_json", "missing.json"], "no such file: missing.json"),
    ],
)  # fmt: skip
def test_bad_values_are_usage_errors_before_anything_loads(demo_cwd, capsys, monkeypatch, argv, message):
    monkeypatch.setattr(cli, "load_captioner", lambda *args: pytest.fail("the model must not be loaded"))
    command, *rest = argv
    line = parse_error(capsys, [command, "--model", "you/imgcap-shapes", *rest, *(["x.png"] * (command == "caption"))])
    assert line.startswith(f"python -m imgcap_hf {command}: error: ") and message in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where CUDA is not usable")
def test_cuda_without_a_usable_gpu_is_a_usage_error(demo_cwd, capsys, monkeypatch):
    monkeypatch.setattr(cli, "load_captioner", lambda *args: pytest.fail("the model must not be loaded"))
    line = parse_error(capsys, ["caption", "--model", "you/imgcap-shapes", "--device", "cuda", "x.png"])
    assert line == (
        f"python -m imgcap_hf caption: error: argument --device: cuda: this PyTorch ({torch.__version__}) has no "
        "usable cuda device; use --device cpu"
    )


def test_good_arguments_still_caption(saved_tiny_captioner, tmp_path, capsys):
    from PIL import Image

    image = tmp_path / "red.png"
    Image.new("RGB", (40, 40), "red").save(image)
    argv = ["caption", "--model", str(saved_tiny_captioner), "--device", "cpu", "--num_beams", "1", str(image)]
    assert cli.main([*argv, "--max_new_tokens", "3", "--batch_size", "1"]) == 0
    assert '"caption": ' in capsys.readouterr().out
