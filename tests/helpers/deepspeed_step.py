"""One ZeRO-2 step of tiny-32 through Accelerate and DeepSpeed, set up as harness/train_dae.py does; writes a summary.

    python tests/helpers/deepspeed_step.py OUT.json [--train.grad_clip=0.25 --train.mixed_precision=bf16 ...]

Run it in a process of its own (:func:`run_step` does): Accelerate's state and DeepSpeed's process group are
global to a process. The Accelerator gets the plugin from :func:`harness.distributed.deepspeed_plugin`, exactly as
the trainer builds it; only ``cpu=False`` is forced, so that on a machine without CUDA DeepSpeed runs on its CPU
accelerator (``DS_ACCELERATOR=cpu``) instead of Accelerate dropping DeepSpeed.

The optimizer is plain SGD with lr 1 (no momentum, no decay), so one step moves the weights by exactly the
clipped gradient: the size of the move shows whether DeepSpeed applied the job's ``train.grad_clip``.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def run_step(out: Path, overrides: list[str], device: str, timeout: float = 500) -> dict[str, Any]:
    """Run this script in a subprocess as a one-process DeepSpeed launch; return its summary (fail with its log)."""
    from helpers.serving import free_port

    env = {**os.environ, "ACCELERATE_USE_DEEPSPEED": "true",
           "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(REPO / "launch" / "deepspeed" / "zero2.json"),
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    for key in ("ACCELERATE_GRADIENT_CLIPPING", "ACCELERATE_MIXED_PRECISION"):  # the job file decides, not these
        env.pop(key, None)
    if device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    proc = subprocess.run([sys.executable, __file__, str(out), *overrides], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0 and out.is_file(), f"exit {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}"
    return json.loads(out.read_text())


def check_zero2_step(summary: dict[str, Any], clip: float, precision: str, device: str) -> None:
    """What a ZeRO-2 step run by :func:`run_step` must show on any device: the job's clipping and precision."""
    import pytest

    assert summary["engine"] == "DeepSpeedEngine" and summary["device"] == device and summary["zero_stage"] == 2
    assert summary["gradient_clipping"] == clip
    assert summary["torch_autocast"] is (precision == "bf16") and not summary["bf16_engine"]
    assert summary["param_dtype"] == "torch.float32"  # master weights stay fp32 under autocast
    assert summary["compute_dtype"] == ("torch.bfloat16" if precision == "bf16" else "torch.float32")
    # SGD with lr 1 moves the weights by the clipped gradient: by the job's clip (not Accelerate's 1.0) when the
    # gradient is longer, by the whole gradient when clipping is off (0).
    assert summary["grad_norm"] > 1.0
    expected = clip if clip > 0 else summary["grad_norm"]
    assert summary["update_norm"] == pytest.approx(expected, rel=2e-2)


def main(out: str, overrides: list[str]) -> None:
    import torch
    from accelerate import Accelerator

    from harness.config import load_config
    from harness.diffusion import alphas_cumprod, diffusion_loss, linear_betas
    from harness.distributed import deepspeed_plugin
    from harness.models import build_dae

    tc = load_config(None, overrides).train
    accelerator = Accelerator(cpu=False, mixed_precision=tc.mixed_precision,
                              gradient_accumulation_steps=tc.grad_accum, deepspeed_plugin=deepspeed_plugin(tc))
    torch.manual_seed(0)
    dae = build_dae("tiny-32")
    optimizer = torch.optim.SGD(dae.parameters(), lr=1.0)
    images = torch.rand(8, 1, 32, 32) * 2 - 1
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=4)
    model, optimizer, loader = accelerator.prepare(dae, optimizer, loader)

    seen: list[torch.dtype] = []  # the dtype the first convolution computes in (bf16 under autocast)
    first_conv = next(m for m in accelerator.unwrap_model(model).modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    before = [p.detach().float().clone() for p in model.parameters()]
    x0 = next(iter(loader))[0].to(accelerator.device)
    alpha_bar = alphas_cumprod(linear_betas()).to(accelerator.device)
    with accelerator.accumulate(model):
        loss = diffusion_loss(functools.partial(model, x_cond=x0), x0, alpha_bar)
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip)  # DeepSpeed: only reports
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    update = torch.cat([(p.detach().float() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)])
    summary = {
        "engine": type(model).__name__, "device": accelerator.device.type,
        "zero_stage": model.zero_optimization_stage(), "gradient_clipping": model.gradient_clipping(),
        "torch_autocast": model.torch_autocast_enabled(), "bf16_engine": model.bfloat16_enabled(),
        "fp16_engine": model.fp16_enabled(), "param_dtype": str(next(model.parameters()).dtype),
        "compute_dtype": str(seen[0]) if seen else None, "loss": float(loss.detach().float()),
        "grad_norm": float(grad_norm), "update_norm": float(update.norm()),
        "resolved_config": accelerator.state.deepspeed_plugin.deepspeed_config,
    }
    Path(out).write_text(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
