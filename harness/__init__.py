"""dae-cf: counterfactual explanations of medical images with a Diffusion Autoencoder."""

__version__ = "0.1.0"
