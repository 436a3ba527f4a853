"""Ray Tune sweep of linear heads on one latents table: per task, kind x C x fitting rule x calibration.

    dae-cf sweep --latents runs/eval/latents.parquet --config jobs/sweep_phantoms.yaml
    dae-cf sweep --latents ... --config ... --num-cpus 8 --out runs/sweep-8cpu
    dae-cf sweep --latents ... --config jobs/sweep_cxr.yaml --address 127.0.0.1:6390   # a running cluster
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

On a cluster (``--address`` or the job's ``ray_address``; launch/ray/two_nodes_local.sh starts two nodes on one
host) each trial row records the node that ran it (``node_id``, ``node_ip``, ``node_resources``: the node's custom
resources such as ``node_worker``) and how often Tune retried it (``retries``: a trial whose node died is run
again, up to ``max_failures`` times); the summary counts trials per node. With ``screen: {top: k}`` the closed-form
ridge screen (harness.method.ridge_screen) first ranks every (task, C) on val AUC from one Gram matrix, and only
the ``k`` best C values of each task are swept (the screen's time and choice are in the summary).

``python jobs/sweep_heads.py`` and ``python -m harness.ops.sweep_job`` take the same arguments; :func:`sweep_heads`
runs a loaded job without a command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from harness.cli import run_main
from harness.evaluation.report import Report
from harness.job_support import (
    Stopwatch,
    check_cluster_address,
    file_sha256,
    job_from_args,
    job_to_dict,
    publish_summary,
    ray_job,
    ray_run_config,
    write_json_atomic,
)
from harness.method.head_tasks import check_task_labels, describe_mappings, numeric_labels
from harness.method.heads import check_quadratic_tasks
from harness.method.latents import LatentsError, LatentsTable, load_latents
from harness.method.ridge_screen import screen as ridge_screen
from harness.ops.compare import method_row
from harness.ops.sweep import (
    SELECT_METRICS,
    SweepJob,
    SweepTask,
    apply_uncertain,
    describe,
    fit_final,
    grid_position,
    run_trial,
    select_best,
    selection_key,
)
from harness.ops.tracking import Tracker

log = logging.getLogger("sweep_heads")
TRIAL_KEYS = ("ok", "error", "warnings", "labels_used", "fit_seconds", "cpu_s", "wall_s", "node_id", "node_ip",
              "node_resources")
PARAM_KEYS = ("kind", "C", "class_weight", "rule", "calibration")


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latents", required=True, help="latents table (.parquet or .npz) with train/val/test rows")
    parser.add_argument("--config", required=True, help="sweep job file, e.g. jobs/sweep_phantoms.yaml")
    parser.add_argument("--out", default=None, help="output folder (default: the job file's out_dir)")
    parser.add_argument("--num-cpus", type=int, default=None, help="cores of a local Ray (default: all)")
    parser.add_argument("--address", default=None, help="host:port of a running Ray cluster's head to join "
                        "(default: the job's ray_address, else $RAY_ADDRESS, else a local Ray)")
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
    # the quadratic solver's limit, before any trial starts: the rows of every task's every fitting rule
    check_quadratic_tasks(table, [task.fitted_on(rule) for task in job.tasks for rule in task.rules],
                          job.search.kinds, job.search.svm_solver, job.trial_backend, job.max_rows_quadratic,
                          job.splits.train)


def screen_tasks(table: LatentsTable, job: SweepJob) -> dict[str, Any]:
    """The ridge screen of every (task, C) of the job (one Gram matrix): the ``top`` C values per task by val AUC.

    Returns ``{"seconds", "top", "chosen": {task: [C, ...]}, "rows": [...]}``; each task is screened on its own
    rule's 0/1 targets (other rows missing), ``alpha = 1 / (2 C)`` (harness.method.ridge_screen.c_of_alpha)."""
    clock = Stopwatch()
    train, val = table.select(job.splits.train), table.select(job.splits.val)

    def targets(part: LatentsTable, task: SweepTask) -> np.ndarray:
        mask, y = task.binary_targets(np.asarray(part.labels[task.column], dtype=np.float64))
        out = np.full(len(part), np.nan)  # (N,)
        out[mask] = y
        return out

    grid = [float(c) for c in job.search.C]
    alphas = [1.0 / (2.0 * c) for c in grid]
    rows = ridge_screen(train.z_sem, {t.name: targets(train, t) for t in job.tasks}, val.z_sem,
                        {t.name: targets(val, t) for t in job.tasks}, alphas, keep=job.screen.top)
    chosen: dict[str, list[float]] = {}
    for row in rows:  # map the screen's C back onto the job's grid value (no rounding drift)
        c = min(grid, key=lambda value: abs(math.log(value) - math.log(row["C"])))
        row["C"] = c
        chosen.setdefault(row["finding"], []).append(c)
    return {"seconds": clock.wall(), "top": job.screen.top, "chosen": chosen, "rows": rows}


def trial_configs(task: SweepTask, job: SweepJob, screened: list[float] | None = None) -> list[dict[str, Any]]:
    """Every configuration of one task, in grid order (kinds x C x class weights x rules x calibration).

    ``screened``: the C values the ridge screen kept, instead of the whole grid. A random C (``log_uniform``)
    draws ``samples`` values per task, log-uniformly, from the job's seed."""
    if isinstance(job.search.C, tuple):
        c_values = [float(c) for c in job.search.C if not screened or c in screened]
    else:
        low, high = job.search.C.log_uniform
        rng = np.random.default_rng(job.search.seed)
        c_values = sorted(float(c) for c in np.exp(rng.uniform(math.log(low), math.log(high), job.search.C.samples)))
    return [{"task": task.name, "kind": kind, "C": c, "class_weight": weight, "rule": rule.name,
             "calibration": calibration}
            for kind in job.search.kinds for c in c_values for weight in job.search.class_weight_grid
            for rule in task.rules for calibration in job.calibrations(task)]


def node_of_trial() -> dict[str, Any]:
    """Which Ray node runs this process: its id, IP and custom resources (e.g. ``{"node_worker": 1.0}``)."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    node = next((n for n in ray.nodes() if n.get("NodeID") == node_id), {})
    custom = {k: v for k, v in node.get("Resources", {}).items()
              if k not in ("CPU", "GPU", "memory", "object_store_memory") and not k.startswith("node:")
              and not k.startswith("accelerator_type")}
    return {"node_id": node_id, "node_ip": node.get("NodeManagerAddress", ray.util.get_node_ip_address()),
            "node_resources": ",".join(f"{k}={v:g}" for k, v in sorted(custom.items()))}


def trial_on_node(config: dict[str, Any], table: LatentsTable, tasks: dict[str, SweepTask],
                  job: SweepJob) -> dict[str, Any]:
    """One trial (:func:`harness.ops.sweep.run_trial`) of the task it names, with the node that ran it."""
    params = config["trial"]
    return {**run_trial(params, table, tasks[params["task"]], job), **node_of_trial()}


def _retry_callback(log_path: Path) -> Any:
    """A Tune callback appending the id of every failed trial Tune starts again to ``log_path`` (Tune may copy its
    callbacks, so the record is a file rather than an object of this process)."""
    from ray.tune import Callback

    class RetryLog(Callback):
        def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            with open(log_path, "a", encoding="utf-8") as handle:
                handle.write(f"{trial.trial_id}\n")

    return RetryLog()


def _retries(log_path: Path) -> dict[str, int]:
    """trial id -> how often it was started again (:func:`_retry_callback`)."""
    counts: dict[str, int] = {}
    if log_path.exists():
        for line in log_path.read_text(encoding="utf-8").split():
            counts[line] = counts.get(line, 0) + 1
    return counts


def tune_all(table: LatentsTable, tasks: list[SweepTask], job: SweepJob, storage: Path,
             screened: dict[str, list[float]] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Run every trial of every task in ONE Tune run (the trials of all findings share the cluster at once, and
    Tune's start-up is paid once); returns task name -> ``[{"params", "metrics", "trial_id"}]`` in grid order."""
    from ray import tune

    configs = [config for task in tasks for config in trial_configs(task, job, (screened or {}).get(task.name))]
    by_name = {task.name: task for task in tasks}
    trainable = tune.with_resources(tune.with_parameters(trial_on_node, table=table, tasks=by_name, job=job),
                                    job.resources.as_ray())
    name = f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    with tempfile.NamedTemporaryFile(prefix="retries-", suffix=".txt", delete=False) as handle:
        retry_log = Path(handle.name)  # written by the driver's callback; storage may be a remote URI
    tuner = tune.Tuner(
        trainable, param_space={"trial": tune.grid_search(configs)},
        # reuse_actors: a trial lasts milliseconds, a fresh worker process (imports) about a second
        tune_config=tune.TuneConfig(max_concurrent_trials=job.max_concurrent_trials or None, reuse_actors=True),
        run_config=ray_run_config(name, storage, failure_config=tune.FailureConfig(max_failures=job.max_failures),
                                  callbacks=[_retry_callback(retry_log.resolve())]))
    try:
        results = tuner.fit()
        retries = _retries(retry_log)
    finally:
        retry_log.unlink(missing_ok=True)
    trials: dict[str, list[dict[str, Any]]] = {task.name: [] for task in tasks}
    for result in results:
        config = result.config["trial"]
        params = {key: config[key] for key in PARAM_KEYS}
        metrics = {k: v for k, v in (result.metrics or {}).items() if k.startswith("val_") or k in TRIAL_KEYS}
        if result.error is not None:  # the trial process itself failed (not a configuration run_trial refused)
            metrics = {"ok": 0, "error": f"{type(result.error).__name__}: {result.error}"[:1000]}
        trial_id = str((result.metrics or {}).get("trial_id", "")) or Path(result.path or "").name
        metrics["retries"] = retries.get(trial_id, 0)
        trials[config["task"]].append({"params": params, "metrics": metrics, "trial_id": trial_id})
    for task in tasks:
        trials[task.name].sort(key=lambda t, task=task: grid_position(t["params"], task, job))
    return trials


def tune_task(table: LatentsTable, task: SweepTask, job: SweepJob, storage: Path,
              screened: list[float] | None = None) -> list[dict[str, Any]]:
    """Every trial of one task (:func:`tune_all` with one task)."""
    return tune_all(table, [task], job, storage, {task.name: screened} if screened else None)[task.name]


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def sweep_task(table: LatentsTable, task: SweepTask, job: SweepJob, out: Path, tracker: Tracker,
               identity: dict[str, Any], trials: list[dict[str, Any]], tune_wall_s: float = 0.0) -> dict[str, Any]:
    """Select among the task's trials (:func:`tune_all`), log them, refit the selection once on test, save the best
    head; returns a summary. ``tune_wall_s``: the task's share of the shared Tune run's wall time."""
    import ray

    clock = Stopwatch()
    best = select_best(trials, task, job)
    params = trials[best]["params"]
    if job.resources.gpu > 0:  # refit where the trials ran: a Ray task holding their GPU share
        final_fn = ray.remote(num_cpus=job.resources.cpu, num_gpus=job.resources.gpu)(fit_final)
        final = ray.get(final_fn.remote(params, table, task, job))
    else:  # a CPU refit takes milliseconds: no need for another worker process
        final = fit_final(params, table, task, job)
    wall = clock.wall() + tune_wall_s

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
                "error": str(trial["metrics"].get("error", ""))[:500],
                **{key: str(trial["metrics"].get(key, "")) for key in ("node_id", "node_ip")}}
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


def trials_per_node(summaries: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """node_id -> {"ip", "resources", "trials", "retried"} over every task's trial rows."""
    nodes: dict[str, dict[str, Any]] = {}
    for summary in summaries.values():
        for row in summary["trials"]:
            node = nodes.setdefault(str(row.get("node_id", "") or "unknown"), {
                "ip": row.get("node_ip", ""), "resources": row.get("node_resources", ""), "trials": 0, "retried": 0})
            node["trials"] += 1
            node["retried"] += int(row.get("retries", 0) > 0)
    return nodes


def sweep_heads(latents: str | Path, job: SweepJob, out: str | Path | None = None, *,
                num_cpus: int | None = None, address: str | None = None) -> dict[str, Any]:
    """Sweep ``job``'s heads on a latents table into ``out`` (default: the job's ``out_dir``) on a local Ray of
    ``num_cpus`` cores (or the cluster of ``RAY_ADDRESS``); returns ``{"rows", "tasks", "out", "parent_run_id"}``
    (also written to summary.json). Refused input (a missing split or label) leaves no output folder."""
    latents_path = Path(latents)
    table, mappings = numeric_labels(load_latents(latents_path))
    for line in describe_mappings(mappings):
        log.info("string labels mapped: %s", line)
    check_table(table, job, latents_path)  # before anything is written: refused input leaves no output folder
    table = apply_uncertain(table, job)  # the job's policy for -1 (uncertain) labels of its detection tasks
    address = address or job.ray_address or os.environ.get("RAY_ADDRESS") or None
    if address:
        check_cluster_address(address)  # a cluster that does not answer: refused before the output folder exists
    out = Path(out or job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    identity = {"latents": {"path": str(latents_path.resolve()), "sha256": file_sha256(latents_path),
                            "rows": len(table), "z_dim": table.z_dim, "splits": table.split_counts()},
                "dae": table.meta.get("dae"), "latents_meta": table.meta}
    job_file = write_json_atomic(out / "job.json", job_to_dict(job))

    import ray

    tracker = Tracker(job.track, out, run_name=f"sweep-heads {latents_path.name}", tags={"job": "sweep_heads"})
    with ray_job(tracker, num_cpus, address):
        tracker.log_params({"latents": identity["latents"]["path"], "latents_sha256": identity["latents"]["sha256"],
                            "dae": identity["dae"], "rows": len(table), "z_dim": table.z_dim,
                            "backend": job.trial_backend, "resources": job.resources.as_ray(),
                            "ray_cpus": ray.cluster_resources().get("CPU"), "tasks": [t.name for t in job.tasks],
                            "selection": f"cv{job.cv_folds}" if job.cv_folds else "val",
                            **{f"search.{k}": getattr(job.search, k)
                               for k in ("protocol", "standardize", "class_weight", "svm_solver", "max_iter")}})
        tracker.log_artifact(job_file)
        report = Report(out / "report", f"Head sweep on {latents_path.name}")
        screened = screen_tasks(table, job) if job.screen is not None else None
        if screened is not None:
            log.info("ridge screen: %.2f s, kept C %s", screened["seconds"], screened["chosen"])
            tracker.log_metrics({"screen_s": screened["seconds"]})
            report.add_table("screen", screened["rows"], section="Screen",
                             caption=f"Ridge screen: top {job.screen.top} C per task by val AUC")
        summaries = {}
        clock = Stopwatch()
        log.info("sweeping %d task(s) in one Tune run", len(job.tasks))
        all_trials = tune_all(table, list(job.tasks), job, Path(job.ray_storage or out / "ray"),
                              screened["chosen"] if screened else None)
        tune_wall = clock.wall()
        trial_count = sum(len(trials) for trials in all_trials.values())
        for task in job.tasks:
            share = tune_wall * len(all_trials[task.name]) / max(trial_count, 1)
            summary = sweep_task(table, task, job, out, tracker, identity, all_trials[task.name], share)
            summaries[task.name] = summary
            section = f"Trials ({job.cv_folds}-fold CV on train)" if job.cv_folds else "Trials (validation split)"
            report.add_table(f"trials-{task.name}", summary["trials"], section=section,
                             caption=f"{task.name}: selected on val {task.selection_metric}")
            log.info("task %s: selected %s (test: %s)", task.name, summary["row"]["selected"],
                     {k: round(summary["row"][k], 4) for k in ("auc", "f1", "macro_f1", "mae")})
        rows = [s["row"] for s in summaries.values()]
        nodes = trials_per_node(summaries)
        report.add_table("selected", rows, caption="Selected configuration per task: test split",
                         section="Selected")
        report.add_table("nodes", [{"node_id": k, **v} for k, v in nodes.items()], section="Cluster",
                         caption="Trials per Ray node")
        tracker.log_metrics({"sweep_wall_s": clock.wall(), "ray_nodes": len(nodes)})
        screen_record = {k: v for k, v in screened.items() if k != "rows"} if screened else None
        publish_summary(out, tracker, report, {
            "job": "sweep_heads", **identity, "rows": rows, "parent_run_id": tracker.run_id,
            "best_heads": {name: s["best_path"] for name, s in summaries.items()},
            "trials_per_node": nodes, "sweep_wall_s": clock.wall(), "tune_wall_s": tune_wall, "screen": screen_record,
            "trials": {name: s["trials"] for name, s in summaries.items()}})
    return {"rows": rows, "tasks": summaries, "out": str(out), "parent_run_id": tracker.run_id,
            "trials_per_node": nodes, "screen": screen_record}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line: parse, load the job file, then :func:`sweep_heads`."""
    args = parse_args(argv)
    job = job_from_args(args, SweepJob)
    return sweep_heads(args.latents, job, args.out, num_cpus=args.num_cpus, address=args.address)


if __name__ == "__main__":
    sys.exit(run_main(main))
