"""The head sweep's job file, one trial, and the selection rule (``harness.ops.sweep_job`` runs them under Ray Tune).

For each task the sweep tries every combination of head kind, regularisation C, training-label rule
(``fit_rules``: which grades count as positive/negative when FITTING, e.g. the paper's noisy-label rule
"2,3 vs 0") and calibration (``extremes``, ``lstsq``, ``poly1``..``poly3``: harness.config.parse_calibration).
A trial fits on the train split and
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
import warnings
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field, model_validator
from pydantic.dataclasses import dataclass

from harness.config import HEAD_KINDS, CalibrationName, HeadChoices, HeadOptions, Task, TrackConfig
from harness.config.errors import require
from harness.config.fields import SECTION, NonNegativeInt, PositiveFloat, PositiveInt
from harness.config.heads import BACKENDS, UNSET, ClassWeight, HeadKind, normalize_class_weight
from harness.config.task import LabelValues, rule_name, rule_problems
from harness.job_support import Resources, Splits, Stopwatch
from harness.method.heads import MAX_ROWS_QUADRATIC, TaskResult, evaluate_task, fit_task
from harness.method.latents import LatentsTable

SELECT_METRICS = {"auc": ("auc", "max"), "f1": ("f1", "max"), "macro_f1": ("grade_macro_f1", "max"),
                  "mae": ("grade_mae", "min")}
TIE_BREAK_ORDER = ("auc", "macro_f1", "mae", "f1")
NO_CALIBRATION = "none"  # the calibration value of tasks without a grade range
JOB_CLASS_WEIGHT = "job"  # the class_weight value of trials when the search has no class_weights grid
UNCERTAIN_POLICIES = {"ignore": math.nan, "positive": 1.0, "negative": 0.0}  # what a -1 label becomes (CheXpert)


def class_weight_label(value: str | dict[int, float] | None) -> str:
    """A class weight as a trial parameter: ``balanced``, ``none`` or ``0:1,1:4``."""
    if value is None or isinstance(value, str):
        return "none" if value is None else value
    return ",".join(f"{k}:{w:g}" for k, w in sorted(value.items()))


@dataclass(frozen=True, config=SECTION)
class FitRule:
    """Which label values count as positive / negative when fitting (empty negatives = every other value)."""

    positives: LabelValues
    negatives: tuple[int, ...] = ()

    @model_validator(mode="after")
    def _check_rule(self) -> FitRule:
        require(rule_problems(self.positives, self.negatives))
        return self

    @property
    def name(self) -> str:
        """e.g. ``"2,3 vs 0"`` or ``"1,2,3 vs rest"``."""
        return rule_name(self.positives, self.negatives)


@dataclass(frozen=True, config=SECTION)
class SweepTask(Task):
    """A task (:class:`harness.config.Task`) with the sweep's keys: its selection metric and fitting rules."""

    select: Literal["", "auc", "f1", "macro_f1", "mae"] = ""  # "" -> macro_f1 when graded, else auc
    fit_rules: tuple[FitRule, ...] = ()  # () -> the task's own rule only

    @model_validator(mode="after")
    def _check_sweep(self) -> SweepTask:
        problems = []
        if self.selection_metric in ("macro_f1", "mae") and self.grade_range is None:
            problems.append(("select", f"{self.selection_metric!r} needs a grade_range"))
        names = [rule.name for rule in self.rules]
        if len(set(names)) != len(names):
            problems.append(("fit_rules", f"repeat a rule ({names})"))
        require(problems)
        return self

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

    def fitted_on(self, rule: FitRule) -> Task:
        """The task whose head a trial fits: this task's column and grade range with the rule's labels."""
        return dataclasses.replace(self.definition(), positives=rule.positives, negatives=rule.negatives)


@dataclass(frozen=True, config=SECTION)
class LogUniform:
    """A random search dimension: ``samples`` draws, log-uniform in ``log_uniform = [low, high]``."""

    log_uniform: tuple[PositiveFloat, PositiveFloat]
    samples: PositiveInt = 8

    @model_validator(mode="after")
    def _check(self) -> LogUniform:
        low, high = self.log_uniform
        require([] if low < high else [("log_uniform", f"needs low < high, got {list(self.log_uniform)}")])
        return self


@dataclass(frozen=True, config=SECTION)
class SearchSpace(HeadChoices):
    """The sweep's ``search:`` section: the job's fitting choices (:class:`harness.config.HeadChoices`, with the
    ``project`` / ``paper`` protocol) plus the searched grids of head kinds, C and calibrations.

    The paper preset fixes standardize, class_weight, svm_solver and max_iter (explicit contradicting values are
    refused) and leaves the searched C and calibration free. After loading each choice holds its value."""

    kinds: Annotated[tuple[HeadKind, ...], Field(min_length=1)] = HEAD_KINDS
    C: Annotated[tuple[PositiveFloat, ...], Field(min_length=1)] | LogUniform = (0.01, 0.1, 1.0, 10.0)
    calibration: Annotated[tuple[CalibrationName, ...], Field(min_length=1)] = (
        "extremes", "lstsq", "poly1", "poly2", "poly3")
    class_weights: tuple[ClassWeight, ...] = ()  # a searched grid (balanced | none | {0: w, 1: w}); () -> class_weight
    seed: NonNegativeInt = 0  # random_state of the estimators and of the random search

    @model_validator(mode="after")
    def _check_weights(self) -> SearchSpace:
        problems = []
        if self.class_weights and self.protocol == "paper":
            problems.append(("class_weights", "protocol 'paper' fixes class_weight (none); drop the grid or use "
                                              "protocol: project"))
        labels = self.class_weight_grid
        if len(set(labels)) != len(labels):
            problems.append(("class_weights", f"repeat a value ({list(labels)})"))
        require(problems)
        return self

    @property
    def class_weight_grid(self) -> tuple[str, ...]:
        """The trial values of class_weight: labels of the searched grid, or one placeholder (the job's own)."""
        return tuple(class_weight_label(normalize_class_weight(w)) for w in self.class_weights if w != UNSET) \
            or (JOB_CLASS_WEIGHT,)

    def options(self, C: float, calibration: str, class_weight: str = JOB_CLASS_WEIGHT) -> HeadOptions:
        """The fitting options of one trial (its C, calibration and class weight; the rest fixed by the job)."""
        choices = self.choices()
        if class_weight != JOB_CLASS_WEIGHT:
            weights = {class_weight_label(normalize_class_weight(w)): w for w in self.class_weights}
            choices["class_weight"] = normalize_class_weight(weights[class_weight])
        return HeadOptions(**choices, C=C, calibration=calibration)


@dataclass(frozen=True, config=SECTION)
class Screen:
    """The sweep's ``screen:`` section: rank every (task, C) by the closed-form ridge screen
    (harness.method.ridge_screen, one Gram matrix for all tasks and penalties) on val AUC, then run the
    trials only for the ``top`` C values of each task."""

    top: PositiveInt = 2


@dataclass(frozen=True, config=SECTION)
class SweepJob:
    """A whole ``jobs/sweep_*.yaml`` file."""

    tasks: Annotated[tuple[SweepTask, ...], Field(min_length=1)]
    out_dir: str = "runs/sweep"
    backend: Literal[BACKENDS] = "auto"  # auto: cuml when resources.gpu > 0, else sklearn
    resources: Resources = dataclasses.field(default_factory=Resources)
    max_concurrent_trials: NonNegativeInt = 0  # 0: as many as the cluster's resources allow
    cv_folds: NonNegativeInt = 0  # >= 2: select by stratified k-fold CV on train (no val split needed); 0: on val
    ray_storage: str = ""  # "" -> <out_dir>/ray; on a multi-node cluster a shared folder or cloud URI
    ray_address: str = ""  # "" -> a local Ray (or $RAY_ADDRESS); host:port of a running cluster's head to join it
    max_failures: NonNegativeInt = 2  # a trial whose worker or node dies is retried this many times (Tune)
    uncertain: Literal["ignore", "positive", "negative"] | None = None  # -1 labels of detection tasks; None: as is
    max_rows_quadratic: PositiveInt = MAX_ROWS_QUADRATIC  # svc_linear on a CPU: refused above this many train rows
    screen: Screen | None = None  # rank C per task with the ridge screen first, then run the top C values only
    splits: Splits = dataclasses.field(default_factory=Splits)
    search: SearchSpace = dataclasses.field(default_factory=SearchSpace)
    track: TrackConfig = dataclasses.field(default_factory=lambda: TrackConfig(registered_model=None))

    @model_validator(mode="after")
    def _check(self) -> SweepJob:
        problems = []
        names = [task.name for task in self.tasks]
        if len(set(names)) != len(names):
            problems.append(("tasks", f"names must be unique, got {names}"))
        if self.backend == "cuml" and self.resources.gpu == 0:
            problems.append(("backend", "cuml runs on a GPU; give trials a GPU share (resources.gpu > 0)"))
        if self.backend == "sklearn" and self.resources.gpu > 0:
            problems.append(("resources.gpu", "> 0 with backend sklearn: the GPU would be reserved but unused"))
        if self.cv_folds == 1:
            problems.append(("cv_folds", "0 (select on the val split) or k >= 2, got 1"))
        if self.screen is not None and not isinstance(self.search.C, tuple):
            problems.append(("screen", "screens a grid of C; give search.C as a list, not a log_uniform search"))
        if self.screen is not None and self.cv_folds:
            problems.append(("screen", "ranks C on the val split; drop screen or cv_folds"))
        require(problems)
        return self

    @property
    def trial_backend(self) -> str:
        return "cuml" if self.backend == "cuml" or (self.backend == "auto" and self.resources.gpu > 0) else "sklearn"

    def calibrations(self, task: SweepTask) -> tuple[str, ...]:
        """The calibration grid of a task; one placeholder value when the task has no grade range."""
        return self.search.calibration if task.grade_range is not None else (NO_CALIBRATION,)


# ---------------------------------------------------------------------------------------------------------
# One trial.
# ---------------------------------------------------------------------------------------------------------


def labels_used(table: LatentsTable, fitted: Task, split: str) -> int:
    """Training rows whose label entered fitting: the head's rows plus (graded tasks) the calibration rows."""
    labels = np.asarray(table.labels[fitted.column], dtype=np.float64)[table.splits == split]  # (N,)
    used, _ = fitted.binary_targets(labels)
    if fitted.grade_range is not None:
        low, high = fitted.grade_range
        used |= np.isfinite(labels) & (labels >= low) & (labels <= high)
    return int(used.sum())


def apply_uncertain(table: LatentsTable, job: SweepJob) -> LatentsTable:
    """The table with the job's uncertain-label policy applied to the -1 labels of its detection tasks' columns
    (ignore -> missing, positive -> 1, negative -> 0); graded columns (a task with a grade_range) are left alone."""
    if job.uncertain is None:
        return table
    graded = {task.column for task in job.tasks if task.grade_range is not None}
    labels = dict(table.labels)
    for column in sorted({task.column for task in job.tasks} - graded):
        values = np.asarray(labels[column], dtype=np.float64).copy()  # (N,)
        values[values == -1] = UNCERTAIN_POLICIES[job.uncertain]
        labels[column] = values
    return dataclasses.replace(table, labels=labels)


def fit_config(table: LatentsTable, task: SweepTask, params: dict[str, Any], job: SweepJob) -> TaskResult:
    """Fit one configuration on the train split; the result's ``task`` is the task's own definition."""
    calibration = "lstsq" if params["calibration"] == NO_CALIBRATION else params["calibration"]
    options = job.search.options(float(params["C"]), calibration, params.get("class_weight", JOB_CLASS_WEIGHT))
    result = fit_task(table, task.fitted_on(task.rule(params["rule"])), kind=params["kind"],
                      backend=job.trial_backend, train_split=job.splits.train, random_state=job.search.seed,
                      options=options, max_rows_quadratic=job.max_rows_quadratic)
    return dataclasses.replace(result, task=task.definition())  # head.task keeps the fitting rule


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
    strata = np.unique(np.where(np.isfinite(labels), labels, np.inf), return_inverse=True)[1]  # (N,) class codes
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
    out["labels_used"] = labels_used(table, task.fitted_on(task.rule(params["rule"])), job.splits.train)
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
            "labels_used": labels_used(table, task.fitted_on(task.rule(params["rule"])), job.splits.train),
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
    """Where a configuration sits in the job file's grid order (kinds x C x class weights x rules x calibration)."""
    c_rank = job.search.C.index(params["C"]) if isinstance(job.search.C, tuple) and params["C"] in job.search.C \
        else float(params["C"])
    weight = params.get("class_weight", JOB_CLASS_WEIGHT)
    return (job.search.kinds.index(params["kind"]), c_rank, job.search.class_weight_grid.index(weight),
            [r.name for r in task.rules].index(params["rule"]), job.calibrations(task).index(params["calibration"]))


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
    if params.get("class_weight", JOB_CLASS_WEIGHT) != JOB_CLASS_WEIGHT:
        text += f" cw={params['class_weight']}"
    return text if params["calibration"] == NO_CALIBRATION else f"{text} cal={params['calibration']}"
