"""DenseNet121 from scratch on the shards, per task and objective (detection / grading), under Ray Tune.

    dae-cf baseline --shards runs/data/phantoms-32 --task fracture
    dae-cf baseline --shards ... --config jobs/baseline_phantoms.yaml --num-cpus 8
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        dae-cf baseline --shards /shared/shards --config jobs/baseline_phantoms.yaml

Trials are the grid lr x epochs of the job file, each with early stopping on the validation metric
(``select_detection`` / ``select_grading``) and a checkpoint whenever it improves. The trial with the best
validation score (ties: the earlier grid position) is scored once on validation and test from its best
checkpoint. No pretrained weights are used anywhere.

MLflow: one parent run; a child run per trial (per-epoch ``train_loss`` and ``val_*`` histories, tag
``selected``); ``<task>/<objective>/test_*`` metrics only on the parent. Outputs in ``--out``:
``best/<task>-<objective>/`` (weights + record.json), ``summary.json`` (rows for ``dae-cf compare``), ``report/``.

``python jobs/baseline_densenet.py`` and ``python -m harness.ops.baseline_job`` take the same arguments;
:func:`run_baselines` runs a loaded job without a command line (the pipeline calls it).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from harness.config import ConfigError
from harness.data.shards import read_manifest
from harness.evaluation.report import Report
from harness.job_support import (
    Stopwatch,
    file_sha256,
    job_from_args,
    job_to_dict,
    publish_summary,
    ray_job,
    ray_run_config,
    write_json_atomic,
)
from harness.ops.baseline import (
    BaselineJob,
    BaselineTask,
    DataShape,
    evaluate_checkpoint,
    evaluate_multilabel_checkpoint,
    labels_used,
    ray_multilabel_trial,
    ray_trial,
    targets,
)
from harness.ops.compare import method_row
from harness.ops.tracking import Tracker

log = logging.getLogger("baseline_densenet")
# The job files live in the repository's jobs/, beside this package (an editable install or a checkout).
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "jobs" / "baseline_phantoms.yaml"
HISTORY_KEYS = ("train_loss", "val_auc", "val_f1", "val_macro_f1", "val_mae", "val_accuracy")


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", required=True, help="shard folder with manifest.json (train/val/test splits)")
    parser.add_argument("--task", action="append", default=None, help="task name from the job file (repeatable; "
                        "default: every task)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="baseline job file")
    parser.add_argument("--out", default=None, help="output folder (default: the job file's out_dir)")
    parser.add_argument("--num-cpus", type=int, default=None, help="cores of a local Ray (default: all)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The parsed command line (``argv``; default: ``sys.argv[1:]``)."""
    return build_parser().parse_args(argv)


def data_shape(shards: Path, job: BaselineJob, task: BaselineTask) -> DataShape:
    """Image size, channels, train count and the detection class balance, from the manifest (fails early)."""
    manifest = read_manifest(shards)
    splits = manifest["splits"]
    for split in dataclasses.astuple(job.splits):
        if split not in splits:
            raise ValueError(f"{shards}/manifest.json: no split {split!r}; has {sorted(splits)}")
    counts = splits[job.splits.train]["label_counts"].get(task.column)
    if not counts:
        counted = sorted(splits[job.splits.train]["label_counts"])
        raise ValueError(f"{shards}/manifest.json: task {task.name!r} needs integer label column {task.column!r} in "
                         f"split {job.splits.train!r}; counted columns: {counted}")
    mask, y = targets(np.array([float(value) for value in counts]), task, "detection")
    used = np.array(list(counts.values()))[mask]  # image counts of the values inside the task's rule
    n_pos, n_neg = int(used[y == 1].sum()), int(used[y == 0].sum())
    if "detection" in task.run_objectives and (n_pos == 0 or n_neg == 0):
        raise ValueError(f"task {task.name!r}: the train split has {n_pos} positive / {n_neg} negative images")
    return DataShape(str(shards.resolve()), job.image_size or int(manifest["image_size"][0]),
                     job.channels or int(manifest["channels"]), int(splits[job.splits.train]["count"]),
                     n_neg / n_pos if n_pos else 1.0)


def tune_task(data: DataShape, task: BaselineTask, job: BaselineJob, storage: Path) -> list[dict[str, Any]]:
    """All objective x lr x epochs trials of one task (one Tuner, so trial processes are reused), in grid order."""
    from ray import tune

    # Keeping one checkpoint forces an experiment snapshot after each; Tune warns when that happens often,
    # which epochs of a few seconds do. Harmless for local storage: silence it unless the user set it.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    objectives = list(task.run_objectives)
    trainable = tune.with_resources(tune.with_parameters(ray_trial, data=data, task=task, job=job),
                                    job.resources.as_ray())
    tuner = tune.Tuner(
        trainable, param_space={"objective": tune.grid_search(objectives), "lr": tune.grid_search(list(job.search.lr)),
                                "epochs": tune.grid_search(list(job.search.epochs))},
        # reuse_actors: a new trial process would import torch and MONAI again
        tune_config=tune.TuneConfig(max_concurrent_trials=job.max_concurrent_trials or None, reuse_actors=True),
        run_config=ray_run_config(f"{task.name}-{time.strftime('%Y%m%d-%H%M%S')}", storage,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))  # the best epoch only
    trials = []
    for result in tuner.fit():
        frame = result.metrics_dataframe
        history = {} if frame is None else {
            key: [(int(e), float(v)) for e, v in zip(frame["epoch"], frame[key], strict=True) if not math.isnan(v)]
            for key in HISTORY_KEYS if key in frame}
        metrics = dict(result.metrics or {})
        if result.error is not None:
            metrics = {"error": f"{type(result.error).__name__}: {result.error}"[:1000]}
        params = {key: result.config[key] for key in ("objective", "lr", "epochs")}
        trials.append({"params": params, "metrics": metrics, "history": history, "checkpoint": result.checkpoint,
                       "trial_id": metrics.get("trial_id", "")})
    grid = [(o, lr, ep) for o in objectives for lr in job.search.lr for ep in job.search.epochs]
    trials.sort(key=lambda t: grid.index((t["params"]["objective"], t["params"]["lr"], t["params"]["epochs"])))
    return trials


def tune_multilabel(data: DataShape, job: BaselineJob, storage: Path) -> list[dict[str, Any]]:
    """The lr x epochs trials of the one multi-label network (``multilabel: true``), in grid order."""
    from ray import tune

    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    trainable = tune.with_resources(tune.with_parameters(ray_multilabel_trial, data=data, job=job),
                                    job.resources.as_ray())
    tuner = tune.Tuner(
        trainable, param_space={"lr": tune.grid_search(list(job.search.lr)),
                                "epochs": tune.grid_search(list(job.search.epochs))},
        tune_config=tune.TuneConfig(max_concurrent_trials=job.max_concurrent_trials or None, reuse_actors=True),
        run_config=ray_run_config(f"multilabel-{time.strftime('%Y%m%d-%H%M%S')}", storage,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
    trials = []
    for result in tuner.fit():
        frame = result.metrics_dataframe
        history = {} if frame is None else {
            key: [(int(e), float(v)) for e, v in zip(frame["epoch"], frame[key], strict=True) if not math.isnan(v)]
            for key in ("train_loss", "val_mean_auc") if key in frame}
        metrics = dict(result.metrics or {})
        if result.error is not None:
            metrics = {"error": f"{type(result.error).__name__}: {result.error}"[:1000]}
        params = {"objective": "multilabel", **{key: result.config[key] for key in ("lr", "epochs")}}
        trials.append({"params": params, "metrics": metrics, "history": history, "checkpoint": result.checkpoint,
                       "trial_id": metrics.get("trial_id", "")})
    grid = [(lr, ep) for lr in job.search.lr for ep in job.search.epochs]
    trials.sort(key=lambda t: grid.index((t["params"]["lr"], t["params"]["epochs"])))
    return trials


def run_multilabel(data: DataShape, job: BaselineJob, out: Path, tracker: Tracker,
                   label_counts: dict[str, dict[str, int]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Tune the one multi-label network, select on mean val AUC, test once; one comparison row per task."""
    import ray

    clock = Stopwatch()
    log.info("tuning one multi-label %s for %d tasks", job.model.name, len(job.tasks))
    trials = tune_multilabel(data, job, Path(job.ray_storage or out / "ray"))
    best = select_trial(trials)
    checkpoint = trials[best]["checkpoint"]
    if job.resources.gpu > 0:
        evaluate = ray.remote(num_cpus=job.resources.cpu, num_gpus=job.resources.gpu)(evaluate_multilabel_checkpoint)
        final = ray.get(evaluate.remote(checkpoint, data, job))
    else:
        final = evaluate_multilabel_checkpoint(checkpoint, data, job)
    folder = out / "best" / "multilabel"
    checkpoint.to_directory(str(folder))
    params, chosen = trials[best]["params"], trials[best]["metrics"]
    selected = f"lr={params['lr']:.3g} epochs={params['epochs']} (best epoch {chosen.get('best_epoch')})"
    write_json_atomic(folder / "record.json", {
        "tasks": [dataclasses.asdict(task) for task in job.tasks], "model": job.model.name, "params": params,
        "selected": selected, "selection_metric": "mean val auc", "val": final["val"], "test": final["test"],
        "shards": data.shards, "mlflow": {"tracking_uri": tracker.uri, "parent_run_id": tracker.run_id}})
    tracker.log_artifacts(folder, "best/multilabel")
    for index, trial in enumerate(trials):
        numeric = {k.replace("/", "."): float(v) for k, v in trial["metrics"].items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        tracker.log_child_run(f"multilabel | lr={trial['params']['lr']:.3g} epochs={trial['params']['epochs']}",
                              {**trial["params"], "model": job.model.name, "tasks": len(job.tasks)}, numeric,
                              tags={"selected": str(index == best).lower(),
                                    "error": str(trial["metrics"].get("error", ""))[:500]},
                              history=trial["history"])
    wall = clock.wall()
    cpu = sum(float(t["metrics"].get("cpu_s", 0.0)) for t in trials) + final["cpu_s"]
    gpu = job.resources.gpu * (sum(float(t["metrics"].get("wall_s", 0.0)) for t in trials) + final["wall_s"])
    rows = []
    for task in job.tasks:
        test = final["test"][task.name]
        tracker.log_metrics({f"{task.name}/multilabel/test_{k}": float(v) for k, v in test.items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool)})
        # the one network's cost is shared by its tasks: each row carries its share
        rows.append(method_row(task.name, f"{job.model.name} (multi-label)", test, None,
                               labels_used=labels_used(label_counts[task.column], task), wall_s=wall / len(job.tasks),
                               cpu_s=cpu / len(job.tasks), gpu_s=gpu / len(job.tasks), trials=len(trials),
                               selected=selected))
    return rows, {"multilabel": {"val": final["val"], "test": final["test"], "selected": selected,
                                 "wall_s": wall, "cpu_s": cpu, "trials": len(trials), "best": best}}


def select_trial(trials: list[dict[str, Any]]) -> int:
    """The trial with the best validation score (larger = better, see harness.ops.baseline.SELECT); ties: earliest."""
    scores = [float(t["metrics"].get("best_score", -math.inf)) if t["checkpoint"] is not None else -math.inf
              for t in trials]
    if not trials or max(scores) == -math.inf:
        errors = [t["metrics"].get("error", "no improving epoch") for t in trials]
        raise RuntimeError(f"no trial produced a usable checkpoint: {errors[:3]}")
    return scores.index(max(scores))


def finish_objective(trials: list[dict[str, Any]], data: DataShape, task: BaselineTask, objective: str,
                     job: BaselineJob, out: Path, tracker: Tracker) -> dict[str, Any]:
    """Select among one objective's trials, score the selection once on test, log everything; returns a summary.

    The test pass runs in a Ray task holding the trials' GPU share when they had one, else here in the driver.
    """
    import ray

    clock = Stopwatch()
    best = select_trial(trials)
    checkpoint = trials[best]["checkpoint"]
    if job.resources.gpu > 0:
        evaluate = ray.remote(num_cpus=job.resources.cpu, num_gpus=job.resources.gpu)(evaluate_checkpoint)
        final = ray.get(evaluate.remote(checkpoint, data, task, objective, job))
    else:
        final = evaluate_checkpoint(checkpoint, data, task, objective, job)
    folder = out / "best" / f"{task.name}-{objective}"
    checkpoint.to_directory(str(folder))
    params, chosen = trials[best]["params"], trials[best]["metrics"]
    selected = f"lr={params['lr']:.3g} epochs={params['epochs']} (best epoch {chosen.get('best_epoch')})"
    record = write_json_atomic(folder / "record.json", {
        "task": dataclasses.asdict(task), "objective": objective, "model": job.model.name,
        "params": params, "selected": selected, "selection_metric": job.selection(objective),
        "val": final["val"], "test": final["test"], "shards": data.shards,
        "mlflow": {"tracking_uri": tracker.uri, "parent_run_id": tracker.run_id}})
    tracker.log_artifacts(folder, f"best/{task.name}-{objective}")

    run_ids = []
    for index, trial in enumerate(trials):
        numeric = {k: float(v) for k, v in trial["metrics"].items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in HISTORY_KEYS}
        tags = {"task": task.name, "objective": objective, "selected": str(index == best).lower(),
                "error": str(trial["metrics"].get("error", ""))[:500]}
        run_ids.append(tracker.log_child_run(
            f"{task.name} | {objective} | lr={trial['params']['lr']:.3g} epochs={trial['params']['epochs']}",
            {"task": task.name, **trial["params"], "model": job.model.name, "batch_size": job.search.batch_size,
             "patience": job.search.patience}, numeric, tags=tags, history=trial["history"]))
    test = {k: float(v) for k, v in final["test"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tracker.log_metrics({f"{task.name}/{objective}/test_{k}": v for k, v in test.items()})
    cpu = sum(float(t["metrics"].get("cpu_s", 0.0)) for t in trials) + final["cpu_s"]
    gpu = job.resources.gpu * (sum(float(t["metrics"].get("wall_s", 0.0)) for t in trials) + final["wall_s"])
    return {"test": final["test"], "val": final["val"], "selected": selected, "wall_s": clock.wall(), "cpu_s": cpu,
            "gpu_s": gpu, "trials": len(trials), "record": str(record), "child_run_ids": run_ids, "best": best}


def run_task(data: DataShape, task: BaselineTask, job: BaselineJob, out: Path, tracker: Tracker,
             label_counts: dict[str, int]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Tune every objective of a task, finish each; returns (comparison row, per-objective summaries)."""
    clock = Stopwatch()
    log.info("task %s: tuning %s for %s", task.name, job.model.name, ", ".join(task.run_objectives))
    trials = tune_task(data, task, job, Path(job.ray_storage or out / "ray"))
    tune_wall = clock.wall()
    results = {objective: finish_objective([t for t in trials if t["params"]["objective"] == objective], data,
                                           task, objective, job, out, tracker)
               for objective in task.run_objectives}
    row = method_row(
        task.name, job.model.name, results.get("detection", {}).get("test"), results.get("grading", {}).get("test"),
        labels_used=labels_used(label_counts, task), wall_s=tune_wall + sum(r["wall_s"] for r in results.values()),
        cpu_s=sum(r["cpu_s"] for r in results.values()), gpu_s=sum(r["gpu_s"] for r in results.values()),
        trials=len(trials), selected="; ".join(f"{name}: {r['selected']}" for name, r in results.items()))
    return row, results


def run_baselines(shards: str | Path, job: BaselineJob, out: str | Path | None = None, *,
                  task_names: list[str] | None = None, num_cpus: int | None = None) -> dict[str, Any]:
    """Tune and test the job's network on ``shards`` for the tasks ``task_names`` (default: every task of the job),
    writing into ``out`` (default: the job's ``out_dir``) on a local Ray of ``num_cpus`` cores (or the cluster of
    ``RAY_ADDRESS``); returns ``{"rows", "objectives", "out", "parent_run_id"}`` (also in summary.json)."""
    tasks = [job.task(name) for name in task_names] if task_names else list(job.tasks)
    if job.multilabel and task_names:
        raise ConfigError("error: --task picks one task of a multilabel job, whose one network has every task's "
                          "output; drop --task or set multilabel: false")
    shards, out = Path(shards), Path(out or job.out_dir)
    shapes = {task.name: data_shape(shards, job, task) for task in tasks}  # fail before starting Ray
    manifest = read_manifest(shards)
    out.mkdir(parents=True, exist_ok=True)
    job_file = write_json_atomic(out / "job.json", job_to_dict(job))

    import ray

    tracker = Tracker(job.track, out, run_name=f"baseline-{job.model.name} {shards.name}",
                      tags={"job": "baseline_densenet"})
    with ray_job(tracker, num_cpus):
        tracker.log_params({"shards": str(shards.resolve()), "manifest_sha256": file_sha256(shards / "manifest.json"),
                            "model": job.model.name, "pretrained": False, "tasks": [t.name for t in tasks],
                            "resources": job.resources.as_ray(), "ray_cpus": ray.cluster_resources().get("CPU"),
                            "augment": job.augment.enabled})
        tracker.log_artifact(job_file)
        report = Report(out / "report", f"{job.model.name} baselines on {shards.name}")
        rows, objectives = [], {}
        if job.multilabel:
            first = shapes[tasks[0].name]
            data = dataclasses.replace(first, pos_weights=tuple(shapes[t.name].pos_weight for t in tasks))
            counts = {t.column: manifest["splits"][job.splits.train]["label_counts"][t.column] for t in tasks}
            rows, objectives = run_multilabel(data, job, out, tracker, counts)
        for task in tasks if not job.multilabel else ():
            counts = manifest["splits"][job.splits.train]["label_counts"][task.column]
            row, results = run_task(shapes[task.name], task, job, out, tracker, counts)
            rows.append(row)
            objectives.update({f"{task.name}/{name}": result for name, result in results.items()})
        report.add_table("baselines", rows, caption="Selected trial per task (test split)", section="Results")
        publish_summary(out, tracker, report, {
            "job": "baseline_densenet", "shards": str(shards.resolve()), "model": job.model.name, "rows": rows,
            "parent_run_id": tracker.run_id})
    return {"rows": rows, "objectives": objectives, "out": str(out), "parent_run_id": tracker.run_id}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line: parse, load the job file, then :func:`run_baselines`."""
    args = parse_args(argv)
    job = job_from_args(args, BaselineJob)
    return run_baselines(args.shards, job, args.out, task_names=args.task, num_cpus=args.num_cpus)


if __name__ == "__main__":
    from harness.cli import run_main

    sys.exit(run_main(main))
