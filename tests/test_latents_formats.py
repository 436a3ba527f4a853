"""Latents from anywhere (safetensors, torch dicts, Hugging Face folders), label mappings and refused input."""

from __future__ import annotations

import importlib.machinery
import sys
import types

import numpy as np
import pytest
import torch

from harness.config import ConfigError, Task
from harness.method.head_tasks import check_task_labels, infer_tasks, numeric_labels
from harness.method.latents import LatentsError, load_latents, save_latents
from tests.helpers.latents import graded_table


def test_safetensors_round_trip(tmp_path):
    from safetensors.numpy import save_file

    table = graded_table(n=20, d=5)
    codes = np.where(table.splits == "train", 0, 2).astype(np.int64)
    save_file({"z_sem": table.z_sem, "split": codes, "label_grade": table.labels["grade"].astype(np.int64)},
              str(tmp_path / "z.safetensors"), metadata={"meta": '{"dae": "elsewhere"}'})
    loaded = load_latents(tmp_path / "z.safetensors")
    np.testing.assert_array_equal(loaded.z_sem, table.z_sem)
    np.testing.assert_array_equal(loaded.splits, table.splits)  # codes 0 / 2 -> train / test
    np.testing.assert_array_equal(loaded.labels["grade"], table.labels["grade"])
    assert loaded.ids[3] == "3" and loaded.meta == {"dae": "elsewhere"}


def test_torch_dict_with_string_labels_and_a_stated_mapping(tmp_path):
    table = graded_table(n=20, d=5)
    findings = ["pneumonia" if g else "normal" for g in table.labels["grade"]]
    torch.save({"z_sem": torch.from_numpy(table.z_sem), "split": table.splits.tolist(), "id": table.ids.tolist(),
                "labels": {"finding": findings, "score": torch.tensor(table.labels["grade"] > 0, dtype=torch.float32)}},
               tmp_path / "z.pt")
    loaded, mappings = numeric_labels(load_latents(tmp_path / "z.pt"))
    assert mappings == {"finding": {"normal": 0.0, "pneumonia": 1.0}}  # the negative-sounding word is 0
    np.testing.assert_array_equal(loaded.labels["finding"], (table.labels["grade"] > 0).astype(float))
    tasks, notes = infer_tasks(loaded)
    assert [(t.name, t.positives, t.negatives, t.grade_range) for t in tasks] == \
        [("finding", (1,), (0,), None), ("score", (1,), (0,), None)]  # float 0./1. labels: binary too
    assert "binary {0, 1}" in notes[1]


def test_torch_file_with_code_is_refused(tmp_path):
    torch.save({"z_sem": torch.zeros(2, 3), "split": ["train", "test"], "extra": np.zeros(2)}, tmp_path / "bad.pt")
    with pytest.raises(LatentsError, match=r"bad\.pt: refused by torch\.load\(weights_only=True\)"):
        load_latents(tmp_path / "bad.pt")


@pytest.mark.skipif(sys.modules.get("datasets") is not None or importlib.util.find_spec("datasets") is not None,
                    reason="datasets is installed")
def test_hf_folder_without_datasets_says_what_to_install(tmp_path):
    (tmp_path / "hf").mkdir()
    with pytest.raises(LatentsError, match=r"hf: .*pip install datasets"):
        load_latents(tmp_path / "hf")


def test_hf_dataset_dict_splits_become_the_split_column(tmp_path, monkeypatch):
    """A stand-in for datasets.load_from_disk: the loader only reads each split's Arrow table."""
    import pyarrow as pa

    class DatasetDict(dict):
        pass

    def split_table(n: int, offset: int) -> types.SimpleNamespace:
        z = pa.array([[float(offset + i), 1.0, 2.0] for i in range(n)], pa.list_(pa.float32()))
        table = pa.table({"z_sem": z, "grade": [0, 1] * (n // 2)})
        return types.SimpleNamespace(data=types.SimpleNamespace(table=table))

    fake = types.ModuleType("datasets")
    fake.__spec__ = importlib.machinery.ModuleSpec("datasets", None)
    fake.DatasetDict = DatasetDict
    fake.load_from_disk = lambda path: DatasetDict(train=split_table(4, 0), validation=split_table(2, 10))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    (tmp_path / "hf").mkdir()
    table = load_latents(tmp_path / "hf")
    assert table.split_counts() == {"train": 4, "val": 2}  # "validation" read as val
    assert table.ids.tolist()[-1] == "val/1" and table.z_sem[4, 0] == 10.0
    np.testing.assert_array_equal(table.labels["grade"], [0, 1, 0, 1, 0, 1])


def test_bad_input_names_file_column_and_count(tmp_path):
    def npz(name: str, **arrays) -> object:
        base = {"id": np.array(["a", "b", "c"]), "split": np.array(["train", "train", "test"]),
                "z_sem": np.zeros((3, 2), np.float32)}
        np.savez(tmp_path / name, **{**base, **arrays})
        return tmp_path / name

    path = tmp_path / "no_z.npz"
    np.savez(path, id=np.array(["a"]), split=np.array(["train"]))
    with pytest.raises(LatentsError, match=r"no_z\.npz: latents file lacks array 'z_sem'"):
        load_latents(path)
    with pytest.raises(LatentsError, match=r"nan\.npz: column 'z_sem' has 2 rows with NaN/inf"):
        load_latents(npz("nan.npz", z_sem=np.array([[0, np.nan], [np.inf, 1], [0, 0]], np.float32)))
    with pytest.raises(LatentsError, match=r"split\.npz: column 'split' has 2 rows with split names other than "
                                           r"train/val/test: \['validation'\]"):
        load_latents(npz("split.npz", split=np.array(["train", "validation", "validation"])))
    ragged = np.empty(3, dtype=object)
    ragged[:] = [np.zeros(2), np.zeros(3), np.zeros(2)]
    with pytest.raises(LatentsError, match=r"ragged\.npz: array\(s\) \['z_sem'\] hold Python objects"):
        load_latents(npz("ragged.npz", z_sem=ragged))

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["a", "b", "c"], "split": ["train"] * 3, "z_sem": [[0.0, 1.0], [1.0], [2.0]]}),
                   tmp_path / "ragged.parquet")
    with pytest.raises(LatentsError, match=r"ragged\.parquet: column 'z_sem': 2 rows differ in length"):
        load_latents(tmp_path / "ragged.parquet")

    table = graded_table(n=20, d=3)
    table.labels["grade"][:3] = 4
    with pytest.raises(LatentsError, match=r"x\.npz: label column 'grade' has 3 rows outside the "
                                           r"grade_range \[0, 3\] of task 'fracture' \(values: 4 x3\)"):
        check_task_labels(table, [Task("fracture", "grade", (1, 2, 3), None, (0, 3))], "x.npz")
    assert issubclass(LatentsError, ConfigError)  # entry points end it with one line and exit status 2


def test_inferred_graded_task_spans_the_observed_range(tmp_path):
    table = graded_table(n=40, d=3)
    table.labels["grade"][:2] = 4
    save_latents(table, tmp_path / "z.parquet")
    tasks, notes = infer_tasks(load_latents(tmp_path / "z.parquet"))
    assert [(t.positives, t.negatives, t.grade_range) for t in tasks] == [((1, 2, 3, 4), (), (0, 4))]
    assert notes == ["label 'grade': grades [0, 1, 2, 3, 4] -> task 'grade': detection grade >= 1 vs 0, "
                     "grading over 0..4"]


def test_real_hf_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    table = graded_table(n=12, d=3)
    train, test = table.select("train"), table.select("test")
    datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"z_sem": train.z_sem.tolist(), "grade": train.labels["grade"].tolist()}),
        validation=datasets.Dataset.from_dict({"z_sem": test.z_sem.tolist(), "grade": test.labels["grade"].tolist()}),
    ).save_to_disk(str(tmp_path / "hf"))
    loaded = load_latents(tmp_path / "hf")
    assert loaded.split_counts() == {"train": len(train), "val": len(test)}
    np.testing.assert_allclose(loaded.select("train").z_sem, train.z_sem)


@pytest.mark.parametrize("suffix", [".npz", ".parquet", ".pt"])
def test_a_file_of_another_kind_is_named_as_such(tmp_path, suffix):
    path = tmp_path / f"latents{suffix}"
    path.write_text("id,split,z\n1,train,0.5\n")  # a CSV saved under the wrong name
    with pytest.raises(LatentsError, match=rf"is a text file starting b'id,split', not a \{suffix} file"):
        load_latents(path)
    path.write_bytes(b"")
    with pytest.raises(LatentsError, match="an empty file"):
        load_latents(path)
