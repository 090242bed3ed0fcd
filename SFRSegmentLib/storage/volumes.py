"""Volumes, label maps and Slicer segmentations with their geometry: the one in-memory representation.

Canonical representation (used by every module of the engine)
-------------------------------------------------------------
A :class:`Volume` is a 3D numpy array plus its geometry:

* ``array[i, j, k]`` is indexed in **file (IJK) order**, the order of NRRD ``sizes``, ITK's index and Slicer's IJK:
  ``i`` varies fastest on disk. SimpleITK's ``GetArrayFromImage`` returns ``[k, j, i]``; we transpose it back.
* The **third axis (k) is the slice axis** that stitching lays out as tiles (``AXIAL_AXIS``). For the usual axial
  acquisition this is the axial (inferior-superior) direction; :attr:`Volume.closest_axis_to_superior` tells which
  array axis really points along S, and :meth:`Volume.with_axial_last` permutes the axes so that it is the third,
  keeping every voxel's physical position.
* Geometry is in **LPS** millimetres, as in ITK and in Slicer's files: ``spacing[a]`` is the voxel size along array
  axis ``a``, ``origin`` is the physical position of voxel (0, 0, 0), and column ``a`` of ``direction`` is the unit
  vector of array axis ``a``. So ``lps = origin + direction @ (spacing * ijk)``.
* A label map is a Volume of integers; when it comes from (or is written to) a ``.seg.nrrd`` it carries
  ``segments``: label value, name and colour of each segment, as Slicer shows them.

Supported files: NRRD (``.nrrd``, ``.nhdr``), NIfTI (``.nii``, ``.nii.gz``) and MetaImage (``.mha``, ``.mhd``)
through SimpleITK; Slicer segmentations (``.seg.nrrd``) through slicerio. Every write is atomic.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..base.errors import InputError, PathLike
from .atomic import atomic_path

AXIAL_AXIS = 2
"""Array axis that holds the slices (the stitching axis)."""

IMAGE_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nrrd", ".nhdr", ".nii", ".mha", ".mhd")
"""File name endings the engine reads and writes, longest first so that ``.seg.nrrd`` wins over ``.nrrd``."""

SEGMENTATION_SUFFIX = ".seg.nrrd"

# Slicer's default colour table for the first segments (GenericAnatomyColors-like), used when a label has none.
_DEFAULT_COLOURS = (
    (0.502, 0.682, 0.502), (0.945, 0.839, 0.569), (0.694, 0.478, 0.396), (0.435, 0.722, 0.824),
    (0.847, 0.396, 0.310), (0.867, 0.510, 0.396), (0.565, 0.933, 0.565), (0.753, 0.408, 0.345),
    (0.863, 0.961, 0.078), (0.306, 0.247, 0.0), (1.0, 0.980, 0.863), (0.902, 0.863, 0.275),
)


@dataclass(frozen=True)
class Segment:
    """One class of a label map as Slicer shows it: its voxel value, name and RGB colour in [0, 1]."""

    value: int
    name: str
    color: Tuple[float, float, float]


def default_segments(values: Sequence[int], names: Optional[Sequence[str]] = None) -> List[Segment]:
    """Segments for label values (background 0 excluded) with the given names or ``Segment_<value>``."""
    fg = [int(v) for v in values if int(v) != 0]
    names = list(names) if names is not None else [f"Segment_{v}" for v in fg]
    if len(names) != len(fg):
        raise ValueError(f"{len(fg)} label values but {len(names)} names")
    return [Segment(v, n, _DEFAULT_COLOURS[(v - 1) % len(_DEFAULT_COLOURS)]) for v, n in zip(fg, names)]


@dataclass
class Volume:
    """A 3D array in IJK order with its LPS geometry (see the module docstring)."""

    array: np.ndarray
    spacing: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    segments: Optional[List[Segment]] = None
    path: Optional[Path] = None

    def __post_init__(self) -> None:
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in self.origin)
        self.direction = np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)

    @property
    def ijk_to_lps(self) -> np.ndarray:
        """4×4 matrix mapping homogeneous (i, j, k, 1) to LPS millimetres."""
        m = np.eye(4)
        m[:3, :3] = self.direction * np.asarray(self.spacing)[None, :]
        m[:3, 3] = self.origin
        return m

    @property
    def ijk_to_ras(self) -> np.ndarray:
        """4×4 matrix mapping (i, j, k, 1) to RAS millimetres, as Slicer's ``GetIJKToRASMatrix``."""
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.ijk_to_lps

    @property
    def closest_axis_to_superior(self) -> int:
        """The array axis whose direction is closest to the patient's S axis (the axial slice axis)."""
        return int(np.argmax(np.abs(self.direction[2, :])))

    def with_array(self, array: np.ndarray, segments: Optional[List[Segment]] = None) -> "Volume":
        """A volume with the same geometry and a new array of the same shape (e.g. a prediction)."""
        if tuple(array.shape) != self.shape:
            raise ValueError(f"array shape {tuple(array.shape)} differs from the volume's {self.shape}")
        return dataclasses.replace(self, array=array, segments=segments, path=None)

    def with_axial_last(self) -> "Volume":
        """The same voxels in the same places, axes permuted so that the S-most axis is the third."""
        axial = self.closest_axis_to_superior
        if axial == AXIAL_AXIS:
            return self
        perm = [a for a in range(3) if a != axial] + [axial]
        return dataclasses.replace(
            self,
            array=np.ascontiguousarray(np.transpose(self.array, perm)),
            spacing=tuple(self.spacing[a] for a in perm),
            direction=self.direction[:, perm],
        )


# ---------------------------------------------------------------------------------------------------------------
# Reading


def file_suffix(path: PathLike) -> str:
    """The recognised file ending of ``path`` (e.g. ``.nii.gz``, ``.seg.nrrd``), or raise InputError."""
    name = Path(path).name.lower()
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise InputError(f"unsupported file type; expected one of {', '.join(IMAGE_SUFFIXES)}", path, "suffix")


def volume_stem(name: str) -> Optional[str]:
    """A volume file's name without its ending (``case1.nii.gz`` → ``case1``); None for any other file, for hidden
    files (the staging files of atomic writes) and for a bare ending."""
    lower = name.lower()
    if name.startswith("."):
        return None
    return next((name[: -len(suffix)] for suffix in IMAGE_SUFFIXES
                 if lower.endswith(suffix) and len(name) > len(suffix)), None)


def volume_files(folder: Path, stem: Optional[str] = None) -> List[Path]:
    """The volume files directly in ``folder``, sorted (none when it is not a folder); with ``stem``, only those
    named ``<stem>.<ext>`` (in any case)."""
    if not folder.is_dir():
        return []
    found = sorted(p for p in folder.iterdir() if p.is_file() and volume_stem(p.name) is not None)
    return found if stem is None else [p for p in found if volume_stem(p.name).lower() == stem.lower()]


def read_volume(path: PathLike) -> Volume:
    """Read a 3D scalar volume or label map; a ``.seg.nrrd`` is read as a label map with its segments.

    Raises InputError for a missing, unreadable or corrupt file, a 2D or 4D image, or a multi-component image.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", path)
    if file_suffix(path) == SEGMENTATION_SUFFIX:
        return _read_segmentation(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"cannot read the image (unreadable or corrupt file): {_first_line(exc)}", path) from exc
    if image.GetDimension() != 3:
        raise InputError(
            f"expected a 3D volume, got a {image.GetDimension()}D image of size {image.GetSize()}", path, "dimension"
        )
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"expected one value per voxel, got {image.GetNumberOfComponentsPerPixel()} components "
            "(a vector, RGB or 4D image)",
            path,
            "components",
        )
    array = np.ascontiguousarray(np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0)))
    return Volume(
        array=array,
        spacing=image.GetSpacing(),
        origin=image.GetOrigin(),
        direction=np.asarray(image.GetDirection()).reshape(3, 3),
        path=path,
    )


def _read_segmentation(path: Path) -> Volume:
    import slicerio

    try:
        seg = slicerio.read_segmentation(str(path))
    except Exception as exc:  # slicerio/pynrrd raise many types for corrupt files
        raise InputError(f"cannot read the segmentation (unreadable or corrupt file): {_first_line(exc)}", path) from exc
    voxels = np.asarray(seg["voxels"])
    if voxels.ndim == 4:
        # Overlapping segments are stored as layers; collapse them (later segments win, as slicerio documents).
        names = [(s["name"], int(i + 1)) for i, s in enumerate(seg["segments"])]
        seg = slicerio.extract_segments(seg, names)
        voxels = np.asarray(seg["voxels"])
    if voxels.ndim != 3:
        raise InputError(f"expected a 3D segmentation, got {voxels.ndim} dimensions", path, "dimension")
    ijk_to_lps = np.asarray(seg["ijkToLPS"], dtype=float)
    axes = ijk_to_lps[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    segments = [
        Segment(int(s["labelValue"]), str(s.get("name", f"Segment_{s['labelValue']}")),
                tuple(float(c) for c in s.get("color", _DEFAULT_COLOURS[0])))
        for s in seg.get("segments", [])
    ]
    return Volume(
        array=np.ascontiguousarray(voxels),
        spacing=tuple(spacing),
        origin=tuple(ijk_to_lps[:3, 3]),
        direction=axes / spacing[None, :],
        segments=segments,
        path=path,
    )


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # ITK puts the useful sentence last ("... Could not create IO object for reading file ...").
    return lines[-1] if lines else type(exc).__name__


# ---------------------------------------------------------------------------------------------------------------
# Writing


def write_volume(volume: Volume, path: PathLike, compress: bool = True) -> Path:
    """Write ``volume`` atomically; the format follows the file ending. Returns the path written.

    A ``.seg.nrrd`` gets the volume's segments (or default names and colours for the label values present).
    """
    path = Path(path)
    suffix = file_suffix(path)
    if volume.array.ndim != 3:
        raise ValueError(f"{path}: can only write 3D volumes, got shape {volume.array.shape}")
    with atomic_path(path) as tmp:
        if suffix == SEGMENTATION_SUFFIX:
            _write_segmentation(volume, tmp)
        else:
            image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(volume.array, (2, 1, 0))))
            image.SetSpacing(volume.spacing)
            image.SetOrigin(volume.origin)
            image.SetDirection(tuple(volume.direction.ravel()))
            sitk.WriteImage(image, str(tmp), useCompression=compress)
    return path


def _write_segmentation(volume: Volume, tmp: Path) -> None:
    import slicerio

    voxels = np.asarray(volume.array)
    if not np.issubdtype(voxels.dtype, np.integer):
        raise ValueError(f"a segmentation needs integer labels, got dtype {voxels.dtype}")
    segments = volume.segments
    if segments is None:
        segments = default_segments(np.unique(voxels))
    shape = voxels.shape
    seg = {
        "voxels": voxels,
        "ijkToLPS": volume.ijk_to_lps,
        "encoding": "gzip",
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
        "segments": [
            {
                "id": f"Segment_{s.value}",
                "labelValue": int(s.value),
                "layer": 0,
                "name": s.name,
                "color": list(s.color),
                "extent": [0, shape[0] - 1, 0, shape[1] - 1, 0, shape[2] - 1],
            }
            for s in segments
        ],
    }
    slicerio.write_segmentation(str(tmp), seg)
