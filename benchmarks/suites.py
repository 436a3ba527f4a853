"""The ``train``, ``heads`` and ``data`` suites, built on the single-purpose benchmark modules beside this file.

Each suite is a function ``(SuiteContext) -> SuiteResult`` and has two forms: ``small`` (a 2-core CPU, minutes,
what CI runs nightly) and full (a GPU machine). Metric names are ``<suite>/<configuration>/<quantity>``.
The ``encode`` and ``quality`` suites live in ``encode_suite.py`` and ``quality_suite.py``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import data_throughput, heads_fit, train_throughput
from benchmarks.records import EXACT, MEMORY, REPO, TIMING, Metric, SuiteResult


@dataclass(frozen=True)
class SuiteContext:
    """What every suite is handed: its form, the device, a scratch folder and the optional external inputs."""

    small: bool
    device: torch.device
    work_dir: Path
    reference: Path | None = None  # a local checkout of the official DiffAE code (train and encode suites)
    model: Path | None = None  # a trained model folder for the encode suite (default: train a tiny one)


# --- train ----------------------------------------------------------------------------------------------------


def _train_configs(small: bool, device: torch.device) -> list[dict]:
    """(size, precision, batch, compile, channels_last) combinations of the train suite."""
    if small:
        return [dict(size="tiny-32", precision=p, batch=16, compile=False, channels_last=False)
                for p in ("fp32", "bf16")]
    batches = {"tiny-32": 128, "paper-96": 64}
    configs = [dict(size=s, precision=p, batch=batches[s], compile=False, channels_last=False)
               for s in batches for p in ("fp32", "bf16", "fp16")]
    # Layout and compilation matter most in the precision one trains with: bf16.
    configs += [dict(size=s, precision="bf16", batch=batches[s], compile=c, channels_last=cl)
                for s in batches for c, cl in ((False, True), (True, False), (True, True))]
    if device.type != "cuda":  # fp16 autocast on a CPU measures nothing anyone trains with
        configs = [c for c in configs if c["precision"] != "fp16"]
    return configs


def _config_name(config: dict) -> str:
    variant = "+".join(name for name, on in (("compile", config["compile"]), ("channels_last", config["channels_last"]))
                       if on) or "eager"
    return f"{config['size']}/{config['precision']}/{variant}"


def ddp_images_per_s(processes: int, work_dir: Path, device: torch.device, total_samples: int,
                     batch_size: int) -> dict:
    """Throughput of the real trainer (``harness/train_dae.py``) with 1 or 2 processes, data loading included.

    Runs tiny-32 on phantom shards in a subprocess (through ``accelerate launch`` for 2 processes) and reads the
    rate of the last logging window from the exported ``model.json``, so start-up is not counted.
    """
    from harness.data.shards import write_phantom_shards

    shards = write_phantom_shards(work_dir / "ddp-phantoms", size=32, n_train=256, n_val=16, n_test=16, seed=0,
                                  samples_per_shard=32)
    out_dir = work_dir / f"ddp-{processes}proc"
    settings = {"data.source": "shards", "data.shard_dir": shards, "train.out_dir": out_dir,
                "train.total_samples": total_samples, "train.batch_size": batch_size,
                "train.log_every": total_samples // 2, "train.checkpoint_every": 10 * total_samples,
                "train.preview_every": 10 * total_samples, "train.preview_images": 2, "eval.batch_size": 2,
                "diffusion.invert_steps": 2, "diffusion.decode_steps": 2, "track.enabled": "false"}
    args = [f"--{key}={value}" for key, value in settings.items()]
    script = str(REPO / "harness" / "train_dae.py")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if device.type == "cpu":  # one process per core share: no oversubscription
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    if processes == 1:
        command = [sys.executable, script, *args]
    else:
        port = str(29600 + random.Random(os.getpid()).randrange(800))
        where = (["--multi_gpu"] if device.type == "cuda" else
                 ["--config_file", str(REPO / "launch" / "accelerate" / "cpu_2proc.yaml")])
        command = [sys.executable, "-m", "accelerate.commands.launch", *where, "--num_processes", str(processes),
                   "--main_process_port", port, script, *args]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{processes}-process training failed (exit {done.returncode}):\n{done.stdout[-3000:]}"
                           f"\n{done.stderr[-3000:]}")
    summary = json.loads((out_dir / "final" / "model.json").read_text())
    return {"processes": processes, "batch": batch_size, "samples": total_samples,
            "images_per_s": summary["images_per_s"]}


def train_suite(ctx: SuiteContext) -> SuiteResult:
    """Training step throughput, FLOPs, MFU and peak memory per configuration; 1 vs 2 process DDP; reference."""
    result = SuiteResult()
    steps, warmup = (5, 2) if ctx.small else (20, 5)
    cuda = ctx.device.type == "cuda"
    for config in _train_configs(ctx.small, ctx.device):
        row = train_throughput.bench_one(config["size"], config["precision"], config["batch"], steps, warmup,
                                         ctx.device, config["compile"], config["channels_last"], None)
        result.rows.append(row)
        name = f"train/{_config_name(config)}"
        result.metrics[f"{name}/images_per_s"] = Metric(row["images_per_s"], "images/s", **TIMING)
        result.metrics[f"{name}/mfu"] = Metric(row["mfu"], "fraction of peak", **TIMING)
        result.metrics[f"{name}/gflop_per_image"] = Metric(row["gflop_per_image"], "GFLOP", False, **EXACT)
        # On a CPU the figure is the process's lifetime high-water mark, which depends on what ran before.
        result.metrics[f"{name}/peak_memory_mb"] = Metric(row["peak_memory_mb"], "MiB", False,
                                                          **(MEMORY if cuda else dict(tolerance=None)))
        print(f"[train] {name}: {row['images_per_s']:.1f} images/s, MFU {100 * row['mfu']:.1f} %", flush=True)

    if ctx.reference is not None:
        from benchmarks import reference

        for config in _train_configs(ctx.small, ctx.device):
            if config["compile"] or config["channels_last"]:
                continue
            row = reference.compare_training(ctx.reference, config["size"], config["precision"], config["batch"],
                                             steps, warmup, ctx.device)
            result.rows.append(row)
            result.metrics[f"train/{_config_name(config)}/ratio_vs_reference"] = Metric(
                row["ratio"], "ours / reference", required=False, **TIMING)
            print(f"[train] {_config_name(config)}: ours / reference = {row['ratio']:.2f}", flush=True)

    processes = [1, 2] if not cuda or torch.cuda.device_count() >= 2 else [1]
    if len(processes) == 1:
        result.notes.append("2-process DDP not measured: it needs 2 GPUs on a GPU machine")
    total, batch = (128, 16) if ctx.small else (4096, 128)
    rates = {}
    for n in processes:
        row = ddp_images_per_s(n, ctx.work_dir, ctx.device, total, batch)
        result.rows.append({"kind": "trainer", **row})
        rates[n] = row["images_per_s"]
        result.metrics[f"train/trainer/{n}proc/images_per_s"] = Metric(row["images_per_s"], "images/s", **TIMING)
        print(f"[train] trainer with {n} process(es): {row['images_per_s']:.1f} images/s", flush=True)
    if 2 in rates:
        result.metrics["train/trainer/2proc/scaling"] = Metric(rates[2] / rates[1], "x one process", tolerance=None)
    return result


# --- heads ----------------------------------------------------------------------------------------------------


def heads_suite(ctx: SuiteContext) -> SuiteResult:
    """Fit time of each head kind on a rows x 512 latents table per backend; the Ray sweep's speed-up."""
    from sklearn.metrics import roc_auc_score

    from harness.method.heads import HEAD_KINDS, cuda_available, fit_head

    result = SuiteResult()
    rows = 2_000 if ctx.small else 12_000
    backends = ["sklearn"]
    if importlib.util.find_spec("cuml") is not None and cuda_available():
        backends.append("cuml")
    elif not ctx.small:
        result.notes.append("cuML backend not measured: cuml is not importable or there is no CUDA device")
    z, y = heads_fit.random_latents(rows, 512, seed=0)
    for backend in backends:
        for kind in HEAD_KINDS:
            start = time.perf_counter()
            head = fit_head(z, y, kind=kind, C=1.0, backend=backend, random_state=0)
            total = time.perf_counter() - start
            auc = float(roc_auc_score(y, head.decision(z)))
            result.rows.append({"backend": backend, "kind": kind, "rows": rows, "dim": 512,
                                "fit_s": head.fit_seconds, "total_s": total, "train_auc": auc})
            name = f"heads/{backend}/{kind}"
            result.metrics[f"{name}/fit_s"] = Metric(head.fit_seconds, "s", False, abs_tolerance=0.25, **TIMING)
            # The data are fixed by the seed, so the training AUC only moves with the solver.
            result.metrics[f"{name}/train_auc"] = Metric(auc, "AUC", tolerance=0.0, abs_tolerance=0.02)
            print(f"[heads] {name}: fit {head.fit_seconds:.2f} s, train AUC {auc:.3f}", flush=True)
    _ray_sweep_speedup(result, ctx.small)
    return result


def _ray_sweep_speedup(result: SuiteResult, small: bool) -> None:
    """Wall time of the Ray Tune heads sweep on 1 core and on all cores, from ``benchmarks/sweep_speedup.py``."""
    from benchmarks import sweep_speedup

    rows = sweep_speedup.main(["--small"] if small else [])
    most = max(row["cores"] for row in rows)
    for row in rows:
        result.rows.append({"kind": "ray_sweep", **row})
        # Named by role, not by count, so that machines with other core counts compare.
        cores = "one_core" if row["cores"] == 1 else "all_cores" if row["cores"] == most else f"{row['cores']}_cores"
        name = f"heads/ray_sweep/{row['backend']}/{cores}"
        result.metrics[f"{name}/wall_s"] = Metric(row["wall_s"], "s", False, abs_tolerance=2.0, **TIMING)
        if row["cores"] == most and row.get("speedup_vs_1_core"):
            result.metrics[f"{name}/speedup"] = Metric(row["speedup_vs_1_core"], "x one core", **TIMING)


# --- data -----------------------------------------------------------------------------------------------------


def data_suite(ctx: SuiteContext) -> SuiteResult:
    """Training-stream throughput of the shard reader for several DataLoader worker counts."""
    result = SuiteResult()
    if ctx.small:
        argv = ["--size", "32", "--samples", "256", "--batch-size", "32", "--batches", "8", "--warmup", "2",
                "--workers", "0", "1", "2", "--no-consumer"]
    else:
        argv = ["--size", "96", "--samples", "2048", "--batch-size", "64", "--batches", "30", "--warmup", "5",
                "--augment", "--workers", "0", "2", "4", "8"]
    rows = data_throughput.main(argv)
    for row in rows:
        result.rows.append({**row, "argv": " ".join(argv)})
        name = f"data/workers_{row['num_workers']}"
        result.metrics[f"{name}/images_per_s"] = Metric(row["images_per_s"], "images/s", **TIMING)
        if row.get("reader_over_consumer"):  # > 1: the reader outpaces the training step (context, not checked)
            result.metrics[f"{name}/reader_over_consumer"] = Metric(row["reader_over_consumer"], "x", tolerance=None)
    return result
