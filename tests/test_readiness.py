"""Train until ready: the pure verdict, the config section, a run that stops as not improving, a two-process run
that stops as ready at min_samples, and the marks on reports and figures of a model that is not ready."""

from __future__ import annotations

import json
import math
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.training import REPO, run_training, tiny_args
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from harness import checkpoint as ckpt
from harness.config import ConfigError, load_config
from harness.config.schema import ReadinessConfig
from harness.evaluation.figures import marked_figures, save_gif, save_image_grid
from harness.evaluation.readiness import (
    BUDGET_SPENT,
    READINESS_FILE,
    READY,
    assess_readiness,
    not_ready_text,
    read_readiness,
    readiness_score,
    readiness_tag,
)
from harness.evaluation.report import Report, check_report
from harness.train_dae import main as train_main

TASK = "[{name: fracture, column: grade, positives: [1, 2, 3]}]"
THRESHOLDS = ReadinessConfig(enabled=True, z_usage_min=0.15, z_usage_t=250, ce_validity_min=0.5,
                             floor_margin_min=0.0, patience=2, min_delta=0.01)


def probe(usage: float = 0.2, validity: float = 0.6, margin: float = 0.05, samples: int = 0) -> dict:
    return {"samples_seen": samples, "z_usage_t250": usage, "ce_validity": validity, "floor_margin": margin}


# ---------------------------------------------------------------------------------------------------- the verdict


def test_a_probe_meeting_every_threshold_is_ready_and_stops_as_ready():
    verdict = assess_readiness([probe(0.01, 0.0, -0.2), probe()], THRESHOLDS, samples_seen=2000, total_samples=9000)
    assert verdict.ready and verdict.missing == [] and verdict.score == 0.0
    assert verdict.should_stop and verdict.stopped_because == READY and verdict.best_index == 1


def test_missing_lines_name_the_figure_its_value_and_its_threshold():
    verdict = assess_readiness([probe(0.08, float("nan"), 0.05)], THRESHOLDS, samples_seen=100, total_samples=9000)
    assert not verdict.ready and not verdict.should_stop and verdict.stopped_because is None
    assert verdict.missing == ["z-usage at t=250 0.080 < 0.15", "probe CE validity not measured (needs >= 0.5)"]
    assert verdict.score == pytest.approx(-(0.07 + 1.0))  # a figure that could not be measured counts fully missing


def test_not_improving_counts_probes_since_the_best_by_min_delta():
    stuck = [probe(0.05, 0.1, samples=s) for s in (1, 2)]
    assert not assess_readiness(stuck, THRESHOLDS, samples_seen=2, total_samples=9).should_stop  # 1 probe old
    history = [*stuck, probe(0.055, 0.1, samples=3)]  # +0.005 < min_delta: not an improvement
    verdict = assess_readiness(history, THRESHOLDS, samples_seen=3, total_samples=9)
    assert verdict.best_index == 0 and verdict.probes_since_best == 2
    assert verdict.should_stop and verdict.stopped_because == "not improving for 2 probes"
    better = [*stuck, probe(0.07, 0.1, samples=3)]  # +0.02: the clock restarts
    assert not assess_readiness(better, THRESHOLDS, samples_seen=3, total_samples=9).should_stop


def test_min_samples_budget_and_stop_when_ready():
    late = ReadinessConfig(**{**THRESHOLDS.__dict__, "min_samples": 5000})
    assert not assess_readiness([probe()], late, samples_seen=4999, total_samples=9000).should_stop
    assert assess_readiness([probe()], late, samples_seen=5000, total_samples=9000).stopped_because == READY
    stuck = [probe(0.0, 0.0, samples=s) for s in range(5)]
    assert not assess_readiness(stuck, late, samples_seen=4000, total_samples=9000).should_stop
    assert assess_readiness(stuck, late, samples_seen=9000, total_samples=9000).stopped_because == BUDGET_SPENT
    patient = ReadinessConfig(**{**THRESHOLDS.__dict__, "patience": None})
    assert not assess_readiness(stuck, patient, samples_seen=10, total_samples=9000).should_stop
    assess_only = ReadinessConfig(**{**THRESHOLDS.__dict__, "stop_when_ready": False})
    verdict = assess_readiness([probe()] * 5, assess_only, samples_seen=10, total_samples=9000)
    assert verdict.ready and not verdict.should_stop  # ready runs go on to the budget; patience only while not
    assert assess_readiness([], THRESHOLDS, samples_seen=0, total_samples=1).missing == ["no probe has run yet"]
    with pytest.raises(ValueError, match="total_samples"):
        assess_readiness([], THRESHOLDS, samples_seen=0, total_samples=0)


figure = st.one_of(st.floats(-1.5, 1.5), st.just(float("nan")))
threshold = st.one_of(st.none(), st.floats(-1.0, 1.0))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(figure, figure, figure), min_size=1, max_size=6), threshold, threshold, threshold,
       st.floats(0, 0.5), st.integers(0, 3), st.integers(0, 20_000), st.integers(1, 20_000))
def test_verdict_properties(figures, usage_min, validity_min, margin_min, raise_by, which, samples, total):
    validity_min = None if validity_min is None else abs(validity_min)
    loose = ReadinessConfig(enabled=True, z_usage_min=usage_min, ce_validity_min=validity_min,
                            floor_margin_min=margin_min, patience=2, min_samples=5000)
    history = [probe(*f, samples=i) for i, f in enumerate(figures)]
    verdict = assess_readiness(history, loose, samples_seen=samples, total_samples=total)
    # ready exactly when nothing is missing, which is exactly a score of 0; the score is never positive
    assert verdict.ready == (verdict.missing == []) == (verdict.score == 0.0) and verdict.score <= 0.0
    assert verdict.should_stop == (verdict.stopped_because is not None)
    if samples < 5000:  # nothing but the budget stops a run before min_samples
        assert verdict.stopped_because in (None, BUDGET_SPENT)
    if samples >= total and not verdict.ready:
        assert verdict.stopped_because == BUDGET_SPENT
    # a stricter threshold never makes a model more ready: monotone in every threshold
    field = ("z_usage_min", "ce_validity_min", "floor_margin_min")[which % 3]
    if getattr(loose, field) is not None:
        stricter = ReadinessConfig(**{**loose.__dict__, field: min(1.0, getattr(loose, field) + raise_by)})
        strict = assess_readiness(history, stricter, samples_seen=samples, total_samples=total)
        assert strict.ready <= verdict.ready and len(strict.missing) >= len(verdict.missing)
        assert all(readiness_score(p, stricter) <= readiness_score(p, loose) for p in history)


def test_the_config_section_is_checked_and_off_by_default():
    assert load_config(None, []).train.readiness.enabled is False
    with pytest.raises(ConfigError, match="train.readiness.enabled: needs the training probe"):
        load_config(None, ["--train.readiness.enabled=true", "--train.probe_images=0"])
    # a job shortened on the command line keeps its readiness section: the budget then ends the run
    short_demo = load_config(str(REPO / "jobs" / "phantoms_demo.yaml"), ["--train.total_samples=64"])
    assert short_demo.train.readiness.enabled and short_demo.train.readiness.min_samples == 40000
    with pytest.raises(ConfigError, match="train.readiness.ce_validity_min"):
        load_config(None, ["--train.readiness.ce_validity_min=1.5"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(None, ["--train.readiness.z_usage=0.1"])


# ---------------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from harness.data import write_phantom_shards

    out = tmp_path_factory.mktemp("phantoms")
    write_phantom_shards(out, size=32, n_train=128, n_val=16, n_test=16, seed=0, samples_per_shard=32)
    return out


def readiness_args(shards: Path, out: Path, **extra: str) -> list[str]:
    """A tiny run probed every 16 samples (16 images, 2 CEs) with readiness on; ``extra`` sets the thresholds."""
    thresholds = {f"train.readiness.{key}": value for key, value in extra.items()}
    return tiny_args(shards, out, total=96, **{
        "train.preview_every": "16", "train.probe_images": "16", "train.probe_counterfactuals": "2",
        "heads.tasks": TASK, "train.readiness.enabled": "true", **thresholds})


@pytest.mark.slow
def test_a_run_that_cannot_get_ready_stops_as_not_improving_and_says_what_is_missing(shards, tmp_path):
    # z-usage is a relative error increase, at most 1: a threshold of 5 is never met, the score never rises.
    result = train_main(readiness_args(shards, tmp_path / "run", z_usage_min="5", patience="1"))
    final = Path(result["model_dir"])
    record = json.loads((final / READINESS_FILE).read_text())
    assert record["ready"] is False and record["stopped_because"] == "not improving for 1 probe"
    assert record["samples_seen"] == result["samples_seen"] == 32 < 96  # two probes (16, 32), then the stop
    assert len(record["missing"]) == 1 and record["missing"][0].startswith("z-usage at t=250 ")
    assert record["missing"][0].endswith(" < 5")
    assert [p["samples_seen"] for p in record["history"]] == [16, 32]
    assert {"floor_margin", "auc_heldout", "floor_auc_heldout", "ce_validity"} <= set(record["history"][0])
    assert json.loads((final / "model.json").read_text())["readiness"] == record
    assert ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints").name == ckpt.checkpoint_name(32)

    # Resumed with the same thresholds, the run stays stopped and exports the same verdict.
    again = train_main(readiness_args(shards, tmp_path / "run", z_usage_min="5", patience="1") + ["--resume"])
    assert again["samples_seen"] == 32 and read_readiness(final)["stopped_because"] == record["stopped_because"]

    # Whatever shows its CEs says so: a red banner on the report, a mark on the figures, a tag.
    assert not_ready_text(read_readiness(final)) == f"Model not ready: {record['missing'][0]}"
    assert readiness_tag(read_readiness(final)) == "not ready"
    report = Report(tmp_path / "report", "tiny")
    report.add_banner(not_ready_text(read_readiness(final)))
    report.add_text("Run", "counterfactuals")
    index = report.write()
    page = index.read_text()
    assert '<div class="banner" role="alert">Model not ready: z-usage at t=250' in page
    assert page.index("Model not ready") < page.index("counterfactuals")  # above everything else
    assert (tmp_path / "report" / "results.md").read_text().splitlines()[2].startswith("> **Model not ready: ")
    assert json.loads((tmp_path / "report" / "results.json").read_text())["banners"] == [
        not_ready_text(record)] and check_report(index) == []


@pytest.mark.slow
def test_a_two_process_run_stops_as_ready_at_min_samples_on_both_ranks(shards, tmp_path):
    # Thresholds every model meets: ready at the first probe (16 samples), stopped at the first one from
    # min_samples on. The probe runs on rank 0 only: rank 1 must stop at the same step, or the run would hang in a
    # collective or train on.
    run_dir = tmp_path / "ready"
    args = readiness_args(shards, run_dir, z_usage_min="-1", ce_validity_min="0", floor_margin_min="-1",
                          min_samples="32") + ["--train.record_keys=true"]
    port = str(29500 + random.Random(os.getpid() + 1).randrange(1000))
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "launch" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port", port]
    proc = run_training(args, launcher)
    output = proc.stdout.read()
    assert proc.wait(timeout=400) == 0, output[-4000:]
    assert "2 process(es) x batch 8" in output and "readiness at 16 samples: ready" in output
    record = read_readiness(run_dir / "final")
    assert record["ready"] is True and record["missing"] == [] and record["stopped_because"] == READY
    assert record["samples_seen"] == 32 and [p["samples_seen"] for p in record["history"]] == [16, 32]
    keys = [(run_dir / f"keys_rank{rank}.txt").read_text().split() for rank in (0, 1)]
    assert [len(k) for k in keys] == [16, 16]  # both ranks stopped after 2 steps of 8 images
    assert json.loads((ckpt.latest_checkpoint(run_dir / "checkpoints") / "trainer_state.json").read_text())[
        "samples_seen"] == 32
    assert not_ready_text(record) is None and readiness_tag(record) == "ready"


def test_readiness_off_writes_no_verdict_and_a_damaged_verdict_is_refused(tmp_path):
    assert read_readiness(tmp_path) is None and not_ready_text(None) is None and readiness_tag(None) == "not assessed"
    (tmp_path / READINESS_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="unreadable readiness verdict"):
        read_readiness(tmp_path)
    (tmp_path / READINESS_FILE).write_text(json.dumps({"ready": "no"}))
    with pytest.raises(ValueError, match="expected"):
        read_readiness(tmp_path)


# ---------------------------------------------------------------------------------------------------- figures


def _red_pixels(path: Path) -> int:
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int(np.sum((rgb[..., 0] > 150) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80)))


def test_figures_saved_inside_marked_figures_carry_the_mark(tmp_path):
    images = np.linspace(-1, 1, 4 * 16 * 16).reshape(4, 1, 16, 16)
    plain = save_image_grid(images, tmp_path / "plain.png", nrow=4, suptitle="CEs")
    with marked_figures("NOT READY: z-usage at t=250 0.080 < 0.15"):
        marked = save_image_grid(images, tmp_path / "marked.png", nrow=4, suptitle="CEs")
        gif = save_gif(images, tmp_path / "marked.gif")
    with marked_figures(None):  # a ready model: nothing changes
        unmarked = save_image_grid(images, tmp_path / "unmarked.png", nrow=4, suptitle="CEs")
    assert _red_pixels(plain) == 0 == _red_pixels(unmarked) and _red_pixels(marked) > 50
    assert Image.open(marked).height > Image.open(plain).height  # the mark sits above the suptitle
    assert _red_pixels(gif) > 0 and _red_pixels(save_gif(images, tmp_path / "plain.gif")) == 0


# ---------------------------------------------------------------------------------------------------- the probe


def test_heldout_auc_is_cross_fitted_and_the_probe_reads_the_floor_margin_and_the_gain():
    from test_counterfactual import ProbeAutoencoder, make_images

    from harness.config import Task
    from harness.evaluation.training_probe import heldout_auc, training_probe

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 20)
    signal = rng.normal(size=(40, 5)) + 3.0 * y[:, None]  # (N, D): the classes apart
    noise = rng.normal(size=(40, 200))  # (N, D): nothing to learn; in-sample it would still separate perfectly
    assert heldout_auc(signal, y) > 0.95 and abs(heldout_auc(noise, y) - 0.5) < 0.25
    assert math.isnan(heldout_auc(signal, np.r_[np.zeros(39, dtype=int), 1]))  # one positive: no two halves

    task = Task("bright", "label", (1,), None, None)
    x = make_images(24, seed=7)  # (B, C, H, W)
    labels = (x.mean(dim=(1, 2, 3)) > x.mean()).double().numpy()
    figures = {ignore_z: training_probe(ProbeAutoencoder(ignore_z), x, labels, task, direction="normal",
                                        n_counterfactuals=4, invert_steps=2, decode_steps=2, gain=True)
               for ignore_z in (False, True)}
    follows = figures[False]
    assert follows["ce_validity"] == 1.0 and follows["ce_gain_neg"] == pytest.approx(1.0, abs=0.05)
    assert figures[True]["ce_validity"] == 0.0 and figures[True]["ce_gain_pos"] == 16.0  # never realised: the bound
    assert follows["floor_margin"] == pytest.approx(follows["auc_heldout"] - follows["floor_auc_heldout"])
    assert 0.0 <= follows["floor_auc_heldout"] <= 1.0 and 0.0 <= follows["auc_heldout"] < follows["auc"]


def test_the_heldout_auc_is_nan_when_a_half_would_lack_two_of_a_class():
    import numpy as np

    from harness.evaluation.training_probe import heldout_auc

    rng = np.random.default_rng(0)
    assert np.isnan(heldout_auc(rng.normal(size=(7, 3)), np.array([1, 0, 0, 0, 0, 1, 1])))  # 3 positives
    y = np.array([0, 1] * 6)
    features = rng.normal(size=(12, 3)) + y[:, None] * 3.0
    assert heldout_auc(features, y) > 0.9
