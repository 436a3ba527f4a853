"""The gradient one training step synchronises, as harness/train_dae.py sets it up; written by rank 0.

    python tests/helpers/ddp_gradient.py OUT.safetensors                      # one process, the whole batch
    accelerate launch --config_file launch/accelerate/cpu_2proc.yaml tests/helpers/ddp_gradient.py OUT.safetensors

Every process draws the same global batch (images, timesteps, noise) and backpropagates its own slice of it, as
the ranks of a training run do with their shards; DistributedDataParallel must then leave every rank holding
the gradient of the whole batch. The weights are jittered away from their initialisation first: the UNet's
output convolution starts at zero, which would leave most gradients zero and the comparison empty. Dropout is
off: its masks are drawn per process and would differ between the split and the whole batch.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

GLOBAL_BATCH = 8


def main(out: str) -> None:
    import torch
    from accelerate import Accelerator
    from safetensors.torch import save_file

    from harness.diffusion import alphas_cumprod, diffusion_loss, linear_betas
    from harness.models import build_dae

    accelerator = Accelerator(cpu=True)  # as the trainer does without CUDA: processes join over gloo
    rank, world = accelerator.process_index, accelerator.num_processes
    generator = torch.Generator().manual_seed(0)
    dae = build_dae("tiny-32", dropout=0.0)  # dropout masks would differ with the batch split, and rightly so
    with torch.no_grad():
        for parameter in dae.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    model = accelerator.prepare(dae)
    x0 = torch.rand(GLOBAL_BATCH, 1, 32, 32, generator=generator) * 2 - 1  # (B, C, H, W)
    t = torch.randint(0, 1000, (GLOBAL_BATCH,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    alpha_bar = alphas_cumprod(linear_betas())
    loss = diffusion_loss(functools.partial(model, x_cond=x0[rows]), x0[rows], alpha_bar, t=t[rows],
                          noise=noise[rows])
    accelerator.backward(loss)
    if accelerator.is_main_process:
        grads = {name: p.grad.contiguous() for name, p in accelerator.unwrap_model(model).named_parameters()}
        save_file({**grads, "world_size": torch.tensor(world)}, out)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    main(sys.argv[1])
