"""The run folder: where every stage reads and writes. Documented here once; stages and the Slicer module use it.

::

    RUN/
      config.json                      resolved configuration of the run
      manifest.json                    versions, device, seeds, SHA-256 of the inputs
      finetune/                        stage F (SAM fine-tuning)
        checkpoint.pt                  resumable state (trainable weights, optimizer, schedule, RNG, iteration)
        sam_trainable.pt               final trainable SAM weights (LoRA + prompt encoder + mask decoder)
        sam_trainable.json             its SAM config, the base checkpoint, iterations, SHA-256 of the .pt
        log.csv                        iteration, loss, lr
      pseudolabels/                    stage P (whole-volume SAM pseudo-labels of the unlabeled cases)
        <case>.label.nrrd              hard label (uint8) on the image's grid and geometry
        <case>.prob.npy                class probabilities, uint8 (K+1, I, J, K), p = value / 255
        confidence.csv                 case, confidence (mean max-softmax, SFR+ definition), least confident first
      retrain/                         stage R (V-Net re-training)
        checkpoint.pt, vnet.pt, log.csv
      predictions/<case>.seg.nrrd, <case>.nii.gz
      metrics.csv, report.html

Every file is written atomically (see :mod:`SFRSegmentLib.atomic`): a file that exists is complete.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import PathLike

PROBABILITY_SCALE = 255
"""Probabilities are stored as uint8: p = stored / PROBABILITY_SCALE (a 0.002 quantisation step)."""


@dataclass(frozen=True)
class RunFolder:
    """Paths inside one run folder. Creating the object touches nothing on disk."""

    root: Path

    def __init__(self, root: PathLike) -> None:
        object.__setattr__(self, "root", Path(root))

    # run level
    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    # stage F
    @property
    def finetune_dir(self) -> Path:
        return self.root / "finetune"

    @property
    def finetune_checkpoint(self) -> Path:
        return self.finetune_dir / "checkpoint.pt"

    @property
    def sam_weights(self) -> Path:
        return self.finetune_dir / "sam_trainable.pt"

    @property
    def sam_weights_info(self) -> Path:
        return self.finetune_dir / "sam_trainable.json"

    @property
    def finetune_log(self) -> Path:
        return self.finetune_dir / "log.csv"

    # stage P
    @property
    def pseudolabel_dir(self) -> Path:
        return self.root / "pseudolabels"

    def pseudo_label(self, case: str) -> Path:
        return self.pseudolabel_dir / f"{case}.label.nrrd"

    def pseudo_probabilities(self, case: str) -> Path:
        return self.pseudolabel_dir / f"{case}.prob.npy"

    @property
    def confidence_table(self) -> Path:
        return self.pseudolabel_dir / "confidence.csv"

    # stage R
    @property
    def retrain_dir(self) -> Path:
        return self.root / "retrain"

    @property
    def retrain_checkpoint(self) -> Path:
        return self.retrain_dir / "checkpoint.pt"

    @property
    def vnet_weights(self) -> Path:
        return self.retrain_dir / "vnet.pt"

    @property
    def retrain_log(self) -> Path:
        return self.retrain_dir / "log.csv"

    # outputs
    @property
    def prediction_dir(self) -> Path:
        return self.root / "predictions"

    def prediction(self, case: str, suffix: str = ".seg.nrrd") -> Path:
        return self.prediction_dir / f"{case}{suffix}"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def report(self) -> Path:
        return self.root / "report.html"
