"""MIMIC-CXR-JPG preparer on a tiny tree in the released layout (JPGs + metadata/label/split/severity CSVs)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from harness.data.prepare import PrepareError, RunOptions, prepare_mimic_cxr
from harness.data.prepare.__main__ import main as prepare_main
from harness.data.prepare.mimic_cxr import image_path

QUIET = RunOptions(items_per_shard=2, progress=False)
# dicom_id, subject, study, view, split
IMAGES = [("d1", 10000001, 50000001, "AP", "train"), ("d2", 10000001, 50000001, "PA", "train"),
          ("d3", 10000002, 50000002, "AP", "train"), ("d4", 11000003, 50000003, "AP", "validate"),
          ("d5", 12000004, 50000004, "AP", "test"), ("d6", 12000004, 50000005, "AP", "test"),
          ("d7", 10000002, 50000006, "AP", "train"), ("d8", 11000003, 50000007, "AP", "validate")]
# per study: Lung Opacity, Pneumonia, Cardiomegaly, Edema (None = blank); study 50000006 has no label row
LABELS = {50000001: (1.0, None, 0.0, -1.0), 50000002: (0.0, 1.0, -1.0, None), 50000003: (None, None, 1.0, 1.0),
          50000004: (1.0, 0.0, 0.0, 0.0), 50000005: (-1.0, -1.0, None, 1.0), 50000007: (1.0, 1.0, 1.0, 1.0)}


@pytest.fixture
def mimic(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "mimic-cxr-jpg"
    rng = np.random.default_rng(0)
    for dicom, subject, study, _, _ in IMAGES:
        if dicom == "d8":
            continue  # listed in the metadata, file missing
        path = image_path(root, subject, study, dicom)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(60, 250, (48, 64), dtype=np.uint8)).save(path, quality=90)  # landscape
    tables = {
        "metadata": pd.DataFrame([(d, s, t, v) for d, s, t, v, _ in IMAGES],
                                 columns=["dicom_id", "subject_id", "study_id", "ViewPosition"]),
        "labels": pd.DataFrame([(10000001 if t == 50000001 else 0, t, *v) for t, v in LABELS.items()],
                               columns=["subject_id", "study_id", "Lung Opacity", "Pneumonia", "Cardiomegaly",
                                        "Edema"]),
        "split": pd.DataFrame([(d, t, s, sp) for d, s, t, _, sp in IMAGES],
                              columns=["dicom_id", "study_id", "subject_id", "split"]),
        "severity": pd.DataFrame([(10000002, 50000002, "d3", 2), (12000004, 50000004, "d5", 0)],
                                 columns=["subject_id", "study_id", "dicom_id", "edeme_severity"]),
    }
    subjects = {t: s for _, s, t, _, _ in IMAGES}
    tables["labels"]["subject_id"] = tables["labels"]["study_id"].map(subjects)
    paths = {"root": root}
    for name, table in tables.items():
        paths[name] = tmp_path / f"{name}.csv.gz"
        table.to_csv(paths[name], index=False)
    return paths


def test_ap_filter_labels_splits_and_severity(mimic, tmp_path, read_shards):
    result = prepare_mimic_cxr(mimic["root"], tmp_path / "out", mimic["metadata"], mimic["labels"], mimic["split"],
                               mimic["severity"], size=32, options=QUIET)
    manifest = result.manifest
    assert manifest["prepare"]["filtered"] == {"view not in ['AP']": 1}  # d2 is PA
    assert {s: e["count"] for s, e in manifest["splits"].items()} == {"train": 2, "val": 1, "test": 2}
    assert sorted((Path(s.input).name, s.kind) for s in result.skipped) == [("d7.jpg", "missing_label"),
                                                                           ("d8.jpg", "unreadable")]
    samples = {k: v for split in manifest["splits"] for k, v in read_shards(tmp_path / "out", split).items()}
    assert set(samples) == {"d1", "d3", "d4", "d5", "d6"}
    image, labels = samples["d1"]
    assert labels == {"lung_opacity": 1, "pneumonia": 0, "cardiomegaly": 0, "edema": -1, "edema_severity": -1,
                      "patient_id": "10000001", "study_id": "50000001", "view": "AP",
                      "source_file": "files/p10/p10000001/s50000001/d1.jpg"}
    assert samples["d3"][1]["edema_severity"] == 2 and samples["d3"][1]["cardiomegaly"] == -1
    assert image.shape == (32, 32) and image[:4].max() == 0 and image[-4:].max() == 0  # 64x48 padded: black bars
    assert image[8:24].min() > 0
    assert manifest["splits"]["test"]["label_counts"]["edema"] == {"0": 1, "1": 1}
    assert manifest["prepare"]["label_columns"] == ["lung_opacity", "pneumonia", "cardiomegaly", "edema",
                                                    "edema_severity"]


def test_uncertain_and_blank_policies_and_patient_split(mimic, tmp_path, read_shards):
    result = prepare_mimic_cxr(mimic["root"], tmp_path / "out", mimic["metadata"], mimic["labels"], size=16,
                               fit="crop", uncertain="positive", blank="ignore", views=None,
                               fractions={"train": 0.5, "test": 0.5}, options=QUIET)
    samples = {k: v for split in result.manifest["splits"] for k, v in read_shards(tmp_path / "out", split).items()}
    assert "d2" in samples  # every view kept
    assert samples["d1"][1]["edema"] == 1 and samples["d1"][1]["pneumonia"] is None  # -1 -> 1, blank -> null
    assert "edema_severity" not in samples["d1"][1]
    split_of = {labels["patient_id"]: split for split in result.manifest["splits"]
                for _, labels in read_shards(tmp_path / "out", split).values()}
    assert len(split_of) == 4 and set(split_of.values()) == {"train", "test"}
    assert result.manifest["prepare"]["patients"] == {"train": 2, "test": 2}


def test_bad_tables_and_stop_mode(mimic, tmp_path):
    broken = tmp_path / "labels_bad.csv"
    pd.read_csv(mimic["labels"]).drop(columns=["Edema"]).to_csv(broken, index=False)
    with pytest.raises(PrepareError, match=r"labels_bad.csv: missing column\(s\) \['Edema'\]"):
        prepare_mimic_cxr(mimic["root"], tmp_path / "a", mimic["metadata"], broken, options=QUIET)
    with pytest.raises(PrepareError, match="d7.jpg: study 50000006 has no row"):
        prepare_mimic_cxr(mimic["root"], tmp_path / "c", mimic["metadata"], mimic["labels"], mimic["split"],
                          size=16, options=RunOptions(on_bad="stop", progress=False))
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def _edit(mimic: dict[str, Path], name: str, change) -> None:
    table = pd.read_csv(mimic[name], dtype={"dicom_id": str})
    change(table)
    table.to_csv(mimic[name], index=False)


# case -> (edit of the fixture's tree, text the one error line must contain)
BAD_INPUTS = {
    "missing table": (lambda m: m["labels"].unlink(), r"labels\.csv\.gz: table not found"),
    "unknown label column": (lambda m: _edit(m, "labels", lambda t: t.insert(2, "Lung Opacty", 1.0)),
                             r"labels\.csv\.gz: unknown column\(s\) \['Lung Opacty'\]"),
    "unknown label value": (lambda m: _edit(m, "labels", lambda t: t.__setitem__("Pneumonia", [0, 2, 0, 0, 0, 0])),
                            r"labels\.csv\.gz line 3 \(study 50000002\): Pneumonia 2 is not 1, 0, -1"),
    "unknown split": (lambda m: _edit(m, "split", lambda t: t.loc.__setitem__((4, "split"), "training")),
                      r"split\.csv\.gz line 6 \(dicom_id d5\): split 'training' is not one of"),
    "unknown severity": (lambda m: _edit(m, "severity", lambda t: t.loc.__setitem__((1, "edeme_severity"), 5)),
                         r"severity\.csv\.gz line 3: edeme_severity 5 is not a grade 0-3"),
    "patient in two splits": (lambda m: _edit(m, "split", lambda t: t.loc.__setitem__((6, "split"), "test")),
                              r"split\.csv\.gz line 8 \(dicom_id d7\): patient 10000002 is in split 'test' "
                              r"here and 'train' on line 4"),
    "dicom listed twice": (lambda m: _edit(m, "metadata", lambda t: t.loc.__setitem__((7, "dicom_id"), "d3")),
                           r"metadata\.csv\.gz line 9: dicom_id 'd3' is listed again \(first on line 4\)"),
    "jpeg does not decode": (lambda m: (_edit(m, "labels", lambda t: t.loc.__setitem__(len(t), [10000002, 50000006,
                                                                                         1, 1, 1, 1])),
                                        image_path(m["root"], 10000002, 50000002, "d3").write_bytes(b"\xff\xd8junk")),
                             r"d3\.jpg \(metadata\.csv\.gz line 4\): cannot decode image"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, mimic, tmp_path, capsys):
    edit, expected = BAD_INPUTS[case]
    edit(mimic)
    out = tmp_path / "out"
    status = prepare_main(["mimic-cxr", str(mimic["root"]), "--metadata", str(mimic["metadata"]), "--labels",
                           str(mimic["labels"]), "--split", str(mimic["split"]), "--severity", str(mimic["severity"]),
                           "--views", "AP", "PA", "--size", "16", "--out", str(out), "--workers", "0",
                           "--items-per-shard", "1", "--on-bad", "stop", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert re.search(expected, err[0]), err[0]
    written = sorted(p.name for p in out.rglob("*")) if out.exists() else []
    # table errors stop before anything is written; a bad image stops the run with only finished shards
    assert not any(name == "manifest.json" or name.endswith(".tmp") or name.startswith("work-") for name in written)
    if case != "jpeg does not decode":
        assert written == []


def test_undecodable_jpeg_is_listed_with_its_line_when_skipping(mimic, tmp_path):
    image_path(mimic["root"], 10000002, 50000002, "d3").write_bytes(b"\xff\xd8junk")
    result = prepare_mimic_cxr(mimic["root"], tmp_path / "out", mimic["metadata"], mimic["labels"], mimic["split"],
                               size=16, options=QUIET)
    reasons = {Path(s.input).name: s.reason for s in result.skipped if s.kind == "unreadable"}
    assert set(reasons) == {"d3.jpg", "d8.jpg"} and "metadata.csv.gz line 4" in reasons["d3.jpg"]
    assert result.manifest["prepare"]["skipped"]["by_kind"]["unreadable"] == 2
