"""The built-in demo (``python -m SFRSegmentLib demo``): the engine foundation on synthetic and, if present, LA data.

It writes a synthetic cohort, reports which cases are labeled, writes SAM mosaics with their labels overlaid and
runs the real ``segment_anything`` model classes (small CPU configuration, LoRA applied) on a stitched patch,
checking that un-stitching the output gives back the patch's shape. The full SFR pipeline replaces this demo once
fine-tuning and re-training land.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import numpy as np

from .data import load_case
from .preview import central_patch, write_stitch_preview
from .stitching import mosaic_layout, stitch_image, unstitch
from .synthetic import make_synthetic_cohort

LA_ENV = "SFRSEGMENT_LA_DIR"
SMALL_PATCH = (64, 64, 16)


def find_la_cases() -> Optional[Path]:
    """The LA sample cases: ``$SFRSEGMENT_LA_DIR``, else ``../shared/data/LA`` beside the repository."""
    candidates = [Path(os.environ[LA_ENV])] if LA_ENV in os.environ else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data" / "LA")
    return next((c for c in candidates if c.is_dir()), None)


def run_demo(out: Path) -> None:
    """Run the foundation demo into ``out``; prints what it wrote."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    cohort = make_synthetic_cohort(out / "synthetic", n_cases=6, n_labeled=2, n_classes=2, seed=0)
    print(cohort.summary())

    case = cohort.labeled[0]
    synthetic_png = write_stitch_preview(case.image, out / "synthetic_mosaic.png", label_path=case.label,
                                         patch=SMALL_PATCH, canvas=256)
    print(f"synthetic mosaic ({case.name}, patch {SMALL_PATCH}, 4x4 grid in 256²): {synthetic_png}")

    la_root = find_la_cases()
    if la_root is not None:
        la_case = sorted(p for p in la_root.iterdir() if (p / "image.nrrd").is_file())[0]
        la_png = write_stitch_preview(la_case / "image.nrrd", out / "la_mosaic.png",
                                      label_path=la_case / "label.nrrd")
        print(f"LA mosaic ({la_case.name}, patch 112x112x80, 9x9 grid in 1024²): {la_png}")
    else:
        print(f"LA sample cases not found (set {LA_ENV}); skipped the LA mosaic")

    _run_small_sam(case, cohort.classes)
    print(f"demo finished in {time.perf_counter() - started:.1f} s; outputs in {out}")


def _run_small_sam(case, classes) -> None:
    import torch

    from .data import zscore
    from .sam.model import SamConfig, build_sfr_sam

    image, _ = load_case(case, classes)
    config = SamConfig.small(num_classes=len(classes))
    layout = mosaic_layout(SMALL_PATCH, canvas=config.image_size)
    mosaic = stitch_image(torch.from_numpy(central_patch(zscore(image.array), SMALL_PATCH)), layout)
    model = build_sfr_sam(config).eval()
    with torch.no_grad():
        logits = model(mosaic[:, None])  # (mosaics, K+1, S, S)
    probabilities = unstitch(torch.softmax(logits, dim=1).permute(1, 0, 2, 3), layout)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(
        f"segment_anything Sam (small config: {config.image_size}² input, {config.encoder_depth} blocks, "
        f"LoRA rank {config.lora_rank}, {n_trainable:,} trainable parameters, untrained): mosaic "
        f"{tuple(mosaic.shape)} -> logits {tuple(logits.shape)} -> un-stitched probabilities "
        f"{tuple(probabilities.shape)}, sums to 1: {bool(np.allclose(probabilities.sum(0).numpy(), 1, atol=1e-5))}"
    )
