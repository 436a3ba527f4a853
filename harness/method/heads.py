"""Linear heads on the semantic latent, their signed distance, and the distance -> grade calibration.

Atad et al., Sections 3.2-3.3. A linear head on ``z_sem`` is a hyperplane ``(n, b)``; the signed distance of a
latent ``w`` to it is ``dist = (n.w + b) / ||n||`` (Eq. 3), positive on the pathological side. Counterfactuals
move ``w`` along ``n / ||n||``, so the hyperplane is always stored in the RAW ``z_sem`` space, even when the
head was fitted on standardized latents. A calibration maps distance to the clinical grade (Section 3.3) and
its inverse gives the distance of a requested grade.

Head kinds: ``"svm"`` (linear SVM: ``LinearSVC`` or ``SVC(kernel="linear")``), ``"logistic"`` (logistic
regression) and ``"linear"`` (ridge regression on the 0/1 target, thresholded at 0.5: the hyperplane
``w.x + b - 0.5 = 0``). Every fitting choice (standardize, class weights, SVM solver, C, max_iter, calibration)
and the ``project`` / ``paper`` protocols live in ``harness.config.HeadOptions``; each fitted head records
them; a task is ``harness.config.Task``; the hyperplane is in ``harness.method.hyperplane``. Backends:
scikit-learn, or cuML on a CUDA device. numpy / scikit-learn; the calibration is in
``harness.method.calibration``, grading metrics in ``harness.method.grading``, counterfactual directions in
``harness.method.directions``.
"""

from __future__ import annotations

import importlib.util
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from harness.config import HEAD_KINDS, HeadOptions, Task, normalize_class_weight
from harness.config.heads import MAX_ROWS_QUADRATIC
from harness.errors import UserError
from harness.method.calibration import Calibration, fit_calibration  # noqa: F401 (re-exported)
from harness.method.directions import Direction, DirectionError, direction_name, fit_direction, normal_direction
from harness.method.grading import grading_report
from harness.method.hyperplane import Hyperplane
from harness.method.latents import LatentsTable
from harness.method.metrics import detection_metrics

BACKENDS = ("auto", "sklearn", "cuml")
MIN_SAMPLES_PER_CLASS = 2
IMBALANCE_WARN_RATIO = 10.0  # warn when the majority class outnumbers the minority this many times


class HeadFitError(UserError, ValueError):
    """A head cannot be fitted on what the user's task and data give (e.g. one class only); names the task."""


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free logistic function


@dataclass
class FittedHead:
    """A fitted linear head. ``probability = sigmoid(platt[0] * distance + platt[1])``.

    For ``logistic`` the pair is (||n||, 0): the model's own sigmoid of its raw decision ``n.w + b``. For
    ``svm`` and ``linear`` it is a Platt scaling fitted on the training distances, so every kind reports one.
    """

    kind: str
    hyperplane: Hyperplane
    C: float
    backend: str
    task: Task | None = None
    standardized: bool = True
    platt: tuple[float, float] = (1.0, 0.0)
    n_pos: int = 0
    n_neg: int = 0
    fit_seconds: float = 0.0
    # The remaining fitting choices; heads files written before they were recorded load with these defaults,
    # which were the only behaviour then.
    class_weight: Any = "balanced"
    svm_solver: str = "linear_svc"
    max_iter: int = 5000
    protocol: str = "project"

    def decision(self, z: np.ndarray) -> np.ndarray:
        """Signed distance of latents (N, D) -> (N,); positive = the task's positive class."""
        return self.hyperplane.distance(z)

    def predict(self, z: np.ndarray) -> np.ndarray:
        """0/1 prediction (N,): the side of the hyperplane."""
        return (self.decision(z) > 0).astype(np.int64)

    def probability(self, z: np.ndarray) -> np.ndarray:
        """P(positive) (N,)."""
        return _sigmoid(self.platt[0] * self.decision(z) + self.platt[1])

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "hyperplane": self.hyperplane.to_dict(), "platt": list(self.platt),
                "task": None if self.task is None else self.task.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FittedHead:
        task = data.get("task")
        return cls(**{**data, "hyperplane": Hyperplane.from_dict(data["hyperplane"]), "platt": tuple(data["platt"]),
                      "task": None if task is None else Task.from_dict(task, "heads file: task"),
                      "class_weight": normalize_class_weight(data.get("class_weight", "balanced"))})


# ---------------------------------------------------------------------------------------------------------
# Fitting.
# ---------------------------------------------------------------------------------------------------------


def cuda_available() -> bool:
    """True when cupy sees a CUDA device (cuML needs one); never raises."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def resolve_backend(backend: str) -> str:
    """``auto`` -> ``cuml`` when cuML is importable and a CUDA device is present, else ``sklearn``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    has_cuml = importlib.util.find_spec("cuml") is not None
    if backend == "auto":
        return "cuml" if has_cuml and cuda_available() else "sklearn"
    if backend == "cuml" and not has_cuml:
        raise ValueError("backend 'cuml' was requested but cuML is not installed; use 'sklearn' or 'auto'")
    return backend


def check_quadratic_solver(rows: int, kind: str, svm_solver: str, backend: str,
                           max_rows: int | None = MAX_ROWS_QUADRATIC) -> None:
    """Refuse the quadratic-time solver (``svm_solver: svc_linear``, libsvm) on a CPU above ``max_rows`` rows.

    libsvm's time grows with the square of the rows (measured on 2 CPU cores, 512-d latents: 12 s at 5k rows,
    50 s at 10k, over 500 s at 20k), so a MIMIC-sized fit would run for hours without saying why. ``backend``
    is the resolved one (``cuml`` fits on a GPU and is not limited); ``max_rows`` None switches the check off."""
    if kind != "svm" or svm_solver != "svc_linear" or backend == "cuml" or max_rows is None or rows <= max_rows:
        return
    raise HeadFitError(f"error: svm_solver 'svc_linear' (SVC(kernel='linear'), the paper protocol's) on {rows} "
                       f"training rows on a CPU: its time grows quadratically (hours at this size), the limit is "
                       f"max_rows_quadratic={max_rows}; use svm_solver: linear_svc, the logistic head, or "
                       f"backend: cuml on a GPU node (or raise max_rows_quadratic)")


def check_quadratic_tasks(table: LatentsTable, tasks: list[Task], kinds: tuple[str, ...], svm_solver: str,
                          backend: str, max_rows: int | None = MAX_ROWS_QUADRATIC, train_split: str = "train") -> None:
    """:func:`check_quadratic_solver` for every task of a job at once, before any head is fitted: the largest
    number of ``train_split`` rows a task's rule selects (``backend`` resolved: :func:`resolve_backend`)."""
    if "svm" not in kinds or not tasks:
        return
    train = table.select(train_split)
    rows = max((int(task.binary_targets(np.asarray(train.labels[task.column], np.float64))[0].sum())
                for task in tasks if task.column in train.labels), default=0)  # a missing column: refused elsewhere
    check_quadratic_solver(rows, "svm", svm_solver, backend, max_rows)


def _check_training_data(z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    z = np.asarray(z, dtype=np.float64)
    y = np.asarray(y).reshape(-1)
    if z.ndim != 2 or z.shape[0] != y.shape[0]:
        raise ValueError(f"z must be (N, D) with one target per row; got z {z.shape}, y {y.shape}")
    bad_rows = np.flatnonzero(~np.isfinite(z).all(axis=1))
    if bad_rows.size:
        raise ValueError(f"z has NaN/inf in {bad_rows.size} rows (first: {bad_rows[:5].tolist()})")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"targets must be 0/1, found values {np.unique(y)[:10].tolist()}")
    y = y.astype(np.int64)
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    counts = f"{n_pos} positive / {n_neg} negative"
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"a head needs both classes, got {counts}")
    if min(n_pos, n_neg) < MIN_SAMPLES_PER_CLASS:
        raise ValueError(f"too few samples to fit a head: {counts} (need >= {MIN_SAMPLES_PER_CLASS} per class)")
    if max(n_pos, n_neg) > IMBALANCE_WARN_RATIO * min(n_pos, n_neg):
        warnings.warn(f"strong class imbalance: {counts}", stacklevel=3)
    return z, y, n_pos, n_neg


def _estimator(kind: str, backend: str, C: float, class_weight: Any, max_iter: int, random_state: int,
               svm_solver: str = "linear_svc") -> Any:
    """An unfitted estimator. For ``linear``, ridge ``alpha = 1 / C`` so larger C is weaker regularization.

    ``svm_solver``: ``linear_svc`` = LinearSVC (liblinear, squared hinge: fast), ``svc_linear`` =
    SVC(kernel="linear") (libsvm, hinge loss: the paper's)."""
    if backend == "cuml":
        from cuml.linear_model import LogisticRegression, Ridge
        from cuml.svm import SVC, LinearSVC

        extra: dict[str, Any] = {"output_type": "numpy"}
    else:
        from sklearn.linear_model import LogisticRegression, Ridge
        from sklearn.svm import SVC, LinearSVC

        extra = {"random_state": random_state}
    if kind == "linear":
        return Ridge(alpha=1.0 / C, **extra)
    if kind == "svm" and svm_solver == "svc_linear":
        return SVC(kernel="linear", C=C, class_weight=class_weight, max_iter=max_iter, **extra)
    classifier = LinearSVC if kind == "svm" else LogisticRegression
    return classifier(C=C, class_weight=class_weight, max_iter=max_iter, **extra)


def _platt(dist: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Logistic fit of y on the distance (scaled to unit spread first, so the fit is scale-free)."""
    from sklearn.linear_model import LogisticRegression

    scale = float(np.std(dist)) or 1.0
    model = LogisticRegression().fit((dist / scale)[:, None], y)
    return float(model.coef_[0, 0]) / scale, float(model.intercept_[0])


def fit_head(z: np.ndarray, y: np.ndarray, kind: str = "svm", C: float = 1.0, standardize: bool = True,
             class_weight: Any = "balanced", backend: str = "auto", max_iter: int = 5000,
             random_state: int = 0, svm_solver: str = "linear_svc", protocol: str = "project",
             options: HeadOptions | None = None, max_rows_quadratic: int | None = MAX_ROWS_QUADRATIC) -> FittedHead:
    """Fit a linear head on latents z (N, D) with 0/1 targets y (N,); the hyperplane is returned in raw space.

    ``options`` (a :class:`harness.config.HeadOptions`), when given, replaces C, standardize, class_weight,
    max_iter, svm_solver and protocol. With ``standardize`` the estimator sees ``(z - mu) / sigma``; its
    ``(n_std, b_std)`` maps back exactly: ``n_std.(z - mu)/sigma + b_std = (n_std/sigma).z + (b_std -
    sum(n_std*mu/sigma))``.
    """
    if options is None:  # the keyword form: validated by the same rules as a job file's heads section
        options = HeadOptions(protocol=protocol, C=C, standardize=standardize, class_weight=class_weight,
                              svm_solver=svm_solver, max_iter=max_iter)
    C, standardize, class_weight = options.C, options.standardize, options.class_weight
    if kind not in HEAD_KINDS:
        raise ValueError(f"kind must be one of {HEAD_KINDS}, got kind={kind!r}")
    max_iter = options.estimator_max_iter(kind)
    z, y, n_pos, n_neg = _check_training_data(z, y)
    backend = resolve_backend(backend)
    check_quadratic_solver(len(z), kind, options.svm_solver, backend, max_rows_quadratic)
    mu = z.mean(axis=0) if standardize else np.zeros(z.shape[1])  # (D,)
    sigma = z.std(axis=0) if standardize else np.ones(z.shape[1])  # (D,)
    sigma = np.where(sigma > 0, sigma, 1.0)  # constant features: leave unscaled (their weight stays ~0)
    z_fit = ((z - mu) / sigma).astype(np.float32 if backend == "cuml" else np.float64)  # (N, D)

    start = time.perf_counter()
    model = _estimator(kind, backend, C, class_weight, max_iter, random_state, options.svm_solver)
    if kind == "linear":
        from sklearn.utils.class_weight import compute_sample_weight

        weights = compute_sample_weight(class_weight, y) if class_weight else None
        model.fit(z_fit, y.astype(z_fit.dtype), sample_weight=weights)
    else:
        model.fit(z_fit, y)
    fit_seconds = time.perf_counter() - start

    normal_std = np.asarray(model.coef_, dtype=np.float64).reshape(-1)  # (D,)
    bias_std = float(np.asarray(model.intercept_, dtype=np.float64).reshape(-1)[0])
    if kind == "linear":
        bias_std -= 0.5  # regression output 0.5 is the decision boundary
    normal = normal_std / sigma
    bias = bias_std - float(np.sum(normal_std * mu / sigma))
    hyperplane = Hyperplane(normal, bias)
    if hyperplane.norm == 0.0:
        raise ValueError(f"the fitted {kind} head has an all-zero normal (C={C} too small?); "
                         f"{n_pos} positive / {n_neg} negative")
    platt = (hyperplane.norm, 0.0) if kind == "logistic" else _platt(hyperplane.distance(z), y)
    return FittedHead(kind, hyperplane, float(C), backend, None, standardize, platt, n_pos, n_neg, fit_seconds,
                      class_weight, options.svm_solver, options.max_iter, options.protocol)


# ---------------------------------------------------------------------------------------------------------
# One task end to end: fit on the train split, evaluate on another.
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TaskResult:
    """A task's fitted head, (when the task has a grade range) its calibration, and the counterfactual direction.

    ``direction`` None means the paper's unit normal: heads files written before directions existed load so.
    """

    task: Task
    head: FittedHead
    calibration: Calibration | None
    train_split: str = "train"
    direction: Direction | None = None

    def to_dict(self) -> dict[str, Any]:
        calibration = None if self.calibration is None else self.calibration.to_dict()
        direction = normal_direction(self.head.hyperplane) if self.direction is None else self.direction
        return {"task": self.task.to_dict(), "head": self.head.to_dict(), "calibration": calibration,
                "train_split": self.train_split, "direction": direction.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "heads") -> TaskResult:
        calibration = data.get("calibration") and Calibration.from_dict(data["calibration"])
        direction = data.get("direction")
        if direction is not None:
            direction = Direction.from_dict(direction, f"{where}.direction")
            if len(direction.vector) != len(data["head"]["hyperplane"]["normal"]):
                raise DirectionError(f"{where}.direction.vector: dimension {len(direction.vector)} differs from "
                                     f"the head's {len(data['head']['hyperplane']['normal'])}")
        return cls(Task.from_dict(data["task"], f"{where}.task"), FittedHead.from_dict(data["head"]), calibration,
                   data.get("train_split", "train"), direction)

    @property
    def direction_name(self) -> str:
        return direction_name(self.direction)


def task_direction(result: TaskResult, table: LatentsTable, name: str, *, variance: float = 0.99,
                   k: int | None = None) -> Direction:
    """Fit direction ``name`` for a task's head from the rows of its training split (those the head was fit on)."""
    train = table.select(result.train_split)
    mask, y = result.task.binary_targets(_label_column(train, result.task.column))
    try:
        return fit_direction(name, train.z_sem[mask], y, result.head.hyperplane, variance=variance, k=k)
    except DirectionError as error:
        raise DirectionError(f"task {result.task.name!r}, {result.head.kind} head: {error}") from None


def _label_column(table: LatentsTable, column: str) -> np.ndarray:
    if column not in table.labels:
        raise ValueError(f"label column {column!r} is not in the latents table (columns: {table.label_columns})")
    return np.asarray(table.labels[column], dtype=np.float64)  # (N,), NaN = missing


def _graded_rows(grades: np.ndarray, grade_range: tuple[int, int]) -> np.ndarray:
    return np.isfinite(grades) & (grades >= grade_range[0]) & (grades <= grade_range[1])  # NaN compares False


def fit_task(table: LatentsTable, task: Task, kind: str = "svm", C: float = 1.0,
             calibration: str = "lstsq", standardize: bool = True,
             class_weight: Any = "balanced", backend: str = "auto", train_split: str = "train",
             max_iter: int = 5000, random_state: int = 0, options: HeadOptions | None = None,
             max_rows_quadratic: int | None = MAX_ROWS_QUADRATIC) -> TaskResult:
    """Fit the task's head on ``train_split`` rows selected by its rule; calibrate on all graded train rows.

    ``options`` (a :class:`harness.config.HeadOptions`), when given, replaces C, calibration (a name:
    ``extremes``, ``lstsq``, ``poly<N>``), standardize, class_weight and max_iter. Warnings raised while fitting
    are re-emitted (same category) with the task and head named, so a ConvergenceWarning says which head did
    not converge.
    """
    if options is None:
        options = HeadOptions(C=C, standardize=standardize, class_weight=class_weight, max_iter=max_iter,
                              calibration=calibration)
    train = table.select(train_split)
    labels = _label_column(train, task.column)
    mask, y = task.binary_targets(labels)
    # before any fitting, and before the class checks: the limit says what to use instead
    check_quadratic_solver(int(mask.sum()), kind, options.svm_solver, resolve_backend(backend), max_rows_quadratic)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            head = fit_head(train.z_sem[mask], y, kind=kind, backend=backend, random_state=random_state,
                            options=options, max_rows_quadratic=max_rows_quadratic)
        except ValueError as error:
            raise HeadFitError(f"error: task {task.name!r} on split {train_split!r}: {error}: check the task's "
                               "positives / negatives against the labels, or the split") from error
    for warning in caught:
        warnings.warn(f"task {task.name!r}, {kind} head ({options.protocol} protocol): {warning.message}",
                      warning.category, stacklevel=2)
    head.task = task
    if task.grade_range is not None:
        graded = _graded_rows(labels, task.grade_range)
        fitted = fit_calibration(head.decision(train.z_sem[graded]), labels[graded], mode=options.calibration,
                                 grade_range=task.grade_range)
        return TaskResult(task, head, fitted, train_split)
    return TaskResult(task, head, None, train_split)


def evaluate_task(result: TaskResult, table: LatentsTable, split: str = "test") -> dict[str, Any]:
    """Flat dict of detection metrics (AUC from distances) and, when calibrated, grading metrics on ``split``.

    Heads fitted under the paper's protocol also get ``auc_from_predictions``: the AUC of the hard 0/1
    predictions, how the paper's tables were computed (it equals balanced accuracy; only for comparison)."""
    rows = table.select(split)
    labels = _label_column(rows, result.task.column)
    mask, y = result.task.binary_targets(labels)
    dist = result.head.decision(rows.z_sem)  # (N,)
    out: dict[str, Any] = {"task": result.task.name, "kind": result.head.kind, "C": result.head.C, "split": split,
                           "protocol": result.head.protocol}
    out.update(detection_metrics(y, dist[mask]))
    if result.head.protocol == "paper":
        hard = detection_metrics(y, (dist[mask] > 0).astype(np.float64) - 0.5)  # scores +-0.5: the predictions
        out["auc_from_predictions"] = hard["auc"]
    if result.calibration is not None:
        graded = _graded_rows(labels, result.task.grade_range)
        grading = grading_report(labels[graded].astype(np.int64), result.calibration.grade_continuous(dist[graded]),
                                 result.task.grade_range)
        out.update({f"grade_{name}": value for name, value in grading.items()})
    return out
