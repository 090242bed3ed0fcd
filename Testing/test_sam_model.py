"""SFR's SAM: architecture and parameter count, LoRA and freezing, checkpoint loading, fast attention paths."""

from __future__ import annotations

import copy
import io
import math
from typing import Dict

import pytest
import torch
import torch.nn.functional as F

from SFRSegmentLib.base.config import SamConfig
from SFRSegmentLib.base.errors import InputError
from SFRSegmentLib.models.sam import attention as attention_module
from SFRSegmentLib.models.sam.attention import (
    CheckpointedBlock,
    EfficientAttention,
    SamAttention,
    blockwise_rel_pos_attention,
    install_efficient_attention,
)
from SFRSegmentLib.models.sam.lora import LoRAQKV, load_trainable_state_dict, merge_lora, trainable_state_dict
from SFRSegmentLib.models.sam.model import SFRSam, build_sfr_sam
from SFRSegmentLib.models.sam.segment_anything_import import load_segment_anything

SMALL = SamConfig.small()


def small_model(**overrides) -> SFRSam:
    torch.manual_seed(0)
    return build_sfr_sam(SamConfig(**{**SMALL.__dict__, **overrides}))


def images(batch: int = 2, channels: int = 1, size: int = SMALL.image_size, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def randomise_lora(model: SFRSam, seed: int = 2) -> None:
    """Give every LoRA B a non-zero value, so that the bypass actually changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRAQKV):
                module.b_q.copy_(0.05 * torch.randn(module.b_q.shape, generator=generator))
                module.b_v.copy_(0.05 * torch.randn(module.b_v.shape, generator=generator))


def randomise_rel_pos(module: torch.nn.Module, seed: int = 4) -> None:
    """Give every relative-position table a non-zero value (SAM initialises them to zero, which hides the bias)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for attention in module.modules():
            if isinstance(attention, SamAttention) and attention.use_rel_pos:
                attention.rel_pos_h.copy_(torch.randn(attention.rel_pos_h.shape, generator=generator))
                attention.rel_pos_w.copy_(torch.randn(attention.rel_pos_w.shape, generator=generator))


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, name: str = "") -> None:
    """Equal up to float32 rounding: every element within 1e-5 of the largest magnitude in ``expected``."""
    tolerance = 1e-5 * float(expected.abs().max()) + 1e-8
    difference = float((actual - expected).abs().max())
    assert actual.shape == expected.shape and difference <= tolerance, f"{name}: {difference} > {tolerance}"


def trainable_names(model: SFRSam) -> set:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


# --- parameter count ------------------------------------------------------------------------------------------------

def linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def conv(n_in: int, n_out: int, kernel: int) -> int:
    return n_in * n_out * kernel * kernel + n_out


def mlp3(n_in: int, hidden: int, n_out: int) -> int:
    return linear(n_in, hidden) + linear(hidden, hidden) + linear(hidden, n_out)


def test_paper_vit_b_binary_trainable_parameter_count_matches_spec():
    dim, rank, blocks, width = 768, 4, 12, 256  # ViT-B, LoRA rank, encoder blocks, decoder width
    masks = 2  # K+1 for binary segmentation
    lora = blocks * 2 * (dim * rank + rank * dim)  # q and v: A (r×d) and B (d×r)
    assert lora == 147_456
    prompt_encoder = (
        4 * width + width + width  # 4 point embeddings, not-a-point, no-mask
        + conv(1, 4, 2) + 2 * 4 + conv(4, 16, 2) + 2 * 16 + conv(16, width, 1)  # mask downscaling with 2 LayerNorm2d
    )
    assert prompt_encoder == 6_220
    attention = 4 * linear(width, width)  # q, k, v, out projections
    downsampled_attention = 3 * linear(width, width // 2) + linear(width // 2, width)
    two_way_block = attention + 2 * downsampled_attention + linear(width, 2048) + linear(2048, width) + 4 * 2 * width
    transformer = 2 * two_way_block + downsampled_attention + 2 * width  # + final attention and LayerNorm
    mask_decoder = (
        width + masks * width  # IoU token, mask tokens
        + conv(width, width // 4, 2) + 2 * (width // 4) + conv(width // 4, width // 8, 2)  # output upscaling
        + masks * mlp3(width, width, width // 8)  # hypernetwork MLPs
        + mlp3(width, 256, masks)  # IoU head
        + transformer
    )
    assert mask_decoder == 3_777_698

    model = build_sfr_sam(SamConfig.paper(num_classes=1))
    counted = {
        "lora": sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ".qkv." in n),
        "prompt_encoder": sum(p.numel() for p in model.prompt_encoder.parameters() if p.requires_grad),
        "mask_decoder": sum(p.numel() for p in model.mask_decoder.parameters() if p.requires_grad),
        "all": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    assert counted == {
        "lora": lora,
        "prompt_encoder": prompt_encoder,
        "mask_decoder": mask_decoder,
        "all": lora + prompt_encoder + mask_decoder,
    }
    assert counted["all"] == 3_931_374  # docs/sfr-method.md §2: ≈ 3.93M


def test_only_lora_prompt_encoder_and_mask_decoder_are_trainable():
    model = small_model()
    for name, parameter in model.named_parameters():
        is_lora = name.rsplit(".", 1)[-1] in LoRAQKV.LORA_PARAMETERS
        assert parameter.requires_grad == (is_lora or name.startswith(("prompt_encoder.", "mask_decoder."))), name
    assert sum(isinstance(m, LoRAQKV) for m in model.modules()) == SMALL.encoder_depth


# --- LoRA -----------------------------------------------------------------------------------------------------------

def test_lora_qkv_adds_low_rank_bypass_to_q_and_v_only():
    torch.manual_seed(0)
    dim, rank = 12, 4
    base = torch.nn.Linear(dim, 3 * dim)
    lora = LoRAQKV(copy.deepcopy(base), rank)
    assert torch.equal(lora.b_q, torch.zeros(dim, rank)) and torch.equal(lora.b_v, torch.zeros(dim, rank))
    bound = 1 / math.sqrt(dim)  # Kaiming-uniform with a = √5: U(-1/√fan_in, 1/√fan_in)
    assert lora.a_q.abs().max() <= bound and lora.a_v.abs().max() <= bound
    x = torch.randn(5, dim)
    assert torch.equal(lora(x), base(x))  # B = 0: exactly SAM
    with torch.no_grad():
        lora.b_q.normal_()
        lora.b_v.normal_()
    expected = base(x)
    expected[:, :dim] += x @ lora.a_q.T @ lora.b_q.T
    expected[:, 2 * dim:] += x @ lora.a_v.T @ lora.b_v.T
    out = lora(x)
    torch.testing.assert_close(out, expected)
    assert torch.equal(out[:, dim:2 * dim], base(x)[:, dim:2 * dim])  # k untouched


def test_optimizer_step_changes_lora_and_decoder_but_not_frozen_weights():
    model = small_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1)
    logits = model(images())
    target = torch.randint(0, SMALL.num_masks, (2, SMALL.image_size, SMALL.image_size))
    F.cross_entropy(logits, target).backward()
    optimizer.step()
    after = dict(model.named_parameters())
    for name, parameter in after.items():
        if not parameter.requires_grad:
            assert torch.equal(parameter, before[name]), f"frozen {name} changed"
    for name in ("image_encoder.blocks.0.attn.qkv.b_q", "image_encoder.blocks.1.attn.qkv.b_v",
                 "mask_decoder.output_upscaling.0.weight", "mask_decoder.output_hypernetworks_mlps.1.layers.0.weight",
                 "mask_decoder.transformer.layers.0.self_attn.q_proj.weight"):
        assert not torch.equal(after[name], before[name]), f"trainable {name} did not change"


def test_merged_model_gives_the_lora_model_outputs_with_plain_sam_layout():
    model = small_model()
    randomise_lora(model)
    merged = merge_lora(model)
    assert not any(isinstance(m, LoRAQKV) for m in merged.modules())
    assert any(isinstance(m, LoRAQKV) for m in model.modules())  # the original is untouched
    assert "image_encoder.blocks.0.attn.qkv.weight" in merged.state_dict()
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model(x), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(model(x), small_model()(x), atol=1e-3)  # the LoRA bypass mattered


# --- checkpoint loading ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def official_state_dict() -> Dict[str, torch.Tensor]:
    """An 'official' SAM state dict from segment_anything's own builder: 1024² input (64×64 tokens), 3 blocks of
    width 192 with block 1 global, 3+1 mask tokens. The position embedding is made linear in the token grid and the
    global rel-pos tables constant, so that their resized values are known."""
    _, build_sam = load_segment_anything()
    torch.manual_seed(3)
    sam = build_sam._build_sam(encoder_embed_dim=192, encoder_depth=3, encoder_num_heads=3,
                               encoder_global_attn_indexes=[1])
    state = {key: value.clone() for key, value in sam.state_dict().items()}
    rows = torch.arange(64.0).view(1, 64, 1, 1)
    cols = torch.arange(64.0).view(1, 1, 64, 1)
    channel = torch.arange(192.0).view(1, 1, 1, 192)
    state["image_encoder.pos_embed"] = 0.01 * channel + 0.5 * rows - 0.25 * cols
    state["image_encoder.blocks.1.attn.rel_pos_h"] = torch.full((127, 64), 0.3)
    state["image_encoder.blocks.1.attn.rel_pos_w"] = torch.full((127, 64), -0.7)
    return state


def test_checkpoint_at_1024_loads_into_a_256_model(official_state_dict):
    torch.manual_seed(4)
    model = build_sfr_sam(SMALL, official_state_dict)
    loaded = merge_lora(model).state_dict()  # B = 0, so merging gives back the loaded qkv weights under SAM's keys

    pos_embed = loaded["image_encoder.pos_embed"]
    assert pos_embed.shape == (1, 16, 16, 192)
    source = 4 * torch.arange(16.0) + 1.5  # bicubic, align_corners=False: token i of 16 samples source 4i + 1.5
    expected = 0.01 * torch.arange(192.0).view(1, 1, 1, 192) + 0.5 * source.view(1, 16, 1, 1) \
        - 0.25 * source.view(1, 1, 16, 1)
    torch.testing.assert_close(pos_embed, expected)  # a linear embedding stays linear

    assert loaded["image_encoder.blocks.1.attn.rel_pos_h"].shape == (31, 64)  # global: 2·16 − 1
    torch.testing.assert_close(loaded["image_encoder.blocks.1.attn.rel_pos_h"], torch.full((31, 64), 0.3))
    torch.testing.assert_close(loaded["image_encoder.blocks.1.attn.rel_pos_w"], torch.full((31, 64), -0.7))
    assert loaded["image_encoder.blocks.0.attn.rel_pos_h"].shape == (27, 64)  # windowed: 2·14 − 1, unchanged

    reinitialised = ("mask_decoder.mask_tokens.", "mask_decoder.output_hypernetworks_mlps.",
                     "mask_decoder.iou_prediction_head.")
    resized = ("image_encoder.pos_embed", "image_encoder.blocks.1.attn.rel_pos_h",
               "image_encoder.blocks.1.attn.rel_pos_w")
    assert "image_encoder.blocks.2.norm1.weight" not in loaded  # depth 2 takes the first two of three blocks
    for key, value in loaded.items():
        if key.startswith(reinitialised):
            official = official_state_dict[key]
            same_part = official[tuple(slice(0, n) for n in value.shape)]
            assert not torch.equal(value, same_part), f"{key} was loaded, not re-initialised"
        elif key not in resized:
            assert torch.equal(value, official_state_dict[key]), f"{key} not loaded"
    assert loaded["mask_decoder.mask_tokens.weight"].shape == (2, 256)


def test_checkpoint_that_does_not_fit_names_the_bad_keys(official_state_dict):
    extra = {**official_state_dict, "image_encoder.something_else": torch.zeros(1)}
    with pytest.raises(InputError, match="unexpected.*image_encoder.something_else"):
        build_sfr_sam(SMALL, extra)
    missing = {k: v for k, v in official_state_dict.items() if k != "image_encoder.neck.0.weight"}
    with pytest.raises(InputError, match="missing.*image_encoder.neck.0.weight"):
        build_sfr_sam(SMALL, missing)
    with pytest.raises(InputError, match="wrongly shaped key.*blocks.0.attn.proj"):
        build_sfr_sam(SamConfig(**{**SMALL.__dict__, "embed_dim": 96}), official_state_dict)


# --- forward --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_classes", [1, 3])
def test_forward_gives_k_plus_one_full_size_logits(num_classes):
    model = small_model(num_classes=num_classes)
    with torch.no_grad():
        grey = images(batch=2, channels=1)
        logits = model(grey)
        assert logits.shape == (2, num_classes + 1, 256, 256)
        assert model.forward_low_res(grey).shape == (2, num_classes + 1, 64, 64)
        torch.testing.assert_close(model(grey.repeat(1, 3, 1, 1)), logits)  # 1 channel = replicated to 3


def test_batch_gives_the_per_image_results():
    model = small_model()
    randomise_lora(model)
    x = images(batch=2)
    with torch.no_grad():
        together = model(x)
        torch.testing.assert_close(together, torch.cat([model(x[:1]), model(x[1:])]), rtol=1e-4, atol=1e-5)


def test_forward_rejects_wrong_input_shape():
    model = small_model()
    with pytest.raises(ValueError, match="expected images of shape"):
        model(images(size=128))
    with pytest.raises(ValueError, match="expected images of shape"):
        model(images(channels=2))


# --- efficient attention and gradient checkpointing -----------------------------------------------------------------

@pytest.mark.parametrize("kernel", ["blockwise", "folded-sdpa"])
@pytest.mark.parametrize("block_index,grid", [(0, 14), (1, 16)], ids=["windowed", "global"])
def test_efficient_attention_equals_sam_attention(block_index, grid, kernel, monkeypatch):
    # On CPU the blockwise kernel is the default; the folded SDPA (used on CUDA and under autocast) is forced here.
    monkeypatch.setattr(attention_module, "_blockwise_applies", lambda q: kernel == "blockwise")
    model = small_model(efficient_attention=False)
    reference = model.image_encoder.blocks[block_index].attn
    assert type(reference) is SamAttention and reference.rel_pos_h.shape[0] == 2 * grid - 1
    randomise_rel_pos(reference, seed=5)  # non-zero tables and a non-zero LoRA
    randomise_lora(model)
    generator = torch.Generator().manual_seed(5)
    reference.requires_grad_(True)
    efficient = copy.deepcopy(reference)
    install_efficient_attention(efficient)
    assert type(efficient) is EfficientAttention

    x = torch.randn(3, grid, grid, SMALL.encoder_embed_dim, generator=generator)
    results = []
    for attention in (reference, efficient):
        x_leaf = x.clone().requires_grad_(True)
        out = attention(x_leaf)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads = {name: p.grad for name, p in attention.named_parameters()}
        results.append((out.detach(), x_leaf.grad, grads))
    (out_ref, dx_ref, grads_ref), (out_eff, dx_eff, grads_eff) = results
    assert_close_to_scale(out_eff, out_ref)
    assert_close_to_scale(dx_eff, dx_ref)
    assert grads_eff.keys() == grads_ref.keys() and "rel_pos_h" in grads_ref and "qkv.b_q" in grads_ref
    for name in grads_ref:
        assert_close_to_scale(grads_eff[name], grads_ref[name], name)


def explicit_rel_pos_attention(q, k, v, rel_h, rel_w, scale):
    """The attention written out as SAM writes it: the whole (N, N) score matrix plus the broadcast bias."""
    rows, tokens, height, width = q.shape[0], q.shape[1], rel_h.shape[-1], rel_w.shape[-1]
    scores = (scale * q @ k.transpose(1, 2)).view(rows, tokens, height, width)
    scores = scores + rel_h[..., :, None] + rel_w[..., None, :]
    return scores.view(rows, tokens, tokens).softmax(-1) @ v


@pytest.mark.parametrize("block_elements", [1 << 22, 1400, 3200], ids=["one-block", "ragged-queries", "ragged-rows"])
def test_blockwise_attention_matches_explicit_attention_in_value_and_gradient(block_elements, monkeypatch):
    # 3 rows of 40 tokens: one block; blocks of 1 row × 35 queries (40 = 35 + 5); blocks of 2 rows × 40 queries
    # (3 = 2 + 1). gradcheck in float64 checks the hand-written backward against finite differences
    # for all five inputs.
    monkeypatch.setattr(attention_module, "SCORE_BLOCK_ELEMENTS", block_elements)
    generator = torch.Generator().manual_seed(3)
    rows, height, width, head_dim = 3, 4, 10, 2
    tokens = height * width

    def leaf(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_(True)

    inputs = (leaf(rows, tokens, head_dim), leaf(rows, tokens, head_dim), leaf(rows, tokens, head_dim + 1),
              leaf(rows, tokens, height), leaf(rows, tokens, width))
    blocks = list(attention_module._score_blocks(rows, tokens))
    covered = torch.zeros(rows, tokens, dtype=torch.int64)
    for block_rows, block_queries in blocks:
        covered[block_rows, block_queries] += 1
    assert bool((covered == 1).all())
    torch.testing.assert_close(blockwise_rel_pos_attention(*inputs, 0.3), explicit_rel_pos_attention(*inputs, 0.3),
                               rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *tensors: blockwise_rel_pos_attention(*tensors, 0.3), inputs)


def test_efficient_attention_model_equals_reference_model():
    reference = small_model(efficient_attention=False)
    efficient = small_model(efficient_attention=True)
    assert all(type(b.attn) is EfficientAttention for b in efficient.image_encoder.blocks)
    randomise_lora(reference)
    randomise_rel_pos(reference)
    efficient.load_state_dict(reference.state_dict())
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(efficient(x), reference(x), rtol=1e-4, atol=1e-5)


def test_efficient_attention_under_bf16_autocast_stays_close_to_float32():
    # Under CPU autocast the folded-SDPA kernel runs (bf16 matmuls); the result must still be SAM's function (with
    # the bias dropped from the global blocks, the relative error here is about 0.26; with it, about 0.01).
    reference = small_model(efficient_attention=False)
    efficient = small_model(efficient_attention=True)
    randomise_lora(reference)
    randomise_rel_pos(reference)
    efficient.load_state_dict(reference.state_dict())
    x = images()
    with torch.no_grad():
        expected = reference(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = efficient(x)
    assert fast.shape == expected.shape
    relative = float((fast.float() - expected).norm() / expected.norm())
    assert relative < 0.05, relative


def trainable_grads(model: SFRSam, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Gradients of a fixed linear function of the logits. The prompt-encoder parts for points, boxes and masks get
    none (SFR gives no prompts), nor does the IoU head (its prediction is not used)."""
    model.zero_grad()
    logits = model(x)
    (logits * torch.linspace(-1, 1, logits.numel()).view_as(logits)).sum().backward()
    unused = ("prompt_encoder.point_embeddings.", "prompt_encoder.not_a_point_embed.",
              "prompt_encoder.mask_downscaling.", "mask_decoder.iou_prediction_head.")
    for name, parameter in model.named_parameters():
        assert (parameter.grad is None) == (not parameter.requires_grad or name.startswith(unused)), name
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_gradients():
    plain = small_model(gradient_checkpointing=False)
    randomise_lora(plain)
    checkpointed = small_model(gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    assert all(type(b) is CheckpointedBlock for b in checkpointed.image_encoder.blocks)
    x = images()
    expected, actual = trainable_grads(plain, x), trainable_grads(checkpointed, x)
    assert expected.keys() == actual.keys()
    assert expected["image_encoder.blocks.0.attn.qkv.a_q"].abs().sum() > 0
    for name in expected:
        assert_close_to_scale(actual[name], expected[name], name)


# --- saving the fine-tuned weights ----------------------------------------------------------------------------------

def test_trainable_state_dict_roundtrip_gives_identical_outputs():
    tuned = small_model()
    randomise_lora(tuned)
    with torch.no_grad():
        tuned.mask_decoder.mask_tokens.weight.add_(1.0)
        tuned.prompt_encoder.no_mask_embed.weight.mul_(-2.0)
    saved = trainable_state_dict(tuned)
    assert set(saved) == trainable_names(tuned) | {"prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"}
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)

    fresh = small_model()  # same frozen weights (same seed), untuned LoRA and heads
    x = images()
    with torch.no_grad():
        assert not torch.allclose(fresh(x), tuned(x))
        load_trainable_state_dict(fresh, torch.load(buffer))
        assert torch.equal(fresh(x), tuned(x))


def test_trainable_state_dict_for_another_model_is_rejected():
    saved = trainable_state_dict(small_model(num_classes=3))
    with pytest.raises(InputError, match="wrongly shaped.*mask_tokens"):
        load_trainable_state_dict(small_model(num_classes=1), saved)
    with pytest.raises(InputError, match="missing.*b_v"):
        load_trainable_state_dict(small_model(), {k: v for k, v in trainable_state_dict(small_model()).items()
                                                  if not k.endswith("b_v")})


# --- configuration --------------------------------------------------------------------------------------------------

def test_config_presets_and_validation():
    paper = SamConfig.paper()
    assert (paper.encoder_embed_dim, paper.encoder_depth, paper.encoder_num_heads) == (768, 12, 12)
    assert paper.encoder_global_attn_indexes == (2, 5, 8, 11) and paper.token_grid == 64
    assert paper.lora_rank == 4 and paper.num_masks == 2 and paper.efficient_attention
    assert SamConfig(arch="vit_h").encoder_global_attn_indexes == (7, 15, 23, 31)
    assert SamConfig(depth=6).encoder_global_attn_indexes == (2, 5)
    assert (SMALL.image_size, SMALL.encoder_depth, SMALL.encoder_embed_dim, SMALL.encoder_num_heads) == (256, 2, 192, 3)
    with pytest.raises(InputError, match="arch"):
        SamConfig(arch="vit_x")
    with pytest.raises(InputError, match="image_size"):
        SamConfig(image_size=1000)
    with pytest.raises(InputError, match="global_attn_indexes"):
        SamConfig(depth=2, global_attn_indexes=(2,))
