"""DAE + linear head vs a fully supervised DenseNet121, task by task (the paper's Tables 3-4 side by side).

Both jobs (``dae-cf sweep``, :mod:`harness.ops.sweep_job`, and ``dae-cf baseline``, :mod:`harness.ops.baseline_job`)
write ``summary.json`` holding one row per task in the layout of :func:`method_row`: test-split metrics of the
configuration selected on validation, the number of training labels it used, and what it cost (wall seconds of
the search plus the final test pass; CPU seconds of every trial process; GPU seconds = trial wall time x the GPU
share it reserved).
:func:`write_comparison` turns them into a report (HTML, Markdown, CSV, JSON) through :mod:`harness.evaluation.report`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from harness.evaluation.report import Report

ROW_COLUMNS = ("task", "method", "auc", "f1", "macro_f1", "mae", "labels_used", "wall_s", "cpu_s", "gpu_s",
               "trials", "selected")
METRIC_COLUMNS = ("auc", "f1", "macro_f1", "mae")
NAN = float("nan")


def method_row(task: str, method: str, detection: dict[str, Any] | None, grading: dict[str, Any] | None, *,
               labels_used: int, wall_s: float, cpu_s: float, gpu_s: float, trials: int,
               selected: str) -> dict[str, Any]:
    """One summary row. ``detection`` holds ``auc``/``f1`` (harness.method.metrics.detection_metrics), ``grading``
    holds ``macro_f1``/``mae`` (grading_metrics) or the ``grade_``-prefixed names of heads.evaluate_task."""
    detection, grading = detection or {}, grading or {}

    def pick(source: dict[str, Any], name: str) -> float:
        value = source.get(name, source.get(f"grade_{name}", NAN))
        return float(value) if value is not None else NAN

    return {"task": task, "method": method, "auc": pick(detection, "auc"), "f1": pick(detection, "f1"),
            "macro_f1": pick(grading, "macro_f1"), "mae": pick(grading, "mae"), "labels_used": int(labels_used),
            "wall_s": float(wall_s), "cpu_s": float(cpu_s), "gpu_s": float(gpu_s), "trials": int(trials),
            "selected": selected}


def load_summary(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a job's ``summary.json`` (a folder holding one is accepted too); errors name the file."""
    path = Path(path)
    if path.is_dir():
        path = path / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"summary file not found: {path} (written by dae-cf sweep or dae-cf "
                                "baseline)")
    data = json.loads(path.read_text())
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected an object with a 'rows' list")
    for index, row in enumerate(rows):
        missing = [c for c in ROW_COLUMNS if c not in row]
        if missing:
            raise ValueError(f"{path}: row {index} lacks column(s) {missing}")
    return rows


def _relative(baseline: float, head: float) -> float:
    """head / baseline, NaN when either is missing or the baseline is 0."""
    if not (math.isfinite(baseline) and math.isfinite(head)) or baseline == 0:
        return NAN
    return head / baseline


def comparison_rows(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows grouped by task (tasks in order of first appearance, methods in the order given)."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        grouped.setdefault(str(row["task"]), []).append({c: row.get(c) for c in ROW_COLUMNS})
    return grouped


def cost_ratios(task_rows: list[dict[str, Any]]) -> dict[str, float]:
    """For a task with a DAE-head row and a DenseNet row: the head's wall/CPU/GPU time and labels over the
    baseline's (values below 1 mean the head needed less)."""
    heads = [r for r in task_rows if str(r["method"]).startswith("DAE")]
    baselines = [r for r in task_rows if str(r["method"]).startswith("DenseNet")]
    if not heads or not baselines:
        return {}
    head, base = heads[0], baselines[0]
    return {f"{name}_ratio": _relative(float(base[name]), float(head[name]))
            for name in ("wall_s", "cpu_s", "gpu_s", "labels_used")}


def write_comparison(head_rows: list[dict[str, Any]], baseline_rows: list[dict[str, Any]],
                     out_dir: str | os.PathLike, title: str = "DAE + linear head vs DenseNet121") -> Path:
    """Write the comparison report into ``out_dir``; returns the path of its ``index.html``."""
    if not head_rows and not baseline_rows:
        raise ValueError("nothing to compare: both summaries are empty")
    grouped = comparison_rows([*head_rows, *baseline_rows])
    report = Report(out_dir, title)
    report.add_text("About", (
        "Test-split metrics of the configuration each method selected on the validation split. "
        "AUC and F1 are detection (positive = the task's rule); macro-F1 and MAE are grading on the task's grade "
        "range (heads: calibrated distance; DenseNet121: regression rounded and clipped to the range).\n\n"
        "- `labels_used`: training images whose label entered fitting (head + calibration, or the network loss)\n"
        "- `wall_s`: wall seconds of the whole search plus the test pass; `cpu_s`: CPU seconds of every trial "
        "process; `gpu_s`: trial wall seconds x the GPU share each trial reserved\n"
        "- the DAE's own training and encoding are shared by every task and need no labels, so they are not "
        "counted in the head rows"))
    everything, ratios = [], []
    for task, rows in grouped.items():
        methods = {str(r["method"]) for r in rows}
        if not any(m.startswith("DAE") for m in methods) or not any(m.startswith("DenseNet") for m in methods):
            report.add_text("Notes", f"Task `{task}` has only {sorted(methods)}: no side-by-side comparison.")
        safe = "".join(c if c.isalnum() or c in "_.-" else "_" for c in task)
        report.add_table(f"task-{safe}", rows, caption=f"Task {task}", section="Per task")
        everything.extend(rows)
        if task_ratios := cost_ratios(rows):
            ratios.append({"task": task, **task_ratios})
    report.add_table("comparison", everything, caption="All tasks", section="All tasks")
    if ratios:
        report.add_table("cost_ratios", ratios, caption="DAE + head cost / DenseNet121 cost", section="All tasks")
    return report.write()
