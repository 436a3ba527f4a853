"""One head specification: the fitting choices, the two protocols, and heads that match scikit-learn called directly."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import cohen_kappa_score, roc_auc_score
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC

from harness.config import UNCAPPED_ITER, ConfigError, HeadOptions, HeadsConfig, RunConfig, Task, load_config, validate
from harness.method.grading import grading_report
from harness.method.heads import FittedHead, TaskResult, evaluate_task, fit_head, fit_task
from tests.helpers.latents import graded_table

TASK = Task("fracture", "grade", (1, 2, 3), None, (0, 3))

# (protocol, head kind, svm solver or None): every head kind under both protocols, the SVM with both solvers
# (the paper's preset fixes the solver, so its LinearSVC case does not exist).
CASES = [("project", "svm", "linear_svc"), ("project", "svm", "svc_linear"), ("project", "logistic", None),
         ("project", "linear", None), ("paper", "svm", "svc_linear"), ("paper", "logistic", None),
         ("paper", "linear", None)]


def reference(kind: str, options: HeadOptions, z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn called directly: (decision values, 0/1 predictions) on the training latents."""
    x = StandardScaler().fit_transform(z) if options.standardize else z
    weight = options.class_weight
    if kind == "linear":
        from sklearn.utils.class_weight import compute_sample_weight

        model = Ridge(alpha=1.0 / options.C, random_state=0)
        model.fit(x, y.astype(np.float64), sample_weight=compute_sample_weight(weight, y) if weight else None)
        raw = model.predict(x) - 0.5
        return raw, (raw > 0).astype(np.int64)
    iterations = options.max_iter if options.max_iter > 0 else UNCAPPED_ITER
    if kind == "svm" and options.svm_solver == "svc_linear":
        model = SVC(kernel="linear", C=options.C, class_weight=weight, max_iter=options.max_iter, random_state=0)
    elif kind == "svm":
        model = LinearSVC(C=options.C, class_weight=weight, max_iter=iterations, random_state=0)
    else:
        model = LogisticRegression(C=options.C, class_weight=weight, max_iter=iterations, random_state=0)
    model.fit(x, y)
    return model.decision_function(x), model.predict(x)


@pytest.mark.parametrize(("protocol", "kind", "solver"), CASES)
def test_heads_match_scikit_learn_called_directly(protocol, kind, solver):
    table = graded_table()
    given = {"svm_solver": solver} if solver and protocol == "project" else {}
    options = HeadOptions(protocol=protocol, **given)
    train = table.select("train")
    mask, y = TASK.binary_targets(train.labels["grade"])
    z = train.z_sem[mask].astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the same fit on both sides: same warnings
        head = fit_head(z, y, kind=kind, backend="sklearn", options=options)
        scores, predictions = reference(kind, options, z, y)
    raw = z @ head.hyperplane.normal + head.hyperplane.bias  # the head's decision before dividing by ||n||
    np.testing.assert_allclose(raw, scores, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(head.predict(z), predictions)
    assert (head.protocol, head.standardized, head.svm_solver) == (protocol, options.standardize, options.svm_solver)
    assert set(predictions.tolist()) == {0, 1}  # a real fit, not a constant


def test_protocols_differ_and_paper_reports_auc_from_predictions():
    table = graded_table()
    project = fit_task(table, TASK, kind="svm", backend="sklearn", options=HeadOptions())
    paper = fit_task(table, TASK, kind="svm", backend="sklearn", options=HeadOptions(protocol="paper"))
    assert not np.allclose(project.head.hyperplane.unit_normal, paper.head.hyperplane.unit_normal, atol=1e-3)
    row = evaluate_task(paper, table, "test")
    test = table.select("test")
    mask, y = TASK.binary_targets(test.labels["grade"])
    assert row["auc_from_predictions"] == pytest.approx(roc_auc_score(y, paper.head.predict(test.z_sem[mask])))
    assert row["auc_from_predictions"] != pytest.approx(row["auc"])  # hard predictions lose the ranking
    assert "auc_from_predictions" not in evaluate_task(project, table, "test")
    # the paper's calibration: least squares over every graded training row
    train = table.select("train")
    dist = paper.head.decision(train.z_sem)
    np.testing.assert_allclose(paper.calibration.coefficients, np.polyfit(dist, train.labels["grade"], 1), atol=1e-9)


def test_grading_metrics_continuous_and_rounded():
    table = graded_table()
    result = fit_task(table, TASK, kind="logistic", backend="sklearn")
    row = evaluate_task(result, table, "test")
    test = table.select("test")
    continuous = result.calibration.grade_continuous(result.head.decision(test.z_sem))
    rounded = result.calibration.grade(result.head.decision(test.z_sem))
    truth = test.labels["grade"]
    assert row["grade_mae_continuous"] == pytest.approx(np.abs(truth - np.clip(continuous, 0, 3)).mean())
    assert row["grade_mae_rounded"] == row["grade_mae"] == pytest.approx(np.abs(truth - rounded).mean())
    assert row["grade_kappa_quadratic"] == pytest.approx(cohen_kappa_score(truth, rounded, weights="quadratic"))
    assert row["grade_counts_true"] == [int((truth == g).sum()) for g in range(4)]
    assert sum(row["grade_counts_predicted"]) == len(truth) and len(row["grade_confusion"]) == 4


def test_grading_report_single_grade_has_no_kappa():
    out = grading_report(np.zeros(3, int), np.array([0.1, -0.2, 0.3]), (0, 3))
    assert np.isnan(out["kappa_quadratic"])
    assert out["mae_continuous"] == pytest.approx(0.4 / 3)  # -0.2 clipped to grade 0 counts as exact


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # max_iter=800 is the point
def test_fitting_choices_are_recorded_and_old_heads_load_with_old_defaults():
    table = graded_table()
    options = HeadOptions(C=0.5, standardize=False, class_weight={1: 2.0}, svm_solver="svc_linear", max_iter=800)
    result = fit_task(table, TASK, kind="svm", backend="sklearn", options=options)
    data = json.loads(json.dumps(result.to_dict()))
    head = data["head"]
    assert (head["C"], head["standardized"], head["svm_solver"], head["max_iter"]) == (0.5, False, "svc_linear", 800)
    assert head["class_weight"] == {"0": 1.0, "1": 2.0}
    loaded = TaskResult.from_dict(data)
    assert loaded.head.class_weight == {0: 1.0, 1: 2.0} and loaded.head.protocol == "project"
    old = {k: v for k, v in head.items() if k not in ("class_weight", "svm_solver", "max_iter", "protocol")}
    old_head = FittedHead.from_dict(old)
    assert (old_head.class_weight, old_head.svm_solver, old_head.max_iter, old_head.protocol) == \
        ("balanced", "linear_svc", 5000, "project")


def test_convergence_warning_names_task_and_head():
    table = graded_table()
    with pytest.warns(ConvergenceWarning, match=r"task 'fracture', logistic head"):
        fit_task(table, TASK, kind="logistic", backend="sklearn", options=HeadOptions(max_iter=1))


def heads_section(**values) -> HeadsConfig:
    """A run file's heads section through the loader (errors as the user sees them)."""
    return validate(RunConfig, {"heads": values}).heads


def test_heads_section_protocols_and_refusals(tmp_path):
    assert HeadsConfig().options() == HeadOptions()  # the project's defaults are today's behaviour
    paper = heads_section(protocol="paper", C=0.1)
    assert (paper.standardize, paper.class_weight, paper.svm_solver, paper.max_iter) == (False, None, "svc_linear", -1)
    assert paper.options().C == 0.1
    assert heads_section(protocol="paper", standardize=False, class_weight="none").protocol == "paper"  # agreeing
    with pytest.raises(ConfigError, match=r"heads\.standardize: True contradicts protocol 'paper'"):
        heads_section(protocol="paper", standardize=True)
    with pytest.raises(ConfigError, match=r"heads\.calibration: 'extremes' contradicts"):
        heads_section(protocol="paper", calibration="extremes")
    with pytest.raises(ConfigError, match=r"heads\.protocol: must be one of 'project' or 'paper', got 'papr'"):
        heads_section(protocol="papr")
    with pytest.raises(ConfigError, match=r"heads\.kinds\[0\]: must be one of 'svm', 'logistic' or 'linear', "
                                          r"got 'svn'"):
        heads_section(kinds=("svn",))
    with pytest.raises(ConfigError, match=r"heads\.svm_solver"):
        heads_section(svm_solver="libsvm")
    with pytest.raises(ConfigError, match=r"heads\.class_weight"):
        heads_section(class_weight={2: 1.0})
    with pytest.raises(ConfigError, match=r"heads\.max_iter: an integer >= 1, or -1 for no cap, got 0"):
        heads_section(max_iter=0)
    explicit = heads_section(standardize=False, class_weight=None, svm_solver="svc_linear", max_iter=100, C=2.0,
                             calibration="poly2")
    assert explicit.options() == HeadOptions(C=2.0, standardize=False, class_weight=None, svm_solver="svc_linear",
                                             max_iter=100, calibration="poly2")
    job = tmp_path / "job.yaml"
    job.write_text("heads:\n  protocol: paper\n  class_weight: {0: 1, 1: 3}\n")
    with pytest.raises(ConfigError, match="class_weight"):
        load_config(job)
    job.write_text("heads:\n  class_weight: {0: 1, 1: 3}\n  svm_solver: svc_linear\n")
    loaded = load_config(job).heads
    assert loaded.class_weight == {0: 1.0, 1: 3.0} and loaded.svm_solver == "svc_linear"
    again = load_config(None, ["--heads.protocol=paper"]).heads  # a resolved config reloads unchanged
    assert again.options() == HeadOptions(protocol="paper")


@pytest.mark.parametrize(("name", "parsed"), [("extremes", ("extremes", 1)), ("lstsq", ("lstsq", 1)),
                                              ("poly1", ("poly", 1)), ("poly3", ("poly", 3))])
def test_one_calibration_vocabulary(name, parsed):
    from harness.config import parse_calibration

    assert parse_calibration(name) == parsed
    assert heads_section(calibration=name).calibration == name  # the job's heads section takes the same names
    from harness.ops.sweep import SearchSpace

    assert validate(SearchSpace, {"calibration": [name]}).calibration == (name,)  # ... and the sweep's grid


@pytest.mark.parametrize("bad", ["poly", "poly0", "poly10", "cubic", "Poly2", 2])
def test_calibration_names_outside_the_vocabulary_are_refused(bad):
    with pytest.raises(ConfigError, match=r"heads\.calibration"):
        heads_section(calibration=bad)


def test_config_files_written_before_the_one_vocabulary_still_load():
    """config.yaml files next to older checkpoints carry ``calibration`` + ``degree``: read as one name."""
    assert heads_section(calibration="poly", degree=2).calibration == "poly2"
    assert heads_section(calibration="lstsq", degree=1).calibration == "lstsq"
    with pytest.raises(ConfigError, match=r"heads\.calibration"):
        heads_section(calibration="lstsq", degree=3)
    assert HeadOptions.from_dict({"calibration": "poly", "degree": 3, "C": 2.0}).calibration == "poly3"
