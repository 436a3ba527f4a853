"""Encode / invert / decode with a trained DAE: the API the method half of the project builds on.

``DiffusionAutoencoder`` pairs a DAE network with its noise schedule and exposes the three operations of the
paper's Section 3.2: ``encode(x) -> z_sem``, ``invert(x, z, steps) -> x_T`` (deterministic DDIM inversion) and
``decode(z, x_T, steps) -> x``. Inputs of any batch size are processed in chunks of ``batch_size`` on the
autoencoder's device and returned on the caller's device.

The network may predict eps or v (``diffusion.prediction``): :meth:`DiffusionAutoencoder.eps_fn` wraps it as the
eps-predictor the DDIM functions consume. ``diffusion.clip_x0`` clamps the predicted x_0 at each decoding step and
``diffusion.invert_to`` inverts to / decodes from that timestep instead of T-1 (partial depth).
``diffusion.inversion: fixed_point`` solves each inversion step so that it undoes the decoder's step exactly
(:mod:`harness.diffusion.inversion`): with equal inversion and decoding step counts the round trip is exact up to the
iteration residual, so few steps suffice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from harness.checkpoint import CheckpointError, load_state_dict
from harness.config import RunConfig
from harness.diffusion import (
    PREDICTIONS,
    DenoiseFn,
    alphas_cumprod,
    ddim_invert,
    ddim_sample,
    eps_fn_from_output,
    linear_betas,
)
from harness.diffusion.inversion import INVERSIONS, invert
from harness.fileio import sha256_file
from harness.model_spec import SPEC_NAME, WEIGHTS_NAME, ModelSpec, read_model_spec
from harness.models import DAE

PRECISIONS = ("fp32", "bf16")


def _chunked(fn: Callable[..., Tensor], batch_size: int, *tensors: Tensor) -> Tensor:
    """Apply ``fn`` to aligned slices of ``tensors`` and concatenate along the batch dimension."""
    n = tensors[0].shape[0]
    outputs = [fn(*(t[i:i + batch_size] for t in tensors)) for i in range(0, n, batch_size)]
    return torch.cat(outputs, dim=0)


class DiffusionAutoencoder:
    """A DAE with its schedule; device-agnostic and batched. All images are (B, C, H, W) in [-1, 1].

    ``prediction`` ("eps" | "v") is what the network outputs; ``clip_x0`` clamps the predicted x_0 to [-1, 1] at
    every decoding step; ``invert_to`` (a timestep, None = T-1) is the depth of inversion and the start of
    decoding; ``inversion`` ("ddim" | "fixed_point") with ``fixed_point_iters`` / ``fixed_point_anderson`` is how
    each inversion step is solved. ``precision`` ("fp32" | "bf16") runs the networks under bf16 autocast,
    ``channels_last`` stores activations NHWC and ``compile`` wraps the network in ``torch.compile``; the
    benchmark ``benchmarks/ce_speed.py`` measures where each pays. :meth:`from_config` reads them all from
    ``config.diffusion``.
    """

    def __init__(self, dae: DAE, alpha_bar: Tensor, device: str | torch.device | None = None,
                 batch_size: int = 64, invert_steps: int = 250, decode_steps: int = 100,
                 dtype: torch.dtype = torch.float32, prediction: str = "eps", clip_x0: bool = False,
                 invert_to: int | None = None, inversion: str = "ddim", fixed_point_iters: int = 4,
                 fixed_point_anderson: bool = True, precision: str = "fp32", channels_last: bool = False,
                 compile: bool = False) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if inversion not in INVERSIONS:
            raise ValueError(f"inversion must be one of {INVERSIONS}, got {inversion!r}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dae = dae.to(self.device).eval()
        self.alpha_bar = alpha_bar
        self.batch_size = batch_size
        self.invert_steps = invert_steps
        self.decode_steps = decode_steps
        self.dtype = dtype
        self.prediction = prediction
        self.clip_x0 = clip_x0
        self.invert_to = invert_to
        self.inversion = inversion
        self.fixed_point_iters = fixed_point_iters
        self.fixed_point_anderson = fixed_point_anderson
        self.precision = precision
        self.channels_last = channels_last
        if channels_last:
            self.dae = self.dae.to(memory_format=torch.channels_last)
        # The network as called per step; compiled lazily by torch on the first call (minutes on a CPU).
        self._network: Callable[..., Tensor] = torch.compile(self.dae) if compile else self.dae

    def _network_context(self) -> contextlib.AbstractContextManager:
        """bf16 autocast around network calls only: the sampler's state and its updates (Eq. 12) stay fp32.

        fp32 leaves any autocast the caller opened in force (``enabled=False`` would switch it off).
        """
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _layout(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @classmethod
    def from_config(cls, dae: DAE, config: RunConfig, **kwargs) -> DiffusionAutoencoder:
        d = config.diffusion
        alpha_bar = alphas_cumprod(linear_betas(d.num_timesteps, d.beta_start, d.beta_end))
        kwargs.setdefault("invert_steps", d.invert_steps)
        kwargs.setdefault("decode_steps", d.decode_steps)
        kwargs.setdefault("prediction", d.prediction)
        kwargs.setdefault("clip_x0", d.clip_x0)
        kwargs.setdefault("invert_to", d.invert_to)
        kwargs.setdefault("inversion", d.inversion)
        kwargs.setdefault("fixed_point_iters", d.fixed_point_iters)
        kwargs.setdefault("fixed_point_anderson", d.fixed_point_anderson)
        return cls(dae, alpha_bar, **kwargs)

    @classmethod
    def load(cls, model_dir: str | Path, **kwargs) -> DiffusionAutoencoder:
        """From an exported model folder (``<run>/final``) or a checkpoint folder (local; see :func:`load_dae`)."""
        dae, spec = load_dae(model_dir)
        return cls.from_config(dae, spec.run_config(), **kwargs)

    def eps_fn(self, z: Tensor) -> DenoiseFn:
        """The eps-predictor conditioned on z_sem (B, D): ``(x_t (B, C, H, W), t (B,) long) -> eps (B, C, H, W)``.

        ``z`` is moved to the autoencoder's device and dtype; ``x_t`` must be there already. A v-network's output
        is converted with ``eps = sqrt(1 - ab_t) x_t + sqrt(ab_t) v`` (:func:`harness.diffusion.eps_fn_from_output`).
        No gradient context is imposed: wrap calls in ``torch.no_grad()`` unless gradients are wanted.
        """
        z = z.to(self.device, self.dtype)

        def network(x_t: Tensor, t: Tensor) -> Tensor:
            with self._network_context():
                return self._network(self._layout(x_t), t, z_sem=z).float()

        return eps_fn_from_output(network, self.alpha_bar, self.prediction)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> z_sem (B, D)."""
        out_device = x.device

        def run(xb: Tensor) -> Tensor:
            with self._network_context():
                return self.dae.encode(self._layout(xb.to(self.device, self.dtype))).float()

        return _chunked(run, self.batch_size, x).to(out_device)

    @torch.no_grad()
    def invert(self, x: Tensor, z: Tensor, steps: int | None = None) -> Tensor:
        """Deterministic inversion x_0 -> x_T conditioned on z_sem. (B, C, H, W).

        The code sits at timestep ``invert_to`` (T-1 when None); ``steps`` spaces the full schedule. ``inversion``
        picks plain DDIM or fixed-point refined steps; the latter is exact for a decode with the same ``steps``.
        """
        steps = steps or self.invert_steps
        out_device = x.device

        def run(xb: Tensor, zb: Tensor) -> Tensor:
            xb, zb = xb.to(self.device, self.dtype), zb.to(self.device, self.dtype)
            if self.inversion == "ddim":  # today's path, called directly so the default stays bit-identical
                x_T = ddim_invert(self.eps_fn(zb), xb, self.alpha_bar, steps, t_end=self.invert_to)
            else:
                x_T = invert(self.eps_fn(zb), xb, self.alpha_bar, steps, self.inversion, self.fixed_point_iters,
                             anderson=self.fixed_point_anderson, t_end=self.invert_to)
            return x_T.float()

        return _chunked(run, self.batch_size, x, z).to(out_device)

    @torch.no_grad()
    def decode(self, z: Tensor, x_T: Tensor, steps: int | None = None, from_noise: bool = False) -> Tensor:
        """DDIM sampling x_T -> x_0 conditioned on z_sem. (B, C, H, W), clipped to [-1, 1].

        ``x_T`` is taken to sit at timestep ``invert_to`` (T-1 when None), as :meth:`invert` returns it;
        ``from_noise=True`` starts at T-1 whatever the inversion depth (for pure Gaussian noise as x_T).
        """
        steps = steps or self.decode_steps
        out_device = x_T.device
        t_start = None if from_noise else self.invert_to

        def run(zb: Tensor, xb: Tensor) -> Tensor:
            xb, zb = xb.to(self.device, self.dtype), zb.to(self.device, self.dtype)
            x0 = ddim_sample(self.eps_fn(zb), xb, self.alpha_bar, steps, clip_x0=self.clip_x0,
                             t_start=t_start)  # (B, C, H, W)
            return x0.float().clamp(-1, 1)

        return _chunked(run, self.batch_size, z, x_T).to(out_device)

    def reconstruct(self, x: Tensor, invert_steps: int | None = None, decode_steps: int | None = None) -> Tensor:
        """encode -> invert -> decode: the DAE's reconstruction of ``x``."""
        z = self.encode(x)
        return self.decode(z, self.invert(x, z, invert_steps), decode_steps)


def load_dae(model_dir: str | Path) -> tuple[DAE, ModelSpec]:
    """Build the DAE described by ``model_dir``'s ``dae_spec.json`` (older folders: ``config.yaml``) and load its
    EMA weights; returns the network (eval mode) and its :class:`~harness.model_spec.ModelSpec`.

    ``model_dir`` is a local folder: entry points turn an MLflow model URI into one with
    :func:`harness.ops.tracking.local_model_dir` (the method never talks to MLflow).
    """
    if str(model_dir).startswith(("models:/", "runs:/")):
        raise CheckpointError(f"error: {model_dir} is an MLflow model URI; fetch it first with "
                              "harness.ops.tracking.local_model_dir (the dae-cf verbs do this for you)")
    model_dir = Path(model_dir)
    spec = read_model_spec(model_dir)
    weights = model_dir / WEIGHTS_NAME
    if spec.weights_sha256 and weights.is_file() and sha256_file(weights) != spec.weights_sha256:
        raise CheckpointError(f"error: {weights} is not the file {model_dir / SPEC_NAME} describes (checksum "
                              "differs): copy the model folder as a whole, or re-export it")
    dae = spec.build()
    state = load_state_dict(weights)
    try:
        dae.load_state_dict(state, strict=True)
    except RuntimeError as err:  # missing / unexpected keys or shape mismatches, all listed by torch
        raise CheckpointError(f"{weights} does not match model size {spec.size!r}: {err}") from None
    return dae.eval(), spec
