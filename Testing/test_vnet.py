"""The literature V-Net: the published parameter count, shapes, gradients, dropout and the input-size rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from SFRSegmentLib.vnet import VNet, check_input_shape

SMALL_INPUT = (1, 1, 32, 32, 16)


@pytest.mark.parametrize(
    "normalization, expected",
    [("batchnorm", 9_448_866), ("groupnorm", 9_448_866), ("instancenorm", 9_443_266), ("none", 9_443_266)],
)
def test_parameter_count_matches_the_reference(normalization: str, expected: int) -> None:
    model = VNet(n_channels=1, n_classes=2, normalization=normalization)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_multi_class_head_and_output_shape() -> None:
    torch.manual_seed(0)
    model = VNet(n_classes=4).eval()
    assert sum(p.numel() for p in model.parameters()) == 9_448_866 + 2 * 17  # the 1×1×1 head grows by 16 + 1 each
    with torch.no_grad():
        logits = model(torch.randn(SMALL_INPUT))
    assert logits.shape == (1, 4, 32, 32, 16)
    assert torch.isfinite(logits).all()


def test_state_dict_keys_follow_the_reference_checkpoints() -> None:
    keys = list(VNet().state_dict())
    assert keys[:2] == ["block_one.conv.0.weight", "block_one.conv.0.bias"]
    assert "block_five_up.conv.1.running_mean" in keys  # the transposed conv's BatchNorm
    assert "block_three.conv.6.weight" in keys  # third conv of a 3-conv stage: conv, norm, relu × 3
    assert keys[-2:] == ["out_conv.weight", "out_conv.bias"]


def test_gradient_reaches_every_parameter() -> None:
    torch.manual_seed(1)
    model = VNet(n_classes=3, has_dropout=True).train()
    x = torch.randn(SMALL_INPUT)
    target = torch.randint(0, 3, (1, 32, 32, 16))
    F.cross_entropy(model(x), target).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
    assert model.block_one.conv[0].weight.grad.abs().sum() > 0
    assert model.out_conv.weight.grad.abs().sum() > 0


def test_eval_mode_is_deterministic_and_train_mode_dropout_is_not() -> None:
    torch.manual_seed(2)
    model = VNet(has_dropout=True)
    x = torch.randn(SMALL_INPUT)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))
        model.has_dropout = False  # batch statistics alone are deterministic
        assert torch.equal(model(x), model(x))
    assert model.dropout.p == 0.5


@pytest.mark.parametrize(
    "shape, message",
    [((1, 1, 32, 32, 20), "multiple of 16"), ((1, 1, 8, 32, 16), "multiple of 16"), ((1, 2, 32, 32, 16), "channel"),
     ((1, 32, 32, 16), "batch, channels")],
)
def test_bad_input_shape_is_refused_clearly(shape, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_input_shape(shape, n_channels=1)
    if len(shape) == 5 and shape[1] == 1:
        with pytest.raises(ValueError, match=message):
            VNet()(torch.zeros(shape))


def test_bad_constructor_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="normalization"):
        VNet(normalization="layernorm")
    with pytest.raises(ValueError, match="multiple of 16"):
        VNet(n_filters=8, normalization="groupnorm")
