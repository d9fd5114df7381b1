"""Recipes of several training phases run by one command: cross-entropy, then self-critical training, for example.

A recipe's `phases:` key lists the phases in order; each entry is a mapping of flag overrides over the recipe's
other (shared) keys, with an optional `name`. Phase i trains into `OUTPUT_DIR/phases/<i>-<name>/` from the recipe
`OUTPUT_DIR/phases/<i>-<name>.yaml` (the shared keys and its overrides, written beside it), and every phase after the
first starts from the model of the one before (`--init_from`). Flags given on the command line apply to every phase.
train.py runs the phases and puts the last phase's model, with an all_results.json listing every phase's test
scores, into OUTPUT_DIR.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

PHASES_DIR = "phases"
# Flags that the phase machinery sets itself, per phase or for the whole run: a phase may not override them.
MANAGED_FLAGS = ("config", "output_dir", "resume_from_checkpoint", "overwrite_output_dir", "push_to_hub",
                 "hub_model_id")  # fmt: skip
PHASE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def check_phases(phases: Any, known_flags: set[str]) -> list[tuple[str, dict[str, Any]]]:
    """The phases of a recipe as `(name, overrides)` pairs, checked: a non-empty list of mappings whose keys are
    flags (or `name`), names of letters, digits, `_`, `-` and `.` that differ from each other.

    Raises:
        ValueError: one sentence saying which phase is wrong and how.
    """
    if not isinstance(phases, list) or not phases:
        raise ValueError(f"'phases' must be a non-empty list of mappings of flag overrides, got {phases!r}")
    checked, names = [], set()
    for index, entry in enumerate(phases):
        if not isinstance(entry, dict):
            raise ValueError(f"phase {index} must be a mapping of flag overrides, got {entry!r}")
        overrides = dict(entry)
        name = str(overrides.pop("name", overrides.get("objective", "xe")))
        unknown = sorted(set(overrides) - known_flags)
        if unknown:
            raise ValueError(f"phase {index} ({name}): unknown keys {unknown}")
        managed = sorted(set(overrides) & set(MANAGED_FLAGS))
        if managed:
            raise ValueError(f"phase {index} ({name}): {managed} apply to the whole run, not to one phase")
        if not PHASE_NAME.fullmatch(name) or name in names:
            raise ValueError(f"phase {index}: its name {name!r} must be unique, of letters, digits, '_', '-', '.'")
        names.add(name)
        checked.append((name, overrides))
    return checked


def phase_recipe(shared: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The keys of one phase: the recipe's shared keys, then the phase's overrides. A shared `label_smoothing` belongs
    to the shared cross-entropy objective: a phase that switches to `objective: scst` trains without it (setting it in
    that phase itself is refused, like `--label_smoothing` with `--objective scst`)."""
    recipe = {**shared, **overrides}
    if overrides.get("objective") == "scst" and "label_smoothing" not in overrides:
        recipe.pop("label_smoothing", None)
    return recipe


def phase_dir(output_dir: Path, index: int, name: str) -> Path:
    return output_dir / PHASES_DIR / f"{index}-{name}"


def finished_results(folder: Path, weights_file: str) -> dict[str, Any] | None:
    """The results of a phase that ran to its end (its final model and all_results.json, not stopped early), else
    None."""
    results_path = folder / "all_results.json"
    if not (folder / weights_file).is_file() or not results_path.is_file():
        return None
    results = json.loads(results_path.read_text())
    return results if results.get("stopped_early") is None else None


def phase_summary(name: str, folder: Path, output_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """What all_results.json lists of one phase: its test scores and how its training went."""
    kept = ("best_validation_cider", "best_step", "completed_steps", "train_runtime_seconds", "stopped_early")
    summary = {"phase": name, "output_dir": str(folder.relative_to(output_dir))}
    summary.update({key: value for key, value in results.items() if key.startswith("test_") or key in kept})
    return summary


def combined_results(last_results: dict[str, Any], summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The last phase's results (its test scores are the final model's), every phase's summary, and the training
    time of all phases together."""
    total_seconds = round(sum(summary.get("train_runtime_seconds") or 0.0 for summary in summaries), 1)
    return {**last_results, "train_runtime_seconds": total_seconds, "phases": summaries}
