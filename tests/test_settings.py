"""The one settings registry: one declaration per setting, every spelling derived from it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flatbuffers_schema import settings as S
from root_worker.service.settings import Settings, SettingsError, load_settings
from trimmer_daemon.bundle.parse import Limits
from trimmer_daemon.config import ConfigError, DaemonConfig, load_config, markdown_table

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SCRIPTS = ("trimmer-daemon", "trimmer-bundle", "trimmer-inspect", "trimmer-leaf")


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True,
                          timeout=60)


def test_daemon_docs_carry_the_current_settings_table() -> None:
    doc = (ROOT / "docs" / "daemon.md").read_text()
    assert markdown_table() in doc, "regenerate with: python -m trimmer_daemon.config"


def test_every_setting_has_a_typed_attribute_a_validator_and_help() -> None:
    for cls in (DaemonConfig, Limits, Settings):
        names = {f for f in cls.__dataclass_fields__}
        for spec in S.specs(cls):
            assert spec.name in names and spec.help and callable(spec.parse)
            assert spec.default is None or spec.parse(spec.default) == spec.default
            assert spec.flag or spec.env, spec.name


def test_limits_are_one_declaration_for_daemon_bundle_tool_and_toml(tmp_path: Path) -> None:
    daemon_help = run("trimmer-daemon", "--help").stdout
    validate_help = run("trimmer-bundle", "validate", "--help").stdout
    for spec in S.specs(Limits):
        assert spec.flag in daemon_help and spec.flag in validate_help, spec.flag
    toml = tmp_path / "daemon.toml"
    toml.write_text("max_name_length = 4096\nmax_models = 7\n")
    config = load_config(["--config", str(toml)])
    assert (config.limits.max_name_length, config.limits.max_models) == (4096, 7)
    assert load_config(["--max-name-length", "4096"]).limits.max_name_length == 4096
    # a name of 2000 bytes: refused by default by both, accepted by both with the same limit
    bundle = tmp_path / "b.json"
    bundle.write_text(json.dumps({"m": [{"version": "1", "input_names": ["f" * 2000]}]}))
    assert run("trimmer-bundle", "validate", str(bundle)).returncode == 1
    assert run("trimmer-bundle", "validate", "--max-name-length", "4096",
               str(bundle)).returncode == 0
    assert run("trimmer-bundle", "validate", "--config", str(toml), str(bundle)).returncode == 0


@pytest.mark.parametrize("argv, named", [
    (["--grace-seconds", "-1"], "--grace-seconds"),
    (["--heartbeat-interval", "0"], "--heartbeat-interval"),
    (["--metrics-listen", "127.0.0.1:99999"], "--metrics-listen"),
    (["--shm-name", "a/b"], "--shm-name"),
    (["--shm-mode", "9"], "--shm-mode"),
    (["--max-models", "0"], "--max-models"),
    (["--log-level", "loud"], "--log-level"),
    (["--debounce-ms", "nan"], "--debounce-ms"),
])
def test_daemon_rejects_out_of_range_values_in_one_line(argv: list[str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_config(argv)
    r = run("trimmer-daemon", *argv, "--bundle", "a=/nonexistent/x.json")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and "Traceback" not in r.stderr


def test_toml_errors_name_the_file_and_key(tmp_path: Path) -> None:
    toml = tmp_path / "daemon.toml"
    toml.write_text('grace_seconds = "soon"\n')
    with pytest.raises(ConfigError, match=r"daemon\.toml: grace_seconds"):
        load_config(["--config", str(toml)])
    toml.write_text("max_name_length = 0\n")
    with pytest.raises(ConfigError, match=r"daemon\.toml: max_name_length"):
        load_config(["--config", str(toml)])
    toml.write_text("no_such_setting = 1\n")
    with pytest.raises(ConfigError, match="unknown settings: no_such_setting"):
        load_config(["--config", str(toml)])


def test_bundle_tool_rejects_out_of_range_limits_in_one_line() -> None:
    r = run("trimmer-bundle", "validate", "--max-file-bytes", "0", "x.json")
    assert r.returncode == 2 and "--max-file-bytes" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("env, value", [
    ("FT_SHM_NAME", "bad/name"), ("FT_LEAF_TIMEOUT", "nan"), ("FT_WORKERS", "-3"),
    ("FT_BIND", "127.0.0.1:70000"), ("FT_MODE", "fast"), ("FT_LZ4", "maybe"),
])
def test_root_settings_are_validated_when_loaded(env: str, value: str) -> None:
    with pytest.raises(SettingsError, match=env):
        load_settings({env: value})


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_console_script_has_version_and_help(script: str) -> None:
    r = run(script, "--version")
    assert r.returncode == 0 and r.stdout.startswith(script) and S.package_version() in r.stdout
    h = run(script, "--help")
    assert h.returncode == 0 and "usage:" in h.stdout
