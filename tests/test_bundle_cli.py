"""trimmer-bundle build / validate, in-process through main() on real files and zips."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from flatbuffers_schema.atomic_file import write_atomic
from trimmer_daemon.bundle.build import (
    BuildError,
    Source,
    build_bundle,
    read_archive_signature,
)
from trimmer_daemon.bundle.cli import EXIT_ERROR, EXIT_OK, EXIT_USAGE, main
from trimmer_daemon.bundle.parse import load_bundle_file

DATA = Path(__file__).parent / "data"


def signature(inputs: list[str], outputs: list[str] | None = None) -> str:
    return json.dumps({"input_names": inputs, "output_names": outputs or ["score"]})


def write_dir_version(root: Path, model: str, version: str, inputs: list[str]) -> Path:
    vdir = root / model / version
    vdir.mkdir(parents=True)
    (vdir / "module_info.json").write_text(signature(inputs))
    (vdir / "model.bin").write_bytes(b"weights")
    return vdir


def write_pt(path: Path, inputs: list[str] | None, *, archive_root: str = "archive",
             raw: str | None = None) -> Path:
    """A .pt laid out as torch.jit.save writes it (with or without a signature)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{archive_root}/data.pkl", b"\x80\x02}q\x00.")
        zf.writestr(f"{archive_root}/code/__torch__/model.py", "def forward(self): ...\n")
        zf.writestr(f"{archive_root}/version", "3\n")
        if raw is not None:
            zf.writestr(f"{archive_root}/extra/module_info.json", raw)
        elif inputs is not None:
            zf.writestr(f"{archive_root}/extra/module_info.json", signature(inputs))
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def models(tmp_path: Path) -> Path:
    """models/ranker/{1,2,10} (dir signatures and archives), models/ctr/{v9 no sig, v10}."""
    root = tmp_path / "models"
    write_dir_version(root, "ranker", "1", ["user", "pin"])
    write_pt(root / "ranker" / "2" / "model.pt", ["user", "pin", "user"], archive_root="ranker_2")
    write_pt(root / "ranker" / "10" / "model.pt", ["user", "pin"], archive_root="weird-root")
    write_pt(root / "ctr" / "v9" / "model.pt", None)  # no signature: warning + skipped
    write_dir_version(root, "ctr", "v10", ["pin", "board"])
    return root


# --- build -----------------------------------------------------------------------------------


def test_build_model_dirs_and_archives(capsys: pytest.CaptureFixture[str], models: Path,
                                       tmp_path: Path) -> None:
    out = tmp_path / "bundle.json"
    code, stdout, err = run(capsys, "build", "--output", str(out),
                            str(models / "ranker"), str(models / "ctr"))
    assert code == EXIT_OK, err
    assert f"{out}: wrote 2 models, 4 versions (0 pending)" in stdout
    assert "model 'ctr' version 'v9' has no signature" in err and "skipped" in err
    assert 'duplicate feature "user" collapsed' in err
    assert "ranker_2/extra/module_info.json" in err  # the warning names the archive member
    doc = json.loads(out.read_text())
    assert list(doc) == ["ctr", "ranker"]
    assert [e["version"] for e in doc["ranker"]] == ["1", "2", "10"]  # natural order
    assert doc["ranker"][1] == {"version": "2", "input_names": ["user", "pin"],
                                "output_names": ["score"]}
    assert doc["ctr"] == [{"version": "v10", "input_names": ["pin", "board"],
                           "output_names": ["score"]}]
    parsed = load_bundle_file(out)  # the output passes the daemon's parser, cleanly
    assert parsed.warnings == ()
    assert out.read_bytes().endswith(b"}\n")
    assert out.read_text() == json.dumps(doc, sort_keys=True, indent=2) + "\n"


def test_build_single_archive_derives_model_and_version(
        capsys: pytest.CaptureFixture[str], models: Path, tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    code, _, err = run(capsys, "build", "-o", str(out), str(models / "ranker" / "10" / "model.pt"))
    assert code == EXIT_OK, err
    assert json.loads(out.read_text()) == {
        "ranker": [{"version": "10", "input_names": ["user", "pin"], "output_names": ["score"]}]}


def test_build_explicit_entries(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    sig = tmp_path / "anything.json"
    sig.write_text(signature(["x"]))
    pt = write_pt(tmp_path / "flat" / "ads_model-7.pt", ["y"], archive_root="ads_model-7")
    vdir = write_dir_version(tmp_path / "elsewhere", "ignored", "ignored", ["z"])
    out = tmp_path / "b.json"
    code, _, err = run(capsys, "build", "-o", str(out), "--entry", "a", "1", str(sig),
                       "--entry", "b", "7", str(pt), "--pending-entry", "c", "3", str(vdir))
    assert code == EXIT_OK, err
    doc = json.loads(out.read_text())
    assert {m: [(e["version"], e["input_names"]) for e in v] for m, v in doc.items()} == {
        "a": [("1", ["x"])], "b": [("7", ["y"])], "c": [("3", ["z"])]}


def test_build_pending_merge(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    current = tmp_path / "current"
    pending = tmp_path / "pending"
    write_dir_version(current, "ranker", "7", ["a", "b"])
    write_dir_version(pending, "ranker", "8", ["a", "b"])
    write_dir_version(pending, "ranker", "7", ["a", "b"])  # already live: merged, not an error
    write_pt(pending / "newmodel" / "1" / "m.pt", ["c"])
    out = tmp_path / "b.json"
    code, stdout, err = run(capsys, "build", "-o", str(out), str(current / "ranker"),
                            "--pending", str(pending / "ranker"), str(pending / "newmodel"))
    assert code == EXIT_OK, err
    assert "wrote 2 models, 3 versions (2 pending)" in stdout
    doc = json.loads(out.read_text())
    assert [e["version"] for e in doc["ranker"]] == ["7", "8"]
    assert [e["version"] for e in doc["newmodel"]] == ["1"]
    # the mark: only on versions that came from pending sources alone
    assert [e.get("pending") for e in doc["ranker"]] == [None, True]
    assert doc["newmodel"][0]["pending"] is True
    parsed = load_bundle_file(out)
    assert [mv.pending for mv in parsed.models["ranker"]] == [False, True]


def test_promote_and_demote(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    write_dir_version(tmp_path / "cur", "ranker", "7", ["a", "b"])
    write_dir_version(tmp_path / "pend", "ranker", "8", ["a", "c"])
    out = tmp_path / "b.json"
    code, _, err = run(capsys, "build", "-o", str(out), str(tmp_path / "cur" / "ranker"),
                       "--pending", str(tmp_path / "pend" / "ranker"))
    assert code == EXIT_OK, err
    pending_bytes = out.read_bytes()
    code, stdout, err = run(capsys, "promote", str(out))
    assert code == EXIT_OK, err
    assert "promoted: ranker@8" in stdout
    assert [mv.pending for mv in load_bundle_file(out).models["ranker"]] == [False, False]
    code, stdout, _ = run(capsys, "promote", str(out))
    assert code == EXIT_OK and "nothing to change" in stdout
    # a rollback after promotion: the same bytes as the pending build
    code, stdout, err = run(capsys, "promote", "--demote", str(out), "ranker@8")
    assert code == EXIT_OK, err
    assert out.read_bytes() == pending_bytes
    code, _, err = run(capsys, "promote", str(out), "ranker@9")
    assert code == EXIT_ERROR and "model 'ranker' has no version '9'" in err
    code, _, err = run(capsys, "promote", "--demote", str(out))
    assert code == EXIT_ERROR and "demote needs MODEL@VERSION" in err
    assert out.read_bytes() == pending_bytes


def test_build_conflicting_signature_is_error(capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path) -> None:
    write_dir_version(tmp_path / "cur", "ranker", "7", ["a"])
    write_dir_version(tmp_path / "pend", "ranker", "7", ["a", "b"])
    out = tmp_path / "b.json"
    code, _, err = run(capsys, "build", "-o", str(out), str(tmp_path / "cur" / "ranker"),
                       "--pending", str(tmp_path / "pend" / "ranker"))
    assert code == EXIT_ERROR
    assert "model 'ranker' version '7' is defined twice with different signatures" in err
    assert not out.exists()


def test_build_notes_signature_changes_across_versions(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    write_dir_version(tmp_path, "ranker", "1", ["a"])
    write_dir_version(tmp_path, "ranker", "2", ["a", "b"])
    code, _, err = run(capsys, "build", "-o", str(tmp_path / "b.json"), str(tmp_path / "ranker"))
    assert code == EXIT_OK
    # a supported change (roots trim per leaf version): a note, no warning, no "fork"
    assert "note: model 'ranker': version '2' adds 1 and drops 0 of the 1 inputs" in err
    assert "warning" not in err and "fork" not in err


def test_build_archive_without_signature_only_warns(capsys: pytest.CaptureFixture[str],
                                                     tmp_path: Path) -> None:
    write_pt(tmp_path / "m" / "1" / "model.pt", None)
    write_pt(tmp_path / "m" / "2" / "model.pt", ["a"])
    code, stdout, err = run(capsys, "build", "-o", str(tmp_path / "b.json"), str(tmp_path / "m"))
    assert code == EXIT_OK
    assert "model 'm' version '1' has no signature" in err
    assert "1 versions" in stdout


def test_build_nothing_usable(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    write_pt(tmp_path / "m" / "1" / "model.pt", None)
    (tmp_path / "m" / "2").mkdir()  # empty version directory
    out = tmp_path / "b.json"
    out.write_text("previous\n")
    code, _, err = run(capsys, "build", "-o", str(out), str(tmp_path / "m"))
    assert code == EXIT_ERROR
    assert "nothing usable" in err
    assert out.read_text() == "previous\n"  # untouched


def test_build_corrupt_zip_is_clear_error(capsys: pytest.CaptureFixture[str],
                                          tmp_path: Path) -> None:
    pt = tmp_path / "m" / "1" / "model.pt"
    pt.parent.mkdir(parents=True)
    pt.write_bytes(b"PK\x03\x04 this is not really a zip")
    code, _, err = run(capsys, "build", "-o", str(tmp_path / "b.json"), str(tmp_path / "m"))
    assert code == EXIT_ERROR
    assert f"{pt}: not a valid .pt (zip) archive" in err


def test_build_truncated_zip_is_clear_error(capsys: pytest.CaptureFixture[str],
                                            tmp_path: Path) -> None:
    pt = write_pt(tmp_path / "m" / "1" / "model.pt", ["a"])
    pt.write_bytes(pt.read_bytes()[:40])
    code, _, err = run(capsys, "build", "-o", str(tmp_path / "b.json"), str(pt))
    assert code == EXIT_ERROR
    assert f"{pt}: not a valid .pt (zip) archive" in err


def test_build_corrupt_member_crc(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pt = tmp_path / "m" / "1" / "model.pt"
    pt.parent.mkdir(parents=True)
    with zipfile.ZipFile(pt, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/extra/module_info.json", signature(["abcdef"]))
    data = pt.read_bytes()
    pt.write_bytes(data.replace(b"abcdef", b"abcdeg", 1))  # payload no longer matches its CRC
    code, _, err = run(capsys, "build", "-o", str(tmp_path / "b.json"), str(pt))
    assert code == EXIT_ERROR
    assert f"{pt}: not a valid .pt (zip) archive" in err and "CRC" in err


def test_build_malformed_signature_json_names_file(capsys: pytest.CaptureFixture[str],
                                                   tmp_path: Path) -> None:
    vdir = write_dir_version(tmp_path, "m", "1", ["a"])
    (vdir / "module_info.json").write_text('{"input_names": ["a",')
    code, _, err = run(capsys, "build", "-o", str(tmp_path / "b.json"), str(tmp_path / "m"))
    assert code == EXIT_ERROR
    assert f"{vdir / 'module_info.json'}: $: invalid JSON" in err


def test_build_malformed_signature_in_archive_names_member(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pt = write_pt(tmp_path / "m" / "1" / "model.pt", None, raw='{"input_names": [1]}')
    code, _, err = run(capsys, "build", "-o", str(tmp_path / "b.json"), str(tmp_path / "m"))
    assert code == EXIT_ERROR
    assert (f"{pt}!archive/extra/module_info.json: $.input_names[0]: feature name must be a "
            "string, got integer") in err


def test_build_ambiguous_archives(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    write_pt(tmp_path / "m" / "1" / "a.pt", ["a"])
    write_pt(tmp_path / "m" / "1" / "b.pt", ["b"])
    code, _, err = run(capsys, "build", "-o", str(tmp_path / "o.json"), str(tmp_path / "m"))
    assert code == EXIT_ERROR
    assert "several .pt archives (a.pt, b.pt)" in err


def test_archive_with_two_signatures(tmp_path: Path) -> None:
    pt = tmp_path / "two.pt"
    with zipfile.ZipFile(pt, "w") as zf:
        zf.writestr("a/extra/module_info.json", signature(["a"]))
        zf.writestr("b/extra/module_info.json", signature(["b"]))
    with pytest.raises(BuildError, match="several signatures in archive"):
        read_archive_signature(str(pt))


def test_archive_signature_must_be_one_level_deep(tmp_path: Path) -> None:
    pt = tmp_path / "x.pt"
    with zipfile.ZipFile(pt, "w") as zf:
        zf.writestr("extra/module_info.json", signature(["a"]))  # no archive root
        zf.writestr("a/b/extra/module_info.json", signature(["a"]))  # too deep
    assert read_archive_signature(str(pt)) is None
    with zipfile.ZipFile(pt, "a") as zf:
        zf.writestr("root/extra/module_info.json", signature(["c"]))
    found = read_archive_signature(str(pt))
    assert found is not None and found[1] == "root/extra/module_info.json"


def test_version_dir_signature_file_preferred_over_archive(tmp_path: Path) -> None:
    vdir = write_dir_version(tmp_path, "m", "1", ["from_json"])
    write_pt(vdir / "model.pt", ["from_archive"])
    result = build_bundle([Source(str(tmp_path / "m"))])
    assert json.loads(result.data)["m"][0]["input_names"] == ["from_json"]


def test_build_hidden_entries_and_plain_files_ignored(tmp_path: Path) -> None:
    write_dir_version(tmp_path, "m", "1", ["a"])
    write_dir_version(tmp_path, "m", ".tmp-2", ["b"])
    (tmp_path / "m" / "README").write_text("hello")
    result = build_bundle([Source(str(tmp_path / "m"))])
    assert [e["version"] for e in json.loads(result.data)["m"]] == ["1"]


def test_build_version_dir_given_as_model_dir_hints(capsys: pytest.CaptureFixture[str],
                                                    tmp_path: Path) -> None:
    vdir = write_dir_version(tmp_path, "m", "1", ["a"])
    code, _, err = run(capsys, "build", "-o", str(tmp_path / "o.json"), str(vdir))
    assert code == EXIT_ERROR
    assert "holds module_info.json itself: pass its parent" in err


def test_build_bad_sources(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = str(tmp_path / "o.json")
    code, _, err = run(capsys, "build", "-o", out, str(tmp_path / "missing"))
    assert (code, f"{tmp_path / 'missing'}: no such file or directory" in err) == (1, True)
    (tmp_path / "notes.txt").write_text("x")
    code, _, err = run(capsys, "build", "-o", out, str(tmp_path / "notes.txt"))
    assert code == EXIT_ERROR and "not a model directory or a .pt archive" in err


def test_build_unwritable_output(capsys: pytest.CaptureFixture[str], models: Path,
                                 tmp_path: Path) -> None:
    code, _, err = run(capsys, "build", "-o", str(tmp_path / "no" / "such" / "dir.json"),
                       str(models / "ranker"))
    assert code == EXIT_ERROR
    assert "cannot write" in err


def test_build_usage_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "build", "-o", str(tmp_path / "o.json"))
    assert code == EXIT_USAGE and "no SOURCE given" in err
    code, _, err = run(capsys, "build", str(tmp_path))
    assert code == EXIT_USAGE and "--output" in err
    code, _, err = run(capsys, "build", "-o", "x", "--entry", "m", "1")
    assert code == EXIT_USAGE
    code, _, err = run(capsys, "frobnicate")
    assert code == EXIT_USAGE
    code, _, err = run(capsys)
    assert code == EXIT_USAGE and "COMMAND" in err


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == EXIT_OK and "build" in out and "validate" in out
    code, out, _ = run(capsys, "build", "--help")
    assert code == EXIT_OK
    assert "<model>/<version>/" in out and "--pending" in out and "exit codes" in out
    code, out, _ = run(capsys, "validate", "--help")
    assert code == EXIT_OK and "--json" in out


def test_build_is_deterministic(capsys: pytest.CaptureFixture[str], models: Path,
                                tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert run(capsys, "build", "-o", str(a), str(models / "ranker"), str(models / "ctr"))[0] == 0
    # other argument order, archives rewritten (new zip timestamps): same bytes
    write_pt(models / "ranker" / "10" / "model.pt", ["user", "pin"], archive_root="other")
    assert run(capsys, "build", "-o", str(b), str(models / "ctr"), str(models / "ranker"))[0] == 0
    assert a.read_bytes() == b.read_bytes()


def test_build_replaces_output_atomically(capsys: pytest.CaptureFixture[str], models: Path,
                                          tmp_path: Path) -> None:
    outdir = tmp_path / "out"
    outdir.mkdir()
    out = outdir / "module_info.json"
    out.write_text("old\n")
    out.chmod(0o640)
    before = out.stat().st_ino
    keep_open = out.open("rb")  # a reader holding the old file keeps seeing it, whole
    try:
        assert run(capsys, "build", "-o", str(out), str(models / "ranker"))[0] == EXIT_OK
        assert keep_open.read() == b"old\n"
    finally:
        keep_open.close()
    assert out.stat().st_ino != before  # replaced by rename, not rewritten in place
    assert out.stat().st_mode & 0o777 == 0o640  # mode of the replaced file kept
    assert sorted(p.name for p in outdir.iterdir()) == ["module_info.json"]  # no temp left
    load_bundle_file(out)


def test_write_atomic_cleans_up_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "dir-in-the-way"
    target.mkdir()  # os.replace of a file over a directory fails
    with pytest.raises(OSError):
        write_atomic(target, b"{}\n")
    assert [p.name for p in tmp_path.iterdir()] == ["dir-in-the-way"]
    write_atomic(tmp_path / "new.json", b"{}\n")
    assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o644


# --- validate --------------------------------------------------------------------------------


def test_validate_good(capsys: pytest.CaptureFixture[str]) -> None:
    path = DATA / "good_bundles" / "simple.json"
    code, out, err = run(capsys, "validate", str(path))
    assert code == EXIT_OK
    assert out == f"{path}: ok (2 models, 3 versions, 3 features)\n"
    assert err == ""


def test_validate_prints_warnings(capsys: pytest.CaptureFixture[str]) -> None:
    path = DATA / "good_bundles" / "duplicate_features.json"
    code, out, err = run(capsys, "validate", str(path))
    assert code == EXIT_OK
    assert out == f"{path}: ok (1 models, 1 versions, 3 features)\n"
    assert f'warning: {path}: $["m"][0].input_names[2]: duplicate feature "a"' in err


def test_validate_bad_prints_exact_error(capsys: pytest.CaptureFixture[str]) -> None:
    good = DATA / "good_bundles" / "simple.json"
    bad = DATA / "bad_bundles" / "version_bool.json"
    code, out, err = run(capsys, "validate", str(bad), str(good))
    assert code == EXIT_ERROR
    assert err == (f'{bad}: $["m"][0].version: version must be a string or an integer, '
                   "got boolean\n")
    assert out == f"{good}: ok (2 models, 3 versions, 3 features)\n"  # all files are checked


def test_validate_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "validate", str(tmp_path / "nope.json"))
    assert (code, err) == (EXIT_ERROR, f"{tmp_path / 'nope.json'}: $: file not found\n")


def test_validate_json(capsys: pytest.CaptureFixture[str]) -> None:
    good = DATA / "good_bundles" / "duplicate_features.json"
    bad = DATA / "bad_bundles" / "truncated.json"
    code, out, _ = run(capsys, "validate", "--json", str(good), str(bad))
    assert code == EXIT_ERROR
    doc = json.loads(out)
    assert doc["ok"] is False
    first, second = doc["files"]
    assert first["ok"] is True and first["models"] == 1 and first["features"] == 3
    assert len(first["sha256"]) == 64 and len(first["warnings"]) == 2
    assert second["ok"] is False and second["json_path"] == "$"
    assert second["error"].startswith(f"{bad}: $: invalid JSON")
    code, out, _ = run(capsys, "validate", "--json", str(good))
    assert code == EXIT_OK and json.loads(out)["ok"] is True


def test_validate_requires_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "validate")[0] == EXIT_USAGE


def test_installed_console_script(models: Path, tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "trimmer-bundle"
    if not script.exists():
        pytest.skip(f"console script not installed next to {sys.executable}")
    out = tmp_path / "bundle.json"
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    built = subprocess.run([str(script), "build", "-o", str(out), str(models / "ranker")],
                           capture_output=True, text=True, timeout=60, env=env, check=False)
    assert built.returncode == 0, built.stderr
    checked = subprocess.run([str(script), "validate", str(out),
                              str(DATA / "bad_bundles" / "nan.json")],
                             capture_output=True, text=True, timeout=60, env=env, check=False)
    assert checked.returncode == 1
    assert checked.stdout == f"{out}: ok (1 models, 3 versions, 2 features)\n"
    assert "nan.json: $[\"m\"][0].version: NaN is not valid JSON" in checked.stderr


# --- limits ----------------------------------------------------------------------------------


def test_validate_limit_flags(capsys: pytest.CaptureFixture[str]) -> None:
    path = DATA / "good_bundles" / "simple.json"
    code, _, err = run(capsys, "validate", "--max-models", "1", str(path))
    assert (code, err) == (EXIT_ERROR, f"{path}: $: too many models: 2 > limit 1\n")
    code, _, err = run(capsys, "validate", "--max-name-length", "4", str(path))
    assert code == EXIT_ERROR and "too long" in err
    assert run(capsys, "validate", "--max-models", "2", str(path))[0] == EXIT_OK
    assert run(capsys, "validate", "--max-models", "0", str(path))[0] == EXIT_USAGE
    assert run(capsys, "validate", "--max-models", "many", str(path))[0] == EXIT_USAGE


def test_validate_limits_from_daemon_config(capsys: pytest.CaptureFixture[str],
                                            tmp_path: Path) -> None:
    path = DATA / "good_bundles" / "simple.json"
    config = tmp_path / "daemon.toml"
    config.write_text("max_versions_per_model = 1\n")
    code, _, err = run(capsys, "validate", "--config", str(config), str(path))
    assert code == EXIT_ERROR and "too many versions: 2 > limit 1" in err
    # a single flag overrides the config file
    assert run(capsys, "validate", "--config", str(config), "--max-versions", "5",
               str(path))[0] == EXIT_OK
    code, _, err = run(capsys, "validate", "--config", str(tmp_path / "nope.toml"), str(path))
    assert code == EXIT_USAGE and "nope.toml" in err


def test_build_respects_limits(capsys: pytest.CaptureFixture[str], models: Path,
                               tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    code, _, err = run(capsys, "build", "-o", str(out), "--max-versions", "2",
                       str(models / "ranker"))
    assert code == EXIT_ERROR
    assert f'{out}: $["ranker"]: too many versions: 3 > limit 2' in err
    assert not out.exists()
