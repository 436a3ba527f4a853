"""Malformed run configurations: each is refused with one clear, one-line message naming the key and the problem."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from reliability_support import tiny_args

from harness.config import ConfigError, load_config
from harness.train_dae import main as train_main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (YAML run file, the words the message must hold)
FILE_FAULTS = {
    "unknown_top_level_key": ({"trian": {"lr": 1e-4}}, ["unknown key(s) ['trian'] in top level", "'train'"]),
    "unknown_nested_key": ({"train": {"lrate": 1e-4}}, ["unknown key(s) ['lrate'] in train", "'lr'"]),
    "wrong_type_integer": ({"train": {"batch_size": "sixteen"}}, ["train.batch_size", "expected an integer"]),
    "wrong_type_bool": ({"data": {"augment": {"enabled": "maybe"}}}, ["data.augment.enabled", "true/false"]),
    "section_not_a_mapping": ({"train": 5}, ["train", "expected a mapping"]),
    "wrong_length_list": ({"data": {"phantom_counts": [10, 2]}}, ["data.phantom_counts", "expected 3 items"]),
    "negative_lr": ({"train": {"lr": -1e-3}}, ["train.lr", "must be > 0"]),
    "zero_batch": ({"train": {"batch_size": 0}}, ["train.batch_size", "must be > 0"]),
    "unknown_precision": ({"train": {"mixed_precision": "fp8"}}, ["train.mixed_precision", "'no', 'fp16' or 'bf16'"]),
    "impossible_schedule": ({"diffusion": {"beta_start": 0.1, "beta_end": 0.01}}, ["beta_start", "start < end"]),
    "too_many_steps": ({"diffusion": {"decode_steps": 5000}}, ["diffusion.decode_steps", "1..1000"]),
}


def _assert_one_clear_message(error: BaseException, words: list[str]) -> None:
    message = str(error)
    assert "\n" not in message, f"more than one line: {message!r}"
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert error.__cause__ is None, "the message should stand alone, not chain another error"


@pytest.mark.parametrize("fault", sorted(FILE_FAULTS))
def test_a_malformed_run_file_is_refused_with_one_message(tmp_path, fault):
    content, words = FILE_FAULTS[fault]
    path = tmp_path / f"{fault}.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    _assert_one_clear_message(caught.value, [str(path), *words])


@pytest.mark.parametrize("override, words", [
    ("--train.lrate=1", ["unknown key(s) ['lrate'] in train"]),
    ("--train.lr=-1", ["train.lr", "must be > 0, got -1"]),
    ("--data.image_size=big", ["data.image_size", "expected an integer, got 'big'"]),
    ("--lr=1", ["expected --section.key"]),
])
def test_a_malformed_override_is_refused_with_one_message(override, words):
    with pytest.raises(ConfigError) as caught:
        load_config(None, [override])
    _assert_one_clear_message(caught.value, words)


def test_a_missing_run_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=f"config file not found: {tmp_path / 'nope.yaml'}"):
        load_config(tmp_path / "nope.yaml")


def test_batch_not_divisible_by_processes(shards, tmp_path):
    config = load_config(None, ["--train.batch_size=30", "--train.grad_accum=1"])
    with pytest.raises(ConfigError) as caught:
        config.train.per_process_batch(4)  # 4 processes
    _assert_one_clear_message(caught.value, ["train.batch_size=30", "processes (4)", "= 4"])
    # In the trainer (one process here): accumulation steps split the batch the same way; refused before training.
    with pytest.raises(ConfigError) as caught:
        train_main(tiny_args(shards, tmp_path / "run", **{"train.batch_size": "10", "train.grad_accum": "4"}))
    _assert_one_clear_message(caught.value, ["train.batch_size=10", "grad_accum (4)"])
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_image_size_not_divisible_by_the_unet_downsampling(shards, tmp_path):
    with pytest.raises(ValueError) as caught:  # tiny-32 halves twice: sizes must be multiples of 4
        train_main(tiny_args(shards, tmp_path / "run", **{"data.image_size": "30"}))
    message = str(caught.value)
    assert "image_size=30" in message and "not divisible by" in message and "multiple of 4" in message, message
    assert "\n" not in message
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_command_line_prints_one_line_and_exits_2(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(REPO, "harness", "train_dae.py"), "--train.lr=-1",
                           f"--train.out_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: defaults: train.lr: must be > 0, got -1"]
