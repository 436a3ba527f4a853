"""Every finding from one job file: the head sweep, the floors, the DenseNet121 baseline and their comparison.

    dae-cf findings --config jobs/findings_cxr.yaml
    dae-cf findings --config jobs/findings_cxr.yaml --address 127.0.0.1:6390   # the two-node cluster
    dae-cf findings --config ... --skip-baseline --out runs/findings-heads     # heads and floors only
    python jobs/findings.py --config ...                                       # the same

The job file (:class:`FindingsJob`) names the inputs (``latents``: the DAE's latents table; ``shards``: the images
they were encoded from), writes the findings ONCE (``tasks``), and holds one section per stage: ``sweep`` (every key
of a ``dae-cf sweep`` job file except tasks, out_dir, ray_address and track), ``baseline`` (every key of a ``dae-cf
baseline`` job file except tasks, out_dir and track; multi-label by default) and ``floors``. Every bad key of the
whole file is named in one ``error:`` line (exit status 2), and the inputs are checked (a finding the latents or the
shards lack, a cluster that does not answer, the quadratic solver above its row limit, an existing output folder
without ``--overwrite``) before any work. The stages then run in order on one Ray (local, or the cluster's):

    <out>/sweep       dae-cf sweep: per finding, kinds x C x class weights on val, refit, test once
    <out>/floors      floors.json: raw-pixel logistic regression, and a head on a randomly initialised encoder of
                      the DAE's architecture when the latents' meta names its model folder; C chosen on val over the
                      sweep's grid, fitted on at most ``floors.max_train_rows`` train images
    <out>/baseline    dae-cf baseline: one multi-label DenseNet121 for every finding
    <out>/comparison  dae-cf compare: per finding DAE head vs DenseNet121 with floor_auc and beats_floor

MLflow: the sweep and the baseline log their runs as they do alone; this job adds one parent run (``job:
findings``: the job file, the comparison, the floors and per-finding test AUCs) and nests both under it, all in one
store (the job's ``track``, else ``$MLFLOW_TRACKING_URI``, else ``<out>/mlruns.db``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import shutil
import sys
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pydantic.dataclasses
from pydantic import Field, ValidationError, model_validator
from pydantic.dataclasses import dataclass

from harness.cli import run_main
from harness.config import HeadOptions, Task, TrackConfig
from harness.config.errors import require
from harness.config.fields import SECTION, Flag, Name, NonNegativeInt, PositiveInt
from harness.config.messages import problems_of
from harness.data import eval_loader
from harness.data.shards import read_manifest
from harness.evaluation.floors import FLOOR_C_GRID, floor_rows, pixel_latents, random_encoder_latents
from harness.fileio import refuse_existing
from harness.job_support import (
    Splits,
    Stopwatch,
    check_cluster_address,
    init_ray,
    job_from_args,
    job_to_dict,
    write_json_atomic,
)
from harness.method.head_tasks import numeric_labels
from harness.method.latents import LatentsError, LatentsTable, load_latents
from harness.model_spec import SPEC_NAME, read_model_spec
from harness.ops.baseline import OBJECTIVES, BaselineJob, BaselineTask
from harness.ops.baseline_job import data_shape, run_baselines
from harness.ops.compare import with_floors, write_comparison
from harness.ops.sweep import SweepJob, SweepTask, apply_uncertain
from harness.ops.sweep_job import check_table, sweep_heads
from harness.ops.tracking import Tracker, resolve_tracking_uri

log = logging.getLogger("findings")
STAGES = ("sweep", "floors", "baseline", "comparison")  # the output folders, in the order the stages run


# ---------------------------------------------------------------------------------------------------------
# The job file.
# ---------------------------------------------------------------------------------------------------------


def section_of(job_type: type, name: str, exclude: tuple[str, ...], defaults: dict[str, Any] | None = None) -> type:
    """A job type's keys minus ``exclude`` (the ones this job writes once for every stage), as a section type with
    the same validation of each key; ``defaults`` replaces some defaults. The job type's cross-field checks run
    when the stage's job is built (:meth:`FindingsJob.sweep_job`), which the loader does once to check the file."""
    hints = typing.get_type_hints(job_type, include_extras=True)
    fields = []
    for field in dataclasses.fields(job_type):
        if field.name in exclude:
            continue
        if defaults and field.name in defaults:
            spec = dataclasses.field(default=defaults[field.name])
        elif field.default is not dataclasses.MISSING:
            spec = dataclasses.field(default=field.default)
        else:
            spec = dataclasses.field(default_factory=field.default_factory)
        fields.append((field.name, hints[field.name], spec))
    section = dataclasses.make_dataclass(name, fields, frozen=True, namespace={"__module__": __name__})
    section.__doc__ = f"The {job_type.__name__} keys of a findings job file, without {', '.join(exclude)}."
    return pydantic.dataclasses.dataclass(section, config=SECTION, frozen=True)


SweepSection = section_of(SweepJob, "SweepSection", ("tasks", "out_dir", "ray_address", "track"))
BaselineSection = section_of(BaselineJob, "BaselineSection", ("tasks", "out_dir", "track"), {"multilabel": True})


def _values(section: Any) -> dict[str, Any]:
    return {field.name: getattr(section, field.name) for field in dataclasses.fields(section)}


@dataclass(frozen=True, config=SECTION)
class FindingTask(SweepTask):
    """A finding, written once: a task (:class:`harness.config.Task`) with the sweep's keys (``select``,
    ``fit_rules``) and the baseline's (``objectives``)."""

    objectives: tuple[Literal[OBJECTIVES], ...] = ()

    @model_validator(mode="after")
    def _check_objectives(self) -> FindingTask:
        require([("objectives", "'grading' needs a grade_range")]
                if "grading" in self.objectives and self.grade_range is None else [])
        return self

    def sweep_task(self) -> SweepTask:
        return SweepTask(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SweepTask)})

    def baseline_task(self) -> BaselineTask:
        return BaselineTask(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Task)},
                            objectives=self.objectives)


@dataclass(frozen=True, config=SECTION)
class FloorsConfig:
    """The ``floors:`` section: what every finding's detection AUC is shown beside (harness.evaluation.floors).

    Each floor is tuned as the heads are: C chosen on val over the sweep's C grid (its list; the floors' own
    grid for a random search), with the sweep's fitting choices. On a large corpus the floors fit on a random
    ``max_train_rows`` of the train images (val and test whole); ``pixel_size`` > 0 resizes the images of the
    raw-pixel floor to that side (0: the shards' own size). Both are stated in the comparison's caption."""

    pixels: Flag = True  # logistic regression on the raw pixels
    random_encoder: Flag = True  # heads on an untrained encoder of the DAE's architecture (needs its model folder)
    max_train_rows: PositiveInt = 20_000
    pixel_size: NonNegativeInt = 0
    seed: NonNegativeInt = 0  # the train subsample and the random encoder's weights
    batch_size: PositiveInt = 256


@dataclass(frozen=True, config=SECTION)
class FindingsJob:
    """A whole ``jobs/findings_*.yaml`` file (see the module docstring)."""

    latents: Name
    shards: Name
    tasks: Annotated[tuple[FindingTask, ...], Field(min_length=1)]
    out_dir: str = "runs/findings"
    ray_address: str = ""  # "" -> --address, $RAY_ADDRESS, else a local Ray; host:port of a running cluster's head
    sweep: SweepSection = dataclasses.field(default_factory=SweepSection)
    baseline: BaselineSection = dataclasses.field(default_factory=BaselineSection)
    floors: FloorsConfig = dataclasses.field(default_factory=FloorsConfig)
    track: TrackConfig = dataclasses.field(default_factory=lambda: TrackConfig(registered_model=None))

    @model_validator(mode="after")
    def _check(self) -> FindingsJob:
        problems = []
        for name, build, job_type in (("sweep", self.sweep_job, SweepJob), ("baseline", self.baseline_job,
                                                                             BaselineJob)):
            try:  # the stage's own cross-field checks (e.g. a GPU share with backend sklearn)
                build()
            except ValidationError as error:
                for text in problems_of(error, job_type):
                    key, _, problem = text.partition(": ")
                    problems.append((key if key.startswith("tasks") else f"{name}.{key}", problem))
        if self.sweep.splits != self.baseline.splits:
            problems.append(("baseline.splits", f"{_values(self.baseline.splits)} differ from sweep.splits "
                                                f"{_values(self.sweep.splits)}: the comparison needs one test split"))
        require(list(dict.fromkeys(problems)))  # a task's problem found by both stages once
        return self

    def sweep_job(self, out: str | Path = "", track: TrackConfig | None = None) -> SweepJob:
        """The sweep stage's job: the ``sweep`` section with the findings, writing into ``out``."""
        return SweepJob(tasks=tuple(task.sweep_task() for task in self.tasks), out_dir=str(out),
                        ray_address=self.ray_address, track=track or self.track, **_values(self.sweep))

    def baseline_job(self, out: str | Path = "", track: TrackConfig | None = None) -> BaselineJob:
        """The baseline stage's job: the ``baseline`` section with the findings, writing into ``out``."""
        return BaselineJob(tasks=tuple(task.baseline_task() for task in self.tasks), out_dir=str(out),
                           track=track or self.track, **_values(self.baseline))


# ---------------------------------------------------------------------------------------------------------
# Floors.
# ---------------------------------------------------------------------------------------------------------


def floor_images(shards: Path, splits: Splits, image_size: int | None, channels: int, max_train_rows: int,
                 seed: int, batch_size: int = 256) -> dict[str, tuple[Any, dict[str, np.ndarray], list[str]]]:
    """Every val and test image and a random ``max_train_rows`` of the train images (each kept with probability
    max_train_rows / count, seeded, so memory stays bounded on a large corpus), at ``image_size`` (None: the
    shards' own). Returns ``{split: (images (N, C, H, W) in [-1, 1], labels {column: (N,)}, keys [N])}`` as
    :func:`harness.evaluation.floors.images_from_shards` does."""
    import torch

    counts = read_manifest(shards)["splits"]
    out = {}
    for split in dataclasses.astuple(splits):
        keep = min(1.0, max_train_rows / max(1, counts[split]["count"])) if split == splits.train else 1.0
        rng = np.random.default_rng(seed)
        images, keys, labels = [], [], []
        for batch in eval_loader(shards, batch_size, split=split, image_size=image_size, channels=channels):
            chosen = rng.random(len(batch["key"])) < keep  # (b,)
            index = torch.from_numpy(np.flatnonzero(chosen))
            images.append(batch["image"].float()[index])  # (b', C, H, W)
            keys.extend(key for key, kept in zip(batch["key"], chosen, strict=True) if kept)
            labels.append({column: values.numpy()[chosen] for column, values in batch["labels"].items()})
        if not keys:
            raise LatentsError(f"{shards}: split {split!r} has no images for the floors")
        limit = max_train_rows if split == splits.train else len(keys)
        common = sorted(set.intersection(*(set(batch_labels) for batch_labels in labels)))
        out[split] = (torch.cat(images)[:limit], {c: np.concatenate([b[c] for b in labels])[:limit] for c in common},
                      keys[:limit])
    return out


def model_folder(meta: dict[str, Any]) -> Path | None:
    """The DAE folder a latents table's meta names (``model``, written by ``dae-cf encode``) when it is on this
    machine (a registry URI or a folder elsewhere gives no random-encoder floor)."""
    name = meta.get("model")
    folder = Path(str(name)) if name else None
    return folder if folder is not None and (folder / SPEC_NAME).is_file() else None


def run_floors(job: FindingsJob, sweep: SweepJob, meta: dict[str, Any], out: Path) -> dict[str, Any]:
    """Both floors of every finding (:func:`harness.evaluation.floors.floor_rows`), written to ``out/floors.json``;
    ``meta``: the latents table's (it may name the DAE's folder). Returns ``{"rows", "caption", ...}``."""
    clock, options = Stopwatch(), job.floors
    shards = Path(job.shards)
    manifest = read_manifest(shards)
    native, channels = int(manifest["image_size"][0]), int(manifest["channels"])
    pixel_size = options.pixel_size or native
    tasks = [task.definition() for task in job.tasks]
    c_grid = tuple(sweep.search.C) if isinstance(sweep.search.C, tuple) else FLOOR_C_GRID
    head_options = HeadOptions(**sweep.search.choices())
    images = floor_images(shards, sweep.splits, pixel_size, channels, options.max_train_rows, options.seed,
                          options.batch_size)
    train_rows = len(images[sweep.splits.train][2])
    pixel_table = apply_uncertain(pixel_latents(images), sweep) if options.pixels else None
    folder = model_folder(meta) if options.random_encoder else None
    random_table, random_note = None, "off (floors.random_encoder: false)" if not options.random_encoder else (
        f"no model folder at hand (latents meta model: {meta.get('model')!r})")
    if folder is not None:
        spec = read_model_spec(folder)
        model_images = images if spec.image_size == pixel_size and spec.in_channels == channels else floor_images(
            shards, sweep.splits, spec.image_size, spec.in_channels, options.max_train_rows, options.seed,
            options.batch_size)
        random_table = apply_uncertain(random_encoder_latents(spec.architecture, spec.in_channels, spec.image_size,
                                                              model_images, seed=options.seed), sweep)
        random_note = f"the architecture of {folder}, seed {options.seed}"
    rows = floor_rows(pixel_table, random_table, tasks, sweep.search.kinds, options=head_options, c_grid=c_grid,
                      select_split=sweep.splits.val, split=sweep.splits.test, backend=sweep.trial_backend,
                      max_rows_quadratic=sweep.max_rows_quadratic)
    caption = (f"fitted on {train_rows} train images (floors.max_train_rows={options.max_train_rows}), raw pixels at "
               f"{pixel_size} px{' (resized)' if pixel_size != native else ''}, random encoder: {random_note}; "
               f"C chosen on {sweep.splits.val} over [{', '.join(f'{c:g}' for c in c_grid)}]")
    record = {"rows": rows, "caption": caption, "train_rows": train_rows, "max_train_rows": options.max_train_rows,
              "pixel_size": pixel_size, "random_encoder": str(folder) if folder else None, "c_grid": list(c_grid),
              "seconds": clock.wall()}
    write_json_atomic(out / "floors.json", record)
    return record


# ---------------------------------------------------------------------------------------------------------
# The job.
# ---------------------------------------------------------------------------------------------------------


def check_inputs(job: FindingsJob, sweep: SweepJob, baseline: BaselineJob | None) -> LatentsTable:
    """Everything a stage would refuse, before any work: the latents' splits and findings (and the quadratic
    solver's limit), the shards' splits and findings for the floors and the baseline. Returns the latents table."""
    latents = Path(job.latents)
    table, _ = numeric_labels(load_latents(latents))
    check_table(table, sweep, latents)
    manifest = read_manifest(job.shards)
    for split in dataclasses.astuple(sweep.splits):
        if split not in manifest["splits"]:
            raise LatentsError(f"{job.shards}/manifest.json: no split {split!r} (splits: {sorted(manifest['splits'])})"
                               "; prepare the shards with train/val/test splits")
    counted = manifest["splits"][sweep.splits.train]["label_counts"]
    missing = [task.name for task in job.tasks if task.column not in counted]
    if missing:
        raise LatentsError(f"{job.shards}/manifest.json: findings {missing} have no label column in the shards "
                           f"(columns: {sorted(counted)}); prepare them with --findings all, or drop the tasks")
    for task in baseline.tasks if baseline is not None else ():
        data_shape(Path(job.shards), baseline, task)
    return table


def _link_children(tracker: Tracker, child_run_ids: list[str | None]) -> None:
    """Nest the stages' runs under this job's run (MLflow's parent tag; both live in the same store)."""
    if not tracker.enabled:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracker.uri)
    for run_id in filter(None, child_run_ids):
        client.set_tag(run_id, "mlflow.parentRunId", tracker.run_id)


def run_findings(job: FindingsJob, out: str | Path | None = None, *, num_cpus: int | None = None,
                 address: str | None = None, skip_baseline: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Sweep, floors, baseline and comparison of ``job`` into ``out`` (default: the job's ``out_dir``); returns the
    summary (also ``<out>/summary.json``). Refused input leaves nothing behind."""
    out = refuse_existing(out or job.out_dir, overwrite, what="the findings output folder")
    track = job.track
    if track.enabled:  # every stage's runs in one store, so that they nest under this job's run
        track = dataclasses.replace(track, tracking_uri=resolve_tracking_uri(track, out))
    sweep = job.sweep_job(out / "sweep", track)
    baseline = None if skip_baseline else job.baseline_job(out / "baseline", track)
    table = check_inputs(job, sweep, baseline)
    address = address or job.ray_address or None
    if address:
        check_cluster_address(address)
    for stage in STAGES if overwrite else ():  # --overwrite: no stale file of an earlier run survives
        shutil.rmtree(out / stage, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    job_file = write_json_atomic(out / "job.json", job_to_dict(job))
    meta, table = table.meta, None  # checked; the sweep reads the file itself

    import ray

    started = init_ray(num_cpus, address)  # one Ray for every stage (each finds it running and leaves it so)
    try:
        clock, seconds = Stopwatch(), {}
        log.info("sweep: %d findings", len(job.tasks))
        swept = sweep_heads(job.latents, sweep, out / "sweep", num_cpus=num_cpus, address=address)
        seconds["sweep"] = clock.wall()
        log.info("floors")
        floors = run_floors(job, sweep, meta, out / "floors")
        seconds["floors"] = clock.wall() - sum(seconds.values())
        based = None
        if baseline is not None:
            log.info("baseline: %s for %d findings", baseline.model.name, len(job.tasks))
            based = run_baselines(job.shards, baseline, out / "baseline", num_cpus=num_cpus)
            seconds["baseline"] = clock.wall() - sum(seconds.values())
    finally:
        if started:
            ray.shutdown()
    index = write_comparison(swept["rows"], based["rows"] if based else [], out / "comparison",
                             title="Every finding: DAE + linear head vs DenseNet121, with floors",
                             floor_rows=floors["rows"], floors_caption=floors["caption"])
    order = [task.name for task in job.tasks]
    rows = sorted(with_floors([*swept["rows"], *(based["rows"] if based else [])], floors["rows"]),
                  key=lambda row: order.index(row["task"]))  # per finding: the DAE head, then the DenseNet
    tracker = Tracker(track, out, run_name=f"findings {Path(job.latents).name}", tags={"job": "findings"})
    try:
        tracker.log_params({"latents": job.latents, "shards": job.shards, "findings": [t.name for t in job.tasks],
                            "skip_baseline": skip_baseline, "floors": floors["caption"]})
        tracker.log_metrics({f"{row['task']}/{'dae' if row['method'].startswith('DAE') else 'densenet'}_{key}":
                             float(row[key]) for row in rows for key in ("auc", "floor_auc")
                             if math.isfinite(float(row[key]))})
        tracker.log_artifact(job_file)
        tracker.log_artifact(out / "floors" / "floors.json", "floors")
        tracker.log_artifacts(index.parent, "comparison")
        _link_children(tracker, [swept["parent_run_id"], based["parent_run_id"] if based else None])
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end()
    summary = {"job": "findings", "rows": rows, "comparison": str(index),
               "floors": {key: value for key, value in floors.items() if key != "rows"},
               "stages": {"sweep": swept["out"], "baseline": based["out"] if based else None}, "seconds": seconds,
               "parent_run_id": tracker.run_id, "child_run_ids": {
                   "sweep": swept["parent_run_id"], "baseline": based["parent_run_id"] if based else None}}
    write_json_atomic(out / "summary.json", summary)
    print(f"comparison: {index}")
    return summary


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="findings job file, e.g. jobs/findings_cxr.yaml")
    parser.add_argument("--out", default=None, help="output folder (default: the job file's out_dir)")
    parser.add_argument("--num-cpus", type=int, default=None, help="cores of a local Ray (default: all)")
    parser.add_argument("--address", default=None, help="host:port of a running Ray cluster's head (default: the "
                        "job's ray_address, else $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: the job file's, "
                        "$MLFLOW_TRACKING_URI, else a sqlite store in the output folder)")
    parser.add_argument("--skip-baseline", action="store_true", help="heads and floors only (no DenseNet121)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder's stages")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line: parse, load the job file, then :func:`run_findings`."""
    args = build_parser().parse_args(argv)
    job = job_from_args(args, FindingsJob)
    return run_findings(job, args.out, num_cpus=args.num_cpus, address=args.address,
                        skip_baseline=args.skip_baseline, overwrite=args.overwrite)


if __name__ == "__main__":
    sys.exit(run_main(main))
