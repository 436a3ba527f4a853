"""Building blocks shared by the conditional UNet and the semantic encoder (2D or 3D via ``spatial_dims``).

The residual block follows DiffAE (Preechakul et al. 2022, Sec. 3.1): pre-activation GroupNorm -> SiLU -> conv,
then adaptive group normalisation AdaGN(h, t, z_sem) = z_s * (t_s * GroupNorm(h) + t_b), written here with
identity-centred scales, ``h * (1 + t_scale) + t_shift`` and ``* (1 + z_scale)``, so a fresh block is neutral
to its conditions. Resampling happens inside residual blocks (BigGAN-style ``resblock_updown``, as in the
official DiffAE configuration), which is what makes the paper's ~91M-parameter count at 64 px.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Resample = Literal["none", "down", "up"]


def conv_nd(spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int) -> nn.Module:
    """A 'same'-padded convolution for 2D or 3D inputs."""
    conv_classes = {2: nn.Conv2d, 3: nn.Conv3d}
    if spatial_dims not in conv_classes:
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return conv_classes[spatial_dims](in_channels, out_channels, kernel_size, padding=kernel_size // 2)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups (Wu & He 2018; every DDPM-family UNet), fewer when ``channels`` is small."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so the residual branch it ends starts as the identity map (DDPM/ADM practice)."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Transformer sinusoids of (possibly fractional) timesteps: (B,) -> (B, dim), as in DDPM's UNet."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * frequencies[None, :]  # (B, half)
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (B, 2 * half)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


def _resample(x: Tensor, mode: Resample) -> Tensor:
    """Halve (average pooling) or double (nearest neighbour) every spatial axis; 'none' passes through."""
    if mode == "down":
        return F.avg_pool2d(x, 2) if x.ndim == 4 else F.avg_pool3d(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return x


class ResBlock(nn.Module):
    """Residual block; conditioned on a time embedding (and optionally z_sem) or unconditioned.

    Conditioned (the UNet's block), with h the input branch:
        h = conv(SiLU(GN(x)))                      # in_layers
        h = GN(h) * (1 + t_scale) + t_shift        # AdaGN, time part: (t_scale, t_shift) = Linear(SiLU(t_emb))
        h = h * (1 + z_scale)                      # AdaGN, semantic part: z_scale = Linear(z_sem), an affine map
        h = zero_conv(dropout(SiLU(h)))            # out_layers
        return skip(x) + h
    Unconditioned (``time_dim=None``, the encoder's block) keeps only the first convolution, as the official
    DiffAE encoder does: its modulated second half exists only to receive the conditions.
    ``resample`` down/up applies the pooling or upsampling between the first norm/activation and the conv, and
    to the skip path (BigGAN / ADM ``resblock_updown``).
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, time_dim: int | None = None,
                 cond_dim: int | None = None, dropout: float = 0.0, resample: Resample = "none") -> None:
        super().__init__()
        if cond_dim is not None and time_dim is None:
            raise ValueError("a block conditioned on z_sem must also be conditioned on time (time_dim is None)")
        if resample not in ("none", "down", "up"):
            raise ValueError(f"resample must be 'none', 'down' or 'up', got {resample!r}")
        self.resample: Resample = resample
        self.in_norm = group_norm(in_channels)
        self.in_conv = conv_nd(spatial_dims, in_channels, out_channels, 3)
        self.conditioned = time_dim is not None
        if self.conditioned:
            self.time_proj = nn.Linear(time_dim, 2 * out_channels)  # -> (t_scale, t_shift)
            self.cond_proj = nn.Linear(cond_dim, out_channels) if cond_dim is not None else None  # -> z_scale
            self.out_norm = group_norm(out_channels)
            self.dropout = nn.Dropout(dropout)
            self.out_conv = zero_init(conv_nd(spatial_dims, out_channels, out_channels, 3))
        skip_needed = in_channels != out_channels
        self.skip = conv_nd(spatial_dims, in_channels, out_channels, 1) if skip_needed else nn.Identity()

    def forward(self, x: Tensor, t_emb: Tensor | None = None, z_sem: Tensor | None = None) -> Tensor:
        """(B, C_in, *spatial) -> (B, C_out, *spatial'), spatial' halved/doubled when resampling."""
        h = F.silu(self.in_norm(x))
        h = self.in_conv(_resample(h, self.resample))
        x = _resample(x, self.resample)
        if self.conditioned:
            if t_emb is None:
                raise ValueError("this residual block is time-conditioned but got no time embedding")
            unsqueeze = (...,) + (None,) * (h.ndim - 2)  # (B, C) -> (B, C, 1, 1[, 1])
            t_scale, t_shift = self.time_proj(F.silu(t_emb))[unsqueeze].chunk(2, dim=1)
            h = self.out_norm(h) * (1.0 + t_scale) + t_shift
            if self.cond_proj is not None:
                if z_sem is None:
                    raise ValueError("this residual block is conditioned on z_sem but got none")
                h = h * (1.0 + self.cond_proj(z_sem)[unsqueeze])
            h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all spatial positions, residual, with a zero-initialised output projection."""

    def __init__(self, channels: int, num_heads: int = 1, head_channels: int | None = None) -> None:
        super().__init__()
        if head_channels is not None:
            if channels % head_channels:
                raise ValueError(f"{channels} channels are not divisible by head_channels={head_channels}")
            num_heads = channels // head_channels
        if num_heads < 1 or channels % num_heads:
            raise ValueError(f"{channels} channels cannot be split into num_heads={num_heads} heads")
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_init(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor, *_conditions: Tensor | None) -> Tensor:
        """(B, C, *spatial) -> same shape. Extra arguments (time, z) are accepted and ignored."""
        batch, channels, *spatial = x.shape
        flat = x.reshape(batch, channels, -1)  # (B, C, N)
        qkv = self.qkv(self.norm(flat))  # (B, 3C, N)
        head_dim = channels // self.num_heads
        qkv = qkv.reshape(batch, 3, self.num_heads, head_dim, -1).permute(1, 0, 2, 4, 3)  # (3, B, heads, N, d)
        attended = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, heads, N, d)
        attended = attended.permute(0, 1, 3, 2).reshape(batch, channels, -1)  # (B, C, N)
        return (flat + self.proj_out(attended)).reshape(batch, channels, *spatial)


class ConditionedSequential(nn.ModuleList):
    """Residual and attention blocks applied in order, each handed the same (t_emb, z_sem)."""

    def forward(self, h: Tensor, t_emb: Tensor | None = None, z_sem: Tensor | None = None) -> Tensor:
        for block in self:
            h = block(h, t_emb, z_sem)
        return h


def resolution_levels(image_size: int, num_levels: int, owner: str) -> list[int]:
    """Side lengths of a UNet-style pyramid (image_size, /2, /4, ...); fails when halving would not be exact."""
    factor = 2 ** (num_levels - 1)
    if image_size % factor:
        raise ValueError(f"{owner}: image_size={image_size} is not divisible by 2**(levels - 1) = {factor} "
                         f"({num_levels} levels); choose a multiple of {factor} or fewer levels")
    return [image_size // 2**level for level in range(num_levels)]


def check_attention_resolutions(attn_resolutions: tuple[int, ...], levels: list[int], owner: str) -> None:
    """Every requested ABSOLUTE attention resolution must be one of the pyramid's levels."""
    unknown = sorted(set(attn_resolutions) - set(levels))
    if unknown:
        raise ValueError(f"{owner}: attention resolution(s) {unknown} are not levels of this network; "
                         f"available levels are {levels} (attn_resolutions are absolute side lengths)")


def check_input(x: Tensor, spatial_dims: int, in_channels: int, downsample_factor: int, owner: str) -> None:
    """Fail with a readable message on a wrong rank, channel count or a size the pyramid cannot halve."""
    if x.ndim != spatial_dims + 2 or x.shape[1] != in_channels:
        raise ValueError(f"{owner}: expected input (B, {in_channels}, {', '.join(['S'] * spatial_dims)}), "
                         f"got {tuple(x.shape)}")
    if any(size % downsample_factor for size in x.shape[2:]):
        raise ValueError(f"{owner}: spatial size {tuple(x.shape[2:])} is not divisible by {downsample_factor}")
