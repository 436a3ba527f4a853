"""The Ray Tune head sweep: job-file strictness, selection rule, and one real sweep on a local Ray + sqlite MLflow."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from harness.config import ConfigError, load_yaml
from harness.method.heads import TaskResult, evaluate_task
from harness.method.latents import load_latents
from harness.ops import sweep_job
from harness.ops.sweep import SweepJob, SweepTask, select_best
from tests.helpers.latents import CALIBRATIONS, CS, KINDS, synthetic_latents, write_job

ROOT = Path(__file__).resolve().parents[1]
# ---------------------------------------------------------------------------------------------------------
# Without Ray.
# ---------------------------------------------------------------------------------------------------------


def test_job_file_is_strict(tmp_path):
    good = load_yaml(write_job(tmp_path / "good.yaml"), SweepJob)
    assert good.tasks[0].selection_metric == "macro_f1" and len(good.tasks[0].rules) == 2
    assert good.tasks[1].rules[0].name == "2,3 vs rest" and good.trial_backend == "sklearn"
    assert load_yaml(ROOT / "jobs" / "sweep_phantoms.yaml", SweepJob).tasks  # the shipped job file parses
    cases = [
        ({"serach": {}}, r"unknown key\(s\) \['serach'\]"),
        ({"search": {"kinds": ["svm"], "Cs": [1.0]}}, r"unknown key\(s\) \['Cs'\] in search"),
        ({"search": {"calibration": ["poly"]}}, "calibration 'poly'"),
        ({"search": {"kinds": ["tree"]}}, "search.kinds"),
        ({"search": {"C": [1.0, "big"]}}, r"search.C"),
        ({"resources": {"cpu": 1, "gpu": 0.5}, "backend": "sklearn"}, "GPU would be reserved"),
        ({"tasks": [{"name": "a", "column": "grade", "positives": [1], "select": "mae"}]}, "needs a grade_range"),
        ({"tasks": [{"name": "a", "column": "grade", "positives": [1], "negatives": [1]}]}, "both positive"),
        ({"tasks": [{"name": "a", "column": "grade", "positives": [1], "rules": []}]}, r"unknown key\(s\) \['rules'\]"),
    ]
    for index, (changes, message) in enumerate(cases):
        with pytest.raises(ConfigError, match=message) as caught:
            load_yaml(write_job(tmp_path / f"bad{index}.yaml", **changes), SweepJob)
        assert f"bad{index}.yaml" in str(caught.value)  # the error names the file


def test_selection_rule_prefers_metric_then_tie_breaks_then_grid_order(tmp_path):
    job = load_yaml(write_job(tmp_path / "job.yaml"), SweepJob)
    graded, detection = job.tasks

    def trial(kind, C, metrics, rule="1,2,3 vs rest", calibration="extremes"):
        return {"params": {"kind": kind, "C": C, "rule": rule, "calibration": calibration}, "metrics": metrics}

    trials = [trial("svm", 0.01, {"val_grade_macro_f1": 0.6, "val_auc": 0.99}),
              trial("linear", 1.0, {"val_grade_macro_f1": 0.7, "val_auc": 0.80}),
              trial("logistic", 0.01, {"val_grade_macro_f1": 0.7, "val_auc": 0.90}),  # ties on F1, wins on AUC
              trial("svm", 1.0, {"ok": 0, "error": "too few samples"}),
              trial("svm", 1.0, {"val_grade_macro_f1": float("nan"), "val_auc": 1.0})]
    assert select_best(trials, graded, job) == 2
    # exact tie on every metric: the earlier grid position (kind order svm, logistic, linear) wins
    tied = [trial("linear", 0.01, {"val_auc": 0.8}, rule="2,3 vs rest", calibration="none"),
            trial("svm", 1.0, {"val_auc": 0.8}, rule="2,3 vs rest", calibration="none"),
            trial("svm", 0.01, {"val_auc": 0.8}, rule="2,3 vs rest", calibration="none")]
    assert select_best(tied, detection, job) == 2
    mae_task = SweepTask("fracture", "grade", (1, 2, 3), grade_range=(0, 3), select="mae")
    with_mae = [trial("svm", 0.01, {"val_grade_mae": 0.5}), trial("svm", 1.0, {"val_grade_mae": 0.3})]
    assert select_best(with_mae, mae_task, job) == 1  # MAE: lower is better
    with pytest.raises(ValueError, match="all 1 trials failed"):
        select_best([trial("svm", 1.0, {"ok": 0, "error": "boom"})], graded, job)


# ---------------------------------------------------------------------------------------------------------
# A real sweep on a local Ray.
# ---------------------------------------------------------------------------------------------------------


def test_sweep_logs_trials_selects_on_val_and_tests_once(tmp_path, local_ray):
    from mlflow.tracking import MlflowClient

    latents = synthetic_latents(tmp_path / "latents.parquet")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = sweep_job.main(
        ["--latents", str(latents), "--config", str(write_job(tmp_path / "job.yaml")), "--out",
         str(tmp_path / "out"), "--tracking-uri", uri])
    client = MlflowClient(uri)
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.params["latents_sha256"]
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=500)
    table = load_latents(latents)
    expected = {"fracture": len(KINDS) * len(CS) * 2 * len(CALIBRATIONS), "severe": len(KINDS) * len(CS)}
    for task_name, select_key, count in (("fracture", "val_grade_macro_f1", expected["fracture"]),
                                         ("severe", "val_auc", expected["severe"])):
        runs = [r for r in children if r.data.tags["task"] == task_name]
        assert len(runs) == count  # one child run per trial
        for run in runs:  # validation only: test metrics exist nowhere in the trials
            assert not any(key.startswith("test") for key in run.data.metrics), run.data.metrics
            assert run.data.metrics["ok"] == 1.0 and select_key in run.data.metrics
        selected = [r for r in runs if r.data.tags["selected"] == "true"]
        assert len(selected) == 1
        best_value = max(r.data.metrics[select_key] for r in runs)
        assert selected[0].data.metrics[select_key] == pytest.approx(best_value)

        # test metrics: once, on the parent, and they belong to the selected configuration
        record = json.loads((tmp_path / "out" / "best_heads" / f"{task_name}.json").read_text())
        assert record["dae"] == "dae-test:v7" and record["latents"]["rows"] == len(table)
        assert record["latents"]["sha256"] == parent.data.params["latents_sha256"]
        assert record["mlflow"]["trial_run_id"] == selected[0].info.run_id
        params = selected[0].data.params
        assert record["selected"]["params"]["kind"] == params["kind"]
        assert float(record["selected"]["params"]["C"]) == pytest.approx(float(params["C"]))
        result = TaskResult.from_dict(record["task_result"])
        recomputed_test = evaluate_task(result, table, "test")
        recomputed_val = evaluate_task(result, table, "val")
        assert parent.data.metrics[f"{task_name}/test_auc"] == pytest.approx(recomputed_test["auc"])
        assert recomputed_val[select_key[4:]] == pytest.approx(selected[0].data.metrics[select_key])
        history = client.get_metric_history(parent.info.run_id, f"{task_name}/test_auc")
        assert len(history) == 1
    # the fracture head was scored on the task's own targets (grade >= 1), whatever rule it was fitted with
    fracture = TaskResult.from_dict(json.loads((tmp_path / "out" / "best_heads" / "fracture.json").read_text())[
        "task_result"])
    assert fracture.task.positives == (1, 2, 3) and fracture.calibration is not None
    assert {row["task"] for row in summary["rows"]} == {"fracture", "severe"}
    row = next(r for r in summary["rows"] if r["task"] == "fracture")
    assert row["labels_used"] == int((table.splits == "train").sum())  # every train row is graded
    assert row["wall_s"] > 0 and row["cpu_s"] > 0 and row["gpu_s"] == 0 and not math.isnan(row["macro_f1"])
    assert (tmp_path / "out" / "report" / "index.html").is_file()


def test_a_ray_trial_worker_does_not_import_torch():
    # Each Ray worker imports the trial's module; torch costs it ~1.4 s, which once doubled the one-core sweep's wall
    # time (benchmarks "heads" suite). Heads, directions and the sweep work on numpy alone.
    import subprocess
    import sys

    code = "import sys, harness.ops.sweep, harness.method.heads; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
