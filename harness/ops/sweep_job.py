"""Ray Tune sweep of linear heads on one latents table: per task, kind x C x fitting rule x calibration.

    dae-cf sweep --latents runs/eval/latents.parquet --config jobs/sweep_phantoms.yaml
    dae-cf sweep --latents ... --config ... --num-cpus 8 --out runs/sweep-8cpu
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        dae-cf sweep --latents /shared/latents.parquet --config jobs/sweep_phantoms.yaml

Locally Ray starts with ``--num-cpus`` cores (default: all of the machine's); under ``ray job submit`` the
same command joins the cluster. Every trial fits on the train split and is scored on the validation split
(``harness.ops.sweep.run_trial``), or with ``cv_folds: k`` by stratified k-fold cross-validation on train (latents
without a val split); the selected configuration per task (``harness.ops.sweep.select_best``, rule stated
in the job file) is refitted once and scored on validation and test (``harness.ops.sweep.fit_final``; in the
driver, or in a Ray task holding the trials' GPU share when they had one).

MLflow: one parent run per invocation; one child run per trial (params, ``val_*`` metrics, costs, tag
``selected``); the parent gets ``<task>/test_*`` metrics (test metrics are logged nowhere else), the best head
files and the sweep report. Outputs in ``--out``: ``best_heads/<task>.json`` (TaskResult.to_dict plus the
latents' and DAE's identifiers), ``summary.json`` (rows for ``dae-cf compare``), ``report/`` (tables, HTML).

``python jobs/sweep_heads.py`` and ``python -m harness.ops.sweep_job`` take the same arguments; :func:`sweep_heads`
runs a loaded job without a command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from harness.cli import run_main
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
from harness.method.head_tasks import check_task_labels, describe_mappings, numeric_labels
from harness.method.latents import LatentsError, LatentsTable, load_latents
from harness.ops.compare import method_row
from harness.ops.sweep import (
    SELECT_METRICS,
    SweepJob,
    SweepTask,
    describe,
    fit_final,
    grid_position,
    run_trial,
    select_best,
    selection_key,
)
from harness.ops.tracking import Tracker
from harness.evaluation.report import Report

log = logging.getLogger("sweep_heads")
TRIAL_KEYS = ("ok", "error", "warnings", "labels_used", "fit_seconds", "cpu_s", "wall_s")


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latents", required=True, help="latents table (.parquet or .npz) with train/val/test rows")
    parser.add_argument("--config", required=True, help="sweep job file, e.g. jobs/sweep_phantoms.yaml")
    parser.add_argument("--out", default=None, help="output folder (default: the job file's out_dir)")
    parser.add_argument("--num-cpus", type=int, default=None, help="cores of a local Ray (default: all)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: job file, "
                        "$MLFLOW_TRACKING_URI, else a sqlite store in the output folder)")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The parsed command line (``argv``; default: ``sys.argv[1:]``)."""
    return build_parser().parse_args(argv)


def check_table(table: LatentsTable, job: SweepJob, path: Path) -> None:
    """Fail before starting Ray when a split or a label column the job needs is absent, or a label lies outside
    a task's grade range. Under ``cv_folds`` the val split is not needed."""
    counts = table.split_counts()
    needed = (job.splits.train, job.splits.test) if job.cv_folds else dataclasses.astuple(job.splits)
    for split in needed:
        if counts.get(split, 0) == 0:
            hint = "; without a val split set cv_folds: k to select by cross-validation on train" \
                if split == job.splits.val else ""
            raise LatentsError(f"{path}: split {split!r} has no rows (splits present: {counts}){hint}")
    check_task_labels(table, job.tasks, str(path))


def param_space(task: SweepTask, job: SweepJob) -> tuple[dict[str, Any], int]:
    """Ray Tune's search space for one task and its ``num_samples`` (> 1 only for a random C)."""
    from ray import tune

    grid_c = isinstance(job.search.C, tuple)
    c_space = tune.grid_search(list(job.search.C)) if grid_c else tune.loguniform(*job.search.C.log_uniform)
    space = {"kind": tune.grid_search(list(job.search.kinds)), "C": c_space,
             "rule": tune.grid_search([rule.name for rule in task.rules]),
             "calibration": tune.grid_search(list(job.calibrations(task)))}
    return space, 1 if grid_c else job.search.C.samples


def tune_task(table: LatentsTable, task: SweepTask, job: SweepJob, storage: Path) -> list[dict[str, Any]]:
    """Run every trial of one task; returns ``[{"params", "metrics", "trial_id"}]`` in grid order."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    space, samples = param_space(task, job)
    trainable = tune.with_resources(tune.with_parameters(run_trial, table=table, task=task, job=job),
                                    job.resources.as_ray())
    tuner = tune.Tuner(
        trainable, param_space=space,
        # reuse_actors: a trial lasts milliseconds, a fresh worker process (imports) about a second
        tune_config=tune.TuneConfig(num_samples=samples, max_concurrent_trials=job.max_concurrent_trials or None,
                                    search_alg=BasicVariantGenerator(random_state=job.search.seed),
                                    reuse_actors=True),
        run_config=ray_run_config(f"{task.name}-{time.strftime('%Y%m%d-%H%M%S')}", storage))
    trials = []
    for result in tuner.fit():
        params = {key: result.config[key] for key in ("kind", "C", "rule", "calibration")}
        metrics = {k: v for k, v in (result.metrics or {}).items() if k.startswith("val_") or k in TRIAL_KEYS}
        if result.error is not None:  # the trial process itself failed (not a configuration run_trial refused)
            metrics = {"ok": 0, "error": f"{type(result.error).__name__}: {result.error}"[:1000]}
        trials.append({"params": params, "metrics": metrics, "trial_id": (result.metrics or {}).get("trial_id", "")})
    trials.sort(key=lambda t: grid_position(t["params"], task, job))
    return trials


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def sweep_task(table: LatentsTable, task: SweepTask, job: SweepJob, out: Path, tracker: Tracker,
               identity: dict[str, Any]) -> dict[str, Any]:
    """Tune, select, log the trials, refit the selection once on test, save the best head; returns a summary."""
    import ray

    clock = Stopwatch()
    trials = tune_task(table, task, job, Path(job.ray_storage or out / "ray"))
    best = select_best(trials, task, job)
    params = trials[best]["params"]
    if job.resources.gpu > 0:  # refit where the trials ran: a Ray task holding their GPU share
        final_fn = ray.remote(num_cpus=job.resources.cpu, num_gpus=job.resources.gpu)(fit_final)
        final = ray.get(final_fn.remote(params, table, task, job))
    else:  # a CPU refit takes milliseconds: no need for another worker process
        final = fit_final(params, table, task, job)
    wall = clock.wall()

    metric = task.selection_metric
    trial_value = trials[best]["metrics"].get(f"val_{SELECT_METRICS[metric][0]}")
    refit_value = final["val"].get(SELECT_METRICS[metric][0])
    comparable = all(isinstance(v, float) and math.isfinite(v) for v in (trial_value, refit_value))
    if comparable and not math.isclose(trial_value, refit_value, rel_tol=1e-6, abs_tol=1e-9):
        log.warning("task %s: the refit scores val %s = %s, its trial scored %s (a non-deterministic backend?)",
                    task.name, metric, refit_value, trial_value)
    run_ids = []
    for index, trial in enumerate(trials):
        tags = {"task": task.name, "selected": str(index == best).lower(), "trial_id": str(trial["trial_id"]),
                "error": str(trial["metrics"].get("error", ""))[:500]}
        run_ids.append(tracker.log_child_run(
            f"{task.name} | {describe(trial['params'])}", {"task": task.name, **trial["params"],
                                                           "backend": job.trial_backend},
            _numeric(trial["metrics"]), tags=tags))

    cpu = sum(float(t["metrics"].get("cpu_s", 0.0)) for t in trials) + final["cpu_s"]
    gpu = job.resources.gpu * (sum(float(t["metrics"].get("wall_s", 0.0)) for t in trials) + final["wall_s"])
    result, test = final["result"], final["test"]
    best_record = {
        "task_result": result.to_dict(),
        "selected": {"params": params, "description": describe(params), "selection_metric": metric,
                     "val_value": trial_value, "tie_break_key": list(selection_key(trials[best]["metrics"], task))},
        "val": final["val"], "test": test, "labels_used": final["labels_used"], **identity,
        "mlflow": {"tracking_uri": tracker.uri, "parent_run_id": tracker.run_id, "trial_run_id": run_ids[best]},
    }
    best_path = write_json_atomic(out / "best_heads" / f"{task.name}.json", best_record)
    tracker.log_artifact(best_path, "best_heads")
    tracker.log_metrics({f"{task.name}/test_{k}": v for k, v in _numeric(test).items() if k != "C"})
    tracker.log_metrics({f"{task.name}/sweep_wall_s": wall, f"{task.name}/sweep_cpu_s": cpu,
                         f"{task.name}/trials": len(trials)})
    tracker.set_tags({f"{task.name}.selected": describe(params)})
    graded = result.calibration is not None
    row = method_row(task.name, f"DAE + {params['kind']} head", test, test if graded else None,
                     labels_used=final["labels_used"], wall_s=wall, cpu_s=cpu, gpu_s=gpu, trials=len(trials),
                     selected=describe(params))
    trial_rows = [{**t["params"], **{k: v for k, v in t["metrics"].items() if k not in ("warnings",)},
                   "selected": i == best} for i, t in enumerate(trials)]
    return {"row": row, "trials": trial_rows, "best_path": str(best_path), "selected": params,
            "child_run_ids": run_ids}


def sweep_heads(latents: str | Path, job: SweepJob, out: str | Path | None = None, *,
                num_cpus: int | None = None) -> dict[str, Any]:
    """Sweep ``job``'s heads on a latents table into ``out`` (default: the job's ``out_dir``) on a local Ray of
    ``num_cpus`` cores (or the cluster of ``RAY_ADDRESS``); returns ``{"rows", "tasks", "out", "parent_run_id"}``
    (also written to summary.json). Refused input (a missing split or label) leaves no output folder."""
    latents_path = Path(latents)
    table, mappings = numeric_labels(load_latents(latents_path))
    for line in describe_mappings(mappings):
        log.info("string labels mapped: %s", line)
    check_table(table, job, latents_path)  # before anything is written: refused input leaves no output folder
    out = Path(out or job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    identity = {"latents": {"path": str(latents_path.resolve()), "sha256": file_sha256(latents_path),
                            "rows": len(table), "z_dim": table.z_dim, "splits": table.split_counts()},
                "dae": table.meta.get("dae"), "latents_meta": table.meta}
    job_file = write_json_atomic(out / "job.json", job_to_dict(job))

    import ray

    tracker = Tracker(job.track, out, run_name=f"sweep-heads {latents_path.name}", tags={"job": "sweep_heads"})
    with ray_job(tracker, num_cpus):
        tracker.log_params({"latents": identity["latents"]["path"], "latents_sha256": identity["latents"]["sha256"],
                            "dae": identity["dae"], "rows": len(table), "z_dim": table.z_dim,
                            "backend": job.trial_backend, "resources": job.resources.as_ray(),
                            "ray_cpus": ray.cluster_resources().get("CPU"), "tasks": [t.name for t in job.tasks],
                            "selection": f"cv{job.cv_folds}" if job.cv_folds else "val",
                            **{f"search.{k}": getattr(job.search, k)
                               for k in ("protocol", "standardize", "class_weight", "svm_solver", "max_iter")}})
        tracker.log_artifact(job_file)
        report = Report(out / "report", f"Head sweep on {latents_path.name}")
        summaries = {}
        for task in job.tasks:
            log.info("task %s: sweeping", task.name)
            summary = sweep_task(table, task, job, out, tracker, identity)
            summaries[task.name] = summary
            section = f"Trials ({job.cv_folds}-fold CV on train)" if job.cv_folds else "Trials (validation split)"
            report.add_table(f"trials-{task.name}", summary["trials"], section=section,
                             caption=f"{task.name}: selected on val {task.selection_metric}")
            log.info("task %s: selected %s (test: %s)", task.name, summary["row"]["selected"],
                     {k: round(summary["row"][k], 4) for k in ("auc", "f1", "macro_f1", "mae")})
        rows = [s["row"] for s in summaries.values()]
        report.add_table("selected", rows, caption="Selected configuration per task: test split",
                         section="Selected")
        publish_summary(out, tracker, report, {
            "job": "sweep_heads", **identity, "rows": rows, "parent_run_id": tracker.run_id,
            "best_heads": {name: s["best_path"] for name, s in summaries.items()}})
    return {"rows": rows, "tasks": summaries, "out": str(out), "parent_run_id": tracker.run_id}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line: parse, load the job file, then :func:`sweep_heads`."""
    args = parse_args(argv)
    job = job_from_args(args, SweepJob)
    return sweep_heads(args.latents, job, args.out, num_cpus=args.num_cpus)


if __name__ == "__main__":
    sys.exit(run_main(main))
