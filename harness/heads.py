"""Linear heads on the semantic latent, their signed distance, and the distance -> grade calibration.

Atad et al., Sections 3.2-3.3. A linear head on ``z_sem`` is a hyperplane ``(n, b)``; the signed distance of a
latent ``w`` to it is ``dist = (n.w + b) / ||n||`` (Eq. 3), positive on the pathological side. Counterfactuals
move ``w`` along ``n / ||n||``, so the hyperplane is always stored in the RAW ``z_sem`` space, even when the
head was fitted on standardized latents. A calibration maps distance to the clinical grade (Section 3.3) and
its inverse gives the distance of a requested grade.

Head kinds: ``"svm"`` (linear SVM), ``"logistic"`` (logistic regression) and ``"linear"`` (ridge regression on
the 0/1 target, thresholded at 0.5: the hyperplane ``w.x + b - 0.5 = 0``). Backends: scikit-learn, or cuML on a
CUDA device. numpy / scikit-learn; counterfactual directions come from ``harness.directions``.
"""

from __future__ import annotations

import importlib.util
import time
import warnings
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

from harness.directions import Direction, DirectionError, direction_name, fit_direction, normal_direction
from harness.latents import LatentsTable
from harness.metrics import detection_metrics, grading_metrics

HEAD_KINDS = ("svm", "logistic", "linear")
BACKENDS = ("auto", "sklearn", "cuml")
MIN_SAMPLES_PER_CLASS = 2
IMBALANCE_WARN_RATIO = 10.0  # warn when the majority class outnumbers the minority this many times


@dataclass(frozen=True)
class TaskSpec:
    """A detection task: a label column plus the values counted as positive (and, optionally, negative).

    ``negatives=None`` (or empty) means every other labelled value. The paper's noisy-label rule is
    ``positives=(2, 3), negatives=(0,)``: grade 1 rows are left out of fitting. ``grade_range`` (e.g. (0, 3))
    enables the distance -> grade calibration on the same column.
    """

    name: str
    column: str
    positives: tuple[int, ...]
    negatives: tuple[int, ...] | None = None
    grade_range: tuple[int, int] | None = None

    def binary_targets(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mask of rows used, 0/1 targets of those rows); missing (NaN) labels are never used."""
        labels = np.asarray(labels).reshape(-1)  # (N,)
        present = ~np.isnan(labels) if np.issubdtype(labels.dtype, np.floating) else np.ones(len(labels), bool)
        positive = np.isin(labels, self.positives) & present
        if self.negatives:
            negative = np.isin(labels, self.negatives) & present
        else:
            negative = present & ~positive
        mask = positive | negative
        return mask, positive[mask].astype(np.int64)

    @classmethod
    def from_config(cls, task: Any) -> TaskSpec:
        """From an object with the same fields (e.g. ``harness.config.TaskConfig``; empty negatives = all others)."""
        return cls(task.name, task.column, tuple(task.positives), tuple(task.negatives) if task.negatives else None,
                   None if task.grade_range is None else tuple(task.grade_range))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskSpec:
        return cls.from_config(SimpleNamespace(**{"negatives": None, "grade_range": None, **data}))


@dataclass(frozen=True, eq=False)  # eq=False: numpy fields make == ambiguous
class Hyperplane:
    """``n.w + b = 0`` in raw z_sem space; ``distance`` is the signed Euclidean distance (paper Eq. 3)."""

    normal: np.ndarray  # (D,)
    bias: float

    @property
    def norm(self) -> float:
        return float(np.linalg.norm(self.normal))  # ||n||

    @property
    def unit_normal(self) -> np.ndarray:
        """n / ||n||, (D,): the direction counterfactuals move along."""
        if self.norm == 0.0:
            raise ValueError("hyperplane normal is all zeros: the head is degenerate")
        return np.asarray(self.normal, dtype=np.float64) / self.norm

    def distance(self, z: np.ndarray) -> np.ndarray:
        """(N, D) or (D,) latents -> (N,) or () signed distances (z @ n + b) / ||n||."""
        z = np.asarray(z, dtype=np.float64)
        if z.shape[-1] != len(self.normal):
            raise ValueError(f"latents have dimension {z.shape[-1]}, the hyperplane has {len(self.normal)}")
        return (z @ np.asarray(self.normal, dtype=np.float64) + self.bias) / self.norm

    def to_dict(self) -> dict[str, Any]:
        return {"normal": np.asarray(self.normal, dtype=np.float64).tolist(), "bias": float(self.bias)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Hyperplane:
        return cls(np.asarray(data["normal"], dtype=np.float64), float(data["bias"]))


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
    task: TaskSpec | None = None
    standardized: bool = True
    platt: tuple[float, float] = (1.0, 0.0)
    n_pos: int = 0
    n_neg: int = 0
    fit_seconds: float = 0.0

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
                      "task": None if task is None else TaskSpec.from_dict(task)})


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


def _estimator(kind: str, backend: str, C: float, class_weight: str | None, max_iter: int, random_state: int) -> Any:
    """An unfitted estimator. For ``linear``, ridge ``alpha = 1 / C`` so larger C is weaker regularization."""
    if backend == "cuml":
        from cuml.linear_model import LogisticRegression, Ridge
        from cuml.svm import LinearSVC

        extra: dict[str, Any] = {"output_type": "numpy"}
    else:
        from sklearn.linear_model import LogisticRegression, Ridge
        from sklearn.svm import LinearSVC

        extra = {"random_state": random_state}
    if kind == "linear":
        return Ridge(alpha=1.0 / C, **extra)
    classifier = LinearSVC if kind == "svm" else LogisticRegression
    return classifier(C=C, class_weight=class_weight, max_iter=max_iter, **extra)


def _platt(dist: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Logistic fit of y on the distance (scaled to unit spread first, so the fit is scale-free)."""
    from sklearn.linear_model import LogisticRegression

    scale = float(np.std(dist)) or 1.0
    model = LogisticRegression().fit((dist / scale)[:, None], y)
    return float(model.coef_[0, 0]) / scale, float(model.intercept_[0])


def fit_head(z: np.ndarray, y: np.ndarray, kind: str = "svm", C: float = 1.0, standardize: bool = True,
             class_weight: str | None = "balanced", backend: str = "auto", max_iter: int = 5000,
             random_state: int = 0) -> FittedHead:
    """Fit a linear head on latents z (N, D) with 0/1 targets y (N,); the hyperplane is returned in raw space.

    With ``standardize`` the estimator sees ``(z - mu) / sigma``; its ``(n_std, b_std)`` maps back exactly:
    ``n_std.(z - mu)/sigma + b_std = (n_std/sigma).z + (b_std - sum(n_std*mu/sigma))``.
    """
    if kind not in HEAD_KINDS or C <= 0:
        raise ValueError(f"kind must be one of {HEAD_KINDS} and C > 0, got kind={kind!r}, C={C}")
    z, y, n_pos, n_neg = _check_training_data(z, y)
    backend = resolve_backend(backend)
    mu = z.mean(axis=0) if standardize else np.zeros(z.shape[1])  # (D,)
    sigma = z.std(axis=0) if standardize else np.ones(z.shape[1])  # (D,)
    sigma = np.where(sigma > 0, sigma, 1.0)  # constant features: leave unscaled (their weight stays ~0)
    z_fit = ((z - mu) / sigma).astype(np.float32 if backend == "cuml" else np.float64)  # (N, D)

    start = time.perf_counter()
    model = _estimator(kind, backend, C, class_weight, max_iter, random_state)
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
    return FittedHead(kind, hyperplane, float(C), backend, None, standardize, platt, n_pos, n_neg, fit_seconds)


# ---------------------------------------------------------------------------------------------------------
# Calibration: distance -> grade (paper Section 3.3).
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """``grade = polyval(coefficients, distance)``; coefficients highest degree first.

    ``distance_range`` (the calibration data's min/max distance) picks the monotonic branch of a polynomial
    when inverting it.
    """

    mode: str
    coefficients: tuple[float, ...]
    grade_min: int
    grade_max: int
    distance_range: tuple[float, float] | None = None

    @property
    def degree(self) -> int:
        return len(self.coefficients) - 1

    def grade_continuous(self, dist: np.ndarray) -> np.ndarray:
        return np.polyval(np.asarray(self.coefficients, dtype=np.float64), np.asarray(dist, dtype=np.float64))

    def grade(self, dist: np.ndarray) -> np.ndarray:
        """Integer grade: rounded and clipped to [grade_min, grade_max]."""
        rounded = np.rint(self.grade_continuous(dist))
        return np.clip(rounded, self.grade_min, self.grade_max).astype(np.int64)

    def _monotonic_branch(self) -> tuple[float, float]:
        """The distance interval on which the polynomial is monotonic and covers [g_min - 1, g_max + 1]."""
        poly = np.poly1d(self.coefficients)
        slope = poly.deriv()
        turning = sorted({float(r.real) for r in slope.roots if abs(r.imag) < 1e-9})
        known = [abs(x) for x in (*turning, *(self.distance_range or ()))]
        far = 1e6 * (1.0 + max(known, default=0.0))  # stands in for +-infinity: beyond every turning point
        edges = [-far, *turning, far]
        branches: list[list[float]] = []
        previous_sign = 0.0
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            sign = float(np.sign(slope(0.5 * (lo + hi))))
            if branches and sign == previous_sign:  # the slope keeps its sign (e.g. the flat point of x**3)
                branches[-1][1] = hi
            else:
                branches.append([lo, hi])
            previous_sign = sign
        needed = (self.grade_min - 1.0, self.grade_max + 1.0)
        covering = [(lo, hi) for lo, hi in branches
                    if min(poly(lo), poly(hi)) <= needed[0] and max(poly(lo), poly(hi)) >= needed[1]]
        if self.distance_range is not None:  # the branch the calibration data lies on
            anchor = 0.5 * (self.distance_range[0] + self.distance_range[1])
            covering = [branch for branch in covering if branch[0] <= anchor <= branch[1]]
        if len(covering) != 1:
            raise ValueError(
                f"calibration polynomial {tuple(round(c, 6) for c in self.coefficients)} is not strictly monotonic "
                f"over the distances of grades {needed[0]:g}..{needed[1]:g}, so distance_for_grade has no unique "
                "answer; use degree 1 (mode 'extremes' or 'lstsq') or a lower polynomial degree")
        return covering[0]

    def distance_for_grade(self, grade: float | np.ndarray) -> np.ndarray:
        """Inverse calibration: the distance whose calibrated grade is ``grade`` (same shape as ``grade``)."""
        grades = np.asarray(grade, dtype=np.float64)
        coefficients = np.asarray(self.coefficients, dtype=np.float64)
        if self.degree == 1:
            slope, intercept = coefficients
            if slope == 0:
                raise ValueError("calibration slope is 0: every distance maps to the same grade")
            return (grades - intercept) / slope
        lo, hi = self._monotonic_branch()
        out = np.empty(grades.size)
        for index, target in enumerate(grades.reshape(-1)):
            shifted = coefficients.copy()
            shifted[-1] -= target
            roots = [r.real for r in np.roots(shifted) if abs(r.imag) < 1e-7 * max(1.0, abs(r.real))]
            inside = [r for r in roots if lo - 1e-9 <= r <= hi + 1e-9]
            if not inside:
                raise ValueError(f"grade {target:g} is outside what the calibration's monotonic branch reaches")
            out[index] = min(inside, key=lambda r: abs(np.polyval(shifted, r)))
        return out.reshape(grades.shape)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        span = data.get("distance_range")
        return cls(data["mode"], tuple(data["coefficients"]), int(data["grade_min"]), int(data["grade_max"]),
                   None if span is None else tuple(span))


CALIBRATION_MODES = ("extremes", "lstsq", "poly")


def fit_calibration(dist: np.ndarray, grades: np.ndarray, mode: str = "extremes", degree: int = 1,
                    grades_used: tuple[int, ...] | None = None,
                    grade_range: tuple[int, int] | None = None) -> Calibration:
    """Fit distance -> grade on (N,) distances and (N,) grades.

    - ``extremes``: the line through (mean distance of the lowest grade, lowest) and (mean distance of the
      highest grade, highest);
    - ``lstsq``: least-squares line grade ~ distance; ``poly``: least-squares polynomial of ``degree``.
    Rows are restricted to ``grades_used`` (default: all) and to ``grade_range`` (default: the grades seen).
    """
    if mode not in CALIBRATION_MODES:
        raise ValueError(f"calibration mode must be one of {CALIBRATION_MODES}, got {mode!r}")
    if (mode != "poly" and degree != 1) or degree < 1:
        raise ValueError(f"degree {degree} with mode {mode!r}: 'extremes'/'lstsq' fit a line, 'poly' any degree >= 1")
    dist = np.asarray(dist, dtype=np.float64).reshape(-1)
    grades = np.asarray(grades, dtype=np.float64).reshape(-1)
    if dist.shape != grades.shape:
        raise ValueError(f"{dist.shape[0]} distances but {grades.shape[0]} grades")
    keep = np.isfinite(dist) & np.isfinite(grades)
    if grades_used is not None:
        keep &= np.isin(grades, grades_used)
    if grade_range is not None:
        keep &= (grades >= grade_range[0]) & (grades <= grade_range[1])
    dist, grades = dist[keep], grades[keep]
    present = np.unique(grades)
    if present.size < 2:
        raise ValueError(f"calibration needs at least two distinct grades, found {present.tolist()} "
                         f"in {dist.size} usable rows")
    grade_min, grade_max = (int(v) for v in (grade_range or (present.min(), present.max())))
    if mode == "extremes":
        low, high = present.min(), present.max()
        d_low, d_high = dist[grades == low].mean(), dist[grades == high].mean()
        if d_low == d_high:
            raise ValueError(f"grades {low:g} and {high:g} have the same mean distance {d_low:g}: no calibration")
        slope = (high - low) / (d_high - d_low)
        coefficients = (float(slope), float(low - slope * d_low))
    else:
        fit_degree = 1 if mode == "lstsq" else degree
        if dist.size <= fit_degree:
            raise ValueError(f"a degree-{fit_degree} calibration needs more than {fit_degree} rows, got {dist.size}")
        coefficients = tuple(float(c) for c in np.polyfit(dist, grades, fit_degree))
    return Calibration(mode, coefficients, grade_min, grade_max, (float(dist.min()), float(dist.max())))


# ---------------------------------------------------------------------------------------------------------
# One task end to end: fit on the train split, evaluate on another.
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TaskResult:
    """A task's fitted head, (when the task has a grade range) its calibration, and the counterfactual direction.

    ``direction`` None means the paper's unit normal: heads files written before directions existed load so.
    """

    task: TaskSpec
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
        return cls(TaskSpec.from_dict(data["task"]), FittedHead.from_dict(data["head"]), calibration,
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


def fit_task(table: LatentsTable, task: TaskSpec, kind: str = "svm", C: float = 1.0,
             calibration_mode: str = "lstsq", degree: int = 1, standardize: bool = True,
             class_weight: str | None = "balanced", backend: str = "auto", train_split: str = "train",
             max_iter: int = 5000, random_state: int = 0) -> TaskResult:
    """Fit the task's head on ``train_split`` rows selected by its rule; calibrate on all graded train rows."""
    train = table.select(train_split)
    labels = _label_column(train, task.column)
    mask, y = task.binary_targets(labels)
    try:
        head = fit_head(train.z_sem[mask], y, kind=kind, C=C, standardize=standardize, class_weight=class_weight,
                        backend=backend, max_iter=max_iter, random_state=random_state)
    except ValueError as error:
        raise ValueError(f"task {task.name!r} on split {train_split!r}: {error}") from error
    head.task = task
    calibration = None
    if task.grade_range is not None:
        graded = _graded_rows(labels, task.grade_range)
        calibration = fit_calibration(head.decision(train.z_sem[graded]), labels[graded], mode=calibration_mode,
                                      degree=degree, grade_range=task.grade_range)
    return TaskResult(task, head, calibration, train_split)


def evaluate_task(result: TaskResult, table: LatentsTable, split: str = "test") -> dict[str, Any]:
    """Flat dict of detection metrics (AUC from distances) and, when calibrated, grading metrics on ``split``."""
    rows = table.select(split)
    labels = _label_column(rows, result.task.column)
    mask, y = result.task.binary_targets(labels)
    dist = result.head.decision(rows.z_sem)  # (N,)
    out: dict[str, Any] = {"task": result.task.name, "kind": result.head.kind, "C": result.head.C, "split": split}
    out.update(detection_metrics(y, dist[mask]))
    if result.calibration is not None:
        graded = _graded_rows(labels, result.task.grade_range)
        grading = grading_metrics(labels[graded].astype(np.int64), result.calibration.grade(dist[graded]),
                                  result.task.grade_range)
        out.update({f"grade_{name}": value for name, value in grading.items()})
    return out
