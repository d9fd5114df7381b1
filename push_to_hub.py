"""Publish a model folder written by train.py on the Hugging Face Hub, with a model card made from the run's results.

    python push_to_hub.py --model_dir outputs/shapes-attention --repo_id you/imgcap-shapes \\
        --dry_run --output_dir outputs/stage
    python push_to_hub.py --model_dir outputs/flickr30k-attention --repo_id you/imgcap-flickr30k --private
    python push_to_hub.py --model_dir outputs/flickr30k-attention --repo_id you/imgcap-flickr30k --space_id you/imgcap

The model repository is staged, verified and given its model card by `imgcap_hf.publishing`, the code that
`train.py --push_to_hub` publishes with too: only what `from_pretrained` needs (safetensors weights, configs, the
remote-code files, tokenizer and processor files), the run's records (`all_results.json`, `training_args.json`,
`data_report.json`) and a README.md model card generated from those records; never checkpoints, pickles or
TensorBoard logs. With `--space_id`, a Gradio Space is published too: the repository's `app.py`, the local modules it
imports, pinned requirements, and the Space variable `IMGCAP_MODELS=<repo_id>` that tells the app which model to
serve. The Space, `--private`, `--revision` and `--dry_run` are this script's own.

The token comes from huggingface_hub (`HF_TOKEN`, or the cache of `hf auth login`), never from the command line,
where it would end up in shell histories and process lists. `--dry_run --output_dir STAGE` writes exactly what would
be uploaded to `STAGE/model/` (and `STAGE/space/`) and touches no network.
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import shutil
import sys
import tempfile
from pathlib import Path

import yaml
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

from imgcap_hf.publishing import (
    DEFAULT_LICENSE,
    PublishError,
    check_logged_in,
    is_repo_id,
    stage_model_repo,
    upload_model_repo,
)

REPO_ROOT = Path(__file__).resolve().parent
APP_FILE = REPO_ROOT / "app.py"
SPACE_MODELS_VARIABLE = "IMGCAP_MODELS"  # comma-separated model ids; app.py reads it


# ====================================================================================================================
# Space repository
# ====================================================================================================================


def local_module_files(dotted: str, root: Path) -> list[Path] | None:
    """Files under `root` that importing `dotted` runs (package `__init__`s and the module), or None when the module
    is not local."""
    files, folder = [], root
    for position, part in enumerate(dotted.split(".")):
        if (folder / part / "__init__.py").is_file():
            folder = folder / part
            files.append(folder / "__init__.py")
        elif (folder / f"{part}.py").is_file():
            files.append(folder / f"{part}.py")
            break
        elif position == 0:
            return None
        else:
            break  # `from package import name`: a name defined in the package, not a submodule
    return files


def import_closure(entry: Path, root: Path) -> tuple[list[Path], set[str]]:
    """The local files `entry` imports, directly or not, and the top-level names of the other modules they import.

    Imports are read from the source (every `import` statement, indented ones too, as transformers' `check_imports`
    does), so what the Space gets is decided by the code it runs rather than by a hand-kept list.
    """
    todo, seen, external = [entry], set(), set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        parts = list(path.relative_to(root).with_suffix("").parts)
        package = parts[:-1]  # for an __init__.py, its own package (parts ends with "__init__")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=path.name)):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                base += node.module.split(".") if node.module else []
                names = [".".join([*base, alias.name]) for alias in node.names]
            else:
                continue
            for name in names:
                files = local_module_files(name, root)
                if files is None:
                    external.add(name.split(".")[0])
                else:
                    todo.extend(files)
    return sorted(seen), external - set(sys.stdlib_module_names) - {"__future__"}


def pinned_requirements(modules: set[str]) -> list[str]:
    """`dist==version` for the distributions providing `modules`, at the versions installed here (the ones tested).

    Local version labels are dropped (`2.13.0+cpu` -> `2.13.0`): PyPI has no such files, and `==2.13.0` still matches
    the local build.
    """
    providers = importlib.metadata.packages_distributions()
    unknown = sorted(module for module in modules if module not in providers)
    if unknown:
        raise PublishError(f"app.py imports {', '.join(unknown)}, not installed here: install it so it can be pinned.")
    distributions = {dist for module in modules for dist in providers[module]}
    return sorted(
        (f"{dist}=={importlib.metadata.version(dist).split('+')[0]}" for dist in distributions), key=str.lower
    )


def stage_space_repo(target: Path, space_id: str, repo_id: str, license_id: str) -> list[str]:
    """The Gradio Space: app.py, the local modules it imports (our package, so it needs nothing else from this
    repository), pinned requirements and a README whose front matter configures the Space."""
    if not APP_FILE.is_file():
        raise PublishError("There is no app.py beside push_to_hub.py, and the Space needs it.")
    files, external = import_closure(APP_FILE, REPO_ROOT)
    requirements = pinned_requirements(external)
    target.mkdir(parents=True)
    for source in files:
        destination = target / source.relative_to(REPO_ROOT)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, destination)
    (target / "requirements.txt").write_text("\n".join(requirements) + "\n", encoding="utf-8")
    front_matter = {
        "title": space_id.split("/")[-1],
        "sdk": "gradio",
        "sdk_version": importlib.metadata.version("gradio"),
        "python_version": f"{sys.version_info.major}.{sys.version_info.minor}",
        "app_file": "app.py",
        "models": [repo_id],
        "license": license_id,
    }
    readme = f"""---
{yaml.safe_dump(front_matter, sort_keys=False)}---

# {space_id.split("/")[-1]}

Captions images with [{repo_id}](https://huggingface.co/{repo_id}). The model to serve comes from the Space \
variable `{SPACE_MODELS_VARIABLE}` (comma-separated model ids), set to `{repo_id}` by ImgCap-HF's `push_to_hub.py`.
Run it locally with `pip install -r requirements.txt` and `{SPACE_MODELS_VARIABLE}={repo_id} python app.py`.
"""
    (target / "README.md").write_text(readme, encoding="utf-8")
    return sorted(str(path.relative_to(target)) for path in target.rglob("*") if path.is_file())


# ====================================================================================================================
# Upload
# ====================================================================================================================


def upload(args: argparse.Namespace, stage: Path) -> None:
    """Create the repositories (if needed) and upload the staged folders. HfApi finds the token itself."""
    api = HfApi()
    commit = upload_model_repo(api, stage / "model", args.repo_id, private=args.private, revision=args.revision)
    print(f"Model: {commit.commit_url}")
    print(f'Users who trust its remote code should pin revision="{commit.oid}".')
    if args.space_id:
        api.create_repo(args.space_id, repo_type="space", space_sdk="gradio", private=args.private, exist_ok=True)
        api.add_space_variable(args.space_id, SPACE_MODELS_VARIABLE, args.repo_id)
        space_commit = api.upload_folder(
            repo_id=args.space_id,
            folder_path=stage / "space",
            repo_type="space",
            commit_message=f"Serve {args.repo_id}",
        )
        print(f"Space: {space_commit.commit_url}")


# ====================================================================================================================
# Main
# ====================================================================================================================


def existing_folder(text: str) -> Path:
    """`--model_dir` is always local: a missing one is refused at once (it is never looked up on the Hub)."""
    folder = Path(text).expanduser()
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{'not a folder' if folder.exists() else 'no such folder'}: {text}")
    return folder


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model_dir", required=True, type=existing_folder, help="Output folder of a finished train.py run."
    )
    parser.add_argument("--repo_id", required=True, help="Model repository, USER/NAME.")
    parser.add_argument("--private", action="store_true", help="Create the repositories private.")
    parser.add_argument("--space_id", default=None, help="Also publish a Gradio Space serving the model, USER/NAME.")
    parser.add_argument("--revision", default=None, help="Branch of the model repository to push to (default main).")
    parser.add_argument("--license", default=DEFAULT_LICENSE, help="License id for the cards (Hub license list).")
    parser.add_argument("--dry_run", action="store_true", help="Write what would be uploaded; no network at all.")
    parser.add_argument("--output_dir", default=None, help="Where --dry_run writes model/ and space/.")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments, every one checked before the login check, staging or any network use: a bad one is argparse's
    usage line, one `error:` line and exit status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dry_run and not args.output_dir:
        parser.error("--dry_run needs --output_dir")
    if args.output_dir is not None and Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        parser.error(f"argument --output_dir: not a folder: {args.output_dir}")
    for flag, repo in (("--repo_id", args.repo_id), ("--space_id", args.space_id)):
        if repo is not None and not is_repo_id(repo):
            parser.error(f"{flag} must look like USER/NAME, got {repo!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output_dir = Path(args.output_dir) if args.dry_run else None
    try:
        if not args.dry_run:
            check_logged_in()
        if output_dir is not None and any((output_dir / folder).exists() for folder in ("model", "space")):
            raise PublishError("--output_dir already holds model/ or space/: choose an empty folder.")
        # Everything is staged in a scratch folder first, so that a refused folder leaves nothing half-written.
        with tempfile.TemporaryDirectory(prefix="imgcap-push-") as scratch:
            stage = Path(scratch)
            staged = stage_model_repo(args.model_dir, stage / "model", args.repo_id, args.license)
            print(f"Model repository {args.repo_id}: {', '.join(staged)}")
            if args.space_id:
                staged = stage_space_repo(stage / "space", args.space_id, args.repo_id, args.license)
                print(f"Space {args.space_id}: {', '.join(staged)}")
                if args.private:
                    print(
                        "Note: the model is private; the Space needs a read token as its HF_TOKEN secret to load it."
                    )
                if args.revision:
                    print(f"Note: the Space serves the main branch of {args.repo_id}, not {args.revision}.")
            if output_dir is not None:
                output_dir.mkdir(parents=True, exist_ok=True)
                for folder in stage.iterdir():
                    shutil.copytree(folder, output_dir / folder.name)
                print(f"Dry run: nothing uploaded; the files are in {output_dir}.")
            else:
                upload(args, stage)
    except PublishError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except HfHubHTTPError as error:
        reason = error.server_message or str(error).splitlines()[0]
        print(f"error: The Hub refused the request: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
