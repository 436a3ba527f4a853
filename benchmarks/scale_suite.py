"""The cost of scale: every stage of the chest X-ray flow timed at growing corpus sizes, and which stage is the wall.

    python benchmarks/scale_suite.py --sizes 10000 40000 166000       # the measurement (hours of CPU at 166k)
    python benchmarks/scale_suite.py --sizes 200 400 --small          # the same path in a minute (the test)

For each size N the commands a user runs, timed end to end on this machine:

``generate``  ``python -m harness.data.cxr_phantoms`` (MIMIC-CXR-JPG tree of N chest X-ray phantoms, 2 workers)
``prepare``   ``python -m harness.data.prepare mimic-cxr`` (frontal views, uncertain labels ignored, 2 workers);
              also the shards' bytes per image
``train``     ``launch/two_machines_local.sh``: two Accelerate machines over the N-image shards, a fixed number of
              samples (a step costs the same at any N; what grows is start-up and the stream's shard list)
``encode``    ``harness.encode`` as two processes: z_sem of every prepared image (no x_T)
``heads``     the closed-form ridge screen (every finding x 20 penalties) and one logistic-regression fit per
              finding on the train latents
``baseline``  DenseNet121 training images/s on this machine, measured on 512 images and projected to one epoch of N
              (labelled as a projection: an epoch at 166k is hours on a CPU)

Each stage's growth exponent k (seconds ~ N^k, least squares on log-log over the sizes) and the wall (the
slowest stage at the largest N) go in the record's notes; the record is a benchmark record (benchmarks/records.py)
written to ``--out`` (default benchmarks/results/). The projection of training time on H100s (one epoch of N and
the paper's 12M samples on 1 x 8 and 2 x 8 GPUs) uses the measured GFLOP per image of ``paper-64`` and an MFU
read from a GPU record when one is given (``--gpu-record``), else the assumption ``--assumed-mfu`` (said so).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

from benchmarks.records import TIMING, Metric, SuiteResult, write_record  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
H100_BF16_DENSE_TFLOPS = 989.0  # NVIDIA H100 SXM, dense bf16 tensor-core peak
PAPER_SAMPLES = 12_000_000
STAGES = ("generate", "prepare", "train", "encode", "heads", "baseline")


def _timed(command: list[str], log: Path, env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    with open(log, "w") as handle:
        done = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-20:])
        raise RuntimeError(f"{' '.join(command[:5])} ... failed (exit {done.returncode}):\n{tail}")
    return seconds


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def measure_size(n: int, work: Path, small: bool, image_size: int) -> dict[str, Any]:
    """Every stage at corpus size ``n``; returns {stage: {"seconds": ..., ...}}."""
    py = sys.executable
    root, shards, run_dir = work / f"cxr-{n}", work / f"shards-{n}", work / f"dae-{n}"
    logs = work / f"logs-{n}"
    logs.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {}

    render_size = 64 if small else 128
    seconds = _timed([py, "-m", "harness.data.cxr_phantoms", str(root), "--images", str(n), "--size",
                      str(render_size), "--workers", "2", "--no-progress"], logs / "generate.log")
    out["generate"] = {"seconds": seconds, "images_per_s": n / seconds, "bytes_per_image": _folder_bytes(root) / n}

    seconds = _timed([py, "-m", "harness.data.prepare", "mimic-cxr", str(root),
                      "--metadata", str(root / "mimic-cxr-2.0.0-metadata.csv.gz"),
                      "--labels", str(root / "mimic-cxr-2.0.0-chexpert.csv.gz"),
                      "--split", str(root / "mimic-cxr-2.0.0-split.csv.gz"),
                      "--severity", str(root / "mimic-cxr-edema-severity.csv.gz"),
                      "--views", "PA", "AP", "--size", str(image_size), "--fit", "resize", "--uncertain", "ignore",
                      "--workers", "2", "--items-per-shard", str(max(16, min(1024, n // 16))),  # >= 8 shards a rank
                      "--out", str(shards), "--no-progress"], logs / "prepare.log")
    manifest = json.loads((shards / "manifest.json").read_text())
    prepared = sum(split["count"] for split in manifest["splits"].values())
    out["prepare"] = {"seconds": seconds, "images_per_s": prepared / seconds, "images": prepared,
                      "bytes_per_image": _folder_bytes(shards) / prepared}

    samples = 128 if small else 4096
    train_args = ["--data.source=shards", f"--data.shard_dir={shards}", f"--train.out_dir={run_dir}",
                  f"--data.image_size={image_size}", "--model.size=nano-32", f"--train.total_samples={samples}",
                  "--train.batch_size=32", f"--train.log_every={samples // 2}", f"--train.checkpoint_every={samples}",
                  f"--train.preview_every={10 * samples}", "--train.preview_images=2", "--train.probe_images=0",
                  "--diffusion.invert_steps=2", "--diffusion.decode_steps=2", "--eval.batch_size=4",
                  "--track.enabled=false", "--overwrite"]
    seconds = _timed(["bash", str(REPO / "launch" / "two_machines_local.sh"), "--logs", str(logs / "train"), "--",
                      *train_args], logs / "train.log", env={"PYTHON": py})
    summary = json.loads((run_dir / "final" / "model.json").read_text())
    out["train"] = {"seconds": seconds, "samples": samples, "images_per_s": summary["images_per_s"]}

    latents = work / f"latents-{n}.parquet"
    port = str(29700 + n % 200)
    seconds = _timed([py, "-m", "accelerate.commands.launch", "--config_file",
                      str(REPO / "launch" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port", port,
                      "-m", "harness.encode", "--model", str(run_dir / "final"), "--shards", str(shards),
                      "--splits", "train", "val", "test", "--out", str(latents), "--batch-size", "256"],
                     logs / "encode.log", env={"OMP_NUM_THREADS": "1"})
    out["encode"] = {"seconds": seconds, "images_per_s": prepared / seconds}

    out["heads"] = _heads(latents)
    out["baseline"] = _baseline_rate(shards, n, small, image_size)
    return out


def _heads(latents: Path) -> dict[str, Any]:
    from sklearn.linear_model import LogisticRegression

    from harness.method.latents import load_latents
    from harness.method.ridge_screen import ridge_all

    table = load_latents(latents)
    train = table.splits == "train"
    z = table.z_sem[train]
    findings = {name: np.where(values[train] < 0, np.nan, values[train]).astype(np.float64)
                for name, values in table.labels.items()
                if np.issubdtype(np.asarray(values).dtype, np.number) and name != "edema_severity"}
    findings = {name: y for name, y in findings.items()
                if len(np.unique(y[np.isfinite(y)])) == 2}  # binary findings with both classes present
    start = time.perf_counter()
    ridge_all(z, findings, np.logspace(-2, 5, 20))
    screen_s = time.perf_counter() - start
    start = time.perf_counter()
    for y in findings.values():
        rows = np.isfinite(y)
        LogisticRegression(max_iter=200).fit(z[rows], y[rows].astype(int))
    logistic_s = time.perf_counter() - start
    return {"seconds": screen_s + logistic_s, "screen_s": screen_s, "logistic_s": logistic_s,
            "findings": len(findings), "train_rows": int(train.sum())}


def _baseline_rate(shards: Path, n: int, small: bool, image_size: int) -> dict[str, Any]:
    """DenseNet121 training images/s on the first shard's images; one epoch of ``n`` projected from it."""
    import torch
    from monai.networks.nets import DenseNet121

    from harness.data.loaders import eval_loader

    count = 32 if small else 512
    batch = next(iter(eval_loader(shards, count, split="train", image_size=image_size, channels=1)))
    x = batch["image"]  # (B, 1, H, W)
    model = DenseNet121(spatial_dims=2, in_channels=1, out_channels=14)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    target = torch.zeros(len(x), 14)
    start = time.perf_counter()
    for chunk in range(0, len(x), 32):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x[chunk:chunk + 32]),
                                                                    target[chunk:chunk + 32])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    rate = len(x) / (time.perf_counter() - start)
    return {"seconds": n / rate, "images_per_s": rate, "projected": True}


def growth_exponent(sizes: list[int], seconds: list[float]) -> float:
    """k in seconds ~ a N^k: the least-squares slope of log(seconds) on log(N)."""
    if len(sizes) < 2:
        return float("nan")
    return float(np.polyfit(np.log(sizes), np.log(np.maximum(seconds, 1e-9)), 1)[0])


def projection(gflop_per_image: float, mfu: float, images: int) -> list[dict[str, Any]]:
    """Projected training time on H100s of one epoch of ``images`` and of the paper's 12M samples."""
    rows = []
    for nodes, gpus in ((1, 8), (2, 16)):
        rate = gpus * mfu * H100_BF16_DENSE_TFLOPS * 1e12 / (gflop_per_image * 1e9)  # images/s, linear scaling
        rows.append({"gpus": f"{nodes} x 8 H100", "images_per_s": rate, "epoch_s": images / rate,
                     "paper_12M_h": PAPER_SAMPLES / rate / 3600})
    return rows


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 40_000, 166_000])
    parser.add_argument("--small", action="store_true", help="tiny training and baseline budgets (the test)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--gpu-record", type=Path, default=None, help="a gpu_run record: its paper-64 bf16 MFU")
    parser.add_argument("--assumed-mfu", type=float, default=0.3)
    args = parser.parse_args(argv)
    if any(n < 50 for n in args.sizes) or not 0 < args.assumed_mfu <= 1:
        raise SystemExit("error: --sizes must be >= 50 images and --assumed-mfu in (0, 1]")
    work = args.work or Path(tempfile.mkdtemp(prefix="dae-cf-scale-"))
    started = time.perf_counter()
    result = SuiteResult()
    load_before = os.getloadavg()
    per_size: dict[int, dict[str, Any]] = {}
    try:
        for n in sorted(args.sizes):
            per_size[n] = measure_size(n, work, args.small, args.image_size)
            for stage, row in per_size[n].items():
                result.rows.append({"images": n, "stage": stage, **row})
                result.metrics[f"scale/{n}/{stage}/seconds"] = Metric(row["seconds"], "s", False, **TIMING)
                print(f"[scale] {n:>7} images  {stage:<9} {row['seconds']:9.1f} s", flush=True)
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    # Timings on a shared machine are pessimistic: the record says how loaded it was.
    result.notes.append(f"load average (1, 5, 15 min) at start {load_before}, at end {os.getloadavg()}, "
                        f"{os.cpu_count()} cores")
    sizes = sorted(per_size)
    for stage in STAGES:
        k = growth_exponent(sizes, [per_size[n][stage]["seconds"] for n in sizes])
        result.metrics[f"scale/{stage}/growth_exponent"] = Metric(k, "seconds ~ N^k", False, tolerance=None)
        result.notes.append(f"{stage}: seconds grow as N^{k:.2f}")
    largest = per_size[sizes[-1]]
    wall = max(STAGES, key=lambda stage: largest[stage]["seconds"])
    result.notes.append(f"the wall at {sizes[-1]} images: {wall} ({largest[wall]['seconds']:.0f} s"
                        + (", projected" if largest[wall].get("projected") else "") + ")")

    from harness.models import build_dae
    from harness.models.flops import training_flops_per_image

    model = build_dae("paper-64", in_channels=1)
    gflop = training_flops_per_image(model, model.spec.image_size, 1) / 1e9
    mfu, source = args.assumed_mfu, f"assumed MFU {args.assumed_mfu:.2f} (no GPU record given)"
    if args.gpu_record:
        record = json.loads(args.gpu_record.read_text())
        measured = record["metrics"].get("gpu_run/train/paper-64/bf16/mfu")
        if measured and measured.get("value"):
            mfu, source = float(measured["value"]), f"MFU {measured['value']:.2f} measured in {args.gpu_record.name}"
    for row in projection(gflop, mfu, sizes[-1]):
        result.rows.append({"stage": "projection", "model": "paper-64", "gflop_per_image": gflop, "mfu": mfu,
                            "mfu_source": source, **row})
    result.notes.append(f"projection (not a measurement): paper-64 at {gflop:.1f} GFLOP per training image, {source}, "
                        "linear scaling over GPUs")
    return write_record("scale", result, small=args.small, wall_s=time.perf_counter() - started, argv=argv,
                        out_dir=args.out)


if __name__ == "__main__":
    main()
