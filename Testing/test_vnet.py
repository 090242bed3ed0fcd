"""The literature V-Net: the published parameter count, shapes, gradients, dropout, the input-size rule, the no-grad
path and BatchNorm folding."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from SFRSegmentLib.base.config import input_multiples
from SFRSegmentLib.models.vnet import (
    MODEL_FORMAT,
    VNet,
    VNetInfo,
    check_input_shape,
    fold_batchnorm,
    forward_flops,
    load_vnet,
    save_vnet,
    vnet_info_path,
)

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
    [((1, 1, 32, 32, 20), r"multiples of \(16, 16, 16\)"), ((1, 1, 8, 32, 16), r"multiples of \(16, 16, 16\)"),
     ((1, 2, 32, 32, 16), "channel"),
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


def randomised_batchnorm(model: VNet) -> VNet:
    """``model`` with non-trivial BatchNorm affine parameters and running statistics."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model


def test_forward_without_autograd_computes_the_same_numbers() -> None:
    # In place without autograd (skip additions, dropout): the same logits, dropout masks and BatchNorm statistics.
    torch.manual_seed(3)
    model = VNet(n_classes=3, n_filters=4, has_dropout=True).train()
    twin = copy.deepcopy(model)
    x = torch.randn(2, 1, 32, 32, 16)
    torch.manual_seed(4)
    tracked = model(x)
    torch.manual_seed(4)
    with torch.no_grad():
        untracked = twin(x)
    assert tracked.requires_grad and torch.equal(tracked.detach(), untracked)
    for (name, buffer), twin_buffer in zip(model.named_buffers(), twin.buffers()):
        assert torch.equal(buffer, twin_buffer), name
    model.eval()
    evaluated = model(x).detach()
    with torch.inference_mode():
        assert torch.equal(model(x), evaluated)


def test_fold_batchnorm_keeps_the_eval_function() -> None:
    torch.manual_seed(5)
    model = randomised_batchnorm(VNet(n_classes=3, n_filters=4, has_dropout=True).train())
    folded = fold_batchnorm(model)
    assert model.training and sum(isinstance(m, torch.nn.BatchNorm3d) for m in model.modules()) == 29  # untouched
    assert not folded.training and not any(isinstance(m, torch.nn.BatchNorm3d) for m in folded.modules())
    assert len(folded.block_five_up.conv) == 2 and len(folded.block_three.conv) == 6  # (conv, ReLU) per layer
    x = torch.randn(2, 1, 32, 32, 16)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model.eval()(x), rtol=0, atol=1e-5)
    grouped = fold_batchnorm(VNet(n_filters=16, normalization="groupnorm"))
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in grouped.modules()) == 29  # only BatchNorm folds


THICK_SLICES = ((2, 2, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2))


def test_per_axis_downsampling_keeps_a_few_thick_slices() -> None:
    model = VNet(n_classes=4, downsampling=THICK_SLICES).eval()
    assert input_multiples(THICK_SLICES) == (16, 16, 4)
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 48, 8)).shape == (1, 4, 32, 48, 8)
        features = model.encoder(torch.randn(1, 1, 32, 48, 8))
    assert [tuple(f.shape[2:]) for f in features] == [(32, 48, 8), (16, 24, 8), (8, 12, 8), (4, 6, 4), (2, 3, 2)]
    with pytest.raises(ValueError, match=r"multiples of \(16, 16, 4\)"):
        model(torch.zeros(1, 1, 32, 32, 6))
    reference = {k: v.shape for k, v in VNet().state_dict().items()}
    thick = {k: v.shape for k, v in model.state_dict().items()}
    assert thick.keys() == reference.keys()  # the same names; only the stride-1 kernels are thinner
    assert thick["block_one_dw.conv.0.weight"] == (32, 16, 2, 2, 1)
    assert thick["block_eight_up.conv.0.weight"] == (32, 16, 2, 2, 1)
    with pytest.raises(ValueError, match="4 strides"):
        VNet(downsampling=((2, 2, 2),) * 3)


def test_kernels_of_one_along_an_axis_convolve_within_each_slice() -> None:
    torch.manual_seed(0)
    in_plane = ((3, 3, 1),) * 5
    model = VNet(n_classes=3, downsampling=((2, 2, 1),) * 4, conv_kernels=in_plane).eval()
    assert model.block_one.conv[0].weight.shape[2:] == (3, 3, 1)
    assert model.block_nine.conv[0].weight.shape[2:] == (3, 3, 1)  # the decoder stage of a scale: its encoder's
    assert model.conv_kernels == in_plane
    x = torch.randn(1, 1, 32, 32, 5)
    changed = x.clone()
    changed[..., 3] = torch.randn(32, 32)
    with torch.no_grad():
        before, after = model(x), model(changed)
    assert before.shape == (1, 3, 32, 32, 5)
    # Without a kernel or stride across slices, every output slice depends on its own input slice alone.
    assert torch.equal(before[..., [0, 1, 2, 4]], after[..., [0, 1, 2, 4]])
    assert not torch.allclose(before[..., 3], after[..., 3])
    mixed = VNet(n_classes=3, downsampling=((2, 2, 1),) * 4).eval()  # 3×3×3 kernels mix neighbouring slices
    with torch.no_grad():
        assert not torch.allclose(mixed(x)[..., 2], mixed(changed)[..., 2])
    with pytest.raises(ValueError, match="5 kernels"):
        VNet(conv_kernels=((3, 3, 2),) * 5)


def test_forward_flops_counts_the_convolutions_of_the_architecture() -> None:
    reference = forward_flops((32, 32, 16))
    assert forward_flops((32, 32, 32)) == 2 * reference  # every layer's work grows with the voxels
    assert forward_flops((32, 32, 16), n_filters=32) > 3 * reference  # and with the square of the widths
    thin = forward_flops((32, 32, 16), conv_kernels=((3, 3, 1),) * 5)
    assert reference / 3 < thin < reference  # a third of the 3×3×3 convolutions' work, the rest unchanged


def test_the_model_file_keeps_the_strides_and_older_files_read_as_the_reference(tmp_path) -> None:
    window = (-150.0, 250.0, 60.5, 42.25)
    kernels = ((3, 3, 1), (3, 3, 1), (3, 3, 3), (3, 3, 3), (3, 3, 3))
    info = VNetInfo(classes={1: "a", 2: "b"}, patch_size=(32, 32, 8), downsampling=THICK_SLICES,
                    conv_kernels=kernels, intensity_window=window)
    model = info.build_model()
    path = save_vnet(tmp_path / "vnet.pt", model, info)
    loaded, loaded_info = load_vnet(path)
    assert loaded_info.downsampling == THICK_SLICES and loaded.downsampling == THICK_SLICES
    assert loaded_info.conv_kernels == kernels and loaded.block_two.conv[0].weight.shape[2:] == (3, 3, 1)
    assert loaded_info.intensity_window == window
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    record = json.loads(vnet_info_path(path).read_text())
    del record["downsampling"], record["conv_kernels"], record["intensity_window"]  # written before these existed
    old = VNetInfo(classes={1: "a"}, patch_size=(32, 32, 16))
    stored = {"format": MODEL_FORMAT, "info": record | {"classes": {"1": "a"}, "patch_size": [32, 32, 16]},
              "state_dict": old.build_model().state_dict()}
    torch.save(stored, tmp_path / "old.pt")
    old_info = load_vnet(tmp_path / "old.pt")[1]
    assert old_info.downsampling == ((2, 2, 2),) * 4 and old_info.intensity_window is None  # z-scored, as trained
    assert old_info.conv_kernels == ((3, 3, 3),) * 5
