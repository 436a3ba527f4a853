"""The Diffusion Autoencoder (Preechakul et al. 2022): a semantic encoder and a z_sem-conditioned UNet.

``DAE_SIZES`` (``harness.config.sizes``: pure data, so that a config checks ``model.size`` when it loads) is
the registry of named architectures; ``build_dae`` turns a name (or a spec) plus overrides
into a network. The diffusion schedule lives elsewhere (``harness.diffusion``): training is
``eps_loss(lambda x_t, t: dae(x_t, t, x_cond=x0), x0, alpha_bar)``, decoding is
``ddim_sample(lambda x_t, t: dae(x_t, t, z_sem=z), x_T, alpha_bar, steps)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor, nn

from harness.config.sizes import DAE_SIZES, DAESpec
from harness.models.encoder import SemanticEncoder
from harness.models.unet import ConditionalUNet


class DAE(nn.Module):
    """Semantic encoder + conditional UNet. Images are (B, C, H, W) in [-1, 1]."""

    def __init__(self, spec: DAESpec, in_channels: int = 1) -> None:
        super().__init__()
        self.spec = spec
        self.in_channels = in_channels
        heads = dict(num_heads=spec.num_heads, head_channels=spec.head_channels)
        # The UNet is built first so that a bad attention resolution is reported against the UNet's levels.
        self.unet = ConditionalUNet(
            spec.spatial_dims, in_channels, spec.base_channels, spec.channel_mult, spec.num_res_blocks,
            spec.attn_resolutions, spec.image_size, cond_dim=spec.z_dim, dropout=spec.dropout,
            time_embed_dim=spec.time_embed_dim, **heads,
        )
        self.encoder = SemanticEncoder(
            spec.spatial_dims, in_channels, spec.base_channels, spec.enc_channel_mult,
            spec.enc_num_res_blocks or spec.num_res_blocks,
            spec.attn_resolutions if spec.enc_attn_resolutions is None else spec.enc_attn_resolutions,
            spec.image_size, z_dim=spec.z_dim, **heads,
        )

    def encode(self, x: Tensor) -> Tensor:
        """Clean images (B, C, H, W) in [-1, 1] -> z_sem (B, z_dim)."""
        return self.encoder(x)

    def forward(self, x_t: Tensor, t: Tensor, x_cond: Tensor | None = None, z_sem: Tensor | None = None) -> Tensor:
        """Predicted noise eps (B, C, H, W) for x_t (B, C, H, W) at timesteps t (B,).

        Give exactly one condition: ``x_cond`` (clean images, encoded here, so during training a single forward
        touches every parameter, as DistributedDataParallel requires) or a precomputed ``z_sem`` (B, z_dim).
        """
        if (x_cond is None) == (z_sem is None):
            raise ValueError("DAE.forward needs exactly one of x_cond (images to encode) or z_sem (codes)")
        if x_cond is not None:
            z_sem = self.encode(x_cond)  # (B, z_dim)
        return self.unet(x_t, t, z_sem)

    def num_parameters(self) -> int:
        """Total number of parameters (encoder + UNet)."""
        return sum(parameter.numel() for parameter in self.parameters())


def build_dae(size: str | DAESpec, in_channels: int = 1, **overrides: Any) -> DAE:
    """Build a DAE from a registry name or a spec, with field overrides (e.g. ``image_size=96``, ``dropout=0``).

    Raises ``KeyError`` for an unknown size (listing the known ones), ``TypeError`` for an unknown override and
    ``ValueError`` when the resulting architecture is impossible (e.g. an attention resolution that is not a level).
    """
    if isinstance(size, DAESpec):
        spec, name = size, "custom spec"
    else:
        if size not in DAE_SIZES:
            raise KeyError(f"unknown DAE size {size!r}; known sizes: {sorted(DAE_SIZES)}")
        spec, name = DAE_SIZES[size], repr(size)
    known_fields = {f.name for f in dataclasses.fields(DAESpec)}
    unknown = sorted(set(overrides) - known_fields)
    if unknown:
        raise TypeError(f"unknown DAE spec override(s) {unknown}; DAESpec fields: {sorted(known_fields)}")
    spec = dataclasses.replace(spec, **overrides)
    try:
        return DAE(spec, in_channels=in_channels)
    except ValueError as error:
        hint = ""
        if "attention resolution" in str(error):
            hint = "; override attn_resolutions (model.attn_resolutions in a run config) to match the levels"
        raise ValueError(f"DAE size {name} with image_size={spec.image_size}: {error}{hint}") from error
