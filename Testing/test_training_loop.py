"""The one training loop (SFRSegmentLib.stages.training.train): checkpoints, cancellation and progress, the same for
fine-tuning and re-training, which both call it (checked on their sources)."""

import ast
from pathlib import Path
from typing import List

import pytest

from SFRSegmentLib.base.progress import Cancellation, Cancelled, ProgressEvent
from SFRSegmentLib.stages import training

STAGES = Path(training.__file__).resolve().parent


class Counter:
    """A stand-in stage: each step adds one iteration; it records where it saved."""

    def __init__(self, start: int = 0, cancel_after: int = -1, cancellation: Cancellation = None) -> None:
        self.iteration = start
        self.saved: List[int] = []
        self.cancel_after = cancel_after
        self.cancellation = cancellation

    def step(self) -> float:
        self.iteration += 1
        if self.iteration == self.cancel_after:
            self.cancellation.request()  # as a signal arriving during this step
        return 1.0 / self.iteration

    def save(self) -> None:
        self.saved.append(self.iteration)


def run(counter: Counter, total: int, every: int, cancellation: Cancellation = None) -> List[ProgressEvent]:
    events: List[ProgressEvent] = []
    training.train("stage", "the task", lambda: counter.iteration, total, every, counter.step, counter.save,
                   events.append, cancellation)
    return events


def test_it_steps_to_the_total_saving_every_few_iterations_and_at_the_end():
    counter = Counter()
    events = run(counter, total=10, every=4)
    assert counter.iteration == 10
    assert counter.saved == [4, 8, 10]
    assert [e.step for e in events] == list(range(1, 11)) and {e.total for e in events} == {10}
    assert events[-1].loss == pytest.approx(0.1) and events[-1].eta_s is not None


def test_a_resumed_loop_continues_from_the_stage_iteration_and_a_finished_one_does_nothing():
    counter = Counter(start=6)
    assert [e.step for e in run(counter, total=10, every=4)] == [7, 8, 9, 10]
    assert counter.saved == [8, 10]
    done = Counter(start=10)
    assert run(done, total=10, every=4) == [] and done.saved == []


def test_a_cancellation_during_a_step_saves_after_it_and_stops_before_the_next():
    cancellation = Cancellation()
    counter = Counter(cancel_after=3, cancellation=cancellation)
    with pytest.raises(Cancelled, match=r"the task stopped at iteration 3 of 10; .*rerun resumes"):
        run(counter, total=10, every=100, cancellation=cancellation)
    assert counter.iteration == 3 and counter.saved == [3]


def test_a_cancellation_before_the_start_saves_the_state_it_resumed_from_and_takes_no_step():
    cancellation = Cancellation()
    cancellation.request()
    counter = Counter(start=5)
    with pytest.raises(Cancelled):
        run(counter, total=10, every=4, cancellation=cancellation)
    assert counter.iteration == 5 and counter.saved == [5]


@pytest.mark.parametrize("module", ["finetune.py", "retrain.py"])
def test_both_training_stages_run_this_loop_and_no_loop_of_their_own(module):
    tree = ast.parse((STAGES / module).read_text(encoding="utf-8"))
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "train"]
    assert len(calls) == 1
    loops = [node for node in ast.walk(tree) if isinstance(node, ast.While)]
    assert not loops, f"{module} has a while loop of its own"
