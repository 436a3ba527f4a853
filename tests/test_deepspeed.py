"""DeepSpeed takes clipping and precision from the job file (harness/distributed.py, launch/deepspeed/zero2.json).

The resolved configuration is checked without any device; a real ZeRO-2 step runs on DeepSpeed's CPU
accelerator in a subprocess (the GPU version is in test_gpu.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers.deepspeed_step import check_zero2_step, run_step

from harness.config import ConfigError, TrainConfig, load_config
from harness.distributed import deepspeed_plugin

REPO = Path(__file__).resolve().parents[1]
ZERO2 = REPO / "launch" / "deepspeed" / "zero2.json"


def job(**train: str) -> TrainConfig:
    """The job's train section with ``train`` overridden (values as on the command line)."""
    quoted = {k: f"'{v}'" if k == "mixed_precision" else v for k, v in train.items()}  # YAML reads a bare no as False
    return load_config(None, [f"--train.{key}={value}" for key, value in quoted.items()]).train


@pytest.fixture
def deepspeed_launch(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The environment `accelerate launch --config_file launch/accelerate/deepspeed_zero2.yaml` sets."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ZERO2))
    for key in ("ACCELERATE_GRADIENT_CLIPPING", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
                "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def resolved(train: TrainConfig) -> dict[str, Any]:
    """The DeepSpeed config as Accelerate hands it to deepspeed.initialize for ``train``.

    After the plugin, Accelerate applies ``Accelerator(mixed_precision=...)`` (``set_mixed_precision``) and, when
    preparing the model, fills every remaining "auto" from its own defaults, with gradient_clipping 1.0: the call
    below is the one in ``Accelerator._prepare_deepspeed``.
    """
    plugin = deepspeed_plugin(train)
    assert plugin is not None
    plugin.set_mixed_precision(train.mixed_precision)
    plugin.deepspeed_config_process(must_match=False, gradient_clipping=1.0, train_micro_batch_size_per_gpu=4,
                                    train_batch_size=4 * train.grad_accum,
                                    **{"zero_optimization.stage3_gather_16bit_weights_on_model_save": False})
    return plugin.deepspeed_config


def test_the_shipped_json_leaves_clipping_and_precision_to_the_job():
    config = json.loads(ZERO2.read_text())
    assert config["gradient_clipping"] == "auto" and config["gradient_accumulation_steps"] == "auto"
    assert config["bf16"]["enabled"] == "auto" and config["fp16"]["enabled"] == "auto"
    assert config["torch_autocast"]["enabled"] == "auto" and config["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize(("clip", "precision", "accum"), [("0.25", "bf16", "1"), ("0.0", "no", "2"),
                                                          ("3.0", "fp16", "1")])
def test_resolved_config_has_the_jobs_clipping_accumulation_and_precision(deepspeed_launch, clip, precision,
                                                                          accum):
    config = resolved(job(grad_clip=clip, mixed_precision=precision, grad_accum=accum,
                          batch_size=str(4 * int(accum))))
    assert config["gradient_clipping"] == float(clip)  # not Accelerate's 1.0
    assert config["gradient_accumulation_steps"] == int(accum)
    assert config["torch_autocast"]["enabled"] is (precision == "bf16")
    assert config["torch_autocast"]["dtype"] == "bfloat16"
    # fp16.auto_cast casts inputs to fp16 even with fp16 off: only an fp16 run may have it
    assert config["fp16"]["enabled"] is (precision == "fp16") and config["fp16"]["auto_cast"] is (precision == "fp16")
    assert config["bf16"]["enabled"] is False  # the bf16 engine would not cast the trainer's fp32 inputs
    assert '"auto"' not in json.dumps(config)  # no value left for DeepSpeed to reject


def test_without_a_deepspeed_launch_there_is_no_plugin(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert deepspeed_plugin(job(grad_clip="0.5")) is None


@pytest.mark.parametrize(("edit", "train", "message"), [
    ({"gradient_clipping": 1.0}, {"grad_clip": "0.5"},
     r"train\.grad_clip: the job says 0\.5 .* gradient_clipping=1\.0"),
    ({"bf16": {"enabled": True}}, {"mixed_precision": "bf16"}, r"train\.mixed_precision: .*bf16 engine"),
    ({"fp16": {"enabled": True}}, {"mixed_precision": "no"},
     r"train\.mixed_precision: the job says 'no' .* enables fp16"),
    ({"torch_autocast": {"enabled": False}}, {"mixed_precision": "bf16"},
     r"train\.mixed_precision: the job says 'bf16' .* disables bf16"),
])
def test_a_number_in_the_json_that_contradicts_the_job_is_refused(deepspeed_launch, tmp_path, edit, train, message):
    config = {**json.loads(ZERO2.read_text()), **edit}
    path = tmp_path / "zero2.json"
    path.write_text(json.dumps(config))
    deepspeed_launch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path))
    with pytest.raises(ConfigError, match=message):
        deepspeed_plugin(job(**train))


def test_a_json_without_clipping_still_clips_as_the_job_says(deepspeed_launch, tmp_path):
    config = json.loads(ZERO2.read_text())
    del config["gradient_clipping"]  # DeepSpeed's default would be 0: no clipping at all
    path = tmp_path / "zero2.json"
    path.write_text(json.dumps(config))
    deepspeed_launch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path))
    assert resolved(job(grad_clip="0.75"))["gradient_clipping"] == 0.75


@pytest.mark.slow
@pytest.mark.parametrize(("clip", "precision"), [(0.25, "bf16"), (0.0, "no")])
def test_zero2_step_on_cpu_clips_and_computes_as_the_job_says(tmp_path, clip, precision):
    pytest.importorskip("deepspeed", reason="the `deepspeed` extra is not installed")
    pytest.importorskip("transformers", reason="the `deepspeed` extra is not installed (Accelerate needs transformers)")
    summary = run_step(tmp_path / "step.json", [f"--train.grad_clip={clip}", f"--train.mixed_precision='{precision}'"],
                       "cpu")
    check_zero2_step(summary, clip, precision, "cpu")
    assert not summary["fp16_engine"]
    assert summary["loss"] == summary["loss"] and 0 < summary["loss"] < 10
