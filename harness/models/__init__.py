"""The Diffusion Autoencoder network: semantic encoder, conditional UNet, size registry and FLOP counts."""

from harness.models.dae import DAE, DAE_SIZES, DAESpec, build_dae
from harness.models.encoder import SemanticEncoder
from harness.models.flops import forward_flops_per_image, training_flops_per_image
from harness.models.unet import ConditionalUNet

__all__ = [
    "DAE",
    "DAE_SIZES",
    "ConditionalUNet",
    "DAESpec",
    "SemanticEncoder",
    "build_dae",
    "forward_flops_per_image",
    "training_flops_per_image",
]
