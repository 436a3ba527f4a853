"""The benchmark runner: the regression check on synthetic records, the record's fields, and the committed baseline."""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks/ is a folder of scripts beside the package, not an installed package
    sys.path.insert(0, str(REPO))

from benchmarks import run  # noqa: E402
from benchmarks.records import (  # noqa: E402
    EXACT,
    TIMING,
    Metric,
    SuiteResult,
    check_record,
    load_record,
    make_record,
    save_record,
)

BASELINE = REPO / "benchmarks" / "baselines" / "cpu-small.json"


def _record() -> dict:
    """A record of two suites with one metric of each kind the check distinguishes."""
    train = SuiteResult(metrics={
        "train/tiny-32/fp32/eager/images_per_s": Metric(20.0, "images/s", **TIMING),
        "train/tiny-32/fp32/eager/gflop_per_image": Metric(1.96, "GFLOP", False, **EXACT),
        "train/tiny-32/fp32/eager/peak_memory_mb": Metric(1000.0, "MiB", False, tolerance=None),
        "train/tiny-32/fp32/eager/ratio_vs_reference": Metric(1.1, "x", required=False, **TIMING),
    }, rows=[{"size": "tiny-32"}])
    quality = SuiteResult(metrics={
        "quality/detection/auc": Metric(0.80, "AUC", tolerance=0.05, abs_tolerance=0.03),
        "quality/grading/mae": Metric(0.50, "grades", False, tolerance=0.15, abs_tolerance=0.05),
    })
    return make_record({"train": train, "quality": quality}, small=True, wall_s=1.0, argv=["--suite", "all"])


def _statuses(record: dict, baseline: dict) -> dict[str, str]:
    return {row.name: row.status for row in check_record(record, baseline)}


def test_unchanged_record_passes_and_doctored_metrics_fail():
    baseline = _record()
    assert not any(row.failed for row in check_record(copy.deepcopy(baseline), baseline))

    doctored = copy.deepcopy(baseline)
    metrics = doctored["metrics"]
    metrics["train/tiny-32/fp32/eager/images_per_s"]["value"] = 9.0  # 55 % slower: beyond the 50 % tolerance
    metrics["quality/grading/mae"]["value"] = 0.60  # +0.10 > max(15 % of 0.5, 0.05)
    metrics["train/tiny-32/fp32/eager/peak_memory_mb"]["value"] = 5000.0  # recorded only: never fails
    statuses = _statuses(doctored, baseline)
    assert statuses["train/tiny-32/fp32/eager/images_per_s"] == "worse"
    assert statuses["quality/grading/mae"] == "worse"
    assert statuses["train/tiny-32/fp32/eager/peak_memory_mb"] == "info"
    assert statuses["quality/detection/auc"] == "ok"


def test_tolerances_directions_and_missing_metrics():
    baseline = _record()
    changed = copy.deepcopy(baseline)
    metrics = changed["metrics"]
    metrics["train/tiny-32/fp32/eager/images_per_s"]["value"] = 12.0  # 40 % slower: timing slack is 50 %
    metrics["quality/detection/auc"]["value"] = 0.78  # within the 0.04 slack (5 % of 0.8)
    metrics["quality/grading/mae"]["value"] = 0.30  # lower is better: an improvement
    metrics["train/tiny-32/fp32/eager/gflop_per_image"]["value"] = 1.99  # +1.5 %: exact counts allow 1 %
    del metrics["train/tiny-32/fp32/eager/ratio_vs_reference"]  # optional: measured only with --reference
    statuses = _statuses(changed, baseline)
    assert statuses["train/tiny-32/fp32/eager/images_per_s"] == "ok"
    assert statuses["quality/detection/auc"] == "ok"
    assert statuses["quality/grading/mae"] == "better"
    assert statuses["train/tiny-32/fp32/eager/gflop_per_image"] == "worse"
    assert statuses["train/tiny-32/fp32/eager/ratio_vs_reference"] == "optional missing"

    del metrics["quality/detection/auc"]  # a required metric that silently disappeared
    metrics["quality/grading/mae"]["value"] = None  # NaN is stored as null
    statuses = _statuses(changed, baseline)
    assert statuses["quality/detection/auc"] == "missing" and statuses["quality/grading/mae"] == "not finite"

    only_train = copy.deepcopy(baseline)
    only_train["suites"] = ["train"]  # a run of one suite is checked against that suite's metrics only
    assert {name.split("/")[0] for name in _statuses(only_train, baseline)} == {"train"}


def test_cli_check_exit_status(tmp_path, capsys):
    baseline = _record()
    base_path = save_record(baseline, tmp_path / "base")
    assert run.main(["--compare", str(base_path), "--check", str(base_path)]) == 0
    assert "passed" in capsys.readouterr().out

    doctored = copy.deepcopy(baseline)
    doctored["metrics"]["quality/detection/auc"]["value"] = 0.70
    doctored_path = save_record(doctored, tmp_path / "doctored")
    assert run.main(["--compare", str(doctored_path), "--check", str(base_path)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and re.search(r"quality/detection/auc .*WORSE", out)

    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ValueError, match="junk.json"):
        load_record(tmp_path / "junk.json")


def test_a_small_suite_writes_a_complete_record_and_tracks_it(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    assert run.main(["--suite", "data", "--small", "--out-dir", str(tmp_path), "--track", "--tracking-uri", uri]) == 0
    [path] = list(tmp_path.glob("data-*.json"))
    assert re.fullmatch(r"data-\d{8}T\d{6}Z\.json", path.name)
    record = load_record(path)
    for field in ("metrics", "machine", "versions", "git", "command", "created", "suites", "rows"):
        assert field in record, field
    assert record["suites"] == ["data"] and record["small"] is True
    assert "gpu" in record["machine"] and record["machine"]["cpu_count"] >= 1
    assert record["versions"]["torch"] and record["versions"]["python"]
    assert "benchmarks/run.py --suite data --small --out-dir" in record["command"]
    assert "commit" in record["git"]
    names = set(record["metrics"])
    assert names == {f"data/workers_{n}/images_per_s" for n in (0, 1, 2)}
    for spec in record["metrics"].values():
        assert set(spec) >= {"value", "unit", "higher_is_better", "tolerance", "abs_tolerance", "required"}
        assert spec["value"] is not None and spec["value"] > 0
    assert run.main(["--compare", str(path), "--check", str(path)]) == 0

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    [tracked] = client.search_runs([client.get_experiment_by_name("dae-cf-benchmarks").experiment_id])
    logged = record["metrics"]["data/workers_0/images_per_s"]["value"]
    assert tracked.data.metrics["data/workers_0/images_per_s"] == pytest.approx(logged)
    assert tracked.data.tags["git_commit"] == str(record["git"]["commit"])
    assert [a.path for a in client.list_artifacts(tracked.info.run_id, "benchmarks")] == [f"benchmarks/{path.name}"]


def test_committed_baseline_covers_every_suite_with_declared_tolerances():
    baseline = load_record(BASELINE)
    assert baseline["small"] is True and set(baseline["suites"]) == set(run.SUITE_NAMES)
    suites = {name.split("/")[0] for name in baseline["metrics"]}
    assert suites == set(run.SUITE_NAMES)
    for name, spec in baseline["metrics"].items():
        assert isinstance(spec["higher_is_better"], bool), name
        if spec["tolerance"] is not None:
            assert spec["value"] is not None, name
            # Timings get wide tolerances; exact counts and quality metrics tighter ones.
            if name.endswith(("images_per_s", "/fit_s", "/mfu")):
                assert spec["tolerance"] >= 0.5, name
            if name.startswith("quality/"):
                assert spec["tolerance"] <= 0.25, name
    assert any(name.startswith("quality/detection/auc") for name in baseline["metrics"])
    assert json.loads(BASELINE.read_text())["git"]["commit"]


def test_reference_needs_a_diffae_checkout(tmp_path):
    from benchmarks import reference

    with pytest.raises(FileNotFoundError, match="unet_autoenc.py"):
        reference.reference_model_class(tmp_path)


def test_the_oracle_experiment_scores_every_latent_against_the_truth(tmp_path):
    from experiments import ce_oracle

    results = tmp_path / "oracle.jsonl"
    result = ce_oracle.main(["--model", str(REPO / "tests" / "fixtures" / "model_v1"), "--n-train", "12",
                             "--n-test", "4", "--invert-steps", "2", "--decode-steps", "2", "--results", str(results)])
    rows = result["rows"]
    assert list(rows) == ["input (unchanged)", "pattern 1x", "mean oracle", "own oracle", "truth through the DAE"]
    unchanged = rows["input (unchanged)"]
    assert unchanged["ce_error_median"] == unchanged["input_error_median"] > 0  # the input differs from its truth
    assert unchanged["closer_than_input"] == 0.0  # nothing is strictly closer than itself
    for name, row in rows.items():
        assert row["input_error_median"] == unchanged["input_error_median"], name  # one truth for every row
        assert 0.0 <= row["validity"] <= 1.0 and row["n"] == 4
    assert -1.0 <= result["cos_pattern_vs_mean_oracle"] <= 1.0
    assert json.loads(results.read_text())["n_test"] == 4


def test_ce_speed_times_each_solver_variant_and_batch(tmp_path):
    from benchmarks import ce_speed

    rows = ce_speed.main(["--model", str(REPO / "tests" / "fixtures" / "model_v1"), "--batches", "1", "2",
                          "--solvers", "fixed_point 10/10", "--variants", "fp32", "bf16",
                          "--results", str(tmp_path / "speed.jsonl")])
    assert [(r["variant"], r["batch"]) for r in rows] == [("fp32", 1), ("fp32", 2), ("bf16", 1), ("bf16", 2)]
    assert all(r["seconds"] > 0 and r["ce_per_s"] == pytest.approx(r["batch"] / r["seconds"], rel=1e-2) for r in rows)
    assert all(0 <= r["recon_mse"] < 0.01 for r in rows)  # fixed-point 10/10 reconstructs (fixture: near exactly)
    assert len((tmp_path / "speed.jsonl").read_text().splitlines()) == 4


def test_the_recipe_table_names_the_gain_and_the_solver_of_each_ce_row(tmp_path):
    from experiments import ce_recipes

    row = {"recipe": "eps", "samples": 120000, "raw pixels/logistic": 0.99, "random encoder/svm": 0.93,
           "auc_svm": 0.996, "random_xT_own_source": 0.5, "inversion": "fixed_point", "invert_steps": 10,
           "decode_steps": 10, **{f"z_usage_t{t}": 0.1 for t in (250, 500, 750, 950)},
           "pattern+gain:local:500:gain": [2.24, 1.97],
           "pattern+gain:local:500:validity": {"healthy -> fractured": 1.0, "fractured -> healthy": 0.9},
           "pattern+gain:local:500:realised": 1.05,
           "pattern+gain:local:500:truth": {"healthy -> fractured": [0.0185, 0.0184, 0.59],
                                            "fractured -> healthy": [0.0207, 0.0207, 0.6]}}
    results = tmp_path / "recipes.jsonl"
    results.write_text(json.dumps(row) + "\n")
    table = ce_recipes.markdown_tables(results)
    assert ("| eps | 120,000 | pattern+gain:local:500 (gain 2.2 / 2.0), fixed_point 10/10 | 1x | 1.000 / 0.900 | "
            "1.05 | 0.018 / 0.018 | 0.590 / 0.600 |") in table
    results.write_text(json.dumps({**row, "gain_validity": 0.9}) + "\n")  # a gain aimed at validity says so
    assert "(gain 2.2 / 2.0 aimed at 90% valid), fixed_point" in ce_recipes.markdown_tables(results)
    results.write_text(json.dumps({**row, "model": "nano-32"}) + "\n")  # a size other than tiny-32 is named
    assert "| eps model.size=nano-32 | 120,000 |" in ce_recipes.markdown_tables(results)


def test_a_measured_job_records_its_readiness_verdict_and_says_when_not_ready():
    from benchmarks.quality_suite import _add_readiness

    verdict = {"ready": False, "missing": ["z-usage at t=250 0.120 < 0.2"], "stopped_because": "budget spent",
               "samples_seen": 55008, "best_probe": {"samples_seen": 55008, "z_usage_t250": 0.12, "ce_validity": 0.875,
                                                     "floor_margin": 0.18}}
    result = SuiteResult()
    _add_readiness(result, "transfer/x", verdict)
    assert result.metrics["transfer/x/readiness/ready"].value == 0.0
    assert result.metrics["transfer/x/readiness/samples_seen"].value == 55008
    assert result.metrics["transfer/x/readiness/z_usage_t250"].value == 0.12
    assert result.rows[0]["kind"] == "readiness" and result.rows[0]["missing"] == verdict["missing"]
    assert any("not ready after 55008 samples (budget spent): z-usage" in note for note in result.notes)
    ready = SuiteResult()
    _add_readiness(ready, "q", {**verdict, "ready": True, "missing": []})
    assert ready.metrics["q/readiness/ready"].value == 1.0 and not ready.notes
    unassessed = SuiteResult()
    _add_readiness(unassessed, "q", None)  # train.readiness off: nothing is claimed
    assert not unassessed.metrics and not unassessed.rows
