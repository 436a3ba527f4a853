"""dae-cf heads (harness.ops.fit_heads_job; alias jobs/fit_heads.py) on latents brought from elsewhere: inferred
tasks, the paper's protocol, refused labels."""

from __future__ import annotations

import json

import numpy as np

from harness.cli import run_main
from harness.method.latents import LatentsTable, save_latents
from harness.ops import fit_heads_job


def graded_0_to_4(path, n: int = 150, seed: int = 1):
    """Grades 0-4 along one direction of a 6-d latent; train and val splits only (no test)."""
    rng = np.random.default_rng(seed)
    grades = rng.choice(5, size=n)
    z = rng.normal(size=(n, 6)) + np.outer(grades, [1.0, 0.5, 0, 0, 0, 0])
    splits = np.where(np.arange(n) % 3 == 0, "val", "train")
    table = LatentsTable(ids=[f"i{i}" for i in range(n)], splits=splits, z_sem=z, labels={"grade": grades})
    return save_latents(table, path)


def test_tasks_are_inferred_and_printed(tmp_path, capsys):
    latents = graded_0_to_4(tmp_path / "z.npz")
    out = tmp_path / "out"
    fit_heads_job.main(["--latents", str(latents), "--out", str(out), "--heads.kinds=[svm]"])
    printed = capsys.readouterr().out
    assert f"no heads.tasks in the job file: inferred from the labels of {latents}:" in printed
    assert "label 'grade': grades [0, 1, 2, 3, 4] -> task 'grade': detection grade >= 1 vs 0, grading over 0..4" \
        in printed
    assert "evaluated on val" in printed  # no test split: val
    heads = json.loads((out / "heads.json").read_text())
    entry = heads["grade/svm"]
    assert entry["task"]["grade_range"] == [0, 4] and entry["task"]["positives"] == [1, 2, 3, 4]
    assert entry["calibration"]["grade_max"] == 4
    assert (entry["head"]["protocol"], entry["head"]["class_weight"]) == ("project", "balanced")


def test_paper_protocol_from_the_command_line(tmp_path, capsys):
    latents = graded_0_to_4(tmp_path / "z.parquet")
    out = tmp_path / "out"
    fit_heads_job.main(["--latents", str(latents), "--out", str(out), "--heads.kinds=[svm]",
                                       "--heads.protocol=paper"])
    head = json.loads((out / "heads.json").read_text())["grade/svm"]["head"]
    assert (head["protocol"], head["svm_solver"], head["standardized"], head["class_weight"]) == \
        ("paper", "svc_linear", False, None)
    assert "protocol paper" in capsys.readouterr().out
    detection = json.loads((out / "tables" / "detection.json").read_text())
    assert 0 <= detection[0]["auc_from_predictions"] <= 1  # the paper's tables' AUC, beside the AUC from scores
    assert detection[0]["auc_from_predictions"] != detection[0]["auc"]


def test_labels_outside_a_given_task_are_refused_and_nothing_is_written(tmp_path, capsys):
    latents = graded_0_to_4(tmp_path / "z.npz")
    out = tmp_path / "out"
    job = tmp_path / "job.yaml"
    job.write_text("heads:\n  tasks:\n    - {name: fracture, column: grade, positives: [1, 2, 3], "
                   "grade_range: [0, 3]}\n")
    main = fit_heads_job.main
    code = run_main(main, ["--latents", str(latents), "--config", str(job), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    count = int((np.load(latents)["label_grade"] == 4).sum())
    assert code == 2 and "\n" not in err
    assert err == (f"error: {latents}: label column 'grade' has {count} rows outside the grade_range [0, 3] of task "
                   f"'fracture' (values: 4 x{count}); widen grade_range or drop those rows")
    assert not out.exists()
    code = run_main(main, ["--latents", str(latents), "--out", str(out), "--heads.protocol=sklearn"])
    assert code == 2 and "heads.protocol: must be one of 'project' or 'paper', got 'sklearn'" in \
        capsys.readouterr().err
    assert not out.exists()


def test_tasks_given_by_job_file_or_override(tmp_path):
    tasks_given = fit_heads_job.tasks_given
    job = tmp_path / "job.yaml"
    job.write_text("heads:\n  kinds: [svm]\n")
    assert not tasks_given(None, []) and not tasks_given(str(job), ["--heads.C=2"])
    assert tasks_given(str(job), ["--heads.tasks=[{name: a, column: a, positives: [1]}]"])
    job.write_text("heads:\n  tasks: [{name: a, column: a, positives: [1]}]\n")
    assert tasks_given(str(job), [])


def test_a_task_that_leaves_one_class_empty_ends_with_one_line(tmp_path, capsys):
    from harness.cli import run_main
    from harness.method.latents import LatentsTable, save_latents
    from harness.ops.fit_heads_job import main as fit_heads_main

    rng = np.random.default_rng(0)
    path = save_latents(LatentsTable(ids=np.array([str(i) for i in range(40)]),
                                     splits=np.array(["train"] * 30 + ["test"] * 10),
                                     z_sem=rng.normal(size=(40, 8)).astype(np.float32),
                                     labels={"grade": rng.integers(0, 2, 40)}), tmp_path / "z.npz")
    status = run_main(fit_heads_main, ["--latents", str(path), "--out", str(tmp_path / "heads"),
                                       "--heads.tasks=[{name: x, column: grade, positives: [5], grade_range: null}]"])
    line = capsys.readouterr().err.strip()
    assert status == 2 and line.splitlines() == [line] and "task 'x'" in line and "0 positive / 30 negative" in line
    assert not (tmp_path / "heads").exists()


def test_a_split_the_latents_lack_is_refused_before_any_head_is_fitted(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(0)
    splits = np.array(["train"] * 30 + ["test"] * 10)
    latents = save_latents(LatentsTable(ids=[f"i{i}" for i in range(40)], splits=splits, z_sem=rng.normal(size=(40, 6)),
                                        labels={"grade": np.arange(40) % 2}), tmp_path / "z.npz")
    out = tmp_path / "out"

    def no_fitting(*args, **kwargs):
        raise AssertionError("a head was fitted before the split was checked")

    monkeypatch.setattr(fit_heads_job, "evaluate_heads", no_fitting)
    code = run_main(fit_heads_job.main, ["--latents", str(latents), "--out", str(out), "--split", "val"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.splitlines() == [err]
    assert err.startswith(f"error: {latents}: --split val: the latents have no 'val' rows")
    assert "['test', 'train']" in err
    assert not out.exists()


def test_an_out_folder_holding_heads_is_refused_without_overwrite(tmp_path, capsys, monkeypatch):
    latents = graded_0_to_4(tmp_path / "z.npz")
    out = tmp_path / "out"
    args = ["--latents", str(latents), "--out", str(out), "--heads.kinds=[svm]"]
    assert run_main(fit_heads_job.main, args) == 0
    first = (out / "heads.json").read_bytes()
    capsys.readouterr()

    def no_work(*args, **kwargs):
        raise AssertionError("the latents were read before the output folder was checked")

    with monkeypatch.context() as patch:
        patch.setattr(fit_heads_job, "load_latents", no_work)
        code = run_main(fit_heads_job.main, [*args, "--heads.C=0.01"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.splitlines() == [err] and "already holds heads.json, index.html" in err \
        and "--overwrite" in err
    assert (out / "heads.json").read_bytes() == first  # untouched
    assert run_main(fit_heads_job.main, [*args, "--heads.C=0.01", "--overwrite"]) == 0
    assert json.loads((out / "heads.json").read_text())["grade/svm"]["head"]["C"] == 0.01
