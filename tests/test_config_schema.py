"""Every config field, drawn at random as a command-line override: refused naming the key, or loaded valid.

The property (hypothesis) covers every field of the run config, the fields of a task under ``heads.tasks`` and
the values a user gets wrong: inf, nan, huge, negative, zero, the wrong type, unknown names. The command-line
tests check that such a value stops ``dae-cf pipeline`` with one ``error:`` line and exit status 2 before any
training starts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.config import ConfigError, RunConfig, Task, dump_yaml, load_config, validate
from harness.config.sizes import DAE_SIZES

ROOT = Path(__file__).resolve().parents[1]


def leaf_keys(cls: type, prefix: str = "") -> list[str]:
    """Dotted keys of every field of a config dataclass (nested sections walked)."""
    keys = []
    for field in dataclasses.fields(cls):
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        key = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(default):
            keys += leaf_keys(type(default), f"{key}.")
        else:
            keys.append(key)
    return keys


RUN_KEYS = leaf_keys(RunConfig)
TASK_KEYS = [field.name for field in dataclasses.fields(Task)]
BASE_TASK = {"name": "fracture", "column": "grade", "positives": [1, 2, 3], "negatives": [], "grade_range": [0, 3]}

SPECIAL = [math.inf, -math.inf, math.nan, 1e308, -1e308, 1e-320, 10**30, -(10**30), -1, -1.5, 0, 0.0, 1, 0.5, 2,
           True, False, None, "", "zzz", "huge", "inf", "1e400", "nan", "-1", [], [0, 0, 0], [1, 2], [1, 2, 3, 4],
           [math.inf], ["zzz"], {"zzz": 1}, {}]
VALUES = st.one_of(
    st.sampled_from(SPECIAL),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.text(max_size=6),
    st.lists(st.one_of(st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=3)), max_size=4),
)


def yaml_text(value: Any) -> str:
    """A value as the YAML text of an override (non-finite floats in YAML's spelling; the rest JSON, which
    YAML reads)."""
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    if isinstance(value, list):
        return "[" + ", ".join(yaml_text(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {yaml_text(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def all_finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (tuple, list)):
        return all(all_finite(item) for item in value)
    if dataclasses.is_dataclass(value):
        return all(all_finite(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, dict):
        return all(all_finite(item) for item in value.values())
    return True


def refused_naming_or_valid(overrides: list[str], key: str) -> None:
    """The property: a ConfigError naming ``key`` (a check joining several keys names the key's section and
    name), or a config whose values are finite and which reloads unchanged from its own YAML."""
    try:
        config = load_config(None, overrides)
    except ConfigError as error:
        message = str(error)
        section, _, name = key.rpartition(".")
        assert "\n" not in message
        assert key in message or (f"{section}." in message and name.split("[")[0] in message), (key, message)
        return
    assert all_finite(config), (key, overrides)
    assert validate(RunConfig, yaml.safe_load(dump_yaml(config))) == config, (key, overrides)  # config.yaml


def test_every_field_is_drawn():
    assert len(RUN_KEYS) > 80 and "eval.batch_size" in RUN_KEYS and "data.augment.rotation_deg" in RUN_KEYS
    assert "heads.tasks" in RUN_KEYS and "model.size" in RUN_KEYS and "heads.calibration" in RUN_KEYS


@pytest.mark.parametrize("key", RUN_KEYS)
@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(value=VALUES)
def test_a_drawn_value_for_any_field_is_refused_naming_it_or_loads_valid(key, value):
    refused_naming_or_valid([f"--{key}={yaml_text(value)}"], key)


@pytest.mark.parametrize("field", TASK_KEYS)
@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(value=VALUES)
def test_a_drawn_value_for_any_task_field_is_refused_naming_it_or_loads_valid(field, value):
    task = {**BASE_TASK, field: value}
    override = "--heads.tasks=[{" + ", ".join(f"{k}: {yaml_text(v)}" for k, v in task.items()) + "}]"
    refused_naming_or_valid([override], f"heads.tasks[0].{field}")


@pytest.mark.parametrize(("override", "problem"), [
    ("--train.lr=inf", "train.lr: must be a finite number"),
    ("--train.lr=1e400", "train.lr: must be a finite number"),
    ("--train.weight_decay=.inf", "train.weight_decay: must be a finite number"),
    ("--diffusion.snr_gamma=.inf", "diffusion.snr_gamma: must be a finite number"),
    ("--data.augment.rotation_deg=.nan", "data.augment.rotation_deg: must be a finite number"),
    ("--data.phantom_counts=[0, 0, 0]", "data.phantom_counts[0]: must be > 0"),
    ("--eval.batch_size=-1", "eval.batch_size: must be > 0"),
    ("--eval.counterfactual_images=0", "eval.counterfactual_images: must be >= 2"),
    ("--eval.latent_map_points=.nan", "eval.latent_map_points: must be a finite number"),
    ("--eval.strip_images=2.5", "eval.strip_images: expected an integer"),
    ("--eval.baseline_cpus=0", "eval.baseline_cpus: must be > 0"),
    ("--model.size=huge", "model.size: unknown size 'huge'; known sizes: "),
])
def test_the_reported_values_are_refused_at_load(override, problem):
    with pytest.raises(ConfigError) as caught:
        load_config(None, [override])
    message = str(caught.value)
    assert message.startswith("defaults: ") and problem in message and "\n" not in message


def test_every_bad_key_is_listed_in_one_message():
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["--train.lr=inf", "--eval.batch_size=-1", "--model.size=huge", "--data.nope=1"])
    message = str(caught.value)
    assert message.startswith("defaults: 4 problems: ") and "\n" not in message
    for key in ("train.lr: ", "eval.batch_size: ", "model.size: ", "data.nope: unknown key(s) ['nope'] in data"):
        assert key in message


def test_the_size_names_are_the_networks_own():
    from harness.models import DAE_SIZES as BUILT

    assert BUILT is DAE_SIZES  # one table: what the config checks is what build_dae builds
    for size in DAE_SIZES:
        assert load_config(None, [f"--model.size={size}"]).model.size == size


@pytest.mark.parametrize("override", ["--eval.batch_size=-1", "--train.lr=inf", "--model.size=huge"])
def test_pipeline_stops_with_one_error_line_before_training(override, tmp_path, capsys):
    from harness.command import main

    out = tmp_path / "run"
    started = time.perf_counter()
    status = main(["pipeline", "--config", str(ROOT / "jobs" / "phantoms_tiny.yaml"), override,
                   f"--train.out_dir={out}", f"--eval.out_dir={tmp_path / 'eval'}",
                   f"--data.shard_dir={tmp_path / 'shards'}"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.splitlines() == [err] and err.startswith("error: ")
    assert override.split("=")[0][2:] in err
    assert not out.exists() and not (tmp_path / "shards").exists() and not (tmp_path / "eval").exists()
    assert time.perf_counter() - started < 30  # refused at load: no data, no model, no training


def test_loading_a_config_imports_nothing_of_the_method():
    """The config is the lowest layer: the task type, head options and size names live in it, not in the method."""
    import subprocess
    import sys

    code = ("import sys, harness.config; print(sorted(m for m in sys.modules if m.startswith('harness.') "
            "and not m.startswith(('harness.config', 'harness.errors'))) "
            "+ [m for m in ('torch', 'sklearn') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
