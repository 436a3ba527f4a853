"""Self-describing model folders: ``dae_spec.json`` holds everything needed to load and run a DAE.

An exported model (``<run>/final``) and every checkpoint carry, beside ``ema.safetensors``::

    dae_spec.json   format_version, architecture (every DAESpec field, resolved), in_channels, diffusion
                    (schedule, prediction and the inversion / decoding defaults), dataset, render,
                    weights_sha256

Loading reads only this file (and the weights), never the run's whole ``config.yaml``: renaming or adding a
training or evaluation setting cannot make an exported or served model unloadable. Folders written before
``dae_spec.json`` existed still load from their ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.checkpoint import CheckpointError
from harness.config import CounterfactualConfig, DataConfig, DiffusionConfig, RunConfig, load_config
from harness.fileio import sha256_file, write_json_atomic
from harness.models import DAE, DAE_SIZES, DAESpec

SPEC_NAME = "dae_spec.json"
SPEC_VERSION = 1
WEIGHTS_NAME = "ema.safetensors"
# Without these the network's output cannot be interpreted; everything else in ``diffusion`` has a default.
_REQUIRED_DIFFUSION = ("num_timesteps", "beta_start", "beta_end", "prediction")


@dataclass(frozen=True)
class ModelSpec:
    """The resolved architecture and diffusion settings of one trained DAE."""

    architecture: DAESpec
    in_channels: int
    diffusion: DiffusionConfig
    size: str = "custom"  # the DAE_SIZES name it was built from, for people (the architecture is what loads)
    dataset: str = ""  # name of the shard folder it was trained on
    render: str = "decode"  # the counterfactual rendering its run used
    local_threshold: float = CounterfactualConfig.local_threshold  # and, for "local", its mask threshold
    weights_sha256: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # fields of a newer version, kept but not used

    @property
    def image_size(self) -> int:
        return self.architecture.image_size

    @classmethod
    def from_config(cls, config: RunConfig) -> ModelSpec:
        """The spec a run config builds (``model.size`` plus overrides, resolved)."""
        overrides = config.model.overrides(config.data.image_size)
        architecture = dataclasses.replace(DAE_SIZES[config.model.size], **overrides)
        return cls(architecture=architecture, in_channels=config.data.channels, diffusion=config.diffusion,
                   size=config.model.size, dataset=Path(config.data.shard_dir).name,
                   render=config.counterfactual.render, local_threshold=config.counterfactual.local_threshold)

    def run_config(self) -> RunConfig:
        """A run config with this model's data geometry, diffusion and rendering (defaults elsewhere)."""
        data = DataConfig(source="shards", shard_dir=self.dataset or "unknown", image_size=self.image_size,
                          channels=self.in_channels)
        counterfactual = CounterfactualConfig(render=self.render, local_threshold=self.local_threshold)
        return RunConfig(data=data, diffusion=self.diffusion, counterfactual=counterfactual)

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": SPEC_VERSION, "size": self.size,
                "architecture": dataclasses.asdict(self.architecture), "in_channels": self.in_channels,
                "diffusion": dataclasses.asdict(self.diffusion), "dataset": self.dataset, "render": self.render,
                "local_threshold": self.local_threshold, "weights_sha256": self.weights_sha256, **self.extra}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> ModelSpec:
        """Parse a ``dae_spec.json``; a missing or malformed field raises ``CheckpointError`` naming it."""
        version = data.get("format_version")
        if not isinstance(version, int) or version > SPEC_VERSION:
            raise CheckpointError(f"error: {where}: format_version {version!r} is not one this version reads "
                                  f"(<= {SPEC_VERSION}): upgrade dae-cf or re-export the model")
        for key in ("architecture", "in_channels", "diffusion"):
            if key not in data:
                raise CheckpointError(f"error: {where}: missing field {key!r}: re-export the model folder")
        arch_fields = {f.name for f in dataclasses.fields(DAESpec)}
        unknown = sorted(set(data["architecture"]) - arch_fields)
        if unknown:
            raise CheckpointError(f"error: {where}: architecture field(s) {unknown} are not known to this version "
                                  "of dae-cf: upgrade it to load this model")
        try:
            architecture = DAESpec(**data["architecture"])
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"error: {where}: architecture: {err}") from None
        diffusion_in = dict(data["diffusion"])
        missing = [k for k in _REQUIRED_DIFFUSION if k not in diffusion_in]
        if missing:
            raise CheckpointError(f"error: {where}: diffusion lacks {missing}: re-export the model folder")
        known = {f.name for f in dataclasses.fields(DiffusionConfig)}
        ignored = sorted(set(diffusion_in) - known)
        if ignored:  # inference defaults of another version: the schedule itself is complete (checked above)
            warnings.warn(f"{where}: ignoring diffusion setting(s) {ignored} unknown to this version", stacklevel=2)
        try:
            diffusion = DiffusionConfig(**{k: v for k, v in diffusion_in.items() if k in known})
        except ValueError as err:
            raise CheckpointError(f"error: {where}: diffusion: {err}") from None
        extra = {k: v for k, v in data.items() if k not in {
            "format_version", "size", "architecture", "in_channels", "diffusion", "dataset", "render",
            "local_threshold", "weights_sha256"}}
        return cls(architecture=architecture, in_channels=int(data["in_channels"]), diffusion=diffusion,
                   size=str(data.get("size", "custom")), dataset=str(data.get("dataset", "")),
                   render=str(data.get("render", "decode")),
                   local_threshold=float(data.get("local_threshold", CounterfactualConfig.local_threshold)),
                   weights_sha256=str(data.get("weights_sha256", "")), extra=extra)

    def build(self) -> DAE:
        """An untrained network of this architecture."""
        return DAE(self.architecture, in_channels=self.in_channels)


def write_model_spec(folder: str | Path, model: RunConfig | ModelSpec) -> ModelSpec:
    """Write ``dae_spec.json`` of ``model`` (a run config, or a spec) for the weights already in ``folder`` (their
    checksum included), atomically."""
    folder = Path(folder)
    spec = model if isinstance(model, ModelSpec) else ModelSpec.from_config(model)
    spec = dataclasses.replace(spec, weights_sha256=sha256_file(folder / WEIGHTS_NAME))
    write_json_atomic(folder / SPEC_NAME, spec.to_dict())
    return spec


def read_model_spec(folder: str | Path) -> ModelSpec:
    """The spec of a model or checkpoint folder: ``dae_spec.json``, else (older folders) its ``config.yaml``."""
    folder = Path(folder)
    path = folder / SPEC_NAME
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"error: {path} is not valid JSON ({err}): re-export the model folder") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"error: {path} does not hold a JSON object: re-export the model folder")
        return ModelSpec.from_dict(data, where=str(path))
    config_path = folder / "config.yaml"
    if config_path.is_file():
        return ModelSpec.from_config(load_config(config_path))
    raise CheckpointError(f"error: {folder} has neither {SPEC_NAME} nor config.yaml: not an exported model or "
                          "checkpoint folder")
