"""DAE + linear head vs a fully supervised DenseNet121, task by task (the paper's Tables 3-4 side by side).

Both jobs (``dae-cf sweep``, :mod:`harness.ops.sweep_job`, and ``dae-cf baseline``, :mod:`harness.ops.baseline_job`)
write ``summary.json`` holding one row per task in the layout of :func:`method_row`: test-split metrics of the
configuration selected on validation, the number of training labels it used, and what it cost (wall seconds of
the search plus the final test pass; CPU seconds of every trial process; GPU seconds = trial wall time x the GPU
share it reserved).
:func:`write_comparison` turns them into a report (HTML, Markdown, CSV, JSON) through :mod:`harness.evaluation.report`.

With floors (``floors.json`` of ``dae-cf findings``: rows of :func:`harness.evaluation.floors.floor_rows`, each floor
tuned by a C search on val) every row gets the task's best floor: ``floor_auc`` (the highest finite test AUC of any
floor row of the task), ``floor`` (which one) and ``beats_floor`` (the row's AUC strictly above it; False when
either is missing), so a detection figure never stands without what is reachable without a trained DAE.
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
FLOOR_RESULT_COLUMNS = ("floor_auc", "floor", "beats_floor")  # added to every row when floors are given
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


def load_floors(path: str | os.PathLike) -> tuple[list[dict[str, Any]], str]:
    """The floor rows and their caption from ``floors.json`` (a folder holding one is accepted too)."""
    path = Path(path)
    if path.is_dir():
        path = path / "floors.json"
    if not path.is_file():
        raise FileNotFoundError(f"floors file not found: {path} (written by dae-cf findings into <out>/floors)")
    data = json.loads(path.read_text())
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and {"task", "floor", "auc"} <= set(r) for r in rows):
        raise ValueError(f"{path}: expected an object with a 'rows' list of floor rows (task, floor, auc, ...)")
    return rows, str(data.get("caption", ""))


def best_floors(floor_rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """task -> its floor row with the highest finite AUC (every floor and head kind of the task competes)."""
    best: dict[str, dict[str, Any]] = {}
    for row in floor_rows:
        auc = row.get("auc")
        if auc is None or not math.isfinite(float(auc)):
            continue
        task = str(row["task"])
        if task not in best or float(auc) > float(best[task]["auc"]):
            best[task] = row
    return best


def with_floors(rows: list[dict[str, Any]], floor_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with :data:`FLOOR_RESULT_COLUMNS` added: the task's best floor AUC, its name and whether the row
    beats it (its AUC finite and strictly above a finite floor; a task without a floor gets NaN and False)."""
    best = best_floors(floor_rows)
    out = []
    for row in rows:
        floor = best.get(str(row["task"]))
        floor_auc = NAN if floor is None else float(floor["auc"])
        auc = NAN if row.get("auc") is None else float(row["auc"])
        name = "" if floor is None else f"{floor['floor']} ({floor.get('kind', '')}, C={floor.get('C')})"
        out.append({**row, "floor_auc": floor_auc, "floor": name,
                    "beats_floor": bool(math.isfinite(auc) and math.isfinite(floor_auc) and auc > floor_auc)})
    return out


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
                     out_dir: str | os.PathLike, title: str = "DAE + linear head vs DenseNet121", *,
                     floor_rows: list[dict[str, Any]] | None = None, floors_caption: str = "") -> Path:
    """Write the comparison report into ``out_dir``; returns the path of its ``index.html``.

    ``floor_rows`` (:func:`harness.evaluation.floors.floor_rows`): add the floor columns (:func:`with_floors`) and
    a table of the floors themselves, captioned ``floors_caption`` (how they were fitted: rows, image size)."""
    if not head_rows and not baseline_rows:
        raise ValueError("nothing to compare: both summaries are empty")
    grouped = comparison_rows([*head_rows, *baseline_rows])
    if floor_rows is not None:
        grouped = {task: with_floors(rows, floor_rows) for task, rows in grouped.items()}
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
    if floor_rows is not None:
        report.add_text("Floors", (
            "`floor_auc`: the highest test AUC any floor reaches on the task (raw-pixel logistic regression, and a "
            "head on a randomly initialised encoder when the DAE's folder was at hand), each floor with its C chosen "
            "on the validation split as the heads' was; `beats_floor`: the row's AUC is strictly above it."))
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
    caption = "All tasks"
    if floor_rows is not None:
        caption += "; floor_auc: the best floor per task" + (f" ({floors_caption})" if floors_caption else "")
    report.add_table("comparison", everything, caption=caption, section="All tasks")
    if floor_rows is not None:
        report.add_table("floors", floor_rows, caption=f"Floors, test split: {floors_caption}" if floors_caption
                         else "Floors, test split", section="Floors")
    if ratios:
        report.add_table("cost_ratios", ratios, caption="DAE + head cost / DenseNet121 cost", section="All tasks")
    return report.write()
