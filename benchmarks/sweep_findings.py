"""The head sweep over every finding of a chest X-ray corpus on a Ray cluster: wall time, trials, per-trial times
and trials per node, at one or more table sizes.

    launch/ray/two_nodes_local.sh start
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=/tmp/dae-cf-ray-6390/auth_token
    python benchmarks/sweep_findings.py --address 127.0.0.1:6390 --rows 10000 40000
    python benchmarks/sweep_findings.py --latents runs/eval-cxr/latents.parquet --address 127.0.0.1:6390

The job is ``jobs/sweep_cxr.yaml`` (14 findings x 20 configurations, uncertain labels ignored). Without
``--latents`` the table is generated with the shape of the corpus's latents (512-d z_sem, 70/15/15 splits) and
the 14 findings as label columns (1 / 0, 8 % uncertain -1, 5 % missing), each carried by its own latent
direction, so the heads face a real, not separable, problem. The record (benchmarks/records.py format) goes
to ``benchmarks/results/sweep_findings-<time>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks.records import TIMING, Metric, SuiteResult, make_record, save_record  # noqa: E402
from harness.config import TrackConfig, load_yaml  # noqa: E402
from harness.data.prepare.mimic_cxr import ALL_FINDINGS  # noqa: E402
from harness.method.latents import LatentsTable, save_latents  # noqa: E402
from harness.ops.sweep import SweepJob  # noqa: E402
from harness.ops.sweep_job import sweep_heads  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def findings_table(rows: int, dim: int = 512, seed: int = 0) -> LatentsTable:
    """Generated latents with the 14 CheXpert findings as label columns (see the module docstring)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(rows, dim)).astype(np.float32)  # (N, D)
    labels = {}
    for name in ALL_FINDINGS:
        direction = rng.normal(size=dim).astype(np.float32)
        direction /= np.linalg.norm(direction)
        truth = rng.random(rows) < rng.uniform(0.05, 0.4)
        z += np.outer(0.9 * truth, direction).astype(np.float32)
        values = truth.astype(np.float64)
        values[rng.random(rows) < 0.08] = -1.0
        values[rng.random(rows) < 0.05] = np.nan
        labels[name] = values
    splits = rng.choice(["train", "val", "test"], size=rows, p=[0.7, 0.15, 0.15])
    return LatentsTable(ids=[f"r{i}" for i in range(rows)], splits=splits, z_sem=z, labels=labels,
                        meta={"dae": "generated"})


def measure(latents: Path, job: SweepJob, address: str | None, out: Path) -> dict[str, Any]:
    """One sweep; returns the wall time, trials and per-trial times."""
    start = time.perf_counter()
    result = sweep_heads(latents, job, out, num_cpus=2, address=address)
    wall = time.perf_counter() - start
    trials = [row for summary in result["tasks"].values() for row in summary["trials"]]
    trial_s = [float(row.get("wall_s", 0.0)) for row in trials if row.get("ok")]
    return {"wall_s": wall, "trials": len(trials), "failed": sum(1 for row in trials if not row.get("ok")),
            "findings": len(result["tasks"]), "trial_median_s": statistics.median(trial_s),
            "trial_max_s": max(trial_s), "trial_sum_s": sum(trial_s),
            "trial_times": [{"task": name, "kind": row["kind"], "C": row["C"], "class_weight": row["class_weight"],
                             "wall_s": row.get("wall_s"), "node": row.get("node_resources"),
                             "retries": row.get("retries")}
                            for name, summary in result["tasks"].items() for row in summary["trials"]],
            "trials_per_node": {v["resources"] or k: v["trials"] for k, v in result["trials_per_node"].items()},
            "test_auc": {row["task"]: row["auc"] for row in result["rows"]}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000], help="sizes of the generated tables")
    parser.add_argument("--latents", type=Path, default=None, help="a latents table with the findings instead")
    parser.add_argument("--config", type=Path, default=ROOT / "jobs" / "sweep_cxr.yaml")
    parser.add_argument("--address", default=None, help="the cluster's head (default: a local Ray of 2 cores)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    job = load_yaml(args.config, SweepJob, what="job file")
    started = time.perf_counter()
    result = SuiteResult()
    with tempfile.TemporaryDirectory(prefix="sweep-findings-") as tmp:
        job = dataclasses.replace(job, track=TrackConfig(tracking_uri=f"sqlite:///{tmp}/mlflow.db",
                                                         experiment="sweep-findings", registered_model=None))
        sizes = [("given", args.latents)] if args.latents else [(rows, None) for rows in args.rows]
        for rows, path in sizes:
            if path is None:
                path = save_latents(findings_table(rows), Path(tmp) / f"latents-{rows}.parquet")
            row = {"rows": rows, **measure(path, job, args.address, Path(tmp) / f"out-{rows}")}
            result.rows.append(row)
            key = f"sweep_findings/{rows}"
            result.metrics[f"{key}/wall_s"] = Metric(row["wall_s"], "s", higher_is_better=False, **TIMING)
            result.metrics[f"{key}/trial_median_s"] = Metric(row["trial_median_s"], "s", higher_is_better=False,
                                                             **TIMING)
            result.metrics[f"{key}/trials"] = Metric(row["trials"], "", tolerance=None)
            print(f"rows {rows}: {row['trials']} trials ({row['findings']} findings, {row['failed']} failed) in "
                  f"{row['wall_s']:.1f} s wall; trial median {row['trial_median_s']:.2f} s, max "
                  f"{row['trial_max_s']:.2f} s, sum {row['trial_sum_s']:.1f} s; per node {row['trials_per_node']}",
                  flush=True)
    result.notes.append(f"cluster: {args.address or 'local Ray, 2 cores'}; job {args.config.name}")
    record = make_record({"sweep_findings": result}, small=False, wall_s=time.perf_counter() - started, argv=argv)
    path = save_record(record, args.out)
    print(f"record: {path}")
    return record


if __name__ == "__main__":
    from harness.cli import run_main

    sys.exit(run_main(main))
