"""Semi-supervised methods of the re-training stage (R), behind one small interface, and the SFR pseudo-label term.

Each method turns one training step (the student's logits on a two-stream batch, labeled samples first) into its
extra loss terms; the training loop (:mod:`SFRSegmentLib.stages.retrain`) adds the supervised term ½(CE + Dice) on the
labeled samples, sums everything, steps the optimiser and then calls :meth:`SSLMethod.after_step`. Adding a method is
its name in :data:`SFRSegmentLib.base.choices.SSL_METHODS` (the list the configuration, the command line and the Slicer
module offer) and one new :class:`SSLMethod` subclass registered under it with :func:`register_method`; its SFR
variant (``retrain.pseudo_labels = "sam"``, named ``sfr_<name>``) comes for free, because the SFR term is an add-on
(:class:`WithPseudoLabels`) around any method.

Methods and the reference each one follows (the LA scripts; ``it`` is the 0-based iteration):

* ``supervised``: no extra term; only the labeled stream is drawn (UA-MT's ``train_LA.py``).
* ``mt`` (Mean Teacher, SFR's ``train_retraining.py``): an EMA teacher (:func:`ema_update`) sees every sample of
  the batch plus noise clamp(N(0, 0.1²), ±0.2); consistency = mean over **all** samples, voxels and channels of
  (softmax(student) − softmax(teacher))², weighted by 0.1·exp(−5(1 − t)²) with t = min(it // 150, 40) / 40.
* ``uamt`` (UA-MT, ``train_LA_meanteacher_certainty_unlabel.py``): as MT but on the unlabeled samples only and
  masked to the voxels where the teacher is certain: T = 8 noisy teacher passes (T/2 forwards of the unlabeled
  batch repeated twice), entropy H of their mean softmax, mask H < (0.75 + 0.25·r(it))·ln C with
  r = sigmoid ramp over all iterations; masked mean Σ(mask·d) / (C·Σmask + 1e-16).
* ``acmt`` (AC-MT, entropy strategy, ``train_ACMT_Ent_3D.py``): the teacher sees the noisy unlabeled samples; the
  mask keeps the *ambiguous* voxels, where the student's normalised entropy H / ln C ≥ 0.75 + (0.95 − 0.75)·r(it);
  consistency on the unlabeled samples only, same masked mean and weight as above. Its script also trains for
  8,000 iterations with a poly learning rate, which a run applies to ``acmt`` and ``sfr_acmt`` unless
  ``retrain.iterations`` or ``retrain.lr_schedule`` is set (:func:`SFRSegmentLib.base.config.method_recipe`).
* pseudo-labels from SAM (``sfr`` and ``sfr_<method>``): the method plus the SFR term ½(CE + Dice) of the student on the unlabeled samples
  against their cached pseudo-labels, weight 1.0 (SFR's Eq. 7, constant as in the official code). Samples without
  a pseudo-label (SFR+ confident volumes) are left out of the term. ``sfr`` alone is self-training. With
  ``pseudo_label_agreement`` (not in the paper) the term counts only the voxels where the pseudo-label agrees with
  the method's own prediction (:meth:`SSLMethod.prediction`: the teacher's for the Mean-Teacher methods), so that
  where SAM and the 3D network disagree the network is not pulled towards SAM.

Generalisation beyond the binary LA scripts: C = K + 1 classes replaces the hard-coded 2 (entropy normalised by
ln C, masked means over C channels). Dice everywhere is the official multi-class soft Dice over the K+1 classes
(squared denominators, sums over the whole batch, ε = 1e-10), i.e. MONAI's ``DiceLoss`` with ``squared_pred``,
``batch`` and ``smooth_nr = smooth_dr = 1e-10``; CE is the plain mean cross-entropy.

The teacher starts as a copy of the student (the references build it with its own random initialisation, which the
first EMA update, with decay 0, overwrites; only the first iteration's consistency, at weight 0.1·e⁻⁵, differs).
Like the references, it stays in train mode (dropout on, batch statistics), averages parameters only (its
BatchNorm buffers follow its own forward passes) and runs under ``no_grad`` with frozen parameters.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Type

import torch
from monai.losses import DiceCELoss, MaskedDiceLoss
from monai.networks import one_hot
from torch import nn
from torch.nn import functional

from ..base.choices import SSL_METHODS
from ..base.config import SSLConfig

DICE_SMOOTH = 1e-10
"""ε of the official soft Dice (SFR's ``losses.DiceLoss``), numerator and denominator."""

ENTROPY_EPS = 1e-6
"""Added inside the logarithm of the entropy, as the references do."""

MASKED_MEAN_EPS = 1e-16
"""Added to the denominator of a masked consistency mean, as the references do (an empty mask gives 0)."""


# ---------------------------------------------------------------------------------------------------------------
# Schedules and building blocks


def sigmoid_rampup(current: float, length: float) -> float:
    """exp(−5(1 − t)²) with t = clip(current, 0, length) / length: 0.0067 at the start, 1 from ``length`` on."""
    if length == 0:
        return 1.0
    phase = 1.0 - min(max(float(current), 0.0), float(length)) / float(length)
    return math.exp(-5.0 * phase * phase)


def consistency_weight(iteration: int, config: SSLConfig) -> float:
    """consistency · sigmoid_rampup(iteration // rampup_epoch_iterations, consistency_rampup)."""
    epoch = iteration // config.rampup_epoch_iterations
    return config.consistency * sigmoid_rampup(epoch, config.consistency_rampup)


def ramped_threshold(iteration: int, total_iterations: int, start: float, end: float) -> float:
    """start + (end − start)·sigmoid_rampup(iteration, total_iterations): the UA-MT / AC-MT threshold schedules."""
    return start + (end - start) * sigmoid_rampup(iteration, total_iterations)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, iteration: int, decay: float) -> None:
    """teacher ← α·teacher + (1 − α)·student with α = min(1 − 1/(iteration + 1), decay), parameters only."""
    alpha = min(1.0 - 1.0 / (iteration + 1), decay)
    for teacher_param, student_param in zip(teacher.parameters(), student.parameters()):
        teacher_param.mul_(alpha).add_(student_param, alpha=1.0 - alpha)


def teacher_noise(images: torch.Tensor, config: SSLConfig) -> torch.Tensor:
    """clamp(N(0, std²), −clip, clip) of the images' shape (drawn from torch's global generator)."""
    noise = torch.randn_like(images) * config.teacher_noise_std
    return noise.clamp(-config.teacher_noise_clip, config.teacher_noise_clip)


def softmax_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Voxel- and channel-wise (softmax(student) − softmax(teacher))², not reduced; no gradient to the teacher."""
    return (torch.softmax(student_logits, dim=1) - torch.softmax(teacher_logits.detach(), dim=1)) ** 2


def normalised_entropy(probabilities: torch.Tensor) -> torch.Tensor:
    """−Σ_c p log(p + 1e-6) / ln C over the channel axis, kept as a channel of size 1: (B, 1, ...) in [0, ~1]."""
    n_classes = probabilities.shape[1]
    entropy = -torch.sum(probabilities * torch.log(probabilities + ENTROPY_EPS), dim=1, keepdim=True)
    return entropy / math.log(n_classes)


def masked_mean(distance: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ(mask·distance) / (C·Σmask + 1e-16) for distance (B, C, ...) and mask (B, 1, ...): the mean over the masked
    voxels and all channels (0 when the mask is empty)."""
    mask = mask.to(distance.dtype)
    return torch.sum(mask * distance) / (distance.shape[1] * torch.sum(mask) + MASKED_MEAN_EPS)


_DICE_CE = DiceCELoss(include_background=True, to_onehot_y=True, softmax=True, squared_pred=True, batch=True,
                      smooth_nr=DICE_SMOOTH, smooth_dr=DICE_SMOOTH, lambda_dice=0.5, lambda_ce=0.5)


_MASKED_DICE = MaskedDiceLoss(include_background=True, softmax=True, squared_pred=True, batch=True,
                              smooth_nr=DICE_SMOOTH, smooth_dr=DICE_SMOOTH)


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """½(CE + Dice) of logits (B, C, ...) against class indices (B, ...): the supervised and the SFR term."""
    return _DICE_CE(logits.float(), labels.unsqueeze(1))


def masked_segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """:func:`segmentation_loss` over the voxels where ``mask`` (B, ...) is true: the CE's mean and the Dice's sums
    run over those voxels only (equal to it where the mask is full; 0 where it is empty)."""
    logits, weights = logits.float(), mask.to(torch.float32)
    cross_entropy = torch.sum(functional.cross_entropy(logits, labels, reduction="none") * weights)
    cross_entropy = cross_entropy / torch.clamp(torch.sum(weights), min=1.0)
    # The target is made one-hot before masking: a masked class index would read as background.
    target = one_hot(labels.unsqueeze(1), num_classes=logits.shape[1])
    return 0.5 * cross_entropy + 0.5 * _MASKED_DICE(logits, target, weights.unsqueeze(1))


# ---------------------------------------------------------------------------------------------------------------
# The interface


@dataclass
class Step:
    """What a method sees of one training step. The batch holds the ``n_labeled`` labeled samples first.

    ``pseudo_labels`` (class indices, one row per unlabeled sample) and ``has_pseudo_label`` (bool per unlabeled
    sample) are set when the run uses pseudo-labels; rows without one hold zeros and are ignored.
    """

    iteration: int
    images: torch.Tensor
    logits: torch.Tensor
    n_labeled: int
    pseudo_labels: Optional[torch.Tensor] = None
    has_pseudo_label: Optional[torch.Tensor] = None

    @property
    def unlabeled_images(self) -> torch.Tensor:
        return self.images[self.n_labeled:]

    @property
    def unlabeled_logits(self) -> torch.Tensor:
        return self.logits[self.n_labeled:]


@dataclass
class LossTerm:
    """One named loss term and its weight at this step; the loop minimises Σ weight·value."""

    name: str
    value: torch.Tensor
    weight: float


class SSLMethod:
    """A semi-supervised method: the loss terms it adds to the supervised one, and what it does after a step.

    ``term_names`` lists the names of the terms :meth:`losses` returns (the columns of the training log).
    ``uses_unlabeled`` tells the loop whether to draw the unlabeled stream at all.
    """

    term_names: Tuple[str, ...] = ()
    uses_unlabeled: bool = True

    def __init__(self, student: nn.Module, config: SSLConfig, total_iterations: int) -> None:
        self.config = config
        self.total_iterations = total_iterations

    def losses(self, step: Step) -> List[LossTerm]:
        """The method's loss terms for this step. The loop calls it inside the training precision context
        (autocast), so the teacher's forward passes run at the student's precision; autocast leaves the loss
        arithmetic on float32 tensors in float32."""
        return []

    def prediction(self, step: Step) -> torch.Tensor:
        """The method's class indices for the unlabeled samples, without gradient: the student's own. Called after
        :meth:`losses` of the same step, so a method may reuse what that computed."""
        return step.unlabeled_logits.detach().argmax(dim=1)

    def after_step(self, student: nn.Module, iteration: int) -> None:
        """Called after the optimiser step of ``iteration``."""

    def networks(self) -> List[nn.Module]:
        """The networks the method keeps besides the student (e.g. the teacher)."""
        return []

    def state_dict(self) -> Dict[str, object]:
        """What a checkpoint must hold to resume the method exactly (e.g. the teacher)."""
        return {}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Restore what :meth:`state_dict` returned."""


_METHODS: Dict[str, Type[SSLMethod]] = {}


def register_method(name: str) -> Callable[[Type[SSLMethod]], Type[SSLMethod]]:
    """Class decorator: make the method ``name`` of :data:`~SFRSegmentLib.base.choices.SSL_METHODS` (and so its SFR
    variant ``sfr_<name>``) this class."""
    if name not in SSL_METHODS:
        raise ValueError(f"method {name!r} is not in SFRSegmentLib.base.choices.SSL_METHODS (add it there)")

    def register(cls: Type[SSLMethod]) -> Type[SSLMethod]:
        _METHODS[name] = cls
        return cls

    return register


def learns_from_unlabeled(ssl_method: str, with_pseudo_labels: bool) -> bool:
    """Whether ``ssl_method`` (with or without pseudo-labels) draws the unlabeled stream (all but the supervised
    method without pseudo-labels)."""
    return with_pseudo_labels or _METHODS[ssl_method].uses_unlabeled


def build_method(ssl_method: str, with_pseudo_labels: bool, student: nn.Module, config: SSLConfig,
                 total_iterations: int) -> SSLMethod:
    """The semi-supervised method ``ssl_method`` for this student, with the pseudo-label add-on when asked."""
    method = _METHODS[ssl_method](student, config, total_iterations)
    return WithPseudoLabels(method) if with_pseudo_labels else method


# ---------------------------------------------------------------------------------------------------------------
# Methods


@register_method("supervised")
class Supervised(SSLMethod):
    """The labeled data alone (the lower bound): no extra term, no unlabeled stream."""

    uses_unlabeled = False


class MeanTeacherFamily(SSLMethod):
    """Shared by the Mean-Teacher methods: the EMA teacher, its noisy no-grad forward, the ramped weight."""

    term_names = ("consistency",)

    def __init__(self, student: nn.Module, config: SSLConfig, total_iterations: int) -> None:
        super().__init__(student, config, total_iterations)
        self.teacher = copy.deepcopy(student)
        for param in self.teacher.parameters():
            param.requires_grad_(False)
        self.teacher.train()
        self._consistency_pass: Optional[Tuple[Step, torch.Tensor]] = None
        """The step whose consistency term ran last, and its teacher's logits of the unlabeled samples."""

    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Float32 teacher logits of ``images`` plus fresh teacher noise, without gradient."""
        with torch.no_grad():
            return self.teacher(images + teacher_noise(images, self.config)).float()

    def consistency_logits(self, step: Step, unlabeled_only: bool) -> torch.Tensor:
        """The teacher's logits for the consistency term, of the unlabeled samples or of the whole batch; its
        unlabeled rows are kept for :meth:`prediction`."""
        logits = self.teacher_logits(step.unlabeled_images if unlabeled_only else step.images)
        self._consistency_pass = (step, logits if unlabeled_only else logits[step.n_labeled:])
        return logits

    def prediction(self, step: Step) -> torch.Tensor:
        """The teacher's class indices for the unlabeled samples, from this step's consistency pass (a pass of its
        own for a step whose consistency term did not run)."""
        if self._consistency_pass is not None and self._consistency_pass[0] is step:
            return self._consistency_pass[1].argmax(dim=1)
        return self.teacher_logits(step.unlabeled_images).argmax(dim=1)

    def consistency_term(self, step: Step, value: torch.Tensor) -> List[LossTerm]:
        return [LossTerm("consistency", value, consistency_weight(step.iteration, self.config))]

    def after_step(self, student: nn.Module, iteration: int) -> None:
        ema_update(self.teacher, student, iteration, self.config.ema_decay)

    def networks(self) -> List[nn.Module]:
        return [self.teacher]

    def state_dict(self) -> Dict[str, object]:
        return {"teacher": self.teacher.state_dict()}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        self.teacher.load_state_dict(state["teacher"])


@register_method("mt")
class MeanTeacher(MeanTeacherFamily):
    """Mean Teacher as SFR re-trains with it: consistency over every sample of the batch."""

    def losses(self, step: Step) -> List[LossTerm]:
        distance = softmax_mse(step.logits, self.consistency_logits(step, unlabeled_only=False))
        return self.consistency_term(step, distance.mean())


@register_method("uamt")
class UncertaintyAwareMeanTeacher(MeanTeacherFamily):
    """UA-MT: consistency on the unlabeled samples where the teacher's MC-dropout entropy is low."""

    def losses(self, step: Step) -> List[LossTerm]:
        images = step.unlabeled_images
        distance = softmax_mse(step.unlabeled_logits, self.consistency_logits(step, unlabeled_only=True))
        threshold = ramped_threshold(step.iteration, self.total_iterations, self.config.uamt_threshold_start,
                                     self.config.uamt_threshold_end)
        mask = self.teacher_uncertainty(images) < threshold
        return self.consistency_term(step, masked_mean(distance, mask))

    def teacher_uncertainty(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised entropy (B, 1, ...) of the mean softmax of ``uamt_passes`` noisy teacher passes, run as
        ``uamt_passes / 2`` forwards of the batch repeated twice (as the reference does)."""
        repeated = images.repeat(2, *([1] * (images.dim() - 1)))
        passes = [torch.softmax(self.teacher_logits(repeated), dim=1) for _ in range(self.config.uamt_passes // 2)]
        stacked = torch.cat(passes).view(self.config.uamt_passes, images.shape[0], *passes[0].shape[1:])
        return normalised_entropy(stacked.mean(0))


@register_method("acmt")
class AmbiguityConsensusMeanTeacher(MeanTeacherFamily):
    """AC-MT (entropy strategy): consistency on the unlabeled voxels where the student is ambiguous."""

    def losses(self, step: Step) -> List[LossTerm]:
        distance = softmax_mse(step.unlabeled_logits, self.consistency_logits(step, unlabeled_only=True))
        threshold = ramped_threshold(step.iteration, self.total_iterations, self.config.acmt_threshold_start,
                                     self.config.acmt_threshold_end)
        with torch.no_grad():
            mask = normalised_entropy(torch.softmax(step.unlabeled_logits, dim=1)) >= threshold
        return self.consistency_term(step, masked_mean(distance, mask))


class WithPseudoLabels(SSLMethod):
    """A method plus SFR's pseudo-label term ½(CE + Dice) on the unlabeled samples that have a pseudo-label (with
    ``pseudo_label_agreement``, on their voxels where the base method's prediction agrees)."""

    uses_unlabeled = True

    def __init__(self, base: SSLMethod) -> None:
        super().__init__(None, base.config, base.total_iterations)
        self.base = base
        self.term_names = base.term_names + ("pseudo_label",)

    def losses(self, step: Step) -> List[LossTerm]:
        if step.pseudo_labels is None or step.has_pseudo_label is None:
            raise ValueError("an SFR method needs the batch's pseudo-labels")
        terms = self.base.losses(step)  # first: the base's prediction may reuse what its terms computed
        rows = step.has_pseudo_label
        if bool(rows.any()):
            logits, targets = step.unlabeled_logits[rows], step.pseudo_labels[rows]
            if self.config.pseudo_label_agreement:
                value = masked_segmentation_loss(logits, targets, self.base.prediction(step)[rows] == targets)
            else:
                value = segmentation_loss(logits, targets)
        else:
            value = step.logits.new_zeros(())
        return terms + [LossTerm("pseudo_label", value, self.config.pseudo_label_weight)]

    def prediction(self, step: Step) -> torch.Tensor:
        return self.base.prediction(step)

    def after_step(self, student: nn.Module, iteration: int) -> None:
        self.base.after_step(student, iteration)

    def networks(self) -> List[nn.Module]:
        return self.base.networks()

    def state_dict(self) -> Dict[str, object]:
        return self.base.state_dict()

    def load_state_dict(self, state: Dict[str, object]) -> None:
        self.base.load_state_dict(state)
