"""The latents table: validation, selection, concatenation and the parquet / npz round trips."""

from __future__ import annotations

import json

import numpy as np
import pytest

from harness.method.latents import LatentsTable, load_latents, save_latents


def make_table(n: int = 12, d: int = 8, with_x_T: bool = True, seed: int = 0) -> LatentsTable:
    rng = np.random.default_rng(seed)
    grade = rng.integers(0, 4, n).astype(np.float64)
    grade[1] = np.nan  # a missing label must survive the round trip
    return LatentsTable(
        ids=[f"img{i:03d}" for i in range(n)],
        splits=np.where(np.arange(n) % 3 == 0, "test", "train"),
        z_sem=rng.normal(size=(n, d)),
        labels={"grade": grade, "fracture": (np.nan_to_num(grade) > 0).astype(np.int64)},
        x_T=rng.normal(size=(n, 1, 4, 4)) if with_x_T else None,
        meta={"dae": "tiny-32@test", "note": "unit test"},
    )


def assert_tables_equal(a: LatentsTable, b: LatentsTable) -> None:
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.splits, b.splits)
    np.testing.assert_array_equal(a.z_sem, b.z_sem)
    assert a.z_sem.dtype == b.z_sem.dtype == np.float32
    assert sorted(a.labels) == sorted(b.labels)
    for column in a.labels:
        np.testing.assert_array_equal(a.labels[column], b.labels[column])
    if a.x_T is None:
        assert b.x_T is None
    else:
        np.testing.assert_array_equal(a.x_T, b.x_T)


@pytest.mark.parametrize("suffix", [".parquet", ".npz"])
@pytest.mark.parametrize("with_x_T", [True, False])
def test_round_trip(tmp_path, suffix, with_x_T):
    table = make_table(with_x_T=with_x_T)
    path = save_latents(table, tmp_path / f"latents{suffix}")
    assert path.exists() and not list(tmp_path.glob(".*tmp"))  # the temp file was renamed, not left behind
    loaded = load_latents(path)
    assert_tables_equal(table, loaded)
    assert loaded.meta["dae"] == "tiny-32@test" and "created" in loaded.meta


def test_parquet_layout_is_documented_one(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = save_latents(make_table(d=8), tmp_path / "t.parquet")
    arrow = pq.read_table(path)
    assert arrow.schema.field("z_sem").type == pa.list_(pa.float32(), 8)
    assert arrow.schema.field("x_T").type == pa.list_(pa.float32(), 16)
    header = json.loads(arrow.schema.metadata[b"dae_cf"])
    assert header["z_dim"] == 8 and header["x_T_shape"] == [1, 4, 4] and header["dae"] == "tiny-32@test"


def test_parquet_from_pandas_with_plain_lists(tmp_path):
    """Latents written by other tools (a variable-size list column) load too; ragged rows are named."""
    import pandas as pd

    rng = np.random.default_rng(1)
    z = rng.normal(size=(5, 3)).astype(np.float32)
    frame = pd.DataFrame({"id": list("abcde"), "split": ["train"] * 5, "grade": [0, 1, 2, 3, 0],
                          "z_sem": [row.tolist() for row in z]})
    frame.to_parquet(tmp_path / "own.parquet")
    loaded = load_latents(tmp_path / "own.parquet")
    np.testing.assert_allclose(loaded.z_sem, z)
    np.testing.assert_array_equal(loaded.labels["grade"], [0, 1, 2, 3, 0])

    frame.loc[3, "z_sem"] = [1.0, 2.0]
    frame.to_parquet(tmp_path / "ragged.parquet")
    with pytest.raises(ValueError, match=r"ragged\.parquet.*row 3 has 2"):
        load_latents(tmp_path / "ragged.parquet")


def test_missing_column_error_names_file_and_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["a"], "split": ["train"]}), tmp_path / "no_z.parquet")
    with pytest.raises(ValueError, match=r"no_z\.parquet.*'z_sem'"):
        load_latents(tmp_path / "no_z.parquet")
    np.savez(tmp_path / "no_split.npz", id=np.array(["a"]), z_sem=np.zeros((1, 2)))
    with pytest.raises(ValueError, match=r"no_split\.npz.*'split'"):
        load_latents(tmp_path / "no_split.npz")


def test_bad_shapes_are_reported(tmp_path):
    np.savez(tmp_path / "flat.npz", id=np.array(["a", "b"]), split=np.array(["train"] * 2), z_sem=np.zeros(2))
    with pytest.raises(ValueError, match=r"flat\.npz.*\(N, D\)"):
        load_latents(tmp_path / "flat.npz")
    np.savez(tmp_path / "short.npz", id=np.array(["a"]), split=np.array(["train"] * 2), z_sem=np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"short\.npz.*'id'"):
        load_latents(tmp_path / "short.npz")
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        load_latents(tmp_path / "absent.npz")
    with pytest.raises(ValueError, match=r"\.csv"):
        save_latents(make_table(), tmp_path / "t.csv")


def test_npz_loads_without_pickle(tmp_path):
    np.savez(tmp_path / "obj.npz", id=np.array(["a", None], dtype=object), split=np.array(["train"] * 2),
             z_sem=np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"obj\.npz.*pickle"):
        load_latents(tmp_path / "obj.npz")


def test_select_concat_and_validation():
    table = make_table(n=12)
    train, test = table.select("train"), table.select("test")
    assert len(train) == 8 and len(test) == 4 and set(train.splits) == {"train"}
    assert table.split_counts() == {"test": 4, "train": 8}
    both = LatentsTable.concat([train, test])
    assert len(both) == 12 and sorted(both.ids) == sorted(table.ids)
    np.testing.assert_array_equal(both.x_T[:8], train.x_T)
    with pytest.raises(ValueError, match="'val'.*train"):
        table.select("val")
    with pytest.raises(ValueError, match="z_dim"):
        LatentsTable.concat([train, make_table(d=4)])
    with pytest.raises(ValueError, match="label column 'grade' has 3 rows"):
        LatentsTable(ids=["a", "b"], splits=["train"] * 2, z_sem=np.zeros((2, 3)), labels={"grade": [0, 1, 2]})
    with pytest.raises(ValueError, match="reserved"):
        LatentsTable(ids=["a"], splits=["train"], z_sem=np.zeros((1, 3)), labels={"split": [0]})
