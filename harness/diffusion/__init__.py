"""Diffusion math as pure functions: schedules, forward noising, the training losses (eps or v targets, optional
Min-SNR weighting), DDIM sampling and inversion (full or partial depth), and fixed-point refined inversion that undoes
the sampler exactly at few steps."""

from harness.diffusion.ddim import CLEAN, DenoiseFn, ddim_invert, ddim_sample, ddim_step, eps_loss, q_sample
from harness.diffusion.inversion import (
    INVERSIONS,
    counterfactual_nfe,
    fixed_point_invert,
    fixed_point_step,
    inversion_nfe,
    invert,
    walk_length,
)
from harness.diffusion.objectives import (
    PREDICTIONS,
    WEIGHTINGS,
    ModelFn,
    diffusion_loss,
    eps_fn_from_output,
    eps_x0_from_output,
    min_snr_weight,
    prediction_target,
    snr,
    v_from_eps_x0,
)
from harness.diffusion.schedule import alphas_cumprod, linear_betas, respaced_timesteps

__all__ = [
    "CLEAN",
    "INVERSIONS",
    "PREDICTIONS",
    "WEIGHTINGS",
    "DenoiseFn",
    "ModelFn",
    "alphas_cumprod",
    "counterfactual_nfe",
    "ddim_invert",
    "ddim_sample",
    "ddim_step",
    "diffusion_loss",
    "eps_fn_from_output",
    "eps_loss",
    "eps_x0_from_output",
    "fixed_point_invert",
    "fixed_point_step",
    "inversion_nfe",
    "invert",
    "linear_betas",
    "min_snr_weight",
    "prediction_target",
    "q_sample",
    "respaced_timesteps",
    "snr",
    "v_from_eps_x0",
    "walk_length",
]
