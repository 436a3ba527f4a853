"""Sweep selection without a val split (stratified k-fold CV on train) and the fitting options of a sweep job."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold

from harness.config import ConfigError, load_yaml
from harness.method.heads import fit_task
from harness.method.latents import LatentsError, LatentsTable, load_latents, save_latents
from harness.ops import sweep_job
from harness.ops.sweep import SweepJob, cv_tables, fit_final, run_trial
from tests.helpers.latents import synthetic_latents, write_job


def no_val_latents(tmp_path) -> tuple[LatentsTable, object]:
    full = load_latents(synthetic_latents(tmp_path / "full.parquet"))
    table = full.rows(full.splits != "val")  # published latents often come with train and test only
    return table, save_latents(table, tmp_path / "no_val.parquet")


def test_cv_trial_is_the_mean_over_stratified_folds_and_never_sees_test(tmp_path):
    table, _ = no_val_latents(tmp_path)
    job = load_yaml(write_job(tmp_path / "job.yaml", cv_folds=3), SweepJob)
    task = job.tasks[1]  # severe: grades 2,3 vs rest, detection only
    params = {"kind": "logistic", "C": 1.0, "rule": task.rules[0].name, "calibration": "none"}
    folds = cv_tables(table, task, job)
    assert len(folds) == 3 and all("test" not in f.splits for f in folds)
    held_out = np.concatenate([f.ids[f.splits == "val"] for f in folds])
    assert sorted(held_out) == sorted(table.ids[table.splits == "train"])  # each train row held out once
    for fold in folds:  # stratified: every fold holds each grade in about the train proportion
        counts = np.bincount(fold.labels["grade"][fold.splits == "val"].astype(int), minlength=4)
        assert counts.min() >= 5

    trial = run_trial(params, table, task, job)
    assert trial["ok"] == 1, trial["error"]
    train = table.select("train")
    expected = []
    splitter = StratifiedKFold(n_splits=3, shuffle=True, random_state=job.search.seed)
    for fit_rows, score_rows in splitter.split(train.z_sem, train.labels["grade"]):
        fold = LatentsTable(ids=train.ids, splits=np.where(np.isin(np.arange(len(train)), fit_rows), "train", "val"),
                            z_sem=train.z_sem, labels=train.labels)
        result = fit_task(fold, task.fitted_on(task.rules[0]), kind="logistic", backend="sklearn",
                          options=job.search.options(1.0, "lstsq"))
        y = np.isin(train.labels["grade"][score_rows], (2, 3)).astype(int)
        expected.append(roc_auc_score(y, result.head.decision(train.z_sem[score_rows])))
    assert trial["val_auc"] == pytest.approx(np.mean(expected), abs=1e-12)

    final = fit_final(params, table, task, job)  # test touched here only; no val split to report
    assert final["val"] == {} and final["test"]["split"] == "test" and np.isfinite(final["test"]["auc"])


def test_missing_val_split_needs_cv_folds(tmp_path):
    table, path = no_val_latents(tmp_path)
    check_table = sweep_job.check_table
    with pytest.raises(LatentsError, match=r"split 'val' has no rows .* set cv_folds"):
        check_table(table, load_yaml(write_job(tmp_path / "a.yaml"), SweepJob), path)
    check_table(table, load_yaml(write_job(tmp_path / "b.yaml", cv_folds=3), SweepJob), path)
    with pytest.raises(ConfigError, match="cv_folds"):
        load_yaml(write_job(tmp_path / "c.yaml", cv_folds=1), SweepJob)


def test_search_protocols(tmp_path):
    search = {"kinds": ["svm"], "C": [1.0], "calibration": ["lstsq"], "protocol": "paper"}
    job = load_yaml(write_job(tmp_path / "p.yaml", search=search), SweepJob)
    assert (job.search.standardize, job.search.class_weight, job.search.svm_solver) == (False, None, "svc_linear")
    with pytest.raises(ConfigError, match=r"search\.standardize: True contradicts protocol 'paper'"):
        load_yaml(write_job(tmp_path / "q.yaml", search={**search, "standardize": True}), SweepJob)
    default = load_yaml(write_job(tmp_path / "d.yaml", search={"class_weight": None}), SweepJob)
    assert default.search.class_weight is None and default.search.standardize is True  # null: no weights




def test_sweep_without_val_split_selects_by_cv(tmp_path, local_ray):
    _, path = no_val_latents(tmp_path)
    search = {"kinds": ["svm", "logistic"], "C": [0.01, 1.0], "calibration": ["lstsq"], "protocol": "paper"}
    job = write_job(tmp_path / "job.yaml", cv_folds=3, search=search,
                    tasks=[{"name": "severe", "column": "grade", "positives": [2, 3], "select": "auc"}])
    summary = sweep_job.main(["--latents", str(path), "--config", str(job), "--out",
                                                    str(tmp_path / "out"),
                                                    "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    best = json.loads((tmp_path / "out" / "best_heads" / "severe.json").read_text())
    assert best["val"] == {} and best["test"]["split"] == "test"
    assert best["task_result"]["head"]["protocol"] == "paper"
    assert best["task_result"]["head"]["svm_solver"] == "svc_linear"
    trials = summary["tasks"]["severe"]["trials"]
    assert len(trials) == 4 and all(np.isfinite(t["val_auc"]) for t in trials)
    chosen = max(trials, key=lambda t: t["val_auc"])
    assert summary["tasks"]["severe"]["selected"]["kind"] == chosen["kind"]
