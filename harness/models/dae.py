"""The Diffusion Autoencoder (Preechakul et al. 2022): a semantic encoder and a z_sem-conditioned UNet.

``DAE_SIZES`` is the registry of named architectures; ``build_dae`` turns a name (or a spec) plus overrides
into a network. The diffusion schedule lives elsewhere (``harness.diffusion``): training is
``eps_loss(lambda x_t, t: dae(x_t, t, x_cond=x0), x0, alpha_bar)``, decoding is
``ddim_sample(lambda x_t, t: dae(x_t, t, z_sem=z), x_T, alpha_bar, steps)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from harness.models.encoder import SemanticEncoder
from harness.models.unet import ConditionalUNet


@dataclass(frozen=True)
class DAESpec:
    """Architecture of a DAE. Resolutions are absolute side lengths at ``image_size``.

    ``enc_num_res_blocks`` / ``enc_attn_resolutions`` default (None) to the UNet's values, as in DiffAE.
    """

    image_size: int
    base_channels: int
    channel_mult: tuple[int, ...]
    enc_channel_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    z_dim: int = 512
    dropout: float = 0.1
    enc_num_res_blocks: int | None = None
    enc_attn_resolutions: tuple[int, ...] | None = None
    time_embed_dim: int = 512
    num_heads: int = 1
    head_channels: int | None = None
    spatial_dims: int = 2

    def __post_init__(self) -> None:
        # YAML and CLI overrides deliver lists; the spec stays hashable and comparable with tuples.
        for name in ("channel_mult", "enc_channel_mult", "attn_resolutions", "enc_attn_resolutions"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"DAESpec.dropout must lie in [0, 1), got {self.dropout}")
        if self.z_dim < 1 or self.base_channels < 1:
            raise ValueError(f"DAESpec needs z_dim >= 1 and base_channels >= 1, got {self.z_dim}, {self.base_channels}")


# The two "paper" sizes are the official DiffAE 64 px autoencoder (templates.ffhq64_autoenc): 64 base channels,
# UNet (1, 2, 4, 8), encoder (1, 2, 4, 8, 8), 2 blocks per level, attention at the third level, 512-d z_sem.
# With 3 input channels this is 90,839,235 parameters and 89.3 GFLOP per training image, the official model's
# numbers exactly; with 1 channel 90,835,777. At 96 px attention sits at 24, the third level (the official code
# would silently drop attention there, since 16 is not a level at 96 px).
_PAPER = dict(base_channels=64, channel_mult=(1, 2, 4, 8), enc_channel_mult=(1, 2, 4, 8, 8), num_res_blocks=2,
              z_dim=512, dropout=0.1, time_embed_dim=512)

DAE_SIZES: dict[str, DAESpec] = {
    # ~0.7M parameters, half tiny-32's width: 2.6x its training images/s on one CPU thread (84 vs 32 at batch 32).
    "nano-32": DAESpec(image_size=32, base_channels=16, channel_mult=(1, 2, 2), enc_channel_mult=(1, 2, 2, 2),
                       num_res_blocks=1, attn_resolutions=(8,), time_embed_dim=128),
    # ~2.1M parameters, ~2 GFLOP per training image: trains on a 2-core CPU in minutes at 32 px (tests, demo, CI).
    "tiny-32": DAESpec(image_size=32, base_channels=32, channel_mult=(1, 2, 2), enc_channel_mult=(1, 2, 2, 2),
                       num_res_blocks=1, attn_resolutions=(8,), time_embed_dim=128),
    # ~5.8M parameters, ~9 GFLOP per training image: the paper's layout, slimmed, for 64 px CPU or small-GPU runs.
    "small-64": DAESpec(image_size=64, base_channels=32, channel_mult=(1, 2, 2, 4), enc_channel_mult=(1, 2, 2, 4, 4),
                        num_res_blocks=1, attn_resolutions=(16,), time_embed_dim=256),
    "paper-64": DAESpec(image_size=64, attn_resolutions=(16,), **_PAPER),
    "paper-96": DAESpec(image_size=96, attn_resolutions=(24,), **_PAPER),
}


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
