"""benchmarks/benchmark_imgcap.py at tiny sizes: its correctness check has teeth and its report is well-formed.

Speed targets live in the benchmark itself, never here: timings on a shared CI machine are noise.
"""

import importlib.util
import json
import math
import sys

import pytest
import torch
from conftest import REPO_ROOT

BENCHMARK_PATH = REPO_ROOT / "benchmarks" / "benchmark_imgcap.py"


@pytest.fixture(scope="module")
def benchmark():
    """The benchmark script imported as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("benchmark_imgcap", BENCHMARK_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_reference_copy_computes_our_model_and_the_check_catches_a_different_one(benchmark):
    ours, reference = benchmark.build_models(benchmark.QUICK)
    lines = benchmark.check_equivalence(ours, reference, benchmark.QUICK)
    assert lines[0].startswith("teacher-forced logits equal")
    assert lines[1].startswith("greedy captions equal")
    assert lines[2].startswith("beam search (beam 5, length_penalty=0) equal")

    # The concatenated attention weight is where a faithful copy is easiest to get wrong: perturb it.
    with torch.no_grad():
        reference.attention.W.weight[:, 0] += 2.0  # a region-feature column: it changes where attention looks
    with pytest.raises(benchmark.EquivalenceError, match="teacher-forced logits differ"):
        benchmark.check_equivalence(ours, reference, benchmark.QUICK)


def test_reference_greedy_and_beam_search_follow_the_published_semantics(benchmark):
    _, reference = benchmark.build_models(benchmark.QUICK)
    images = benchmark.random_images(benchmark.QUICK, 2, seed=3)
    greedy = reference.greedy(images, max_new_tokens=5)
    assert all(caption[0] == 2 and 2 <= len(caption) <= 6 for caption in greedy)
    # Beam 1 is greedy, and the returned score is the caption's summed log-probability (no length normalisation).
    words, score = reference.beam_search(images[:1], num_beams=1, max_new_tokens=5)
    assert words == greedy[0]
    assert score == pytest.approx(reference.sequence_log_prob(images[:1], words)[0], abs=1e-5)


def test_quick_run_checks_the_script_and_claims_no_speed(benchmark, tmp_path, capfd):
    json_path = tmp_path / "results.json"
    # Every measure except `memory`, whose four fresh interpreters take longer than the rest together.
    measures = ",".join(name for name in benchmark.MEASURES if name != "memory")
    report = benchmark.main(["--quick", "--repeats", "1", "--only", measures, "--json", str(json_path)])
    output, errors = capfd.readouterr()

    assert output.startswith("--quick checks that this script runs")
    assert "its times say nothing about speed, so it reports no ratios and no targets" in output
    assert "| what | ours | reference |\n" in output and "ratio" not in output.split("| what |")[1].splitlines()[0]
    assert "torch.get_num_threads() =" in output and "Random weights" in output
    assert "ABORTED" not in output and "**no**" not in output
    assert "USDT" not in output + errors
    assert len(report["checks"]) == 3
    rows = report["rows"]
    assert {row["what"].split(",")[0] for row in rows} >= {
        "training step",
        "beam search",
        "greedy decoding",
        "latency",
        "greedy captions identical to fp32 under bfloat16 autocast on cpu (fraction)",
    }
    assert all(math.isfinite(row["ours"]) and row["ours"] > 0 for row in rows)
    assert all(row["ratio"] is None and row["target"] == "" and row["met"] is None and not row["why"] for row in rows)
    assert json.loads(json_path.read_text())["rows"] == json.loads(json.dumps(rows))


def test_a_missed_target_is_explained_by_a_profile_without_profiler_noise(benchmark, capfd):
    ours, reference = benchmark.build_models(benchmark.QUICK)
    bench = benchmark.Bench(ours, reference, benchmark.QUICK, repeats=1)
    images = benchmark.random_images(benchmark.QUICK, 2, seed=5)

    def our_call():
        with torch.no_grad():
            ours.generate(pixel_values=images, max_new_tokens=3)

    row = benchmark.time_row("latency", [2.0], [1.0])
    bench.set_target(row, ">= 3x", row.ratio >= 3, lambda: bench.explain_miss(row, our_call, "a hint", images))
    assert (row.target, row.met) == (">= 3x", False)
    assert any(line.startswith("top operators of one of our calls: ") for line in row.why) and "a hint" in row.why
    output, errors = capfd.readouterr()
    assert "USDT" not in output + errors and "profiler_start" not in output + errors
    table = benchmark.format_table([row])
    assert "| latency | 2.000 s | 1.000 s | 0.5x | >= 3x | **no** |" in table

    quick = benchmark.Bench(ours, reference, benchmark.QUICK, repeats=1, judge_speed=False)
    unexplained = benchmark.time_row("latency", [2.0], [1.0])
    quick.set_target(unexplained, ">= 3x", False, lambda: pytest.fail("--quick explains no miss"))
    assert (unexplained.target, unexplained.met, unexplained.why) == ("", None, [])


def test_peak_memory_probe_reports_resident_megabytes(benchmark):
    for implementation, workload in (("ours", "inference"), ("reference", "training")):
        result = benchmark.peak_rss_probe(implementation, workload, quick=True)
        assert 0 < result["baseline_mb"] <= result["peak_mb"] < 100_000


def test_bad_measure_name_is_one_clear_sentence(benchmark, capsys):
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--only", "train,speed"])
    assert "unknown measure(s) speed; choose from train," in capsys.readouterr().err
