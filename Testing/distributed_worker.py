"""One rank of the distributed tests (Testing/test_distributed.py), started by a real ``torchrun``.

``python -m torch.distributed.run --nproc_per_node=N distributed_worker.py COHORT OUT`` joins the gloo group and
runs, with tiny configurations, the stages on ``COHORT`` into the run folder ``OUT/run``: fine-tuning (per-rank
batch 1), pseudo-labelling and Mean-Teacher re-training with the pseudo-labels. Besides what the engine writes,
each rank dumps its own view into ``OUT/rank<r>/``, which the tests compare: the fine-tuned trainable weights,
the student and teacher after re-training, and the names of the cases it pseudo-labelled itself. Without torchrun
(one process) the same script is the single-process reference.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from SFRSegmentLib.base.config import PseudoLabelConfig, RetrainConfig, preset
from SFRSegmentLib.data.cohort import discover_cohort
from SFRSegmentLib.base.distributed import process_group
from SFRSegmentLib.stages.retrain import Trainer, retrain
from SFRSegmentLib.storage.runfolder import RunFolder
from SFRSegmentLib.stages import pseudolabel as pseudolabel_module
from SFRSegmentLib.stages import finetune as finetune_module
from SFRSegmentLib.stages.finetune import finetune
from SFRSegmentLib.models.sam.lora import trainable_state_dict
from SFRSegmentLib.stages.pseudolabel import pseudolabel

FINETUNE = dict(patch_size=(32, 32, 16), iterations=3, checkpoint_every=2, device="cpu")
PSEUDOLABEL = dict(device="cpu")
RETRAIN = dict(ssl_method="mt", pseudo_labels="sam", iterations=3, lr_schedule="step", patch_size=(16, 16, 16), batch_labeled=1,
               batch_unlabeled=1, n_filters=4, checkpoint_every=2, device="cpu")


def main(cohort_dir: str, out_dir: str, finetune_batch: int) -> None:
    out = Path(out_dir)
    with process_group(use_cuda=False) as here:
        mine = out / f"rank{here.rank}"
        mine.mkdir(parents=True, exist_ok=True)
        cohort = discover_cohort(cohort_dir)
        run = RunFolder(out / "run")

        finetunings = keep_instances(finetune_module._Training)
        small = preset("small").resolved(len(cohort.classes)).finetune
        finetune(cohort, run, dataclasses.replace(small, batch_size=finetune_batch, **FINETUNE))
        torch.save(trainable_state_dict(finetunings[0].model), mine / "sam_trainable.pt")

        labelled_here = []
        compute = pseudolabel_module._Labeler.compute

        def recording_compute(self, case):
            labelled_here.append(case.name)
            return compute(self, case)

        pseudolabel_module._Labeler.compute = recording_compute
        pseudolabel(cohort, run, PseudoLabelConfig(**PSEUDOLABEL))
        (mine / "pseudolabelled.json").write_text(json.dumps(labelled_here))

        trainers = keep_instances(Trainer)
        retrain(cohort, run, RetrainConfig(**RETRAIN))
        teacher = trainers[0].method.networks()[0]
        torch.save({"student": trainers[0].student.state_dict(), "teacher": teacher.state_dict()},
                   mine / "retrain.pt")


def keep_instances(cls: type) -> list:
    """A list that every instance of ``cls`` created from now on is appended to (to read the in-memory state of a
    stage that returns only file paths)."""
    instances = []
    original_init = cls.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        instances.append(self)

    cls.__init__ = init
    return instances


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
