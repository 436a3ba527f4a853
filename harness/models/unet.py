"""The DiffAE conditional UNet: eps_theta(x_t, t, z_sem) (Preechakul et al. 2022, Sec. 3.1).

An ADM-style UNet (Dhariwal & Nichol 2021) whose residual blocks take two conditions through AdaGN: the
timestep embedding (scale and shift) and the semantic code z_sem (scale). It knows nothing of the noise
schedule: it maps a noisy image, integer timesteps and a code to predicted noise.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from harness.models.layers import (
    AttentionBlock,
    ConditionedSequential,
    Resample,
    ResBlock,
    check_attention_resolutions,
    check_input,
    conv_nd,
    group_norm,
    resolution_levels,
    timestep_embedding,
    zero_init,
)


class ConditionalUNet(nn.Module):
    """Noise predictor conditioned on time and a semantic code.

    Args:
        spatial_dims: 2 for images, 3 for volumes.
        in_channels: image channels (the output has as many).
        base_channels: channels of the first level; level ``i`` has ``base_channels * channel_mult[i]``.
        channel_mult: one multiplier per resolution level; the image is halved between levels.
        num_res_blocks: residual blocks per level on the way down (one more per level on the way up).
        attn_resolutions: ABSOLUTE side lengths (e.g. 16 = the 16x16 level) that get self-attention; each must
            be one of the levels ``image_size / 2**i``.
        image_size: the side length the level pyramid is laid out for (inputs must be divisible alike).
        cond_dim: size of z_sem.
        dropout: dropout inside the residual blocks.
        num_heads: attention heads (ignored when ``head_channels`` is given).
        head_channels: channels per attention head; overrides ``num_heads``.
        time_embed_dim: width of the timestep-embedding MLP (DiffAE uses 512).
    """

    def __init__(self, spatial_dims: int, in_channels: int, base_channels: int, channel_mult: tuple[int, ...],
                 num_res_blocks: int, attn_resolutions: tuple[int, ...], image_size: int, cond_dim: int = 512,
                 dropout: float = 0.1, num_heads: int = 1, head_channels: int | None = None,
                 time_embed_dim: int = 512) -> None:
        super().__init__()
        if not channel_mult or num_res_blocks < 1:
            raise ValueError("ConditionalUNet needs at least one level and one residual block per level")
        levels = resolution_levels(image_size, len(channel_mult), "ConditionalUNet")
        check_attention_resolutions(tuple(attn_resolutions), levels, "ConditionalUNet")
        self.spatial_dims, self.in_channels, self.base_channels = spatial_dims, in_channels, base_channels
        self.downsample_factor = 2 ** (len(channel_mult) - 1)
        self.levels = levels

        def res(c_in: int, c_out: int, resample: Resample = "none") -> ResBlock:
            return ResBlock(spatial_dims, c_in, c_out, time_embed_dim, cond_dim, dropout, resample)

        def attn(channels: int) -> AttentionBlock:
            return AttentionBlock(channels, num_heads, head_channels)

        # Sinusoids of width base_channels -> MLP (DDPM / DiffAE).
        self.time_embed = nn.Sequential(
            nn.Linear(base_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )

        # Down path: every block's output is kept as a skip for the up path.
        channels = base_channels * channel_mult[0]
        self.input_conv = conv_nd(spatial_dims, in_channels, channels, 3)
        skip_channels = [channels]
        self.down_blocks = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                block = ConditionedSequential([res(channels, base_channels * mult)])
                channels = base_channels * mult
                if levels[level] in attn_resolutions:
                    block.append(attn(channels))
                self.down_blocks.append(block)
                skip_channels.append(channels)
            if level != len(channel_mult) - 1:
                self.down_blocks.append(ConditionedSequential([res(channels, channels, "down")]))
                skip_channels.append(channels)

        self.middle_block = ConditionedSequential([res(channels, channels), attn(channels), res(channels, channels)])

        # Up path: num_res_blocks + 1 blocks per level, each consuming one skip (concatenated on channels).
        self.up_blocks = nn.ModuleList()
        for level in reversed(range(len(channel_mult))):
            for index in range(num_res_blocks + 1):
                out_channels = base_channels * channel_mult[level]
                block = ConditionedSequential([res(channels + skip_channels.pop(), out_channels)])
                channels = out_channels
                if levels[level] in attn_resolutions:
                    block.append(attn(channels))
                if level > 0 and index == num_res_blocks:
                    block.append(res(channels, channels, "up"))
                self.up_blocks.append(block)

        # The output conv starts at zero, so a fresh network predicts eps = 0 (ADM / DiffAE practice).
        self.out = nn.Sequential(group_norm(channels), nn.SiLU(),
                                 zero_init(conv_nd(spatial_dims, channels, in_channels, 3)))

    def forward(self, x: Tensor, t: Tensor, z_sem: Tensor) -> Tensor:
        """x (B, C, H, W) noisy image, t (B,) long timesteps, z_sem (B, cond_dim) -> predicted eps (B, C, H, W)."""
        check_input(x, self.spatial_dims, self.in_channels, self.downsample_factor, "ConditionalUNet")
        if t.shape != (x.shape[0],):
            raise ValueError(f"ConditionalUNet: t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
        if z_sem.ndim != 2 or z_sem.shape[0] != x.shape[0]:
            raise ValueError(f"ConditionalUNet: z_sem must have shape ({x.shape[0]}, cond_dim), "
                             f"got {tuple(z_sem.shape)}")
        t_emb = self.time_embed(timestep_embedding(t, self.base_channels).to(x.dtype))  # (B, time_embed_dim)
        z_sem = z_sem.to(x.dtype)
        h = self.input_conv(x)  # (B, base * mult[0], H, W)
        skips = [h]
        for block in self.down_blocks:
            h = block(h, t_emb, z_sem)
            skips.append(h)
        h = self.middle_block(h, t_emb, z_sem)  # (B, C_max, H / f, W / f)
        for block in self.up_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), t_emb, z_sem)  # skip joins on channels
        return self.out(h)  # (B, C, H, W)

