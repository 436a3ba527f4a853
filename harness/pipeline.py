"""The whole method on one data set, from one command: train -> encode -> heads -> counterfactuals -> report.

    python -m harness.pipeline --config jobs/phantoms_demo.yaml [--train.total_samples=...]
    dae-cf pipeline --config jobs/phantoms_demo.yaml                 # the same

Training resumes from the run folder's newest checkpoint, so a rerun continues rather than restarts. The
report (``<eval.out_dir>/report/index.html``) holds the tables in the form of the paper's Tables 2-4 and the
figures; it is logged to an MLflow run of its own, tagged with the DAE's run.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.cli import run_main
from harness.config import ConfigError, RunConfig, dump_yaml, load_config, load_yaml
from harness.data import eval_loader
from harness.encode import encode_to_table
from harness.evaluation.cxr_judging import CxrJudgement, is_cxr_phantoms, judge_cxr_counterfactuals
from harness.evaluation.evaluate import (
    HeadEvaluation,
    Judges,
    build_judges,
    calibrate_direction_gain,
    ce_verdicts,
    detection_floors,
    evaluate_counterfactual_set,
    evaluate_heads,
    evaluate_reconstruction,
    evaluate_semantic_usage,
    fit_directions,
    judged_caption,
    save_counterfactual_figures,
    save_head_figures,
    save_heads,
    write_heads,
)
from harness.evaluation.figures import marked_figures, save_image_grid, save_latent_map
from harness.evaluation.floors import beats_floor
from harness.evaluation.oracle import Oracle, module_oracle, save_oracle
from harness.evaluation.readiness import not_ready_text, read_readiness, readiness_tag
from harness.evaluation.report import Report, check_report
from harness.method.autoencoder import DiffusionAutoencoder
from harness.method.heads import TaskResult, check_quadratic_tasks, resolve_backend
from harness.method.latents import LatentsTable, load_latents
from harness.method.metrics import FIDMetric, LPIPSMetric, MissingWeightsError
from harness.ops.baseline import BaselineJob, load_detection_model
from harness.ops.baseline_job import run_baselines
from harness.ops.tracking import Tracker
from harness.trainer import Trainer


def take_balanced(shard_dir: str, split: str, n: int, config: RunConfig, column: str) -> dict:
    """``n`` images of ``split``, sorted by position: ``n // 2`` of its lowest ``column`` value ("healthy") and the
    rest from the other values (fewer of one group only where the split holds fewer). Deterministic.

    Reads ``4 n`` images at a time and stops once both groups can be filled: a split written sorted by label (the
    first hundreds all positive, as MedMNIST's can be) still gives both classes.
    """
    batches = []
    for batch in eval_loader(shard_dir, 4 * n, split=split, image_size=config.data.image_size,
                             channels=config.data.channels):
        batches.append(batch)
        labels = torch.cat([b["labels"][column] for b in batches]).numpy()
        healthy_count = int((labels == labels.min()).sum())
        if healthy_count >= n // 2 and len(labels) - healthy_count >= n - n // 2:
            break
    order = np.argsort(labels == labels.min(), kind="stable")[::-1]  # healthy first, then the rest
    healthy, other = order[labels[order] == labels.min()], order[labels[order] != labels.min()]
    chosen = np.concatenate([healthy[: n // 2], other[: n - min(n // 2, len(healthy))]])[:n]
    chosen = torch.from_numpy(np.sort(chosen))
    keys, meta = [k for b in batches for k in b["key"]], [m for b in batches for m in b["meta"]]
    columns = set.intersection(*(set(b["labels"]) for b in batches))
    return {"image": torch.cat([b["image"] for b in batches])[chosen],  # (n, C, H, W)
            "key": [keys[i] for i in chosen], "meta": [meta[i] for i in chosen],
            "labels": {k: torch.cat([b["labels"][k] for b in batches])[chosen] for k in sorted(columns)}}


def run_baseline(config: RunConfig, out_dir: Path) -> list[dict]:
    """Train the DenseNet121 baseline job on the same shards and splits; its test rows (Table 3 columns)."""
    job = load_yaml(config.eval.baseline_job, BaselineJob, what="baseline job file")
    baseline_out = out_dir / "baseline"
    # A call, not a subprocess: the same work as `dae-cf baseline --shards ... --config ... --out ...`.
    run_baselines(config.data.shard_dir, job, baseline_out, num_cpus=config.eval.baseline_cpus or None)
    rows = []
    for record_path in sorted((baseline_out / "best").glob("*-detection/record.json")):
        record = json.loads(record_path.read_text())
        summary = json.loads((baseline_out / "summary.json").read_text())
        wall = next((r["wall_s"] for r in summary["rows"] if r["task"] == record["task"]["name"]), float("nan"))
        rows.append({"task": record["task"]["name"], "method": f"{record['model']} (from scratch)",
                     **{k: record["test"].get(k) for k in ("auc", "f1", "accuracy")}, "wall_s": wall,
                     "selected": record["selected"]})
    return rows


def check_oracle_source(config: RunConfig) -> None:
    """With the baseline as the CEs' oracle (``eval.oracle``), its job must train detection of the first task of
    ``heads.tasks`` with the same label column and positives; ConfigError before any work otherwise."""
    if config.eval.oracle_source != "baseline":
        return
    job = load_yaml(config.eval.baseline_job, BaselineJob, what="baseline job file")
    task = config.heads.tasks[0]
    where = f"eval.baseline_job {config.eval.baseline_job}"
    match = next((t for t in job.tasks if t.name == task.name), None)
    if match is None:
        raise ConfigError(f"{where}: no task {task.name!r} (the first of heads.tasks, which the oracle judges); "
                          f"add it to the baseline job or set eval.oracle: cnn")
    if not job.multilabel and "detection" not in match.run_objectives:
        raise ConfigError(f"{where}: task {task.name!r} trains no detection model to serve as the oracle; add "
                          "detection to its objectives or set eval.oracle: cnn")
    if match.column != task.column or tuple(match.positives) != tuple(task.positives):
        raise ConfigError(f"{where}: task {task.name!r} is {match.column} {list(match.positives)} positive, "
                          f"heads.tasks has {task.column} {list(task.positives)}; make them one task or set "
                          "eval.oracle: cnn")


def baseline_oracle(config: RunConfig, out_dir: Path) -> Oracle:
    """The baseline's selected detection network of the first task (read from ``<out_dir>/baseline`` with its
    safetensors weights) as the CEs' oracle, with its test AUC from the baseline's own record."""
    task = config.heads.tasks[0]
    model, found = load_detection_model(out_dir / "baseline", task.name)
    record = found["record"]
    return module_oracle(model, f"{record['model']} baseline", task, found["test_auc"],
                         output_index=found["spec"]["output_index"], spec=found["spec"], selected=record["selected"],
                         weights=found["folder"])


def choose_judges(config: RunConfig) -> Judges:
    """The CEs' judges with the oracle ``eval.oracle`` names, saved to ``<eval.out_dir>/oracle/`` (safetensors
    + spec) for the served explainer to package."""
    out_dir = Path(config.eval.out_dir)
    oracle = baseline_oracle(config, out_dir) if config.eval.oracle_source == "baseline" else None
    judges = build_judges(config, fid=_fid_or_none(), oracle=oracle)
    save_oracle(judges.oracle, out_dir / "oracle")
    return judges


def _lpips_or_reason() -> tuple[object | None, str | None]:
    try:
        return LPIPSMetric(net="alex"), None
    except MissingWeightsError as err:
        return None, str(err)


def _fid_or_none() -> FIDMetric | None:
    try:
        return FIDMetric(device="cuda" if torch.cuda.is_available() else "cpu")
    except MissingWeightsError:
        return None


def reconstruction_fid(images: torch.Tensor, decoded: torch.Tensor,
                       metric: FIDMetric | None = None) -> tuple[dict[str, float | int] | None, str | None]:
    """FID of ``decoded`` (the DAE's reconstructions, (B, C, H, W) in [-1, 1]) against ``images`` they came from.

    Returns (a report row, None), or (None, the reason) when pytorch-fid's Inception weights are not on this
    machine; the reason names the file and the folder it belongs in. ``metric`` replaces the Inception network
    (tests use one with random weights; nothing is downloaded either way).
    """
    if metric is None:
        try:
            metric = FIDMetric(device="cuda" if torch.cuda.is_available() else "cpu")
        except MissingWeightsError as err:
            return None, str(err)
    metric.reset()
    metric.update(images, real=True)
    metric.update(decoded, real=False)
    return {"fid": metric.compute(), "n_images": len(images), "n_decoded": len(decoded),
            "inception_features": metric.dims}, None


class StageClock:
    """Wall time of each pipeline stage, printed as it ends and kept for the report and MLflow."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._name, self._started = None, time.perf_counter()

    def next(self, name: str | None) -> None:
        """End the running stage (if any) and start ``name`` (None: just end)."""
        now = time.perf_counter()
        if self._name is not None:
            self.seconds[self._name] = now - self._started
            print(f"stage {self._name}: {self.seconds[self._name]:.1f} s", flush=True)
        self._name, self._started = name, now


def _gain_shortfall(info: dict) -> str:
    """What the report adds when the gain search did not reach its aim on a side (empty when it did)."""
    if "reached" not in info:  # aimed at the mirror image
        return " (at its bound: the decoder barely realises moves from that side)" if any(info["at_bound"]) else ""
    missed = [f"{name} side: at most {max(info['crossing_share'][side]):.0%}, at gain {info['gain'][side]:.2f}"
              for side, name in enumerate(("negative", "positive"))
              if not info["reached"][side] and info["n_images"][side]]
    return f" (not reached on the training images: {'; '.join(missed)})" if missed else ""


# ---------------------------------------------------------------------------------------------------------
# The stages: trained model -> latents -> heads -> counterfactuals -> report, each a function of the loaded
# config and the previous stages' results (the benchmark suites call the same functions).
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainedModel:
    """A finished training run: its exported model folder and how far it trained."""

    model_dir: Path
    samples_seen: int
    mlflow_run_id: str | None


@dataclass
class Latents:
    """The trained autoencoder and the latents table of the labelled splits (no augmentation)."""

    ae: DiffusionAutoencoder
    path: Path
    table: LatentsTable


@dataclass
class Heads:
    """Every (task, kind) head fitted on train and scored on test; the first task's first kind makes the CEs."""

    evaluation: HeadEvaluation
    main: TaskResult
    seconds_per_head: float
    floors: list[dict] = field(default_factory=list)
    floor_verdict: list[dict] = field(default_factory=list)


@dataclass
class AutoencoderChecks:
    """Reconstruction and z-usage on the counterfactual images: does the decoder listen to z_sem at all?"""

    images: dict  # the balanced test batch the CEs are made of (image, key, meta, labels)
    reconstruction: list[dict]
    usage: list[dict]
    identity: dict


@dataclass
class Counterfactuals:
    """The CE rows of every direction x move size, the directions (``primary`` first) and what the gain did."""

    rows: list[dict]
    outputs: Any
    directions: dict
    primary: str
    gain_text: str
    judges: Judges | None = None
    findings: CxrJudgement | None = None  # on chest X-ray phantoms: the multi-finding measures


def train_model(config: RunConfig) -> TrainedModel:
    """Train the DAE of ``config`` in this process, or resume / reuse the run its ``train.out_dir`` holds."""
    summary = Trainer(config, resume="latest").fit()
    return TrainedModel(Path(summary["model_dir"]), int(summary["samples_seen"]), summary.get("mlflow_run_id"))


def encode_latents(config: RunConfig, trained: TrainedModel) -> Latents:
    """Encode ``eval.encode_splits`` into ``<eval.out_dir>/latents.parquet`` (z_sem only)."""
    ev = config.eval
    ae = DiffusionAutoencoder.load(trained.model_dir, batch_size=ev.batch_size, precision=ev.precision)
    path = Path(ev.out_dir) / "latents.parquet"
    encode_to_table(ae, config.data.shard_dir, list(ev.encode_splits), path, batch_size=ev.batch_size,
                    image_size=config.data.image_size, channels=config.data.channels,
                    meta={"model_dir": str(trained.model_dir), "mlflow_run_id": trained.mlflow_run_id})
    return Latents(ae, path, load_latents(path))


def fit_heads(config: RunConfig, latents: Latents) -> Heads:
    """Every head kind for every task, fitted on train and scored on test; written to ``heads.json`` with the
    configured CE direction."""
    tasks = list(config.heads.tasks)
    check_quadratic_tasks(latents.table, tasks, config.heads.kinds, config.heads.svm_solver,
                          resolve_backend(config.heads.backend), config.heads.max_rows_quadratic)
    started = time.perf_counter()
    evaluation = evaluate_heads(latents.table, tasks, config.heads.kinds, options=config.heads.options(),
                                backend=config.heads.backend, split="test",
                                max_rows_quadratic=config.heads.max_rows_quadratic)
    seconds = (time.perf_counter() - started) / max(1, len(evaluation.detection_rows))
    save_heads(Path(config.eval.out_dir) / "heads.json", evaluation, latents.table, config.counterfactual)
    return Heads(evaluation, evaluation.results[(tasks[0].name, config.heads.kinds[0])], seconds)


def add_floors(config: RunConfig, heads: Heads) -> None:
    """The floors every detection figure stands beside: raw-pixel logistic regression and a random encoder."""
    heads.floors = detection_floors(config, list(config.heads.tasks))
    heads.floor_verdict = beats_floor(heads.evaluation.detection_rows, heads.floors)


def check_autoencoder(config: RunConfig, latents: Latents, lpips: Any = None) -> AutoencoderChecks:
    """Reconstruction error and z-usage on ``eval.counterfactual_images`` balanced test images."""
    d = config.diffusion
    images = take_balanced(config.data.shard_dir, "test", config.eval.counterfactual_images, config,
                           config.heads.tasks[0].column)
    recon = evaluate_reconstruction(latents.ae, images["image"], [(d.invert_steps, d.decode_steps)], lpips=lpips)
    usage, identity = evaluate_semantic_usage(latents.ae, images["image"], seed=config.train.seed)
    return AutoencoderChecks(images, recon, usage, identity)


def make_counterfactuals(config: RunConfig, latents: Latents, heads: Heads, images: dict,
                         lpips: Any = None, judges: Judges | None = None) -> Counterfactuals:
    """CEs of ``images`` along every configured direction and move size; with ``calibrate_gain`` the configured
    direction's realisation gain is measured on training images first and leads (``heads.json`` gets it)."""
    cf, d, task = config.counterfactual, config.diffusion, config.heads.tasks[0]
    names = tuple(dict.fromkeys((cf.direction, *cf.evaluate_directions)))  # the configured one first
    directions = fit_directions(heads.main, latents.table, names, variance=cf.subspace_variance, k=cf.subspace_k)
    primary, gain_text = cf.direction, ""
    if cf.calibrate_gain:  # the configured direction with its realisation gain leads; the others stay at gain 1
        gain_images = take_balanced(config.data.shard_dir, "train", cf.gain_images, config, task.column)
        gained, gain_info = calibrate_direction_gain(latents.ae, gain_images["image"], config, heads.main,
                                                     directions[cf.direction])
        primary = f"{cf.direction}+gain"
        directions = {primary: gained, **directions}
        heads.main.direction = gained  # heads.json: the served explainer and the strips move the same way
        write_heads(Path(config.eval.out_dir) / "heads.json", heads.evaluation)
        gain_text = (f" '{primary}' is '{cf.direction}' with its realisation gain {gained.gain[0]:.2f} (moves from "
                     f"the negative side) / {gained.gain[1]:.2f} (from the positive side), measured on "
                     f"{len(gain_images['key'])} training images, aimed at {gain_info['target']}"
                     + _gain_shortfall(gain_info) + ".")
    rows, outputs = evaluate_counterfactual_set(latents.ae, images, heads.main, invert_steps=d.invert_steps,
                                                decode_steps=d.decode_steps, directions=directions,
                                                primary=primary, move_sizes=tuple(cf.move_sizes), render=cf.render,
                                                local_threshold=cf.local_threshold, lpips=lpips,
                                                class_names=task.class_names or tuple(config.eval.class_names),
                                                oracle=judges and judges.oracle, readout=judges and judges.readout,
                                                fid=judges and judges.fid)
    if judges is not None:  # every CE row names who judged it (the report, benchmarks and MLflow read the rows)
        rows = [{**row, "oracle": judges.oracle.name} if "oracle_flip" in row else row for row in rows]
    return Counterfactuals(rows, outputs, directions, primary, gain_text, judges)


def run(config_path: str | None, overrides: list[str]) -> Path:
    """The whole method on one job file; returns the report's index.html."""
    started = time.perf_counter()
    config = load_config(config_path, overrides)  # every value checked before anything runs
    check_oracle_source(config)
    clock = StageClock()
    clock.next("train")
    trained = train_model(config)
    clock.next("encode")
    torch.manual_seed(config.train.seed)
    latents = encode_latents(config, trained)
    clock.next("heads")
    heads = fit_heads(config, latents)
    clock.next("reconstruction and z-usage")
    lpips, lpips_reason = _lpips_or_reason()
    checks = check_autoencoder(config, latents, lpips)
    clock.next("floors")
    if config.eval.floors:
        add_floors(config, heads)
    baseline_rows = []
    if config.eval.baseline_job:  # before the CEs: its selected DenseNet may be their oracle (eval.oracle)
        clock.next("baseline")
        baseline_rows = run_baseline(config, Path(config.eval.out_dir))
    clock.next("oracle")
    judges = choose_judges(config)
    clock.next("counterfactuals")
    ces = make_counterfactuals(config, latents, heads, checks.images, lpips, judges)
    if is_cxr_phantoms(checks.images["meta"]):  # chest X-ray phantoms: MNAC-like, COUT-like, true-CE error
        clock.next("finding measures")
        ces.findings = judge_cxr_counterfactuals(config, checks.images, heads.main, ces.outputs["binary"], ces.primary)
    clock.next("report")
    index = write_report(config, config_path, trained, latents, heads, checks, ces, baseline_rows, clock, started,
                         lpips_reason)
    minutes = (time.perf_counter() - started) / 60
    print(f"report:     {index}\nlatents:    {latents.path}\nwall time:  {minutes:.1f} min")
    return index


def write_report(config: RunConfig, config_path: str | None, trained: TrainedModel, latents: Latents, heads: Heads,
                 checks: AutoencoderChecks, ces: Counterfactuals, baseline_rows: list[dict], clock: StageClock,
                 started: float, lpips_reason: str | None) -> Path:
    """The HTML report (tables in the form of the paper's Tables 2-4, figures) and its MLflow run."""
    out_dir = Path(config.eval.out_dir)
    report_dir = out_dir / "report"
    fig_dir = report_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    ev, d, cf = config.eval, config.diffusion, config.counterfactual
    tasks = list(config.heads.tasks)
    ae, table, latents_path = latents.ae, latents.table, latents.path
    main_result, batch, primary = heads.main, checks.images, ces.primary
    recon_rows, usage_rows, identity = checks.reconstruction, checks.usage, checks.identity
    ce_rows, ce_outputs, directions, gain_text = ces.rows, ces.outputs, ces.directions, ces.gain_text
    floor_table, floor_verdict = heads.floors, heads.floor_verdict
    heads_eval = heads.evaluation
    comparison = [{"task": r["task"], "method": f"DAE z_sem + {r['kind']}",
                   **{k: r[k] for k in ("auc", "f1", "accuracy")}, "wall_s": heads.seconds_per_head,
                   "selected": f"C={config.heads.C}"} for r in heads_eval.detection_rows] + baseline_rows
    report = Report(report_dir, f"dae-cf evaluation: {Path(config_path or 'defaults').stem}")
    readiness = read_readiness(trained.model_dir)  # None: the run did not assess readiness (train.readiness off)
    if not_ready_text(readiness):
        report.add_banner(not_ready_text(readiness))
    report.add_text("Run", f"DAE `{config.model.size}` trained on `{config.data.shard_dir}` for "
                           f"{trained.samples_seen:,} samples; latents from `{latents_path}`; "
                           f"DDIM {d.invert_steps} inversion / {d.decode_steps} decoding steps.")
    report.add_table("detection", heads_eval.detection_rows, "Detection on the test split (AUC from signed distances; "
                     "paper Table 3 form)", section="Heads")
    if config.eval.baseline_job:
        report.add_table("comparison", comparison, "Test split: linear heads on DAE latents vs DenseNet121 trained "
                         "from scratch on the same shards (AUC from scores; wall_s: fit time of one head, or the "
                         "whole baseline search)", section="Heads")
    if heads_eval.grading_rows:
        report.add_table("grading", heads_eval.grading_rows, "Grading by calibrated distance "
                         f"({config.heads.calibration}; paper Table 4 form)", section="Heads")
    if floor_table:
        report.add_table("floors", floor_table, "Floors on the test split: the same heads on raw pixels (logistic "
                         "regression) and on a randomly initialised encoder of the same architecture",
                         section="Heads")
        report.add_table("beats_floors", floor_verdict, "Does z_sem beat its floors? The DAE's AUC beside the best "
                         "floor AUC of the task (a DAE that does not is reported as such)", section="Heads")
    report.add_table("z_usage", usage_rows, "How much the denoiser relies on z_sem: the denoising error with the "
                     "true vs a shuffled z_sem at a few timesteps (usage = relative increase when shuffled); "
                     f"random-x_T decodes are nearest their own source {identity['nearest_own_source']:.2f} of the "
                     f"time (chance {identity['chance']:.2f})", section="Autoencoder")
    report.add_table("reconstruction", recon_rows, "Reconstruction of test images (encode -> invert -> decode); "
                     "mean_image_mse is the error of predicting the mean image", section="Autoencoder")
    report.add_table("counterfactuals", ce_rows, f"Counterfactual quality ({main_result.task.name}, "
                     f"{main_result.head.kind} head, {len(batch['key'])} test images, rendering '{cf.render}', "
                     f"{clock.seconds['counterfactuals']:.0f} s): per direction and move size (multiples of the "
                     "reflection's move), "
                     "validity after re-encoding, the realised fraction of the move, L1 proximity and, on phantoms, "
                     "the per-CE median error against the true counterfactual beside the unchanged input's, with the "
                     f"fraction of CEs closer to the truth than their input. Strips use '{primary}'.{gain_text} "
                     + judged_caption(ces.judges), section="Counterfactuals")
    if ces.judges is not None:
        report.add_table("oracles", ces.judges.rows(), "The judges of the CEs that never saw one, with their "
                         "accuracy on real test images (test_auc: the oracle's AUC)", section="Counterfactuals")
        report.add_text("Counterfactuals", ce_verdicts(ce_rows))
    if ces.findings is not None:
        report.add_table("finding_measures", ces.findings.rows, ces.findings.caption, section="Counterfactuals")
        report.add_table("finding_oracle", ces.findings.oracle.rows(), "The multi-finding oracle's AUC per finding "
                         "on the real test images", section="Counterfactuals")
    if lpips_reason:
        report.add_not_computed("LPIPS", lpips_reason)
    recon = ae.reconstruct(batch["image"])  # (B, C, H, W): measured by FID here, shown as a figure below
    fid_row, fid_reason = reconstruction_fid(batch["image"], recon)
    if fid_row is None:
        report.add_not_computed("FID", fid_reason)
    else:
        report.add_table("fid", [fid_row], f"FID of the reconstructions of {len(recon)} test images against those "
                         "images (pytorch-fid's Inception); from so few images FID is biased upward, so compare it "
                         "only between runs with the same number of images", section="Autoencoder")
    for path in save_head_figures(heads_eval, table, fig_dir):
        report.add_figure(path, path.stem.replace("_", " "), section="Heads")
    with marked_figures(not_ready_text(readiness, prefix="NOT READY")):  # CEs of a model that is not ready
        ce_figures = save_counterfactual_figures(ae, batch, main_result, ce_outputs, fig_dir,
                                                 n_strips=ev.strip_images, invert_steps=d.invert_steps,
                                                 decode_steps=d.decode_steps, direction=directions[primary])
    for path in ce_figures:
        report.add_figure(path, path.stem.replace("_", " "), section="Counterfactuals")
    test = table.select("test")
    n_map = min(ev.latent_map_points, len(test))
    colour_by = {c: test.labels[c][:n_map] for c in dict.fromkeys(t.column for t in tasks)}
    # Legends name the levels from the job file: binary columns by eval.class_names, grades by eval.grade_names.
    task_names = {t.column: t.class_names for t in tasks if t.class_names}
    level_names = {c: task_names.get(c, ev.class_names) if set(np.unique(v).tolist()) <= {0, 1}
                   else ev.grade_names or None for c, v in colour_by.items()}
    report.add_figure(save_latent_map(test.z_sem[:n_map], colour_by, fig_dir / "latent_map.png",
                                      level_names=level_names),
                      "t-SNE of test z_sem (paper Fig. 7)", section="Latent space")
    report.add_figure(save_image_grid(torch.cat([batch["image"], recon]), fig_dir / "reconstructions.png",
                                      nrow=len(batch["key"]), suptitle="test inputs / reconstructions"),
                      "inputs (top) and reconstructions (bottom)", section="Autoencoder")
    clock.next(None)
    elapsed = time.perf_counter() - started
    device = "CUDA" if torch.cuda.is_available() else "CPU"
    report.add_text("Run", f"Pipeline wall time {elapsed / 60:.1f} min on {device} "
                           f"({torch.get_num_threads()} threads); by stage: "
                           + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in clock.seconds.items()) + ".")
    (report_dir / "config.yaml").write_text(dump_yaml(config))
    index = report.write()
    missing = check_report(index)
    if missing:
        raise RuntimeError(f"report {index} refers to missing files: {missing}")

    # Track: one evaluation run, tagged with the DAE run, holding the report and headline metrics.
    tracker = Tracker(config.track, config.train.out_dir, run_name=f"eval-{out_dir.name}",
                      tags={"dae_run_id": str(trained.mlflow_run_id), "kind": "evaluation",
                            "readiness": readiness_tag(readiness)})
    headline = {f"{r['task']}/{r['kind']}/auc": r["auc"] for r in heads_eval.detection_rows}
    headline.update({f"{r['task']}/{r['kind']}/{k}": r[k] for r in heads_eval.grading_rows
                     for k in ("grade_macro_f1", "grade_mae", "grade_mae_continuous", "grade_kappa_quadratic")})
    for r in ce_rows:
        prefix = re.sub(r"[^A-Za-z0-9_./]+", "_", f"ce/{r['direction']}/{r['move']}/{r['kind']}")
        headline.update({f"{prefix}/{k}": r[k] for k in ("validity", "realised_fraction", "closer_than_input",
                                                          "oracle_flip", "readout_flip", "fd_oracle")
                         if k in r})
    if ces.judges is not None:
        headline["oracle/test_auc"] = ces.judges.oracle.test_auc
    if ces.findings is not None:
        headline.update(ces.findings.metrics())
    headline["recon/mse"] = recon_rows[0]["mse"]
    if fid_row is not None:
        headline["recon/fid"] = fid_row["fid"]
    headline.update({f"z_usage/t{r['t']}": r["usage"] for r in usage_rows})
    headline["random_xT/nearest_own_source"] = identity["nearest_own_source"]
    headline.update({f"time/{re.sub(r'[^A-Za-z0-9_]+', '_', name)}_s": sec for name, sec in clock.seconds.items()})
    headline.update({f"{r['task']}/{r['kind']}/beats_floors": float(r["beats_floors"]) for r in floor_verdict})
    tracker.log_params({f"heads.{k}": v for k, v in config.heads.options().to_dict().items()})  # fitting choices
    tracker.log_metrics({k: v for k, v in headline.items() if isinstance(v, (int, float)) and v == v})
    tracker.log_artifacts(report_dir, "report")
    tracker.end()
    return index




def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML run file")
    args, overrides = parser.parse_known_args(argv)
    return run(args.config, overrides)


if __name__ == "__main__":
    sys.exit(run_main(main))
