"""Frames from the data people have: ``encode`` of real pandas DataFrames and pyarrow Tables
(list cells -> ragged, array cells and fixed_size_list -> fixed shape, nullable integers keep
their dtype or fail naming the column), numpy scalars in the metadata, and the errors that
name the column and what to do.

One of the lean install's test files (.ci/lean-test): pandas and pyarrow are test
dependencies of the main suite; without them (the lean venv) their tests skip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from lean_helpers import optional

from root_worker.frame import Ragged, decode, encode

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def pd() -> Any:
    return optional("pandas")


@pytest.fixture
def pa() -> Any:
    return optional("pyarrow")


def test_metadata_takes_numpy_scalars() -> None:
    meta = {"request_id": "r1", "n": np.int64(7), "u": np.uint8(3), "p": np.float32(0.5),
            "ok": np.bool_(True), "nested": [np.int16(-2), {"x": np.float64(1.25)}]}
    got = decode(encode({"a": np.zeros(2)}, meta)).metadata
    assert got == {"request_id": "r1", "n": 7, "u": 3, "p": 0.5, "ok": True,
                   "nested": [-2, {"x": 1.25}]}
    assert type(got["n"]) is int and type(got["ok"]) is bool
    with pytest.raises(ValueError, match="metadata is not JSON: Object of type set"):
        encode({}, {"s": {1, 2}}, n_candidates=1)
    with pytest.raises(ValueError, match="Out of range float"):
        encode({}, {"x": np.float32("nan")}, n_candidates=1)


def test_a_dataframe_becomes_a_frame(pd: Any) -> None:
    df = pd.DataFrame({
        "ctr": np.arange(4, dtype=np.float32),
        "clicks": pd.array([1, 2, 3, 4], dtype="Int64"),
        "small": pd.array([1, 2, 3, 255], dtype="UInt8"),
        "flag": pd.array([True, False, True, True], dtype="boolean"),
        "rate": pd.array([0.5, None, 1.5, 2.0], dtype="Float32"),
        "last_pins": [[1, 2], [], [3], [4, 5, 6]],
        "emb": [np.full(3, i, np.float16) for i in range(4)],
        "grid": [np.arange(4, dtype=np.int32).reshape(2, 2)] * 4,
    }, index=[10, 11, 12, 13])  # the index is not sent
    frame = decode(encode(df, {"request_id": "r"}))
    c = frame.columns
    assert frame.n_candidates == 4 and list(c) == list(df.columns)
    assert c["ctr"].dtype == np.float32 and c["ctr"].tolist() == [0, 1, 2, 3]
    assert c["clicks"].dtype == np.int64 and c["clicks"].tolist() == [1, 2, 3, 4]
    assert c["small"].dtype == np.uint8 and c["small"].tolist() == [1, 2, 3, 255]
    assert c["flag"].dtype == np.bool_ and c["flag"].tolist() == [True, False, True, True]
    assert c["rate"].dtype == np.float32 and np.isnan(c["rate"][1])  # nullable float: NaN
    assert c["rate"][[0, 2, 3]].tolist() == [0.5, 1.5, 2.0]
    ids = c["last_pins"]
    assert isinstance(ids, Ragged) and ids.values.dtype == np.int64
    assert ids.offsets.tolist() == [0, 2, 2, 3, 6] and ids.values.tolist() == [1, 2, 3, 4, 5, 6]
    assert c["emb"].shape == (4, 3) and c["emb"].dtype == np.float16
    assert c["emb"][2].tolist() == [2, 2, 2]
    assert c["grid"].shape == (4, 2, 2) and c["grid"].dtype == np.int32


def test_equal_length_lists_stay_ragged_and_dtypes_cast(pd: Any) -> None:
    """The wire kind of a feature never depends on one request's data."""
    df = pd.DataFrame({"ids": [[1, 2], [3, 4]], "x": [1.0, 2.0], "none": [[], []]})
    frame = decode(encode(df, dtypes={"ids": np.int32, "x": np.float16, "none": np.int64}))
    assert isinstance(frame.columns["ids"], Ragged)
    assert frame.columns["ids"].values.dtype == np.int32
    assert frame.columns["x"].dtype == np.float16
    assert frame.columns["none"].values.dtype == np.int64
    assert frame.columns["none"].offsets.tolist() == [0, 0, 0]
    # a Series as one value of a mapping, beside a numpy column
    mixed = decode(encode({"ids": df["ids"], "y": np.zeros(2)}))
    assert mixed.columns["ids"] == Ragged(np.array([1, 2, 3, 4]), [0, 2, 4])
    alone = decode(encode({"ids": df["ids"]}))  # no numpy column beside it
    assert alone.columns["ids"] == Ragged(np.array([1, 2, 3, 4]), [0, 2, 4])
    with pytest.raises(ValueError, match=r"dtypes names columns that are not there: \['nope'\]"):
        encode(df[["ids", "x"]], dtypes={"nope": np.int8})


def test_a_table_without_columns_gives_its_row_count(pd: Any, pa: Any) -> None:
    """The candidate count of a table is its row count, even with no columns to count
    (a request whose every feature was trimmed); an explicit ``n_candidates`` must agree
    with it."""
    assert decode(encode(pd.DataFrame(index=range(5)))).n_candidates == 5
    assert decode(encode(pa.table({"a": [1, 2, 3]}).select([]))).n_candidates == 3
    df = pd.DataFrame({"x": [1.0, 2.0]})
    assert decode(encode(df, n_candidates=2)).n_candidates == 2
    with pytest.raises(ValueError, match=r"disagree on the candidate count: \[2, 3\]"):
        encode(df, n_candidates=3)
    with pytest.raises(ValueError, match=r"disagree on the candidate count: \[4, 5\]"):
        encode(pd.DataFrame(index=range(5)), n_candidates=4)


@pytest.mark.parametrize(("make", "match"), [
    (lambda pd: pd.DataFrame({"clicks": pd.array([1, None, 3], dtype="Int64")}),
     r"column 'clicks': 1 missing values in a nullable Int64 column \(first at row 1\).*"
     r"fillna\(0\).*astype\('float64'\)"),
    (lambda pd: pd.DataFrame({"f": pd.array([True, None], dtype="boolean")}),
     r"column 'f': 1 missing values in a nullable boolean column"),
    (lambda pd: pd.DataFrame({"city": ["paris", "oslo"]}),
     r"column 'city': .*strings are not a frame dtype: send integer codes"),
    (lambda pd: pd.DataFrame({"cat": pd.Categorical(["a", "b"])}),
     r"column 'cat': categorical: send its integer codes \(df\['cat'\]\.cat\.codes\)"),
    (lambda pd: pd.DataFrame({"when": pd.to_datetime(["2024-01-01", "2024-01-02"])}),
     r"column 'when': .*dates are not a frame dtype: send numbers"),
    (lambda pd: pd.DataFrame({"ids": [[1], None]}),
     r"column 'ids': 1 missing cells \(None/NaN, first at row 1\).*empty list"),
    (lambda pd: pd.DataFrame({"ids": [[], []]}),
     r"column 'ids': every list is empty.*dtypes=\{'ids': np.int64\}"),
    (lambda pd: pd.DataFrame({"emb": [np.zeros(2), np.zeros(3)]}),
     r"column 'emb': array cells have different shapes.*Ragged.from_lists"),
    (lambda pd: pd.DataFrame({"bag": [{1}, {2}]}),
     r"column 'bag': object cells of type set"),
    (lambda pd: pd.DataFrame({"words": [["a"], ["b"]]}),
     r"column 'words': list values: strings are not a frame dtype"),
    (lambda pd: pd.DataFrame({0: [1.0, 2.0]}),
     r"column 0: column names must be non-empty strings"),
    (lambda pd: pd.DataFrame([[1, 2]], columns=["a", "a"]),
     r"column 'a': appears twice"),
])
def test_dataframe_errors_name_the_column_and_what_to_do(pd: Any, make: Any,
                                                          match: str) -> None:
    with pytest.raises(ValueError, match=match):
        encode(make(pd))


def test_a_pyarrow_table_becomes_a_frame(pa: Any) -> None:
    table = pa.table({
        "ctr": pa.array([0.5, None, 2.5, 3.5], pa.float32()),
        "clicks": pa.array([1, 2, 3, 4], pa.int16()),
        "flag": pa.array([True, False, False, True]),
        "ids": pa.array([[1, 2], [], [3], [4, 5, 6]], pa.list_(pa.int64())),
        "big": pa.array([[1], [2, 3], [], [4]], pa.large_list(pa.uint32())),
        "emb": pa.array([[i, i + 1] for i in range(4)], pa.list_(pa.float32(), 2)),
        "grid": pa.array([[[1, 2], [3, 4]]] * 4, pa.list_(pa.list_(pa.int8(), 2), 2)),
        "vecs": pa.array([[[1.0, 2.0]], [], [[3.0, 4.0], [5.0, 6.0]], []],
                         pa.list_(pa.list_(pa.float64(), 2))),
    })
    frame = decode(encode(table))
    c = frame.columns
    assert frame.n_candidates == 4
    assert c["ctr"].dtype == np.float32 and np.isnan(c["ctr"][1])
    assert c["clicks"].dtype == np.int16 and c["flag"].dtype == np.bool_
    assert c["ids"].offsets.tolist() == [0, 2, 2, 3, 6] and c["ids"].values.dtype == np.int64
    assert c["big"].values.dtype == np.uint32 and c["big"].values.tolist() == [1, 2, 3, 4]
    assert c["emb"].shape == (4, 2) and c["emb"][3].tolist() == [3, 4]
    assert c["grid"].shape == (4, 2, 2) and c["grid"].dtype == np.int8
    assert c["vecs"].values.shape == (3, 2) and c["vecs"].offsets.tolist() == [0, 1, 1, 3, 3]
    # a slice (offsets inside the parent's values), chunked columns and a RecordBatch
    part = decode(encode(table.slice(1, 2)))
    assert part.columns["ids"].offsets.tolist() == [0, 0, 1]
    assert part.columns["ids"].values.tolist() == [3]
    chunked = pa.concat_tables([table.slice(0, 1), table.slice(1)])
    assert chunked.column("ids").num_chunks == 2
    assert decode(encode(chunked)).columns["ids"] == c["ids"]
    batch = table.to_batches()[0]
    assert decode(encode(batch)).columns["emb"].tolist() == c["emb"].tolist()
    # pandas with pyarrow-backed columns takes the same path
    pdm = optional("pandas")
    df = table.select(["ids", "clicks"]).to_pandas(types_mapper=pdm.ArrowDtype)
    assert decode(encode(df)).columns["ids"] == c["ids"]


@pytest.mark.parametrize(("column", "match"), [
    ("nullint", r"column 'nullint': 1 null int64 values \(first at row 1\).*fill_null"),
    ("nulllist", r"column 'nulllist': 1 null lists \(first at row 0\)"),
    ("innernull", r"column 'innernull': 1 null int32 values"),
    ("words", r"column 'words': .*strings are not a frame dtype"),
    ("nested", r"column 'nested': lists of variable-length lists.*fixed_size_list"),
    ("when", r"column 'when': .*dates are not a frame dtype"),
])
def test_pyarrow_errors_name_the_column_and_what_to_do(pa: Any, column: str,
                                                       match: str) -> None:
    import datetime
    cols = {
        "nullint": pa.array([1, None]),
        "nulllist": pa.array([None, [1]], pa.list_(pa.int64())),
        "innernull": pa.array([[1], [None]], pa.list_(pa.int32())),
        "words": pa.array(["a", "b"]),
        "nested": pa.array([[[1]], [[2, 3]]], pa.list_(pa.list_(pa.int64()))),
        "when": pa.array([datetime.date(2024, 1, 1)] * 2),
    }
    with pytest.raises(ValueError, match=match):
        encode(pa.table({column: cols[column]}))


def test_the_frame_package_still_imports_without_pandas_or_pyarrow() -> None:
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('pandas', 'pyarrow'):\n"
            "            raise ImportError('blocked: ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import numpy as np\n"
            "from root_worker.frame import decode, encode\n"
            "f = decode(encode({'a': np.arange(3)}, {'n': np.int64(2)}))\n"
            "assert f.metadata == {'n': 2}\n"
            "try:\n"
            "    encode([1, 2])\n"
            "except TypeError as exc:\n"
            "    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.stdout == ("encode() takes a mapping of column name -> array, a pandas "
                          "DataFrame or a pyarrow Table, not list\n"), out.stderr
