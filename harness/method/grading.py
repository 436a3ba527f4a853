"""Grading metrics of a calibrated head beside the rounded-grade ones of ``harness.method.metrics.grading_metrics``.

The calibration gives a continuous grade; the project's tables report the rounded, clipped grade. Both MAEs
are reported (rounding alone can move MAE by up to 0.5 per row), with quadratic-weighted Cohen's kappa (the
usual agreement measure for ordinal grades) and the per-class counts that every figure should sit beside.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from harness.method.metrics import grading_metrics


def grading_report(true_grades: np.ndarray, continuous: np.ndarray, grade_range: tuple[int, int]) -> dict[str, Any]:
    """Metrics of (N,) integer true grades against (N,) continuous calibrated grades.

    ``mae_continuous`` uses the continuous grade clipped to the range (a grade beyond the scale carries no
    meaning); ``mae`` / ``mae_rounded``, ``macro_f1``, ``accuracy``, ``kappa_quadratic`` and ``confusion`` use
    the rounded, clipped grade. ``counts_true`` / ``counts_predicted`` follow ``labels``.
    """
    from sklearn.metrics import cohen_kappa_score

    true_grades = np.asarray(true_grades).reshape(-1).astype(np.int64)
    continuous = np.asarray(continuous, dtype=np.float64).reshape(-1)
    low, high = int(grade_range[0]), int(grade_range[1])
    clipped = np.clip(continuous, low, high)
    rounded = np.clip(np.rint(continuous), low, high).astype(np.int64)
    out = grading_metrics(true_grades, rounded, (low, high))
    labels = out["labels"]
    out["mae_rounded"] = out["mae"]
    out["counts_true"] = [int((true_grades == g).sum()) for g in labels]
    out["counts_predicted"] = [int((rounded == g).sum()) for g in labels]
    if true_grades.size == 0:
        out.update(mae_continuous=float("nan"), kappa_quadratic=float("nan"))
        return out
    out["mae_continuous"] = float(np.abs(true_grades - clipped).mean())
    # kappa is undefined (0/0) when truth and prediction are one and the same single grade
    single = len(set(true_grades.tolist()) | set(rounded.tolist())) < 2
    out["kappa_quadratic"] = float("nan") if single else float(
        cohen_kappa_score(true_grades, rounded, labels=labels, weights="quadratic"))
    return out
