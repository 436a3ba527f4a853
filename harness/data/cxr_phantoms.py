"""``python -m harness.data.cxr_phantoms OUT --images N``: a MIMIC-CXR-JPG-shaped corpus of chest X-ray phantoms.

OUT gets the released layout and tables, so the MIMIC-CXR preparer reads it unchanged::

    files/p10/p10000032/s50000512/<dicom_id>.jpg    greyscale JPEG, --size pixels square
    mimic-cxr-2.0.0-metadata.csv.gz                 dicom_id, subject_id, study_id, ViewPosition, Rows, ...
    mimic-cxr-2.0.0-chexpert.csv.gz                 subject_id, study_id, the 14 CheXpert columns (1/0/-1/blank)
    mimic-cxr-2.0.0-split.csv.gz                    dicom_id, study_id, subject_id, split (patient-disjoint)
    mimic-cxr-edema-severity.csv.gz                 subject_id, study_id, edema_severity 0-3 (heart-failure patients)
    cxr-phantom-parameters.csv.gz                   dicom_id + every render parameter: the ground truth
    cxr-phantom-corpus.json                         seed, images, size, counts (written last: OUT is complete)

Work goes into ``OUT.partial`` in shards of whole patients; each finished shard leaves a marker, so a run
started again after a kill renders only the unfinished shards. The tables are written last and the folder is
renamed to OUT at the end. See docs/cxr_phantoms.md, and :mod:`harness.data.cxr_render` for the images.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from harness import fileio
from harness.data.cxr_cohort import draw_patient
from harness.data.cxr_render import FINDINGS, render, render_counterfactual
from harness.data.prepare.common import assign_patient_splits
from harness.data.prepare.mimic_cxr import CHEXPERT_COLUMNS
from harness.errors import UserError

CORPUS_RECORD = "cxr-phantom-corpus.json"
PARAMETERS_TABLE = "cxr-phantom-parameters.csv.gz"
TABLES = {"metadata": "mimic-cxr-2.0.0-metadata.csv.gz", "chexpert": "mimic-cxr-2.0.0-chexpert.csv.gz",
          "split": "mimic-cxr-2.0.0-split.csv.gz", "severity": "mimic-cxr-edema-severity.csv.gz"}
SPLIT_FRACTIONS = {"train": 0.9, "validate": 0.05, "test": 0.05}
SEVERITY_OTHERS = 0.1  # share of studies of patients without heart failure that also have a severity grade
GENERATOR_VERSION = 1
MAX_IMAGES_PER_SHARD = 500  # a shard is the unit of resumption; small corpora get >= 16 shards for the workers
JPEG_QUALITY = 90
_DONE = ".done"  # finished-shard markers inside OUT.partial
_VIEW_TEXT = {"PA": ("CHEST (PA AND LAT)", "postero-anterior", "Erect"),
              "LATERAL": ("CHEST (PA AND LAT)", "lateral", "Erect"),
              "AP": ("CHEST (PORTABLE AP)", "antero-posterior", "Recumbent")}
_NOT_PARAMETERS = ("labels", "StudyDate", "StudyTime")


class CorpusError(UserError, ValueError):
    """A bad argument or an output folder that may not be touched; the message says what to do."""


def image_relpath(subject_id: int, study_id: int, dicom_id: str) -> str:
    """``files/pNN/pNNNNNNNN/sNNNNNNNN/<dicom_id>.jpg``, as in MIMIC-CXR-JPG."""
    subject = str(subject_id)
    return f"files/p{subject[:2]}/p{subject}/s{study_id}/{dicom_id}.jpg"


def draw_corpus(seed: int, images: int, size: int) -> list[list[dict[str, Any]]]:
    """Image records grouped by patient, exactly ``images`` in all (the last patient may lose images)."""
    patients, total, index = [], 0, 0
    while total < images:
        records = draw_patient(seed, index, size)[:images - total]
        patients.append(records)
        total += len(records)
        index += 1
    return patients


def images_per_shard(images: int) -> int:
    """Shard size: depends on the corpus size only, so a resumed run cuts the same shards."""
    return max(20, min(MAX_IMAGES_PER_SHARD, images // 16))


def _shards(patients: list[list[dict[str, Any]]], per_shard: int) -> list[list[dict[str, Any]]]:
    """Consecutive whole patients, about ``per_shard`` images per shard."""
    shards, current = [], []
    for records in patients:
        current.extend(records)
        if len(current) >= per_shard:
            shards.append(current)
            current = []
    return shards + ([current] if current else [])


def _render_shard(task: tuple[Path, int, list[dict[str, Any]], int]) -> int:
    """Render and write one shard's JPEGs, then its marker; returns its image count."""
    folder, index, records, quality = task
    made: set[Path] = set()
    for record in records:
        path = folder / image_relpath(record["subject_id"], record["study_id"], record["dicom_id"])
        if path.parent not in made:
            path.parent.mkdir(parents=True, exist_ok=True)
            made.add(path.parent)
        # A plain write is enough: a shard without its marker is rendered again in full, and only a finished
        # OUT.partial is renamed to OUT, so no reader ever sees a half-written JPEG.
        Image.fromarray(render(parameters_of(record))).save(path, format="JPEG", quality=quality)
    fileio.atomic_write_text(folder / _DONE / f"shard-{index:06d}", str(len(records)))
    return len(records)


def parameters_of(record: dict[str, Any]) -> dict[str, Any]:
    """The render parameters of an image record (drops labels and report dates)."""
    return {k: v for k, v in record.items() if k not in _NOT_PARAMETERS}


def _tables(patients: list[list[dict[str, Any]]], seed: int) -> dict[str, pd.DataFrame]:
    records = [r for group in patients for r in group]
    metadata = pd.DataFrame({
        "dicom_id": [r["dicom_id"] for r in records], "subject_id": [r["subject_id"] for r in records],
        "study_id": [r["study_id"] for r in records],
        "PerformedProcedureStepDescription": [_VIEW_TEXT[r["view"]][0] for r in records],
        "ViewPosition": [r["view"] for r in records], "Rows": [r["size"] for r in records],
        "Columns": [r["size"] for r in records], "StudyDate": [r["StudyDate"] for r in records],
        "StudyTime": [r["StudyTime"] for r in records],
        "ProcedureCodeSequence_CodeMeaning": [_VIEW_TEXT[r["view"]][0] for r in records],
        "ViewCodeSequence_CodeMeaning": [_VIEW_TEXT[r["view"]][1] for r in records],
        "PatientOrientationCodeSequence_CodeMeaning": [_VIEW_TEXT[r["view"]][2] for r in records]})
    studies = {(r["subject_id"], r["study_id"]): r for r in records}  # first image of each study
    chexpert = pd.DataFrame([{"subject_id": s, "study_id": t, **r["labels"]} for (s, t), r in studies.items()],
                            columns=["subject_id", "study_id", *CHEXPERT_COLUMNS])
    split_of = assign_patient_splits((str(r["subject_id"]) for r in records), SPLIT_FRACTIONS, seed)
    split = pd.DataFrame({"dicom_id": metadata["dicom_id"], "study_id": metadata["study_id"],
                          "subject_id": metadata["subject_id"],
                          "split": [split_of[str(s)] for s in metadata["subject_id"]]})
    rng = np.random.default_rng([seed, 2**31 - 1])
    graded = [(s, t, int(r["edema_grade"])) for (s, t), r in studies.items()
              if r["heart_failure"] or rng.random() < SEVERITY_OTHERS]
    severity = pd.DataFrame(graded, columns=["subject_id", "study_id", "edema_severity"])
    parameters = pd.DataFrame([parameters_of(r) for r in records])
    return {"metadata": metadata, "chexpert": chexpert, "split": split, "severity": severity,
            "parameters": parameters}


def _write_table(table: pd.DataFrame, path: Path) -> None:
    buffer = io.BytesIO()
    table.to_csv(buffer, index=False, compression={"method": "gzip", "mtime": 0})  # same bytes on every run
    fileio.atomic_write_bytes(path, buffer.getvalue())


def load_parameters(root: str | Path) -> pd.DataFrame:
    """The stored parameter table of a corpus, indexed by ``dicom_id``."""
    path = Path(root) / PARAMETERS_TABLE
    if not path.is_file():
        raise CorpusError(f"{path}: not found; is {root} a corpus written by python -m harness.data.cxr_phantoms?")
    return pd.read_csv(path, dtype={"dicom_id": str, "consolidation_lobe": str, "view": str}).set_index("dicom_id")


def stored_parameters(root: str | Path, dicom_id: str) -> dict[str, Any]:
    """One image's parameters as stored: ``render(stored_parameters(root, d))`` re-renders image ``d``."""
    table = load_parameters(root)
    if dicom_id not in table.index:
        raise CorpusError(f"{root}/{PARAMETERS_TABLE}: no image {dicom_id!r}")
    return {"dicom_id": dicom_id, **table.loc[dicom_id].to_dict()}


def true_counterfactual(root: str | Path, dicom_id: str, finding: str, new_severity: int) -> np.ndarray:
    """The true counterfactual of a stored image: same patient, exposure and noise, one finding at a new grade."""
    return render_counterfactual(stored_parameters(root, dicom_id), finding, new_severity)


def _settings(seed: int, images: int, size: int, quality: int) -> dict[str, Any]:
    return {"generator": "harness.data.cxr_phantoms", "version": GENERATOR_VERSION, "seed": seed,
            "images": images, "size": size, "jpeg_quality": quality, "images_per_shard": images_per_shard(images)}


def _claim(out: Path, partial: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Refuse to touch a finished corpus (or another folder) without ``overwrite``; reset a stale partial."""
    if out.exists() and not overwrite:
        what = "a complete corpus" if (out / CORPUS_RECORD).is_file() else "a folder that is not a phantom corpus"
        raise CorpusError(f"{out} already exists ({what}); pass --overwrite to replace it or choose another OUT")
    record = partial / _DONE / "settings.json"
    if partial.exists():
        same = record.is_file() and json.loads(record.read_text()) == settings
        if not same and not overwrite:
            raise CorpusError(f"{partial} holds an unfinished corpus with other settings; pass --overwrite to "
                              "discard it, or rerun with its settings to finish it")
        if not same or overwrite:
            shutil.rmtree(partial)
    fileio.write_json_atomic(record, settings)


def generate_corpus(out: str | Path, images: int, seed: int = 0, size: int = 256, workers: int = 1,
                    quality: int = JPEG_QUALITY, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Write the corpus (see the module docstring); returns the corpus record. Resumes an interrupted run."""
    if images < 1 or not 32 <= size <= 2048 or workers < 1 or not 1 <= quality <= 100:
        raise CorpusError(f"images={images} (>= 1), size={size} (32..2048), workers={workers} (>= 1), "
                          f"quality={quality} (1..100): fix the out-of-range value")
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    settings = _settings(seed, images, size, quality)
    _claim(out, partial, settings, overwrite)
    patients = draw_corpus(seed, images, size)
    shards = _shards(patients, images_per_shard(images))
    todo = [(partial, i, shard, quality) for i, shard in enumerate(shards)
            if not (partial / _DONE / f"shard-{i:06d}").is_file()]
    with tqdm(total=images, initial=images - sum(len(t[2]) for t in todo), unit="img", desc="cxr phantoms",
              disable=not progress) as bar:
        if workers == 1 or len(todo) <= 1:
            for task in todo:
                bar.update(_render_shard(task))
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for count in pool.map(_render_shard, todo):
                    bar.update(count)
    tables = _tables(patients, seed)
    for name, table in tables.items():
        _write_table(table, partial / (PARAMETERS_TABLE if name == "parameters" else TABLES[name]))
    counts = {"images": images, "patients": len(patients), "studies": int(tables["chexpert"].shape[0]),
              "views": {k: int(n) for k, n in tables["metadata"]["ViewPosition"].value_counts().items()},
              "splits": {k: int(n) for k, n in tables["split"]["split"].value_counts().items()},
              "grades": {f: {str(g): int(n) for g, n in tables["parameters"][f"{f}_grade"].value_counts()
                             .sort_index().items()} for f in FINDINGS}}
    corpus = {**settings, "counts": counts, "tables": {**TABLES, "parameters": PARAMETERS_TABLE}}
    fileio.write_json_atomic(partial / CORPUS_RECORD, corpus, sort_keys=True)
    shutil.rmtree(partial / _DONE)
    if out.exists():  # only with overwrite (checked in _claim)
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(partial, out)
        shutil.rmtree(old)
    else:
        os.replace(partial, out)
    return corpus


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one ``error:`` line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see python -m harness.data.cxr_phantoms --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m harness.data.cxr_phantoms", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="output folder (MIMIC-CXR-JPG layout)")
    parser.add_argument("--images", type=int, required=True, help="number of images (MIMIC-CXR scale: 166000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="processes (default: cores)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--quality", type=int, default=JPEG_QUALITY, help="JPEG quality (default 90)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and write the corpus; 2 and one ``error:`` line for a bad argument or output folder."""
    args = build_parser().parse_args(argv)
    try:
        corpus = generate_corpus(args.out, args.images, seed=args.seed, size=args.size, workers=args.workers,
                                 quality=args.quality, overwrite=args.overwrite, progress=not args.no_progress)
    except CorpusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    counts = corpus["counts"]
    print(f"{args.out}: {counts['images']} images, {counts['patients']} patients, {counts['studies']} studies; "
          f"views {counts['views']}; splits {counts['splits']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
