"""What `torch.compile` compiled during a run: graphs and seconds, as `train.py` logs them and
`benchmarks/compile_step.py` reports them.

Both come from dynamo's process-wide tallies (`torch._dynamo.utils`): the graphs handed to the backend, and the wall
time of compiling them, the backward graphs that AOTAutograd compiles at their first use included. A
`CompileCounter` reads them when it is created and again when asked, so that it counts only what came after it.
"""

from __future__ import annotations


def _compiled_so_far() -> tuple[int, float]:
    from torch._dynamo.utils import calculate_time_spent, counters  # here: importing dynamo takes a while

    return counters["stats"]["unique_graphs"], calculate_time_spent().get("total_wall_time", 0.0)


class CompileCounter:
    """Graphs compiled, and seconds spent compiling, since this counter was created."""

    def __init__(self):
        self._start_graphs, self._start_seconds = _compiled_so_far()

    @property
    def graphs(self) -> int:
        return _compiled_so_far()[0] - self._start_graphs

    @property
    def seconds(self) -> float:
        return _compiled_so_far()[1] - self._start_seconds

    def summary(self) -> dict[str, float]:
        """`{"graphs": N, "compile_seconds": S}`, the record that all_results.json keeps."""
        return {"graphs": self.graphs, "compile_seconds": round(self.seconds, 1)}
