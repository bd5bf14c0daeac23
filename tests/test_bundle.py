"""Bundle parsing and validation (trimmer_daemon.bundle.parse): corpus, limits, file I/O, order."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trimmer_daemon.bundle.parse import (
    DEFAULT_LIMITS,
    MAX_WARNINGS,
    BundleError,
    Limits,
    ModelVersion,
    ParsedBundle,
    latest_current,
    latest_version,
    load_bundle_file,
    parse_bundle,
    parse_signature,
    version_sort_key,
)

DATA = Path(__file__).parent / "data"
BAD = DATA / "bad_bundles"
GOOD = DATA / "good_bundles"

M0 = '$["m"][0]'
TOP = "top level must be an object"
NOT_JSON = "not valid JSON (NaN/Infinity literals are not allowed)"

# corpus file -> (expected json_path, substring of the reason)
BAD_CASES: dict[str, tuple[str, str]] = {
    "truncated.json": ("$", "invalid JSON: Expecting ',' delimiter at line 1 column 44"),
    "truncated_in_string.json": ("$", "Unterminated string starting at line 1 column 25"),
    "top_level_list.json": ("$", f"{TOP} mapping model names to version arrays, got array"),
    "top_level_string.json": ("$", f"{TOP} mapping model names to version arrays, got string"),
    "top_level_number.json": ("$", f"{TOP} mapping model names to version arrays, got integer"),
    "top_level_null.json": ("$", f"{TOP} mapping model names to version arrays, got null"),
    "model_maps_to_object.json": ('$["m"]', "non-empty array of version entries, got object"),
    "model_maps_to_empty_list.json": ('$["m"]', "model has no versions (empty array)"),
    "model_maps_to_string.json": ('$["m"]', "non-empty array of version entries, got string"),
    "entry_not_object.json": (M0, "version entry must be an object, got string"),
    "missing_version.json": (M0, 'missing required key "version"'),
    "version_bool.json": (f"{M0}.version", "must be a string or an integer, got boolean"),
    "version_float.json": (f"{M0}.version", "must be a string or an integer, got number"),
    "version_null.json": (f"{M0}.version", "must be a string or an integer, got null"),
    "version_list.json": (f"{M0}.version", "must be a string or an integer, got array"),
    "version_object.json": (f"{M0}.version", "must be a string or an integer, got object"),
    "version_empty_string.json": (f"{M0}.version", "version must be a non-empty string"),
    "missing_input_names.json": (M0, 'missing required key "input_names"'),
    "input_names_empty.json": (f"{M0}.input_names", "input_names must not be empty"),
    "input_names_not_list.json": (f"{M0}.input_names", "must be an array of strings, got string"),
    "input_names_empty_string.json": (f"{M0}.input_names[1]", "must be a non-empty string"),
    "input_names_number.json": (f"{M0}.input_names[1]", "must be a string, got integer"),
    "input_names_null.json": (f"{M0}.input_names[1]", "must be a string, got null"),
    "input_names_nested_list.json": (f"{M0}.input_names[0]", "must be a string, got array"),
    "output_names_not_list.json": (f"{M0}.output_names", "must be an array of strings, got string"),
    "output_names_number.json": (f"{M0}.output_names[1]", "must be a string, got integer"),
    "duplicate_model_key.json": ('$["m"]', 'duplicate key "m"'),
    "duplicate_version_key.json": (f"{M0}.version", 'duplicate key "version"'),
    "duplicate_key_in_unknown_value.json": (f"{M0}.meta.owner", 'duplicate key "owner"'),
    "duplicate_version_in_list.json": ('$["m"][1].version',
                                       'duplicate version "1" (first at index 0)'),
    "nan.json": (f"{M0}.version", f"NaN is {NOT_JSON}"),
    "infinity.json": (f"{M0}.output_names[0]", f"Infinity is {NOT_JSON}"),
    "negative_infinity_in_unknown_key.json": (f"{M0}.threshold", f"-Infinity is {NOT_JSON}"),
    "empty.json": ("$", "empty file"),
    "whitespace_only.json": ("$", "file contains only whitespace"),
    "empty_model_name.json": ('$[""]', "model name must be a non-empty string"),
    "long_feature_name.json": (f"{M0}.input_names[1]", "feature name too long: 1025 bytes > "
                                                       "limit 1024"),
    "long_model_name_multibyte.json": ('$["' + "\u00e9" * 64 + '\u2026"]',
                                       "model name too long: 1026 bytes > limit 1024"),
    "lone_surrogate.json": (f"{M0}.input_names[1]", "not valid Unicode (lone surrogate)"),
    "trailing_garbage.json": ("$", "invalid JSON: Extra data at line 2 column 1"),
    "trailing_comma.json": ("$", "invalid JSON: Expecting value at line 1 column 45"),
    "single_quotes.json": ("$", "Expecting property name enclosed in double quotes at line 1"),
    "comment.json": ("$", "invalid JSON: Expecting value at line 1 column 1"),
    "raw_control_char.json": ("$", "Invalid control character at line 1 column 43"),
    "nul_bytes.json": ("$", "invalid JSON"),
    "non_utf8_latin1.json": ("$", "not valid UTF-8: byte 0xe9 at offset 44 (line 1)"),
    "utf16_with_bom.json": ("$", "not valid UTF-8: byte 0xff at offset 0"),
    "deeply_nested_garbage.json": ("$", "invalid JSON: nested too deeply"),
    "deeply_nested_unbalanced.json": ("$", "invalid JSON: nested too deeply"),
    # names and versions travel as-is in a header and a URL query (wire.NAME_PATTERN)
    "version_header_injection.json": (f"{M0}.version", "has character '\\r' (U+000D) at index "
                                                       "1: names and versions may only use"),
    "version_non_ascii.json": (f"{M0}.version", "has character '\u7248' (U+7248) at index 0"),
    "version_query_injection.json": (f"{M0}.version", "has character '&' (U+0026) at index 1"),
    "model_name_space.json": ('$["ads ctr"]', "model name \"ads ctr\" has character ' ' "
                                              "(U+0020) at index 3"),
    "model_name_at_sign.json": ('$["m@2"]', "has character '@' (U+0040) at index 1"),
}


def _bundle(**models: object) -> bytes:
    return json.dumps(models).encode()


def _entry(version: object = "1", inputs: object = None, **extra: object) -> dict[str, object]:
    return {"version": version, "input_names": ["a"] if inputs is None else inputs, **extra}


# --- corpus ----------------------------------------------------------------------------------


def test_corpus_is_complete_and_large_enough() -> None:
    on_disk = {p.name for p in BAD.iterdir()}
    assert on_disk == set(BAD_CASES), "every corpus file needs an expectation and vice versa"
    assert len(on_disk) >= 25


@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_bad_bundle_is_rejected_with_path_and_reason(name: str) -> None:
    json_path, reason = BAD_CASES[name]
    path = str(BAD / name)
    with pytest.raises(BundleError) as info:
        load_bundle_file(path)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.path == path
    assert err.json_path == json_path
    assert reason in err.reason
    assert str(err) == f"{path}: {json_path}: {err.reason}"
    # parse_bundle on the bytes gives the very same verdict
    with pytest.raises(BundleError) as again:
        parse_bundle((BAD / name).read_bytes(), path="x")
    assert (again.value.json_path, again.value.reason) == (err.json_path, err.reason)


def test_bundle_error_pickles() -> None:
    err = BundleError("/b.json", '$["m"]', "boom")
    back = pickle.loads(pickle.dumps(err))
    assert (back.path, back.json_path, back.reason, str(back)) == (
        "/b.json", '$["m"]', "boom", '/b.json: $["m"]: boom')


# --- good path -------------------------------------------------------------------------------


def test_simple_bundle() -> None:
    parsed = load_bundle_file(GOOD / "simple.json")
    assert isinstance(parsed, ParsedBundle)
    assert parsed.path == str(GOOD / "simple.json")
    assert list(parsed.models) == ["ranker", "ctr"]  # file order
    assert parsed.models["ranker"] == (
        ModelVersion("1", ("user_id", "pin_id"), ("score",)),
        ModelVersion("2", ("user_id", "pin_id", "board_id"), ("score",)))
    assert parsed.models["ctr"][0].output_names == ("p_click", "p_save")
    assert parsed.warnings == ()
    with pytest.raises(TypeError):
        parsed.models["x"] = ()  # type: ignore[index]


def test_sha256_is_of_exact_bytes() -> None:
    for path in GOOD.iterdir():
        assert load_bundle_file(path).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_integer_version_normalised() -> None:
    parsed = load_bundle_file(GOOD / "integer_version.json")
    assert [mv.version for mv in parsed.models["m"]] == ["7", "0", "8"]
    huge = "9" * 1000  # beyond float precision, below the name limit: kept digit for digit
    parsed = parse_bundle(f'{{"m": [{{"version": {huge}, "input_names": ["a"]}}]}}'.encode(),
                          path="p")
    assert parsed.models["m"][0].version == huge


def test_integer_and_string_version_collide() -> None:
    data = _bundle(m=[_entry(version=3), _entry(version="3")])
    with pytest.raises(BundleError, match=r'\$\["m"\]\[1\]\.version: duplicate version "3"'):
        parse_bundle(data, path="p")


def test_duplicate_features_collapsed_with_warning() -> None:
    path = GOOD / "duplicate_features.json"
    parsed = load_bundle_file(path)
    mv = parsed.models["m"][0]
    assert mv.input_names == ("a", "b", "c")
    assert mv.output_names == ("s", "s")  # outputs are kept as written
    assert parsed.warnings == (
        f'{path}: $["m"][0].input_names[2]: duplicate feature "a" collapsed (first at index 0)',
        f'{path}: $["m"][0].input_names[4]: duplicate feature "b" collapsed (first at index 1)')


def test_unknown_keys_ignored() -> None:
    parsed = load_bundle_file(GOOD / "unknown_keys.json")  # "pending" is known since then
    assert parsed.models["m"] == (ModelVersion("1", ("a",), (), pending=True),)
    assert parsed.warnings == ()


def test_output_names_optional() -> None:
    assert load_bundle_file(GOOD / "no_output_names.json").models["m"][0].output_names == ()


def test_unicode_names() -> None:
    parsed = load_bundle_file(GOOD / "unicode_names.json")
    # feature names may be any Unicode; model names and versions are header-safe ASCII
    assert parsed.models["modele.v-2_x~"][0] == ModelVersion(
        "alpha.1", ("caf\u00e9", "\u65e5\u672c", "emoji_\U0001f600"), ())


def test_utf8_bom_accepted_with_warning() -> None:
    path = GOOD / "utf8_bom.json"
    parsed = load_bundle_file(path)
    assert parsed.models["m"][0].input_names == ("a", "b")
    assert parsed.warnings == (f"{path}: $: UTF-8 byte order mark ignored",)
    assert parsed.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_bom_only_is_whitespace_error() -> None:
    with pytest.raises(BundleError, match="only whitespace"):
        parse_bundle(b"\xef\xbb\xbf", path="p")


def test_empty_object_is_valid_but_warned() -> None:
    parsed = load_bundle_file(GOOD / "empty_object.json")
    assert dict(parsed.models) == {}
    assert parsed.warnings == (f"{GOOD / 'empty_object.json'}: $: bundle defines no models",)


def test_accepts_bytearray_and_memoryview() -> None:
    data = _bundle(m=[_entry()])
    for buf in (bytearray(data), memoryview(data)):
        parsed = parse_bundle(buf, path="p")  # type: ignore[arg-type]
        assert parsed.sha256 == hashlib.sha256(data).hexdigest()


def test_warnings_are_capped() -> None:
    data = _bundle(m=[_entry(inputs=["a"] * (MAX_WARNINGS + 51))])
    parsed = parse_bundle(data, path="p")
    assert len(parsed.warnings) == MAX_WARNINGS + 1
    assert parsed.warnings[-1] == "p: $: 50 more warnings suppressed"
    assert parsed.models["m"][0].input_names == ("a",)


def test_json_path_quoting() -> None:
    data = _bundle(**{'we"ird name': [_entry(inputs=["a", 5])]})
    with pytest.raises(BundleError) as info:
        parse_bundle(data, path="p")
    assert info.value.json_path == '$["we\\"ird name"]'  # quoted; and not header-safe
    assert "has character '\"' (U+0022) at index 2" in info.value.reason
    data = _bundle(**{"m": [_entry(version='we"ird', inputs=["a", 5])]})
    with pytest.raises(BundleError) as info:
        parse_bundle(data, path="p")
    assert info.value.json_path == '$["m"][0].version'
    text = '{"m": [{"version": "1", "input_names": ["a"], "x y": {"k": 1, "k": 2}}]}'
    with pytest.raises(BundleError) as info:
        parse_bundle(text.encode(), path="p")
    assert info.value.json_path == '$["m"][0]["x y"].k'


# --- limits ----------------------------------------------------------------------------------


def test_default_limits() -> None:
    assert DEFAULT_LIMITS == Limits(64 * 1024 * 1024, 100_000, 1_000, 100_000, 1_024)


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, None])
def test_limits_must_be_positive_integers(bad: object) -> None:
    with pytest.raises(ValueError, match="Limits.max_models must be a positive integer"):
        Limits(max_models=bad)  # type: ignore[arg-type]


def test_oversize_file_rejected_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    data = _bundle(m=[_entry(inputs=[f"f{i}" for i in range(200)])])
    path.write_bytes(data)
    limits = Limits(max_file_bytes=len(data) - 1)
    with pytest.raises(BundleError) as info:
        load_bundle_file(path, limits=limits)
    assert info.value.json_path == "$"
    assert info.value.reason == f"file too large: {len(data)} bytes > limit {len(data) - 1}"
    with pytest.raises(BundleError, match="file too large"):
        parse_bundle(data, path=str(path), limits=limits)
    assert load_bundle_file(path, limits=Limits(max_file_bytes=len(data))).models


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs procfs")
def test_bounded_read_when_size_is_not_reported() -> None:
    # procfs files are regular files with st_size 0: only the bounded read catches them
    with pytest.raises(BundleError, match="file too large: more than 16 bytes"):
        load_bundle_file("/proc/self/maps", limits=Limits(max_file_bytes=16))


def test_too_many_models() -> None:
    data = _bundle(**{f"m{i}": [_entry()] for i in range(4)})
    with pytest.raises(BundleError, match=r"p: \$: too many models: 4 > limit 3"):
        parse_bundle(data, path="p", limits=Limits(max_models=3))
    assert len(parse_bundle(data, path="p", limits=Limits(max_models=4)).models) == 4


def test_too_many_versions() -> None:
    data = _bundle(m=[_entry(version=i) for i in range(3)])
    with pytest.raises(BundleError, match=r'\$\["m"\]: too many versions: 3 > limit 2'):
        parse_bundle(data, path="p", limits=Limits(max_versions_per_model=2))


def test_too_many_features() -> None:
    data = _bundle(m=[_entry(inputs=["a", "b", "c"], output_names=["s"])])
    limits = Limits(max_features_per_version=2)
    with pytest.raises(BundleError) as info:
        parse_bundle(data, path="p", limits=limits)
    assert info.value.json_path == '$["m"][0].input_names'
    assert info.value.reason == "too many input_names: 3 > limit 2"
    data = _bundle(m=[_entry(inputs=["a"], output_names=["s", "t", "u"])])
    with pytest.raises(BundleError, match="too many output_names: 3 > limit 2"):
        parse_bundle(data, path="p", limits=limits)


def test_name_length_limit_counts_utf8_bytes() -> None:
    limits = Limits(max_name_length=4)
    assert parse_bundle(_bundle(m=[_entry(inputs=["\u00e9\u00e9"])]), path="p", limits=limits)
    with pytest.raises(BundleError, match="feature name too long: 6 bytes > limit 4"):
        parse_bundle(_bundle(m=[_entry(inputs=["\u00e9\u00e9\u00e9"])]), path="p",
                     limits=limits)
    with pytest.raises(BundleError, match="version too long: 5 bytes"):
        parse_bundle(_bundle(m=[_entry(version=12345)]), path="p", limits=limits)
    with pytest.raises(BundleError, match="output name too long"):
        parse_bundle(_bundle(m=[_entry(output_names=["score"])]), path="p", limits=limits)


# --- file access -----------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(BundleError) as info:
        load_bundle_file(path)
    assert str(info.value) == f"{path}: $: file not found"


def test_directory_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"not a regular file \(a directory\)"):
        load_bundle_file(tmp_path)


def test_fifo_does_not_block(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(BundleError, match=r"not a regular file \(not a regular file\)"):
        load_bundle_file(fifo)


def _load_as(uid: int | None, path: Path) -> str:
    """``load_bundle_file(path)`` as ``uid`` (None: as we are): "ok", or the BundleError's
    message. As root, a forked child drops to ``uid`` (no supplementary groups) first: root
    reads any file, so that is the only way the permission check really runs in CI."""
    if uid is None:
        try:
            load_bundle_file(path)
        except BundleError as exc:
            return str(exc)
        return "ok"
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            assert os.geteuid() == uid
            os.write(w, _load_as(None, path).encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the unprivileged child failed"
    return out


def test_unreadable_file(tmp_path: Path) -> None:
    """A file its reader may not read is refused with 'permission denied'. Never skipped:
    as root (CI) the load runs in a child that dropped to an unprivileged uid, and the same
    file made readable then loads, so the refusal is the file's mode, not the path's."""
    uid = 65534 if os.geteuid() == 0 else None  # nobody
    where = Path(tempfile.mkdtemp(prefix="ft-unreadable-"))  # not under a 0700 pytest dir
    try:
        where.chmod(0o755)
        path = where / "secret.json"
        path.write_bytes(_bundle(m=[_entry()]))
        path.chmod(0)
        got = _load_as(uid, path)
        assert re.search(r"\$: permission denied", got), got
        path.chmod(0o644)
        assert _load_as(uid, path) == "ok"
    finally:
        shutil.rmtree(where)


def test_symlink_loop(tmp_path: Path) -> None:
    loop = tmp_path / "loop.json"
    loop.symlink_to(loop)
    with pytest.raises(BundleError, match=r"\$: cannot open file: "):
        load_bundle_file(loop)


# --- signatures ------------------------------------------------------------------------------


def test_parse_signature() -> None:
    sig = parse_signature(b'{"input_names": ["a", "b", "a"], "output_names": ["s"], '
                          b'"framework": "torch"}', path="mi.json")
    assert (sig.input_names, sig.output_names) == (("a", "b"), ("s",))
    assert sig.warnings == (
        'mi.json: $.input_names[2]: duplicate feature "a" collapsed (first at index 0)',)
    assert parse_signature(b'{"input_names": ["a"]}', path="p").output_names == ()


@pytest.mark.parametrize(("data", "json_path", "reason"), [
    (b"[]", "$", "signature must be an object, got array"),
    (b"{}", "$", 'missing required key "input_names"'),
    (b'{"input_names": []}', "$.input_names", "must not be empty"),
    (b'{"input_names": [1]}', "$.input_names[0]", "must be a string, got integer"),
    (b'{"input_names": ["a"], "output_names": {}}', "$.output_names", "got object"),
    (b'{"input_names": ["a"], "input_names": ["b"]}', "$.input_names", "duplicate key"),
    (b'{"input_names": ["a"', "$", "invalid JSON"),
])
def test_bad_signature(data: bytes, json_path: str, reason: str) -> None:
    with pytest.raises(BundleError) as info:
        parse_signature(data, path="mi.json")
    assert info.value.json_path == json_path
    assert reason in info.value.reason


# --- natural version order -------------------------------------------------------------------


@pytest.mark.parametrize(("lower", "higher"), [
    ("2", "10"), ("9", "10"), ("v9", "v10"), ("1.9", "1.10"), ("1.9.9", "1.10.0"),
    ("01", "1"), ("1", "1a"), ("1", "1.0"), ("10", "abc"), ("a", "b"), ("", "0"),
    ("rc1", "rc02"), ("20240101", "20240102"), ("9" * 5000, "1" + "0" * 5000),
    ("007", "8"), ("0", "00"),
])
def test_version_order(lower: str, higher: str) -> None:
    assert version_sort_key(lower) < version_sort_key(higher)
    assert latest_version([higher, lower]) == higher
    assert latest_version([lower, higher]) == higher


def test_latest_version() -> None:
    assert latest_version(["1", "2", "10", "3"]) == "10"
    assert latest_version(iter(["v2", "v10", "v9"])) == "v10"
    assert sorted(["1.10", "1.2", "1.9", "1.1"], key=version_sort_key) == [
        "1.1", "1.2", "1.9", "1.10"]
    with pytest.raises(ValueError, match="no versions"):
        latest_version([])


@settings(max_examples=300, deadline=None)
@given(st.text(), st.text())
def test_version_order_is_total_and_consistent(a: str, b: str) -> None:
    ka, kb = version_sort_key(a), version_sort_key(b)
    assert (ka == kb) == (a == b)
    assert (ka < kb) + (ka > kb) + (ka == kb) == 1


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=10**30), st.integers(min_value=0, max_value=10**30))
def test_all_digit_versions_compare_as_integers(a: int, b: int) -> None:
    if a != b:
        assert (version_sort_key(str(a)) < version_sort_key(str(b))) == (a < b)


# --- robustness ------------------------------------------------------------------------------

_GOOD_BYTES = (GOOD / "simple.json").read_bytes()


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_bundles_raise_only_bundle_error(data: st.DataObject) -> None:
    buf = bytearray(_GOOD_BYTES)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(buf) - 1))
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip":
            buf[pos] = data.draw(st.integers(0, 255))
        elif action == "cut":
            del buf[pos:]
            if not buf:
                break
        else:
            buf[pos:pos] = data.draw(st.sampled_from(
                [b"NaN", b"[", b"{", b'"', b",", b"\xff", b"1e999", b"-0", b"\\ud800", b"null"]))
    try:
        parsed = parse_bundle(bytes(buf), path="fuzz")
    except BundleError as err:
        assert err.path == "fuzz" and err.json_path.startswith("$") and err.reason
    else:
        for versions in parsed.models.values():
            assert versions and all(mv.input_names for mv in versions)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=4),
    max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(_json_values)
def test_arbitrary_json_raises_only_bundle_error(value: object) -> None:
    try:
        parse_bundle(json.dumps(value).encode(), path="fuzz")
    except BundleError:
        pass


def test_pending_mark() -> None:
    doc = {"m": [{"version": "1", "input_names": ["a"]},
                 {"version": "2", "input_names": ["a", "b"], "pending": True},
                 {"version": "3", "input_names": ["a"], "pending": False}]}
    parsed = parse_bundle(json.dumps(doc).encode(), path="b.json")
    assert [mv.pending for mv in parsed.models["m"]] == [False, True, False]
    current = latest_current(parsed.models["m"])
    assert current is not None and current.version == "3"
    only_pending = {"m": [{"version": "2", "input_names": ["a"], "pending": True}]}
    assert latest_current(parse_bundle(json.dumps(only_pending).encode(),
                                       path="b.json").models["m"]) is None
    # files without the mark stay valid, and read as not pending
    plain = parse_bundle(b'{"m": [{"version": "1", "input_names": ["a"]}]}', path="b.json")
    assert plain.models["m"][0].pending is False


@pytest.mark.parametrize("value", ['"yes"', "1", "null", "[]"])
def test_pending_mark_must_be_a_boolean(value: str) -> None:
    data = f'{{"m": [{{"version": "1", "input_names": ["a"], "pending": {value}}}]}}'
    with pytest.raises(BundleError) as err:
        parse_bundle(data.encode(), path="b.json")
    assert err.value.json_path == '$["m"][0].pending'
    assert "pending must be true or false" in err.value.reason
