"""Every GPU measurement in one short run: what a lent H100 / H200 is for.

    benchmarks/gpu_run.sh                  # on a machine with one CUDA GPU: about 9 minutes, records under $OUT
    benchmarks/gpu_run.sh --smoke          # the same code path on a CPU in a few minutes (tests/test_gpu_run.py)

Stages, each given a share of the wall budget (``--budget-s``, default 540 s) and skipped, with a note saying so,
when the time left cannot hold it:

``train``        paper-64 training step images/s, GFLOP per image, MFU and peak memory in bf16 (eager, channels_last)
                 and fp32 (``benchmarks/train_throughput.py``);
``deepspeed``    the real trainer under DeepSpeed ZeRO-2 (``launch/accelerate/deepspeed_zero2.yaml``): images/s;
``ce``           one-CE latency (batch 1) and batched CE throughput, bf16, fixed-point inversion 10 / 10;
``pneumonia``    the PneumoniaMNIST job (``jobs/pneumoniamnist.yaml``) trained for the GPU budget
                 (``--pneumonia-samples``, default 2M, or what fits its share) and evaluated by the pipeline
                 (heads beside their floors, CEs); needs the .npz (``data.raw_path`` or ``$DAECF_PNEUMONIAMNIST``).

Everything is written under ``--out`` (default ``$OUT``, else ``runs/gpu-run``): ``gpu_run-<stamp>.json`` (a
benchmark record, ``benchmarks/records.py``), each stage's log, and the trained model folders, so the figures and
the models come back from the GPU machine together.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.records import TIMING, Metric, SuiteResult, write_record  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PNEUMONIA_NPZ = REPO.parent / "shared" / "data" / "pneumoniamnist.npz"


@dataclass(frozen=True)
class Plan:
    """What each stage runs: the GPU form, or the smoke form that takes the same path on a CPU in minutes."""

    smoke: bool
    train_size: str
    train_batch: int
    train_steps: int
    ce_batches: tuple[int, ...]
    ds_samples: int
    pneumonia_samples: int
    images_per_s_guess: float  # to size a training budget before the stage has measured its own rate

    @classmethod
    def make(cls, smoke: bool, pneumonia_samples: int) -> Plan:
        if smoke:
            return cls(True, "tiny-32", 8, 3, (1, 4), 32, min(pneumonia_samples, 256), 30.0)
        return cls(False, "paper-64", 64, 30, (1, 64, 256), 8192, pneumonia_samples, 8000.0)


@dataclass
class Context:
    plan: Plan
    out: Path
    device: torch.device
    deadline: float

    def left(self) -> float:
        return self.deadline - time.monotonic()


def _run(command: list[str], log: Path, timeout: float, env: dict[str, str] | None = None) -> str:
    """Run a stage's subprocess with its output in ``log``; raise with the log's tail when it fails."""
    with open(log, "w") as handle:
        done = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, text=True,
                              timeout=max(timeout, 1.0), env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    text = log.read_text()
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed (exit {done.returncode}); last lines of {log}:\n"
                           + "\n".join(text.splitlines()[-15:]))
    return text


def stage_train(ctx: Context, result: SuiteResult) -> None:
    from benchmarks import train_throughput

    variants = [("bf16", False), ("bf16", True), ("fp32", False)]
    for precision, channels_last in variants:
        row = train_throughput.bench_one(ctx.plan.train_size, precision, ctx.plan.train_batch, ctx.plan.train_steps,
                                         2, ctx.device, False, channels_last, None)
        name = f"gpu_run/train/{ctx.plan.train_size}/{precision}{'+channels_last' if channels_last else ''}"
        result.rows.append({"stage": "train", **row})
        result.metrics[f"{name}/images_per_s"] = Metric(row["images_per_s"], "images/s", **TIMING)
        result.metrics[f"{name}/mfu"] = Metric(row["mfu"], "fraction of peak", **TIMING)
        result.metrics[f"{name}/peak_memory_mb"] = Metric(row["peak_memory_mb"], "MiB", False, tolerance=None)
        print(f"[train] {name}: {row['images_per_s']:.1f} images/s, MFU {100 * row['mfu']:.1f} %", flush=True)


def _trainer_args(out_dir: Path, shards: Path, samples: int, batch: int) -> list[str]:
    settings = {"data.source": "shards", "data.shard_dir": shards, "train.out_dir": out_dir,
                "train.total_samples": samples, "train.batch_size": batch, "train.log_every": max(batch, samples // 4),
                "train.checkpoint_every": 10 * samples, "train.preview_every": 10 * samples,
                "train.preview_images": 2, "eval.batch_size": 2, "diffusion.invert_steps": 2,
                "diffusion.decode_steps": 2, "track.enabled": "false", "train.probe_images": 0}
    return [f"--{key}={value}" for key, value in settings.items()]


def stage_deepspeed(ctx: Context, result: SuiteResult) -> None:
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        result.notes.append("deepspeed: not installed (pip install -e '.[deepspeed]')")
        return
    from harness.data.shards import write_phantom_shards

    shards = write_phantom_shards(ctx.out / "work" / "ds-phantoms", size=32, n_train=512, n_val=16, n_test=16,
                                  seed=0, samples_per_shard=128)
    run_dir = ctx.out / "work" / "deepspeed"
    batch = 8 if ctx.plan.smoke else 256
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "launch" / "accelerate" / "deepspeed_zero2.yaml"), "--num_processes", "1",
               str(REPO / "harness" / "train_dae.py"), *_trainer_args(run_dir, shards, ctx.plan.ds_samples, batch),
               "--model.size=tiny-32", "--overwrite"]
    if ctx.device.type == "cuda":
        command.append("--train.mixed_precision=bf16")
    _run(command, ctx.out / "deepspeed.log", ctx.left())
    summary = json.loads((run_dir / "final" / "model.json").read_text())
    result.rows.append({"stage": "deepspeed", "images_per_s": summary["images_per_s"], "batch": batch})
    result.metrics["gpu_run/deepspeed_zero2/tiny-32/images_per_s"] = Metric(summary["images_per_s"], "images/s",
                                                                           **TIMING)
    print(f"[deepspeed] ZeRO-2 trainer: {summary['images_per_s']:.1f} images/s", flush=True)


def stage_ce(ctx: Context, result: SuiteResult) -> None:
    from benchmarks.ce_speed import time_ces
    from harness.data.phantoms import generate_phantoms
    from harness.data.transforms import to_model_range
    from harness.method.autoencoder import DiffusionAutoencoder
    from harness.models import build_dae

    torch.manual_seed(0)
    dae = build_dae(ctx.plan.train_size, in_channels=1)  # random weights: the cost of a CE does not depend on them
    size = dae.spec.image_size
    images = torch.stack([to_model_range(s.image[None]) for s in generate_phantoms(max(ctx.plan.ce_batches), size, 5)])
    precision = "bf16" if ctx.device.type == "cuda" or not ctx.plan.smoke else "fp32"
    for batch in ctx.plan.ce_batches:
        ae = DiffusionAutoencoder(dae.to(ctx.device), _alpha_bar(), batch_size=batch, invert_steps=10,
                                  decode_steps=10, inversion="fixed_point", precision=precision)
        x = images[:batch].to(ae.device)
        time_ces(ae, x)  # warm-up: kernels chosen, memory pools filled
        seconds, mse = time_ces(ae, x)
        result.rows.append({"stage": "ce", "batch": batch, "seconds": seconds, "precision": precision})
        key = f"gpu_run/ce/{ctx.plan.train_size}/{precision}/fixed_point10"
        if batch == 1:
            result.metrics[f"{key}/latency_s"] = Metric(seconds, "s", False, **TIMING)
        result.metrics[f"{key}/batch{batch}/ce_per_s"] = Metric(batch / seconds, "CEs/s", **TIMING)
        print(f"[ce] batch {batch}: {batch / seconds:.2f} CEs/s ({seconds:.3f} s)", flush=True)


def _alpha_bar() -> torch.Tensor:
    from harness.diffusion import alphas_cumprod, linear_betas

    return alphas_cumprod(linear_betas())


def stage_pneumonia(ctx: Context, result: SuiteResult) -> None:
    npz = Path(os.environ.get("DAECF_PNEUMONIAMNIST", PNEUMONIA_NPZ))
    if not npz.is_file():
        result.notes.append(f"pneumonia: {npz} not found (set DAECF_PNEUMONIAMNIST); stage not run")
        return
    share = ctx.left() * 0.7  # training's share of the stage; the pipeline (encode, heads, CEs, report) the rest
    samples = ctx.plan.pneumonia_samples
    if not ctx.plan.smoke:
        samples = int(min(samples, share * ctx.plan.images_per_s_guess) // 1024 * 1024)
    train_dir, eval_dir = ctx.out / "models" / "pneumonia", ctx.out / "eval-pneumonia"
    overrides = [f"--data.raw_path={npz}", f"--data.shard_dir={ctx.out / 'work' / 'pneumonia-shards'}",
                 f"--train.out_dir={train_dir}", f"--eval.out_dir={eval_dir}", f"--train.total_samples={samples}",
                 f"--train.checkpoint_every={samples}", f"--train.preview_every={samples}",
                 f"--train.log_every={max(32, samples // 8)}", "--eval.baseline_job=null", "--track.enabled=false"]
    if ctx.plan.smoke:
        overrides += ["--train.batch_size=16", "--diffusion.invert_steps=2", "--diffusion.decode_steps=2",
                      "--eval.counterfactual_images=4", "--eval.strip_images=2", "--eval.floors=false",
                      "--counterfactual.calibrate_gain=false", "--counterfactual.evaluate_directions=[pattern]",
                      "--counterfactual.move_sizes=[1.0]", "--eval.encode_splits=[train,test]",
                      "--train.probe_images=0"]
    else:
        overrides += ["--train.batch_size=256", "--train.mixed_precision=bf16", "--eval.precision=bf16"]
    config = ["--config", str(REPO / "jobs" / "pneumoniamnist.yaml")]
    start = time.monotonic()
    _run([sys.executable, str(REPO / "harness" / "train_dae.py"), *config, *overrides],
         ctx.out / "pneumonia-train.log", ctx.left())
    train_s = time.monotonic() - start
    _run([sys.executable, "-m", "harness.pipeline", *config, *overrides], ctx.out / "pneumonia-pipeline.log",
         ctx.left())
    summary = json.loads((train_dir / "final" / "model.json").read_text())
    # The trainer's rate of its last logging window (start-up excluded); a run too short for one: samples / wall.
    rate = summary.get("images_per_s") or samples / train_s
    result.rows.append({"stage": "pneumonia", "samples": samples, "train_s": train_s, "images_per_s": rate})
    result.metrics["gpu_run/pneumonia/train_images_per_s"] = Metric(rate, "images/s", **TIMING)
    detection = eval_dir / "report" / "tables" / "detection.csv"
    if detection.is_file():
        import csv

        for row in csv.DictReader(detection.open()):
            if row.get("split") == "test" and row.get("auc"):
                result.metrics[f"gpu_run/pneumonia/{row['task']}/{row['kind']}/auc"] = Metric(
                    float(row["auc"]), "AUC", tolerance=0.05, abs_tolerance=0.03)
    print(f"[pneumonia] {samples} samples in {train_s:.0f} s; report {eval_dir / 'report' / 'index.html'}", flush=True)


# name, function, share of the budget it may start with at least (seconds on the GPU; the smoke form ignores it)
STAGES: dict[str, tuple[Callable[[Context, SuiteResult], None], float]] = {
    "train": (stage_train, 30.0),
    "deepspeed": (stage_deepspeed, 45.0),
    "ce": (stage_ce, 20.0),
    "pneumonia": (stage_pneumonia, 120.0),
}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="the CPU form: same code path, tiny sizes")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "runs/gpu-run"))
    parser.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget of the whole run")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    parser.add_argument("--pneumonia-samples", type=int, default=2_000_000)
    args = parser.parse_args(argv)
    if args.budget_s <= 0 or args.pneumonia_samples < 1:
        raise SystemExit("error: --budget-s and --pneumonia-samples must be positive")
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        raise SystemExit("error: no CUDA device here: run benchmarks/gpu_run.sh on a GPU machine, or --smoke on a CPU")
    started = time.monotonic()
    ctx = Context(Plan.make(args.smoke, args.pneumonia_samples), args.out, torch.device("cuda" if cuda else "cpu"),
                  started + args.budget_s)
    (ctx.out / "work").mkdir(parents=True, exist_ok=True)
    result = SuiteResult()
    for name in args.stages:
        function, minimum = STAGES[name]
        if not args.smoke and ctx.left() < minimum:
            result.notes.append(f"{name}: skipped, {ctx.left():.0f} s left of the budget (needs {minimum:.0f} s)")
            continue
        stage_start = time.monotonic()
        try:
            function(ctx, result)
        except (RuntimeError, subprocess.TimeoutExpired, torch.cuda.OutOfMemoryError) as error:
            result.notes.append(f"{name}: failed: {error}")
            print(f"[{name}] failed: {error}", file=sys.stderr, flush=True)
        result.rows.append({"stage": name, "wall_s": round(time.monotonic() - stage_start, 1)})
    return write_record("gpu_run", result, small=args.smoke, wall_s=time.monotonic() - started, argv=argv,
                        out_dir=ctx.out)


if __name__ == "__main__":
    main()
