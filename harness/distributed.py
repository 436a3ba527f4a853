"""What a distributed launch takes from the job file: the DeepSpeed plugin built from ``train.*``.

``accelerate launch --config_file launch/accelerate/deepspeed_zero2.yaml`` points Accelerate at
``launch/deepspeed/zero2.json``, whose clipping, accumulation and precision are ``"auto"`` so that the job file
decides. Two of them Accelerate cannot fill from the job by itself, which is why the plugin is built here:

- ``gradient_clipping``: left ``"auto"``, Accelerate fills it with its own 1.0 when preparing the model, so
  ``train.grad_clip`` would be ignored; it is passed to the plugin instead (0 disables clipping, as without
  DeepSpeed).
- bf16: DeepSpeed's bf16 engine keeps bf16 weights and, unlike its fp16 engine (``auto_cast``), does not cast
  the trainer's fp32 inputs, so the first forward would fail on a dtype mismatch. bf16 therefore runs as
  DeepSpeed's ``torch_autocast`` (fp32 weights, bf16 compute: the same arithmetic as Accelerate's autocast
  without DeepSpeed), and the bf16 engine stays off. fp16 uses DeepSpeed's fp16 engine (enabled by Accelerate
  from ``Accelerator(mixed_precision=...)``) with its loss scaling and ``auto_cast``, set here for fp16 runs
  only.

A number written into the JSON that contradicts the job is refused, so neither setting is ignored silently.
"""

from __future__ import annotations

from typing import Any

from accelerate.utils import DeepSpeedPlugin, parse_flag_from_env

from harness.config import ConfigError, TrainConfig


def _flag(value: Any) -> bool | str:
    """A DeepSpeed ``enabled`` value as True / False, or "auto" (JSON may hold a bool or a string)."""
    if value == "auto":
        return "auto"
    return str(value).lower() == "true"


def deepspeed_plugin(train: TrainConfig) -> DeepSpeedPlugin | None:
    """The DeepSpeed plugin for a run that ``accelerate launch`` started with a DeepSpeed config, else None.

    Reads the DeepSpeed JSON named by the launch config (``ACCELERATE_DEEPSPEED_CONFIG_FILE``) and fills its
    ``"auto"`` clipping, accumulation and bf16 settings from ``train``; see the module docstring for why.
    """
    if not parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):  # set by `accelerate launch` from its config file
        return None
    plugin = DeepSpeedPlugin(gradient_clipping=train.grad_clip, gradient_accumulation_steps=train.grad_accum)
    config = plugin.deepspeed_config
    # A JSON without the key would mean no clipping at all (DeepSpeed's default is 0), whatever the job says.
    clip = config.setdefault("gradient_clipping", train.grad_clip)
    if float(clip) != float(train.grad_clip):
        raise ConfigError(f"train.grad_clip: the job says {train.grad_clip} but the DeepSpeed config says "
                          f"gradient_clipping={clip}; write \"auto\" there to take the job's value")

    wants = train.mixed_precision
    bf16 = config.setdefault("bf16", {})
    if _flag(bf16.get("enabled", "auto")) is True:
        raise ConfigError("train.mixed_precision: the DeepSpeed config enables DeepSpeed's bf16 engine, which does "
                          "not cast the trainer's fp32 inputs; write \"auto\" for bf16.enabled (bf16 then runs as "
                          "torch_autocast)")
    bf16["enabled"] = False  # also when "auto": Accelerate would otherwise switch the bf16 engine on
    autocast = config.setdefault("torch_autocast", {})
    if _flag(autocast.get("enabled", "auto")) == "auto":
        autocast["enabled"] = wants == "bf16"
    if autocast["enabled"] and autocast.setdefault("dtype", "bfloat16") != "bfloat16":
        raise ConfigError(f"train.mixed_precision: the DeepSpeed config's torch_autocast.dtype is "
                          f"{autocast['dtype']!r}; only bfloat16 is supported here (fp16 uses the fp16 engine)")
    fp16 = config.setdefault("fp16", {})
    fp16_enabled = _flag(fp16.get("enabled", "auto"))
    configured = {"fp16": fp16_enabled is True, "bf16": bool(autocast["enabled"])}
    for dtype, enabled in configured.items():
        if enabled != (wants == dtype) and not (dtype == "fp16" and fp16_enabled == "auto"):
            raise ConfigError(f"train.mixed_precision: the job says {wants!r} but the DeepSpeed config "
                              f"{'enables' if enabled else 'disables'} {dtype}; write \"auto\" there to take the "
                              "job's value")
    # DeepSpeed casts every floating input to fp16 whenever fp16.auto_cast is set, even with fp16 off, so it is
    # set for fp16 runs only (where the fp16 engine needs it: the trainer feeds fp32 images).
    fp16["auto_cast"] = wants == "fp16"
    return plugin
