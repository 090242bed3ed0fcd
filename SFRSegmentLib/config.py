"""The one typed configuration of a run: every option of every stage, with the paper's values as defaults.

``RunConfig`` nests the stages' own option classes (:class:`~SFRSegmentLib.sam.finetune.FinetuneConfig`,
:class:`~SFRSegmentLib.sam.pseudolabel.PseudoLabelConfig`, :class:`~SFRSegmentLib.retrain.RetrainConfig`,
:class:`~SFRSegmentLib.sfrplus.SFRPlusConfig`, :class:`~SFRSegmentLib.inference.InferenceConfig`), so each option is
defined in exactly one place. The command line, a JSON file (``--config``) and the Slicer module only fill it:
``preset(name)`` gives the starting point, :func:`SFRSegmentLib.config_io.with_overrides` applies a nested dict, and
:meth:`RunConfig.for_cohort` fixes what follows from the data (the number of classes) and from ``device``.

Presets:

* ``paper``: the paper and official code (SAM ViT-B 1024², 112×112×80 patches, 6,000 + 6,000 iterations, SFR_MT).
  Needs a GPU for sensible times and the SAM ViT-B checkpoint (downloaded or imported).
* ``cpu``: for real scans on a computer without a GPU (README "Results on real scans" gives its measured Dice and
  time). The V-Net is trained at a working voxel size of 1.25 mm (predictions are resampled back to each image's
  own grid), with the reference V-Net on 64×64×32 patches, strong crop augmentation, a poly schedule over a short run, bf16
  where the CPU has native bf16 instructions, and the largest connected component kept per class. SAM (ViT-B,
  pretrained) is fine-tuned on 256² mosaics of 64×64×16 patches at the images' own resolution, only when its
  checkpoint is already on this machine (``sam_missing = "skip"``): SAM is never fine-tuned from random weights
  for real data, and without it the run re-trains Mean Teacher without the SFR term, with a warning.
* ``small``: the same code at toy size for tests and the demo, **not for real data**: SAM's small configuration
  (256² mosaics, 2 encoder blocks, randomly initialised — no checkpoint needed), 48×48×16 patches (a 5×5 grid),
  150 fine-tuning and 200 re-training iterations, sliding-window strides 32/32/8 at inference.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

from .choices import PRESETS, SAM_MISSING
from .data import Cohort
from .errors import InputError
from .inference import InferenceConfig, cpu_has_native_bf16
from .retrain import RetrainConfig
from .sam.finetune import FinetuneConfig
from .sam.model import SamConfig
from .sam.pseudolabel import PseudoLabelConfig
from .sfrplus import SFRPlusConfig
from .ssl import SSLConfig

SMALL_PATCH = (48, 48, 16)
CPU_SPACING = (1.25, 1.25, 1.25)
CPU_PATCH = (64, 64, 32)
CPU_SAM_PATCH = (64, 64, 16)
CPU_RAMPUP_EPOCH = 12
"""Iterations per consistency ramp-up "epoch" in the cpu preset: the reference's 40 epochs then end at 480 of its
1,500 iterations (at the reference's 150 the consistency weight would still be 6 % of its final value at the end)."""


@dataclass(frozen=True)
class RunConfig:
    """Everything a run does. ``device`` ("auto", "cpu", "cuda", "cuda:N") applies to every stage."""

    preset: Literal["paper", "cpu", "small"] = "paper"
    device: str = "auto"
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    pseudolabel: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    sfr_plus: bool = False
    """Run SFR+ rounds after SFR (``sfrplus`` holds their options)."""
    sfrplus: SFRPlusConfig = field(default_factory=SFRPlusConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    baseline_method: Optional[str] = None
    """Also re-train this method (e.g. "supervised") without pseudo-labels, for a side-by-side comparison."""
    truth_dir: Optional[str] = None
    """Folder of true labels of unlabeled cases (``<case>/label.*`` or ``<case>.*``) to evaluate against."""
    estimate: bool = True
    """Before training, time a few steps of each remaining stage and report the estimated run time
    (:mod:`SFRSegmentLib.estimate`)."""
    estimate_warn_hours: float = 3.0
    """Warn (a ``warning`` progress event) when the estimated run time exceeds this many hours."""
    sam_missing: Literal["download", "skip"] = "download"
    """When the base SAM checkpoint is not on this machine: ``download`` it, or ``skip`` SAM (no fine-tuning, no
    pseudo-labels) and re-train the method without the SFR term, with a warning event."""

    def __post_init__(self) -> None:
        if self.sam_missing not in SAM_MISSING:
            raise InputError(f"sam_missing must be one of {', '.join(SAM_MISSING)}, got {self.sam_missing!r}",
                             field="sam_missing")
        if not self.estimate_warn_hours > 0:
            raise InputError(f"estimate_warn_hours must be positive, got {self.estimate_warn_hours}",
                             field="estimate_warn_hours")

    def for_cohort(self, cohort: Cohort) -> "RunConfig":
        """This configuration with the SAM head sized to the cohort's classes and ``device`` in every stage."""
        k = len(cohort.classes)
        finetune = self.finetune
        if finetune.sam.num_classes != k:
            finetune = dataclasses.replace(finetune, sam=dataclasses.replace(finetune.sam, num_classes=k))
        return dataclasses.replace(
            self,
            finetune=dataclasses.replace(finetune, device=self.device),
            pseudolabel=dataclasses.replace(self.pseudolabel, device=self.device),
            retrain=dataclasses.replace(self.retrain, device=self.device),
            inference=dataclasses.replace(self.inference, device=self.device),
        )


def preset(name: str) -> RunConfig:
    """The named starting configuration (see the module docstring)."""
    if name == "paper":
        return RunConfig()
    if name == "small":
        return RunConfig(
            preset="small",
            finetune=FinetuneConfig.small(patch_size=SMALL_PATCH, iterations=150),
            pseudolabel=PseudoLabelConfig(window=SMALL_PATCH, overlap=0.5),
            retrain=RetrainConfig(patch_size=SMALL_PATCH, iterations=200, checkpoint_every=50, lr_step=150),
            inference=InferenceConfig(patch_size=SMALL_PATCH, stride_xy=32, stride_z=8),
        )
    if name == "cpu":
        return _cpu_preset()
    raise InputError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}", field="preset")


def _cpu_preset() -> RunConfig:
    """The ``cpu`` preset (module docstring); its numbers were chosen by measurement (benchmarks/bench_accuracy.py)."""
    precision = "bf16" if cpu_has_native_bf16() else "fp32"
    return RunConfig(
        preset="cpu",
        device="cpu",
        finetune=FinetuneConfig(sam=SamConfig(image_size=256), patch_size=CPU_SAM_PATCH, iterations=100,
                                checkpoint_every=25, precision=precision),
        pseudolabel=PseudoLabelConfig(window=CPU_SAM_PATCH, overlap=0.0, windows_per_batch=4, precision=precision),
        retrain=RetrainConfig(method="sfr_mt", spacing=CPU_SPACING, patch_size=CPU_PATCH, iterations=1500,
                              lr_schedule="poly", augmentation="strong", checkpoint_every=250, precision=precision,
                              ssl=SSLConfig(rampup_epoch_iterations=CPU_RAMPUP_EPOCH)),
        inference=InferenceConfig(patch_size=CPU_PATCH, stride_xy=16, stride_z=8, largest_component=True,
                                  precision=precision),
        sam_missing="skip",
    )
