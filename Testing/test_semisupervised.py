"""Semi-supervised methods: schedules, EMA, masks and losses against hand computations, the method registry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from SFRSegmentLib.stages import semisupervised
from SFRSegmentLib.base.choices import METHODS, SSL_METHODS
from SFRSegmentLib.base.config import SSLConfig, parse_method
from SFRSegmentLib.base.errors import InputError
from SFRSegmentLib.stages.semisupervised import (
    Step,
    build_method,
    consistency_weight,
    ema_update,
    masked_mean,
    masked_segmentation_loss,
    normalised_entropy,
    ramped_threshold,
    segmentation_loss,
    sigmoid_rampup,
    softmax_mse,
    teacher_noise,
)

CONFIG = SSLConfig()


class FixedLogits(nn.Module):
    """A "network" whose logits ignore the input: a learnable map (C, H, W, D) repeated over the batch."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits.clone())
        self.calls = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls.append(images.shape[0])
        return self.logits.expand(images.shape[0], *self.logits.shape)


def two_voxel_logits(first: tuple, second: tuple) -> torch.Tensor:
    """Logits (C=2, 2, 1, 1): voxel 0 gets ``first``, voxel 1 gets ``second``."""
    return torch.tensor([[[[first[0]]], [[second[0]]]], [[[first[1]]], [[second[1]]]]])


# ---------------------------------------------------------------------------------------------------------------
# Schedules


def test_sigmoid_rampup_values() -> None:
    assert sigmoid_rampup(0, 40) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(20, 40) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(40, 40) == 1.0
    assert sigmoid_rampup(100, 40) == 1.0
    assert sigmoid_rampup(-3, 40) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(7, 0) == 1.0


@pytest.mark.parametrize("iteration, epoch", [(0, 0), (149, 0), (150, 1), (3000, 20), (5999, 39), (6000, 40),
                                              (9000, 40)])
def test_consistency_weight_ramps_on_iteration_over_150(iteration: int, epoch: int) -> None:
    expected = 0.1 * math.exp(-5 * (1 - epoch / 40) ** 2)
    assert consistency_weight(iteration, CONFIG) == pytest.approx(expected, rel=1e-12)


def test_threshold_schedules_of_uamt_and_acmt() -> None:
    assert ramped_threshold(0, 6000, 0.75, 1.0) == pytest.approx(0.75 + 0.25 * math.exp(-5))
    assert ramped_threshold(6000, 6000, 0.75, 1.0) == 1.0
    assert ramped_threshold(3000, 6000, 0.75, 0.95) == pytest.approx(0.75 + 0.2 * math.exp(-1.25))


def test_ema_update_uses_the_warm_up_decay() -> None:
    teacher, student = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        teacher.weight.fill_(1.0)
        student.weight.fill_(3.0)
    ema_update(teacher, student, iteration=0, decay=0.99)  # alpha = 0: the teacher becomes the student
    assert torch.equal(teacher.weight, student.weight)
    with torch.no_grad():
        teacher.weight.fill_(1.0)
    ema_update(teacher, student, iteration=9, decay=0.99)  # alpha = min(1 - 1/10, 0.99) = 0.9
    assert torch.allclose(teacher.weight, torch.full((1, 2), 0.9 * 1 + 0.1 * 3))
    with torch.no_grad():
        teacher.weight.fill_(1.0)
    ema_update(teacher, student, iteration=1000, decay=0.99)  # alpha = 0.99
    assert torch.allclose(teacher.weight, torch.full((1, 2), 0.99 * 1 + 0.01 * 3))


def test_teacher_noise_is_clamped() -> None:
    torch.manual_seed(0)
    noise = teacher_noise(torch.zeros(10_000), SSLConfig(teacher_noise_std=1.0, teacher_noise_clip=0.2))
    assert noise.abs().max() == pytest.approx(0.2)
    assert (noise.abs() == 0.2).float().mean() > 0.5  # most of N(0, 1) lies beyond ±0.2
    unclipped = teacher_noise(torch.zeros(10_000), CONFIG)
    assert 0.08 < float(unclipped.std()) < 0.1  # N(0, 0.1²) clipped at 2σ


# ---------------------------------------------------------------------------------------------------------------
# Masks and losses on crafted tensors


def test_softmax_mse_and_entropy_by_hand() -> None:
    student = two_voxel_logits((0.0, 0.0), (0.0, 0.0))[None]
    teacher = two_voxel_logits((math.log(3), 0.0), (0.0, 0.0))[None]  # softmax (0.75, 0.25) and (0.5, 0.5)
    distance = softmax_mse(student, teacher)
    assert torch.allclose(distance[0, :, 0], torch.tensor([[0.0625], [0.0625]]))
    assert torch.allclose(distance[0, :, 1], torch.zeros(2, 1))
    probabilities = torch.softmax(teacher, dim=1)
    entropy = normalised_entropy(probabilities)
    expected = -(0.75 * math.log(0.75 + 1e-6) + 0.25 * math.log(0.25 + 1e-6)) / math.log(2)
    assert entropy.shape == (1, 1, 2, 1, 1)
    assert float(entropy[0, 0, 0]) == pytest.approx(expected, rel=1e-5)
    assert float(entropy[0, 0, 1]) == pytest.approx(1.0, abs=1e-5)


def test_masked_mean_divides_by_channels_times_selected_voxels() -> None:
    distance = torch.tensor([[[[[1.0]], [[2.0]]], [[[3.0]], [[4.0]]]]])  # (1, C=2, 2, 1, 1)
    mask = torch.tensor([[[[[True]], [[False]]]]])
    assert float(masked_mean(distance, mask)) == pytest.approx((1.0 + 3.0) / 2)
    assert float(masked_mean(distance, torch.zeros_like(mask))) == 0.0


def test_segmentation_loss_matches_hand_computation() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 4, 3, 2))
    labels = rng.integers(0, 3, size=(2, 4, 3, 2))
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    p = shifted / shifted.sum(axis=1, keepdims=True)
    one_hot = np.stack([labels == c for c in range(3)], axis=1).astype(float)
    cross_entropy = -np.mean(np.log(np.sum(p * one_hot, axis=1)))
    dice = np.mean([1 - (2 * np.sum(p[:, c] * one_hot[:, c]) + 1e-10)
                    / (np.sum(p[:, c] ** 2) + np.sum(one_hot[:, c] ** 2) + 1e-10) for c in range(3)])
    value = segmentation_loss(torch.tensor(logits, dtype=torch.float32), torch.tensor(labels))
    assert float(value) == pytest.approx(0.5 * (cross_entropy + dice), rel=1e-5)


def test_masked_segmentation_loss_counts_only_the_masked_voxels() -> None:
    torch.manual_seed(1)
    logits, labels = torch.randn(2, 3, 4, 3, 2), torch.randint(0, 3, (2, 4, 3, 2))
    full = torch.ones(2, 4, 3, 2, dtype=torch.bool)
    assert float(masked_segmentation_loss(logits, labels, full)) == pytest.approx(
        float(segmentation_loss(logits, labels)), rel=1e-5)
    # Half the voxels: the loss of those voxels alone, whatever the other half holds
    mask = full.clone()
    mask[..., 1] = False
    masked = float(masked_segmentation_loss(logits, labels, mask))
    assert masked == pytest.approx(float(segmentation_loss(logits[..., :1], labels[..., :1])), rel=1e-5)
    scrambled_logits, scrambled_labels = logits.clone(), labels.clone()
    scrambled_logits[..., 1], scrambled_labels[..., 1] = 5 * torch.randn(2, 3, 4, 3), (labels[..., 1] + 1) % 3
    assert float(masked_segmentation_loss(scrambled_logits, scrambled_labels, mask)) == pytest.approx(masked, rel=1e-5)
    assert float(masked_segmentation_loss(logits, labels, torch.zeros_like(full))) == pytest.approx(0.0, abs=1e-6)


def _step(logits: torch.Tensor, n_labeled: int, iteration: int = 0, **pseudo) -> Step:
    images = torch.zeros(logits.shape[0], 1, *logits.shape[2:])
    return Step(iteration, images, logits, n_labeled, **pseudo)


def test_mean_teacher_consistency_covers_every_sample() -> None:
    teacher_logits = two_voxel_logits((math.log(3), 0.0), (0.0, 0.0))
    method = build_method("mt", False, FixedLogits(teacher_logits), SSLConfig(teacher_noise_std=0.0), 100)
    student_logits = torch.zeros(3, 2, 2, 1, 1)  # softmax 0.5 everywhere; 1 labeled + 2 unlabeled
    (term,) = method.losses(_step(student_logits, n_labeled=1))
    assert term.name == "consistency" and term.weight == pytest.approx(0.1 * math.exp(-5))
    assert float(term.value) == pytest.approx(0.0625 / 2)  # one of the two voxels differs, in both channels
    assert method.teacher.calls == [3]


def test_uamt_keeps_the_voxels_where_the_teacher_is_certain() -> None:
    teacher_logits = two_voxel_logits((10.0, -10.0), (0.0, 0.0))  # certain, then maximally uncertain
    config = SSLConfig(teacher_noise_std=0.0)
    method = build_method("uamt", False, FixedLogits(teacher_logits), config, 100)
    student_logits = torch.zeros(3, 2, 2, 1, 1)
    (term,) = method.losses(_step(student_logits, n_labeled=1))
    p_certain = float(torch.softmax(torch.tensor([10.0, -10.0]), 0)[0])
    assert float(term.value) == pytest.approx((p_certain - 0.5) ** 2, rel=1e-5)  # only voxel 0 counts
    # one forward of the 2 unlabeled samples for the consistency, then T/2 = 4 of the batch repeated twice
    assert method.teacher.calls == [2, 4, 4, 4, 4]
    certainty = method.teacher_uncertainty(torch.zeros(2, 1, 2, 1, 1))
    assert certainty.shape == (2, 1, 2, 1, 1)
    assert float(certainty[0, 0, 0]) < 0.01 and float(certainty[0, 0, 1]) == pytest.approx(1.0, abs=1e-5)


def test_acmt_keeps_the_voxels_where_the_student_is_ambiguous() -> None:
    method = build_method("acmt", False, FixedLogits(torch.zeros(2, 2, 1, 1)), SSLConfig(teacher_noise_std=0.0), 100)
    # unlabeled student voxels: p = (0.5, 0.5) (normalised entropy 1) and p = (0.75, 0.25) (entropy 0.811)
    unlabeled = two_voxel_logits((0.0, 0.0), (math.log(3), 0.0))
    student_logits = torch.stack([torch.full((2, 2, 1, 1), 50.0), unlabeled, unlabeled])
    (early,) = method.losses(_step(student_logits, n_labeled=1, iteration=0))  # threshold 0.75 + 0.2·e⁻⁵
    assert float(early.value) == pytest.approx((0.0 + 2 * 0.0625) / (2 * 2))  # both voxels, 2 channels each
    (late,) = method.losses(_step(student_logits, n_labeled=1, iteration=100))  # threshold 0.95
    assert float(late.value) == pytest.approx(0.0)  # only the maximally ambiguous voxel, where they agree
    assert method.teacher.calls == [2, 2]  # the unlabeled samples only


def test_pseudo_label_term_uses_only_unlabeled_samples_with_a_pseudo_label() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 4, 4, 2)
    pseudo = torch.randint(0, 2, (2, 4, 4, 2))
    method = build_method("supervised", True, FixedLogits(torch.zeros(2, 4, 4, 2)), CONFIG, 10)
    assert not any(isinstance(m, nn.Module) for m in vars(method).values())  # self-training needs no teacher
    (term,) = method.losses(_step(logits, 1, pseudo_labels=pseudo, has_pseudo_label=torch.tensor([False, True])))
    assert term.name == "pseudo_label" and term.weight == 1.0
    assert float(term.value) == pytest.approx(float(segmentation_loss(logits[2:], pseudo[1:])))
    (none,) = method.losses(_step(logits, 1, pseudo_labels=pseudo, has_pseudo_label=torch.tensor([False, False])))
    assert float(none.value) == 0.0


def test_pseudo_label_agreement_keeps_the_voxels_where_the_teacher_agrees() -> None:
    # The teacher says class 0 at voxel 0 and class 1 at voxel 1; the pseudo-label says 0 at both.
    teacher = FixedLogits(two_voxel_logits((5.0, 0.0), (0.0, 5.0)))
    config = SSLConfig(teacher_noise_std=0.0, pseudo_label_agreement=True)
    method = build_method("mt", True, teacher, config, 10)
    logits = torch.randn(3, 2, 2, 1, 1)
    pseudo = torch.zeros(2, 2, 1, 1, dtype=torch.long)
    _, term = method.losses(_step(logits, 1, pseudo_labels=pseudo, has_pseudo_label=torch.tensor([True, True])))
    assert float(term.value) == pytest.approx(float(segmentation_loss(logits[1:, :, :1], pseudo[:, :1])), rel=1e-5)
    assert method.base.teacher.calls == [3]  # the consistency's pass of the batch serves the agreement too
    for name in ("uamt", "acmt"):  # whose consistency pass holds the unlabeled samples alone
        other = build_method(name, True, FixedLogits(two_voxel_logits((5.0, 0.0), (0.0, 5.0))), config, 10)
        terms = other.losses(_step(logits, 1, pseudo_labels=pseudo, has_pseudo_label=torch.tensor([True, True])))
        assert float(terms[-1].value) == pytest.approx(float(term.value), rel=1e-5)
        assert other.base.teacher.calls.count(2) == 1  # one pass of the 2 unlabeled samples (UA-MT: then 4-sample ones)
    # A step whose consistency term has not run gets a teacher pass of its own.
    fresh = _step(logits, 1)
    assert torch.equal(method.prediction(fresh), torch.tensor([[[[0]], [[1]]]] * 2))
    assert method.base.teacher.calls == [3, 2]
    # Without a teacher the student's own prediction is the reference: where it agrees everywhere, all voxels count.
    self_training = build_method("supervised", True, FixedLogits(torch.zeros(2, 2, 1, 1)), config, 10)
    student = two_voxel_logits((3.0, 0.0), (0.0, 3.0)).expand(3, -1, -1, -1, -1)
    agreeing = student.argmax(dim=1)[1:]
    (own,) = self_training.losses(_step(student, 1, pseudo_labels=agreeing, has_pseudo_label=torch.tensor([True, True])))
    assert float(own.value) == pytest.approx(float(segmentation_loss(student[1:], agreeing)), rel=1e-5)


def test_sfr_variant_adds_the_pseudo_label_term_to_the_method() -> None:
    method = build_method("mt", True, FixedLogits(torch.zeros(2, 2, 1, 1)), CONFIG, 10)
    logits = torch.zeros(4, 2, 2, 1, 1)
    terms = method.losses(_step(logits, 2, pseudo_labels=torch.zeros(2, 2, 1, 1, dtype=torch.long),
                                has_pseudo_label=torch.tensor([True, True])))
    assert [t.name for t in terms] == ["consistency", "pseudo_label"] == list(method.term_names)
    assert "teacher" in method.state_dict()


def test_teacher_receives_no_gradient() -> None:
    for name in ("mt", "uamt", "acmt"):
        student = FixedLogits(two_voxel_logits((6.0, -6.0), (0.1, 0.0)))  # a certain and an ambiguous voxel
        method = build_method(name, False, student, CONFIG, 10)
        with torch.no_grad():
            student.logits[0] += 0.5  # the student moves away from its teacher
        logits = student(torch.zeros(4, 1, 2, 1, 1))
        (term,) = method.losses(_step(logits, 2))
        term.value.backward()
        assert student.logits.grad is not None and student.logits.grad.abs().sum() > 0
        assert all(not p.requires_grad and p.grad is None for p in method.teacher.parameters())


# ---------------------------------------------------------------------------------------------------------------
# Registry


def test_method_names_and_parsing() -> None:
    assert set(METHODS) == {"supervised", "mt", "uamt", "acmt", "sfr", "sfr_mt", "sfr_uamt", "sfr_acmt"}
    assert set(semisupervised._METHODS) == set(SSL_METHODS)  # every method offered is implemented, and only those
    assert parse_method("sfr") == {"ssl_method": "supervised", "pseudo_labels": "sam"}
    assert parse_method("sfr_acmt") == {"ssl_method": "acmt", "pseudo_labels": "sam"}
    assert parse_method("uamt") == {"ssl_method": "uamt", "pseudo_labels": "none"}
    for bad in ("sfr_supervised", "magic", "sfr_magic", ""):
        with pytest.raises(InputError, match="unknown method"):
            parse_method(bad)


def test_registering_a_method_gives_its_sfr_variant(monkeypatch: pytest.MonkeyPatch) -> None:
    from SFRSegmentLib.base import choices

    monkeypatch.setattr(semisupervised, "_METHODS", dict(semisupervised._METHODS))
    monkeypatch.setattr(semisupervised, "SSL_METHODS", SSL_METHODS + ("entropy_min",))
    assert choices.SSL_METHODS == SSL_METHODS  # the lists the engine offers stay as they are outside this test

    @semisupervised.register_method("entropy_min")
    class EntropyMinimisation(semisupervised.SSLMethod):
        term_names = ("entropy",)

        def losses(self, step: Step):
            p = torch.softmax(step.unlabeled_logits, dim=1)
            return [semisupervised.LossTerm("entropy", normalised_entropy(p).mean(), 0.5)]

    method = build_method("entropy_min", True, FixedLogits(torch.zeros(2, 1, 1, 1)), CONFIG, 10)
    assert method.term_names == ("entropy", "pseudo_label")
    with pytest.raises(ValueError, match="add it there"):
        semisupervised.register_method("sfr_x")


def test_config_rejects_odd_uamt_passes() -> None:
    with pytest.raises(InputError, match="uamt_passes"):
        SSLConfig(uamt_passes=3)
