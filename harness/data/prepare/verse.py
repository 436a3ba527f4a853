"""VerSe (CT NIfTI + vertebra centroid JSON + a Genant grade table) -> sagittal vertebra slices.

Input, as released (VerSe'19/'20, BIDS-like): ``*_ct.nii.gz`` volumes and ``*_ctd.json`` centroid files anywhere
under a root folder, paired by scan name (``sub-verse506_ct.nii.gz`` <-> ``sub-verse506_seg-subreg_ctd.json``).
A centroid file is a JSON list: ``{"direction": ["P", "I", "R"]}`` then ``{"label": 20, "X": .., "Y": .., "Z": ..}``
per vertebra, in voxel coordinates of the CT reoriented to ``direction`` (the VerSe convention); labels 1-7 are
C1-C7, 8-19 T1-T12, 20-24 L1-L5, 25 L6, 28 T13. The grade table (CSV or XLSX, supplied by the user) is long
(``subject``, ``vertebra``, ``grade`` columns, names configurable; vertebra as ``L1`` or label number) or wide
(a ``subject`` column and one column per level name). Genant grades: 0 none, 1 mild, 2 moderate, 3 severe.

Per graded vertebra: a ``size`` x ``size`` sagittal image (default 96 at 1 mm, so neighbours are visible)
sampled on an isotropic grid straight from the CT voxels (trilinear, one interpolation), centred on the
centroid, superior up and anterior left, windowed from HU (default bone window L400/W1800: -500..1300) to
uint8. Labels: ``fracture`` (grade >= ``fracture_threshold``), ``grade``; metadata ``level`` (e.g. ``L1``),
``vertebra`` (label number), ``patient_id``, ``scan``, ``source_file``. Splits are patient-level (the BIDS
subject; several scans of one subject share a split).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
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
    read_table,
    require,
    safe_key,
    sha256_file,
    split_items_by_patient,
)
from harness.data.prepare.imaging import (
    SAGITTAL_DOWN,
    SAGITTAL_RIGHT,
    sample_plane,
    snap_to_voxel_plane,
    window_to_uint8,
)
from harness.data.prepare.runner import run_plan
from harness.data.prepare.volumes import load_nifti

VERTEBRA_NAMES = {**{i: f"C{i}" for i in range(1, 8)}, **{i: f"T{i - 7}" for i in range(8, 20)},
                  **{i: f"L{i - 19}" for i in range(20, 25)}, 25: "L6", 28: "T13"}
LEVEL_LABELS = {name: label for label, name in VERTEBRA_NAMES.items()}
THORACOLUMBAR = tuple(VERTEBRA_NAMES[i] for i in range(8, 25))  # T1..L5
GENANT_GRADES = range(0, 4)
AIR_HU = -1024.0


def scan_name(path: Path) -> str:
    """``sub-verse506_ct.nii.gz`` / ``sub-verse506_seg-subreg_ctd.json`` -> ``sub-verse506``."""
    name = re.sub(r"\.nii(\.gz)?$|\.json$", "", path.name)
    return re.sub(r"(_seg-[A-Za-z0-9]+)?_ctd$|_ct$", "", name)


def patient_of(scan: str) -> str:
    """The BIDS subject entity (``sub-verse506_dir-ax`` -> ``sub-verse506``)."""
    return scan.split("_")[0]


def read_grades(path: str | Path, subject_column: str = "subject", level_column: str = "vertebra",
                grade_column: str = "grade") -> dict[tuple[str, str], Any]:
    """Grade table -> {(subject, level name): raw grade}; long or wide layout (see the module docstring)."""
    table = read_table(path)
    if subject_column not in table.columns:
        raise PrepareError(f"{path}: no subject column {subject_column!r}; the table has {list(table.columns)}")
    grades: dict[tuple[str, str], Any] = {}
    if level_column in table.columns and grade_column in table.columns:
        for record in table.to_dict("records"):
            level = _level_name(record[level_column])
            if level is None:
                raise PrepareError(f"{path}: vertebra {record[level_column]!r} of subject {record[subject_column]!r} "
                                   f"is not a level name (C1..L6, T13) or VerSe label number")
            grades[(str(record[subject_column]).strip(), level)] = record[grade_column]
        return grades
    level_columns = [c for c in table.columns if str(c).strip().upper() in LEVEL_LABELS]
    if not level_columns:
        raise PrepareError(f"{path}: expected columns {subject_column!r}, {level_column!r}, {grade_column!r} (long) or "
                           f"{subject_column!r} plus level columns such as 'L1' (wide); found {list(table.columns)}")
    for subject, row in zip(table[subject_column], table[level_columns].itertuples(index=False), strict=True):
        for column, value in zip(level_columns, row, strict=True):
            if not (isinstance(value, float) and math.isnan(value)):
                grades[(str(subject).strip(), str(column).strip().upper())] = value
    return grades


def _level_name(value: Any) -> str | None:
    if isinstance(value, (int, np.integer)) or (isinstance(value, float) and value.is_integer()):
        return VERTEBRA_NAMES.get(int(value))
    text = str(value).strip().upper()
    if text.isdigit():  # a label number read as text from a mixed column
        return VERTEBRA_NAMES.get(int(text))
    return text if text in LEVEL_LABELS else None


def read_centroids(path: Path) -> tuple[tuple[str, str, str], list[tuple[int, np.ndarray]]]:
    """Centroid JSON -> (axis codes, [(vertebra label, voxel coordinate (3,))]); NaN placeholders dropped."""
    try:
        entries = json.loads(path.read_text())
        direction = next(tuple(e["direction"]) for e in entries if "direction" in e)
        points = [(int(e["label"]), np.array([e["X"], e["Y"], e["Z"]], dtype=np.float64))
                  for e in entries if "label" in e]
    except StopIteration as exc:
        raise BadInput("unreadable", f"{path}: no 'direction' entry; VerSe centroid files start with "
                       "{'direction': [...]}") from exc
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise BadInput("unreadable", f"{path}: not a VerSe centroid file ({type(exc).__name__}: {exc})") from exc
    if len(direction) != 3 or not all(isinstance(c, str) for c in direction):
        raise BadInput("unreadable", f"{path}: direction {direction!r} is not three axis codes")
    return direction, [(label, xyz) for label, xyz in points if np.isfinite(xyz).all()]


def centroid_to_world(direction: Sequence[str], voxel_to_world: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """4x4 matrix taking centroid voxel coordinates (CT reoriented to ``direction``) to RAS world mm."""
    orientations = require("nibabel.orientations", "reading VerSe centroids")
    to_centroid_axes = orientations.ornt_transform(orientations.io_orientation(voxel_to_world),
                                                   orientations.axcodes2ornt(tuple(direction)))
    # inv_ornt_aff maps coordinates of the reoriented array back to the stored array's voxel coordinates.
    return voxel_to_world @ orientations.inv_ornt_aff(to_centroid_axes, tuple(shape))


def _load_scan(item: WorkItem, *, grades: Mapping[tuple[str, str], Any], levels: tuple[str, ...], size: int,
               spacing: float, window: tuple[float, float], fracture_threshold: int,
               root: str) -> Iterator[tuple[str, np.ndarray, dict[str, Any]] | Skip]:
    ct_path, centroid_path, scan, subjects = item.payload
    direction, centroids = read_centroids(Path(centroid_path))
    volume, affine = load_nifti(ct_path)  # (I, J, K) HU, voxel -> RAS mm
    to_world = centroid_to_world(direction, affine, volume.shape)
    for label, voxel in sorted(centroids, key=lambda c: c[0]):
        level = VERTEBRA_NAMES.get(label)
        if level not in levels:
            continue
        name = f"{ct_path}:{level}"
        grade = next((grades[(s, level)] for s in subjects if (s, level) in grades), None)
        if grade is None or (isinstance(grade, float) and math.isnan(grade)):
            yield Skip(name, "missing_label", f"no Genant grade for {scan} {level} in the grade table")
            continue
        if not (isinstance(grade, (int, float, np.number)) and float(grade).is_integer()
                and int(grade) in GENANT_GRADES):
            yield Skip(name, "label_out_of_range", f"Genant grade {grade!r} for {scan} {level}; expected 0..3")
            continue
        centre = (to_world @ np.append(voxel, 1.0))[:3]
        stored = np.linalg.solve(affine, np.append(centre, 1.0))[:3]
        if np.any(stored < -0.5) or np.any(stored > np.asarray(volume.shape) - 0.5):
            yield Skip(name, "outside_volume", f"centroid {voxel.round(1).tolist()} ({direction}) lies outside the "
                       f"CT of shape {volume.shape}")
            continue
        centre = snap_to_voxel_plane(centre, affine, normal=np.array([1.0, 0.0, 0.0]))
        plane = sample_plane(volume, affine, centre, SAGITTAL_DOWN, SAGITTAL_RIGHT, size, spacing, fill=AIR_HU)
        labels = {"fracture": int(int(grade) >= fracture_threshold), "grade": int(grade), "level": level,
                  "vertebra": label, "patient_id": item.patient, "scan": scan,
                  "source_file": str(Path(ct_path).relative_to(root))}
        yield safe_key(f"{scan}-{level}"), window_to_uint8(plane, *window), labels


def find_scans(root: Path, ct_glob: str = "*_ct.nii.gz",
               centroid_glob: str = "*_ctd.json") -> tuple[list[tuple[Path, Path]], list[Skip]]:
    """Pair CT volumes with centroid files by scan name; unpaired CTs are reported."""
    centroids = {scan_name(p): p for p in sorted(root.rglob(centroid_glob))}
    pairs, skips = [], []
    for ct in sorted(root.rglob(ct_glob)):
        match = centroids.get(scan_name(ct))
        if match is None:
            skips.append(Skip(str(ct), "missing_label", f"no centroid file ({centroid_glob}) for scan "
                              f"{scan_name(ct)!r}"))
        else:
            pairs.append((ct, match))
    return pairs, skips


def verse_plan(root: str | Path, grades_path: str | Path, *, levels: Sequence[str] = THORACOLUMBAR, size: int = 96,
               spacing: float = 1.0, window: tuple[float, float] = (-500.0, 1300.0), fracture_threshold: int = 1,
               fractions: Mapping[str, float] = DEFAULT_FRACTIONS, seed: int = 0, ct_glob: str = "*_ct.nii.gz",
               centroid_glob: str = "*_ctd.json", subject_column: str = "subject",
               level_column: str = "vertebra", grade_column: str = "grade") -> Plan:
    """Find VerSe scans under ``root``, read the grade table and describe the preparation."""
    root = Path(root)
    unknown = [level for level in levels if level not in LEVEL_LABELS]
    if unknown or size < 8 or spacing <= 0 or not window[1] > window[0]:
        raise ValueError(f"levels {unknown} unknown, or size={size} < 8, spacing={spacing} <= 0, window={window}")
    grades = read_grades(grades_path, subject_column, level_column, grade_column)
    graded_subjects = {subject for subject, _ in grades}
    pairs, skipped = find_scans(root, ct_glob, centroid_glob)
    items = []
    for ct, centroid in pairs:
        scan, patient = scan_name(ct), patient_of(scan_name(ct))
        subjects = [s for s in (scan, patient, patient.removeprefix("sub-")) if s in graded_subjects]
        if not subjects:
            skipped.append(Skip(str(ct), "missing_label", f"scan {scan!r} has no rows in {grades_path}"))
            continue
        items.append(WorkItem(str(ct), patient, (str(ct), str(centroid), scan, tuple(subjects))))
    if not items:
        raise PrepareError(f"{root}: no CT with a centroid file and graded vertebrae ({len(skipped)} skipped; "
                           f"looked for {ct_glob} and {centroid_glob})")
    load = functools.partial(_load_scan, grades=grades, levels=tuple(levels), size=size, spacing=spacing,
                             window=tuple(window), fracture_threshold=fracture_threshold, root=str(root))
    config = {"levels": list(levels), "size": size, "spacing_mm": spacing, "hu_window": list(window),
              "fracture_threshold": fracture_threshold, "fractions": dict(fractions), "seed": seed}
    return Plan("verse", split_items_by_patient(items, fractions, seed), load, ("fracture", "grade"), config,
                inputs={Path(grades_path).name: sha256_file(grades_path)}, skipped=skipped)


def prepare_verse(root: str | Path, grades_path: str | Path, out_dir: str | Path, *,
                  options: RunOptions = RunOptions(), **plan_kw: Any) -> PrepareResult:
    """VerSe -> shards in ``out_dir``; ``plan_kw`` are :func:`verse_plan`'s keyword arguments."""
    return run_plan(verse_plan(root, grades_path, **plan_kw), out_dir, options)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line options of ``python -m harness.data.prepare verse``."""
    parser.add_argument("root", type=Path, help="folder holding the CT NIfTI files and centroid JSON files")
    parser.add_argument("--grades", type=Path, required=True, help="Genant grade table (.csv or .xlsx)")
    parser.add_argument("--levels", default="T1-L5", help="vertebrae to keep: 'T1-L5' or a list 'T12,L1,L2'")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--spacing", type=float, default=1.0, help="pixel spacing in mm (isotropic)")
    parser.add_argument("--window", type=float, nargs=2, default=(-500.0, 1300.0), metavar=("LOW", "HIGH"),
                        help="HU window mapped to 0..255")
    parser.add_argument("--fracture-threshold", type=int, default=1, help="Genant grade from which fracture=1")
    parser.add_argument("--ct-glob", default="*_ct.nii.gz")
    parser.add_argument("--centroid-glob", default="*_ctd.json")
    parser.add_argument("--subject-column", default="subject")
    parser.add_argument("--level-column", default="vertebra")
    parser.add_argument("--grade-column", default="grade")
    add_split_arguments(parser)


def parse_levels(text: str) -> tuple[str, ...]:
    """``"T1-L5"`` -> (T1, ..., L5) in spine order; ``"T12,L1"`` -> (T12, L1)."""
    order = [VERTEBRA_NAMES[i] for i in range(1, 25)]
    if "-" in text and "," not in text:
        first, last = (part.strip().upper() for part in text.split("-"))
        if first not in order or last not in order:
            raise ValueError(f"levels {text!r}: use names C1..L5, e.g. 'T1-L5'")
        return tuple(order[order.index(first):order.index(last) + 1])
    return tuple(part.strip().upper() for part in text.split(",") if part.strip())


def run_from_args(args: argparse.Namespace, options: RunOptions) -> PrepareResult:
    """Run the ``verse`` subcommand."""
    return prepare_verse(args.root, args.grades, args.out, options=options, levels=parse_levels(args.levels),
                         size=args.size, spacing=args.spacing, window=tuple(args.window),
                         fracture_threshold=args.fracture_threshold, fractions=args.split_fractions,
                         seed=args.split_seed, ct_glob=args.ct_glob, centroid_glob=args.centroid_glob,
                         subject_column=args.subject_column, level_column=args.level_column,
                         grade_column=args.grade_column)
