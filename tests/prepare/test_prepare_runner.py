"""The shared runner: patient-level splits, skipped-input reports, stop-on-bad, resuming, manifest checks."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

from harness.data import read_manifest
from harness.data.prepare import (
    BadInput,
    Plan,
    PrepareError,
    RunOptions,
    Skip,
    WorkItem,
    assign_patient_splits,
    run_plan,
    split_items_by_patient,
)
from harness.data.prepare.common import STATE_DIR, check_patients_disjoint

QUIET = RunOptions(items_per_shard=3, progress=False)


def toy_load(item: WorkItem, *, fail_marker: str | None = None, size: int = 8):
    """Module-level (picklable) loader: item ``n`` -> an 8x8 image of value n; names starting 'bad'/'part'
    misbehave; the item named 'item-7' raises while ``fail_marker`` exists, like an interrupted run."""
    if fail_marker and item.name == "item-7" and Path(fail_marker).exists():
        raise RuntimeError("simulated interruption")
    if item.name.startswith("bad"):
        raise BadInput("unreadable", f"{item.name}: cannot read")
    value = int(item.payload)
    if item.name.startswith("part"):  # one good and one bad sample from the same input
        yield Skip(f"{item.name}:b", "empty_mask", "mask is empty")
    image = np.full((size, size), value, dtype=np.uint8)
    yield f"s{value:03d}", image, {"label": value % 2, "patient_id": item.patient}


def toy_plan(names: list[str], **load_kw) -> Plan:
    items = [WorkItem(name, f"p{i // 2}", i) for i, name in enumerate(names)]
    return Plan("toy", {"train": items}, functools.partial(toy_load, **load_kw), ("label",), {"version": 1})


def test_patient_splits_are_deterministic_disjoint_and_sized():
    patients = [f"patient-{i}" for i in range(200)]
    fractions = {"train": 0.7, "val": 0.1, "test": 0.2}
    first = assign_patient_splits(patients, fractions, seed=3)
    assert first == assign_patient_splits(list(reversed(patients)) + patients[:5], fractions, seed=3)
    assert first != assign_patient_splits(patients, fractions, seed=4)
    sizes = {split: sum(1 for s in first.values() if s == split) for split in fractions}
    assert sizes == {"train": 140, "val": 20, "test": 40}
    tiny = assign_patient_splits(["a", "b", "c"], {"train": 0.8, "val": 0.1, "test": 0.1})
    assert sorted(tiny.values()) == ["test", "train", "val"]  # every split gets a patient when possible
    items = [WorkItem(f"img{i}", f"patient-{i % 50}") for i in range(300)]  # 6 images per patient
    splits = split_items_by_patient(items, fractions, seed=0)
    check_patients_disjoint(splits)
    assert sum(len(v) for v in splits.values()) == 300
    with pytest.raises(PrepareError, match="patient 'x' is in splits 'train' and 'test'"):
        check_patients_disjoint({"train": [WorkItem("a", "x")], "test": [WorkItem("b", "x")]})


def test_bad_inputs_are_reported_and_skipped(tmp_path):
    names = ["item-0", "bad-1", "item-2", "part-3", "item-4"]
    plan = toy_plan(names)
    plan.skipped.append(Skip("table.csv:row 9", "missing_label", "no label row"))
    result = run_plan(plan, tmp_path / "out", QUIET)
    manifest = read_manifest(tmp_path / "out")
    assert manifest["splits"]["train"]["count"] == 4  # item-0, item-2, part-3's good sample, item-4
    assert manifest["splits"]["train"]["label_counts"] == {"label": {"0": 3, "1": 1}}  # only label columns
    skipped = manifest["prepare"]["skipped"]
    assert skipped["count"] == 3 and skipped["by_kind"] == {"empty_mask": 1, "missing_label": 1, "unreadable": 1}
    assert {s["input"] for s in skipped["inputs"]} == {"table.csv:row 9", "bad-1", "part-3:b"}
    assert {s.input for s in result.skipped} == {"table.csv:row 9", "bad-1", "part-3:b"}
    summary = result.summary()
    assert "unreadable: 1" in summary and "bad-1: cannot read" in summary and "bad-1: bad-1" not in summary
    assert manifest["prepare"]["patients"] == {"train": 3}
    assert not (tmp_path / "out" / STATE_DIR).exists()


@pytest.mark.parametrize("names, planning_skip, message", [
    (["item-0", "item-1", "item-2", "bad-3"], False, "bad-3: cannot read"),
    (["item-0", "part-1"], False, "part-1:b: mask is empty"),
    (["item-0"], True, "table.csv:row 9: no label row"),
])
def test_stop_mode_ends_at_the_first_bad_input(tmp_path, names, planning_skip, message):
    plan = toy_plan(names)
    if planning_skip:
        plan.skipped.append(Skip("table.csv:row 9", "missing_label", "no label row"))
    out = tmp_path / "out"
    with pytest.raises(PrepareError, match=message):
        run_plan(plan, out, RunOptions(items_per_shard=3, progress=False, on_bad="stop"))
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("**/*.tmp")) and not list(out.glob(f"{STATE_DIR}/work-*"))


def test_interrupted_run_resumes_from_finished_shards(tmp_path):
    names = [f"item-{i}" for i in range(12)]
    marker = tmp_path / "interrupt"
    marker.touch()
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated interruption"):
        run_plan(toy_plan(names, fail_marker=str(marker)), out, QUIET)
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]
    assert not (out / "manifest.json").exists()  # incomplete folders have no manifest
    marker.unlink()
    resumed = run_plan(toy_plan(names, fail_marker=str(marker)), out, QUIET)
    assert (resumed.shards_resumed, resumed.shards_written) == (2, 2)
    clean = run_plan(toy_plan(names), tmp_path / "clean", QUIET)
    assert resumed.manifest["checksums"] == clean.manifest["checksums"]
    assert resumed.manifest["splits"]["train"]["count"] == 12
    # Changed settings must not reuse the old chunks: the plan's fingerprint differs.
    marker.touch()
    with pytest.raises(RuntimeError):
        run_plan(toy_plan(names, fail_marker=str(marker), size=6), tmp_path / "other", QUIET)
    marker.unlink()
    with pytest.raises(PrepareError, match="unfinished preparation"):
        run_plan(toy_plan(names), tmp_path / "other", QUIET)


def test_output_problems_stop_the_run(tmp_path):
    duplicate = Plan("toy", {"train": [WorkItem("item-1", "p", 1), WorkItem("item-1b", "q", 1)] * 2},
                     toy_load, ("label",), {})
    with pytest.raises(PrepareError, match="duplicate key|occur more than once"):
        run_plan(duplicate, tmp_path / "dup", RunOptions(items_per_shard=1, progress=False))
    all_bad = toy_plan(["item-0", "item-1"])
    all_bad.splits["test"] = [WorkItem("bad-2", "p9", 2)]
    with pytest.raises(PrepareError, match="split 'test': all 1 inputs were skipped"):
        run_plan(all_bad, tmp_path / "bad", QUIET)
    with pytest.raises(PrepareError, match="no inputs"):
        run_plan(Plan("toy", {}, toy_load, ("label",), {}), tmp_path / "empty", QUIET)


def test_missing_optional_package_names_the_extra(monkeypatch, tmp_path):
    import importlib

    from harness.data.prepare.volumes import load_nifti

    real_import = importlib.import_module

    def without_nibabel(name, *args, **kwargs):
        if name.split(".")[0] == "nibabel":
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", without_nibabel)
    with pytest.raises(PrepareError, match=r"NIfTI volumes needs the Python package 'nibabel'.*'prepare' extra"):
        load_nifti(tmp_path / "any.nii.gz")
