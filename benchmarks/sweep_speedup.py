"""Head-sweep wall time on a local Ray with 1 core vs all cores, and time per trial with scikit-learn vs cuML.

    python benchmarks/sweep_speedup.py                 # 12,000 x 512 latents, 90 trials (3 x 5 C x 2 x 3)
    python benchmarks/sweep_speedup.py --small         # 2,000 x 128 latents, 24 trials: a quick CPU run
    python benchmarks/sweep_speedup.py --cores 1 4 16  # any list of core counts
    python benchmarks/sweep_speedup.py --json out.json # also write the numbers as JSON

The latents are Gaussian with the grade (0-3) carried by one direction plus noise, so the heads face a real,
not separable, problem. Each measurement runs ``jobs/sweep_heads.py``'s ``tune_task`` (every trial of one graded
task, fitted on train and scored on val) on a fresh Ray started with that many cores, one core per trial;
the wall time therefore includes starting the trial processes, as a real sweep does. ``trial`` is the median
wall time inside a trial (fit + calibration + validation scoring), ``fit`` the median estimator fit alone.
cuML is measured when it is importable and a CUDA device is present (trials then take ``--gpu-share`` of a GPU).
``load`` is the machine's 1-minute load average before each run: other work on the cores skews the speed-up.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from harness.config import TrackConfig  # noqa: E402
from harness.job_support import Resources  # noqa: E402
from harness.method.heads import cuda_available  # noqa: E402
from harness.method.latents import LatentsTable  # noqa: E402
from harness.ops.sweep import FitRule, SearchSpace, SweepJob, SweepTask  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def synthetic_table(rows: int, dim: int, seed: int = 0) -> LatentsTable:
    """``rows`` latents split 70/15/15 into train/val/test, grades 0-3 (55 % grade 0) along one direction."""
    rng = np.random.default_rng(seed)
    grades = rng.choice(4, size=rows, p=[0.55, 0.15, 0.15, 0.15])
    direction = rng.normal(size=dim)
    direction /= np.linalg.norm(direction)
    z = rng.normal(size=(rows, dim)) + np.outer(grades + rng.normal(0, 0.8, rows), direction)  # (N, D)
    splits = rng.choice(["train", "val", "test"], size=rows, p=[0.7, 0.15, 0.15])
    return LatentsTable(ids=[f"r{i}" for i in range(rows)], splits=splits, z_sem=z.astype(np.float32),
                        labels={"grade": grades.astype(np.int64)}, meta={"dae": "synthetic"})


def sweep_job(small: bool, gpu_share: float = 0.0) -> SweepJob:
    """One graded task; kinds x C x fitting rules x calibrations (3 x 5 x 2 x 3, or 3 x 2 x 2 x 2 when small)."""
    task = SweepTask("fracture", "grade", (1, 2, 3), grade_range=(0, 3), select="macro_f1",
                     fit_rules=(FitRule((1, 2, 3)), FitRule((2, 3), (0,))))
    search = SearchSpace(kinds=("svm", "logistic", "linear"), C=(0.01, 1.0) if small else
                         (0.001, 0.01, 0.1, 1.0, 10.0), calibration=("lstsq", "poly2") if small else
                         ("extremes", "lstsq", "poly3"))
    return SweepJob(tasks=(task,), backend="cuml" if gpu_share else "sklearn", search=search,
                    resources=Resources(cpu=1, gpu=gpu_share), track=TrackConfig(enabled=False))


def measure(table: LatentsTable, job: SweepJob, cores: int, storage: Path) -> dict[str, Any]:
    """One sweep on a fresh local Ray with ``cores`` cores."""
    import ray

    from harness.ops.sweep_job import tune_task

    load = os.getloadavg()[0]  # other work on the machine skews a speed-up: record it
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    try:
        start = time.perf_counter()
        trials = tune_task(table, job.tasks[0], job, storage)
        wall = time.perf_counter() - start
    finally:
        ray.shutdown()
    ok = [t["metrics"] for t in trials if t["metrics"].get("ok")]
    if not ok:
        raise RuntimeError(f"every trial failed, e.g. {trials[0]['metrics'].get('error')}")
    return {"cores": cores, "backend": job.trial_backend, "trials": len(trials), "failed": len(trials) - len(ok),
            "wall_s": wall, "trial_s": statistics.median(m["wall_s"] for m in ok),
            "fit_s": statistics.median(m["fit_seconds"] for m in ok),
            "best_val_macro_f1": max(m.get("val_grade_macro_f1", float("nan")) for m in ok), "load_1min": load}


def machine() -> dict[str, Any]:
    """CPU model and count, and the GPU when torch sees one."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "python": platform.python_version()}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=12_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--small", action="store_true", help="2,000 x 128 latents and a 24-trial grid")
    parser.add_argument("--cores", type=int, nargs="+", default=None, help="core counts (default: 1 and all)")
    parser.add_argument("--gpu-share", type=float, default=0.25, help="GPU share of a cuML trial")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    rows, dim = (2_000, 128) if args.small else (args.rows, args.dim)
    cores = args.cores or sorted({1, os.cpu_count() or 1})
    table = synthetic_table(rows, dim)
    info = machine()
    print(f"machine: {info['cpu']} ({info['cores']} cores), GPU: {info['gpu'] or 'none'}; latents {rows} x {dim}")
    print(f"command: python benchmarks/sweep_speedup.py {' '.join(argv if argv is not None else sys.argv[1:])}")

    results = []
    with tempfile.TemporaryDirectory() as storage:
        for count in cores:
            results.append(measure(table, sweep_job(args.small), count, Path(storage) / f"cpu{count}"))
        has_cuml = importlib.util.find_spec("cuml") is not None
        if has_cuml and cuda_available():
            results.append(measure(table, sweep_job(args.small, args.gpu_share), max(cores),
                                   Path(storage) / "cuml"))
        else:
            reason = "cuML is not installed" if not has_cuml else "no CUDA device"
            print(f"cuML: not measured ({reason})")
    base = next((r["wall_s"] for r in results if r["cores"] == 1 and r["backend"] == "sklearn"), None)
    print(f"{'backend':<8} {'cores':>5} {'trials':>6} {'wall s':>8} {'speed-up':>8} {'trial ms':>9} {'fit ms':>8} "
          f"{'load':>5}")
    for r in results:
        r["speedup_vs_1_core"] = base / r["wall_s"] if base else None
        speedup = f"{r['speedup_vs_1_core']:.2f}x" if base else "n/a"
        print(f"{r['backend']:<8} {r['cores']:>5} {r['trials']:>6} {r['wall_s']:>8.2f} {speedup:>8} "
              f"{1000 * r['trial_s']:>9.1f} {1000 * r['fit_s']:>8.1f} {r['load_1min']:>5.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "rows": rows, "dim": dim, "results": results},
                                              indent=2))
    return results


if __name__ == "__main__":
    from harness.cli import run_main

    sys.exit(run_main(main))
