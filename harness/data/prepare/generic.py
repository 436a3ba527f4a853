"""Generic sources described by a label table: an image folder, DICOM files or series, or NIfTI volumes.

The table (CSV or XLSX) has one row per input with a ``path`` column (relative to the root folder; names
configurable), label columns (default: every other column), and optionally a patient column (default: each
input is its own patient) and a split column (default: a deterministic patient-level split). Label values are
kept as numbers (integral values as int) or strings; an empty cell is a missing label and the input is
reported, as is a value outside ``label_ranges``.

* ``images``: PNG/JPG/TIFF files. 8-bit gray/RGB pixels are kept; 16-bit or float images are scaled by their
  0.5-99.5 percentiles. Image files under the root without a table row are reported (``missing_label``).
* ``dicom``: a row's path is a DICOM file (one 2D image: modality LUT, MONOCHROME1 inverted) or a folder holding
  one series (a volume, sliced by the slice rule).
* ``nifti``: a row's path is a NIfTI volume, sliced by the slice rule.

Volume slices are taken in RAS voxel order (see :mod:`harness.data.prepare.imaging`), resampled to square
pixels and scaled by ``intensity``: ``percentile`` (``window`` = low/high percentiles of the volume's
foreground), ``window`` (fixed values, e.g. HU) or, for DICOM, ``file`` (the file's own VOI window). Every
image is then brought to ``size`` by ``fit``; give ``size`` unless all inputs share one shape.
"""

from __future__ import annotations

import argparse
import functools
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

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
    FIT_METHODS,
    SliceRule,
    add_slice_arguments,
    check_finite,
    display_slice,
    display_spacing,
    fit_square,
    percentile_window,
    slice_rule_from_args,
    square_pixels,
    to_channels,
    voxel_spacing,
    window_to_uint8,
)
from harness.data.prepare.runner import run_plan
from harness.data.prepare.volumes import load_dicom_image, load_dicom_series, load_ras, to_ras

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
KINDS = ("images", "dicom", "nifti")
INTENSITIES = ("percentile", "window", "file")
SPLIT_ALIASES = {"validate": "val", "validation": "val", "valid": "val"}


def _to_uint8(values: np.ndarray, intensity: str, window: tuple[float, float]) -> np.ndarray:
    """Float pixels -> uint8 by the intensity rule (``file``: the values' own range, after the file's VOI)."""
    if intensity == "window":
        return window_to_uint8(values, *window)
    if intensity == "percentile":
        return window_to_uint8(values, *percentile_window(values, *window, mask=values > values.min()))
    low, high = float(values.min()), float(values.max())
    return window_to_uint8(values, low, high if high > low else low + 1.0)


def _read_picture(path: str) -> np.ndarray:
    """PNG/JPG/TIFF -> uint8 (H, W) or (H, W, 3) for 8-bit images, float32 (H, W) for 16-bit or float ones."""
    try:
        with Image.open(path) as picture:
            if getattr(picture, "n_frames", 1) > 1:
                raise BadInput("dimensionality", f"{path}: {picture.n_frames} frames; expected one 2D image")
            if picture.mode in ("L", "RGB"):
                return np.asarray(picture)
            if picture.mode in ("1", "LA", "La"):
                return np.asarray(picture.convert("L"))
            if picture.mode.startswith(("I", "F")):  # 16/32-bit integer or float gray
                values = np.asarray(picture, dtype=np.float32)
                check_finite(values, path)
                return values
            return np.asarray(picture.convert("RGB"))  # palette, RGBA, CMYK, YCbCr
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        if isinstance(exc, BadInput):
            raise
        raise BadInput("unreadable", f"{path}: cannot read as an image ({type(exc).__name__}: {exc})") from exc


def _volume_samples(volume_ras: np.ndarray, zooms: np.ndarray, item: WorkItem, rule: SliceRule, scale: Any,
                    finish: Any) -> Iterator[tuple[str, np.ndarray, dict[str, Any]]]:
    """Slices of a RAS volume chosen by ``rule`` -> samples keyed ``{input}-{axis}{index}``."""
    key, labels = item.payload[1], item.payload[2]
    row_spacing, col_spacing = display_spacing(zooms, rule.axis)
    scaled = scale(volume_ras).astype(np.float32)  # one intensity window for the whole volume, 0..255
    for index in rule.select(volume_ras, item.name):
        pixels = square_pixels(display_slice(scaled, rule.axis, index), row_spacing, col_spacing)
        image = finish(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
        yield f"{key}-{rule.axis}{index:03d}", image, {**labels, "slice": index}


def _load(item: WorkItem, *, kind: str, size: int | None, fit: str, channels: int | None, intensity: str,
          window: tuple[float, float], rule: SliceRule) -> Iterator[tuple[str, np.ndarray, dict[str, Any]]]:
    path, key, labels, _ = item.payload

    def finish(image: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(fit_square(to_channels(image, channels), size, fit))

    def scale(values: np.ndarray) -> np.ndarray:
        return _to_uint8(values, intensity, window)

    if kind == "images":
        picture = _read_picture(path)
        yield key, finish(picture if picture.dtype == np.uint8 else scale(picture)), dict(labels)
    elif kind == "nifti":
        yield from _volume_samples(*load_ras(path), item, rule, scale, finish)
    elif Path(path).is_dir():
        volume, affine = to_ras(*load_dicom_series(path))
        yield from _volume_samples(volume, voxel_spacing(affine), item, rule, scale, finish)
    else:
        yield key, finish(scale(load_dicom_image(path, use_file_window=intensity == "file"))), dict(labels)


def input_key(relative: str) -> str:
    """Sample key of an input path: its known file suffix dropped, other characters made key-safe."""
    lowered = relative.lower()
    suffix = next((s for s in (".nii.gz", ".nii", ".dcm", *IMAGE_SUFFIXES) if lowered.endswith(s)), "")
    return safe_key(relative[: len(relative) - len(suffix)])


def _label_value(value: Any) -> Any:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, np.number)):
        return int(value) if float(value).is_integer() else float(value)
    return str(value)


def table_plan(kind: str, root: str | Path, table_path: str | Path, *, path_column: str = "path",
               label_columns: tuple[str, ...] | None = None, patient_column: str | None = None,
               split_column: str | None = None, label_ranges: Mapping[str, tuple[float, float]] | None = None,
               size: int | None = None, fit: str = "resize", channels: int | None = 1, intensity: str = "percentile",
               window: tuple[float, float] = (0.5, 99.5), rule: SliceRule = SliceRule(),
               fractions: Mapping[str, float] = DEFAULT_FRACTIONS, seed: int = 0) -> Plan:
    """Describe the preparation of a table-driven source ``kind`` (``images``, ``dicom`` or ``nifti``)."""
    root, table_path = Path(root), Path(table_path)
    if kind not in KINDS or fit not in FIT_METHODS or intensity not in INTENSITIES or channels not in (None, 1, 3):
        raise ValueError(f"kind={kind!r} ({KINDS}), fit={fit!r} ({FIT_METHODS}), intensity={intensity!r} "
                         f"({INTENSITIES}), channels={channels} (None, 1, 3)")
    table = read_table(table_path)
    reserved = [c for c in (path_column, patient_column, split_column) if c]
    require_columns(table, reserved, table_path)
    columns = tuple(label_columns) if label_columns else tuple(c for c in table.columns if c not in reserved)
    require_columns(table, columns, table_path)
    ranges = dict(label_ranges or {})
    items: list[WorkItem] = []
    skipped: list[Skip] = []
    listed = set()
    for row in table.to_dict("records"):
        relative = str(row[path_column]).strip()
        path = root / relative
        listed.add(path.resolve())
        labels, problem = {}, None
        for column in columns:
            value = row[column]
            if value is None or (isinstance(value, float) and math.isnan(value)):
                problem = Skip(str(path), "missing_label", f"empty {column!r} in {table_path.name}")
                break
            value = _label_value(value)
            low, high = ranges.get(column, (-math.inf, math.inf))
            if column in ranges and not (isinstance(value, (int, float)) and low <= value <= high):
                problem = Skip(str(path), "label_out_of_range", f"{column}={value!r} outside [{low}, {high}]")
                break
            labels[column] = value
        if problem is None and not path.exists():
            problem = Skip(str(path), "unreadable", "file or folder not found")
        if problem is not None:
            skipped.append(problem)
            continue
        patient = str(row[patient_column]) if patient_column else relative
        labels.update(patient_id=patient, source_file=relative)
        split = str(row[split_column]).strip().lower() if split_column else ""
        if split_column and not re.fullmatch(r"[a-z0-9_]+", split):
            raise PrepareError(f"{table_path}: split {row[split_column]!r} of {relative!r} is not a split name "
                               "(letters, digits, underscores)")
        items.append(WorkItem(str(path), patient, (str(path), input_key(relative), labels,
                                                   SPLIT_ALIASES.get(split, split))))
    if kind == "images":
        for unlisted in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            if unlisted.resolve() not in listed:
                skipped.append(Skip(str(unlisted), "missing_label", f"no row in {table_path.name}"))
    if not items:
        raise PrepareError(f"{table_path}: no usable row ({len(skipped)} skipped)")
    if split_column:
        splits: dict[str, list[WorkItem]] = {}
        for item in items:
            splits.setdefault(item.payload[3], []).append(item)
    else:
        splits = split_items_by_patient(items, fractions, seed)
    load = functools.partial(_load, kind=kind, size=size, fit=fit, channels=channels, intensity=intensity,
                             window=tuple(window), rule=rule)
    config = {"kind": kind, "label_columns": list(columns), "label_ranges": {c: list(r) for c, r in ranges.items()},
              "size": size, "fit": fit, "channels": channels, "intensity": intensity, "window": list(window),
              "slice_rule": asdict(rule), "split_column": split_column,
              **({} if split_column else {"fractions": dict(fractions), "seed": seed})}
    return Plan(f"generic-{kind}", splits, load, columns, config,
                inputs={table_path.name: sha256_file(table_path)}, skipped=skipped)


def prepare_table_source(kind: str, root: str | Path, table_path: str | Path, out_dir: str | Path, *,
                         options: RunOptions = RunOptions(), **plan_kw: Any) -> PrepareResult:
    """An image folder / DICOM / NIfTI source with a label table -> shards; ``plan_kw`` as :func:`table_plan`."""
    return run_plan(table_plan(kind, root, table_path, **plan_kw), out_dir, options)


def add_arguments(parser: argparse.ArgumentParser, kind: str) -> None:
    """Command-line options of ``python -m harness.data.prepare {images,dicom,nifti}``."""
    parser.add_argument("root", type=Path, help="folder the table's paths are relative to")
    parser.add_argument("--table", type=Path, required=True, help="label table (.csv or .xlsx), one row per input")
    parser.add_argument("--path-column", default="path")
    parser.add_argument("--label-column", action="append", dest="label_columns",
                        help="label column (repeat); default: every column but path/patient/split")
    parser.add_argument("--label-range", action="append", default=[], metavar="COLUMN=LOW:HIGH",
                        help="allowed range of a label column, e.g. grade=0:3 (repeat)")
    parser.add_argument("--patient-column")
    parser.add_argument("--split-column", help="use this column as the split instead of a patient-level split")
    parser.add_argument("--size", type=int, required=kind != "images", help="output size (square)")
    parser.add_argument("--fit", choices=FIT_METHODS, default="resize")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=1)
    choices = INTENSITIES if kind == "dicom" else INTENSITIES[:2]
    parser.add_argument("--intensity", choices=choices, default="percentile")
    parser.add_argument("--window", type=float, nargs=2, default=(0.5, 99.5), metavar=("LOW", "HIGH"),
                        help="percentiles (--intensity percentile) or values such as HU (--intensity window)")
    if kind != "images":
        add_slice_arguments(parser, mode="middle", min_area=0.0)
    add_split_arguments(parser)


def _parse_ranges(texts: list[str]) -> dict[str, tuple[float, float]]:
    ranges = {}
    for text in texts:
        try:
            column, bounds = text.split("=", 1)
            low, high = (float(part) for part in bounds.split(":"))
        except ValueError as exc:
            raise ValueError(f"--label-range {text!r}: expected COLUMN=LOW:HIGH, e.g. grade=0:3") from exc
        ranges[column] = (low, high)
    return ranges


def run_from_args(args: argparse.Namespace, options: RunOptions, kind: str) -> PrepareResult:
    """Run the ``images``, ``dicom`` or ``nifti`` subcommand."""
    rule = slice_rule_from_args(args) if kind != "images" else SliceRule()
    return prepare_table_source(
        kind, args.root, args.table, args.out, options=options, path_column=args.path_column,
        label_columns=tuple(args.label_columns) if args.label_columns else None, patient_column=args.patient_column,
        split_column=args.split_column, label_ranges=_parse_ranges(args.label_range), size=args.size, fit=args.fit,
        channels=args.channels, intensity=args.intensity, window=tuple(args.window), rule=rule,
        fractions=args.split_fractions, seed=args.split_seed)
