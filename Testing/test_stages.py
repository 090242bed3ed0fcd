"""The stages of a run behind one interface (SFRSegmentLib.run.stages): which stages a configuration runs, in what
order, and that the pipeline is a loop over them."""

import ast
import dataclasses
from pathlib import Path

import pytest

from SFRSegmentLib.base.choices import STAGES
from SFRSegmentLib.base.config import parse_method, preset
from SFRSegmentLib.data.cohort import Case, Cohort
from SFRSegmentLib.run import pipeline
from SFRSegmentLib.run.stages import Stage, run_stages
from SFRSegmentLib.storage.runfolder import RunFolder

COHORT = Cohort(root=Path("/nonexistent"), classes={1: "organ"}, source="manifest",
                cases=[Case("a", Path("/nonexistent/a.nrrd"), Path("/nonexistent/a_label.nrrd")),
                       Case("b", Path("/nonexistent/b.nrrd"))])


def names(method: str, **changes):
    config = preset("small")
    config = dataclasses.replace(config, retrain=dataclasses.replace(config.retrain, **parse_method(method)), **changes)
    stages = run_stages(COHORT, RunFolder("/nonexistent/run"), config)
    assert all(isinstance(stage, Stage) for stage in stages)
    return [stage.name for stage in stages]


@pytest.mark.parametrize("method, changes, expected", [
    ("mt", {}, ["retrain", "predict"]),
    ("sfr_mt", {}, ["finetune", "pseudolabel", "retrain", "predict"]),
    ("sfr_mt", {"sfr_plus": True, "baseline_method": "supervised"},
     ["finetune", "pseudolabel", "retrain", "sfrplus", "baseline", "predict"]),
])
def test_a_configuration_runs_its_stages_in_the_order_of_the_stage_list(method, changes, expected):
    found = names(method, **changes)
    assert found == expected
    assert found == [name for name in STAGES if name in found]  # the order --redo and the timings use


def test_every_stage_depends_only_on_stages_that_run_before_it():
    config = dataclasses.replace(preset("small"), sfr_plus=True, baseline_method="supervised")
    for stage in run_stages(COHORT, RunFolder("/nonexistent/run"), config):
        assert stage.depends_on <= set(STAGES[:STAGES.index(stage.name)]), stage.name


def test_the_pipeline_runs_the_stages_in_one_loop_and_calls_no_stage_function_itself():
    tree = ast.parse(Path(pipeline.__file__).read_text(encoding="utf-8"))
    called = {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    assert "run_stages" in called
    assert not called & {"finetune", "pseudolabel", "retrain", "run_sfrplus", "predict_cases"}
