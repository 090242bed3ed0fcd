"""Correct and retrain: a run warm-started from an earlier one (``run --cohort DIR --out NEW --from PARENT``).

The cohort of an update is the parent's with some formerly unlabeled cases now labeled (the corrections) and maybe
new unlabeled cases. :func:`prepare_update` turns the run's configuration into the update's:

* SAM: when the labeled cases are exactly those the parent's SAM was fine-tuned on (no correction), the parent's
  fine-tuned SAM and its pseudo-labels are taken over as they are (hard links, copies where links cannot be made):
  their provenance records match, so only new unlabeled cases are pseudo-labelled. Otherwise SAM continues from the
  parent's weights (``finetune.init_weights``) for ``update.finetune_fraction`` of the full schedule, and every
  pseudo-label is made again with it;
* the V-Net continues from the parent's final V-Net (``retrain.init_weights``) for ``update.retrain_fraction`` of
  the full schedule;
* both start at ``update.lr_factor`` times the full schedule's learning rate, and the consistency weight of the
  semi-supervised methods starts at its final value (no ramp-up): they continue trained weights;
* the updated V-Net is the average of the parent's and the continued one, with ``update.parent_share`` for the
  parent's (``retrain.init_weights_share``): continuing converged weights at a raised learning rate first costs
  accuracy, and the average gets it back while keeping what the correction taught (docs/user-guide.md, "Correct and retrain");
* with ``baseline_method`` the comparison V-Net continues the parent's baseline the same way
  (``baseline_init_weights``), so that both sides of the comparison are updates.

The full schedule (iterations and learning rates) is the first run's of the lineage (recorded in each update's manifest), so an update of an update
is not shortened twice. The parent folder is only read: the update writes its own folder, and every write in the
engine replaces a file by renaming a new one over it, which leaves a linked parent file untouched.
``NEW/manifest.json`` records the parent, the corrected and added cases and the full schedule (:func:`lineage`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..base.config import FinetuneConfig, RunConfig
from ..base.config_io import with_overrides
from ..base.errors import InputError, PathLike
from ..data.cohort import Cohort
from ..storage.provenance import case_files, file_digest, read_record, record_path
from ..storage.runfolder import RunFolder

UPDATE_KEY = "update"
"""The manifest's section that an update writes (absent in a run from scratch)."""


@dataclass(frozen=True)
class Parent:
    """A finished run an update starts from."""

    run: RunFolder
    manifest: Dict[str, Any]
    vnet: Path
    """Its final V-Net (the last SFR+ round's when it ran SFR+)."""

    @property
    def full_schedule(self) -> Dict[str, float]:
        """Fine-tuning and re-training iterations and initial learning rates of the lineage's first run."""
        recorded = (self.manifest.get(UPDATE_KEY) or {}).get("full_schedule")
        if recorded:
            return dict(recorded)
        config = json.loads(self.run.config.read_text(encoding="utf-8"))
        return {"finetune": config["finetune"]["iterations"], "retrain": config["retrain"]["iterations"],
                "finetune_lr": config["finetune"]["lr"], "retrain_lr": config["retrain"]["lr"]}


def read_parent(path: PathLike, out: PathLike) -> Parent:
    """The finished run folder ``path``; InputError naming what is missing, or when ``out`` is the same folder."""
    run = RunFolder(path)
    if Path(out).resolve() == run.root.resolve():
        raise InputError("an update writes a new run folder and never changes its parent: give --out another "
                         "folder than --from", run.root, "from")
    for needed in (run.config, run.manifest, run.provenance):
        if not needed.is_file():
            raise InputError(f"not a finished run folder ({needed.name} is missing): finish that run first, or give "
                             "the folder of a finished one", run.root, "from")
    try:
        manifest = json.loads(run.manifest.read_text(encoding="utf-8"))
        vnet = run.root / json.loads(run.provenance.read_text(encoding="utf-8"))["V-Net file"]
    except (ValueError, KeyError, TypeError) as error:
        raise InputError(f"its manifest.json or provenance.json cannot be read ({error}); give a finished run "
                         "folder", run.root, "from") from None
    if read_record(vnet) is None:
        raise InputError("its V-Net is missing or has no provenance record: finish that run first", vnet, "from")
    return Parent(run, manifest, vnet)


def parent_overrides(parent: PathLike) -> Dict[str, Any]:
    """The parent run's resolved configuration, as overrides an update starts from (the command line's own options
    and ``--config`` go on top)."""
    path = RunFolder(parent).config
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read the parent run's configuration ({error}); give a finished run folder", path,
                         "from") from None


def prepare_update(parent: Parent, cohort: Cohort, config: RunConfig, run: RunFolder, adopt: bool = True
                   ) -> Tuple[RunConfig, Dict]:
    """The update's configuration (module docstring) and its manifest section; when no label changed, takes over
    the parent's SAM and pseudo-labels into ``run`` (with ``adopt``: under torchrun rank 0 does it)."""
    full = parent.full_schedule
    finetune, retrain = config.finetune, config.retrain
    if retrain.uses_pseudo_labels and read_record(parent.run.sam_weights) is not None:
        if _same_labels(parent.run, cohort):
            finetune = _parent_finetune(parent, finetune.device)
            if adopt:
                _adopt_sam(parent.run, run, cohort)
        else:
            finetune = dataclasses.replace(finetune, init_weights=str(parent.run.sam_weights),
                                           iterations=_shortened(full["finetune"], config.update.finetune_fraction),
                                           lr=full["finetune_lr"] * config.update.lr_factor)
    retrain = dataclasses.replace(retrain, init_weights=str(parent.vnet),
                                  iterations=_shortened(full["retrain"], config.update.retrain_fraction),
                                  lr=full["retrain_lr"] * config.update.lr_factor,
                                  batchnorm_statistics=config.update.batchnorm_statistics,
                                  init_weights_share=config.update.parent_share,
                                  ssl=dataclasses.replace(retrain.ssl, consistency_rampup=0.0))
    baseline_init_weights = _parent_baseline(parent) if config.baseline_method else None
    before = parent.manifest.get("inputs", {})
    section = {
        "parent": str(parent.run.root.resolve()),
        "parent_manifest_sha256": file_digest(parent.run.manifest),
        "corrected": sorted(case.name for case in cohort.labeled
                            if case.name in before and not before[case.name].get("label")),
        "added": sorted(case.name for case in cohort.cases if case.name not in before),
        "full_schedule": full,
    }
    return dataclasses.replace(config, finetune=finetune, retrain=retrain,
                               baseline_init_weights=baseline_init_weights), section


def lineage(run: RunFolder) -> List[Dict[str, Any]]:
    """The runs this one was updated from, first run first and ``run`` last: for each its folder, manifest
    section :data:`UPDATE_KEY` (None for the first) and wall seconds (``timings.json``, None if unrecorded)."""
    chain: List[Dict[str, Any]] = []
    here: Optional[RunFolder] = run
    while here is not None and here.manifest.is_file() and len(chain) < 1000:
        manifest = json.loads(here.manifest.read_text(encoding="utf-8"))
        section = manifest.get(UPDATE_KEY)
        seconds = (sum(json.loads(here.timings.read_text(encoding="utf-8")).values())
                   if here.timings.is_file() else None)
        chain.append({"run": here, "update": section, "seconds": seconds})
        here = RunFolder(section["parent"]) if section else None
    return chain[::-1]


def _parent_baseline(parent: Parent) -> str:
    """The parent's baseline V-Net, which the update's baseline continues; InputError when it has none."""
    path = parent.run.baseline.vnet_weights
    if read_record(path) is None:
        raise InputError("the parent run has no baseline V-Net to continue (it ran without baseline_method): leave "
                         "baseline_method unset in the update, or compare methods in runs from scratch", path,
                         "baseline_method")
    return str(path)


def _shortened(iterations: int, fraction: float) -> int:
    return max(1, math.ceil(iterations * fraction))


def _same_labels(parent: RunFolder, cohort: Cohort) -> bool:
    """Whether ``cohort``'s labeled images and labels are those the parent's SAM was fine-tuned on."""
    recorded = read_record(parent.sam_weights)["inputs"]["files"]
    recorded = {name: digest for name, digest in recorded.items() if name.startswith(("image of", "label of"))}
    return recorded == case_files(cohort.labeled)


def _parent_finetune(parent: Parent, device: str) -> FinetuneConfig:
    """The parent's fine-tuning section as it ran (so that its SAM's record matches the update's inputs), on this
    run's ``device``."""
    parent_config = json.loads(parent.run.config.read_text(encoding="utf-8"))
    return dataclasses.replace(with_overrides(FinetuneConfig(), parent_config["finetune"], parent.run.config),
                               device=device)


def _adopt_sam(parent: RunFolder, run: RunFolder, cohort: Cohort) -> None:
    """Link the parent's fine-tuned SAM and the pseudo-labels of this cohort's unlabeled cases into ``run`` (where
    ``run`` has none yet); their stages then reuse them while their records match."""
    files = [parent.sam_weights, parent.sam_weights_info]
    for case in cohort.unlabeled:
        files += parent.pseudo_label_files(case.name)
    for source in files:
        for path in (source, record_path(source)):
            target = run.root / path.relative_to(parent.root)
            if path.is_file() and not target.exists():
                _link(path, target)


def _link(source: Path, target: Path) -> None:
    """``target`` as a hard link of ``source``, or a copy where the file system cannot link."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def corrected_summary(section: Optional[Mapping[str, Any]]) -> str:
    """The corrections and additions of an update, in words (for the report)."""
    if not section:
        return "first run"
    parts = [f"corrected: {', '.join(section['corrected'])}" if section["corrected"] else "no correction"]
    if section["added"]:
        parts.append(f"added: {', '.join(section['added'])}")
    return "; ".join(parts)
