"""The command line: one subcommand per user task, each a thin call into the engine's modules.

Exit status: 0 on success, 2 on bad input (the message names the file and the field), 1 on other failures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .errors import InputError

EXIT_BAD_INPUT = 2
PAPER_PATCH = (112, 112, 80)


def _cmd_info(args: argparse.Namespace) -> int:
    from .io import read_volume
    from .validation import check_image, check_label

    image = read_volume(args.image)
    check_image(image)
    arr = image.array
    print(f"file:       {image.path}")
    print(f"shape:      {' x '.join(map(str, image.shape))} (i, j, k; slices along k: {image.shape[2]})")
    print(f"spacing:    {', '.join(f'{s:g}' for s in image.spacing)} mm")
    print(f"origin:     {', '.join(f'{o:g}' for o in image.origin)} mm (LPS)")
    print(f"axial axis: {'ijk'[image.closest_axis_to_superior]} (closest to superior)")
    print(f"dtype:      {arr.dtype}")
    print(f"intensity:  min {arr.min():g}, max {arr.max():g}, mean {arr.mean():.4g}, std {arr.std():.4g}")
    if args.label:
        label = read_volume(args.label)
        values, counts = np.unique(label.array, return_counts=True)
        names = {s.value: s.name for s in (label.segments or [])}
        check_label(label, [int(v) for v in values], image, require_foreground=False)
        print(f"label:      {label.path}")
        for value, count in zip(values, counts):
            name = names.get(int(value), "background" if value == 0 else f"class_{int(value)}")
            print(f"  class {int(value):>3} {name:<24} {int(count):>10} voxels ({count / label.array.size:.2%})")
    return 0


def _cmd_stitch_preview(args: argparse.Namespace) -> int:
    from .preview import write_stitch_preview

    written = write_stitch_preview(args.image, args.out, label_path=args.label, patch=tuple(args.patch),
                                   canvas=args.canvas)
    print(f"wrote {written}")
    return 0


def _cmd_cohort(args: argparse.Namespace) -> int:
    from .data import discover_cohort, validate_cohort

    cohort = discover_cohort(args.path)
    print(cohort.summary())
    if args.validate:
        validate_cohort(cohort)
        print(f"all {len(cohort.cases)} cases are valid")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from .synthetic import make_synthetic_cohort

    cohort = make_synthetic_cohort(args.out, n_cases=args.cases, n_labeled=args.labeled, n_classes=args.classes,
                                   seed=args.seed)
    print(cohort.summary())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sfrsegment",
        description="SFRSegment engine: semi-supervised 3D segmentation with SAM (Stitching, Fine-tuning, "
        "Re-training).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("info", help="print shape, geometry, intensity range and label classes of a volume")
    p.add_argument("image", type=Path, help="volume file (.nrrd, .nii, .nii.gz, .mha, .mhd)")
    p.add_argument("--label", type=Path, help="label map or .seg.nrrd on the same grid")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("stitch-preview", help="write the SAM mosaic of a volume's central patch as a PNG")
    p.add_argument("image", type=Path)
    p.add_argument("--label", type=Path, help="label map to overlay")
    p.add_argument("--out", type=Path, required=True, help="PNG file to write")
    p.add_argument("--patch", type=int, nargs=3, default=list(PAPER_PATCH), metavar=("H", "W", "D"),
                   help="patch size in voxels (default: the paper's LA patch 112 112 80)")
    p.add_argument("--canvas", type=int, default=1024, help="mosaic side in pixels (SAM's input size)")
    p.set_defaults(func=_cmd_stitch_preview)

    p = sub.add_parser("cohort", help="discover a cohort and report its labeled and unlabeled cases")
    p.add_argument("path", type=Path, help="folder of case folders, Decathlon folder, or manifest .json")
    p.add_argument("--validate", action="store_true", help="also read and check every image and label")
    p.set_defaults(func=_cmd_cohort)

    p = sub.add_parser("synth", help="write a deterministic synthetic cohort (for tests and trials)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--labeled", type=int, default=2)
    p.add_argument("--classes", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("demo", help="run the built-in demo on synthetic data (and the LA cases when present)")
    p.add_argument("--out", type=Path, default=Path("demo-output"))
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
