"""SPIDER (lumbar spine MRI .mha volumes + segmentation masks + radiological gradings) -> sagittal disc slices.

Input, as released (van der Graaf et al., Sci Data 2024): ``images/{patient}_{sequence}.mha`` and
``masks/{patient}_{sequence}.mha`` under a root folder, where mask values 1-25 are vertebrae, 100 the spinal
canal and ``200 + n`` intervertebral disc (IVD) n; and ``radiological_gradings.csv`` with one row per IVD
(columns ``Patient``, ``IVD label``, ``Pfirrman grade``; names configurable). The default sequence is ``t2``.

Per graded IVD: a ``size`` x ``size`` (default 64) sagittal image at ``spacing`` mm (default 1.0), centred on the
IVD mask's centre of mass, superior up and anterior left, sampled from the voxels in world coordinates (the
plane is snapped to the nearest acquired sagittal slice, so thick slices are not blended). Intensities are
scaled per volume from its 0.5-99.5 percentiles (MRI has no absolute unit). Labels: ``pfirrmann`` (1-5);
metadata ``ivd`` (label number), ``patient_id``, ``source_file``. An IVD graded in the CSV but absent from the
mask is reported (``empty_mask``); an IVD in the mask without a grade row is reported (``missing_label``).
Splits are patient-level.
"""

from __future__ import annotations

import argparse
import functools
import math
from collections.abc import Iterator, Mapping
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
    require_columns,
    safe_key,
    sha256_file,
    split_items_by_patient,
)
from harness.data.prepare.imaging import (
    SAGITTAL_DOWN,
    SAGITTAL_RIGHT,
    percentile_window,
    sample_plane,
    snap_to_voxel_plane,
    window_to_uint8,
)
from harness.data.prepare.runner import run_plan
from harness.data.prepare.volumes import load_mha

PFIRRMANN_GRADES = range(1, 6)
IVD_OFFSET = 200  # mask value of IVD n is 200 + n


def read_gradings(path: str | Path, patient_column: str = "Patient", ivd_column: str = "IVD label",
                  grade_column: str = "Pfirrman grade") -> dict[str, dict[int, Any]]:
    """Grading CSV -> {patient: {ivd label: raw grade}}."""
    table = read_table(path)
    table.columns = [str(c).strip() for c in table.columns]
    require_columns(table, (patient_column, ivd_column, grade_column), path)
    gradings: dict[str, dict[int, Any]] = {}
    for patient, ivd, grade in zip(table[patient_column], table[ivd_column], table[grade_column], strict=True):
        if isinstance(ivd, float) and math.isnan(ivd):
            continue
        gradings.setdefault(_patient_id(patient), {})[int(ivd)] = grade
    return gradings


def _patient_id(value: Any) -> str:
    return str(int(value)) if isinstance(value, (float, np.floating)) and float(value).is_integer() else str(value)


def _load_scan(item: WorkItem, *, size: int, spacing: float, percentiles: tuple[float, float],
               root: str) -> Iterator[tuple[str, np.ndarray, dict[str, Any]] | Skip]:
    image_path, mask_path, grades = item.payload
    volume, affine = load_mha(image_path)  # (I, J, K), voxel -> RAS mm
    mask, mask_affine = load_mha(mask_path, check=False)
    if mask.shape != volume.shape or not np.allclose(mask_affine, affine, atol=1e-3):
        raise BadInput("shape_mismatch", f"{mask_path}: mask grid {mask.shape} does not match image {image_path} "
                       f"{volume.shape} (shape or geometry)")
    window = percentile_window(volume, *percentiles)  # whole volume: air and tissue set the dark end
    mask = np.rint(mask).astype(np.int32)
    present = {int(v) - IVD_OFFSET for v in np.unique(mask) if IVD_OFFSET < v < IVD_OFFSET + 100}
    source = str(Path(image_path).relative_to(root))
    for ivd in sorted(present - set(grades)):
        yield Skip(f"{mask_path}:IVD{ivd}", "missing_label", f"IVD {ivd} is in the mask but has no grading row")
    for ivd, grade in sorted(grades.items()):
        name = f"{image_path}:IVD{ivd}"
        if grade is None or (isinstance(grade, float) and math.isnan(grade)):
            yield Skip(name, "missing_label", f"IVD {ivd} has an empty Pfirrmann grade")
            continue
        if not (isinstance(grade, (int, float, np.number)) and float(grade).is_integer()
                and int(grade) in PFIRRMANN_GRADES):
            yield Skip(name, "label_out_of_range", f"Pfirrmann grade {grade!r} for IVD {ivd}; expected 1..5")
            continue
        voxels = np.argwhere(mask == IVD_OFFSET + ivd)  # (N, 3)
        if len(voxels) == 0:
            yield Skip(name, "empty_mask", f"IVD {ivd} (mask value {IVD_OFFSET + ivd}) is graded but absent "
                       f"from {mask_path}")
            continue
        centre = (affine @ np.append(voxels.mean(axis=0), 1.0))[:3]
        centre = snap_to_voxel_plane(centre, affine, normal=np.array([1.0, 0.0, 0.0]))
        plane = sample_plane(volume, affine, centre, SAGITTAL_DOWN, SAGITTAL_RIGHT, size, spacing, fill=window[0])
        labels = {"pfirrmann": int(grade), "ivd": ivd, "patient_id": item.patient, "source_file": source}
        yield safe_key(f"spider-{Path(image_path).stem}-ivd{ivd}"), window_to_uint8(plane, *window), labels


def spider_plan(root: str | Path, gradings_path: str | Path | None = None, *, sequence: str = "t2", size: int = 64,
                spacing: float = 1.0, percentiles: tuple[float, float] = (0.5, 99.5),
                fractions: Mapping[str, float] = DEFAULT_FRACTIONS, seed: int = 0, patient_column: str = "Patient",
                ivd_column: str = "IVD label", grade_column: str = "Pfirrman grade") -> Plan:
    """Find ``images/*_{sequence}.mha`` with masks under ``root``, read the gradings, describe the preparation."""
    root = Path(root)
    if size < 8 or spacing <= 0 or not 0 <= percentiles[0] < percentiles[1] <= 100:
        raise ValueError(f"size={size} must be >= 8, spacing={spacing} > 0, percentiles={percentiles} increasing")
    gradings_path = Path(gradings_path) if gradings_path else root / "radiological_gradings.csv"
    gradings = read_gradings(gradings_path, patient_column, ivd_column, grade_column)
    items, skipped = [], []
    for image in sorted((root / "images").glob(f"*_{sequence}.mha")):
        patient = image.name[: -len(f"_{sequence}.mha")]
        mask = root / "masks" / image.name
        if not mask.is_file():
            skipped.append(Skip(str(image), "missing_label", f"no mask {mask}"))
        elif patient not in gradings:
            skipped.append(Skip(str(image), "missing_label", f"patient {patient!r} has no rows in {gradings_path}"))
        else:
            items.append(WorkItem(str(image), patient, (str(image), str(mask), gradings[patient])))
    if not items:
        raise PrepareError(f"{root}: no images/*_{sequence}.mha with a mask and gradings ({len(skipped)} skipped)")
    load = functools.partial(_load_scan, size=size, spacing=spacing, percentiles=tuple(percentiles), root=str(root))
    config = {"sequence": sequence, "size": size, "spacing_mm": spacing, "percentiles": list(percentiles),
              "fractions": dict(fractions), "seed": seed}
    return Plan("spider", split_items_by_patient(items, fractions, seed), load, ("pfirrmann",), config,
                inputs={gradings_path.name: sha256_file(gradings_path)}, skipped=skipped)


def prepare_spider(root: str | Path, out_dir: str | Path, gradings_path: str | Path | None = None, *,
                   options: RunOptions = RunOptions(), **plan_kw: Any) -> PrepareResult:
    """SPIDER -> shards in ``out_dir``; ``plan_kw`` are :func:`spider_plan`'s keyword arguments."""
    return run_plan(spider_plan(root, gradings_path, **plan_kw), out_dir, options)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line options of ``python -m harness.data.prepare spider``."""
    parser.add_argument("root", type=Path, help="SPIDER folder with images/ and masks/")
    parser.add_argument("--gradings", type=Path, help="grading CSV (default: ROOT/radiological_gradings.csv)")
    parser.add_argument("--sequence", default="t2", help="file suffix of the series: t1, t2 or t2_SPACE")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--spacing", type=float, default=1.0, help="pixel spacing in mm (isotropic)")
    parser.add_argument("--percentiles", type=float, nargs=2, default=(0.5, 99.5), metavar=("LOW", "HIGH"))
    parser.add_argument("--patient-column", default="Patient")
    parser.add_argument("--ivd-column", default="IVD label")
    parser.add_argument("--grade-column", default="Pfirrman grade")
    add_split_arguments(parser)


def run_from_args(args: argparse.Namespace, options: RunOptions) -> PrepareResult:
    """Run the ``spider`` subcommand."""
    return prepare_spider(args.root, args.out, args.gradings, options=options, sequence=args.sequence,
                          size=args.size, spacing=args.spacing, percentiles=tuple(args.percentiles),
                          fractions=args.split_fractions, seed=args.split_seed, patient_column=args.patient_column,
                          ivd_column=args.ivd_column, grade_column=args.grade_column)
