"""BraTS (FLAIR NIfTI + tumour segmentation) -> 2D slices labelled by the presence of peritumoral edema.

Input, as released: one folder per case holding ``*_flair.nii.gz`` and ``*_seg.nii.gz`` (BraTS 2018-2021;
segmentation labels 1 necrotic core, 2 edema, 4 enhancing tumour) or ``*-t2f.nii.gz`` and ``*-seg.nii.gz``
(BraTS 2023+, enhancing tumour 3). Both layouts are recognised; the edema label(s) are configurable.

Per case, slices along ``axis`` (default axial, in RAS voxel order) are chosen by a
:class:`~harness.data.prepare.imaging.SliceRule`: ``area`` takes every slice whose brain (non-background)
area is at least ``min_area`` of the slice, ``random`` draws ``count`` of those with a seed, ``middle`` the
central one. Each slice is scaled from the volume's brain 0.5-99.5 percentiles to uint8, resampled to square
pixels and brought to ``size`` x ``size`` (default 64, PIL bicubic). Labels: ``edema`` (1 when at least
``min_edema_pixels`` voxels of the slice carry an edema label); metadata ``edema_pixels``, ``slice``, ``case``,
``patient_id``, ``source_file``. Splits are patient-level (a BraTS 2023 case id ``BraTS-GLI-00000-001`` belongs
to patient ``BraTS-GLI-00000``).
"""

from __future__ import annotations

import argparse
import functools
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from harness.data.prepare.common import (
    DEFAULT_FRACTIONS,
    BadInput,
    Plan,
    PrepareError,
    PrepareResult,
    RunOptions,
    Skip,
    WorkItem,
    add_split_arguments,
    safe_key,
    split_items_by_patient,
)
from harness.data.prepare.imaging import (
    FIT_METHODS,
    SliceRule,
    add_slice_arguments,
    display_slice,
    display_spacing,
    fit_square,
    percentile_window,
    slice_rule_from_args,
    square_pixels,
    window_to_uint8,
)
from harness.data.prepare.runner import run_plan
from harness.data.prepare.volumes import load_ras

LAYOUTS = (("_flair.nii.gz", "_seg.nii.gz"), ("-t2f.nii.gz", "-seg.nii.gz"))  # (FLAIR suffix, segmentation suffix)
SEGMENTATION_LABELS = frozenset({0, 1, 2, 3, 4})


def case_patient(case: str) -> str:
    """BraTS 2023 ids end in a time-point number (``-000``); earlier ids are one per patient."""
    return re.sub(r"-\d{3}$", "", case)


def find_cases(root: Path) -> tuple[list[tuple[str, Path, Path]], list[Skip]]:
    """(case id, FLAIR path, segmentation path) for every FLAIR under ``root``; a FLAIR without a
    segmentation is reported."""
    cases, skips = [], []
    for flair_suffix, seg_suffix in LAYOUTS:
        for flair in sorted(root.rglob(f"*{flair_suffix}")):
            case = flair.name[: -len(flair_suffix)]
            seg = flair.with_name(case + seg_suffix)
            if seg.is_file():
                cases.append((case, flair, seg))
            else:
                skips.append(Skip(str(flair), "missing_label", f"no segmentation {seg.name} next to the FLAIR"))
    return cases, skips


def _load_case(item: WorkItem, *, rule: SliceRule, size: int, fit: str, edema_labels: tuple[int, ...],
               min_edema_pixels: int, percentiles: tuple[float, float],
               root: str) -> Iterator[tuple[str, np.ndarray, dict[str, Any]] | Skip]:
    case, flair_path, seg_path = item.payload
    flair, zooms = load_ras(flair_path)  # (X, Y, Z) in RAS voxel order
    seg, _ = load_ras(seg_path)
    if seg.shape != flair.shape:
        raise BadInput("shape_mismatch", f"{seg_path}: segmentation shape {seg.shape} differs from the FLAIR's "
                       f"{flair.shape}")
    seg = np.rint(seg).astype(np.int16)
    unknown = sorted(set(np.unique(seg).tolist()) - SEGMENTATION_LABELS)
    if unknown:
        raise BadInput("label_out_of_range", f"{seg_path}: segmentation values {unknown[:5]} outside "
                       f"{sorted(SEGMENTATION_LABELS)}")
    if not seg.any():
        raise BadInput("empty_mask", f"{seg_path}: the segmentation is empty (every BraTS case has a tumour)")
    window = percentile_window(flair, *percentiles, mask=flair > flair.min())
    edema = np.isin(seg, edema_labels)
    row_spacing, col_spacing = display_spacing(zooms, rule.axis)
    for index in rule.select(flair, case):
        pixels = square_pixels(display_slice(flair, rule.axis, index), row_spacing, col_spacing)
        image = fit_square(window_to_uint8(pixels, *window), size, fit)  # (size, size) uint8
        edema_pixels = int(display_slice(edema, rule.axis, index).sum())
        labels = {"edema": int(edema_pixels >= min_edema_pixels), "edema_pixels": edema_pixels, "slice": index,
                  "case": case, "patient_id": item.patient, "source_file": str(Path(flair_path).relative_to(root))}
        yield safe_key(f"{case}-{rule.axis}{index:03d}"), image, labels


def brats_plan(root: str | Path, *, rule: SliceRule = SliceRule("axial", "area", min_area=0.1), size: int = 64,
               fit: str = "resize", edema_labels: Sequence[int] = (2,), min_edema_pixels: int = 1,
               percentiles: tuple[float, float] = (0.5, 99.5), fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
               seed: int = 0) -> Plan:
    """Find BraTS cases under ``root`` and describe the preparation."""
    root = Path(root)
    if size < 8 or fit not in FIT_METHODS or min_edema_pixels < 1:
        raise ValueError(f"size={size} must be >= 8, fit={fit!r} one of {FIT_METHODS}, "
                         f"min_edema_pixels={min_edema_pixels} >= 1")
    cases, skipped = find_cases(root)
    if not cases:
        raise PrepareError(f"{root}: no FLAIR volume with a segmentation (looked for "
                           f"{', '.join(f'*{a} + *{b}' for a, b in LAYOUTS)}; {len(skipped)} without a segmentation)")
    items = [WorkItem(str(flair), case_patient(case), (case, str(flair), str(seg))) for case, flair, seg in cases]
    load = functools.partial(_load_case, rule=rule, size=size, fit=fit, edema_labels=tuple(edema_labels),
                             min_edema_pixels=min_edema_pixels, percentiles=tuple(percentiles), root=str(root))
    config = {"slice_rule": asdict(rule), "size": size, "fit": fit, "edema_labels": list(edema_labels),
              "min_edema_pixels": min_edema_pixels, "percentiles": list(percentiles), "fractions": dict(fractions),
              "seed": seed}
    return Plan("brats", split_items_by_patient(items, fractions, seed), load, ("edema",), config, skipped=skipped)


def prepare_brats(root: str | Path, out_dir: str | Path, *, options: RunOptions = RunOptions(),
                  **plan_kw: Any) -> PrepareResult:
    """BraTS -> shards in ``out_dir``; ``plan_kw`` are :func:`brats_plan`'s keyword arguments."""
    return run_plan(brats_plan(root, **plan_kw), out_dir, options)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line options of ``python -m harness.data.prepare brats``."""
    parser.add_argument("root", type=Path, help="folder of BraTS case folders")
    add_slice_arguments(parser, mode="area", min_area=0.1)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--fit", choices=FIT_METHODS, default="resize")
    parser.add_argument("--edema-labels", type=int, nargs="+", default=[2])
    parser.add_argument("--min-edema-pixels", type=int, default=1)
    parser.add_argument("--percentiles", type=float, nargs=2, default=(0.5, 99.5), metavar=("LOW", "HIGH"))
    add_split_arguments(parser)


def run_from_args(args: argparse.Namespace, options: RunOptions) -> PrepareResult:
    """Run the ``brats`` subcommand."""
    return prepare_brats(args.root, args.out, options=options, rule=slice_rule_from_args(args), size=args.size,
                         fit=args.fit, edema_labels=args.edema_labels, min_edema_pixels=args.min_edema_pixels,
                         percentiles=tuple(args.percentiles), fractions=args.split_fractions, seed=args.split_seed)
