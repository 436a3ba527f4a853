"""MIMIC-CXR-JPG (JPG files + metadata, CheXbert/CheXpert label, split and optional edema severity CSVs) -> shards.

Input, as released on PhysioNet: ``files/p{XX}/p{subject_id}/s{study_id}/{dicom_id}.jpg`` under a root folder;
``mimic-cxr-2.0.0-metadata.csv(.gz)`` (``dicom_id, subject_id, study_id, ViewPosition, ...``); a label table per
study (``subject_id, study_id`` and finding columns such as ``Lung Opacity``, values 1 positive, 0 negative,
-1 uncertain, blank not mentioned); ``mimic-cxr-2.0.0-split.csv(.gz)`` (``dicom_id, split`` with
train/validate/test, kept as the official patient-level split, ``validate`` named ``val``); and optionally the
pulmonary edema severity table (``dicom_id`` or ``subject_id, study_id`` and ``edema_severity`` or
``edeme_severity``, 0-3).

Images: views in ``views`` only (default AP, the portable bedside projection), decoded by PIL at a reduced JPEG
scale (DCT scaling, several times faster than a full decode of a ~3000 px image), gray, brought to ``size``
(default 256) by ``fit`` (default ``pad``: aspect ratio kept, black borders). Labels: ``findings`` (default
``lung_opacity``, ``pneumonia``, ``cardiomegaly``, ``edema``; ``all``: the 14 CheXpert columns, named in snake
case as in :data:`ALL_FINDINGS`), each 1/0 with uncertain (-1) mapped by ``uncertain`` ("keep" -1,
"positive" 1, "negative" 0, "ignore" null) and blank by ``blank`` ("negative" 0, "ignore" null); with a
severity table also ``edema_severity`` (0-3, -1 for images without a severity grade, so the column stays
numeric in every batch). Metadata: ``patient_id``, ``study_id``, ``view``, ``source_file``.

Tables are checked before any image is read, and a bad table stops the run naming the file and line (line 1 is
the header): a missing table or column, a label table column that is not one of the 14 CheXpert findings, a
label other than 1/0/-1/blank, a split other than train/validate/test, a severity grade other than 0-3, a
dicom_id listed twice, a patient in two splits. A study without a label row or an image without a split row is
an input left out (``missing_label``); an image that is missing or does not decode is ``unreadable``: left out
and listed under ``on_bad="skip"``, the end of the run (naming the file and its metadata line) under "stop".
"""

from __future__ import annotations

import argparse
import functools
import math
from collections.abc import Iterator, Mapping, Sequence
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
    sha256_file,
    split_items_by_patient,
)
from harness.data.prepare.imaging import FIT_METHODS, fit_square, to_channels
from harness.data.prepare.runner import run_plan

FINDINGS = {"lung_opacity": "Lung Opacity", "pneumonia": "Pneumonia", "cardiomegaly": "Cardiomegaly",
            "edema": "Edema"}  # the default label columns -> column of the CheXbert/CheXpert table
UNCERTAIN_POLICIES = {"keep": -1, "positive": 1, "negative": 0, "ignore": None}
BLANK_POLICIES = {"negative": 0, "ignore": None}
SPLIT_NAMES = {"train": "train", "validate": "val", "val": "val", "test": "test"}
SEVERITY_COLUMNS = ("edema_severity", "edeme_severity")  # the PhysioNet release spells it "edeme"
CHEXPERT_COLUMNS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
                    "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other",
                    "Pneumonia", "Pneumothorax", "Support Devices")  # the label tables' finding columns
ALL_FINDINGS = {column.lower().replace(" ", "_"): column for column in CHEXPERT_COLUMNS}  # snake_case -> column


def resolve_findings(findings: str | Sequence[str] | None) -> dict[str, str]:
    """The label columns to write: ``None`` -> the default four, ``"all"`` -> the 14 CheXpert findings, or a list
    of names (snake_case ``pleural_effusion`` or the table's ``Pleural Effusion``); ``ValueError`` (one line) for a
    name that is not a CheXpert finding."""
    if findings is None:
        return dict(FINDINGS)
    names = [findings] if isinstance(findings, str) else list(findings)
    names = [n.strip() for name in names for n in str(name).split(",") if n.strip()]
    if [n.lower() for n in names] == ["all"]:
        return dict(ALL_FINDINGS)
    by_column = {column: name for name, column in ALL_FINDINGS.items()}
    chosen: dict[str, str] = {}
    for name in names:
        key = name if name in ALL_FINDINGS else by_column.get(name, name.lower().replace(" ", "_"))
        if key not in ALL_FINDINGS:
            raise ValueError(f"error: --findings {name!r} is not a CheXpert finding; use 'all' or names from "
                             f"{list(ALL_FINDINGS)}")
        chosen[key] = ALL_FINDINGS[key]
    if not chosen:
        raise ValueError(f"error: --findings is empty; use 'all' or names from {list(ALL_FINDINGS)}")
    return chosen


def image_path(root: Path, subject_id: int, study_id: int, dicom_id: str) -> Path:
    """Where MIMIC-CXR-JPG keeps an image: ``files/p10/p10000032/s50414267/{dicom_id}.jpg``."""
    subject = str(subject_id)
    return root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study_id}" / f"{dicom_id}.jpg"


def map_finding(value: Any, uncertain: str, blank: str) -> int | None:
    """A CheXbert/CheXpert cell -> label (see the module docstring); ``ValueError`` for anything else."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return BLANK_POLICIES[blank]
    if value in (1, 0):
        return int(value)
    if value == -1:
        return UNCERTAIN_POLICIES[uncertain]
    raise ValueError(f"{value!r} is not 1, 0, -1 or blank")


def _shown(value: Any) -> str:
    """A table cell as a user wrote it (``2.0``, ``'training'``), not as numpy prints it."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def _line(index: int) -> int:
    """The line of a CSV holding the row with pandas index ``index`` (line 1 is the header)."""
    return int(index) + 2


def _load_jpg(item: WorkItem, *, size: int, fit: str, channels: int) -> Iterator[tuple[str, np.ndarray, dict]]:
    path, key, labels, where = item.payload
    try:
        with Image.open(path) as jpg:
            jpg.draft("L", (size, size))  # JPEG DCT scaling: decode at the smallest scale still >= size
            image = np.asarray(jpg.convert("L"))  # (H, W) uint8
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise BadInput("unreadable", f"{path} ({where}): cannot decode image ({reason})") from exc
    yield key, to_channels(fit_square(image, size, fit), channels), dict(labels)


def _severity_lookup(path: Path) -> tuple[list[str], Any]:
    """(join columns, table with ``edema_severity``) from the severity CSV."""
    table = read_table(path)
    column = next((c for c in SEVERITY_COLUMNS if c in table.columns), None)
    if column is None:
        raise PrepareError(f"{path}: no severity column {SEVERITY_COLUMNS}; the table has {list(table.columns)}")
    keys = ["dicom_id"] if "dicom_id" in table.columns else ["subject_id", "study_id"]
    require_columns(table, keys, path)
    table = table.rename(columns={column: "edema_severity"})[[*keys, "edema_severity"]]
    grades = table["edema_severity"]
    bad = ~(grades.isna() | grades.isin([0, 1, 2, 3]))
    if bad.any():
        index = bad.idxmax()
        raise PrepareError(f"{path} line {_line(index)}: {column} {_shown(grades[index])} is not a grade 0-3 or blank; "
                           "fix the table")
    return keys, table.drop_duplicates(subset=keys)


def _check_labels(labels: Any, path: str | Path) -> None:
    """``PrepareError`` for a column that is no CheXpert finding or a value other than 1, 0, -1 or blank."""
    unknown = [c for c in labels.columns if c not in ("subject_id", "study_id", *CHEXPERT_COLUMNS)]
    if unknown:
        raise PrepareError(f"{path}: unknown column(s) {unknown}; a label table has subject_id, study_id and "
                           f"CheXpert findings {list(CHEXPERT_COLUMNS)}")
    for column in [c for c in CHEXPERT_COLUMNS if c in labels.columns]:
        values = labels[column]
        bad = ~(values.isna() | values.isin([1, 0, -1]))
        if bad.any():
            index = bad.idxmax()
            raise PrepareError(f"{path} line {_line(index)} (study {labels['study_id'][index]}): {column} "
                               f"{_shown(values[index])} is not 1, 0, -1 or blank; fix the table")


def _check_metadata(meta: Any, path: str | Path) -> None:
    """``PrepareError`` for a dicom_id listed twice or a row without ids."""
    missing = meta[["dicom_id", "subject_id", "study_id"]].isna().any(axis=1)
    if missing.any():
        raise PrepareError(f"{path} line {_line(missing.idxmax())}: dicom_id, subject_id or study_id is blank")
    twice = meta["dicom_id"].duplicated(keep="first")
    if twice.any():
        index = twice.idxmax()
        first = meta.index[meta["dicom_id"] == meta["dicom_id"][index]][0]
        raise PrepareError(f"{path} line {_line(index)}: dicom_id {meta['dicom_id'][index]!r} is listed again "
                           f"(first on line {_line(first)}); each image must be listed once")


def _check_splits(splits: Any, meta: Any, path: str | Path) -> None:
    """``PrepareError`` for a split name other than train/validate/test or a patient in two splits."""
    names = splits["split"].astype(str).str.strip().str.lower()
    bad = ~names.isin(list(SPLIT_NAMES))
    if bad.any():
        index = bad.idxmax()
        raise PrepareError(f"{path} line {_line(index)} (dicom_id {splits['dicom_id'][index]}): split "
                           f"{_shown(splits['split'][index])} is not one of train, validate, test; fix the table")
    with_subject = splits.assign(_split=names.map(SPLIT_NAMES), _line=[_line(i) for i in splits.index])
    if "subject_id" not in with_subject.columns:
        with_subject = with_subject.merge(meta[["dicom_id", "subject_id"]], on="dicom_id", how="inner")
    first_split = with_subject.groupby("subject_id")["_split"].transform("first")
    moved = with_subject[with_subject["_split"] != first_split]
    if len(moved):
        row = moved.iloc[0]
        other = with_subject[(with_subject["subject_id"] == row["subject_id"])].iloc[0]
        raise PrepareError(f"{path} line {row['_line']} (dicom_id {row['dicom_id']}): patient {row['subject_id']} "
                           f"is in split {row['_split']!r} here and {other['_split']!r} on line {other['_line']}; "
                           "a patient's images must share one split")


def mimic_plan(root: str | Path, metadata_csv: str | Path, labels_csv: str | Path,
               split_csv: str | Path | None = None, severity_csv: str | Path | None = None, *,
               views: Sequence[str] | None = ("AP",), size: int = 256, fit: str = "pad", channels: int = 1,
               uncertain: str = "keep", blank: str = "negative", fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
               seed: int = 0, findings: str | Sequence[str] | None = None) -> Plan:
    """Join the MIMIC-CXR-JPG tables and describe the preparation (one work item per image); ``findings`` as in
    :func:`resolve_findings`."""
    root = Path(root)
    chosen = resolve_findings(findings)  # a bad name is refused before any table is read
    if not (root / "files").is_dir():
        raise PrepareError(f"{root}: no files/ folder; pass the MIMIC-CXR-JPG folder that holds files/p10 ...")
    if uncertain not in UNCERTAIN_POLICIES or blank not in BLANK_POLICIES or fit not in FIT_METHODS or size < 8:
        raise ValueError(f"uncertain={uncertain!r} ({list(UNCERTAIN_POLICIES)}), blank={blank!r} "
                         f"({list(BLANK_POLICIES)}), fit={fit!r} ({FIT_METHODS}), size={size} (>= 8)")
    meta = read_table(metadata_csv, dtype={"dicom_id": str})
    require_columns(meta, ("dicom_id", "subject_id", "study_id", "ViewPosition"), metadata_csv)
    _check_metadata(meta, metadata_csv)
    meta = meta.assign(_line=[_line(i) for i in meta.index])
    filtered = {}
    if views is not None:
        keep = meta["ViewPosition"].isin(list(views))
        if (~keep).sum():
            filtered[f"view not in {list(views)}"] = int((~keep).sum())
        meta = meta[keep]
    labels = read_table(labels_csv)
    require_columns(labels, ("subject_id", "study_id", *chosen.values()), labels_csv)
    _check_labels(labels, labels_csv)
    table = meta.merge(labels[["subject_id", "study_id", *chosen.values()]].drop_duplicates(["subject_id",
                       "study_id"]), on=["subject_id", "study_id"], how="left", indicator="_labels")
    inputs = {Path(p).name: sha256_file(p) for p in (metadata_csv, labels_csv, split_csv, severity_csv) if p}
    if split_csv is not None:
        splits_table = read_table(split_csv, dtype={"dicom_id": str})
        require_columns(splits_table, ("dicom_id", "split"), split_csv)
        _check_splits(splits_table, meta, split_csv)
        table = table.merge(splits_table[["dicom_id", "split"]].drop_duplicates("dicom_id"), on="dicom_id",
                            how="left")
    if severity_csv is not None:
        keys, severity = _severity_lookup(Path(severity_csv))
        table = table.merge(severity, on=keys, how="left")
    table = table.sort_values(["subject_id", "study_id", "dicom_id"])

    items: dict[str, list[WorkItem]] = {}
    skipped: list[Skip] = []
    for row in table.to_dict("records"):
        path = image_path(root, row["subject_id"], row["study_id"], row["dicom_id"])
        name = str(path.relative_to(root))
        if row["_labels"] != "both":
            skipped.append(Skip(name, "missing_label", f"study {row['study_id']} has no row in {labels_csv}"))
            continue
        sample_labels = {column: map_finding(row[source], uncertain, blank) for column, source in chosen.items()}
        if severity_csv is not None:
            grade = row["edema_severity"]
            sample_labels["edema_severity"] = -1 if isinstance(grade, float) and math.isnan(grade) else int(grade)
        split = "all"
        if split_csv is not None:
            split = SPLIT_NAMES.get(str(row["split"]).strip().lower()) if isinstance(row["split"], str) else None
            if split is None:
                skipped.append(Skip(name, "missing_label", f"no valid split for dicom {row['dicom_id']} in "
                                    f"{split_csv} (got {row['split']!r})"))
                continue
        sample_labels.update(patient_id=str(row["subject_id"]), study_id=str(row["study_id"]),
                             view=str(row["ViewPosition"]), source_file=name)
        where = f"{Path(metadata_csv).name} line {row['_line']}"
        items.setdefault(split, []).append(WorkItem(name, str(row["subject_id"]),
                                                    (str(path), str(row["dicom_id"]), sample_labels, where)))
    if not items:
        raise PrepareError(f"{metadata_csv}: no image left to prepare ({len(skipped)} skipped, filtered {filtered})")
    if split_csv is None:
        items = split_items_by_patient(items["all"], fractions, seed)
    load = functools.partial(_load_jpg, size=size, fit=fit, channels=channels)
    label_columns = (*chosen, *(("edema_severity",) if severity_csv is not None else ()))
    config = {"views": list(views) if views is not None else None, "size": size, "fit": fit, "channels": channels,
              "uncertain": uncertain, "blank": blank, "official_split": split_csv is not None,
              **({} if chosen == FINDINGS else {"findings": list(chosen)}),  # the default keeps older fingerprints
              **({} if split_csv is not None else {"fractions": dict(fractions), "seed": seed})}
    return Plan("mimic-cxr-jpg", items, load, label_columns, config, inputs=inputs, skipped=skipped,
                filtered=filtered)


def prepare_mimic_cxr(root: str | Path, out_dir: str | Path, metadata_csv: str | Path, labels_csv: str | Path,
                      split_csv: str | Path | None = None, severity_csv: str | Path | None = None, *,
                      options: RunOptions = RunOptions(), **plan_kw: Any) -> PrepareResult:
    """MIMIC-CXR-JPG -> shards in ``out_dir``; ``plan_kw`` are :func:`mimic_plan`'s keyword arguments."""
    return run_plan(mimic_plan(root, metadata_csv, labels_csv, split_csv, severity_csv, **plan_kw), out_dir, options)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line options of ``python -m harness.data.prepare mimic-cxr``."""
    parser.add_argument("root", type=Path, help="MIMIC-CXR-JPG folder (holding files/)")
    parser.add_argument("--metadata", type=Path, required=True, help="mimic-cxr-2.0.0-metadata.csv(.gz)")
    parser.add_argument("--labels", type=Path, required=True, help="CheXbert or CheXpert labels per study")
    parser.add_argument("--split", type=Path, help="mimic-cxr-2.0.0-split.csv(.gz); default: patient-level split")
    parser.add_argument("--severity", type=Path, help="edema severity CSV (optional)")
    parser.add_argument("--views", nargs="+", default=["AP"], help="ViewPosition values to keep ('all': every view)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--fit", choices=FIT_METHODS, default="pad")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=1)
    parser.add_argument("--uncertain", choices=sorted(UNCERTAIN_POLICIES), default="keep")
    parser.add_argument("--blank", choices=sorted(BLANK_POLICIES), default="negative")
    parser.add_argument("--findings", nargs="+", default=None,
                        help="label columns: 'all' (the 14 CheXpert findings, snake_case) or names such as "
                             "pleural_effusion 'Support Devices' (default: lung_opacity pneumonia cardiomegaly edema)")
    add_split_arguments(parser)


def run_from_args(args: argparse.Namespace, options: RunOptions) -> PrepareResult:
    """Run the ``mimic-cxr`` subcommand."""
    views = None if [v.lower() for v in args.views] == ["all"] else args.views
    return prepare_mimic_cxr(args.root, args.out, args.metadata, args.labels, args.split, args.severity,
                             options=options, views=views, size=args.size, fit=args.fit, channels=args.channels,
                             uncertain=args.uncertain, blank=args.blank, fractions=args.split_fractions,
                             seed=args.split_seed, findings=args.findings)
