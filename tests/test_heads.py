"""Linear heads, the signed distance (Eq. 3), standardization mapping, calibration and its inverse."""

from __future__ import annotations

import json

import numpy as np
import pytest

from harness.config import ConfigError, Task
from harness.method.heads import (
    Calibration,
    FittedHead,
    Hyperplane,
    TaskResult,
    evaluate_task,
    fit_calibration,
    fit_head,
    fit_task,
)
from harness.method.latents import LatentsTable


def gaussian_classes(n: int = 200, d: int = 6, gap: float = 4.0, seed: int = 0):
    """Two Gaussian blobs separated along a random direction, with unequal feature scales and offsets."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(np.int64)
    direction = rng.normal(size=d)
    direction /= np.linalg.norm(direction)
    z = rng.normal(size=(n, d)) + np.outer(y - 0.5, direction) * gap
    return z * rng.uniform(0.2, 5.0, d) + rng.normal(0, 3, d), y  # (N, D), (N,)


def test_hyperplane_distance_closed_form():
    # 3x + 4y - 5 = 0: ||n|| = 5, so distance = (3x + 4y - 5) / 5
    plane = Hyperplane(np.array([3.0, 4.0]), -5.0)
    points = np.array([[0.0, 0.0], [3.0, 4.0], [1.0, 0.5], [-3.0, -4.0]])
    np.testing.assert_allclose(plane.distance(points), [-1.0, 4.0, 0.0, -6.0])
    np.testing.assert_allclose(plane.unit_normal, [0.6, 0.8])
    assert plane.norm == pytest.approx(5.0)
    assert Hyperplane.from_dict(plane.to_dict()).distance(points) == pytest.approx(plane.distance(points))
    with pytest.raises(ValueError, match="dimension 3"):
        plane.distance(np.zeros((1, 3)))


@pytest.mark.parametrize("kind", ["svm", "logistic", "linear"])
def test_standardized_fit_maps_back_to_raw_space(kind):
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    z, y = gaussian_classes(gap=1.5)  # overlapping classes: the fit is not trivially determined
    head = fit_head(z, y, kind=kind, C=0.5, backend="sklearn")
    # the same estimator fitted by hand in standardized space
    scaled = StandardScaler().fit_transform(z)
    reference = {"svm": LinearSVC(C=0.5, class_weight="balanced", max_iter=5000, random_state=0),
                 "logistic": LogisticRegression(C=0.5, class_weight="balanced", max_iter=5000, random_state=0),
                 "linear": Ridge(alpha=2.0)}[kind]
    if kind == "linear":
        reference.fit(scaled, y)  # balanced classes: balanced weights are all 1
        std_decision = reference.predict(scaled) - 0.5
    else:
        reference.fit(scaled, y)
        std_decision = reference.decision_function(scaled)
    np.testing.assert_allclose(head.decision(z), std_decision / head.hyperplane.norm, rtol=1e-4, atol=1e-6)

    # moving a latent by d along the unit normal changes its distance by exactly d
    steps = np.array([-2.5, 0.0, 0.7, 3.0])
    moved = z[:4] + steps[:, None] * head.hyperplane.unit_normal
    np.testing.assert_allclose(head.decision(moved) - head.decision(z[:4]), steps, atol=1e-9)


@pytest.mark.parametrize("kind", ["svm", "logistic", "linear"])
@pytest.mark.parametrize("standardize", [True, False])
def test_every_kind_separates_gaussians(kind, standardize):
    from sklearn.metrics import roc_auc_score

    z_all, y_all = gaussian_classes(n=300, seed=1)
    z, y, z_test, y_test = z_all[:200], y_all[:200], z_all[200:], y_all[200:]  # held-out draws
    head = fit_head(z, y, kind=kind, standardize=standardize, backend="sklearn")
    assert head.kind == kind and head.backend == "sklearn" and (head.n_pos, head.n_neg) == (100, 100)
    assert roc_auc_score(y_test, head.decision(z_test)) > 0.95
    assert (head.predict(z_test) == y_test).mean() > 0.9
    prob = head.probability(z_test)
    assert ((prob >= 0) & (prob <= 1)).all() and prob[y_test == 1].mean() > 0.8 > prob[y_test == 0].mean() + 0.6
    clone = FittedHead.from_dict(head.to_dict())
    np.testing.assert_allclose(clone.probability(z_test), prob)


def test_logistic_probability_is_its_own_sigmoid():
    from sklearn.linear_model import LogisticRegression

    z, y = gaussian_classes(gap=1.0)
    head = fit_head(z, y, kind="logistic", standardize=False, class_weight=None, backend="sklearn")
    reference = LogisticRegression(max_iter=5000).fit(z, y)
    np.testing.assert_allclose(head.probability(z), reference.predict_proba(z)[:, 1], atol=1e-3)


def test_bad_training_data_is_rejected_with_counts():
    z, y = gaussian_classes(n=20)
    with pytest.raises(ValueError, match="both classes.*0 positive / 20 negative"):
        fit_head(z, np.zeros(20, dtype=int), backend="sklearn")
    with pytest.raises(ValueError, match="too few.*1 positive / 19 negative"):
        fit_head(z, (np.arange(20) == 3).astype(int), backend="sklearn")
    z_nan = z.copy()
    z_nan[[4, 7], 2] = np.nan
    with pytest.raises(ValueError, match=r"NaN/inf in 2 rows \(first: \[4, 7\]\)"):
        fit_head(z_nan, y, backend="sklearn")
    with pytest.raises(ValueError, match="kind"):
        fit_head(z, y, kind="tree")
    with pytest.raises(ValueError, match="cuML is not installed|backend"):
        fit_head(z, y, backend="cuda")
    imbalanced = (np.arange(200) < 5).astype(int)
    with pytest.warns(UserWarning, match="5 positive / 195 negative"):
        fit_head(gaussian_classes(n=200)[0], imbalanced, backend="sklearn")


def test_task_rule_excludes_grade_one():
    task = Task("fracture", "grade", positives=(2, 3), negatives=(0,))
    grades = np.array([0, 1, 2, 3, np.nan, 0])
    mask, y = task.binary_targets(grades)
    np.testing.assert_array_equal(mask, [True, False, True, True, False, True])
    np.testing.assert_array_equal(y, [0, 1, 1, 0])
    all_others = Task("any", "grade", positives=(1, 2, 3))
    mask, y = all_others.binary_targets(grades)
    np.testing.assert_array_equal(y, [0, 1, 1, 1, 0])
    assert Task.from_dict(task.to_dict()) == task


def test_a_task_record_written_by_older_code_loads():
    """heads.json task records from before the one Task type wrote ``negatives: null`` for "all others"."""
    old = {"name": "fracture", "column": "grade", "positives": [1, 2, 3], "negatives": None, "grade_range": [0, 3]}
    task = Task.from_dict(old)
    assert task == Task("fracture", "grade", (1, 2, 3), (), (0, 3)) and task.class_names is None
    np.testing.assert_array_equal(task.binary_targets(np.array([0, 1, 3]))[1], [0, 1, 1])  # all others negative


@pytest.mark.parametrize(("record", "key"), [
    ({"positives": []}, "positives"),
    ({"positives": [1], "negatives": [1]}, "negatives"),
    ({"grade_range": [3, 0]}, "grade_range"),
    ({"grade_range": [0, 1, 2]}, "grade_range"),
    ({"name": ""}, "name"),
    ({"colour": "red"}, "colour"),
])
def test_a_bad_task_record_is_refused_naming_the_key(record, key):
    base = {"name": "t", "column": "grade", "positives": [1]}
    with pytest.raises(ConfigError, match=rf"heads.json: t/svm.task: .*{key}"):
        Task.from_dict({**base, **record}, "heads.json: t/svm.task")


def test_calibration_modes_recover_known_relations():
    rng = np.random.default_rng(0)
    grades = np.repeat([0, 1, 2, 3], 50).astype(float)
    dist = (grades - 1.0) / 2.0 + rng.normal(0, 0.01, grades.size)  # grade = 2 * dist + 1
    for mode in ("extremes", "lstsq"):
        cal = fit_calibration(dist, grades, mode=mode)
        np.testing.assert_allclose(cal.coefficients, [2.0, 1.0], atol=0.03)
        assert (cal.grade_min, cal.grade_max) == (0, 3)
        np.testing.assert_array_equal(cal.grade(dist), grades.astype(int))
    # a quadratic relation, sampled on a monotonic stretch
    d = np.linspace(0.0, 2.0, 80)
    cal = fit_calibration(d, 0.5 * d**2 + 0.25 * d, mode="poly2")
    np.testing.assert_allclose(cal.coefficients, [0.5, 0.25, 0.0], atol=1e-9)
    # grades_used restricts the rows: the extremes line through grades 1 and 2 only
    cal = fit_calibration(dist, grades, mode="extremes", grades_used=(1, 2))
    assert (cal.grade_min, cal.grade_max) == (1, 2)
    np.testing.assert_allclose(cal.grade_continuous(dist[grades == 1].mean()), 1.0)
    assert Calibration.from_dict(cal.to_dict()) == cal
    with pytest.raises(ValueError, match="two distinct grades"):
        fit_calibration(dist[:50], grades[:50])
    with pytest.raises(ValueError, match="expected extremes, lstsq or poly<degree>"):
        fit_calibration(dist, grades, mode="poly")
    # records written before the one vocabulary name a polynomial "poly": read back with its degree
    old = {**cal.to_dict(), "mode": "poly", "coefficients": [0.5, 0.25, 0.0]}
    assert Calibration.from_dict(old).mode == "poly2"


@pytest.mark.parametrize("coefficients", [(2.0, 1.0), (0.3, -0.2, 1.5, 1.0)])
def test_inverse_calibration_round_trips(coefficients):
    cal = Calibration(f"poly{len(coefficients) - 1}", coefficients, 0, 3, distance_range=(-1.0, 1.5))
    targets = np.array([-1.0, 0.0, 1.0, 2.0, 3.0, 4.0])
    dist = cal.distance_for_grade(targets)
    assert dist.shape == targets.shape and np.all(np.diff(dist) > 0)
    np.testing.assert_allclose(cal.grade_continuous(dist), targets, atol=1e-9)
    np.testing.assert_array_equal(cal.grade(dist), np.clip(targets, 0, 3).astype(int))
    assert float(cal.distance_for_grade(2.0)) == pytest.approx(dist[3])


def test_non_monotonic_polynomial_is_refused():
    # a cubic with turning points at +-1 whose values (+-2 + 1.5) fall inside the grade span -1..4
    wiggly = Calibration("poly3", (1.0, 0.0, -3.0, 1.5), 0, 3, distance_range=(-2.0, 2.0))
    with pytest.raises(ValueError, match="not strictly monotonic"):
        wiggly.distance_for_grade(2.0)
    parabola = Calibration("poly2", (1.0, 0.0, 0.0), 0, 3, distance_range=(0.0, 2.0))
    with pytest.raises(ValueError, match="not strictly monotonic"):
        parabola.distance_for_grade(1.0)
    # x**3 is strictly monotonic despite its flat point: accepted
    assert Calibration("poly3", (1.0, 0.0, 0.0, 1.5), 0, 3).distance_for_grade(2.5) == pytest.approx(1.0)


def graded_table(n_train: int = 240, n_test: int = 120, d: int = 16, seed: int = 0) -> LatentsTable:
    """Latents whose projection on one direction grows with the grade (0..3), plus noise."""
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    grades = rng.integers(0, 4, n)
    direction = np.zeros(d)
    direction[0] = 1.0
    z = rng.normal(0, 0.3, (n, d)) + np.outer(grades - 1.5, direction)
    splits = np.array(["train"] * n_train + ["test"] * n_test)
    return LatentsTable(ids=[f"s{i}" for i in range(n)], splits=splits, z_sem=z, labels={"grade": grades})


def test_fit_and_evaluate_task_end_to_end():
    table = graded_table()
    task = Task("fracture", "grade", positives=(2, 3), negatives=(0,), grade_range=(0, 3))
    result = fit_task(table, task, kind="svm", calibration="lstsq", backend="sklearn")
    assert result.head.task == task and result.calibration is not None
    metrics = evaluate_task(result, table, "test")
    assert metrics["auc"] > 0.95 and metrics["grade_macro_f1"] > 0.7 and metrics["grade_mae"] < 0.4
    assert metrics["n_pos"] + metrics["n_neg"] < 120  # grade 1 rows are excluded from detection
    assert np.array(metrics["grade_confusion"]).sum() == 120
    clone = TaskResult.from_dict(json.loads(json.dumps(result.to_dict())))  # JSON-able, loses nothing
    assert evaluate_task(clone, table, "test")["auc"] == metrics["auc"]
    with pytest.raises(ValueError, match="'stage'.*grade"):
        fit_task(table, Task("x", "stage", positives=(1,)), backend="sklearn")
    with pytest.raises(ValueError, match="task 'rare'.*both classes"):
        fit_task(table, Task("rare", "grade", positives=(7,)), backend="sklearn")


def test_a_task_carries_its_class_names_from_the_job_file_to_heads_json():
    from harness.config import load_config

    config = load_config(None, ["--heads.tasks=[{name: pn, column: label, positives: [1], grade_range: null, "
                                "class_names: [normal, pneumonia]}]"])
    task = config.heads.tasks[0]
    assert task.class_names == ("normal", "pneumonia")
    assert Task.from_dict(task.to_dict()) == task  # recorded in heads.json and read back
    old = {k: v for k, v in task.to_dict().items() if k != "class_names"}  # a heads.json from before the field
    assert Task.from_dict(old).class_names is None


def test_a_heads_file_written_by_older_code_loads_with_the_same_numbers():
    """tests/fixtures/heads_v1.json: ``negatives: null``, calibration ``poly`` + coefficients, no direction."""
    from pathlib import Path

    fixtures = Path(__file__).resolve().parent / "fixtures"
    stored = json.loads((fixtures / "heads_v1.json").read_text())["fracture/logistic"]
    probe = json.loads((fixtures / "heads_v1_probe.json").read_text())
    result = TaskResult.from_dict(stored, where="heads_v1.json: fracture/logistic")
    assert result.task == Task("fracture", "grade", (1, 2, 3), (), (0, 3))
    assert result.calibration.mode == "poly2" and result.direction_name == "normal"
    distance = result.head.decision(np.asarray(probe["z"]))
    np.testing.assert_allclose(distance, probe["distance"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(result.calibration.grade_continuous(distance), probe["grade"], rtol=0, atol=1e-12)
    again = TaskResult.from_dict(json.loads(json.dumps(result.to_dict())))  # written back today, read again
    assert again.task == result.task and again.calibration == result.calibration
