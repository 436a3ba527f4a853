"""Tasks and labels of a latents table: string labels to numbers, tasks inferred from labels, label checks.

Latents brought from elsewhere carry labels as 0/1, 0./1., integer grades or strings; a task names a column
and the values counted as positive. Nothing here is silent: every mapping and every inferred task comes back
as text for the entry point to print, and a label that contradicts a task is refused, never dropped.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from harness.config import Task
from harness.method.latents import LatentsError, LatentsTable

MISSING_STRINGS = ("", "nan", "na", "n/a", "none", "null", "missing")
# With two string values, one of these is the negative class (0); otherwise values are numbered in sorted order.
NEGATIVE_WORDS = ("0", "absent", "benign", "control", "false", "healthy", "negative", "no", "normal")


def _string_mapping(values: np.ndarray) -> dict[str, float]:
    present = sorted({v for v in values.tolist() if v.strip().lower() not in MISSING_STRINGS})
    try:
        return {v: float(v) for v in present}  # numbers written as text: "0", "1", "2.0"
    except ValueError:
        pass
    if len(present) == 2:
        negatives = [v for v in present if v.strip().lower() in NEGATIVE_WORDS]
        if len(negatives) == 1:
            return {negatives[0]: 0.0, next(v for v in present if v != negatives[0]): 1.0}
    return {v: float(i) for i, v in enumerate(present)}


def numeric_labels(table: LatentsTable) -> tuple[LatentsTable, dict[str, dict[str, float]]]:
    """String label columns -> float codes (missing-like strings -> NaN); returns the table and the mappings.

    Two values with one negative-sounding word (normal, healthy, negative, no, ...) map it to 0 and the other
    to 1; text numbers map to their value; any other set of strings is numbered 0..K-1 in sorted order."""
    mappings: dict[str, dict[str, float]] = {}
    labels = dict(table.labels)
    for column, values in table.labels.items():
        if values.dtype.kind not in "US":
            continue
        mapping = _string_mapping(values)
        mappings[column] = mapping
        labels[column] = np.asarray([mapping.get(v, np.nan) for v in values.tolist()], dtype=np.float64)
    if not mappings:
        return table, {}
    return LatentsTable(ids=table.ids, splits=table.splits, z_sem=table.z_sem, labels=labels, x_T=table.x_T,
                        meta=table.meta), mappings


def describe_mappings(mappings: dict[str, dict[str, float]]) -> list[str]:
    """One line per mapped column, e.g. ``label 'finding': 'normal' -> 0, 'pneumonia' -> 1``."""
    return [f"label {column!r}: " + ", ".join(f"{text!r} -> {value:g}" for text, value in mapping.items())
            for column, mapping in mappings.items()]


def _finite(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return values[np.isfinite(values)]


def infer_tasks(table: LatentsTable, columns: Iterable[str] | None = None) -> tuple[list[Task], list[str]]:
    """One task per label column from the values found (all splits); returns the tasks and what was inferred.

    Two values (0/1, 0./1., or any pair): detection of the higher vs the lower. More integer values: detection
    of every grade above the lowest vs the lowest (grade >= 1 vs 0 for grades from 0) plus grading over the
    observed range. Columns with one value or non-integer values give no task, and the message says so."""
    tasks: list[Task] = []
    notes: list[str] = []
    for column in columns if columns is not None else table.label_columns:
        values = table.labels[column]
        if values.dtype.kind in "US":
            raise LatentsError(f"label column {column!r} holds strings: map them first (numeric_labels)")
        present = np.unique(_finite(values))
        if present.size < 2:
            notes.append(f"label {column!r}: {present.size} distinct value(s), no task")
            continue
        if not np.all(present == np.round(present)):
            notes.append(f"label {column!r}: non-integer values (e.g. {present[~(present == np.round(present))][0]:g})"
                         ", no task")
            continue
        grades = [int(v) for v in present]
        low, high = grades[0], grades[-1]
        if len(grades) == 2:
            tasks.append(Task(column, column, (high,), (low,), None))
            notes.append(f"label {column!r}: binary {{{low}, {high}}} -> task {column!r}: detection {high} vs {low}")
        else:
            tasks.append(Task(column, column, tuple(g for g in grades if g > low), (), (low, high)))
            notes.append(f"label {column!r}: grades {grades} -> task {column!r}: detection grade >= {grades[1]} vs "
                         f"{low}, grading over {low}..{high}")
    return tasks, notes


def check_task_labels(table: LatentsTable, tasks: Iterable[Any], source: str = "latents") -> None:
    """Refuse a task whose label column is absent, or holds values outside its grade range (one line each).

    ``tasks`` are :class:`harness.config.Task` objects (name, column, grade_range); ``source`` names the file."""
    for task in tasks:
        if task.column not in table.labels:
            raise LatentsError(f"{source}: task {task.name!r} needs label column {task.column!r}; the table has "
                               f"{table.label_columns}")
        values = table.labels[task.column]
        if values.dtype.kind in "US":
            raise LatentsError(f"{source}: label column {task.column!r} holds strings; map them to numbers first")
        if task.grade_range is None:
            continue
        low, high = task.grade_range
        labels = np.asarray(values, dtype=np.float64)
        outside = np.isfinite(labels) & ((labels < low) | (labels > high))
        if outside.any():
            bad, counts = np.unique(labels[outside], return_counts=True)
            found = ", ".join(f"{v:g} x{c}" for v, c in zip(bad, counts, strict=True))
            raise LatentsError(f"{source}: label column {task.column!r} has {int(outside.sum())} rows outside the "
                               f"grade_range [{low}, {high}] of task {task.name!r} (values: {found}); "
                               "widen grade_range or drop those rows")
