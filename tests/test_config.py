"""Config loading: typed values, dotted overrides, and one clear message per mistake."""

from pathlib import Path

import pytest

from harness.config import ConfigError, RunConfig, dump_yaml, flatten, load_config

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def test_defaults_and_overrides():
    config = load_config(None, ["--train.lr=3e-4", "--data.augment.enabled", "true", "--train.total_samples=1.2e7"])
    assert config.train.lr == pytest.approx(3e-4)
    assert config.data.augment.enabled is True
    assert config.train.total_samples == 12_000_000
    assert load_config(None).train.lr == pytest.approx(2e-4)  # defaults untouched


# Run files (the sweep and baseline jobs have their own schemas, checked by their own tests).
RUN_FILES = sorted(p for p in JOBS.glob("*.yaml") if not p.name.startswith(("sweep_", "baseline_", "findings_")))


@pytest.mark.parametrize("job", RUN_FILES, ids=lambda p: p.name)
def test_every_job_file_loads_and_round_trips(job, tmp_path):
    config = load_config(job)
    assert isinstance(config, RunConfig)
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_yaml(config))
    assert load_config(saved) == config
    assert all("." in key for key in flatten(config))


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("--train.lrr=1", "unknown key(s) ['lrr'] in train"),
        ("--nosuch.key=1", "unknown key(s) ['nosuch']"),
        ("--train.lr=abc", "train.lr: expected a number"),
        ("--train.lr=-1", "train.lr: must be > 0"),
        ("--train.batch_size=2.5", "train.batch_size: expected an integer"),
        ("--train.mixed_precision=fp8", "train.mixed_precision"),
        ("--model.attn_resolutions=[16, x]", "model.attn_resolutions[1]: expected an integer"),
        ("--data.augment.p=1.5", "data.augment.p"),
        ("--diffusion.invert_steps=5000", "diffusion.invert_steps"),
        ("--train.compile=maybe", "train.compile: expected true/false"),
    ],
)
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert fragment in str(err.value)


def test_unknown_key_in_file_names_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*learning_rate"):
        load_config(bad)


def test_batch_must_split_over_processes():
    config = load_config(None, ["--train.batch_size=30", "--train.grad_accum=2"])
    assert config.train.per_process_batch(1) == 15
    with pytest.raises(ConfigError, match="not divisible by processes \\(4\\)"):
        config.train.per_process_batch(4)


def test_yaml_syntax_error_names_file(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("train: {lr: [1e-4\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        load_config(bad)


def test_an_unquoted_yaml_no_for_a_string_setting_says_to_quote_it():
    from harness.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="quote it"):
        load_config(None, ["--train.mixed_precision=no"])  # YAML 1.1: no -> False
    assert load_config(None, ['--train.mixed_precision="no"']).train.mixed_precision == "no"
