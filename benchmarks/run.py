"""Run named benchmark suites, write a JSON record, and check it against a baseline.

    python benchmarks/run.py --suite all --small                       # CPU, CI-sized (minutes)
    python benchmarks/run.py --suite all --small --check benchmarks/baselines/cpu-small.json
    python benchmarks/run.py --suite train encode --reference ~/src/diffae   # GPU, full form, with DiffAE ratios
    python benchmarks/run.py --suite encode --model runs/dae-demo/final
    python benchmarks/run.py --compare benchmarks/results/all-X.json --check benchmarks/baselines/cpu-small.json

Suites: ``train`` (images/s, FLOPs, MFU, memory per size / precision / compile / layout; 1 vs 2 process trainer),
``encode`` (invert + decode images/s and reconstruction error per step count; batch sweep), ``heads`` (fit time
per head kind and backend), ``data`` (shard reader images/s vs workers) and ``quality`` (the phantom method end
to end: AUC, grading MAE / macro-F1, CE validity, CE-vs-truth error, reconstruction error), ``pneumonia`` (the
real-data job at a reduced budget); ``all`` runs each of these. ``transfer`` (the default recipe on sets that did
not choose it) runs only when named.
The record goes to ``benchmarks/results/<suite>-<timestamp>.json`` (``all`` when several suites ran); ``--track``
also logs it to MLflow; ``--check`` exits with status 1 when a metric is worse than the baseline by more than its
tolerance (see ``benchmarks/records.py`` and ``benchmarks/README.md``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable for ``benchmarks.*``
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# OpenMP threads that busy-wait between parallel regions starve each other and every other process on a shared
# CPU (small convolutions ran 40x slower at a load of 4 on 2 cores); waiting passively costs little on an idle
# machine. Set before torch loads its OpenMP runtime; the suites' subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from benchmarks.records import (  # noqa: E402
    REPO,
    SuiteResult,
    check_record,
    format_check,
    load_record,
    make_record,
    save_record,
)
from benchmarks.suites import SuiteContext  # noqa: E402

SUITE_NAMES = ("train", "encode", "heads", "data", "quality", "pneumonia")  # `all`: the nightly set
# On demand only (each set trains at the demo budget; no committed baseline yet): not part of `all`.
EXTRA_SUITES = ("transfer",)


def suite_functions() -> dict[str, Callable[[SuiteContext], SuiteResult]]:
    """Suite name -> function; imported on demand so ``--compare`` needs none of the suites' dependencies."""
    from benchmarks.encode_suite import encode_suite
    from benchmarks.pneumonia_suite import pneumonia_suite
    from benchmarks.quality_suite import quality_suite
    from benchmarks.suites import data_suite, heads_suite, train_suite
    from benchmarks.transfer_suite import transfer_suite

    return {"train": train_suite, "encode": encode_suite, "heads": heads_suite, "data": data_suite,
            "quality": quality_suite, "pneumonia": pneumonia_suite,
            "transfer": transfer_suite}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", nargs="+", choices=[*SUITE_NAMES, *EXTRA_SUITES, "all"], default=None,
                        help="suites to run (required unless --compare is given)")
    parser.add_argument("--small", action="store_true", help="the CPU, CI-sized form of each suite")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results", help="where records go")
    parser.add_argument("--work-dir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--check", type=Path, default=None, metavar="BASELINE.json",
                        help="exit with status 1 when a metric regressed beyond its tolerance")
    parser.add_argument("--compare", type=Path, default=None, metavar="RECORD.json",
                        help="check an existing record instead of running suites")
    parser.add_argument("--track", action="store_true", help="log the record to MLflow")
    parser.add_argument("--tracking-uri", default=None, help="MLflow URI (default: $MLFLOW_TRACKING_URI, else a "
                                                              "sqlite store in --out-dir)")
    parser.add_argument("--reference", type=Path, default=None, metavar="PATH",
                        help="local checkout of the official DiffAE code: time it beside ours (train, encode)")
    parser.add_argument("--model", type=Path, default=None, help="trained model folder for the encode suite")
    args = parser.parse_args(argv)
    if args.compare is None and not args.suite:
        parser.error("give --suite (or --compare RECORD.json with --check BASELINE.json)")
    if args.compare is not None and args.check is None:
        parser.error("--compare needs --check BASELINE.json")
    return args


def run_suites(names: list[str], ctx: SuiteContext, argv: list[str] | None = None) -> dict[str, Any]:
    """Run ``names`` in order and return the record (not yet written)."""
    functions = suite_functions()
    results: dict[str, SuiteResult] = {}
    started = time.perf_counter()
    for name in names:
        suite_started = time.perf_counter()
        print(f"=== suite {name} ({'small' if ctx.small else 'full'} form on {ctx.device}) ===", flush=True)
        suite_ctx = dataclasses.replace(ctx, work_dir=ctx.work_dir / name)
        suite_ctx.work_dir.mkdir(parents=True, exist_ok=True)
        results[name] = functions[name](suite_ctx)
        results[name].rows.append({"kind": "suite_wall_s", "seconds": round(time.perf_counter() - suite_started, 1)})
    extra = {"reference": str(ctx.reference) if ctx.reference else None, "model": str(ctx.model) if ctx.model else None}
    return make_record(results, small=ctx.small, wall_s=time.perf_counter() - started,
                       argv=["benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])], extra=extra)


def track_record(record: dict[str, Any], record_path: Path, tracking_uri: str | None, out_dir: Path) -> str | None:
    """Log one MLflow run: provenance as params, metric values as metrics, the record file as an artifact."""
    from harness.config import TrackConfig
    from harness.ops.tracking import Tracker

    label = "+".join(record["suites"])
    tracker = Tracker(TrackConfig(enabled=True, tracking_uri=tracking_uri, experiment="dae-cf-benchmarks",
                                  registered_model=None), out_dir, run_name=f"bench-{label}",
                      tags={"kind": "benchmark", "suites": label, "small": str(record["small"]),
                            "git_commit": str(record["git"]["commit"]), "gpu": str(record["machine"]["gpu"])})
    params = {f"machine.{k}": v for k, v in record["machine"].items()}
    params.update({f"versions.{k}": v for k, v in record["versions"].items()})
    params.update({"command": record["command"], "git.dirty": record["git"]["dirty"]})
    tracker.log_params(params)
    tracker.log_metrics({name: spec["value"] for name, spec in record["metrics"].items() if spec["value"] is not None})
    tracker.log_artifact(record_path, "benchmarks")
    tracker.end()
    return tracker.run_id


def check_against(record: dict[str, Any], baseline_path: Path) -> bool:
    """Print the check table; True when every metric is within tolerance."""
    baseline = load_record(baseline_path)
    rows = check_record(record, baseline)
    if not rows:
        print(f"check: {baseline_path} has no metrics of the suites {record['suites']}; nothing compared")
        return True
    base_gpu, gpu = baseline["machine"].get("gpu"), record["machine"].get("gpu")
    if base_gpu != gpu:
        print(f"note: baseline measured on {base_gpu or 'CPU only'}, this run on {gpu or 'CPU only'}: "
              "timings compare different machines")
    print(format_check(rows, baseline_path))
    return not any(row.failed for row in rows)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 a regression under --check)."""
    args = parse_args(argv)
    if args.compare is not None:
        return 0 if check_against(load_record(args.compare), args.check) else 1
    names = list(SUITE_NAMES) if "all" in args.suite else list(dict.fromkeys(args.suite))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with tempfile.TemporaryDirectory(prefix="dae-cf-bench-") as scratch:
        ctx = SuiteContext(small=args.small, device=device, work_dir=args.work_dir or Path(scratch),
                           reference=args.reference, model=args.model)
        record = run_suites(names, ctx, argv)
    path = save_record(record, args.out_dir)
    print(f"record: {path} ({record['wall_s']:.0f} s)")
    if args.track:
        run_id = track_record(record, path, args.tracking_uri, args.out_dir)
        print(f"mlflow run: {run_id}")
    if args.check is not None:
        return 0 if check_against(record, args.check) else 1
    return 0


if __name__ == "__main__":
    from harness.cli import run_main

    sys.exit(run_main(main))
