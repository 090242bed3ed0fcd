"""Named choices that the engine, its command line and the Slicer module share, with the titles they are shown by.

Standard library only, so that the Slicer module and the configuration (:mod:`SFRSegmentLib.base.config`, which
validates options against these lists) can read them before the engine's dependencies (torch, MONAI) are installed
or imported. Every list is defined here once; the others import it.
"""

from __future__ import annotations

PRESETS = ("paper", "cpu", "small")
"""Starting configurations (:func:`SFRSegmentLib.base.config.preset`)."""

PRESET_TITLES = {"paper": "Paper", "cpu": "CPU", "small": "Small"}
PRESET_DESCRIPTIONS = {
    "paper": "full size; needs a GPU",
    "cpu": "real scans, no GPU; about 1 h on 2 cores",
    "small": "quick tests and demos; not for real data",
}
"""What each preset is for, as the command line's help and the Slicer module's preset list say it."""

SSL_METHODS = ("mt", "uamt", "acmt", "supervised")
"""The semi-supervised methods a V-Net is re-trained with (:mod:`SFRSegmentLib.stages.semisupervised` registers one
class for each; ``supervised`` learns from the labeled volumes alone): ``retrain.ssl_method``."""

SSL_METHOD_TITLES = {
    "mt": "Mean Teacher",
    "uamt": "UA-MT",
    "acmt": "AC-MT",
    "supervised": "Labeled volumes only",
}

PSEUDO_LABEL_SOURCES = ("sam", "none")
"""Where the pseudo-labels of SFR's term come from (``retrain.pseudo_labels``): ``sam``, the SAM fine-tuned on the
labeled volumes (its backbone is ``finetune.base_checkpoint``), or ``none`` (the method alone, without SAM)."""

PSEUDO_LABEL_SOURCE_TITLES = {"sam": "SAM fine-tuned on the labeled volumes (SFR)", "none": "None (without SAM)"}

SFR_PREFIX = "sfr"
"""Method names (:data:`METHODS`) join the two choices: ``sfr_<method>`` is ``<method>`` plus SAM's pseudo-labels,
``sfr`` alone is ``supervised`` plus them (self-training), ``<method>`` is the method without SAM."""


def method_name(ssl_method: str, pseudo_labels: str) -> str:
    """The name of ``ssl_method`` with pseudo-labels from ``pseudo_labels`` (``mt`` + ``sam`` → ``sfr_mt``)."""
    if pseudo_labels == "none":
        return ssl_method
    return SFR_PREFIX if ssl_method == "supervised" else f"{SFR_PREFIX}_{ssl_method}"


METHODS = tuple(method_name(ssl, source) for source in PSEUDO_LABEL_SOURCES for ssl in SSL_METHODS)
"""Every method name, the paper's (``sfr_mt`` …) and the names a run folder, ``reproduce``'s cells and the option
``retrain.method`` (an alias of the two fields) use: the SFR ones first (``sfr_mt`` leads), then those without SAM."""

METHOD_PARTS = {method_name(ssl, source): (ssl, source) for source in PSEUDO_LABEL_SOURCES for ssl in SSL_METHODS}
"""Method name → (semi-supervised method, pseudo-label source)."""

METHOD_TITLES = {
    "sfr_mt": "SFR + Mean Teacher",
    "sfr_uamt": "SFR + UA-MT",
    "sfr_acmt": "SFR + AC-MT",
    "sfr": "SFR, labels and pseudo-labels only",
    "mt": "Mean Teacher, without SAM",
    "uamt": "UA-MT, without SAM",
    "acmt": "AC-MT, without SAM",
    "supervised": "Labeled volumes only, without SAM",
}

DEVICES = ("auto", "cuda", "cpu")
"""Where a run computes: ``auto`` (a CUDA GPU when there is one), ``cuda`` or ``cpu``. ``cuda:N`` (GPU number N) is
accepted wherever ``cuda`` is (:func:`SFRSegmentLib.base.config.check_device`)."""

DEVICE_TITLES = {"auto": "Automatic (GPU if there is one)", "cuda": "GPU (CUDA)", "cpu": "CPU (slow)"}

PRECISIONS = ("auto", "fp32", "bf16", "bf16_if_native")
"""How networks run (:func:`SFRSegmentLib.base.device.autocast_context` applies it)."""

PRECISION_DESCRIPTIONS = {
    "auto": "bf16 autocast on CUDA, float32 on the CPU",
    "fp32": "float32 everywhere (reproduces the references)",
    "bf16": "bf16 autocast on any device (fast on CPUs with AMX or AVX512-BF16; logits differ by about 1e-3)",
    "bf16_if_native": "bf16 autocast on CUDA and on CPUs that compute bf16 natively (AVX512-BF16 or AMX), "
                      "float32 elsewhere",
}

STAGES = ("finetune", "pseudolabel", "retrain", "sfrplus", "baseline", "predict", "evaluate", "report")
"""The stages of a run that write outputs, in order (what ``run --redo`` names)."""

STAGE_TITLES = {
    "validate": "Checking the inputs",
    "estimate": "Estimating the run time",
    "finetune": "Fine-tuning SAM",
    "pseudolabel": "Pseudo-labelling",
    "retrain": "Re-training the V-Net",
    "sfrplus": "SFR+ refinement",
    "baseline": "Baseline training",
    "predict": "Predicting",
    "evaluate": "Evaluating",
    "report": "Writing the report",
}
"""Every stage a run reports progress for (:data:`STAGES` and the two that write nothing), by its title."""

SAM_MISSING = ("download", "skip")
"""What a run does when the base SAM checkpoint is not on the machine (``RunConfig.sam_missing``)."""

DEFAULT_MODEL_ID = "sam_vit_b"
"""The catalog model (``Resources/Models.json``) that fine-tuning starts from unless told otherwise."""

SAM_ARCHITECTURES = ("vit_b", "vit_l", "vit_h", "tiny_vit")
"""SAM's image encoders: the ViT sizes of segment_anything's ``build_sam``, and LiteMedSAM's TinyViT
(:mod:`SFRSegmentLib.models.sam.tiny_vit`)."""

SAM_INPUT_SCALINGS = ("zscore", "unit_range")
"""How a SAM's mosaics are scaled: z-scored over the volume (SFR's ViT SAMs, with SAM's own normalisation off), or
clipped to the volume's 0.5-99.5 percentiles and scaled to [0, 1] (LiteMedSAM's training images)."""

DEPTH_PADDINGS = ("centre", "end")
"""Where the empty tiles of a mosaic go: split around the slices (official code) or all after them (paper)."""

LR_SCHEDULES = ("step", "poly")
"""Re-training learning-rate schedules: ×lr_gamma every lr_step iterations, or (1 − it/T)^lr_power."""

AUGMENTATIONS = ("reference", "strong")
"""``reference``: the references' rot90 + flip only; ``strong``: that plus
:func:`SFRSegmentLib.data.augment.augment_crop`."""

NORMALIZATIONS = ("batchnorm", "groupnorm", "instancenorm", "none")
"""Normalisations the reference V-Net offers after every convolution."""

BATCHNORM_STATISTICS = ("batch", "frozen")
"""How a V-Net's BatchNorm normalises while it trains: ``batch`` with each batch's statistics, tracking running
ones (training from scratch, as the references); ``frozen`` with the running statistics its initial weights came
with, kept (an update continuing trained weights: it then trains as it will be evaluated)."""

CONFIDENCE_VOXELS = ("all", "foreground")
CONFIDENT_LABEL_SOURCES = ("vnet", "sam")
SAM_STARTS = ("continue", "restart")
CONFIDENT_IN_RETRAINING = ("ssl_only", "pseudo_label", "labeled", "excluded")
"""The open choices of SFR+ (:class:`SFRSegmentLib.base.config.SFRPlusConfig`)."""
