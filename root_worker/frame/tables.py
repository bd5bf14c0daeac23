"""Frames from the data people have: pandas DataFrames and pyarrow Tables as ``encode`` input.

Runs wherever :func:`~root_worker.frame.encode` runs (clients, roots, tests). Neither pandas
nor pyarrow is imported here: an object is recognised only when its library is already
imported (``sys.modules``), so the frame package still needs numpy alone.

What becomes what (the frame has no nulls, no strings and no dates: every other case fails
with a ``ValueError`` naming the column and what to do):

=====================================================  ======================================
source column                                          frame column
=====================================================  ======================================
numbers or bools (numpy dtypes; pyarrow ints, floats,  dense, same dtype
bools; pandas ``Int64``, ``UInt8``, ``Float32``,
``boolean`` without missing values)
nullable *float* with missing values                   dense float, missing values are NaN
nullable *integer* or *boolean* with missing values    error (fill them, or cast to float)
pandas cells that are Python lists or tuples;          ragged (:class:`Ragged`), the values'
pyarrow ``list`` / ``large_list``                      dtype (``dtypes=`` when ambiguous)
pandas cells that are numpy arrays of one shape;       dense, shape ``(C, *cell_shape)``
pyarrow ``fixed_size_list`` (nested for 2-D cells)
=====================================================  ======================================

A list column stays ragged even when every list of one request has the same length: the wire
kind of a feature never depends on the data of one request (a leaf reads it by kind).
``dtypes={"col": dtype}`` casts a column's values (and gives all-empty list columns their
dtype). The DataFrame's index is not sent; the candidate count is the number of rows.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from root_worker.frame.format import CODE_BY_DTYPE, OFFSETS_DTYPE

__all__ = ["columns_from", "is_table"]

_TABLE_TYPES = (("pandas", "DataFrame"), ("pyarrow", "Table"), ("pyarrow", "RecordBatch"))
_COLUMN_TYPES = (("pandas", "Series"), ("pyarrow", "Array"), ("pyarrow", "ChunkedArray"))


def _instance(obj: object, kinds: tuple[tuple[str, str], ...]) -> bool:
    for module, name in kinds:
        lib = sys.modules.get(module)
        if lib is not None and isinstance(obj, getattr(lib, name)):
            return True
    return False


def is_table(obj: object) -> bool:
    """Whether ``obj`` is a pandas DataFrame or a pyarrow Table / RecordBatch."""
    return _instance(obj, _TABLE_TYPES)


def columns_from(source: Any, dtypes: Mapping[str, Any] | None = None
                 ) -> tuple[dict[str, Any], int | None]:
    """``(columns, n_candidates)`` for :func:`encode`: a table's columns converted, or a
    mapping whose pandas Series / pyarrow arrays are converted (numpy values pass as they
    are). ``n_candidates`` is the table's row count (``None`` for a mapping)."""
    dtypes = dict(dtypes or {})
    if _instance(source, (("pandas", "DataFrame"),)):
        names = list(source.columns)
        _check_names(names)
        cols = {n: _convert(n, source[n], dtypes.pop(n, None)) for n in names}
        n_rows: int | None = len(source)
    elif is_table(source):  # pyarrow Table / RecordBatch
        names = list(source.schema.names)
        _check_names(names)
        cols = {n: _convert(n, source.column(i), dtypes.pop(n, None))
                for i, n in enumerate(names)}
        n_rows = source.num_rows
    elif isinstance(source, Mapping):
        cols = {n: (_convert(n, c, dtypes.pop(n, None)) if _instance(c, _COLUMN_TYPES)
                    or n in dtypes else c) for n, c in source.items()}
        n_rows = None
    else:
        raise TypeError(f"encode() takes a mapping of column name -> array, a pandas DataFrame "
                        f"or a pyarrow Table, not {type(source).__name__}")
    if dtypes:
        raise ValueError(f"dtypes names columns that are not there: {sorted(dtypes)}")
    return cols, n_rows


def _check_names(names: list[Any]) -> None:
    seen: set[Any] = set()
    for n in names:
        if not isinstance(n, str) or not n:
            raise ValueError(f"column {n!r}: column names must be non-empty strings "
                             "(rename it, e.g. df.columns = df.columns.map(str))")
        if n in seen:
            raise ValueError(f"column {n!r}: appears twice (a frame's names are unique)")
        seen.add(n)


def _convert(name: str, col: Any, dtype: Any) -> Any:
    if _instance(col, (("pandas", "Series"),)):
        out = _from_pandas(name, col, dtype)
    elif _instance(col, (("pyarrow", "Array"), ("pyarrow", "ChunkedArray"))):
        out = _from_arrow(name, col, dtype)
    else:  # a numpy array or Ragged given with a dtype
        from root_worker.frame.codec import Ragged
        if isinstance(col, Ragged):
            return Ragged(_cast(name, np.asarray(col.values), dtype), col.offsets)
        return _cast(name, np.asarray(col), dtype)
    return out


def _cast(name: str, values: np.ndarray, dtype: Any) -> np.ndarray:
    if dtype is None:
        return values
    try:
        return values.astype(np.dtype(dtype), copy=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"column {name!r}: cannot cast to {dtype}: {exc}") from None


def _wire_ok(name: str, values: np.ndarray, what: str) -> np.ndarray:
    wire = values.dtype.newbyteorder("<") if values.dtype.byteorder != "|" else values.dtype
    if wire in CODE_BY_DTYPE:
        return values
    hint = {"U": "strings are not a frame dtype: send integer codes (pandas: "
                 "s.astype('category').cat.codes; pyarrow: pc.dictionary_encode)",
            "S": "bytes are not a frame dtype: send integer codes",
            "M": "dates are not a frame dtype: send numbers (e.g. s.astype('int64'), "
                 "nanoseconds since the epoch)",
            "m": "durations are not a frame dtype: send numbers (e.g. total seconds)",
            "O": "mixed Python objects: make the cells numbers, or lists/arrays of numbers",
            "c": "complex numbers are not a frame dtype: send real and imaginary parts"}
    kind = values.dtype.kind
    if kind == "O" and values.size and all(isinstance(v, str) for v in values.flat):
        kind = "U"
    reason = hint.get(kind, f"dtype {values.dtype} is not a frame dtype "
                                        "(bool, int8..64, uint8..64, float16/32/64)")
    raise ValueError(f"column {name!r}: {what}: {reason}")


# --- pandas -------------------------------------------------------------------------------
def _from_pandas(name: str, s: Any, dtype: Any) -> Any:
    import pandas as pd  # already imported: s is a Series

    if isinstance(s.dtype, pd.ArrowDtype):  # pyarrow-backed: the arrow rules
        return _from_arrow(name, s.array.__arrow_array__(), dtype)
    if isinstance(s.dtype, pd.CategoricalDtype):
        raise ValueError(f"column {name!r}: categorical: send its integer codes "
                         f"(df[{name!r}].cat.codes)")
    if s.dtype == object:
        return _from_cells(name, s.to_numpy(), dtype)
    if isinstance(s.dtype, pd.api.extensions.ExtensionDtype):
        return _from_pandas_extension(name, s, dtype)
    return _wire_ok(name, _cast(name, s.to_numpy(), dtype), f"pandas dtype {s.dtype}")


def _from_pandas_extension(name: str, s: Any, dtype: Any) -> np.ndarray:
    """Nullable Int64/UInt8/Float32/boolean (and pandas' string dtypes: refused)."""
    numpy_dtype = getattr(s.dtype, "numpy_dtype", None)
    kind = getattr(numpy_dtype, "kind", "")
    if kind not in "biuf" or numpy_dtype is None:
        return _wire_ok(name, np.asarray(s.to_numpy(dtype=object)), f"pandas dtype {s.dtype}")
    missing = int(s.isna().sum())
    if missing and kind == "f":
        values = s.to_numpy(dtype=numpy_dtype, na_value=np.nan)
    elif missing:
        first = int(np.flatnonzero(s.isna().to_numpy())[0])
        raise ValueError(f"column {name!r}: {missing} missing values in a nullable {s.dtype} "
                         f"column (first at row {first}); a frame has no nulls: fill them "
                         f"(df[{name!r}].fillna(0)) or cast to float, where missing is NaN "
                         f"(df[{name!r}].astype('float64'))")
    else:
        values = s.to_numpy(dtype=numpy_dtype)
    return _wire_ok(name, _cast(name, values, dtype), f"pandas dtype {s.dtype}")


def _from_cells(name: str, cells: np.ndarray, dtype: Any) -> Any:
    """An object column: lists/tuples -> ragged; numpy arrays of one shape -> dense."""
    from root_worker.frame.codec import Ragged

    if cells.size == 0:
        raise ValueError(f"column {name!r}: an empty object column has no dtype: pass a "
                         f"numpy array (np.zeros(0, dtype)) or dtypes={{{name!r}: ...}}")
    missing = [i for i, c in enumerate(cells) if c is None or (isinstance(c, float) and c != c)]
    if missing:
        raise ValueError(f"column {name!r}: {len(missing)} missing cells (None/NaN, first at "
                         f"row {missing[0]}); a frame has no nulls: fill them (an empty list "
                         f"[] for a list column)")
    kinds = {type(c) for c in cells}
    if kinds <= {list, tuple}:
        lengths = np.fromiter((len(c) for c in cells), np.int64, cells.size)
        flat = [v for c in cells for v in c]
        if not flat and dtype is None:
            raise ValueError(f"column {name!r}: every list is empty, so the values have no "
                             f"dtype: pass dtypes={{{name!r}: np.int64}} (or the dtype its "
                             f"leaf expects)")
        try:
            values = np.asarray(flat, dtype=dtype)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"column {name!r}: list cells must hold numbers of one shape "
                             f"(lists of lists for 2-D items): {exc}") from None
        if values.shape[0] != lengths.sum():
            raise ValueError(f"column {name!r}: list cells must hold numbers")
        values = _wire_ok(name, values, "list values")
        return Ragged.from_lengths(values, lengths)
    if kinds == {np.ndarray}:
        shapes = {c.shape for c in cells}
        if len(shapes) != 1:
            raise ValueError(f"column {name!r}: array cells have different shapes "
                             f"{sorted(shapes)[:3]}: for variable-length cells use lists "
                             f"(ragged), or pass Ragged.from_lists(df[{name!r}], dtype)")
        return _wire_ok(name, _cast(name, np.stack(list(cells)), dtype), "array cells")
    if kinds == {str}:
        return _wire_ok(name, cells, "object cells")  # the strings hint
    shown = ", ".join(sorted(t.__name__ for t in kinds))
    raise ValueError(f"column {name!r}: object cells of type {shown}: a frame column holds "
                     "numbers (a numeric dtype), lists of numbers (ragged) or numpy arrays "
                     "of one shape (fixed-shape); convert the cells")


# --- pyarrow ------------------------------------------------------------------------------
def _from_arrow(name: str, arr: Any, dtype: Any) -> Any:
    import pyarrow as pa  # already imported: arr is a pyarrow array
    import pyarrow.types as pat

    from root_worker.frame.codec import Ragged

    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    t = arr.type
    if pat.is_list(t) or pat.is_large_list(t):
        _no_nulls(name, arr, "list")
        offsets = np.asarray(arr.offsets, dtype=OFFSETS_DTYPE)
        offsets = offsets - offsets[0]  # a sliced array's offsets start inside its values
        values = _arrow_values(name, arr.flatten(), dtype, "list values")
        return Ragged(values, offsets)
    if pat.is_fixed_size_list(t):
        return _arrow_values(name, arr, dtype, "fixed_size_list")
    return _arrow_values(name, arr, dtype, f"arrow type {t}")


def _no_nulls(name: str, arr: Any, what: str) -> None:
    if arr.null_count:
        first = next(i for i, v in enumerate(arr.is_null().to_pylist()) if v)
        raise ValueError(f"column {name!r}: {arr.null_count} null {what}s (first at row "
                         f"{first}); a frame has no nulls: fill them (pc.fill_null; an empty "
                         f"list [] for a list column)")


def _arrow_values(name: str, arr: Any, dtype: Any, what: str) -> np.ndarray:
    """A primitive or (nested) fixed_size_list arrow array as numpy ``(n, *inner)``."""
    import pyarrow.types as pat

    shape: list[int] = []
    t = arr.type
    while pat.is_fixed_size_list(t):
        _no_nulls(name, arr, "fixed_size_list")
        shape.append(t.list_size)
        arr = arr.flatten()
        t = arr.type
    if pat.is_list(t) or pat.is_large_list(t):
        raise ValueError(f"column {name!r}: lists of variable-length lists are not a frame "
                         f"column: make the inner lists fixed_size_list")
    if not (pat.is_integer(t) or pat.is_floating(t) or pat.is_boolean(t)):
        return _wire_ok(name, np.asarray(arr.to_numpy(zero_copy_only=False)), what)
    if arr.null_count:
        if pat.is_floating(t):
            arr = arr.fill_null(float("nan"))
        else:
            _no_nulls(name, arr, f"{t} value")
    values = np.asarray(arr.to_numpy(zero_copy_only=False))
    n = values.shape[0] // int(np.prod(shape)) if shape else values.shape[0]
    values = values.reshape((n, *shape)) if shape else values
    return _wire_ok(name, _cast(name, values, dtype), what)
