"""The head sweep's job file, one trial, and the selection rule (``harness.ops.sweep_job`` runs them under Ray Tune).

For each task the sweep tries every combination of head kind, regularisation C, training-label rule
(``fit_rules``: which grades count as positive/negative when FITTING, e.g. the paper's noisy-label rule
"2,3 vs 0") and calibration (``extremes``, ``lstsq``, ``poly1``..``poly3``). A trial fits on the train split and
scores the VALIDATION split only (or, with ``cv_folds: k``, the mean over k stratified folds of the train split,
for latents without a val split); the task's own rule (``positives``/``negatives``) always defines the detection
targets being scored, so trials with different fitting rules are compared on the same targets.

Selection (:func:`select_best`): the task's ``select`` metric on validation (``auc``, ``f1``, ``macro_f1``
higher is better; ``mae`` lower is better; default ``macro_f1`` for graded tasks, ``auc`` otherwise). Ties are
broken by the remaining metrics in the order AUC, grading macro-F1, grading MAE, F1, then by the earlier
position in the grid (kinds x C x rules x calibration, in the order the job file lists them). Test metrics
are computed once, by :func:`fit_final`, for the selected configuration. Nothing here imports Ray.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from harness.config import ConfigError, TrackConfig
from harness.job_support import Resources, Splits, Stopwatch
from harness.method.head_spec import HEAD_KINDS, HeadOptions
from harness.method.heads import TaskResult, TaskSpec, evaluate_task, fit_task
from harness.method.latents import LatentsTable

SELECT_METRICS = {"auc": ("auc", "max"), "f1": ("f1", "max"), "macro_f1": ("grade_macro_f1", "max"),
                  "mae": ("grade_mae", "min")}
TIE_BREAK_ORDER = ("auc", "macro_f1", "mae", "f1")
_CALIBRATION = re.compile(r"^(extremes|lstsq|poly([1-9]))$")
NO_CALIBRATION = "none"  # the calibration value of tasks without a grade range
UNSET = "protocol"  # search.class_weight left to the protocol (null means "no class weights")


def parse_calibration(name: str) -> tuple[str, int]:
    """``"extremes"`` -> ("extremes", 1), ``"lstsq"`` -> ("lstsq", 1), ``"poly3"`` -> ("poly", 3)."""
    match = _CALIBRATION.match(name)
    if not match:
        raise ConfigError(f"calibration {name!r}: expected extremes, lstsq or poly<degree> (poly1..poly9)")
    return ("poly", int(match.group(2))) if match.group(2) else (name, 1)


@dataclass(frozen=True)
class FitRule:
    """Which label values count as positive / negative when fitting (empty negatives = every other value)."""

    positives: tuple[int, ...]
    negatives: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.positives:
            raise ConfigError("fit rule: positives must not be empty")
        if overlap := sorted(set(self.positives) & set(self.negatives)):
            raise ConfigError(f"fit rule: values {overlap} are both positive and negative")

    @property
    def name(self) -> str:
        """e.g. ``"2,3 vs 0"`` or ``"1,2,3 vs rest"``."""
        negatives = ",".join(map(str, self.negatives)) if self.negatives else "rest"
        return f"{','.join(map(str, self.positives))} vs {negatives}"


@dataclass(frozen=True)
class SweepTask:
    """A task: its definition (column, positives, negatives, grade range), selection metric and fitting rules."""

    name: str
    column: str
    positives: tuple[int, ...]
    negatives: tuple[int, ...] = ()
    grade_range: tuple[int, int] | None = None
    select: str = ""  # "" -> macro_f1 when graded, else auc
    fit_rules: tuple[FitRule, ...] = ()  # () -> the task's own rule only

    def __post_init__(self) -> None:
        FitRule(self.positives, self.negatives)  # the same checks as a fitting rule
        if self.select and self.select not in SELECT_METRICS:
            raise ConfigError(f"task {self.name!r}: select must be one of {sorted(SELECT_METRICS)}, "
                              f"got {self.select!r}")
        if self.selection_metric in ("macro_f1", "mae") and self.grade_range is None:
            raise ConfigError(f"task {self.name!r}: select={self.selection_metric!r} needs a grade_range")
        if self.grade_range is not None and self.grade_range[0] >= self.grade_range[1]:
            raise ConfigError(f"task {self.name!r}: grade_range {self.grade_range} must be (low, high), low < high")
        names = [rule.name for rule in self.rules]
        if len(set(names)) != len(names):
            raise ConfigError(f"task {self.name!r}: fit_rules repeat a rule ({names})")

    @property
    def selection_metric(self) -> str:
        return self.select or ("macro_f1" if self.grade_range is not None else "auc")

    @property
    def rules(self) -> tuple[FitRule, ...]:
        return self.fit_rules or (FitRule(self.positives, self.negatives),)

    def rule(self, name: str) -> FitRule:
        for rule in self.rules:
            if rule.name == name:
                return rule
        raise ValueError(f"task {self.name!r} has no fit rule {name!r} (rules: {[r.name for r in self.rules]})")

    def eval_spec(self) -> TaskSpec:
        """The task's own definition: the targets every trial is scored on."""
        return TaskSpec(self.name, self.column, self.positives, self.negatives or None, self.grade_range)

    def fit_spec(self, rule: FitRule) -> TaskSpec:
        return TaskSpec(self.name, self.column, rule.positives, rule.negatives or None, self.grade_range)


@dataclass(frozen=True)
class LogUniform:
    """A random search dimension: ``samples`` draws, log-uniform in ``log_uniform = [low, high]``."""

    log_uniform: tuple[float, float]
    samples: int = 8

    def __post_init__(self) -> None:
        low, high = self.log_uniform
        if not 0 < low < high or self.samples < 1:
            raise ConfigError(f"search.C: log_uniform needs 0 < low < high and samples >= 1, got {self}")


@dataclass(frozen=True)
class SearchSpace:
    """The searched dimensions (grids) plus fixed fitting options.

    ``protocol`` (``project`` | ``paper``, harness.method.head_spec) gives the fitting options left out; the paper
    preset fixes standardize, class_weight, svm_solver and max_iter (explicit contradicting values are
    refused) and leaves the searched C and calibration free. After loading each option holds its value."""

    kinds: tuple[str, ...] = HEAD_KINDS
    C: tuple[float, ...] | LogUniform = (0.01, 0.1, 1.0, 10.0)
    calibration: tuple[str, ...] = ("extremes", "lstsq", "poly1", "poly2", "poly3")
    protocol: str = "project"
    standardize: bool | None = None  # None: the protocol's (project true, paper false)
    class_weight: Any = UNSET  # balanced | null (none) | {0: w, 1: w}; left out: the protocol's
    svm_solver: str | None = None  # linear_svc | svc_linear; None: the protocol's
    max_iter: int | None = None  # None: the protocol's (project 5000, paper -1 = no cap)
    seed: int = 0  # random_state of the estimators and of the random search

    def __post_init__(self) -> None:
        if not self.kinds or any(kind not in HEAD_KINDS for kind in self.kinds):
            raise ConfigError(f"search.kinds: a non-empty list from {HEAD_KINDS}, got {list(self.kinds)}")
        if isinstance(self.C, tuple) and (not self.C or min(self.C) <= 0):
            raise ConfigError(f"search.C: a non-empty list of values > 0, got {list(self.C)}")
        if not self.calibration:
            raise ConfigError("search.calibration: must not be empty")
        for name in self.calibration:
            parse_calibration(name)
        given = {key: getattr(self, key) for key in ("standardize", "svm_solver", "max_iter")
                 if getattr(self, key) is not None}
        if self.class_weight != UNSET:
            given["class_weight"] = self.class_weight
        try:
            options = HeadOptions.resolve(self.protocol, given, where="search")
        except ValueError as error:
            raise ConfigError(str(error)) from None
        for key in ("standardize", "class_weight", "svm_solver", "max_iter"):
            object.__setattr__(self, key, getattr(options, key))

    def options(self, C: float, calibration: str, degree: int) -> HeadOptions:
        """The fitting options of one trial (its C and calibration; the rest fixed by the job)."""
        return HeadOptions(protocol=self.protocol, C=C, standardize=self.standardize, class_weight=self.class_weight,
                           svm_solver=self.svm_solver, max_iter=self.max_iter, calibration=calibration, degree=degree)


@dataclass(frozen=True)
class SweepJob:
    """A whole ``jobs/sweep_*.yaml`` file."""

    tasks: tuple[SweepTask, ...]
    out_dir: str = "runs/sweep"
    backend: str = "auto"  # auto: cuml when resources.gpu > 0, else sklearn
    resources: Resources = field(default_factory=Resources)
    max_concurrent_trials: int = 0  # 0: as many as the cluster's resources allow
    cv_folds: int = 0  # >= 2: select by stratified k-fold CV on train (no val split needed); 0: on the val split
    ray_storage: str = ""  # "" -> <out_dir>/ray; on a multi-node cluster a shared folder or cloud URI
    splits: Splits = field(default_factory=Splits)
    search: SearchSpace = field(default_factory=SearchSpace)
    track: TrackConfig = field(default_factory=lambda: TrackConfig(registered_model=None))

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ConfigError("tasks: at least one task is needed")
        names = [task.name for task in self.tasks]
        if len(set(names)) != len(names):
            raise ConfigError(f"tasks: names must be unique, got {names}")
        if self.backend not in ("auto", "sklearn", "cuml"):
            raise ConfigError(f"backend: auto, sklearn or cuml, got {self.backend!r}")
        if self.backend == "cuml" and self.resources.gpu == 0:
            raise ConfigError("backend: cuml runs on a GPU; give trials a GPU share (resources.gpu > 0)")
        if self.backend == "sklearn" and self.resources.gpu > 0:
            raise ConfigError("resources.gpu > 0 with backend sklearn: the GPU would be reserved but unused")
        if self.max_concurrent_trials < 0:
            raise ConfigError("max_concurrent_trials: must be >= 0")
        if self.cv_folds < 0 or self.cv_folds == 1:
            raise ConfigError(f"cv_folds: 0 (select on the val split) or k >= 2, got {self.cv_folds}")

    @property
    def trial_backend(self) -> str:
        return "cuml" if self.backend == "cuml" or (self.backend == "auto" and self.resources.gpu > 0) else "sklearn"

    def calibrations(self, task: SweepTask) -> tuple[str, ...]:
        """The calibration grid of a task; one placeholder value when the task has no grade range."""
        return self.search.calibration if task.grade_range is not None else (NO_CALIBRATION,)


# ---------------------------------------------------------------------------------------------------------
# One trial.
# ---------------------------------------------------------------------------------------------------------


def labels_used(table: LatentsTable, fit_spec: TaskSpec, split: str) -> int:
    """Training rows whose label entered fitting: the head's rows plus (graded tasks) the calibration rows."""
    labels = np.asarray(table.labels[fit_spec.column], dtype=np.float64)[table.splits == split]  # (N,)
    used, _ = fit_spec.binary_targets(labels)
    if fit_spec.grade_range is not None:
        low, high = fit_spec.grade_range
        used |= np.isfinite(labels) & (labels >= low) & (labels <= high)
    return int(used.sum())


def fit_config(table: LatentsTable, task: SweepTask, params: dict[str, Any], job: SweepJob) -> TaskResult:
    """Fit one configuration on the train split; the result's ``task`` is the task's own definition."""
    rule = task.rule(params["rule"])
    mode, degree = ("lstsq", 1) if params["calibration"] == NO_CALIBRATION else parse_calibration(
        params["calibration"])
    result = fit_task(table, task.fit_spec(rule), kind=params["kind"], backend=job.trial_backend,
                      train_split=job.splits.train, random_state=job.search.seed,
                      options=job.search.options(float(params["C"]), mode, degree))
    return dataclasses.replace(result, task=task.eval_spec())  # head.task keeps the fitting rule


def _scalars(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    """The numeric metrics of evaluate_task, prefixed (lists such as the confusion matrix are left out)."""
    return {f"{prefix}{name}": float(value) for name, value in metrics.items()
            if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
            and name != "C"}


def cv_tables(table: LatentsTable, task: SweepTask, job: SweepJob) -> list[LatentsTable]:
    """The train rows split into ``job.cv_folds`` stratified folds: one table per fold, its held-out rows named
    as the val split and the rest as train (other splits left out, so test is never seen).

    Stratified on the task's label column (missing labels form their own stratum); shuffled with the job's seed,
    so every trial sees the same folds."""
    from sklearn.model_selection import StratifiedKFold

    train = table.select(job.splits.train)
    labels = np.asarray(train.labels[task.column], dtype=np.float64)  # (N,)
    strata = np.where(np.isfinite(labels), labels, -1e300)
    folds = StratifiedKFold(n_splits=job.cv_folds, shuffle=True, random_state=job.search.seed)
    tables = []
    for _, held_out in folds.split(np.zeros(len(train)), strata):
        splits = np.full(len(train), job.splits.train, dtype=object)
        splits[held_out] = job.splits.val
        tables.append(LatentsTable(ids=train.ids, splits=splits.astype(str), z_sem=train.z_sem, labels=train.labels,
                                   meta=train.meta))
    return tables


def _mean_scalars(folds: list[dict[str, float]]) -> dict[str, float]:
    """Per-metric mean over folds, ignoring folds where a metric is undefined (NaN)."""
    out = {}
    for key in folds[0]:
        values = np.asarray([fold.get(key, np.nan) for fold in folds], dtype=np.float64)
        out[key] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
    return out


def run_trial(params: dict[str, Any], table: LatentsTable, task: SweepTask, job: SweepJob) -> dict[str, Any]:
    """Fit ``params`` and score the validation split: a flat dict of ``val_*`` metrics, costs and status.

    With ``job.cv_folds`` the ``val_*`` metrics are the means over the stratified folds of the train split
    (:func:`cv_tables`). A configuration that cannot be fitted (e.g. a rule leaving one class empty) is reported
    with ``ok = 0`` and its message rather than raised, so one bad corner of the grid does not stop the sweep.
    """
    clock = Stopwatch()
    out: dict[str, Any] = {"ok": 1, "error": "", "warnings": ""}
    tables = cv_tables(table, task, job) if job.cv_folds else [table]
    scores, fit_seconds = [], 0.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            for fold_table in tables:
                result = fit_config(fold_table, task, params, job)
                scores.append(_scalars(evaluate_task(result, fold_table, job.splits.val), "val_"))
                fit_seconds += result.head.fit_seconds
        except ValueError as error:
            return {**out, "ok": 0, "error": str(error)[:1000], "cpu_s": clock.cpu(), "wall_s": clock.wall()}
    out["warnings"] = "; ".join(sorted({str(w.message).splitlines()[0][:200] for w in caught}))[:1000]
    out.update(_mean_scalars(scores))
    out["labels_used"] = labels_used(table, task.fit_spec(task.rule(params["rule"])), job.splits.train)
    out.update(fit_seconds=fit_seconds, cpu_s=clock.cpu(), wall_s=clock.wall())
    return out


def fit_final(params: dict[str, Any], table: LatentsTable, task: SweepTask, job: SweepJob) -> dict[str, Any]:
    """Refit the selected configuration (deterministic: fixed random_state) and score validation AND test.

    This is the only place test metrics are computed. Returns ``{"result": TaskResult, "val": ..., "test": ...,
    "labels_used", "cpu_s", "wall_s"}``.
    """
    clock = Stopwatch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fit_config(table, task, params, job)
    has_val = bool((table.splits == job.splits.val).any())  # under cv_folds the latents may have no val split
    return {"result": result, "val": evaluate_task(result, table, job.splits.val) if has_val else {},
            "test": evaluate_task(result, table, job.splits.test),
            "labels_used": labels_used(table, task.fit_spec(task.rule(params["rule"])), job.splits.train),
            "cpu_s": clock.cpu(), "wall_s": clock.wall()}


# ---------------------------------------------------------------------------------------------------------
# Selection.
# ---------------------------------------------------------------------------------------------------------


def _signed(metrics: dict[str, Any], select: str) -> float:
    """The validation metric oriented so that larger is better; missing/NaN -> -inf."""
    key, mode = SELECT_METRICS[select]
    value = metrics.get(f"val_{key}")
    if value is None or not math.isfinite(float(value)):
        return -math.inf
    return float(value) if mode == "max" else -float(value)


def selection_key(metrics: dict[str, Any], task: SweepTask) -> tuple[float, ...]:
    """Larger is better: the task's selection metric, then the tie-breakers (TIE_BREAK_ORDER)."""
    if not metrics.get("ok", 1):
        return (-math.inf,) * (1 + len(TIE_BREAK_ORDER))
    order = [task.selection_metric, *(m for m in TIE_BREAK_ORDER if m != task.selection_metric)]
    return tuple(_signed(metrics, name) for name in order)


def grid_position(params: dict[str, Any], task: SweepTask, job: SweepJob) -> tuple[float, ...]:
    """Where a configuration sits in the job file's grid order (kinds x C x rules x calibration)."""
    c_rank = job.search.C.index(params["C"]) if isinstance(job.search.C, tuple) and params["C"] in job.search.C \
        else float(params["C"])
    return (job.search.kinds.index(params["kind"]), c_rank, [r.name for r in task.rules].index(params["rule"]),
            job.calibrations(task).index(params["calibration"]))


def select_best(trials: list[dict[str, Any]], task: SweepTask, job: SweepJob) -> int:
    """Index into ``trials`` (dicts with ``params`` and ``metrics``) of the selected trial; see the module docs."""
    if not trials:
        raise ValueError(f"task {task.name!r}: no trials to select from")
    usable = [i for i, t in enumerate(trials) if t["metrics"].get("ok", 1)]
    if not usable:
        first = trials[0]["metrics"].get("error", "")
        raise ValueError(f"task {task.name!r}: all {len(trials)} trials failed (first error: {first})")
    # max over (key, -position): the best key; among equal keys the earliest grid position
    return max(usable, key=lambda i: (selection_key(trials[i]["metrics"], task),
                                      tuple(-p for p in grid_position(trials[i]["params"], task, job))))


def describe(params: dict[str, Any]) -> str:
    """A short human-readable configuration, e.g. ``svm C=0.1 rule=2,3 vs 0 cal=poly2``."""
    text = f"{params['kind']} C={float(params['C']):.4g} rule={params['rule']}"
    return text if params["calibration"] == NO_CALIBRATION else f"{text} cal={params['calibration']}"
