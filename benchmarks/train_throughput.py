"""Training throughput of the DAE: images/s, FLOPs per image, MFU and peak memory per size and precision.

    python benchmarks/train_throughput.py --small                       # CPU: tiny-32, fp32 and bf16
    python benchmarks/train_throughput.py --sizes paper-64 paper-96 --precisions bf16 --batch 64 \\
        --device cuda --compile --channels-last                          # GPU

One timed step = forward of encoder + UNet, epsilon loss, backward, AdamW step (as in harness/train_dae.py).
MFU = (model FLOPs per training image x images/s) / peak FLOP/s of the device for that precision. FLOPs come
from torch's FlopCounterMode (matmuls and convolutions, forward + backward), not from a formula.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

from harness.diffusion import alphas_cumprod, eps_loss, linear_betas
from harness.models import DAE_SIZES, build_dae
from harness.models.flops import training_flops_per_image

# Dense peak FLOP/s of known accelerators (no sparsity), by precision.
GPU_PEAK_TFLOPS = {
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},  # SXM; TF32 matmuls are 494
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
}


def cpu_peak_tflops(precision: str) -> float:
    """Peak of this CPU: cores x clock x FLOP/cycle (2 FMA units x vector width). bf16 counted as fp32 rate
    unless the CPU has AMX/AVX512-BF16, where it doubles; a rough but stated ceiling."""
    flags, mhz = "", 0.0
    try:
        info = Path("/proc/cpuinfo").read_text()
        flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
        mhz = max(float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz"))
    except (OSError, ValueError, StopIteration):
        mhz = 2500.0
    lanes = 16 if "avx512f" in flags else 8  # fp32 lanes per vector
    per_cycle = 2 * 2 * lanes  # 2 FMA ports x (mul + add)
    if precision == "bf16" and ("avx512_bf16" in flags or "amx_bf16" in flags):
        per_cycle *= 2
    return torch.get_num_threads() * mhz * 1e6 * per_cycle / 1e12


def peak_tflops(device: torch.device, precision: str) -> float:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, table in GPU_PEAK_TFLOPS.items():
            if key in name:
                return table[precision]
        return float("nan")
    return cpu_peak_tflops(precision)


def bench_one(size: str, precision: str, batch: int, steps: int, warmup: int, device: torch.device,
              compile_model: bool, channels_last: bool, image_size: int | None) -> dict:
    torch.manual_seed(0)
    overrides = {"image_size": image_size} if image_size else {}
    model = build_dae(size, in_channels=1, **overrides).to(device)
    res = model.spec.image_size
    flops = training_flops_per_image(model, res, 1)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile_model:
        model.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    alpha_bar = alphas_cumprod(linear_betas()).to(device)
    x0 = torch.randn(batch, 1, res, res, device=device).clamp(-1, 1)
    if channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = eps_loss(lambda x_t, t: model(x_t, t, x_cond=x0), x0, alpha_bar)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    elapsed = time.perf_counter() - start
    images_per_s = batch * steps / elapsed
    peak = peak_tflops(device, precision)
    achieved = flops * images_per_s / 1e12
    if device.type == "cuda":
        memory_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        memory_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process high-water mark
    return {"size": size, "image_size": res, "precision": precision, "batch": batch, "compile": compile_model,
            "channels_last": channels_last, "parameters_m": model.num_parameters() / 1e6,
            "gflop_per_image": flops / 1e9, "images_per_s": images_per_s, "achieved_tflops": achieved,
            "peak_tflops": peak, "mfu": achieved / peak if peak == peak else float("nan"),
            "peak_memory_mb": memory_mb, "step_ms": 1e3 * elapsed / steps}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny-32", "paper-64"], choices=sorted(DAE_SIZES))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=None, help="override the size's image size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--small", action="store_true", help="CPU quick form: tiny-32, batch 16, 5 steps")
    parser.add_argument("--out", default=None, help="write the records as JSON here")
    args = parser.parse_args(argv)
    if args.small:
        args.sizes, args.batch, args.steps, args.warmup = ["tiny-32"], 16, 5, 2
    device = torch.device(args.device)
    rows = []
    for size in args.sizes:
        for precision in args.precisions:
            row = bench_one(size, precision, args.batch, args.steps, args.warmup, device, args.compile,
                            args.channels_last, args.image_size)
            rows.append(row)
            print(f"{size:>9} {row['image_size']:>3}px {precision:>4} batch {row['batch']:>3}: "
                  f"{row['images_per_s']:8.1f} img/s  {row['gflop_per_image']:6.2f} GFLOP/img  "
                  f"{row['achieved_tflops']:7.3f} TFLOP/s  MFU {100 * row['mfu']:5.1f} %  "
                  f"peak mem {row['peak_memory_mb']:8.0f} MB", flush=True)
    machine = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
               or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    from harness.cli import run_main

    sys.exit(run_main(main))
