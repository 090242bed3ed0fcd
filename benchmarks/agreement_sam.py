"""Agreement of the engine's attention with segment_anything's own at full scale: one fine-tuning forward and backward
of the same model, the same weights and the same batch, once with ``efficient_attention=False`` (SAM's attention, as
the official code) and once with the engine's (blockwise on CPU). Prints the largest difference of the logits, the
loss and every trainable gradient, each relative to the largest magnitude of the reference.

The tests check the same at the small configuration; this measures it at the paper's shapes (ViT-B, 1024², batch 2;
about 1.5 minutes; the reference model runs first, needs about 17 GB as bench_sam's paper-plain, and is freed
before the second). Weights are
random, with non-zero relative-position tables and LoRA B (SAM initialises both to zero, which would hide them).
Usage::

    .venv/bin/python benchmarks/agreement_sam.py              # paper shapes
    .venv/bin/python benchmarks/agreement_sam.py --scale small
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sam import finetune_config, synthetic_volume  # noqa: E402


def random_state(config, seed: int = 7) -> Dict[str, torch.Tensor]:
    """The model's random initial state with every relative-position table and LoRA B filled with noise."""
    from SFRSegmentLib.stages.finetune import build_base_sam

    state = build_base_sam(config.sam, None, config.seed).state_dict()
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in state.items():
        if ".rel_pos_" in name:
            state[name] = torch.randn(tensor.shape, generator=generator)
        elif name.endswith((".b_q", ".b_v")):
            state[name] = 0.05 * torch.randn(tensor.shape, generator=generator)
    return state


def forward_backward(config, state, images, labels) -> Tuple[torch.Tensor, float, Dict[str, torch.Tensor]]:
    """Logits, loss and trainable gradients of one step of the model ``config`` describes, loaded with ``state``."""
    from SFRSegmentLib.stages.finetune import build_base_sam
    from SFRSegmentLib.stages.losses import SFRLoss

    model = build_base_sam(config.sam, None, config.seed).train()
    model.load_state_dict(state)
    logits = model(images)
    loss = SFRLoss()(logits, labels)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), loss.item(), grads


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=("paper", "small"), default="paper")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from SFRSegmentLib.stages.finetune import MosaicBatches, training_layout

    engine = finetune_config(f"{args.scale}-efficient")
    reference = dataclasses.replace(engine, sam=dataclasses.replace(engine.sam, efficient_attention=False))
    rng = np.random.default_rng(0)
    volume_shape = tuple(s + 32 if i < 2 else s + 8 for i, s in enumerate(engine.patch_size))
    layout = training_layout(engine.patch_size, engine.sam, engine.depth_padding)
    batches = MosaicBatches([synthetic_volume(volume_shape, rng)], layout, engine, torch.device("cpu"))
    images, labels = batches.sample(0, rng)
    state = random_state(engine)

    expected_logits, expected_loss, expected_grads = forward_backward(reference, state, images, labels)
    gc.collect()
    logits, loss, grads = forward_backward(engine, state, images, labels)
    assert grads.keys() == expected_grads.keys()
    # Key biases get a gradient that is zero in exact arithmetic (softmax ignores a constant added to every score):
    # there both sides are rounding noise, so they are compared with the largest gradient of all instead.
    largest = max(float(g.abs().max()) for g in expected_grads.values())
    blind = {name for name, g in expected_grads.items() if float(g.abs().max()) < 1e-4 * largest}
    worst = max(set(expected_grads) - blind,
                key=lambda name: relative_difference(grads[name], expected_grads[name]))
    blind_difference = max((float((grads[n] - expected_grads[n]).abs().max()) for n in blind), default=0.0)
    print(f"scale {args.scale}: images {tuple(images.shape)}, {len(grads)} trainable tensors with gradients")
    print(f"logits: max |difference| / max |reference| = {relative_difference(logits, expected_logits):.2e}")
    print(f"loss: {loss:.8f} vs {expected_loss:.8f} (relative {abs(loss - expected_loss) / abs(expected_loss):.2e})")
    print(f"gradients: worst {worst}: {relative_difference(grads[worst], expected_grads[worst]):.2e}")
    print(f"{len(blind)} tensors with a (near-)zero reference gradient (< 1e-4 of the largest, {largest:.3g}): max "
          f"|difference| = {blind_difference:.2e} = {blind_difference / largest:.2e} of the largest gradient")


if __name__ == "__main__":
    main()
