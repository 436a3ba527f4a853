"""Benchmark records: metrics with a declared direction and tolerance, the run's provenance, and the check.

A record is one JSON file::

    {"format_version": 1, "suites": ["train", ...], "small": true, "created": "...", "wall_s": 512.3,
     "command": "python benchmarks/run.py --suite all --small", "git": {"commit": "...", "dirty": false},
     "machine": {"cpu": "...", "cpu_count": 2, "torch_threads": 2, "gpu": null, ...},
     "versions": {"python": "3.11.9", "torch": "...", ...},
     "metrics": {"train/tiny-32/fp32/images_per_s": {"value": 19.0, "unit": "images/s",
                 "higher_is_better": true, "tolerance": 0.5, "abs_tolerance": 0.0, "required": true}, ...},
     "rows": {"train": [...raw measurements...], ...}, "notes": {"heads": ["..."]}}

Checking a record against a baseline compares each baseline metric of the suites that ran: a metric fails
when it is worse than the baseline by more than ``max(tolerance * |baseline|, abs_tolerance)`` in its declared
direction, when it is missing (unless the baseline marks it ``required: false``) or when it is not a finite
number. A metric with ``tolerance: null`` is recorded for reading only. Direction and tolerances come from the
baseline, so loosening one is a reviewed change of the committed baseline file.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
REPO = Path(__file__).resolve().parents[1]

# Tolerance classes: timings vary with load and machine, counts are exact, quality moves with numerics only.
TIMING = dict(tolerance=0.5)  # images/s, MFU, seconds: a slowdown beyond 50 % is a regression
EXACT = dict(tolerance=0.01)  # FLOP counts, parameter counts: any change is a change of the model
MEMORY = dict(tolerance=0.25)


@dataclass(frozen=True)
class Metric:
    """One measured number and how to judge it against a baseline.

    ``tolerance`` is relative to the baseline value (0.5 = 50 %); ``abs_tolerance`` is a floor for values near
    zero; ``tolerance=None`` records the number without checking it; ``required=False`` lets the check pass when
    a later run does not produce it (e.g. a reference ratio measured only when a checkout is given).
    """

    value: float
    unit: str = ""
    higher_is_better: bool = True
    tolerance: float | None = 0.5
    abs_tolerance: float = 0.0
    required: bool = True

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["value"] = _json_number(self.value)
        return out


@dataclass
class SuiteResult:
    """What a suite returns: named metrics, the raw rows behind them and free-text notes (what was skipped)."""

    metrics: dict[str, Metric] = dataclasses.field(default_factory=dict)
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)


def _json_number(value: Any) -> float | None:
    """NaN and infinities are not JSON: store them as null (the check then reports them as not finite)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


# --- Provenance -----------------------------------------------------------------------------------------------


def git_state(repo: Path = REPO) -> dict[str, Any]:
    """Commit and whether the working tree differs from it (None when not in a git checkout)."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def machine_info() -> dict[str, Any]:
    """CPU model and counts, memory, and the GPU (name, count, CUDA version) when there is one."""
    import torch

    cpu = platform.processor() or platform.machine()
    memory_gb = None
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), cpu)
        meminfo = Path("/proc/meminfo").read_text().split()
        memory_gb = round(int(meminfo[meminfo.index("MemTotal:") + 1]) / 2**20, 1)
    except (OSError, ValueError):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"hostname": platform.node(), "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "load_average_1min": round(os.getloadavg()[0], 2), "memory_gb": memory_gb, "gpu": gpu,
            "gpu_count": torch.cuda.device_count() if gpu else 0, "cuda": torch.version.cuda if gpu else None}


def package_versions() -> dict[str, str | None]:
    """Versions of Python and of the packages whose speed or numerics the benchmarks depend on."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("dae-cf", "torch", "numpy", "scikit-learn", "webdataset", "accelerate", "safetensors", "mlflow",
                 "ray", "cuml-cu12"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def make_record(results: dict[str, SuiteResult], *, small: bool, wall_s: float, argv: list[str] | None = None,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Assemble the JSON record of one run of ``results`` (suite name -> SuiteResult)."""
    command = " ".join(shlex.quote(part) for part in [Path(sys.executable).name, *(argv or sys.argv)])
    metrics = {name: metric.to_dict() for result in results.values() for name, metric in result.metrics.items()}
    return {"format_version": FORMAT_VERSION, "suites": sorted(results), "small": small,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "wall_s": round(wall_s, 1),
            "command": command, "git": git_state(), "machine": machine_info(), "versions": package_versions(),
            "metrics": metrics, "rows": {suite: result.rows for suite, result in results.items()},
            "notes": {suite: result.notes for suite, result in results.items() if result.notes}, **(extra or {})}


def save_record(record: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``<out_dir>/<suite>-<timestamp>.json`` atomically; ``suite`` is ``all`` for several suites."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    label = record["suites"][0] if len(record["suites"]) == 1 else "all"
    stamp = record["created"].replace(":", "").replace("-", "").replace("+0000", "Z")
    path = out_dir / f"{label}-{stamp}.json"
    index = 1
    while path.exists():  # two runs within one second
        path = out_dir / f"{label}-{stamp}-{index}.json"
        index += 1
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=False, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


def write_record(suite: str, result: SuiteResult, *, small: bool, wall_s: float, argv: list[str] | None,
                 out_dir: str | Path) -> Path:
    """The record of one suite's ``result``, saved under ``out_dir``; its path and notes are printed."""
    path = save_record(make_record({suite: result}, small=small, wall_s=wall_s, argv=argv), out_dir)
    print(f"record: {path}" + "".join(f"\nnote: {note}" for note in result.notes), flush=True)
    return path


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy and torch scalars
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def load_record(path: str | Path) -> dict[str, Any]:
    """Read a record or baseline; a clear error when it is not one."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"benchmark record not found: {path}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(record, dict) or record.get("format_version") != FORMAT_VERSION or "metrics" not in record:
        raise ValueError(f"{path}: not a benchmark record (format_version {FORMAT_VERSION} with 'metrics' expected)")
    return record


# --- Regression check -----------------------------------------------------------------------------------------


@dataclass
class CheckRow:
    name: str
    baseline: float | None
    current: float | None
    allowed: float | None  # the worst value still accepted
    status: str  # "ok" | "better" | "worse" | "missing" | "not finite" | "info" | "optional missing"

    @property
    def failed(self) -> bool:
        return self.status in ("worse", "missing", "not finite")


def _suite_of(metric_name: str) -> str:
    return metric_name.split("/", 1)[0]


def check_record(record: dict[str, Any], baseline: dict[str, Any]) -> list[CheckRow]:
    """Compare every baseline metric of the suites ``record`` ran; see the module docstring for the rules."""
    suites = set(record["suites"])
    rows = []
    for name, spec in sorted(baseline["metrics"].items()):
        if _suite_of(name) not in suites:
            continue
        base = spec.get("value")
        entry = record["metrics"].get(name)
        current = entry.get("value") if entry else None
        tolerance = spec.get("tolerance")
        if entry is None:
            rows.append(CheckRow(name, base, None, None, "missing" if spec.get("required", True) else
                                 "optional missing"))
            continue
        if tolerance is None or base is None:
            rows.append(CheckRow(name, base, current, None, "info"))
            continue
        if current is None or not math.isfinite(current):
            rows.append(CheckRow(name, base, current, None, "not finite"))
            continue
        slack = max(tolerance * abs(base), spec.get("abs_tolerance", 0.0))
        higher = spec.get("higher_is_better", True)
        allowed = base - slack if higher else base + slack
        worse = current < allowed if higher else current > allowed
        better = current > base if higher else current < base
        rows.append(CheckRow(name, base, current, allowed, "worse" if worse else "better" if better else "ok"))
    return rows


def format_check(rows: list[CheckRow], baseline_path: str | Path = "baseline") -> str:
    """A plain-text table of the check, failures first, with a one-line verdict."""

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.4g}"

    ordered = sorted(rows, key=lambda r: (not r.failed, r.name))
    width = max([len(r.name) for r in rows] + [6])
    lines = [f"{'metric':<{width}}  {'baseline':>10}  {'current':>10}  {'change':>8}  {'limit':>10}  status"]
    for r in ordered:
        change = "-"
        if r.baseline not in (None, 0) and r.current is not None:
            change = f"{100 * (r.current - r.baseline) / abs(r.baseline):+.1f}%"
        lines.append(f"{r.name:<{width}}  {fmt(r.baseline):>10}  {fmt(r.current):>10}  {change:>8}  "
                     f"{fmt(r.allowed):>10}  {r.status.upper() if r.failed else r.status}")
    failed = [r for r in rows if r.failed]
    verdict = (f"FAILED: {len(failed)} of {len(rows)} metrics regressed or missing against {baseline_path}"
               if failed else f"passed: {len(rows)} metrics within tolerance of {baseline_path}")
    return "\n".join([*lines, verdict])
