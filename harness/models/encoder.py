"""The semantic encoder Enc_phi(x_0) -> z_sem (Preechakul et al. 2022, Sec. 3.1).

The down path of the UNet with its own channel multipliers and unconditioned residual blocks, a middle block,
then GroupNorm, SiLU, global average pooling and a linear map to z_dim (the official "adaptivenonzero" head).
It sees the clean image only, so z_sem carries the high-level semantics the linear heads later read.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from harness.models.layers import (
    AttentionBlock,
    ConditionedSequential,
    ResBlock,
    check_attention_resolutions,
    check_input,
    conv_nd,
    group_norm,
    resolution_levels,
)


class SemanticEncoder(nn.Module):
    """Image -> semantic code z_sem (B, z_dim).

    Args:
        spatial_dims: 2 for images, 3 for volumes.
        in_channels: image channels.
        base_channels: channels of the first level; level ``i`` has ``base_channels * channel_mult[i]``.
        channel_mult: one multiplier per level (DiffAE at 64 px: (1, 2, 4, 8, 8), one level deeper than the UNet).
        num_res_blocks: residual blocks per level.
        attn_resolutions: ABSOLUTE side lengths that get self-attention; each must be a level of this encoder.
        image_size: the side length the level pyramid is laid out for.
        z_dim: size of the semantic code (512 in the paper).
        num_heads, head_channels: attention heads, as in :class:`~harness.models.unet.ConditionalUNet`.
    """

    def __init__(self, spatial_dims: int, in_channels: int, base_channels: int, channel_mult: tuple[int, ...],
                 num_res_blocks: int, attn_resolutions: tuple[int, ...], image_size: int, z_dim: int = 512,
                 num_heads: int = 1, head_channels: int | None = None) -> None:
        super().__init__()
        if not channel_mult or num_res_blocks < 1:
            raise ValueError("SemanticEncoder needs at least one level and one residual block per level")
        levels = resolution_levels(image_size, len(channel_mult), "SemanticEncoder")
        check_attention_resolutions(tuple(attn_resolutions), levels, "SemanticEncoder")
        self.spatial_dims, self.in_channels, self.z_dim = spatial_dims, in_channels, z_dim
        self.downsample_factor = 2 ** (len(channel_mult) - 1)
        self.levels = levels

        channels = base_channels * channel_mult[0]
        self.input_conv = conv_nd(spatial_dims, in_channels, channels, 3)
        self.down_blocks = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                block = ConditionedSequential([ResBlock(spatial_dims, channels, base_channels * mult)])
                channels = base_channels * mult
                if levels[level] in attn_resolutions:
                    block.append(AttentionBlock(channels, num_heads, head_channels))
                self.down_blocks.append(block)
            if level != len(channel_mult) - 1:
                self.down_blocks.append(ConditionedSequential([ResBlock(spatial_dims, channels, channels,
                                                                        resample="down")]))
        self.middle_block = ConditionedSequential([
            ResBlock(spatial_dims, channels, channels),
            AttentionBlock(channels, num_heads, head_channels),
            ResBlock(spatial_dims, channels, channels),
        ])
        self.out_norm = group_norm(channels)
        self.to_z = nn.Linear(channels, z_dim)  # = the official 1x1 conv on the pooled features

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) clean image in [-1, 1] -> z_sem (B, z_dim)."""
        check_input(x, self.spatial_dims, self.in_channels, self.downsample_factor, "SemanticEncoder")
        h = self.input_conv(x)  # (B, base * mult[0], H, W)
        for block in self.down_blocks:
            h = block(h)
        h = self.middle_block(h)  # (B, C_max, H / f, W / f)
        pooled = F.silu(self.out_norm(h)).flatten(2).mean(dim=2)  # global average pool: (B, C_max)
        return self.to_z(pooled)  # (B, z_dim)
