"""The named DAE architectures: pure data, read by the config (``model.size`` is checked when a config loads)
and by ``harness.models`` (which builds the networks)."""

from __future__ import annotations

from dataclasses import dataclass


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
