"""The SAM fine-tuning loss of SFR: L = ½(CE + Dice) on the class logits of a mosaic (method docs/sfr-method.md §2, Eq. 5).

Both terms see the mosaic's label, in which gutters and empty tiles carry :data:`~SFRSegmentLib.models.sam.stitching.IGNORE_LABEL`
(255):

* **CE** is ``cross_entropy(..., ignore_index=255)``: the mean over the slice pixels only.
* **Dice** is the official multi-class soft Dice: softmax probabilities p against one-hot labels g, per class
  ``1 − (2·Σ p·g + ε) / (Σ p² + Σ g² + ε)`` with ε = 1e-10, the sums running over the whole batch and all pixels,
  then the mean over the K+1 classes (background included). It is MONAI's ``DiceLoss`` with ``squared_pred``,
  ``batch`` and ``smooth_nr = smooth_dr = 1e-10``.

What the Dice does with the 255 pixels is a choice:

* default (``dice_counts_ignored=False``, our choice): they are left out, as CE leaves them out, so that the loss
  depends only on the voxels of the patch and not on how much of the canvas the gutters and empty tiles fill;
* ``dice_counts_ignored=True`` reproduces the official code: a 255 pixel is one-hot encoded as "no class", so every
  probability predicted there counts as a false positive of its class (docs/sfr-method.md §8.5, item 11).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

from ..base.distributed import gather_batch
from ..models.sam.stitching import IGNORE_LABEL

DICE_SMOOTH = 1e-10
"""ε of the official soft Dice, in numerator and denominator."""


class SFRLoss(nn.Module):
    """½(CE + soft Dice) of class logits (B, K+1, S, S) against labels (B, S, S) holding 0..K and 255 (ignored)."""

    def __init__(self, dice_counts_ignored: bool = False) -> None:
        super().__init__()
        self.dice_counts_ignored = dice_counts_ignored
        self.dice = DiceLoss(include_background=True, squared_pred=True, batch=True, smooth_nr=DICE_SMOOTH,
                             smooth_dr=DICE_SMOOTH)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = logits.float()  # under bf16 autocast the loss is still computed in float32
        if labels.shape != logits.shape[:1] + logits.shape[2:]:
            raise ValueError(f"labels of shape {tuple(labels.shape)} do not match logits {tuple(logits.shape)}")
        classes = torch.arange(logits.shape[1], device=labels.device).view(1, -1, *([1] * (labels.dim() - 1)))
        one_hot = (labels.unsqueeze(1) == classes).to(logits.dtype)  # all zeros where the label is 255
        probabilities = torch.softmax(logits, dim=1)
        if not self.dice_counts_ignored:
            probabilities = probabilities * (labels != IGNORE_LABEL).unsqueeze(1).to(logits.dtype)
        cross_entropy = F.cross_entropy(logits, labels, ignore_index=IGNORE_LABEL)
        # Under torchrun the Dice sums run over the global batch; each rank's slice has as many counted pixels, so
        # DDP's average of the per-rank CE means is the global one.
        dice = self.dice(gather_batch(probabilities), gather_batch(one_hot))
        return 0.5 * (cross_entropy + dice)
