"""The MIMIC-CXR preparer's ``--findings``: all 14 CheXpert columns (snake_case) from a generated corpus of 300
images, the uncertain / blank policies applied to each, and an unknown finding refused in one line."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from harness.data.cxr_phantoms import TABLES, generate_corpus
from harness.data.prepare.__main__ import main as prepare_main
from harness.data.prepare.mimic_cxr import ALL_FINDINGS, CHEXPERT_COLUMNS, FINDINGS, map_finding, resolve_findings
from harness.data.shards import read_manifest
from tests.prepare.conftest import read_split

IMAGES = 300


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cxr-findings") / "mimic-cxr-jpg"
    generate_corpus(out, IMAGES, seed=5, size=64, workers=2, progress=False)
    return out


def _prepare(corpus: Path, out: Path, *extra: str) -> int:
    return prepare_main(["mimic-cxr", str(corpus), "--metadata", str(corpus / TABLES["metadata"]),
                         "--labels", str(corpus / TABLES["chexpert"]), "--split", str(corpus / TABLES["split"]),
                         "--views", "all", "--size", "32", "--out", str(out), "--workers", "1",
                         "--items-per-shard", "200", "--no-progress", *extra])


def test_resolve_findings_names():
    assert resolve_findings(None) == FINDINGS
    assert list(resolve_findings("all")) == [c.lower().replace(" ", "_") for c in CHEXPERT_COLUMNS]
    assert resolve_findings(["pleural_effusion", "Support Devices"]) == {"pleural_effusion": "Pleural Effusion",
                                                                         "support_devices": "Support Devices"}
    assert len(ALL_FINDINGS) == 14 and "no_finding" in ALL_FINDINGS


@pytest.mark.parametrize("uncertain", ["ignore", "positive", "negative"])
def test_all_fourteen_findings_with_each_uncertain_policy(corpus, tmp_path, capsys, uncertain):
    out = tmp_path / "shards"
    assert _prepare(corpus, out, "--findings", "all", "--uncertain", uncertain, "--blank", "ignore") == 0, \
        capsys.readouterr().err
    manifest = read_manifest(out)
    assert manifest["prepare"]["config"]["findings"] == list(ALL_FINDINGS)
    chexpert = pd.read_csv(corpus / TABLES["chexpert"]).set_index("study_id")
    seen_uncertain = seen_blank = 0
    samples = [labels for split in manifest["splits"] for _, labels in read_split(out, split).values()]
    assert len(samples) == IMAGES
    for labels in samples:
        cells = chexpert.loc[int(labels["study_id"])]
        for name, column in ALL_FINDINGS.items():
            cell = cells[column]
            expected = map_finding(cell, uncertain, "ignore")
            assert labels[name] == expected, (name, cell, labels[name])
            seen_uncertain += cell == -1
            seen_blank += isinstance(cell, float) and math.isnan(cell)
            if cell == -1:
                assert labels[name] == {"ignore": None, "positive": 1, "negative": 0}[uncertain]
    assert seen_uncertain > 0 and seen_blank > 0  # the corpus exercises both policies


def test_default_stays_four_findings_and_a_list_picks_columns(corpus, tmp_path, capsys):
    default, picked = tmp_path / "default", tmp_path / "picked"
    assert _prepare(corpus, default) == 0, capsys.readouterr().err
    assert _prepare(corpus, picked, "--findings", "pleural_effusion", "Atelectasis") == 0, capsys.readouterr().err
    default_labels = next(iter(read_split(default, "train").values()))[1]
    picked_labels = next(iter(read_split(picked, "train").values()))[1]
    assert set(FINDINGS) <= set(default_labels) and "pleural_effusion" not in default_labels
    assert "findings" not in read_manifest(default)["prepare"]["config"]  # older preparations keep their fingerprint
    assert {"pleural_effusion", "atelectasis"} <= set(picked_labels) and "edema" not in picked_labels


def test_unknown_finding_is_one_error_line_and_exit_2(corpus, tmp_path, capsys):
    out = tmp_path / "bad"
    assert _prepare(corpus, out, "--findings", "edema", "broken_heart") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "'broken_heart'" in err[0]
    assert "pleural_effusion" in err[0]
    assert not out.exists()
