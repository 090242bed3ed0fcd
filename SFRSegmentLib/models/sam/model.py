"""SAM as SFR fine-tunes it (method docs/sfr-method.md §1.2, §2): LoRA ViT encoder, no prompts, K+1 class-wise masks.

:func:`build_sfr_sam` assembles segment_anything's own ``ImageEncoderViT``, ``PromptEncoder``, ``MaskDecoder`` and
``TwoWayTransformer`` the way ``build_sam`` does, with three SFR changes:

* pixel_mean 0 and pixel_std 1: SAM's ImageNet normalisation is disabled, the input is the mosaic scaled as the
  encoder expects (z-scores for the ViTs; [0, 1] for LiteMedSAM, ``SamConfig.input_scaling``);
* the mask decoder has K+1 mask tokens (background + K foreground classes) and all K+1 masks are returned;
* LoRA (rank 4) on q and v of every encoder block; the rest of the encoder is frozen, the prompt encoder and mask
  decoder are trained.

An official SAM checkpoint is loaded strictly, except for the heads that SFR re-initialises (mask tokens, output
hypernetwork MLPs, IoU head). A checkpoint made for another image size is adapted: the absolute position embedding
is resized bicubically on the token grid and the relative-position tables of the global-attention blocks are
resized linearly to 2·tokens−1 (the windowed blocks keep 2·14−1). A checkpoint with more encoder blocks than the
config asks for gives its first blocks; that is for small test and CPU configurations, not a pretrained model in
its own right.

``arch = "tiny_vit"`` builds LiteMedSAM instead: its TinyViT encoder (:mod:`SFRSegmentLib.models.sam.tiny_vit`, LoRA on
q and v of its attention blocks) with SAM's prompt encoder and mask decoder at a 1/4 embedding grid. Its checkpoint
is loaded strictly, but for the same re-initialised heads; it is not resized.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...base.config import TINY_VIT, SamConfig
from ...base.errors import InputError
from .attention import install_efficient_attention, install_gradient_checkpointing
from .lora import apply_lora, describe_mismatch
from .segment_anything_import import load_segment_anything
from .tiny_vit import TinyViTEncoder

_modeling, _ = load_segment_anything()

# Fixed parts of SAM's architecture (segment_anything.build_sam); the official checkpoints depend on them.
PROMPT_EMBED_DIM = 256
MASK_IN_CHANS = 16
DECODER_DEPTH = 2
DECODER_MLP_DIM = 2048
DECODER_HEADS = 8
IOU_HEAD_DEPTH = 3
IOU_HEAD_HIDDEN_DIM = 256

# Checkpoint entries that SFR does not load but re-initialises (their shapes depend on K anyway).
REINITIALISED_PREFIXES: Tuple[str, ...] = (
    "mask_decoder.mask_tokens.",
    "mask_decoder.output_hypernetworks_mlps.",
    "mask_decoder.iou_prediction_head.",
)
_BLOCK_KEY = re.compile(r"^image_encoder\.blocks\.(\d+)\.")


class SFRSam(_modeling.Sam):
    """SAM with SFR's tensor-in, logits-out forward: no prompts, all K+1 class masks.

    The parameter layout is ``Sam``'s (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``). The
    pixel_mean/pixel_std buffers are 0 and 1, so SAM's input normalisation is the identity and is not applied.
    """

    def __init__(self, image_encoder: nn.Module, prompt_encoder: nn.Module, mask_decoder: nn.Module,
                 config: SamConfig) -> None:
        super().__init__(image_encoder, prompt_encoder, mask_decoder, pixel_mean=[0.0, 0.0, 0.0],
                         pixel_std=[1.0, 1.0, 1.0])
        self.config = config

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (B, K+1, S, S) for images (B, 3, S, S), or (B, 1, S, S) which is replicated to 3 channels."""
        low_res = self.forward_low_res(images)
        return F.interpolate(low_res, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def forward_low_res(self, images: torch.Tensor) -> torch.Tensor:
        """The mask decoder's class logits (B, K+1, S/4, S/4), before upsampling."""
        embeddings = self.image_encoder(self._three_channels(images))
        # No prompts: empty sparse tokens and the learned no-mask dense embedding, with batch size 1. The decoder
        # broadcasts them over the B image embeddings (it repeats images once per prompt set, i.e. once).
        sparse, dense = self.prompt_encoder(points=None, boxes=None, masks=None)
        logits, _ = self.mask_decoder.predict_masks(
            image_embeddings=embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
        )
        return logits

    def _three_channels(self, images: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if images.dim() != 4 or images.shape[1] not in (1, 3) or tuple(images.shape[-2:]) != (size, size):
            raise ValueError(f"expected images of shape (B, 1 or 3, {size}, {size}), got {tuple(images.shape)}")
        return images.expand(-1, 3, -1, -1)


def build_sfr_sam(config: SamConfig = SamConfig(),
                  checkpoint_state_dict: Optional[Mapping[str, torch.Tensor]] = None) -> SFRSam:
    """SFR's SAM: built from segment_anything's classes, optionally loaded from an official SAM state dict, then
    given LoRA on q and v with the encoder frozen (see the module docstring for the loading rules)."""
    model = SFRSam(_image_encoder(config), _prompt_encoder(config), _mask_decoder(config), config)
    if checkpoint_state_dict is not None:
        load_sam_checkpoint(model, checkpoint_state_dict)
    apply_lora(model.image_encoder, config.lora_rank)
    if config.arch == TINY_VIT:  # its attention is already SDPA over small windows; checkpointing is built in
        return model
    if config.efficient_attention:
        install_efficient_attention(model.image_encoder)
    if config.gradient_checkpointing:
        install_gradient_checkpointing(model.image_encoder)
    return model


def load_sam_checkpoint(model: SFRSam, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load an official SAM state dict into a model without LoRA yet, adapting it to the model's size.

    Raises :class:`InputError` listing missing, unexpected and wrongly shaped keys if it does not fit.
    """
    adapted = adapt_sam_state_dict(model, state_dict)
    expected = {key: value for key, value in model.state_dict().items() if not key.startswith(REINITIALISED_PREFIXES)}
    problems = describe_mismatch(expected, adapted)
    if problems:
        raise InputError(f"SAM checkpoint does not fit a {model.config.arch} SFR model: {problems}",
                         field="checkpoint")
    model.load_state_dict(adapted, strict=False)


def adapt_sam_state_dict(model: SFRSam, state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The checkpoint entries to load into ``model``: re-initialised heads and blocks past its depth dropped,
    position embedding and global rel-pos tables resized to its token grid."""
    if model.config.arch == TINY_VIT:
        return {key: value for key, value in state_dict.items() if not key.startswith(REINITIALISED_PREFIXES)}
    depth = model.config.encoder_depth
    adapted = {
        key: value
        for key, value in state_dict.items()
        if not key.startswith(REINITIALISED_PREFIXES) and _block_index(key) < depth
    }
    target = model.state_dict()
    pos_key = "image_encoder.pos_embed"
    if pos_key in adapted and _differs_in_grid_only(adapted[pos_key], target[pos_key]):
        adapted[pos_key] = resize_pos_embed(adapted[pos_key], model.config.token_grid)
    for index, block in enumerate(model.image_encoder.blocks):
        if block.window_size != 0:
            continue
        for axis in ("h", "w"):
            key = f"image_encoder.blocks.{index}.attn.rel_pos_{axis}"
            if key in adapted and _differs_in_grid_only(adapted[key], target[key]):
                adapted[key] = resize_rel_pos(adapted[key], target[key].shape[0])
    return adapted


def resize_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """An absolute position embedding (1, g, g, C) resized bicubically to (1, grid, grid, C)."""
    channels_first = pos_embed.float().permute(0, 3, 1, 2)
    resized = F.interpolate(channels_first, size=(grid, grid), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).to(pos_embed.dtype).contiguous()


def resize_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """A relative-position table (L, head_dim) resized linearly to (length, head_dim), as SAM's ``get_rel_pos``."""
    resized = F.interpolate(table.float().t()[None], size=length, mode="linear", align_corners=False)
    return resized[0].t().to(table.dtype).contiguous()


def _differs_in_grid_only(checkpoint_value: torch.Tensor, model_value: torch.Tensor) -> bool:
    """Same rank and channel count but another grid extent: a different image size, which resizing fixes."""
    return (
        checkpoint_value.dim() == model_value.dim()
        and checkpoint_value.shape[-1] == model_value.shape[-1]
        and checkpoint_value.shape != model_value.shape
    )


def _block_index(key: str) -> int:
    """The encoder block a key belongs to, or -1 for keys outside the encoder blocks."""
    match = _BLOCK_KEY.match(key)
    return int(match.group(1)) if match else -1


def _image_encoder(config: SamConfig) -> nn.Module:
    if config.arch == TINY_VIT:
        return TinyViTEncoder(gradient_checkpointing=config.gradient_checkpointing)
    return _modeling.ImageEncoderViT(
        depth=config.encoder_depth,
        embed_dim=config.encoder_embed_dim,
        img_size=config.image_size,
        mlp_ratio=4,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_heads=config.encoder_num_heads,
        patch_size=config.token_size,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=config.encoder_global_attn_indexes,
        window_size=config.window_size,
        out_chans=PROMPT_EMBED_DIM,
    )


def _prompt_encoder(config: SamConfig) -> nn.Module:
    return _modeling.PromptEncoder(
        embed_dim=PROMPT_EMBED_DIM,
        image_embedding_size=(config.token_grid, config.token_grid),
        input_image_size=(config.image_size, config.image_size),
        mask_in_chans=MASK_IN_CHANS,
    )


def _mask_decoder(config: SamConfig) -> nn.Module:
    return _modeling.MaskDecoder(
        num_multimask_outputs=config.num_classes,  # SAM adds one token: K+1 mask tokens
        transformer=_modeling.TwoWayTransformer(
            depth=DECODER_DEPTH,
            embedding_dim=PROMPT_EMBED_DIM,
            mlp_dim=DECODER_MLP_DIM,
            num_heads=DECODER_HEADS,
        ),
        transformer_dim=PROMPT_EMBED_DIM,
        iou_head_depth=IOU_HEAD_DEPTH,
        iou_head_hidden_dim=IOU_HEAD_HIDDEN_DIM,
    )
