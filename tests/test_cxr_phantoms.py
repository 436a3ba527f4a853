"""Chest X-ray phantom corpus: MIMIC-CXR-JPG layout, deterministic rendering, true counterfactuals, the real
MIMIC-CXR preparer on the generated tree, resumption and command-line errors."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from harness.data import cxr_phantoms
from harness.data.cxr_cohort import UNCERTAIN_RATE, draw_patient
from harness.data.cxr_phantoms import (
    CORPUS_RECORD,
    TABLES,
    draw_corpus,
    generate_corpus,
    image_relpath,
    load_parameters,
    stored_parameters,
    true_counterfactual,
)
from harness.data.cxr_render import FINDINGS, render, render_counterfactual
from harness.data.prepare.__main__ import main as prepare_main
from harness.data.prepare.mimic_cxr import map_finding
from harness.data.shards import read_manifest
from tests.prepare.conftest import read_split

IMAGES, SIZE = 300, 128


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cxr") / "mimic-cxr-jpg"
    generate_corpus(out, IMAGES, seed=3, size=SIZE, workers=2, progress=False)
    return out


def _table(root: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(root / TABLES[name], dtype={"dicom_id": str})


def test_layout_tables_and_cohort(corpus):
    meta, labels, split = _table(corpus, "metadata"), _table(corpus, "chexpert"), _table(corpus, "split")
    assert len(meta) == IMAGES and meta["dicom_id"].is_unique
    assert {"Rows", "Columns", "StudyDate", "ViewCodeSequence_CodeMeaning"} <= set(meta.columns)
    views = meta["ViewPosition"].value_counts()
    assert views["AP"] + views["PA"] > 3 * views["LATERAL"] > 0
    for row in meta.itertuples():
        path = corpus / image_relpath(row.subject_id, row.study_id, row.dicom_id)
        assert path.parent.name == f"s{row.study_id}" and path.parent.parent.name == f"p{row.subject_id}"
    with Image.open(path) as jpg:
        assert jpg.format == "JPEG" and jpg.mode == "L" and jpg.size == (SIZE, SIZE)
    assert len(list((corpus / "files").rglob("*.jpg"))) == IMAGES
    patients = meta["subject_id"].nunique()
    assert abs(patients - IMAGES / 2.5) < IMAGES / 10 and meta.groupby("subject_id")["study_id"].nunique().max() > 2
    cells = labels.drop(columns=["subject_id", "study_id"])
    written = cells.to_numpy()[~cells.isna().to_numpy()]
    assert cells.shape[1] == 14 and set(np.unique(written)) == {1, 0, -1} and cells.isna().mean().mean() > 0.5
    assert set(split["split"]) == {"train", "validate", "test"}
    assert (split.groupby("subject_id")["split"].nunique() == 1).all()
    record = json.loads((corpus / CORPUS_RECORD).read_text())
    assert record["counts"]["images"] == IMAGES and not (corpus.parent / "mimic-cxr-jpg.partial").exists()


def test_labels_follow_true_grades_with_uncertainty_and_correlations():
    records = [r for group in draw_corpus(seed=1, images=4000, size=64) for r in group]
    studies = {r["study_id"]: r for r in records}.values()
    edema = np.array([r["edema_grade"] > 0 for r in studies])
    cardio = np.array([r["cardiomegaly_grade"] > 0 for r in studies])
    effusion = np.array([r["effusion_grade"] > 0 for r in studies])
    assert cardio[edema].mean() > 2 * cardio[~edema].mean() and effusion[edema].mean() > 2 * effusion[~edema].mean()
    cells = [(r["labels"]["Edema"], r["edema_grade"]) for r in studies]
    positives = [c for c, g in cells if g > 0]
    uncertain = sum(c == -1 for c in positives) / len(positives)
    assert 0.03 < uncertain < max(UNCERTAIN_RATE.values())  # -1 occurs, mostly at grade 1
    assert all(c == 1 or c == -1 for c, g in cells if g > 0)
    assert all(c != 1 for c, g in cells if g == 0)
    assert json.dumps(draw_patient(1, 7, 64)) == json.dumps(draw_patient(1, 7, 64))  # NaN labels compare as text


def test_rendering_is_deterministic_and_stored_parameters_rerender_the_image(corpus):
    params = load_parameters(corpus)
    for dicom_id in params.index[:6]:
        stored = stored_parameters(corpus, dicom_id)
        first = render(stored)
        assert np.array_equal(first, render(stored)) and first.shape == (SIZE, SIZE)
        row = _table(corpus, "metadata").set_index("dicom_id").loc[dicom_id]
        with Image.open(corpus / image_relpath(row.subject_id, row.study_id, dicom_id)) as jpg:
            decoded = np.asarray(jpg, dtype=np.float64)
        assert np.abs(decoded - first).mean() < 4 and np.corrcoef(decoded.ravel(), first.ravel())[0, 1] > 0.99
    group = draw_corpus(seed=3, images=IMAGES, size=SIZE)[0]  # the generator's in-memory records
    assert np.array_equal(render(cxr_phantoms.parameters_of(group[0])), render(stored_parameters(corpus,
                                                                                                 group[0]["dicom_id"])))


def _columns_changed(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.nonzero(a != b)
    return rows / a.shape[0], cols / a.shape[1]


@pytest.mark.parametrize("finding", FINDINGS)
def test_true_counterfactual_changes_only_where_the_finding_is_drawn(corpus, finding):
    params = load_parameters(corpus)
    frontal = params[(params["view"] != "LATERAL") & (params[f"{finding}_grade"] == 0)].index[0]
    original = true_counterfactual(corpus, frontal, finding, 0)
    stored = stored_parameters(corpus, frontal)
    assert np.array_equal(original, render(stored))  # the same grade: the same image
    severe = render_counterfactual(stored, finding, 3)
    rows, cols = _columns_changed(original, severe)
    assert 0 < rows.size < {"support_devices": 0.08, "edema": 0.45}.get(finding, 0.30) * original.size
    side = stored.get(f"{finding}_side", 0)
    if finding in ("pneumothorax", "consolidation") or (finding == "effusion" and side != 0):
        # patient's right (side -1) is the image's left: nothing changes beyond the midline plus the study's shift
        assert (cols < 0.62).all() if side < 0 else (cols > 0.38).all()
    if finding in ("effusion", "cardiomegaly"):
        assert np.quantile(rows, 0.05) > 0.35  # the lower chest
    if finding == "pneumothorax":
        assert rows.min() < 0.35  # the apex is involved
    milder = render_counterfactual(stored, finding, 1)
    assert 0 < (milder != original).sum() <= (severe != original).sum() * 1.05


def test_real_preparer_turns_the_tree_into_shards(corpus, tmp_path, capsys):
    out = tmp_path / "shards"
    status = prepare_main(["mimic-cxr", str(corpus), "--metadata", str(corpus / TABLES["metadata"]),
                           "--labels", str(corpus / TABLES["chexpert"]), "--split", str(corpus / TABLES["split"]),
                           "--severity", str(corpus / TABLES["severity"]), "--views", "AP", "PA", "--size", "64",
                           "--out", str(out), "--workers", "2", "--items-per-shard", "100", "--on-bad", "stop",
                           "--no-progress"])
    assert status == 0, capsys.readouterr().err
    manifest = read_manifest(out)
    meta, split = _table(corpus, "metadata"), _table(corpus, "split")
    lateral = int((meta["ViewPosition"] == "LATERAL").sum())
    assert manifest["prepare"]["filtered"] == {"view not in ['AP', 'PA']": lateral}
    assert manifest["prepare"]["skipped"]["count"] == 0 and len(manifest["prepare"]["fingerprint"]) == 64
    samples = {s: read_split(out, s) for s in manifest["splits"]}
    assert sum(len(v) for v in samples.values()) == IMAGES - lateral
    patients = {s: {labels["patient_id"] for _, labels in v.values()} for s, v in samples.items()}
    assert set(patients) == {"train", "val", "test"}
    assert not (patients["train"] & patients["val"] or patients["train"] & patients["test"]
                or patients["val"] & patients["test"])
    official = dict(zip(split["dicom_id"], split["split"].replace({"validate": "val"}), strict=True))
    chexpert = _table(corpus, "chexpert").set_index("study_id")
    severity = _table(corpus, "severity").set_index("study_id")["edema_severity"]
    for name, split_samples in samples.items():
        for key, (image, labels) in split_samples.items():
            assert official[key] == name and image.shape == (64, 64)
            cells = chexpert.loc[int(labels["study_id"])]
            assert labels["edema"] == map_finding(cells["Edema"], "keep", "negative")
            assert labels["cardiomegaly"] == map_finding(cells["Cardiomegaly"], "keep", "negative")
            assert labels["lung_opacity"] == map_finding(cells["Lung Opacity"], "keep", "negative")
            grade = severity.get(int(labels["study_id"]), -1)
            assert labels["edema_severity"] == (-1 if isinstance(grade, float) and math.isnan(grade) else grade)
    assert any(labels["edema"] == -1 for v in samples.values() for _, labels in v.values())


def test_resume_after_a_kill_renders_only_unfinished_shards(tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    generate_corpus(reference, 60, seed=5, size=48, workers=1, progress=False)
    real, calls = cxr_phantoms._render_shard, []

    def dies_on_third(task):
        calls.append(task[1])
        if len(calls) == 3:
            raise KeyboardInterrupt  # a kill in the middle of the run
        return real(task)

    monkeypatch.setattr(cxr_phantoms, "_render_shard", dies_on_third)
    out = tmp_path / "corpus"
    with pytest.raises(KeyboardInterrupt):
        generate_corpus(out, 60, seed=5, size=48, workers=1, progress=False)
    assert not out.exists() and (tmp_path / "corpus.partial").is_dir()
    calls.clear()
    monkeypatch.setattr(cxr_phantoms, "_render_shard", lambda task: (calls.append(task[1]), real(task))[1])
    generate_corpus(out, 60, seed=5, size=48, workers=1, progress=False)
    assert 0 not in calls and 1 not in calls and calls[0] == 2  # the two finished shards were kept

    def digest(root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file() and p.name != CORPUS_RECORD}

    assert digest(out) == digest(reference)
    assert not (tmp_path / "corpus.partial").exists()


def _exit_status(argv: list[str]) -> int:
    try:
        return cxr_phantoms.main(argv)
    except SystemExit as exc:  # argparse's usage errors
        return int(exc.code)


@pytest.mark.parametrize("argv, expected", [
    (["--images", "0"], "images=0"), (["--images", "10", "--size", "8"], "size=8"),
    (["--images", "ten"], "invalid int value"), ([], "the following arguments are required: --images"),
])
def test_bad_arguments_are_one_line_and_exit_2(tmp_path, capsys, argv, expected):
    assert _exit_status([str(tmp_path / "c"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0]
    assert not (tmp_path / "c").exists() and not (tmp_path / "c.partial").exists()


def test_existing_corpus_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "c"
    assert cxr_phantoms.main([str(out), "--images", "8", "--size", "32", "--workers", "1", "--no-progress"]) == 0
    before = (out / TABLES["metadata"]).read_bytes()
    assert cxr_phantoms.main([str(out), "--images", "9", "--size", "32", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "--overwrite" in err[-1]
    assert (out / TABLES["metadata"]).read_bytes() == before
    assert cxr_phantoms.main([str(out), "--images", "9", "--size", "32", "--overwrite", "--no-progress"]) == 0
    assert len(pd.read_csv(out / TABLES["metadata"])) == 9 and not (tmp_path / "c.old").exists()
