"""Heads fitted and scored as the paper's Tables 3 and 4: every (task, kind) on the train split, one split scored.

The DAE's heads (:mod:`harness.evaluation.evaluate`) and the floors' (:mod:`harness.evaluation.floors`) go through
the same function, so a margin over a floor compares like with like.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.config import HeadOptions, Task
from harness.config.heads import MAX_ROWS_QUADRATIC
from harness.method.head_tasks import check_task_labels
from harness.method.heads import TaskResult, evaluate_task, fit_task
from harness.method.latents import LatentsTable

# Columns of the paper's Tables 3 and 4, in order.
DETECTION_COLUMNS = ("task", "kind", "split", "auc", "f1", "accuracy", "sensitivity", "specificity", "n_pos", "n_neg")
GRADING_COLUMNS = ("task", "kind", "split", "grade_macro_f1", "grade_mae", "grade_mae_continuous",
                   "grade_kappa_quadratic", "grade_accuracy")


@dataclass
class HeadEvaluation:
    """Every (task, kind) head fitted on the train split, with its rows on the evaluation split."""

    results: dict[tuple[str, str], TaskResult]
    detection_rows: list[dict[str, Any]]
    grading_rows: list[dict[str, Any]]
    raw_rows: list[dict[str, Any]]


def evaluate_heads(table: LatentsTable, tasks: list[Task], kinds: tuple[str, ...], *, C: float = 1.0,
                   calibration: str = "lstsq", backend: str = "auto",
                   split: str = "test", options: HeadOptions | None = None,
                   max_rows_quadratic: int | None = MAX_ROWS_QUADRATIC) -> HeadEvaluation:
    """Fit each head kind for each task on the train split; score detection (AUC from distances) and grading.

    ``options`` (e.g. ``config.heads.options()``) carries every fitting choice and replaces C, calibration
    . Labels outside a task's grade range are refused before anything is fitted. ``max_rows_quadratic``: the
    quadratic SVM solver's row limit on a CPU (``config.heads.max_rows_quadratic``; harness.method.heads)."""
    options = options or HeadOptions(C=C, calibration=calibration)
    check_task_labels(table, tasks)
    results, detection, grading, raw = {}, [], [], []
    for task in tasks:
        for kind in kinds:
            result = fit_task(table, task, kind=kind, backend=backend, options=options,
                              max_rows_quadratic=max_rows_quadratic)
            row = evaluate_task(result, table, split)
            results[(task.name, kind)] = result
            raw.append(row)
            extra = ("auc_from_predictions",) if "auc_from_predictions" in row else ()  # the paper protocol's
            detection.append({c: row.get(c) for c in (*DETECTION_COLUMNS, *extra)})
            if result.calibration is not None:
                grading.append({c: row.get(c) for c in GRADING_COLUMNS})
    return HeadEvaluation(results, detection, grading, raw)
