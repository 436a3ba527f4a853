"""benchmarks/RESULTS.md is generated from the committed records: it must be exactly what they give."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks/ is a folder of scripts, not an installed package
    sys.path.insert(0, str(REPO))

from benchmarks import results  # noqa: E402


def test_committed_results_doc_is_what_the_records_give() -> None:
    committed = (REPO / "benchmarks" / "RESULTS.md").read_text()
    assert committed == results.render(), "benchmarks/RESULTS.md is stale: run `make results` and commit it"


def test_every_record_and_the_readings_reach_the_document() -> None:
    text = results.render()
    assert text.startswith("# Benchmark results")
    assert (REPO / "benchmarks" / "readings.md").read_text().strip() in text
    for path in (REPO / "benchmarks" / "baselines").glob("*.json*"):
        assert f"`{path.name}`" in text
    baseline = json.loads((REPO / "benchmarks" / "baselines" / "cpu-small.json").read_text())
    for metric in baseline["metrics"]:
        assert f"`{metric}`" in text


def test_a_changed_record_changes_the_document(tmp_path: Path) -> None:
    """The check could fail: one metric's value moved in a copy of the records shows up in the output."""
    records = tmp_path / "baselines"
    shutil.copytree(REPO / "benchmarks" / "baselines", records)
    record = json.loads((records / "cpu-small.json").read_text())
    name = "quality/detection/auc"
    record["metrics"][name]["value"] = 0.123456
    (records / "cpu-small.json").write_text(json.dumps(record))
    text = results.render(records, REPO / "benchmarks" / "readings.md")
    assert f"| `{name}` | 0.1235 | AUC |" in text
    assert text != results.render()


def test_a_file_that_is_not_a_record_is_refused(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text(json.dumps({"metrics": {}}))
    with pytest.raises(ValueError, match="not a benchmark record"):
        results.render(tmp_path, REPO / "benchmarks" / "readings.md")


def test_unknown_row_files_are_listed_key_by_key(tmp_path: Path) -> None:
    (tmp_path / "new_probe-cpu.jsonl").write_text(json.dumps({"setting": "a", "inner": {"score": 0.5}}) + "\n")
    text = results.render(tmp_path, REPO / "benchmarks" / "readings.md")
    assert "| 1 | `inner/score` | 0.5 |" in text


def test_check_mode_reports_a_stale_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stale = tmp_path / "RESULTS.md"
    stale.write_text("# old\n")
    assert results.main(["--check", "--out", str(stale)]) == 1
    assert "stale" in capsys.readouterr().err
    assert results.main(["--out", str(stale)]) == 0
    assert results.main(["--check", "--out", str(stale)]) == 0
