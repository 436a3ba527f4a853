"""FLOP counts of a DAE, measured with ``torch.utils.flop_counter.FlopCounterMode`` on the meta device.

The network is rebuilt from its spec on the meta device (no memory, no arithmetic), run on a batch of two and
the total divided by two. Counted are matrix multiplications, convolutions and attention (what FlopCounterMode
registers), i.e. 2 FLOPs per multiply-accumulate; norms and activations are ignored, as is customary.
The official DiffAE 64 px autoencoder (3 channels) measures 89.3 GFLOP per training image this way.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from harness.models.dae import DAE

_BATCH = 2


def _measure(model: DAE, image_size: int | None, in_channels: int | None, *, backward: bool,
             include_encoder: bool = True) -> float:
    """FLOPs per image of one forward (and backward) pass of a meta-device twin of ``model``."""
    size = image_size or model.spec.image_size
    channels = in_channels or model.in_channels
    with torch.device("meta"):
        twin = DAE(model.spec, in_channels=channels)
    twin.train(backward)
    shape = (_BATCH, channels) + (size,) * model.spec.spatial_dims  # (B, C, H, W) or (B, C, D, H, W)
    x0 = torch.zeros(shape, device="meta")
    x_t = torch.zeros(shape, device="meta")
    t = torch.zeros(_BATCH, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(backward):
        if include_encoder:
            eps = twin(x_t, t, x_cond=x0)  # the training forward: encode, then denoise
        else:
            eps = twin(x_t, t, z_sem=torch.zeros(_BATCH, model.spec.z_dim, device="meta"))
        if backward:
            torch.mean((eps - x0) ** 2).backward()
    return float(counter.get_total_flops()) / _BATCH


def training_flops_per_image(model: DAE, image_size: int | None = None, in_channels: int | None = None) -> float:
    """Forward + backward FLOPs of one training step per image (encoder and UNet; backward ~ 2x forward).

    ``image_size`` / ``in_channels`` default to the model's; a different size feeds the same network a larger or
    smaller image (it is fully convolutional), so the count scales ~ with the pixel count.
    """
    return _measure(model, image_size, in_channels, backward=True)


def forward_flops_per_image(model: DAE, image_size: int | None = None, in_channels: int | None = None,
                            include_encoder: bool = True) -> float:
    """Forward FLOPs per image. ``include_encoder=False`` gives the cost of one DDIM step (UNet with a given z_sem)."""
    return _measure(model, image_size, in_channels, backward=False, include_encoder=include_encoder)
