"""The README's code, run from the README itself: every Python snippet (its printed output compared with the `text`
block that follows it), every `python -m imgcap_hf` command, the arguments of every other script command, and the
Quick start's promises about `make demo` and the install.

The snippets and commands run in a scratch folder laid out as `make demo` leaves the repository (a tiny captioner in
`outputs/shapes-attention`, example images in `outputs/examples`), so that they run as printed, in seconds, offline.
The one Hub id in a snippet, `microsoft/resnet-50`, is replaced by a tiny local ResNet folder.
"""

import contextlib
import glob
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO_ROOT, TINY_RESNET, build_tiny_captioner

README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
# A fenced block, also inside a list item (indented): its language, its body, where it ends.
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
HUB_IDS_REPLACED = ("microsoft/resnet-50",)
# Appended to the README's `evaluate` command only to keep the test fast and independent of Java (the test also
# hides Java from METEOR: `scores_without_java`).
EVALUATE_SHRINK = ["--max_samples", "8", "--caption_tokenizer", "python"]


def fenced_blocks(text: str = README) -> list[tuple[str, str, int, int]]:
    """(language, dedented body, start offset, end offset) of every fenced block, in order."""
    return [
        (match["lang"], textwrap.dedent(match["body"]), match.start(), match.end()) for match in FENCE.finditer(text)
    ]


def python_snippets() -> list[tuple[str, str | None]]:
    """Each `python` block and the `text` block right after it (its expected output), or None."""
    blocks = fenced_blocks()
    snippets = []
    for index, (lang, body, _, end) in enumerate(blocks):
        if lang != "python":
            continue
        following = blocks[index + 1] if index + 1 < len(blocks) else None
        adjacent = following is not None and following[0] == "text" and not README[end : following[2]].strip()
        snippets.append((body, following[1] if adjacent else None))
    return snippets


def shell_commands(text: str = README) -> list[str]:
    """Every command line of the `bash` blocks, continuation lines joined and comments dropped."""
    commands = []
    for lang, body, _, _ in fenced_blocks(text):
        if lang == "bash":
            for line in body.replace("\\\n", " ").splitlines():
                command = line.split(" #")[0].strip()
                if command and not command.startswith("#"):
                    commands.append(command)
    return commands


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory) -> Path:
    """A scratch folder laid out as after `make demo`, plus a tiny ResNet standing in for the Hub's ResNet-50."""
    from transformers import ResNetConfig, ResNetModel

    from imgcap_hf.data import write_shapes_examples

    folder = tmp_path_factory.mktemp("after-make-demo")
    model, processor = build_tiny_captioner("attention", seed=4)
    model.generation_config.update(max_new_tokens=8, num_beams=2)
    model.save_pretrained(folder / "outputs" / "shapes-attention")
    processor.save_pretrained(folder / "outputs" / "shapes-attention")
    write_shapes_examples(folder / "outputs" / "examples")
    ResNetModel(ResNetConfig(**TINY_RESNET)).save_pretrained(folder / "tiny-resnet")
    (folder / "metrics").symlink_to(REPO_ROOT / "metrics")
    return folder


@pytest.fixture
def in_demo_folder(demo_folder, monkeypatch) -> Path:
    """Work in the demo folder, with no Java on the PATH (the scores then do not depend on the machine)."""
    monkeypatch.chdir(demo_folder)
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    return demo_folder


def test_the_readme_has_the_snippets_and_commands_this_test_runs():
    assert len(python_snippets()) >= 6 and sum(expected is not None for _, expected in python_snippets()) >= 2
    assert any(command.startswith("python -m imgcap_hf caption") for command in shell_commands())


@pytest.mark.parametrize(("snippet", "expected"), python_snippets(), ids=lambda value: (value or "")[:40])
def test_every_python_snippet_runs_and_prints_what_the_readme_shows(in_demo_folder, snippet, expected):
    for hub_id in HUB_IDS_REPLACED:
        snippet = snippet.replace(f'"{hub_id}"', repr(str(in_demo_folder / "tiny-resnet")))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(snippet, "README.md snippet", "exec"), {"__name__": "__readme__"})  # noqa: S102
    if expected is not None:
        assert printed.getvalue().strip() == expected.strip()


def test_every_cli_command_runs_as_printed(in_demo_folder, capsys, scores_without_java):
    from imgcap_hf import cli

    commands = [command for command in shell_commands() if command.startswith("python -m imgcap_hf ")]
    assert {shlex.split(command)[3] for command in commands} == {"caption", "evaluate", "clear-feature-cache"}
    for command in commands:
        argv = [expanded for word in shlex.split(command)[3:] for expanded in sorted(glob.glob(word)) or [word]]
        if argv[0] == "evaluate":
            argv += EVALUATE_SHRINK
        assert cli.main(argv) == 0, command
        lines = capsys.readouterr().out.strip().splitlines()
        assert lines and all("error" not in json.loads(line) for line in lines), command


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


def test_every_script_command_names_a_script_that_exists_and_takes_those_arguments(in_demo_folder):
    """Scripts are only parsed here (running them trains or benchmarks); train.py and app.py parse in their tests."""
    parsers = {
        "push_to_hub.py": lambda argv: load_script(REPO_ROOT / "push_to_hub.py").parse_args(argv),
        "benchmarks/benchmark_imgcap.py": lambda argv: load_script(REPO_ROOT / "benchmarks" / "benchmark_imgcap.py")
        .parse_args(argv),
    }  # fmt: skip
    checked = set()
    for command in shell_commands():
        words = shlex.split(command)
        if words[0] == "accelerate":  # accelerate launch [its options] SCRIPT ...
            words = ["python", *words[next(i for i, word in enumerate(words) if word.endswith(".py")) :]]
        if words[0] != "python" or words[1] == "-m":
            continue
        script, argv = words[1], words[2:]
        assert (REPO_ROOT / script).is_file(), command
        if script in parsers:
            parsers[script](argv)
            checked.add(script)
    assert checked == set(parsers)


def test_the_quick_start_activates_the_venv_before_any_python_command():
    commands = shell_commands(section("Quick start"))
    assert "source .venv/bin/activate" in commands
    first_python = min(index for index, command in enumerate(shell_commands()) if command.startswith("python"))
    assert shell_commands().index("source .venv/bin/activate") < first_python


def test_the_dry_run_writes_where_git_ignores_it():
    (dry_run,) = [command for command in shell_commands() if "--dry_run" in command]
    words = shlex.split(dry_run)
    output_dir = Path(words[words.index("--output_dir") + 1])
    ignored = [line.strip() for line in (REPO_ROOT / ".gitignore").read_text().splitlines()]
    assert f"{output_dir.parts[0]}/" in ignored


def demo_recipe() -> list[str]:
    """The shell lines of the Makefile's `demo` target (tabs removed, continuation lines kept together)."""
    makefile = (REPO_ROOT / "Makefile").read_text()
    commands, command = [], ""
    for line in makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0].split("\n")[1:]:
        command += line.removeprefix("\t")
        if command.endswith("\\"):
            command += "\n"  # make hands the continued line to the shell with its backslash-newline
        else:
            commands.append(command)
            command = ""
    return commands


def test_make_demo_scores_the_test_split_once_and_prints_train_pys_result(tmp_path):
    recipe = demo_recipe()
    assert any(line.startswith("$(BIN)/python train.py") for line in recipe)
    assert not any("imgcap_hf evaluate" in line for line in recipe)  # train.py already scored the test split
    (print_line,) = [line for line in recipe if "all_results.json" in line]
    results = tmp_path / "outputs" / "shapes-attention" / "all_results.json"
    results.parent.mkdir(parents=True)
    results.write_text(
        json.dumps({"test_cider": 5.3, "test_bleu_4": 0.93, "test_tokenizer": "python", "best_step": 9})
    )
    command = print_line.removeprefix("@").replace("$(BIN)/python", shlex.quote(sys.executable))
    result = subprocess.run(["sh", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == 'Test split: {"cider": 5.3, "bleu_4": 0.93, "tokenizer": "python"}\n'


def test_the_install_prints_no_license_deprecation_banner(tmp_path):
    """setuptools warns (a boxed banner, on every build of the package) when a License classifier stands beside the
    SPDX `license =`; building the metadata here shows whether setup.cfg still does that."""
    pytest.importorskip("setuptools")  # what pip builds the package with (venvs of Python 3.12+ lack it)
    for name in ("setup.cfg", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copyfile(REPO_ROOT / name, tmp_path / name)
    (tmp_path / "imgcap_hf").mkdir()
    (tmp_path / "imgcap_hf" / "__init__.py").write_text("")
    result = subprocess.run(
        [sys.executable, "-c", "from setuptools import setup; setup()", "egg_info", "--egg-base", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "default"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "License classifiers are deprecated" not in result.stdout + result.stderr
