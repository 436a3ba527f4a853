"""Time the official Diffusion Autoencoders implementation (phizaz/diffae) beside ours, from a local checkout.

    python benchmarks/run.py --suite train encode --reference /path/to/diffae

Nothing is fetched or copied: the checkout's ``model`` package is imported from ``--reference`` (it needs only
torch). Its ``BeatGANsAutoencConfig`` is filled from our ``DAESpec`` the way its ``TrainConfig.make_model_conf``
fills it for the autoencoder templates (``ffhq64_autoenc``: ``resnet_two_cond``, ``resblock_updown``,
``enc_pool='adaptivenonzero'``), so both networks have the same levels, widths, blocks, attention and z_sem size;
the parameter counts are recorded beside the times (for ``paper-64`` with 3 channels they are equal, 90,839,235).

Both networks are timed by the same loop in the same process, interleaved, so load on the machine hits both:
a training step (encoder + UNet forward, epsilon loss, backward, AdamW) and DDIM inversion + decoding (one UNet
evaluation per step, through our DDIM functions, with z_sem from each model's own encoder). Weights are random:
speed does not depend on them. The ratio is ours / reference in images/s (above 1: ours is faster).
"""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.diffusion import alphas_cumprod, ddim_invert, ddim_sample, eps_loss, linear_betas
from harness.models import DAE_SIZES, build_dae
from harness.models.dae import DAESpec

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def reference_model_class(checkout: str | Path) -> Any:
    """``BeatGANsAutoencConfig`` from the checkout; a clear error when ``checkout`` is not a DiffAE tree."""
    checkout = Path(checkout).resolve()
    if not (checkout / "model" / "unet_autoenc.py").is_file():
        raise FileNotFoundError(f"--reference {checkout}: no model/unet_autoenc.py; expected a checkout of the "
                                "official Diffusion Autoencoders code (github.com/phizaz/diffae)")
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))  # its modules import each other as top-level names (choices, model, ...)
    return importlib.import_module("model.unet_autoenc").BeatGANsAutoencConfig


def build_reference(checkout: str | Path, spec: DAESpec, in_channels: int = 1) -> nn.Module:
    """The official autoencoder with the architecture of ``spec`` (random weights)."""
    config_class = reference_model_class(checkout)
    config = config_class(
        image_size=spec.image_size, in_channels=in_channels, out_channels=in_channels,
        model_channels=spec.base_channels, channel_mult=spec.channel_mult, num_res_blocks=spec.num_res_blocks,
        attention_resolutions=spec.attn_resolutions, embed_channels=spec.time_embed_dim, dropout=spec.dropout,
        num_heads=spec.num_heads, num_head_channels=spec.head_channels or -1, num_heads_upsample=-1,
        conv_resample=True, dims=spec.spatial_dims, resblock_updown=True, resnet_two_cond=True,
        resnet_use_zero_module=True, use_new_attention_order=False, num_classes=None,
        enc_out_channels=spec.z_dim, enc_pool="adaptivenonzero",
        enc_num_res_block=spec.enc_num_res_blocks or spec.num_res_blocks, enc_channel_mult=spec.enc_channel_mult,
        enc_attn_resolutions=spec.enc_attn_resolutions,
        # z_sem enters every block's style projection as is; DiffAE's templates get this by z_dim == embed width.
        resnet_cond_channels=spec.z_dim,
    )
    return config.make_model()


# Each model behind one interface: training forward (encode x0, predict eps), encoder, and conditioned UNet.
def _ours(model: nn.Module) -> dict[str, Callable]:
    return {"train": lambda x_t, t, x0: model(x_t, t, x_cond=x0), "encode": model.encode,
            "denoise": lambda x_t, t, z: model(x_t, t, z_sem=z)}


def _theirs(model: nn.Module) -> dict[str, Callable]:
    return {"train": lambda x_t, t, x0: model(x_t, t, x_start=x0).pred, "encode": lambda x: model.encoder(x),
            "denoise": lambda x_t, t, z: model(x_t, t, cond=z).pred}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_training(model: nn.Module, calls: dict[str, Callable], x0: torch.Tensor, alpha_bar: torch.Tensor,
                   precision: str, steps: int, warmup: int) -> float:
    """images/s of full training steps (the step of benchmarks/train_throughput.py)."""
    device, dtype = x0.device, _DTYPES[precision]
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = eps_loss(lambda x_t, t: calls["train"](x_t, t, x0), x0, alpha_bar)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return x0.shape[0] * steps / (time.perf_counter() - start)


@torch.no_grad()
def _time_reconstruction(model: nn.Module, calls: dict[str, Callable], x0: torch.Tensor, alpha_bar: torch.Tensor,
                         precision: str, invert_steps: int, decode_steps: int) -> float:
    """images/s of encode -> DDIM invert -> DDIM decode (after one untimed 1-step warm-up)."""
    device, dtype = x0.device, _DTYPES[precision]
    model.eval()

    def reconstruct(n_invert: int, n_decode: int) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            z = calls["encode"](x0)  # (B, z_dim)
            denoise = lambda x_t, t: calls["denoise"](x_t, t, z)  # noqa: E731
            return ddim_sample(denoise, ddim_invert(denoise, x0, alpha_bar, n_invert), alpha_bar, n_decode)

    reconstruct(1, 1)
    _sync(device)
    start = time.perf_counter()
    reconstruct(invert_steps, decode_steps)
    _sync(device)
    return x0.shape[0] / (time.perf_counter() - start)


def _pair(checkout: str | Path, size: str, device: torch.device) -> tuple[nn.Module, nn.Module, DAESpec]:
    torch.manual_seed(0)
    ours = build_dae(size, in_channels=1).to(device)
    theirs = build_reference(checkout, DAE_SIZES[size], in_channels=1).to(device)
    return ours, theirs, ours.spec


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def compare_training(checkout: str | Path, size: str, precision: str, batch: int, steps: int, warmup: int,
                     device: torch.device) -> dict[str, Any]:
    """Training images/s of ours and of the reference at the same architecture, resolution, batch, precision."""
    ours, theirs, spec = _pair(checkout, size, device)
    x0 = torch.randn(batch, 1, spec.image_size, spec.image_size, device=device).clamp(-1, 1)  # (B, 1, S, S)
    alpha_bar = alphas_cumprod(linear_betas()).to(device)
    ours_rate = _time_training(ours, _ours(ours), x0, alpha_bar, precision, steps, warmup)
    theirs_rate = _time_training(theirs, _theirs(theirs), x0, alpha_bar, precision, steps, warmup)
    return {"kind": "reference_train", "size": size, "image_size": spec.image_size, "precision": precision,
            "batch": batch, "ours_images_per_s": ours_rate, "reference_images_per_s": theirs_rate,
            "ratio": ours_rate / theirs_rate, "ours_parameters": _params(ours), "reference_parameters": _params(theirs)}


def compare_reconstruction(checkout: str | Path, size: str, precision: str, batch: int, invert_steps: int,
                           decode_steps: int, device: torch.device) -> dict[str, Any]:
    """Encode + invert + decode images/s of ours and of the reference (same DDIM loop, same step counts)."""
    ours, theirs, spec = _pair(checkout, size, device)
    x0 = torch.rand(batch, 1, spec.image_size, spec.image_size, device=device) * 2 - 1  # (B, 1, S, S)
    alpha_bar = alphas_cumprod(linear_betas()).to(device)
    ours_rate = _time_reconstruction(ours, _ours(ours), x0, alpha_bar, precision, invert_steps, decode_steps)
    theirs_rate = _time_reconstruction(theirs, _theirs(theirs), x0, alpha_bar, precision, invert_steps, decode_steps)
    return {"kind": "reference_reconstruction", "size": size, "image_size": spec.image_size, "precision": precision,
            "batch": batch, "invert_steps": invert_steps, "decode_steps": decode_steps,
            "ours_images_per_s": ours_rate, "reference_images_per_s": theirs_rate, "ratio": ours_rate / theirs_rate,
            "ours_parameters": _params(ours), "reference_parameters": _params(theirs)}
